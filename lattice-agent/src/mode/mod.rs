//! The agent's modes: `run` and `sidecar` serve one workload (the process
//! lives in the pod), `node` serves every enrolled pod of its node.

mod node;
mod single;

use crate::{
    cli::{NodeArgs, RunArgs, SidecarArgs},
    config::RunConfig,
    pod_cgroup,
};

/// `run`: the interceptor on `--cgroup`.
pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    single::serve(RunConfig::new(
        args.cgroup.clone(),
        &args.intercept,
        &args.proxy,
    )?)
}

/// `sidecar`: the interceptor on this pod's own cgroup.
pub fn sidecar(args: &SidecarArgs) -> anyhow::Result<()> {
    let cgroup = pod_cgroup::find_own_pod_cgroup(&args.cgroup_root, &args.pod_uid)?;
    tracing::info!(cgroup = %cgroup.display(), pod_uid = %args.pod_uid, "found the pod's cgroup");
    let mut cfg = RunConfig::new(cgroup, &args.intercept, &args.proxy)?;
    // A sidecar restarted by the kubelet finds its programs still attached
    // and replaces them: no window where the pod's requests leave unsigned.
    cfg.intercept.held_by_cgroup = !args.detach_on_exit;
    single::serve(cfg)
}

/// `node`: the interceptor above every pod, a proxy per enrolled pod.
pub fn node(args: &NodeArgs) -> anyhow::Result<()> {
    node::serve(args)
}
