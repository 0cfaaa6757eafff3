//! The node agent's side of the `lattice-cni` plugin: a pod is enrolled
//! while its sandbox starts, before its first container runs.
//!
//! - [`install`] copies the plugin into the host's CNI bin directory and
//!   [`spawn_keeper`] keeps it last in the runtime's plugin chain (the
//!   node's CNI may rewrite its file at any time);
//! - [`serve`] answers the plugin on `<run dir>/cni.sock`: it resolves the
//!   pod from the reflector's store (or, if the watch has not seen it yet,
//!   a GET) and hands the call to the [`super::NodeAgent`] loop, which owns
//!   the enrollments;
//! - [`leaving_for_good`] decides at exit whether to take the plugin out of
//!   the chain: only when the agent's DaemonSet is gone or being deleted.
//!   Otherwise (a restart, an update) it stays, and pods that may call
//!   VPC Lattice wait for the next agent rather than start un-intercepted.

use std::{
    collections::BTreeMap,
    io,
    os::unix::net::UnixListener as StdUnixListener,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api,
    runtime::reflector::{ObjectRef, Store},
};
use lattice_cni::{
    conf::{self, ConfError, PluginConf},
    protocol::{self, Command, Reply, Request},
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::Readiness,
    error_chain,
    netns::{NetNs, NetnsError},
};

/// How often the plugin's place in the chain is checked.
const KEEP_EVERY: Duration = Duration::from_secs(2);
/// How long a plugin's request may take to arrive.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A pod the watch has not delivered yet is fetched; this bounds that GET.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(4);

/// Where the plugin goes and what its entry in the chain says.
#[derive(Debug, Clone)]
pub struct CniSettings {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The plugin binary shipped beside the agent.
    pub plugin: PathBuf,
    pub entry: PluginConf,
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("--cni-plugin {}: installing it into --cni-bin-dir {}", plugin.display(), bin_dir.display())]
    Binary {
        plugin: PathBuf,
        bin_dir: PathBuf,
        #[source]
        source: ConfError,
    },
    #[error("--run-dir: the CNI plugin's socket {}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a plugin's call could not be resolved to a pod on this node; the
/// plugin's answer names it.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no network namespace came with the call")]
    NoNetns,
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("pod {pod} (uid {uid}) is bound to node {node}, not to this node {this_node}")]
    OtherNode {
        pod: String,
        uid: String,
        node: String,
        this_node: String,
    },
    #[error("pod {pod} (uid {uid}) not found in the Kubernetes API")]
    PodNotFound { pod: String, uid: String },
    #[error("looking up pod {pod}")]
    Pod {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("looking up namespace {namespace}")]
    Namespace {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("looking up {what}: the Kubernetes API did not answer within {LOOKUP_TIMEOUT:?}")]
    Timeout { what: String },
}

/// Copies the plugin binary into the bin directory and, if the node's CNI
/// has written its configuration already, chains the plugin (run as root,
/// before privileges are dropped).
pub fn install(settings: &CniSettings, readiness: &Readiness) -> Result<(), CniError> {
    let copied = conf::install_binary(&settings.plugin, &settings.bin_dir).map_err(|source| {
        CniError::Binary {
            plugin: settings.plugin.clone(),
            bin_dir: settings.bin_dir.clone(),
            source,
        }
    })?;
    if copied {
        tracing::info!(bin_dir = %settings.bin_dir.display(), "CNI plugin binary installed");
    }
    keep_chained(settings, readiness, &mut None);
    Ok(())
}

/// Binds the socket the plugin calls, taking the name over from the agent
/// being replaced (new pods' calls then queue here until this agent
/// serves) or from a crashed agent's stale file.
pub fn bind_socket(run_dir: &Path) -> Result<StdUnixListener, CniError> {
    let path = run_dir.join(protocol::SOCKET_NAME);
    let err = |source| CniError::Socket {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    StdUnixListener::bind(&path).map_err(err)
}

/// Puts the plugin back whenever the chain loses it, until `shutdown`.
pub fn spawn_keeper(
    settings: Arc<CniSettings>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_error: Option<Arc<ConfError>> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(KEEP_EVERY) => {}
            }
            let settings = Arc::clone(&settings);
            let readiness = Arc::clone(&readiness);
            let mut last = last_error.take();
            last_error = tokio::task::spawn_blocking(move || {
                keep_chained(&settings, &readiness, &mut last);
                last
            })
            .await
            .unwrap_or_default();
        }
    })
}

/// One check of the chain; logs a failure once until it reads otherwise.
fn keep_chained(
    settings: &CniSettings,
    readiness: &Readiness,
    last_error: &mut Option<Arc<ConfError>>,
) {
    match conf::install(&settings.conf_dir, &settings.entry) {
        Ok(installed) => {
            if installed.changed {
                tracing::info!(file = %installed.file.display(), "CNI plugin chained last in the runtime's configuration");
            }
            if last_error.take().is_some() {
                tracing::info!(file = %installed.file.display(), "CNI plugin in the runtime's chain again");
            }
            readiness.set_cni(Ok(()));
        }
        Err(e) => {
            let why = error_chain(&e);
            if last_error
                .as_deref()
                .is_none_or(|last| error_chain(last) != why)
            {
                tracing::warn!(reason = %why, "CNI plugin not in the runtime's chain; new pods are enrolled only once the API shows them running");
            }
            let e = Arc::new(e);
            readiness.set_cni(Err(Arc::clone(&e)));
            *last_error = Some(e);
        }
    }
}

/// Takes the plugin out of every chain in the configuration directory (the
/// binary stays: a runtime may be running it right now).
pub fn uninstall(settings: &CniSettings) {
    match conf::uninstall(&settings.conf_dir) {
        Ok(files) if files.is_empty() => {}
        Ok(files) => tracing::info!(?files, "CNI plugin taken out of the runtime's chain"),
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "could not take the CNI plugin out of the runtime's chain")
        }
    }
}

/// Whether this agent is leaving the node for good (its DaemonSet is gone
/// or being deleted), so the plugin must leave the chain too. Outside a
/// DaemonSet (no `POD_NAME`/`POD_NAMESPACE`) that is every exit. When the
/// API cannot tell, the plugin stays: new pods then wait for an agent
/// rather than start un-intercepted.
pub async fn leaving_for_good(client: &kube::Client) -> bool {
    let (Ok(name), Ok(namespace)) = (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE"))
    else {
        return true;
    };
    let check = async {
        let me = Api::<Pod>::namespaced(client.clone(), &namespace)
            .get(&name)
            .await?;
        let Some(owner) = me
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "DaemonSet")
        else {
            return Ok::<_, kube::Error>(true);
        };
        let ds = Api::<DaemonSet>::namespaced(client.clone(), &namespace)
            .get_opt(&owner.name)
            .await?;
        Ok(ds.is_none_or(|ds| ds.metadata.deletion_timestamp.is_some()))
    };
    match tokio::time::timeout(LOOKUP_TIMEOUT, check).await {
        Ok(Ok(leaving)) => leaving,
        Ok(Err(e)) => {
            tracing::warn!(error = %error_chain(&e), "cannot tell whether the agent's DaemonSet is being deleted; the CNI plugin stays in the chain (if lattice is being uninstalled, remove the lattice-cni entry from the node's CNI configuration)");
            false
        }
        Err(_) => {
            tracing::warn!(
                "the Kubernetes API did not answer whether the agent's DaemonSet is being deleted; the CNI plugin stays in the chain"
            );
            false
        }
    }
}

/// A plugin's call, resolved to the pod's API object, for the agent loop.
pub struct CniCall {
    pub request: Request,
    /// `ADD`, `CHECK`: the pod, as the API has it, and its namespace's
    /// labels.
    pub pod: Option<(Pod, Option<BTreeMap<String, String>>)>,
    /// `ADD`, `CHECK`: the sandbox's network namespace.
    pub netns: Option<NetNs>,
    pub reply: oneshot::Sender<Reply>,
}

/// What [`serve`] looks pods up in.
#[derive(Clone)]
pub struct PodLookup {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub client: kube::Client,
    /// This node (`--node-name`): only its pods are served.
    pub node_name: String,
}

/// Answers the plugin's calls on `listener` until `shutdown`.
pub fn serve(
    listener: StdUnixListener,
    lookup: PodLookup,
    calls: mpsc::Sender<CniCall>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    super::spawn_unix_accept(listener, "CNI", shutdown, move |stream| {
        let (lookup, calls) = (lookup.clone(), calls.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, lookup, calls).await {
                tracing::warn!(error = %e, "CNI plugin call failed");
            }
        });
    })
}

/// One plugin call: read it, resolve the pod, let the agent loop act,
/// write the reply.
async fn answer(
    stream: std::os::unix::net::UnixStream,
    lookup: PodLookup,
    calls: mpsc::Sender<CniCall>,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    let stream = Arc::new(stream);
    let (request, fd): (Request, _) = {
        let stream = Arc::clone(&stream);
        tokio::task::spawn_blocking(move || protocol::receive(&stream))
            .await
            .map_err(io::Error::other)??
    };
    tracing::debug!(command = ?request.command, pod = %format!("{}/{}", request.pod_namespace, request.pod_name), container = %request.container_id, "CNI plugin call");
    let reply = match resolve(&request, fd, &lookup).await {
        Ok((pod, netns)) => {
            let (tx, rx) = oneshot::channel();
            let call = CniCall {
                request,
                pod,
                netns,
                reply: tx,
            };
            match calls.send(call).await {
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| error_reply("the agent is stopping")),
                Err(_) => error_reply("the agent is stopping"),
            }
        }
        Err(why) => error_reply(&error_chain(&why)),
    };
    tokio::task::spawn_blocking(move || protocol::send(&stream, &reply, None))
        .await
        .map_err(io::Error::other)?
}

fn error_reply(why: &str) -> Reply {
    Reply {
        enrolled: false,
        error: Some(why.to_owned()),
    }
}

type Resolved = (
    Option<(Pod, Option<BTreeMap<String, String>>)>,
    Option<NetNs>,
);

/// The pod's API object and namespace labels, and its network namespace,
/// as the command needs them.
async fn resolve(
    request: &Request,
    fd: Option<std::os::fd::OwnedFd>,
    lookup: &PodLookup,
) -> Result<Resolved, LookupError> {
    if request.command == Command::Del {
        return Ok((None, None));
    }
    let fd = fd.ok_or(LookupError::NoNetns)?;
    let netns = NetNs::from_fd(fd, &request.netns)?;
    let pod = find_pod(request, lookup).await?;
    let labels = namespace_labels(&request.pod_namespace, lookup).await?;
    Ok((Some((pod, labels)), Some(netns)))
}

/// From the store, else from the API: the kubelet starts a sandbox as soon
/// as the pod is bound, possibly before this agent's watch delivers it.
/// The pod must be bound to this node, and have the call's UID when it
/// names one (runtimes need not pass `K8S_POD_UID`; a name alone could
/// be another node's pod, whose identity this sandbox must never get).
async fn find_pod(request: &Request, lookup: &PodLookup) -> Result<Pod, LookupError> {
    let key = ObjectRef::new(&request.pod_name).within(&request.pod_namespace);
    let matches =
        |p: &Pod| request.pod_uid.is_empty() || p.metadata.uid.as_deref() == Some(&request.pod_uid);
    let name = format!("{}/{}", request.pod_namespace, request.pod_name);
    let on_this_node = |pod: Pod| {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        if node == Some(lookup.node_name.as_str()) {
            Ok(pod)
        } else {
            Err(LookupError::OtherNode {
                pod: name.clone(),
                uid: pod.metadata.uid.as_deref().unwrap_or("?").to_owned(),
                node: node.unwrap_or("(none)").to_owned(),
                this_node: lookup.node_name.clone(),
            })
        }
    };
    if let Some(pod) = lookup.pods.get(&key).filter(|p| matches(p)) {
        return on_this_node((*pod).clone());
    }
    let api = Api::<Pod>::namespaced(lookup.client.clone(), &request.pod_namespace);
    match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(&request.pod_name)).await {
        Ok(Ok(Some(pod))) if matches(&pod) => on_this_node(pod),
        Ok(Ok(_)) => Err(LookupError::PodNotFound {
            pod: name,
            uid: request.pod_uid.clone(),
        }),
        Ok(Err(source)) => Err(LookupError::Pod { pod: name, source }),
        Err(_) => Err(LookupError::Timeout {
            what: format!("pod {name}"),
        }),
    }
}

async fn namespace_labels(
    namespace: &str,
    lookup: &PodLookup,
) -> Result<Option<BTreeMap<String, String>>, LookupError> {
    if let Some(ns) = lookup.namespaces.get(&ObjectRef::new(namespace)) {
        return Ok(ns.metadata.labels.clone());
    }
    let api = Api::<Namespace>::all(lookup.client.clone());
    match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(namespace)).await {
        Ok(Ok(ns)) => Ok(ns.and_then(|ns| ns.metadata.labels)),
        Ok(Err(source)) => Err(LookupError::Namespace {
            namespace: namespace.to_owned(),
            source,
        }),
        Err(_) => Err(LookupError::Timeout {
            what: format!("namespace {namespace}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plugin's answer (the runtime's error for the pod) names the
    /// pod and what went wrong.
    #[test]
    fn lookup_errors_read_as_the_plugin_answers() {
        let other = LookupError::OtherNode {
            pod: "shop/cart-0".into(),
            uid: "u1".into(),
            node: "node-b".into(),
            this_node: "node-a".into(),
        };
        assert_eq!(
            error_reply(&error_chain(&other)).error.as_deref(),
            Some("pod shop/cart-0 (uid u1) is bound to node node-b, not to this node node-a")
        );
        let slow = LookupError::Timeout {
            what: "namespace shop".into(),
        };
        assert_eq!(
            error_chain(&slow),
            "looking up namespace shop: the Kubernetes API did not answer within 4s"
        );
    }
}
