#!/usr/bin/env python3
"""Checks for the Kubernetes manifests under deploy/ (run by tests/tests/manifests.rs).

  validate  Renders every kustomization under deploy/ with `kubectl kustomize`
            and validates every built-in resource with `kubernetes-validate
            --strict` for each Kubernetes version >= 1.29 it has schemas for.
            kubernetes-validate has no schemas for custom resources: the Kyverno
            ClusterPolicy is checked structurally here instead.
  kyverno   Applies the rendered ClusterPolicy to the example workloads the way
            Kyverno's patchStrategicMerge does (conditional anchors evaluated
            and stripped as in kyverno/pkg/engine/mutate/patch, then the
            kustomize strategic-merge filter Kyverno itself uses, run through
            `kubectl kustomize`) and asserts on the resulting pod specs.
  node      Prints, as JSON, what deploy/node renders: the DaemonSet, the
            ClusterRole, the Role and the NetworkPolicy, for
            tests/tests/manifests.rs to assert on.
  container Prints, as JSON, the lattice-agent container and the pod's volumes
            as deploy/examples/app1-with-sidecar renders them, for
            tests/tests/sidecar_discovery.rs to start the agent exactly so.

Needs PyYAML and kubernetes-validate (the test venv) and kubectl.
"""

import argparse
import copy
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

ANNOTATION = "vpc-lattices-svcs.amazonaws.com/agent-inject"
SIDECAR = "lattice-agent"
MIN_VERSION = (1, 29)


class Unsupported(Exception):
    """The policy uses a Kyverno feature this emulation does not implement."""


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


# --- rendering ---------------------------------------------------------------


def kustomizations(deploy):
    """Every directory under deploy/ holding a Kustomization (not a Component)."""
    found = []
    for root, _dirs, files in os.walk(deploy):
        for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
            if name in files:
                with open(os.path.join(root, name)) as f:
                    doc = yaml.safe_load(f) or {}
                if doc.get("kind", "Kustomization") == "Kustomization":
                    found.append(root)
    return sorted(found)


def render(kubectl, directory):
    out = subprocess.run(
        [kubectl, "kustomize", directory], capture_output=True, text=True
    )
    check(out.returncode == 0, f"kubectl kustomize {directory}: {out.stderr}")
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    check(docs, f"kubectl kustomize {directory} rendered nothing")
    return docs


def is_custom(doc):
    group = doc.get("apiVersion", "").rpartition("/")[0]
    return group.endswith("kyverno.io")


# --- validate ----------------------------------------------------------------


def versions():
    from kubernetes_validate import utils

    found = []
    for v in sorted(set(utils.all_versions())):
        major, minor = (int(x) for x in v.split(".")[:2])
        if (major, minor) >= MIN_VERSION and v not in found:
            found.append(v)
    check(found, "kubernetes-validate has no schemas for Kubernetes >= 1.29")
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def kubernetes_validate(validator, docs, label):
    """Runs the kubernetes-validate CLI (--strict) for every version >= 1.29."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rendered.yaml")
        with open(path, "w") as f:
            yaml.safe_dump_all(docs, f)
        for version in versions():
            out = subprocess.run(
                [validator, "--strict", "--no-warn", "-k", version, path],
                capture_output=True,
                text=True,
            )
            text = out.stdout + out.stderr
            check(out.returncode == 0, f"{label}, Kubernetes {version}:\n{text}")
            passed = text.count("passed for resource")
            check(
                passed == len(docs),
                f"{label}, Kubernetes {version}: {passed} of {len(docs)} validated:\n{text}",
            )
        print(f"ok: {label}: {len(docs)} resources valid (strict) for {', '.join(versions())}")


def check_cluster_policy(doc):
    """Structural check of a kyverno.io/v1 ClusterPolicy (the CRD's required
    fields and the shape this repository relies on)."""
    name = doc.get("metadata", {}).get("name")
    check(doc.get("apiVersion") == "kyverno.io/v1", f"{name}: apiVersion")
    check(doc.get("kind") == "ClusterPolicy", f"{name}: kind")
    check(isinstance(name, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), "metadata.name")
    check("namespace" not in doc["metadata"], f"{name}: a ClusterPolicy is cluster-scoped")
    spec = doc.get("spec")
    check(isinstance(spec, dict), f"{name}: spec")
    rules = spec.get("rules")
    check(isinstance(rules, list) and rules, f"{name}: spec.rules must be a non-empty list")
    names = set()
    for rule in rules:
        rname = rule.get("name")
        check(isinstance(rname, str) and 0 < len(rname) <= 63, f"{name}: rule name")
        check(rname not in names, f"{name}: duplicate rule {rname}")
        names.add(rname)
        match = rule.get("match")
        check(isinstance(match, dict), f"{rname}: match is required")
        blocks = match.get("any") or match.get("all")
        check(isinstance(blocks, list) and blocks, f"{rname}: match.any/all")
        for block in blocks:
            kinds = block.get("resources", {}).get("kinds")
            check(isinstance(kinds, list) and kinds, f"{rname}: match resources.kinds")
        kinds_of_rule = [k for k in ("mutate", "validate", "generate", "verifyImages") if k in rule]
        check(len(kinds_of_rule) == 1, f"{rname}: exactly one of mutate/validate/generate/verifyImages")
        if "mutate" in rule:
            methods = [m for m in ("patchStrategicMerge", "patchesJson6902", "foreach") if m in rule["mutate"]]
            check(len(methods) == 1, f"{rname}: exactly one mutate method")
            if "patchStrategicMerge" in rule["mutate"]:
                check(isinstance(rule["mutate"]["patchStrategicMerge"], dict), f"{rname}: patchStrategicMerge is a map")
    print(f"ok: ClusterPolicy {name}: structure")


def cmd_validate(args):
    deploy = os.path.join(args.workspace, "deploy")
    dirs = kustomizations(deploy)
    check(dirs, f"no kustomization under {deploy}")
    saw_policy = False
    for d in dirs:
        label = os.path.relpath(d, args.workspace)
        docs = render(args.kubectl, d)
        builtin = [doc for doc in docs if not is_custom(doc)]
        for doc in docs:
            if is_custom(doc):
                check(doc["kind"] == "ClusterPolicy", f"{label}: unexpected custom resource {doc['kind']}")
                check_cluster_policy(doc)
                saw_policy = True
            # Local-config (kustomize-only) resources must never be rendered.
            ann = doc.get("metadata", {}).get("annotations", {})
            check("config.kubernetes.io/local-config" not in ann, f"{label}: local-config resource rendered")
        if builtin:
            kubernetes_validate(args.validator, builtin, label)
    check(saw_policy, "no ClusterPolicy rendered")


# --- Kyverno patchStrategicMerge emulation -----------------------------------

ANCHOR = re.compile(r"^([+<^=X]?)\((.+)\)$")


def anchor_of(key):
    m = ANCHOR.match(key) if isinstance(key, str) else None
    return (m.group(1), m.group(2)) if m else None


def reject_variables(node):
    text = json.dumps(node)
    if "{{" in text:
        raise Unsupported("variables ({{ }}) are not emulated")


def matches_pattern(value, pattern):
    """Kyverno MatchPattern for scalars: wildcards * and ? on the string form."""
    if isinstance(pattern, (dict, list)):
        raise Unsupported("non-scalar conditional anchor values are not emulated")
    if isinstance(pattern, bool) or isinstance(value, bool):
        return value == pattern
    return fnmatch.fnmatchcase(str(value), str(pattern))


class ConditionFailed(Exception):
    pass


def preprocess(pattern, resource):
    """Evaluates conditional anchors (kyverno walkMap/validateConditions)."""
    if isinstance(pattern, list):
        for element in pattern:
            if has_anchor(element):
                raise Unsupported("anchors inside lists are not emulated")
        return
    if not isinstance(pattern, dict):
        return
    for key, value in pattern.items():
        a = anchor_of(key)
        if a is None:
            sub = resource.get(key) if isinstance(resource, dict) else None
            preprocess(value, sub)
        elif a[0] == "":
            if not isinstance(resource, dict) or a[1] not in resource:
                raise ConditionFailed(f"{a[1]!r} missing")
            if not matches_pattern(resource[a[1]], value):
                raise ConditionFailed(f"{a[1]}={resource[a[1]]!r} does not match {value!r}")
        else:
            raise Unsupported(f"anchor {key!r} is not emulated")


def has_anchor(node):
    if isinstance(node, dict):
        return any(anchor_of(k) or has_anchor(v) for k, v in node.items())
    if isinstance(node, list):
        return any(has_anchor(e) for e in node)
    return False


def strip_conditions(node):
    """Removes conditional anchors and the maps left empty (deleteConditionElements)."""
    if not isinstance(node, dict):
        return node, False
    out = {}
    for key, value in node.items():
        if anchor_of(key):
            continue
        stripped, emptied = strip_conditions(value)
        if not emptied:
            out[key] = stripped
    return out, (not out and bool(node))


def kustomize_smp(kubectl, resource, patch):
    """The strategic-merge filter Kyverno uses, via kustomize."""
    with tempfile.TemporaryDirectory() as tmp:
        body = {
            "apiVersion": resource["apiVersion"],
            "kind": resource["kind"],
            "metadata": {"name": resource["metadata"]["name"]},
        }
        if "namespace" in resource["metadata"]:
            body["metadata"]["namespace"] = resource["metadata"]["namespace"]
        body.update({k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")})
        if "metadata" in patch:
            body["metadata"].update(patch["metadata"])
        with open(os.path.join(tmp, "resource.yaml"), "w") as f:
            yaml.safe_dump(resource, f)
        with open(os.path.join(tmp, "patch.yaml"), "w") as f:
            yaml.safe_dump(body, f)
        with open(os.path.join(tmp, "kustomization.yaml"), "w") as f:
            yaml.safe_dump({"resources": ["resource.yaml"], "patches": [{"path": "patch.yaml"}]}, f)
        docs = render(kubectl, tmp)
        check(len(docs) == 1, "patching produced more than one resource")
        return docs[0]


def kubectl_patch(kubectl, resource, patch_file):
    """`kubectl patch --local --type strategic` (API-server semantics, offline)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resource.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(resource, f)
        out = subprocess.run(
            [kubectl, "patch", "--local", "-f", path, "--type", "strategic",
             "--patch-file", patch_file, "-o", "yaml"],
            capture_output=True, text=True,
        )
        check(out.returncode == 0, f"kubectl patch --local: {out.stderr}")
        patched = yaml.safe_load(out.stdout)
        # An emptied list stays as [] here; the API server drops it on storage.
        spec = pod_spec(patched)
        for key in ("initContainers", "volumes"):
            if key in spec and not spec[key]:
                del spec[key]
        return patched


def rule_matches(rule, resource):
    match = rule["match"]
    if set(match) - {"any"}:
        raise Unsupported(f"match keys {sorted(match)} are not emulated")
    for block in match["any"]:
        if set(block) != {"resources"} or set(block["resources"]) != {"kinds"}:
            raise Unsupported("only match.any[].resources.kinds is emulated")
        if resource["kind"] in block["resources"]["kinds"]:
            return True
    return False


def kyverno_mutate(kubectl, policy, resource):
    """A resource as Kyverno's admission webhook would mutate it."""
    result = copy.deepcopy(resource)
    for rule in policy["spec"]["rules"]:
        extra = set(rule) - {"name", "match", "mutate"}
        if extra:
            raise Unsupported(f"rule keys {sorted(extra)} are not emulated")
        if not rule_matches(rule, result):
            continue
        if set(rule["mutate"]) != {"patchStrategicMerge"}:
            raise Unsupported("only mutate.patchStrategicMerge is emulated")
        pattern = copy.deepcopy(rule["mutate"]["patchStrategicMerge"])
        reject_variables(pattern)
        try:
            preprocess(pattern, result)
        except ConditionFailed:
            continue  # Kyverno applies an empty patch: resource unchanged
        patch, _ = strip_conditions(pattern)
        result = kustomize_smp(kubectl, result, patch)
    return result


def find_docs(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def assert_sidecar(spec, expected_caps, label):
    inits = spec.get("initContainers", [])
    check(inits and inits[0]["name"] == SIDECAR, f"{label}: {SIDECAR} is not the first initContainer: {[c['name'] for c in inits]}")
    c = inits[0]
    check(c.get("restartPolicy") == "Always", f"{label}: not a native sidecar (restartPolicy: Always)")
    check(c.get("args") == ["sidecar"], f"{label}: args {c.get('args')}")
    env = {e["name"]: e for e in c.get("env", [])}
    check(env.get("POD_UID", {}).get("valueFrom") == {"fieldRef": {"fieldPath": "metadata.uid"}}, f"{label}: POD_UID from metadata.uid")
    check(re.fullmatch(r"[a-z]{2}(-gov)?-[a-z]+-\d", env.get("AWS_REGION", {}).get("value", "")), f"{label}: AWS_REGION {env.get('AWS_REGION')}")
    check(env.get("LATTICE_ADMIN_ADDR", {}).get("value") == "0.0.0.0:15090", f"{label}: admin address for the kubelet's probes")
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        check(c.get(probe, {}).get("httpGet") == {"path": path, "port": 15090}, f"{label}: {probe} {c.get(probe)}")
    sc = c["securityContext"]
    check(
        sc.get("runAsUser") == 101 and sc.get("runAsGroup") == 101 and sc.get("runAsNonRoot") is True,
        f"{label}: runs as UID/GID 101 (the image's user and the exempt UID), runAsNonRoot",
    )
    check(sc.get("privileged") is False and sc.get("allowPrivilegeEscalation") is False, f"{label}: privileged/allowPrivilegeEscalation")
    check(sc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem")
    check(sc.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{label}: seccompProfile")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: capabilities.drop")
    check(sorted(sc.get("capabilities", {}).get("add", [])) == sorted(expected_caps), f"{label}: capabilities.add {sc.get('capabilities')} != measured {expected_caps}")
    res = c.get("resources", {})
    check(res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"), f"{label}: resources")
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    cg = [m for m in mounts.values() if vols.get(m["name"], {}).get("hostPath", {}).get("path") == "/sys/fs/cgroup"]
    check(len(cg) == 1 and cg[0].get("readOnly") is True, f"{label}: read-only hostPath mount of /sys/fs/cgroup")
    names = [x["name"] for x in spec.get("initContainers", []) + spec["containers"]]
    check(len(names) == len(set(names)), f"{label}: duplicate container names {names}")


def workload(kind, name, annotation, init=None):
    template = {
        "metadata": {"labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]},
    }
    if annotation is not None:
        template["metadata"]["annotations"] = {ANNOTATION: annotation}
    if init:
        template["spec"]["initContainers"] = init
    spec = {"selector": {"matchLabels": {"app": name}}, "template": template}
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name, "namespace": "t"}, "spec": spec}


def cmd_kyverno(args):
    deploy = os.path.join(args.workspace, "deploy")
    caps = args.expected_caps.split(",")
    policies = find_docs(render(args.kubectl, os.path.join(deploy, "kyverno")), "ClusterPolicy")
    check(len(policies) == 1, f"expected one ClusterPolicy, got {len(policies)}")
    policy = policies[0]
    app = find_docs(render(args.kubectl, os.path.join(deploy, "examples", "app1")), "Deployment")
    check(len(app) == 1, "examples/app1: one Deployment")
    app = app[0]
    check(app["spec"]["template"]["metadata"]["annotations"].get(ANNOTATION) == "true", "example is annotated")
    check(not pod_spec(app).get("initContainers"), "example has no init containers of its own (no iptables)")
    check([c["name"] for c in pod_spec(app)["containers"]] == ["app1-v1"], "example runs only the app (no sigv4proxy)")

    # 1. The annotated example gets exactly the sidecar of deploy/sidecar.
    injected = kyverno_mutate(args.kubectl, policy, app)
    assert_sidecar(pod_spec(injected), caps, "kyverno(examples/app1)")
    static = find_docs(render(args.kubectl, os.path.join(deploy, "examples", "app1-with-sidecar")), "Deployment")[0]
    assert_sidecar(pod_spec(static), caps, "examples/app1-with-sidecar")
    check(
        injected == static,
        "the Kyverno policy and the sidecar component inject different pod specs:\n"
        + json.dumps(pod_spec(injected), indent=1, sort_keys=True)
        + "\nvs\n"
        + json.dumps(pod_spec(static), indent=1, sort_keys=True),
    )
    # Nothing but the sidecar and its volume was added.
    stripped = copy.deepcopy(injected)
    pod_spec(stripped)["initContainers"] = [c for c in pod_spec(stripped)["initContainers"] if c["name"] != SIDECAR]
    pod_spec(stripped)["volumes"] = [v for v in pod_spec(stripped)["volumes"] if v["name"] != "lattice-host-cgroup"]
    for key in ("initContainers", "volumes"):
        if not pod_spec(stripped)[key]:
            del pod_spec(stripped)[key]
    check(stripped == app, "the policy changed more than the sidecar and its volume")
    print("ok: kyverno: annotated example gets the native sidecar, identical to deploy/sidecar's")

    # 2. Re-applied on UPDATE: unchanged (merge by container name).
    check(kyverno_mutate(args.kubectl, policy, injected) == injected, "policy is not idempotent")
    print("ok: kyverno: idempotent")

    # 3. Without the annotation, or with another value: untouched.
    for value in (None, "false", "True "):
        w = workload("Deployment", "plain", value)
        check(kyverno_mutate(args.kubectl, policy, w) == w, f"annotation {value!r}: template was changed")
    # The annotation must be on the pod template, not the Deployment.
    w = workload("Deployment", "outer", None)
    w["metadata"]["annotations"] = {ANNOTATION: "true"}
    check(kyverno_mutate(args.kubectl, policy, w) == w, "Deployment-level annotation must not inject")
    # Kinds the policy does not match: untouched.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "t", "annotations": {ANNOTATION: "true"}},
           "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]}}
    check(kyverno_mutate(args.kubectl, policy, pod) == pod, "bare Pod was changed")
    print("ok: kyverno: templates without the annotation are untouched")

    # 4. Other workload kinds; the app's own init containers run after the sidecar.
    for kind in ("StatefulSet", "DaemonSet"):
        w = workload(kind, kind.lower(), "true", init=[{"name": "migrate", "image": "example.com/migrate:1"}])
        out = kyverno_mutate(args.kubectl, policy, w)
        assert_sidecar(pod_spec(out), caps, f"kyverno({kind})")
        check([c["name"] for c in pod_spec(out)["initContainers"]] == [SIDECAR, "migrate"], f"{kind}: init order")
    print("ok: kyverno: StatefulSet/DaemonSet injected, sidecar before the app's init containers")

    # 5. Migration: a workload the old policy (iptables + aws-sigv4-proxy)
    # injected, patched with deploy/migration/remove-iptables-setup-containers.yaml; the
    # same update passes through the new policy.
    with_iptables_setup = copy.deepcopy(app)
    pod_spec(with_iptables_setup)["initContainers"] = [
        {"name": "iptables-init", "image": "public.ecr.aws/d2c6w7a3/iptables",
         "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
         "command": ["/bin/sh", "-c", "iptables -t nat -N EGRESS_PROXY"]}]
    pod_spec(with_iptables_setup)["containers"].append(
        {"name": "sigv4proxy", "image": "public.ecr.aws/aws-observability/aws-sigv4-proxy:latest",
         "args": ["--name", "vpc-lattice-svcs"], "ports": [{"containerPort": 8080, "name": "proxy", "protocol": "TCP"}],
         "securityContext": {"runAsUser": 101}})
    migrated = kyverno_mutate(args.kubectl, policy, kubectl_patch(args.kubectl, with_iptables_setup, os.path.join(deploy, "migration", "remove-iptables-setup-containers.yaml")))
    check(migrated == injected, "migration: patched workload of the iptables setup differs from a fresh injection:\n"
          + json.dumps(pod_spec(migrated), indent=1, sort_keys=True))
    print("ok: migration: the iptables setup's containers removed, lattice-agent injected in the same update")

    # 6. The mutated objects are valid Kubernetes objects.
    kubernetes_validate(args.validator, [injected], "kyverno-mutated examples/app1")


def cmd_container(args):
    deploy = os.path.join(args.workspace, "deploy")
    docs = find_docs(render(args.kubectl, os.path.join(deploy, "examples", "app1-with-sidecar")), "Deployment")
    check(len(docs) == 1, "examples/app1-with-sidecar: one Deployment")
    spec = pod_spec(docs[0])
    sidecars = [c for c in spec.get("initContainers", []) if c["name"] == SIDECAR]
    check(len(sidecars) == 1, f"examples/app1-with-sidecar: no {SIDECAR} init container")
    print(json.dumps({"container": sidecars[0], "volumes": spec.get("volumes", [])}))


def cmd_node(args):
    docs = render(args.kubectl, os.path.join(args.workspace, "deploy", "node"))
    daemonsets = find_docs(docs, "DaemonSet")
    roles = find_docs(docs, "ClusterRole")
    ns_roles = find_docs(docs, "Role")
    policies = find_docs(docs, "NetworkPolicy")
    check(len(daemonsets) == 1 and len(roles) == 1 and len(ns_roles) == 1 and len(policies) == 1,
          "deploy/node: one DaemonSet, one ClusterRole, one Role, one NetworkPolicy")
    print(json.dumps({"daemonset": daemonsets[0], "clusterrole": roles[0], "role": ns_roles[0],
                      "networkpolicy": policies[0],
                      "kinds": sorted(d["kind"] for d in docs)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["validate", "kyverno", "container", "node"])
    p.add_argument("--workspace", required=True)
    p.add_argument("--kubectl", default="kubectl")
    p.add_argument("--validator", help="path of the kubernetes-validate CLI (validate, kyverno)")
    p.add_argument("--expected-caps", help="the measured set, e.g. BPF,NET_ADMIN (kyverno)")
    args = p.parse_args()
    try:
        if args.command in ("validate", "kyverno") and not args.validator:
            fail("--validator is required")
        if args.command == "kyverno" and not args.expected_caps:
            fail("--expected-caps is required")
        {"validate": cmd_validate, "kyverno": cmd_kyverno, "container": cmd_container,
         "node": cmd_node}[args.command](args)
    except Unsupported as e:
        fail(f"the policy uses something the Kyverno emulation does not implement: {e}")


if __name__ == "__main__":
    main()
