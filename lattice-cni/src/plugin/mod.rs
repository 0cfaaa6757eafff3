//! The plugin's side of CNI: what `lattice-cni` does when the container
//! runtime runs it (the binary is a thin `main` around [`run`]).
//!
//! A chained plugin, last in the node's plugin list: by the time it runs
//! the pod's network is set up, and it changes nothing in it. For a
//! Kubernetes pod outside the exempt namespaces, ADD hands the pod's
//! network namespace to the node agent, which intercepts the pod's VPC
//! Lattice connects before its first container starts; the previous
//! plugin's result is passed on unchanged.
//!
//! - [`env`]: the `CNI_*` variables and the pod in `CNI_ARGS`;
//! - [`netconf`]: the configuration on stdin and the result passed on;
//! - [`agent`]: one exchange with the agent over its socket;
//! - [`commands`]: ADD, CHECK, DEL and STATUS;
//! - [`error`]: errors as the spec prints them.

pub mod agent;
pub mod commands;
pub mod env;
pub mod error;
pub mod netconf;

use std::io;

use serde_json::{Value, json};

pub use env::{CniCommand, Env};
pub use error::{CniError, Code};
use netconf::{LATEST_VERSION, NetConf, SUPPORTED_VERSIONS};

/// Runs the command `env` names, reading the configuration with
/// `read_stdin` (not for VERSION). `Ok` holds what goes to stdout, if
/// anything; `Err` the error to print (exit status 1).
pub fn run(
    env: &Env,
    read_stdin: impl FnOnce() -> io::Result<Vec<u8>>,
) -> Result<Option<Value>, CniError> {
    let command = env.command()?;
    if command == CniCommand::Version {
        return Ok(Some(version_info()));
    }
    let stdin = read_stdin().map_err(|e| {
        CniError::new(
            Code::Io,
            format!("cannot read the network configuration from stdin: {e}"),
        )
    });
    if command == CniCommand::Del {
        // DEL succeeds whatever happened: a failed DEL leaves the pod
        // stuck in deletion, and the agent also forgets pods that leave
        // the API.
        if let Err(err) = stdin.and_then(|stdin| commands::del(env, &stdin)) {
            warn(format!(
                "DEL {}: {err} (ignored)",
                env.get(env::CONTAINER_ID).unwrap_or("?")
            ));
        }
        return Ok(None);
    }
    let conf = NetConf::parse(&stdin?)?;
    conf.allows(command)?;
    match command {
        CniCommand::Add => commands::add(env, &conf).map(Some),
        CniCommand::Check => commands::check(env, &conf).map(|()| None),
        CniCommand::Status => commands::status(&conf).map(|()| None),
        // Nothing to collect: the plugin keeps no state, and the agent
        // drops pods that leave the API.
        CniCommand::Gc | CniCommand::Del | CniCommand::Version => Ok(None),
    }
    .map_err(|e| e.in_version(&conf.cni_version))
}

/// VERSION's answer.
pub fn version_info() -> Value {
    json!({
        "cniVersion": LATEST_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// A line for the runtime's log (stderr).
fn warn(message: impl std::fmt::Display) {
    eprintln!("lattice-cni: {message}");
}
