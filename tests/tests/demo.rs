//! The `cargo xtask demo` path, run as a test: the `lattice-demo` binary
//! (debug build, with the debug agent next to it) must tell the whole story
//! (the app's curl denied with 403, then accepted with 200 once the agent
//! signs) and leave nothing behind.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lattice_tests::{
    DEMO_CREDENTIALS, Output, cgroup::cgroup2_mount, require_root, skip, spawn::ChildGuard,
    test_bin, verifier,
};

const DEMO_TIMEOUT: Duration = Duration::from_secs(120);

fn run_demo(cmd: Command) -> Output {
    let mut child = ChildGuard::spawn(cmd, "lattice-demo".into());
    match child.wait_timeout(DEMO_TIMEOUT) {
        Some(status) => child.output(status),
        None => panic!(
            "lattice-demo still running after {DEMO_TIMEOUT:?}:\n{}",
            child.captured()
        ),
    }
}

#[test]
fn demo_shows_403_then_200_and_leaves_nothing_behind() {
    if !require_root("demo_shows_403_then_200_and_leaves_nothing_behind") {
        return;
    }
    if let Err(needs) = verifier::python_importing(&["botocore"]) {
        skip("demo_shows_403_then_200_and_leaves_nothing_behind", &needs);
        return;
    }
    let started = Instant::now();
    let out = run_demo(Command::new(test_bin("lattice-demo")));
    eprintln!("lattice-demo ran in {:?}", started.elapsed());
    assert!(out.success(), "the demo failed: {out}");

    let denied = out.stdout.find("HTTP/1.1 403 Forbidden");
    let accepted = out.stdout.find("HTTP/1.1 200 OK");
    assert!(
        matches!((denied, accepted), (Some(d), Some(a)) if d < a),
        "expected the app's curl denied (403) and then accepted (200): {out}"
    );
    assert!(
        out.stdout.contains("AccessDeniedException"),
        "the 403 must come from the verifying service: {out}"
    );
    let auth = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("authorization: "))
        .unwrap_or_else(|| panic!("the demo did not show the signed headers: {out}"));
    assert!(
        auth.contains(&DEMO_CREDENTIALS.credential_prefix())
            && auth.contains(&DEMO_CREDENTIALS.scope_suffix())
            && auth.ends_with("Signature=<redacted>"),
        "signed headers shown with the signature redacted: {auth}"
    );
    let secret = DEMO_CREDENTIALS.secret_access_key;
    assert!(
        !out.stdout.contains(secret) && !out.stderr.contains(secret),
        "the demo printed the secret key: {out}"
    );

    // Checked here, independently of the demo's own check.
    let name = out
        .stdout
        .split("network namespace ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the demo did not name its pod: {out}"));
    assert!(name.starts_with("lat-"), "pod name {name:?}: {out}");
    assert!(
        !Path::new("/run/netns").join(name).exists(),
        "network namespace {name} left behind"
    );
    assert!(
        !cgroup2_mount().join(name).exists(),
        "cgroup {name} left behind"
    );
}

#[test]
fn demo_without_root_says_it_needs_root() {
    if !require_root("demo_without_root_says_it_needs_root") {
        return;
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(test_bin("lattice-demo"));
    let out = run_demo(cmd);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("needs root") && out.stdout.is_empty(),
        "expected a clear 'needs root' error and nothing else: {out}"
    );
}
