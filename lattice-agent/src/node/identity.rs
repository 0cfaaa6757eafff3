//! Each pod's own AWS identity, never the node's.
//!
//! An identity is an IRSA role (assumed with the pod's projected web
//! identity token at STS) or an EKS Pod Identity association (the Pod
//! Identity Agent's endpoint called with the pod's token). Pods with the
//! same service account, role and token projection (volume, path and
//! audience of the `serviceAccountToken` source) share one credential
//! cache, refreshed in the background ahead of expiry; requests only read
//! it. Their tokens are then the kubelet's tokens of one service account
//! for one audience, interchangeable: a pod cannot hand its siblings a
//! token of its own making.
//!
//! A pod holds an [`IdentityLease`]; its workload gets one
//! [`WorkloadCredentials`] from it when it starts, and that is all the
//! pod's request path can reach: there is no lookup by name or key on the
//! request path, so no request can be signed with another pod's identity.
//! (The store is ztunnel's scoped secret manager idea made structural.)
//!
//! Token files are re-read on every fetch: the kubelet rotates them. A
//! shared cache reads the token of any pod still holding a lease, so it
//! keeps working as pods come and go.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::{Duration, SystemTime},
};

use aws_config::{
    provider_config::ProviderConfig,
    web_identity_token::{StaticConfiguration, WebIdentityTokenCredentialsProvider},
};
use aws_credential_types::{
    Credentials,
    provider::{ProvideCredentials, SharedCredentialsProvider, error::CredentialsError, future},
};
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_types::region::Region;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio_util::sync::CancellationToken;

use super::pod_spec::{IdentityPlan, MissingIdentity, PodPlan, ProjectedToken};
use crate::{
    credentials::{CredentialsCache, WorkloadCredentials},
    metrics::{CredentialMetrics, IdentityLabel, Metrics},
};

/// One call to STS or the Pod Identity Agent; the cache's own timeout and
/// backoff sit above it.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What makes two pods' identities one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdentityKey {
    Irsa {
        namespace: String,
        service_account: String,
        role_arn: String,
        region: String,
        session_name: Option<String>,
        token: ProjectedToken,
    },
    PodIdentity {
        namespace: String,
        service_account: String,
        uri: String,
        token: ProjectedToken,
    },
}

impl fmt::Display for IdentityKey {
    /// `irsa:<role ARN>` or `pod-identity:<namespace>/<service account>`:
    /// the `identity` metric label; no secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Irsa { role_arn, .. } => write!(f, "irsa:{role_arn}"),
            Self::PodIdentity {
                namespace,
                service_account,
                ..
            } => write!(f, "pod-identity:{namespace}/{service_account}"),
        }
    }
}

/// The token files of the pods sharing an identity, in lease order.
#[derive(Debug, Default)]
struct TokenFiles(Mutex<Vec<PathBuf>>);

impl TokenFiles {
    fn add(&self, path: PathBuf) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(path);
    }

    fn remove(&self, path: &Path) {
        let mut paths = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = paths.iter().position(|p| p == path) {
            paths.remove(i);
        }
    }

    /// The first file that exists (a pod's directory goes with the pod).
    fn pick(&self) -> Result<PathBuf, CredentialsError> {
        let paths = self.0.lock().unwrap_or_else(|p| p.into_inner());
        paths.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
            CredentialsError::not_loaded(match paths.first() {
                Some(p) => TokenFileError::Missing { path: p.clone() },
                None => TokenFileError::NoPod,
            })
        })
    }
}

/// Why no token file can be read for an identity.
#[derive(Debug, thiserror::Error)]
enum TokenFileError {
    #[error("token file {} does not exist (yet)", path.display())]
    Missing { path: PathBuf },
    #[error("no pod holds this identity")]
    NoPod,
}

struct Identity {
    cache: Arc<CredentialsCache>,
    tokens: Arc<TokenFiles>,
    /// Stops this identity's refresher when the last pod lets go.
    refresher: CancellationToken,
    /// Its credential series, which go with it.
    series: CredentialMetrics,
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.refresher.cancel();
        self.series.forget();
    }
}

/// A pod's hold on its identity. While held, the pod's token file is one
/// the identity may read; dropping it lets the identity go when no other
/// pod holds it.
pub struct IdentityLease {
    key: IdentityKey,
    identity: Arc<Identity>,
    token: PathBuf,
}

impl IdentityLease {
    /// The credentials for this pod's workload: this identity's cache only.
    pub fn credentials(&self) -> WorkloadCredentials {
        WorkloadCredentials::Cache(Arc::clone(&self.identity.cache))
    }

    pub fn key(&self) -> &IdentityKey {
        &self.key
    }
}

impl Drop for IdentityLease {
    fn drop(&mut self) {
        self.identity.tokens.remove(&self.token);
    }
}

/// Why a pod has no identity to sign with.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("pod {pod}: no AWS region: set AWS_REGION in the pod or --region on the agent")]
    NoRegion { pod: String },
    #[error(transparent)]
    Missing(Box<MissingIdentity>),
}

/// Every identity in use on the node.
pub struct IdentityStore {
    identities: Mutex<HashMap<IdentityKey, Weak<Identity>>>,
    /// The region for pods that do not set one (`--region`, else the
    /// agent's AWS_REGION).
    default_region: Option<String>,
    /// HTTPS client for STS, shared by every identity.
    sts_http: SharedHttpClient,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl IdentityStore {
    pub fn new(
        default_region: Option<String>,
        sts_http: SharedHttpClient,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            identities: Mutex::default(),
            default_region,
            sts_http,
            metrics,
            shutdown,
        }
    }

    /// The region `plan`'s requests are signed for.
    pub fn region_of(&self, plan: &PodPlan) -> Result<String, IdentityError> {
        plan.region
            .clone()
            .or_else(|| self.default_region.clone())
            .ok_or_else(|| IdentityError::NoRegion {
                pod: plan.display_name(),
            })
    }

    /// The credentials for `plan`'s pod: a lease on its identity (created,
    /// or shared with pods that have the same one), or why there are none.
    pub fn lease(
        &self,
        plan: &PodPlan,
        region: &str,
        kubelet_root: &Path,
    ) -> Result<IdentityLease, IdentityError> {
        let (key, token) = match &plan.identity {
            IdentityPlan::Missing(why) => {
                return Err(IdentityError::Missing(Box::new(why.clone())));
            }
            IdentityPlan::Irsa {
                service_account,
                role_arn,
                token,
                session_name,
            } => (
                IdentityKey::Irsa {
                    namespace: plan.namespace.clone(),
                    service_account: service_account.clone(),
                    role_arn: role_arn.clone(),
                    region: region.to_owned(),
                    session_name: session_name.clone(),
                    token: token.clone(),
                },
                token.host_path(kubelet_root, &plan.uid),
            ),
            IdentityPlan::PodIdentity {
                service_account,
                uri,
                token,
            } => (
                IdentityKey::PodIdentity {
                    namespace: plan.namespace.clone(),
                    service_account: service_account.clone(),
                    uri: uri.clone(),
                    token: token.clone(),
                },
                token.host_path(kubelet_root, &plan.uid),
            ),
        };
        let mut identities = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        identities.retain(|_, weak| weak.strong_count() > 0);
        let identity = match identities.get(&key).and_then(Weak::upgrade) {
            Some(existing) => existing,
            None => {
                let created = Arc::new(self.create(&key));
                identities.insert(key.clone(), Arc::downgrade(&created));
                created
            }
        };
        identity.tokens.add(token.clone());
        Ok(IdentityLease {
            key,
            identity,
            token,
        })
    }

    /// Identities currently alive (held by at least one pod).
    pub fn len(&self) -> usize {
        let identities = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        identities.values().filter(|w| w.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn create(&self, key: &IdentityKey) -> Identity {
        let tokens = Arc::new(TokenFiles::default());
        let provider = match key {
            IdentityKey::Irsa {
                namespace,
                service_account,
                role_arn,
                region,
                session_name,
                ..
            } => SharedCredentialsProvider::new(WebIdentity {
                role_arn: role_arn.clone(),
                session_name: session_name
                    .clone()
                    .unwrap_or_else(|| default_session_name(namespace, service_account)),
                tokens: Arc::clone(&tokens),
                conf: ProviderConfig::default()
                    .with_region(Some(Region::new(region.clone())))
                    .with_http_client(self.sts_http.clone())
                    .with_timeout_config(
                        aws_config::timeout::TimeoutConfig::builder()
                            .operation_timeout(CALL_TIMEOUT)
                            .build(),
                    ),
            }),
            IdentityKey::PodIdentity { uri, .. } => {
                SharedCredentialsProvider::new(ContainerCredentials {
                    uri: uri.clone(),
                    tokens: Arc::clone(&tokens),
                    client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
                })
            }
        };
        let refresher = self.shutdown.child_token();
        let series = self
            .metrics
            .credentials(IdentityLabel::new(&key.to_string()));
        let cache = CredentialsCache::spawn(provider, series.clone(), refresher.clone());
        tracing::info!(identity = %key, "new AWS identity; fetching its credentials");
        Identity {
            cache,
            tokens,
            refresher,
            series,
        }
    }
}

/// `lattice-<namespace>-<service account>`, cut to STS's 64 characters
/// and its alphabet (`\w+=,.@-`, anything else as `-`): CloudTrail then
/// shows which pods' service account a session is for.
fn default_session_name(namespace: &str, service_account: &str) -> String {
    format!("lattice-{namespace}-{service_account}")
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '+' | '=' | ',' | '.' | '@' | '-' => c,
            _ => '-',
        })
        .take(64)
        .collect()
}

/// IRSA: AssumeRoleWithWebIdentity with the pod's projected token, read
/// anew on every fetch.
#[derive(Debug)]
struct WebIdentity {
    role_arn: String,
    session_name: String,
    tokens: Arc<TokenFiles>,
    conf: ProviderConfig,
}

impl ProvideCredentials for WebIdentity {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            let token_file = self.tokens.pick()?;
            WebIdentityTokenCredentialsProvider::builder()
                .configure(&self.conf)
                .static_configuration(StaticConfiguration {
                    web_identity_token_file: token_file,
                    role_arn: self.role_arn.clone(),
                    session_name: self.session_name.clone(),
                })
                .build()
                .provide_credentials()
                .await
        })
    }
}

/// EKS Pod Identity (container credentials): `GET <uri>` with the pod's
/// token as `Authorization`, as the pod's SDK would call it.
struct ContainerCredentials {
    uri: String,
    tokens: Arc<TokenFiles>,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl fmt::Debug for ContainerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerCredentials")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

/// The endpoint's answer (the ECS / EKS Pod Identity format).
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerCredentialsResponse {
    access_key_id: String,
    secret_access_key: String,
    token: Option<String>,
    expiration: Option<String>,
}

impl ContainerCredentials {
    async fn fetch(&self) -> Result<Credentials, CredentialsError> {
        let token_file = self.tokens.pick()?;
        // A few hundred bytes, read about once an hour: no thread hop.
        let token =
            std::fs::read_to_string(&token_file).map_err(CredentialsError::provider_error)?;
        let req = http::Request::get(&self.uri)
            .header(http::header::AUTHORIZATION, token.trim())
            .body(Empty::new())
            .map_err(CredentialsError::invalid_configuration)?;
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| CredentialsError::provider_timed_out(CALL_TIMEOUT))?
            .map_err(CredentialsError::provider_error)?;
        let status = resp.status();
        let body = tokio::time::timeout(CALL_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| CredentialsError::provider_timed_out(CALL_TIMEOUT))?
            .map_err(CredentialsError::provider_error)?
            .to_bytes();
        if !status.is_success() {
            let answer =
                String::from_utf8_lossy(&body[..body.len().min(256)]).replace(['\n', '\r'], " ");
            return Err(CredentialsError::provider_error(EndpointError {
                uri: self.uri.clone(),
                status,
                answer,
            }));
        }
        let parsed: ContainerCredentialsResponse =
            serde_json::from_slice(&body).map_err(CredentialsError::unhandled)?;
        let expiry = match parsed.expiration.as_deref() {
            Some(s) => Some(parse_expiration(s).map_err(CredentialsError::unhandled)?),
            None => None,
        };
        Ok(Credentials::new(
            parsed.access_key_id,
            parsed.secret_access_key,
            parsed.token,
            expiry,
            "EksPodIdentity",
        ))
    }
}

impl ProvideCredentials for ContainerCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.fetch())
    }
}

/// A container-credentials endpoint's answer that is not a success.
#[derive(Debug, thiserror::Error)]
#[error("{uri} answered {status}: {answer}")]
struct EndpointError {
    uri: String,
    status: http::StatusCode,
    /// The start of its body, on one line.
    answer: String,
}

/// An `Expiration` that is not a time.
#[derive(Debug, thiserror::Error)]
enum ExpirationError {
    #[error("Expiration {value:?}")]
    Parse {
        value: String,
        #[source]
        source: aws_smithy_types::date_time::DateTimeParseError,
    },
    #[error("Expiration {value:?}")]
    Range {
        value: String,
        #[source]
        source: aws_smithy_types::date_time::ConversionError,
    },
}

fn parse_expiration(s: &str) -> Result<SystemTime, ExpirationError> {
    let t = aws_smithy_types::DateTime::from_str(s, aws_smithy_types::date_time::Format::DateTime)
        .map_err(|source| ExpirationError::Parse {
            value: s.to_owned(),
            source,
        })?;
    SystemTime::try_from(t).map_err(|source| ExpirationError::Range {
        value: s.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::pod_spec::ProjectedToken;

    fn plan(uid: &str, sa: &str, role: &str) -> PodPlan {
        PodPlan {
            uid: uid.into(),
            namespace: "shop".into(),
            name: format!("pod-{uid}"),
            ips: vec![],
            identity: IdentityPlan::Irsa {
                service_account: sa.into(),
                role_arn: role.into(),
                token: ProjectedToken {
                    volume: "aws-iam-token".into(),
                    relative: "token".into(),
                    audience: Some("sts.amazonaws.com".into()),
                },
                session_name: None,
            },
            region: Some("us-west-2".into()),
            options: Default::default(),
        }
    }

    fn store() -> IdentityStore {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        IdentityStore::new(
            None,
            http,
            Arc::new(Metrics::new()),
            CancellationToken::new(),
        )
    }

    #[tokio::test]
    async fn pods_share_an_identity_only_when_account_and_role_match() {
        let store = store();
        let root = Path::new("/nonexistent/kubelet");
        let a1 = store
            .lease(&plan("a1", "cart", "arn:role/cart"), "us-west-2", root)
            .unwrap();
        let a2 = store
            .lease(&plan("a2", "cart", "arn:role/cart"), "us-west-2", root)
            .unwrap();
        let b = store
            .lease(&plan("b", "pay", "arn:role/pay"), "us-west-2", root)
            .unwrap();
        assert_eq!(store.len(), 2);
        assert!(Arc::ptr_eq(&a1.identity, &a2.identity));
        assert!(!Arc::ptr_eq(&a1.identity, &b.identity));
        // The shared identity reads a token of a pod that still holds it.
        assert_eq!(
            a1.identity.tokens.0.lock().unwrap().clone(),
            vec![
                root.join("pods/a1/volumes/kubernetes.io~projected/aws-iam-token/token"),
                root.join("pods/a2/volumes/kubernetes.io~projected/aws-iam-token/token"),
            ]
        );
        drop(a1);
        assert_eq!(a2.identity.tokens.0.lock().unwrap().len(), 1);
        let refresher = b.identity.refresher.clone();
        drop(b);
        assert!(
            refresher.is_cancelled(),
            "the last pod's departure stops its refresher"
        );
        assert_eq!(store.len(), 1);
        let text = store.metrics.encode();
        assert!(!text.contains("role/pay"), "{text}");
        assert!(text.contains("identity=\"irsa:arn:role/cart\""), "{text}");
        drop(a2);
        assert!(!store.metrics.encode().contains("role/cart"));
    }

    /// Pods of one service account and role whose tokens come from
    /// different projections (volume, path, audience) hold different
    /// identities: a token that is not what its siblings' is cannot stand
    /// in for theirs.
    #[tokio::test]
    async fn pods_share_an_identity_only_with_the_same_token_projection() {
        let store = store();
        let root = Path::new("/nonexistent/kubelet");
        let a = store
            .lease(&plan("a", "cart", "arn:role/cart"), "us-west-2", root)
            .unwrap();
        let mut other_volume = plan("b", "cart", "arn:role/cart");
        let IdentityPlan::Irsa { token, .. } = &mut other_volume.identity else {
            unreachable!()
        };
        token.volume = "my-token".into();
        let b = store.lease(&other_volume, "us-west-2", root).unwrap();
        let mut other_path = plan("c", "cart", "arn:role/cart");
        let IdentityPlan::Irsa { token, .. } = &mut other_path.identity else {
            unreachable!()
        };
        token.relative = "nested/token".into();
        let c = store.lease(&other_path, "us-west-2", root).unwrap();
        let mut other_audience = plan("d", "cart", "arn:role/cart");
        let IdentityPlan::Irsa { token, .. } = &mut other_audience.identity else {
            unreachable!()
        };
        token.audience = Some("not-sts".into());
        let d = store.lease(&other_audience, "us-west-2", root).unwrap();
        let all = [&a, &b, &c, &d];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert!(!Arc::ptr_eq(&x.identity, &y.identity));
            }
        }
        assert_eq!(store.len(), 4);
        // The same projection is one identity.
        let a2 = store
            .lease(&plan("a2", "cart", "arn:role/cart"), "us-west-2", root)
            .unwrap();
        assert!(Arc::ptr_eq(&a.identity, &a2.identity));
    }

    /// A workload's credentials are bound to its own identity when it is
    /// created: another pod's identity, even one created later and
    /// holding credentials, is unreachable through it.
    #[tokio::test]
    async fn a_workload_reaches_only_its_own_identity() {
        let store = store();
        let root = Path::new("/nonexistent/kubelet");
        let a = store
            .lease(&plan("a", "cart", "arn:role/cart"), "us-west-2", root)
            .unwrap();
        let creds_a = a.credentials();
        let b = store
            .lease(&plan("b", "pay", "arn:role/pay"), "us-west-2", root)
            .unwrap();
        let WorkloadCredentials::Cache(cache_b) = b.credentials() else {
            panic!()
        };
        cache_b.set_for_test(Credentials::new("AKIDPAY", "secret", None, None, "t"));
        let err = crate::error_chain(&creds_a.current().unwrap_err());
        assert!(!err.contains("AKIDPAY"), "{err}");
        let WorkloadCredentials::Cache(cache_a) = &creds_a else {
            panic!()
        };
        cache_a.set_for_test(Credentials::new("AKIDCART", "secret", None, None, "t"));
        assert_eq!(creds_a.current().unwrap().access_key_id(), "AKIDCART");
        assert_eq!(
            b.credentials().current().unwrap().access_key_id(),
            "AKIDPAY"
        );
    }

    #[test]
    fn missing_identity_and_region_are_reasons() {
        let store = store();
        let mut p = plan("c", "x", "arn:role/x");
        p.identity = IdentityPlan::Missing(MissingIdentity::Undeclared {
            pod: "shop/pod-c".into(),
            referenced: vec![],
        });
        let err = store.lease(&p, "us-west-2", Path::new("/k")).err().unwrap();
        assert!(
            err.to_string()
                .starts_with("pod shop/pod-c has no AWS identity"),
            "{err}"
        );
        p.region = None;
        assert!(
            store
                .region_of(&p)
                .unwrap_err()
                .to_string()
                .contains("pod shop/pod-c")
        );
    }

    #[test]
    fn expiration_and_session_names() {
        let t = parse_expiration("2026-12-02T05:00:00Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_796_187_600
        );
        assert!(parse_expiration("tomorrow").is_err());
        assert_eq!(default_session_name("shop", "cart"), "lattice-shop-cart");
        assert_eq!(default_session_name(&"n".repeat(63), "sa").len(), 64);
        assert_eq!(
            default_session_name("shop\"}\n", "sa/é"),
            "lattice-shop----sa--"
        );
    }
}
