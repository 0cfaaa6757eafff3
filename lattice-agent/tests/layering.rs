//! Flags stop at `config`: only the command line itself (`cli.rs`), the
//! configuration built from it (`config/`) and `main.rs` may name clap or
//! the `cli` module. Everything below takes typed configuration, so a
//! module can be used (and tested) without a command line, and no error
//! below `config` depends on how a flag is spelled.

use lattice_tests::{rust_sources, workspace};

/// Files allowed to see flags, relative to `src/`.
const ABOVE_CONFIG: [&str; 3] = ["cli.rs", "config", "main.rs"];

/// The lines of `text` that bring flags in: a `use` of clap or of the
/// `cli` module, or a path through either.
fn flag_imports(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| {
            let code = line.split("//").next().unwrap_or("");
            code.contains("clap::")
                || code.contains("use clap")
                || code.contains("crate::cli")
                || code.contains("lattice_agent::cli")
                || code.contains("cli::{")
                || code.contains("super::cli")
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn nothing_below_config_imports_the_command_line() {
    let src = workspace().join("lattice-agent/src");
    let files = rust_sources(&src);
    assert!(files.len() > 20, "found the agent's sources: {files:?}");
    let mut offenders = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default();
        if ABOVE_CONFIG.contains(&first) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        for line in flag_imports(&text) {
            offenders.push(format!("{}: {}", relative.display(), line.trim()));
        }
    }
    assert!(
        offenders.is_empty(),
        "modules below config import the command line:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_check_sees_an_import() {
    assert_eq!(
        flag_imports("use crate::cli::ProxyArgs;\nuse std::fs;\n").len(),
        1
    );
    assert_eq!(flag_imports("use clap::Parser;\n").len(), 1);
    assert_eq!(
        flag_imports("// crate::cli is above\nlet x = 1;\n").len(),
        0
    );
}
