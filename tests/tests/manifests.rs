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

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// $LATTICE_TEST_VENV, else `<target dir>/venv`.
fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("LATTICE_TEST_VENV") {
        return PathBuf::from(v);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("venv")
}

struct Tools {
    python: PathBuf,
    validator: PathBuf,
}

/// The tools, or None (skip) when missing outside CI; panics under CI=true.
fn tools(test: &str) -> Option<Tools> {
    let venv = venv();
    let python = venv.join("bin/python");
    let validator = venv.join("bin/kubernetes-validate");
    let mut missing = Vec::new();
    let kubectl_ok = Command::new("kubectl")
        .args(["kustomize", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !kubectl_ok {
        missing.push("kubectl with kustomize (`kubectl kustomize`)".to_owned());
    }
    let venv_ok = Command::new(&python)
        .args(["-c", "import yaml, kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !venv_ok || !validator.is_file() {
        missing.push(format!(
            "a venv at {} with PyYAML and kubernetes-validate (tests/requirements.txt; `cargo xtask setup`, or set LATTICE_TEST_VENV)",
            venv.display()
        ));
    }
    if missing.is_empty() {
        return Some(Tools { python, validator });
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{test}: missing {}; CI=true forbids skipping",
        missing.join(", ")
    );
    eprintln!("\n*** SKIPPED {test}: missing {} ***\n", missing.join(", "));
    None
}

fn check_manifests(test: &str, command: &str) {
    let Some(tools) = tools(test) else { return };
    let workspace = workspace();
    let caps: Vec<String> = sidecar_support::ROOT_START_CAPS
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
