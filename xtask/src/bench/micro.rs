//! The micro-benchmarks behind a target: `cargo bench -p lattice-agent
//! --bench signing` (criterion), read back from criterion's estimates.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::report::Micro;
use crate::{Workspace, cmd, setup::Ready};

/// Runs the signing benchmark; `quick` shortens criterion's timings.
pub fn signing(ws: &Workspace, ready: &Ready, quick: bool) -> Result<Micro> {
    let dir = ws.target_dir.join("criterion/sign");
    // Stale figures must not stand in for a failed run.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let mut bench = Command::new("cargo");
    cmd::without_cargo_run_env(&mut bench).current_dir(&ws.root);
    ready.apply(&mut bench)?;
    bench.args([
        "bench",
        "--package",
        "lattice-agent",
        "--bench",
        "signing",
        "--",
        "--noplot",
    ]);
    if quick {
        bench.args(["--warm-up-time", "1", "--measurement-time", "2"]);
    }
    eprintln!("bench: signing micro-benchmark (criterion)");
    cmd::run(&mut bench)?;
    Ok(Micro {
        sign_sigv4_ns: Some(estimate(&dir.join("sigv4_headers_only"))?),
        sign_sigv4a_ns: Some(estimate(&dir.join("sigv4a_headers_only"))?),
    })
}

/// Criterion's headline figure, ns per iteration: the slope of its linear
/// fit when it made one, else the mean.
fn estimate(dir: &Path) -> Result<f64> {
    let path = dir.join("new/estimates.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    point(&json).with_context(|| format!("no estimate in {}", path.display()))
}

fn point(estimates: &Value) -> Option<f64> {
    ["slope", "mean"]
        .iter()
        .find_map(|k| estimates[k]["point_estimate"].as_f64())
}

#[cfg(test)]
mod tests {
    use super::point;

    #[test]
    fn slope_else_mean() {
        let both = serde_json::json!({
            "mean": {"point_estimate": 2100.0},
            "slope": {"point_estimate": 2000.0},
        });
        assert_eq!(point(&both), Some(2000.0));
        let mean = serde_json::json!({"mean": {"point_estimate": 2100.0}, "slope": null});
        assert_eq!(point(&mean), Some(2100.0));
        assert_eq!(point(&serde_json::json!({})), None);
    }
}
