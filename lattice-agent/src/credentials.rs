//! AWS credentials: the aws-config default chain (env, profile, IRSA web
//! identity, container credentials / EKS Pod Identity, IMDSv2), optionally
//! with `--role-arn` AssumeRole on top, cached and refreshed in the
//! background ahead of expiry. Requests only ever read the cache.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use aws_config::{BehaviorVersion, sts::AssumeRoleProvider};
use aws_credential_types::{
    Credentials,
    provider::{ProvideCredentials, SharedCredentialsProvider, error::CredentialsError},
};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_types::region::Region;
use tokio_util::sync::CancellationToken;

use crate::{error_chain, metrics::CredentialMetrics};

/// Refresh this long before expiry (or at half the remaining lifetime, for
/// short-lived credentials).
const REFRESH_LEAD: Duration = Duration::from_secs(5 * 60);
/// Re-read credentials without an expiry this often (rotated profile files).
const STATIC_REFRESH: Duration = Duration::from_secs(15 * 60);
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Upper bound on one provider call (the chain has its own, shorter ones).
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request waits for an identity's very first fetch (a pod's
/// first requests right after it was enrolled) before it gets 503.
pub const FIRST_FETCH_WAIT: Duration = Duration::from_secs(10);

/// How to build the provider chain.
#[derive(Debug, Clone, Default)]
pub struct CredentialsConfig {
    /// `--region`: region for STS calls and for signing; else the chain's.
    pub region: Option<String>,
    pub role_arn: Option<String>,
    pub role_session_name: Option<String>,
}

/// The resolved provider and region.
#[derive(Debug, Clone)]
pub struct AwsSetup {
    pub provider: SharedCredentialsProvider,
    /// `--region`, else AWS_REGION / AWS_DEFAULT_REGION / profile / IMDS.
    pub region: Option<String>,
}

/// Builds the default chain (plus AssumeRole) from the process environment.
/// Does not fetch credentials.
pub async fn default_chain(cfg: &CredentialsConfig) -> AwsSetup {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(r) = &cfg.region {
        loader = loader.region(Region::new(r.clone()));
    }
    let sdk = loader.load().await;
    let region = sdk.region().map(|r| r.as_ref().to_owned());
    let base = sdk.credentials_provider().unwrap_or_else(|| {
        // Only without the credential feature set; keep the proxy up (503s).
        SharedCredentialsProvider::new(NoProvider)
    });
    let provider = match &cfg.role_arn {
        None => base,
        Some(arn) => {
            let mut b = AssumeRoleProvider::builder(arn.clone()).configure(&sdk);
            if let Some(name) = &cfg.role_session_name {
                b = b.session_name(name.clone());
            }
            SharedCredentialsProvider::new(b.build_from_provider(base).await)
        }
    };
    AwsSetup { provider, region }
}

#[derive(Debug)]
struct NoProvider;

impl ProvideCredentials for NoProvider {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::ready(Err(
            aws_credential_types::provider::error::CredentialsError::not_loaded(
                "no credentials provider configured",
            ),
        ))
    }
}

/// What one workload's requests are signed with: its credential cache, or
/// why it has none. A workload holds exactly one of these, fixed when it
/// starts: nothing on the request path can reach another identity's
/// credentials.
#[derive(Debug, Clone)]
pub enum WorkloadCredentials {
    Cache(Arc<CredentialsCache>),
    /// No identity to sign with; every request gets 503 with this reason.
    Missing(NoIdentity),
}

/// Why a workload has no identity to sign with (node mode: what its pod's
/// spec gets wrong), shared by its requests.
pub type NoIdentity = Arc<dyn std::error::Error + Send + Sync>;

impl WorkloadCredentials {
    pub fn current(&self) -> Result<Arc<Credentials>, CredentialsUnavailable> {
        match self {
            Self::Cache(cache) => cache.current(),
            Self::Missing(why) => Err(CredentialsUnavailable::NoIdentity(Arc::clone(why))),
        }
    }

    /// The current credentials; while the very first fetch is still in
    /// flight, waits for it up to `limit` instead of failing at once.
    pub async fn wait_current(
        &self,
        limit: Duration,
    ) -> Result<Arc<Credentials>, CredentialsUnavailable> {
        match self {
            Self::Cache(cache) => cache.wait_current(limit).await,
            Self::Missing(_) => self.current(),
        }
    }
}

/// Why there are no usable credentials. Cheap to make: the causes are
/// shared, not copied, into each request's error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialsUnavailable {
    #[error("credentials not loaded yet")]
    NotLoaded,
    /// The first fetch failed (and none succeeded since).
    #[error(transparent)]
    Fetch(Arc<FetchError>),
    #[error("credentials expired; the provider has not answered the refresh yet")]
    ExpiredPending,
    #[error("credentials expired; refreshing failed")]
    Expired(#[source] Arc<FetchError>),
    #[error(transparent)]
    NoIdentity(NoIdentity),
}

/// Why one fetch from the credential provider failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Provider(#[from] CredentialsError),
    #[error("credential provider did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
}

#[derive(Debug, Default)]
struct State {
    /// Shared with the requests signing with it: aws-config's credentials
    /// carry a property map that a clone would copy per request.
    current: Option<Arc<Credentials>>,
    last_error: Option<Arc<FetchError>>,
}

/// Cached credentials, kept fresh by a background task.
#[derive(Debug)]
pub struct CredentialsCache {
    state: RwLock<State>,
    /// Set once credentials were loaded at least once (for logs).
    loaded_once: AtomicBool,
    /// Woken on every fetch result.
    fetched: tokio::sync::Notify,
}

impl CredentialsCache {
    /// Starts the refresher on the current runtime; it stops with `shutdown`.
    pub fn spawn(
        provider: SharedCredentialsProvider,
        metrics: CredentialMetrics,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let cache = Arc::new(Self {
            state: RwLock::new(State::default()),
            loaded_once: AtomicBool::new(false),
            fetched: tokio::sync::Notify::new(),
        });
        tokio::spawn(refresh_loop(
            Arc::clone(&cache),
            provider,
            metrics,
            shutdown,
        ));
        cache
    }

    /// A cache holding fixed credentials, with no refresher (tests, benches).
    pub fn fixed(creds: Credentials) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new(State {
                current: Some(Arc::new(creds)),
                last_error: None,
            }),
            loaded_once: AtomicBool::new(true),
            fetched: tokio::sync::Notify::new(),
        })
    }

    /// The current credentials, or why there are none. Never blocks on I/O.
    pub fn current(&self) -> Result<Arc<Credentials>, CredentialsUnavailable> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        match &state.current {
            Some(c) if !expired(c, SystemTime::now()) => Ok(Arc::clone(c)),
            Some(_) => Err(match &state.last_error {
                Some(e) => CredentialsUnavailable::Expired(Arc::clone(e)),
                None => CredentialsUnavailable::ExpiredPending,
            }),
            None => Err(match &state.last_error {
                Some(e) => CredentialsUnavailable::Fetch(Arc::clone(e)),
                None => CredentialsUnavailable::NotLoaded,
            }),
        }
    }

    /// Readiness: usable credentials are cached.
    pub fn is_ready(&self) -> bool {
        self.current().is_ok()
    }

    /// [`Self::current`], but while nothing was fetched yet (neither
    /// credentials nor an error), waits up to `limit` for the first fetch.
    pub async fn wait_current(
        &self,
        limit: Duration,
    ) -> Result<Arc<Credentials>, CredentialsUnavailable> {
        // Every request comes here: once something was fetched, no clock
        // read and no waiter registration.
        if !self.first_fetch_pending() {
            return self.current();
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before looking, so a fetch in between is not missed.
            let fetched = self.fetched.notified();
            if !self.first_fetch_pending() {
                return self.current();
            }
            if tokio::time::timeout_at(deadline, fetched).await.is_err() {
                return self.current();
            }
        }
    }

    /// Neither credentials nor an error were fetched yet.
    fn first_fetch_pending(&self) -> bool {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.current.is_none() && state.last_error.is_none()
    }

    /// Puts credentials in the cache as a refresh would (unit tests).
    #[cfg(test)]
    pub(crate) fn set_for_test(&self, creds: Credentials) {
        self.store(creds);
    }

    fn store(&self, creds: Credentials) {
        {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            state.current = Some(Arc::new(creds));
            state.last_error = None;
        }
        self.fetched.notify_waiters();
    }

    fn store_error(&self, error: FetchError) {
        {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            state.last_error = Some(Arc::new(error));
        }
        self.fetched.notify_waiters();
    }
}

fn expired(c: &Credentials, now: SystemTime) -> bool {
    c.expiry().is_some_and(|e| e <= now)
}

/// When to fetch again after a successful fetch.
fn refresh_delay(expiry: Option<SystemTime>, now: SystemTime) -> Duration {
    let Some(expiry) = expiry else {
        return STATIC_REFRESH;
    };
    let remaining = expiry.duration_since(now).unwrap_or_default();
    let lead = REFRESH_LEAD.min(remaining / 2);
    remaining.saturating_sub(lead).max(Duration::from_secs(1))
}

async fn refresh_loop(
    cache: Arc<CredentialsCache>,
    provider: SharedCredentialsProvider,
    metrics: CredentialMetrics,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_START;
    loop {
        let fetched = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(FETCH_TIMEOUT, provider.provide_credentials()) => r,
        };
        let delay = match fetched {
            Ok(Ok(creds)) => {
                metrics.count_refresh(true);
                let expiry = creds.expiry();
                metrics.expiry.set(
                    expiry
                        .and_then(|e| e.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
                );
                let first = !cache.loaded_once.swap(true, Ordering::Relaxed);
                let delay = refresh_delay(expiry, SystemTime::now());
                // Never log the credentials themselves; the access key id is
                // not secret but is left out too.
                if first {
                    tracing::info!(refresh_in_s = delay.as_secs(), "credentials loaded");
                } else {
                    tracing::debug!(refresh_in_s = delay.as_secs(), "credentials refreshed");
                }
                cache.store(creds);
                backoff = BACKOFF_START;
                delay
            }
            Ok(Err(e)) => failed(&cache, &metrics, FetchError::Provider(e), &mut backoff),
            Err(_elapsed) => failed(
                &cache,
                &metrics,
                FetchError::Timeout(FETCH_TIMEOUT),
                &mut backoff,
            ),
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Records a failed fetch; returns when to try again.
fn failed(
    cache: &CredentialsCache,
    metrics: &CredentialMetrics,
    error: FetchError,
    backoff: &mut Duration,
) -> Duration {
    metrics.count_refresh(false);
    tracing::warn!(error = %error_chain(&error), retry_in_s = backoff.as_secs(), "credential refresh failed");
    cache.store_error(error);
    next_backoff(backoff)
}

fn next_backoff(backoff: &mut Duration) -> Duration {
    let now = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_ahead_of_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        assert_eq!(refresh_delay(Some(now + hour), now), hour - REFRESH_LEAD);
        assert_eq!(
            refresh_delay(Some(now + Duration::from_secs(10)), now),
            Duration::from_secs(5)
        );
        assert_eq!(refresh_delay(Some(now), now), Duration::from_secs(1));
        assert_eq!(refresh_delay(None, now), STATIC_REFRESH);
    }

    #[test]
    fn expired_credentials_are_not_served() {
        let c = Credentials::new(
            "AKID",
            "SECRET",
            None,
            Some(SystemTime::now() - Duration::from_secs(1)),
            "t",
        );
        let cache = CredentialsCache::fixed(c);
        let err = cache.current().unwrap_err();
        assert!(
            matches!(err, CredentialsUnavailable::ExpiredPending),
            "{err:?}"
        );
        cache.store_error(FetchError::Timeout(Duration::from_secs(60)));
        assert_eq!(
            error_chain(&cache.current().unwrap_err()),
            "credentials expired; refreshing failed: \
             credential provider did not answer within 60s"
        );
        assert!(!cache.is_ready());
    }

    #[tokio::test]
    async fn first_requests_wait_for_the_first_fetch_but_not_forever() {
        let cache = Arc::new(CredentialsCache {
            state: RwLock::new(State::default()),
            loaded_once: AtomicBool::new(false),
            fetched: tokio::sync::Notify::new(),
        });
        let waiting = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.wait_current(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        cache.store(Credentials::new("AKIDFIRST", "s", None, None, "t"));
        let got = waiting.await.unwrap().unwrap();
        assert_eq!(got.access_key_id(), "AKIDFIRST");

        let empty = CredentialsCache {
            state: RwLock::new(State::default()),
            loaded_once: AtomicBool::new(false),
            fetched: tokio::sync::Notify::new(),
        };
        let started = std::time::Instant::now();
        let err = empty
            .wait_current(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "credentials not loaded yet");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A failed first fetch answers at once: no wait on a known error.
        empty.store_error(FetchError::Provider(CredentialsError::provider_error(
            "STS said no",
        )));
        let started = std::time::Instant::now();
        let err = empty
            .wait_current(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(error_chain(&err).contains("STS said no"), "{err:?}");
    }

    #[test]
    fn backoff_doubles_up_to_max() {
        let mut b = BACKOFF_START;
        let seq: Vec<u64> = (0..7).map(|_| next_backoff(&mut b).as_secs()).collect();
        assert_eq!(seq, [1, 2, 4, 8, 16, 30, 30]);
    }
}
