//! The Kubernetes manifests under deploy/: every kustomization renders and
//! passes `kubernetes-validate --strict` for Kubernetes 1.29 and newer; the
//! Kyverno ClusterPolicy (a custom resource, for which kubernetes-validate
//! has no schema) is checked structurally; and the policy applied to the
//! example workloads yields the intended pod spec: the same native sidecar
//! as deploy/sidecar, only on annotated pod templates.
//!
//! The checks are in tests/manifests/check_manifests.py (YAML work is easier
//! in Python, and the test venv has PyYAML and kubernetes-validate). Needs
//! `kubectl` (with kustomize) and the venv (`cargo xtask setup`); without
//! them the tests are skipped loudly, and under CI=true they fail.

use lattice_tests::{
    manifests::{self, manifest_tools},
    sidecar::SIDECAR_CAPS,
};

fn check_manifests(test: &str, command: &str) {
    let Some(tools) = manifest_tools(test) else {
        return;
    };
    let caps: Vec<String> = SIDECAR_CAPS.iter().map(|c| c.to_uppercase()).collect();
    let caps = caps.join(",");
    manifests::check_manifests(
        &tools,
        command,
        &[
            "--validator".as_ref(),
            tools.validator.as_os_str(),
            "--expected-caps".as_ref(),
            caps.as_ref(),
        ],
    );
}

#[test]
fn every_kustomization_is_valid_for_kubernetes_1_29_and_newer() {
    check_manifests(
        "every_kustomization_is_valid_for_kubernetes_1_29_and_newer",
        "validate",
    );
}

#[test]
fn kyverno_policy_injects_the_native_sidecar_into_annotated_templates_only() {
    check_manifests(
        "kyverno_policy_injects_the_native_sidecar_into_annotated_templates_only",
        "kyverno",
    );
}

/// deploy/node grants the node agent what tests/tests/node_privilege.rs
/// measured and nothing more: RBAC read on pods and namespaces and create
/// on events (no secrets, no tokens), and in its own namespace get on
/// DaemonSets; a non-privileged container with the measured capabilities
/// (the CNI plugin's included); the host's PID namespace and six hostPaths
/// (two read-only); readiness on /readyz; every node; updates that surge
/// a new agent beside the old one, never leaving the node without one; the
/// node's bpffs mounted where node mode pins by default; and a
/// NetworkPolicy letting only the monitoring namespace reach the agent's
/// pod, on its admin port.
#[test]
fn node_manifests_grant_exactly_the_measured_privileges() {
    let Some(tools) = manifest_tools("node_manifests_grant_exactly_the_measured_privileges") else {
        return;
    };
    let v = manifests::check_manifests_json(&tools, "node");
    assert_eq!(
        v["kinds"],
        serde_json::json!([
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Namespace",
            "NetworkPolicy",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ])
    );

    let rules = v["clusterrole"]["rules"].as_array().expect("rules");
    let granted: Vec<(String, String, String)> = rules
        .iter()
        .flat_map(|r| {
            let list = |k: &str| -> Vec<String> {
                r[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap().to_owned())
                    .collect()
            };
            let (groups, resources, verbs) = (list("apiGroups"), list("resources"), list("verbs"));
            let mut out = Vec::new();
            for g in &groups {
                for res in &resources {
                    for verb in &verbs {
                        out.push((g.clone(), res.clone(), verb.clone()));
                    }
                }
            }
            out
        })
        .collect();
    let mut want: Vec<(String, String, String)> = Vec::new();
    for res in ["pods", "namespaces"] {
        for verb in ["get", "list", "watch"] {
            want.push(("".into(), res.into(), verb.into()));
        }
    }
    want.push(("".into(), "events".into(), "create".into()));
    want.push(("events.k8s.io".into(), "events".into(), "create".into()));
    let (mut got, mut want) = (granted, want);
    got.sort();
    want.sort();
    assert_eq!(got, want, "ClusterRole rules");

    assert_eq!(
        v["role"]["rules"],
        serde_json::json!([{"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"]}]),
        "Role rules"
    );
    assert_eq!(v["role"]["metadata"]["namespace"], "lattice-system");

    let ds = &v["daemonset"];
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostPID"], true);
    assert_ne!(spec["hostNetwork"], true, "the agent needs no host network");
    assert_eq!(
        spec["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"],
        serde_json::json!({"maxSurge": 1, "maxUnavailable": 0}),
        "the new agent takes over from the old one (handover), so both run for a while"
    );
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["args"], serde_json::json!(["node"]));
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut added: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    added.sort();
    let mut measured: Vec<String> = lattice_tests::node_agent::NODE_START_CAPS
        .iter()
        .chain(&lattice_tests::node_agent::NODE_CNI_CAPS)
        .map(|c| c.to_uppercase())
        .collect();
    measured.sort();
    assert_eq!(added, measured, "capabilities.add is the measured set");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let env = c["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "NODE_NAME from the downward API"
    );
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert!(
            env.iter()
                .any(|e| e["name"] == name && e["valueFrom"]["fieldRef"]["fieldPath"] == field),
            "{name} from the downward API"
        );
    }
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{name} set"))
    };
    assert_eq!(value("LATTICE_CNI_CONF_DIR"), "/etc/cni/net.d");
    assert_eq!(value("LATTICE_CNI_BIN_DIR"), "/opt/cni/bin");
    // Node mode pins at /sys/fs/bpf/lattice-node unless told otherwise:
    // the bpffs hostPath below must be mounted there.
    assert!(
        env.iter()
            .find(|e| e["name"] == "LATTICE_PIN")
            .is_none_or(|e| e["value"] == "/sys/fs/bpf/lattice-node"),
        "LATTICE_PIN elsewhere than the bpffs mount"
    );
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == "/sys/fs/bpf" && m["readOnly"] != true),
        "the node's bpffs is mounted where node mode pins"
    );
    let run_dir = env
        .iter()
        .find(|e| e["name"] == "LATTICE_RUN_DIR")
        .and_then(|e| e["value"].as_str())
        .expect("LATTICE_RUN_DIR set");
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == run_dir),
        "LATTICE_RUN_DIR {run_dir} is a mounted hostPath, shared with the next agent"
    );
    let mut host_paths: Vec<(String, String, bool)> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vol| {
            let name = vol["name"].as_str().unwrap();
            let mount = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == name)
                .unwrap_or_else(|| panic!("volume {name} not mounted"));
            (
                vol["hostPath"]["path"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: not a hostPath"))
                    .to_owned(),
                mount["mountPropagation"]
                    .as_str()
                    .unwrap_or("None")
                    .to_owned(),
                mount["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    host_paths.sort();
    assert_eq!(
        host_paths,
        [
            ("/etc/cni/net.d".to_owned(), "None".to_owned(), false),
            ("/opt/cni/bin".to_owned(), "None".to_owned(), false),
            ("/sys/fs/bpf".to_owned(), "None".to_owned(), false),
            ("/sys/fs/cgroup".to_owned(), "None".to_owned(), true),
            (
                "/var/lib/kubelet/pods".to_owned(),
                "HostToContainer".to_owned(),
                true
            ),
            ("/var/run/lattice".to_owned(), "None".to_owned(), false),
        ]
    );

    let policy = &v["networkpolicy"];
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            .as_str()
            .map(|n| serde_json::json!({"app.kubernetes.io/name": n}))
            .unwrap(),
        "the NetworkPolicy selects the agent's pods"
    );
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let ingress = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 1, "{ingress:?}");
    let admin_port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["containerPort"] == 15090)
        .expect("the admin port is declared");
    assert_eq!(
        ingress[0]["ports"],
        serde_json::json!([{"port": admin_port["name"], "protocol": "TCP"}]),
        "only the admin port"
    );
    let from = ingress[0]["from"].as_array().unwrap();
    assert!(
        !from.is_empty()
            && from.iter().all(
                |f| f["namespaceSelector"]["matchLabels"].is_object() && f["ipBlock"].is_null()
            ),
        "only pods of named namespaces may scrape: {from:?}"
    );
}
