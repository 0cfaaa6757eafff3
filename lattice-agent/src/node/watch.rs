//! The node agent's view of the Kubernetes API: reflector stores of the
//! pods scheduled on this node (field selector `spec.nodeName`) and of all
//! namespaces (for the enrollment label), kept by kube-rs watches, with a
//! notification on every change.

use std::{collections::BTreeMap, sync::Arc};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The stores the watches keep.
#[derive(Clone)]
pub struct Stores {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
}

impl Stores {
    /// The labels of `pod`'s namespace (one may ask for signing for all
    /// its pods).
    pub fn namespace_labels(&self, pod: &Pod) -> Option<BTreeMap<String, String>> {
        let namespace = pod.metadata.namespace.as_deref()?;
        self.namespaces
            .get(&ObjectRef::new(namespace))?
            .metadata
            .labels
            .clone()
    }
}

/// A notification that fires on every change, and a token cancelled once
/// both first lists are in.
pub struct Watches {
    pub changed: Arc<Notify>,
    pub listed: CancellationToken,
}

/// Starts watching this node's pods and every namespace until `shutdown`.
pub fn start(
    client: &kube::Client,
    node_name: &str,
    shutdown: &CancellationToken,
) -> (Stores, Watches) {
    let changed = Arc::new(Notify::new());
    let listed = CancellationToken::new();
    let pods_api: Api<Pod> = Api::all(client.clone());
    let pods_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let (pods, pods_listed) = spawn_reflector(pods_api, pods_cfg, &changed, shutdown, "pods");
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let (namespaces, ns_listed) = spawn_reflector(
        ns_api,
        watcher::Config::default(),
        &changed,
        shutdown,
        "namespaces",
    );
    {
        let listed = listed.clone();
        tokio::spawn(async move {
            pods_listed.cancelled().await;
            ns_listed.cancelled().await;
            listed.cancel();
        });
    }
    (Stores { pods, namespaces }, Watches { changed, listed })
}

/// A reflector store kept by a watch; `changed` fires on every event, the
/// returned token is cancelled once the first list is complete.
fn spawn_reflector<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: &Arc<Notify>,
    shutdown: &CancellationToken,
    what: &'static str,
) -> (Store<K>, CancellationToken)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let listed = CancellationToken::new();
    let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
    let changed = Arc::clone(changed);
    let shutdown = shutdown.clone();
    let done = listed.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                e = stream.next() => e,
            };
            match event {
                Some(Ok(watcher::Event::InitDone)) => {
                    done.cancel();
                    changed.notify_one();
                }
                Some(Ok(_)) => changed.notify_one(),
                Some(Err(e)) => {
                    tracing::warn!(what, error = %e, "Kubernetes watch failed; retrying");
                }
                None => return,
            }
        }
    });
    (store, listed)
}
