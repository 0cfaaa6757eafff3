//! What the lifecycle tests measured, one JSON file per fault under
//! `<target>/reliability/`, for the README's "Reliability" table (`cargo
//! xtask test` prints it after the tests; `cargo xtask reliability` too).

use std::fs;

use serde_json::json;

/// One fault and what the load saw while it happened.
#[derive(Debug, Clone)]
pub struct Record {
    /// Short file name, e.g. `sidecar-sigkill`.
    pub id: &'static str,
    pub fault: String,
    pub load: String,
    pub attempted: u64,
    pub failed: u64,
    pub unsigned: u64,
    /// From the fault's end (agent back, endpoint back) to the first
    /// signed success, when that applies.
    pub recovery_ms: Option<f64>,
    pub notes: String,
}

impl Record {
    /// Writes the record; a test's assertions come after, so a failing
    /// run still leaves its figures behind.
    pub fn save(&self) {
        let dir = crate::target_dir().join("reliability");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let value = json!({
            "fault": self.fault,
            "load": self.load,
            "attempted": self.attempted,
            "failed": self.failed,
            "unsigned": self.unsigned,
            "recovery_ms": self.recovery_ms,
            "notes": self.notes,
        });
        let path = dir.join(format!("{}.json", self.id));
        fs::write(
            &path,
            serde_json::to_string_pretty(&value).unwrap_or_default(),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        eprintln!("reliability: {} -> {value}", self.id);
    }
}
