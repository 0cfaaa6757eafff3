//! What each fuzz target checks (docs/fuzzing.md): one function per
//! target, given libFuzzer's bytes; a violated property panics, which
//! libFuzzer reports as a crash and keeps the input.
//!
//! The agent's request-target canonicalisation and its handover framing
//! are compiled in here from their source files: lattice-agent itself is
//! not built under the fuzzer's instrumentation (its build compiles the
//! eBPF object, and it pulls in the AWS SDK and kube), and these modules
//! use neither.

#[allow(dead_code)]
#[path = "../../lattice-agent/src/query.rs"]
pub mod query;

#[allow(dead_code)]
#[path = "../../lattice-agent/src/uri_path.rs"]
pub mod uri_path;

#[allow(dead_code)]
#[path = "../../lattice-agent/src/node/handover.rs"]
pub mod handover;

pub mod targets;
