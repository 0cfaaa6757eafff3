//! The README's "Reliability" table, from the records the lifecycle tests
//! write to `<target>/reliability/<id>.json` (lattice_tests::reliability):
//! one row per fault, in the order a user meets them. `cargo xtask test`
//! clears the records before its test step and prints the table after it;
//! `cargo xtask reliability` prints the last run's and, with
//! `--update-readme`, writes it between the README's markers.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

/// Known faults, in table order; records with other ids follow, by id.
const ORDER: [&str; 10] = [
    "pod-start",
    "sidecar-sigkill",
    "node-worker-sigkill",
    "node-worker-oom",
    "node-worker-crash-loop",
    "node-agent-sigkill",
    "node-agent-upgrade",
    "credential-outage",
    "upstream-down",
    "node-flood",
];

pub const BEGIN: &str = "<!-- reliability:begin (cargo xtask reliability --update-readme) -->";
pub const END: &str = "<!-- reliability:end -->";

#[derive(Debug, Deserialize)]
struct Record {
    fault: String,
    load: String,
    attempted: u64,
    failed: u64,
    unsigned: u64,
    recovery_ms: Option<f64>,
    notes: String,
}

pub fn dir(target_dir: &Path) -> PathBuf {
    target_dir.join("reliability")
}

/// Removes the previous run's records, so a table never mixes runs.
pub fn clear(target_dir: &Path) -> Result<()> {
    let dir = dir(target_dir);
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The table from the records in `<target>/reliability`.
pub fn table(target_dir: &Path) -> Result<String> {
    let dir = dir(target_dir);
    let entries = fs::read_dir(&dir).with_context(|| {
        format!(
            "reading {} (run `cargo xtask test` first: the tests write the records)",
            dir.display()
        )
    })?;
    let mut records = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Some(id) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let record: Record =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        records.push((id, record));
    }
    if records.is_empty() {
        bail!("no records in {}", dir.display());
    }
    let rank = |id: &str| ORDER.iter().position(|o| *o == id).unwrap_or(ORDER.len());
    records.sort_by(|(a, _), (b, _)| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    Ok(render(&records))
}

fn render(records: &[(String, Record)]) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut out = String::from(
        "| fault | load | attempted | failed | unsigned | recovery | notes |\n\
         |---|---|---:|---:|---:|---:|---|\n",
    );
    for (_, r) in records {
        let recovery = r
            .recovery_ms
            .map_or_else(|| "n/a".to_owned(), |ms| format!("{ms:.0} ms"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            cell(&r.fault),
            cell(&r.load),
            r.attempted,
            r.failed,
            r.unsigned,
            recovery,
            cell(&r.notes)
        ));
    }
    out
}

/// `readme` with the text between [`BEGIN`] and [`END`] replaced by `table`.
pub fn splice(readme: &str, table: &str) -> Result<String> {
    let start = readme
        .find(BEGIN)
        .with_context(|| format!("README has no {BEGIN:?} line"))?
        + BEGIN.len();
    let end = readme[start..]
        .find(END)
        .with_context(|| format!("README has no {END:?} after the begin marker"))?
        + start;
    Ok(format!("{}\n{}{}", &readme[..start], table, &readme[end..]))
}

pub fn run(root: &Path, target_dir: &Path, update_readme: bool) -> Result<()> {
    let table = table(target_dir)?;
    print!("{table}");
    if update_readme {
        let path = root.join("README.md");
        let readme = fs::read_to_string(&path).context("reading README.md")?;
        fs::write(&path, splice(&readme, &table)?).context("writing README.md")?;
        eprintln!("README.md: reliability table updated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fault: &str, recovery_ms: Option<f64>) -> Record {
        Record {
            fault: fault.into(),
            load: "load | with a bar".into(),
            attempted: 10,
            failed: 1,
            unsigned: 0,
            recovery_ms,
            notes: "n".into(),
        }
    }

    #[test]
    fn rows_follow_the_fault_order_and_escape_cells() {
        let dir = std::env::temp_dir().join(format!("xtask-reliability-{}", std::process::id()));
        let records = dir.join("reliability");
        fs::create_dir_all(&records).unwrap();
        for (id, fault, recovery) in [
            ("zz-other", "other", None),
            ("upstream-down", "upstream", Some(12.4)),
            ("pod-start", "start", None),
        ] {
            let r = record(fault, recovery);
            let json = serde_json::json!({
                "fault": r.fault, "load": r.load, "attempted": r.attempted,
                "failed": r.failed, "unsigned": r.unsigned,
                "recovery_ms": r.recovery_ms, "notes": r.notes,
            });
            fs::write(records.join(format!("{id}.json")), json.to_string()).unwrap();
        }
        let table = table(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let faults: Vec<&str> = table
            .lines()
            .skip(2)
            .map(|l| l.split(" | ").next().unwrap().trim_start_matches("| "))
            .collect();
        assert_eq!(faults, ["start", "upstream", "other"]);
        assert!(table.contains("| 12 ms |"), "{table}");
        assert!(table.contains("| n/a |"), "{table}");
        assert!(table.contains("load \\| with a bar"), "{table}");
    }

    #[test]
    fn splice_replaces_only_between_the_markers() {
        let readme = format!("intro\n{BEGIN}\nold table\n{END}\nrest\n");
        let out = splice(&readme, "| new |\n").unwrap();
        assert_eq!(out, format!("intro\n{BEGIN}\n| new |\n{END}\nrest\n"));
        assert!(splice("no markers", "x").is_err());
    }
}
