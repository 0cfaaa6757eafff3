//! lattice-agent: loads the cgroup eBPF interceptor and runs the transparent
//! SigV4 signing proxy for Amazon VPC Lattice.
//!
//! Request path, top to bottom: accept → original destination (`orig_dst`)
//! → credentials → sign → forward → respond (`proxy`).

pub mod admin;
pub mod app;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod errors;
pub mod metrics;
pub mod nat_orig_dst;
pub mod netns;
pub mod node;
pub mod orig_dst;
pub mod pod_cgroup;
pub mod privilege;
pub mod process;
pub mod proxy;
pub mod query;
pub mod self_check;
pub mod sign;
pub mod telemetry;
pub mod uri_path;
pub mod workload;

pub use errors::error_chain;
