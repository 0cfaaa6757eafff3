//! `lattice-cni`: the chained CNI plugin the node agent installs in the
//! node's CNI bin directory (see [`lattice_cni::plugin`]).
//!
//! Protocol: `CNI_*` environment variables and the network configuration
//! on stdin; a result or an error as JSON on stdout, exit status 0 or 1;
//! log lines on stderr.

use std::{
    io::{self, Read as _, Write as _},
    process::ExitCode,
};

use lattice_cni::plugin::{self, Env};
use serde_json::Value;

fn main() -> ExitCode {
    let (output, status) = match Env::from_process().and_then(|env| plugin::run(&env, read_stdin)) {
        Ok(output) => (output, ExitCode::SUCCESS),
        Err(err) => (Some(err.to_json()), ExitCode::FAILURE),
    };
    match output.map(|out| print(&out)) {
        Some(Err(err)) => {
            eprintln!("lattice-cni: cannot write to stdout: {err}");
            ExitCode::FAILURE
        }
        _ => status,
    }
}

fn read_stdin() -> io::Result<Vec<u8>> {
    let mut input = Vec::new();
    io::stdin().read_to_end(&mut input)?;
    Ok(input)
}

fn print(output: &Value) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    serde_json::to_writer(&mut stdout, output)?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}
