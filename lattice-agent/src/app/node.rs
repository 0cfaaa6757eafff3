//! `node`, the parent (see [`crate::keeper`]): as root, create the run
//! directory, bind the admin listener, attach the interceptor once above
//! every pod (gated by network namespace), take the pods' sockets over
//! from a running agent if there is one, bind the control and CNI
//! sockets; then drop to the exempt UID, keeping the capabilities a worker
//! needs only to hand them on, and run workers
//! ([`super::node_worker`]) until stopped.

use std::{os::fd::OwnedFd, path::Path, time::Instant};

use caps::Capability;

use super::{AppError, BoundAddrs};
use crate::{
    bpf::{Interceptor, NetnsGate},
    config::NodeConfig,
    keeper::{Keeper, KeeperError, RestartLimits, SharedFds, WorkerCommand},
    node::{cni, handover},
    privilege::{self, AmbientCaps},
    process,
};

/// Capabilities the worker serves with, to serve pods that arrive later
/// (measured: tests/tests/node_privilege.rs shows each is needed):
/// entering a pod's network namespace (`setns`) to create its sockets,
/// opening `/proc/<pid>/ns/net` of a pod's process (another user's), and
/// reading the kubelet's pod directories (root-only) for projected
/// tokens. The parent keeps them only to hand them on (permitted and
/// inheritable, none effective).
pub const KEPT_CAPABILITIES: [Capability; 3] = [
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Kept as well with the CNI plugin (`--cni-conf-dir`): putting the plugin
/// back into the runtime's configuration when the node's CNI rewrites it
/// (a root-owned directory and file, replaced by a new file given back to
/// its owner).
pub const KEPT_FOR_CNI: [Capability; 2] = [Capability::CAP_DAC_OVERRIDE, Capability::CAP_CHOWN];

/// Logged at start and shown on `/readyz` with `--pin none`.
pub(super) const UNPINNED: &str = "--pin none: the programs are not pinned and go with this agent: \
    while no agent runs (a crash, an update), enrolled pods' requests to VPC Lattice \
    leave unsigned; drop --pin none to fail closed instead";

/// What the worker keeps of its capabilities, for `cfg`.
pub(super) fn kept_capabilities(cfg: &NodeConfig) -> Vec<Capability> {
    let mut kept = KEPT_CAPABILITIES.to_vec();
    if cfg.cni.is_some() {
        kept.extend(KEPT_FOR_CNI);
    }
    kept
}

/// The parent, attached and bound, its privileges dropped.
pub(super) struct Bound {
    keeper: Keeper,
    /// Held for its follower of a replaced gate (see
    /// `NetnsGate::follow`); the workers write to the map itself.
    gate: NetnsGate,
    addrs: BoundAddrs,
}

pub(super) fn build(cfg: NodeConfig, limits: RestartLimits) -> anyhow::Result<Bound> {
    prepare_run_dir(&cfg.run_dir)?;
    if cfg.intercept.pin.is_none() {
        tracing::warn!("{UNPINNED}");
    }
    let admin = process::bind_admin(cfg.admin_addr).map_err(AppError::Admin)?;
    let addrs = BoundAddrs {
        proxy: Vec::new(),
        admin: admin.local_addr().ok(),
    };
    let mut interceptor = Interceptor::attach(&cfg.intercept).map_err(AppError::Attach)?;
    // The worker reads the eBPF log lines (they name what pods connect
    // to: nothing for the parent to read).
    drop(interceptor.take_logger());
    let gate = interceptor.take_gate().ok_or(AppError::NoGate)?;
    let dup = |r: std::io::Result<OwnedFd>| r.map_err(AppError::SharedMaps);
    let orig_dst = dup(interceptor.orig_dst().try_clone_fd())?;
    let gate_fd = dup(gate.try_clone_fd())?;
    // A running agent (a rollout surges a new one beside it) hands over
    // the pods' listening sockets; none answers on a first start or after
    // a crash. Then this agent's own control socket takes the name, for
    // the agent that will replace it. Both as root: the run directory is
    // root's alone.
    let handed = match handover::take_listeners(&cfg.run_dir) {
        Ok(Some((p, pods))) => {
            tracing::info!(pods = pods.len(), "taking over from the running agent");
            Some((p, pods))
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "could not take over from the running agent; binding new listeners beside its own");
            None
        }
    };
    let control = handover::bind_control(&cfg.run_dir).map_err(|source| AppError::RunDir {
        path: cfg.run_dir.clone(),
        source,
    })?;
    let cni_socket = match &cfg.cni {
        Some(settings) => {
            cni::install(settings).map_err(AppError::Cni)?;
            Some(OwnedFd::from(
                cni::bind_socket(&cfg.run_dir).map_err(AppError::Cni)?,
            ))
        }
        None => None,
    };
    let kept = kept_capabilities(&cfg);
    let ambient = if cfg.keep_privileges {
        AmbientCaps::default()
    } else {
        privilege::hold_for_workers(cfg.intercept.exempt_uid, &kept)
            .map_err(AppError::Privileges)?;
        AmbientCaps::new(&kept)
    };
    // A gate the attach replaced may still gain namespaces from the agent
    // being replaced: copied from now on, by a thread of this process
    // (which holds the gate across workers) that reads the replaced gate
    // by id, and so keeps SYS_ADMIN effective; this thread does not.
    if cfg.keep_privileges {
        gate.start_following();
    } else {
        privilege::with_effective(Capability::CAP_SYS_ADMIN, || gate.start_following())
            .map_err(AppError::Privileges)?;
    }
    let shared = SharedFds {
        orig_dst,
        previous_orig_dst: interceptor
            .orig_dst()
            .take_previous_fd()
            .map(|(fd, left)| (fd, Instant::now() + left)),
        gate: gate_fd,
        gate_capacity: gate.capacity(),
        admin: OwnedFd::from(admin),
        cni: cni_socket,
        log_program: interceptor.log_program_id(),
    };
    let keeper = Keeper::new(
        interceptor,
        shared,
        handed,
        control,
        WorkerCommand::of_this_process(ambient),
        limits,
    );
    Ok(Bound {
        keeper,
        gate,
        addrs,
    })
}

impl Bound {
    pub(super) fn addrs(&self) -> BoundAddrs {
        self.addrs.clone()
    }

    /// Runs workers until SIGTERM/SIGINT (the worker drains first) or a
    /// crash loop.
    pub(super) fn serve(self) -> Result<(), KeeperError> {
        let result = self.keeper.run();
        // Following a replaced gate stops with the parent.
        drop(self.gate);
        result
    }
}

/// Creates the run directory if missing, for root alone: only agents
/// (root until they have set up) talk through it.
fn prepare_run_dir(path: &Path) -> Result<(), AppError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| AppError::RunDir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)
}
