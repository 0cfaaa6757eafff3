//! The manifests under deploy/ as Kubernetes would get them: rendered with
//! `kubectl kustomize` and read by tests/manifests/check_manifests.py.

use std::{ffi::OsStr, path::PathBuf, process::Command};

use crate::{skip, venv, workspace};

/// What tests/manifests/check_manifests.py needs.
pub struct ManifestTools {
    pub python: PathBuf,
    pub validator: PathBuf,
}

/// The tools, or None (skip, loudly) when missing outside CI; panics under
/// CI=true.
pub fn manifest_tools(test: &str) -> Option<ManifestTools> {
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
            "a venv at {} with PyYAML and kubernetes-validate (tests/requirements.txt; \
             `cargo xtask setup`, or set LATTICE_TEST_VENV)",
            venv.display()
        ));
    }
    if missing.is_empty() {
        return Some(ManifestTools { python, validator });
    }
    skip(test, &missing.join(", "));
    None
}

/// Runs `tests/manifests/check_manifests.py <command> --workspace <root>`
/// with `args` after it; its stdout (also printed, for the test's log).
/// Panics, with what the script said, unless it exits 0.
pub fn check_manifests(tools: &ManifestTools, command: &str, args: &[&OsStr]) -> String {
    let out = Command::new(&tools.python)
        .arg(workspace().join("tests/manifests/check_manifests.py"))
        .arg(command)
        .arg("--workspace")
        .arg(workspace())
        .args(args)
        .output()
        .expect("run check_manifests.py");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    assert!(
        out.status.success(),
        "check_manifests.py {command} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// [`check_manifests`] for a command that answers in JSON.
pub fn check_manifests_json(tools: &ManifestTools, command: &str) -> serde_json::Value {
    let out = check_manifests(tools, command, &[]);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("check_manifests.py {command}: not JSON ({e}): {out}"))
}

/// The lattice-agent container (`container`) and the pod's volumes
/// (`volumes`) as deploy/examples/app1-with-sidecar renders them.
pub fn rendered_sidecar(tools: &ManifestTools) -> serde_json::Value {
    check_manifests_json(tools, "container")
}
