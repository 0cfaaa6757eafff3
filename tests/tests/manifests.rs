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

mod sidecar_support;

use std::process::Command;

use lattice_tests::workspace;
use sidecar_support::manifest_tools;

fn check_manifests(test: &str, command: &str) {
    let Some(tools) = manifest_tools(test) else {
        return;
    };
    let workspace = workspace();
    let caps: Vec<String> = sidecar_support::SIDECAR_CAPS
        .iter()
        .map(|c| c.to_uppercase())
        .collect();
    let out = Command::new(&tools.python)
        .arg(workspace.join("tests/manifests/check_manifests.py"))
        .arg(command)
        .arg("--workspace")
        .arg(&workspace)
        .arg("--validator")
        .arg(&tools.validator)
        .arg("--expected-caps")
        .arg(caps.join(","))
        .output()
        .expect("run check_manifests.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "check_manifests.py {command} failed:\n{stdout}\n{stderr}"
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
