//! Prometheus metrics, in a registry of their own.
//!
//! In node mode the per-request and per-connection series carry
//! `namespace` and `pod` labels: one series set per enrolled pod, bounded
//! by the pods on the node (the kubelet allows a few hundred). The latency
//! histogram stays node-wide (16 buckets per pod would multiply the
//! series), and credential series carry the `identity` they belong to
//! (pods sharing a service account and role share one). In `run` and
//! `sidecar` these labels are absent: the whole process is one pod.
//!
//! Label values come from pods (names, namespaces, role ARNs), and
//! prometheus-client writes values as given: every label set here is
//! encoded by hand through [`Escaped`], so no value can end a label, a
//! series or a line early.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::proxy::classify::Kind;
use prometheus_client::{
    encoding::{
        EncodeLabel as _, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
    },
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// `namespace` and `pod` of a node-mode workload; empty for `run`/`sidecar`.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub struct WorkloadLabels(Option<Arc<(String, String)>>);

impl WorkloadLabels {
    pub fn pod(namespace: &str, name: &str) -> Self {
        Self(Some(Arc::new((namespace.to_owned(), name.to_owned()))))
    }
}

impl EncodeLabelSet for WorkloadLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        if let Some(pod) = &self.0 {
            label(encoder, "namespace", &pod.0)?;
            label(encoder, "pod", &pod.1)?;
        }
        Ok(())
    }
}

/// A label value as the text formats (Prometheus' and OpenMetrics) spell
/// it: `\`, `"` and line feed escaped as `\\`, `\"` and `\n`.
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        use fmt::Write as _;
        let mut rest = self.0;
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

/// Writes `key="value"`, the value escaped.
fn label(encoder: &mut LabelSetEncoder, key: &str, value: &str) -> Result<(), fmt::Error> {
    (key, Escaped(value)).encode(encoder.encode_label())
}

/// `identity` of a credential source in node mode; empty otherwise.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub struct IdentityLabel(Option<Arc<str>>);

impl IdentityLabel {
    pub fn new(identity: &str) -> Self {
        Self(Some(identity.into()))
    }
}

impl EncodeLabelSet for IdentityLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        if let Some(id) = &self.0 {
            label(encoder, "identity", id)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub method: String,
    pub status: String,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        label(encoder, "method", &self.method)?;
        label(encoder, "status", &self.status)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct KindLabels {
    pub kind: &'static str,
}

impl EncodeLabelSet for KindLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        label(encoder, "kind", self.kind)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct ResultLabels {
    pub result: String,
}

impl EncodeLabelSet for ResultLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        label(encoder, "result", &self.result)
    }
}

type ByWorkload<M> = Family<WorkloadLabels, M>;

/// All metrics; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `lattice_requests_total{[namespace,pod,]method,status}`.
    requests: Family<(WorkloadLabels, RequestLabels), Counter>,
    /// `lattice_upstream_duration_seconds`: forward until response headers.
    pub upstream_duration: Histogram,
    /// `lattice_signing_failures_total{[namespace,pod]}`.
    signing_failures: ByWorkload<Counter>,
    /// `lattice_credential_refreshes_total{[identity,]result="success|error"}`.
    credential_refreshes: Family<(IdentityLabel, ResultLabels), Counter>,
    /// `lattice_credential_expiry_timestamp_seconds{[identity]}` (0 while
    /// none or never expiring).
    credential_expiry: Family<IdentityLabel, Gauge>,
    /// `lattice_open_connections{[namespace,pod]}`.
    open_connections: ByWorkload<Gauge>,
    /// `lattice_redirected_connections_total{[namespace,pod]}`: accepted
    /// connections with an original destination.
    redirected_connections: ByWorkload<Counter>,
    /// `lattice_unknown_destination_connections_total{[namespace,pod]}`:
    /// accepted connections without one (answered 421).
    unknown_destination_connections: ByWorkload<Counter>,
    /// `lattice_client_connections_total{[namespace,pod,]kind}`: client
    /// connections by what they speak (signed `http1`/`h2c`, passed
    /// through `tls`/`opaque`/`server-first`).
    client_connections: Family<(WorkloadLabels, KindLabels), Counter>,
    /// `lattice_connections_closed_for_room_total{[namespace,pod]}`: idle
    /// client connections closed at `--max-connections` to admit new ones.
    closed_for_room: ByWorkload<Counter>,
    /// `lattice_enrolled_pods` (node mode).
    pub enrolled_pods: Gauge,
    /// `lattice_enrollments_total{result="success|error"}` (node mode).
    enrollments: Family<ResultLabels, Counter>,
    /// Credential sources alive per `identity` label: its series go when
    /// the last one does (several node-mode identities may share a label).
    credential_sources: std::sync::Mutex<std::collections::HashMap<IdentityLabel, usize>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lattice");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests answered, by method and response status",
            requests.clone(),
        );
        let upstream_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "upstream_duration_seconds",
            "Time from forwarding a request to the upstream response headers",
            upstream_duration.clone(),
        );
        let signing_failures = Family::default();
        registry.register(
            "signing_failures",
            "Requests that could not be signed",
            signing_failures.clone(),
        );
        let credential_refreshes = Family::default();
        registry.register(
            "credential_refreshes",
            "Credential fetches from the provider, by result",
            credential_refreshes.clone(),
        );
        let credential_expiry = Family::default();
        registry.register(
            "credential_expiry_timestamp_seconds",
            "Unix time the current credentials expire (0: none, or no expiry)",
            credential_expiry.clone(),
        );
        let open_connections = Family::default();
        registry.register(
            "open_connections",
            "Client connections currently open",
            open_connections.clone(),
        );
        let redirected_connections = Family::default();
        registry.register(
            "redirected_connections",
            "Accepted connections that had an original destination",
            redirected_connections.clone(),
        );
        let unknown_destination_connections = Family::default();
        registry.register(
            "unknown_destination_connections",
            "Accepted connections without an original destination record",
            unknown_destination_connections.clone(),
        );
        let client_connections = Family::default();
        registry.register(
            "client_connections",
            "Client connections by kind: http1 and h2c are signed; tls, opaque and server-first are passed through unchanged",
            client_connections.clone(),
        );
        let closed_for_room = Family::default();
        registry.register(
            "connections_closed_for_room",
            "Idle client connections closed at --max-connections to admit new ones",
            closed_for_room.clone(),
        );
        let enrolled_pods = Gauge::default();
        registry.register(
            "enrolled_pods",
            "Pods the node agent currently serves",
            enrolled_pods.clone(),
        );
        let enrollments = Family::default();
        registry.register(
            "enrollments",
            "Pod enrollment attempts, by result",
            enrollments.clone(),
        );
        Self {
            registry,
            requests,
            upstream_duration,
            signing_failures,
            credential_refreshes,
            credential_expiry,
            open_connections,
            redirected_connections,
            unknown_destination_connections,
            client_connections,
            closed_for_room,
            enrolled_pods,
            enrollments,
            credential_sources: std::sync::Mutex::default(),
        }
    }

    /// The handle one workload counts with.
    pub fn workload(self: &Arc<Self>, labels: WorkloadLabels) -> WorkloadMetrics {
        WorkloadMetrics {
            open_connections: self.open_connections.get_or_create(&labels).clone(),
            redirected: self.redirected_connections.get_or_create(&labels).clone(),
            unknown_destination: self
                .unknown_destination_connections
                .get_or_create(&labels)
                .clone(),
            signing_failures: self.signing_failures.get_or_create(&labels).clone(),
            closed_for_room: self.closed_for_room.get_or_create(&labels).clone(),
            kinds: Kind::ALL.map(|kind| {
                self.client_connections.get_or_create_owned(&(
                    labels.clone(),
                    KindLabels {
                        kind: kind.as_str(),
                    },
                ))
            }),
            counts: Arc::new(Counts::default()),
            requests: Arc::default(),
            labels,
            metrics: Arc::clone(self),
        }
    }

    /// Removes a departed workload's series, so pod churn does not grow
    /// the exposition.
    pub fn forget_workload(&self, workload: &WorkloadMetrics) {
        let labels = &workload.labels;
        self.open_connections.remove(labels);
        self.redirected_connections.remove(labels);
        self.unknown_destination_connections.remove(labels);
        self.signing_failures.remove(labels);
        self.closed_for_room.remove(labels);
        for kind in Kind::ALL {
            self.client_connections.remove(&(
                labels.clone(),
                KindLabels {
                    kind: kind.as_str(),
                },
            ));
        }
        let counters = workload.requests.lock().unwrap_or_else(|p| p.into_inner());
        for (method, status) in counters.keys() {
            self.requests
                .remove(&(labels.clone(), request_labels(method, *status)));
        }
    }

    /// The handle one credential source counts with; its series stay
    /// until [`Metrics::forget_credentials`] for the last source with its
    /// label.
    pub fn credentials(self: &Arc<Self>, identity: IdentityLabel) -> CredentialMetrics {
        let mut sources = self
            .credential_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *sources.entry(identity.clone()).or_default() += 1;
        let refreshes = |ok| {
            self.credential_refreshes
                .get_or_create_owned(&(identity.clone(), result_labels(ok)))
        };
        CredentialMetrics {
            expiry: self.credential_expiry.get_or_create_owned(&identity),
            refreshed: refreshes(true),
            refresh_failed: refreshes(false),
            identity,
            metrics: Arc::clone(self),
        }
    }

    /// A credential source is gone; with the last one of its label, so are
    /// its series. Counting through handles taken before then changes no
    /// series any more.
    pub fn forget_credentials(&self, source: &CredentialMetrics) {
        let mut sources = self
            .credential_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(count) = sources.get_mut(&source.identity) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        sources.remove(&source.identity);
        self.credential_expiry.remove(&source.identity);
        for ok in [true, false] {
            self.credential_refreshes
                .remove(&(source.identity.clone(), result_labels(ok)));
        }
    }

    pub fn count_enrollment(&self, ok: bool) {
        self.enrollments
            .get_or_create(&ResultLabels {
                result: result(ok).to_owned(),
            })
            .inc();
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn result(ok: bool) -> &'static str {
    if ok { "success" } else { "error" }
}

fn result_labels(ok: bool) -> ResultLabels {
    ResultLabels {
        result: result(ok).to_owned(),
    }
}

/// The `method` label: the common methods by name, the rest as `OTHER`.
fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

fn request_labels(method: &str, status: u16) -> RequestLabels {
    RequestLabels {
        method: method.to_owned(),
        status: status.to_string(),
    }
}

/// Requests, the agent's own error answers and client connections by
/// kind ([`Kind::index`]) of one workload, for `/pods`.
#[derive(Debug, Default)]
pub struct Counts {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub connections: [AtomicU64; Kind::ALL.len()],
}

/// One workload's series.
#[derive(Debug, Clone)]
pub struct WorkloadMetrics {
    metrics: Arc<Metrics>,
    labels: WorkloadLabels,
    pub open_connections: Gauge,
    pub redirected: Counter,
    pub unknown_destination: Counter,
    pub signing_failures: Counter,
    pub closed_for_room: Counter,
    /// `lattice_client_connections_total` by [`Kind::index`].
    kinds: [Counter; Kind::ALL.len()],
    pub counts: Arc<Counts>,
    /// This workload's `lattice_requests_total` series by (method label,
    /// status): found without building label strings on every request.
    requests: Arc<std::sync::Mutex<std::collections::HashMap<(&'static str, u16), Counter>>>,
}

impl WorkloadMetrics {
    /// Counts one answered request; `own_error` when the agent answered it
    /// itself instead of forwarding. Unusual methods share one label value.
    pub fn count_request(&self, method: &http::Method, status: http::StatusCode, own_error: bool) {
        let key = (method_label(method), status.as_u16());
        {
            let mut counters = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            counters
                .entry(key)
                .or_insert_with(|| {
                    self.metrics
                        .requests
                        .get_or_create_owned(&(self.labels.clone(), request_labels(key.0, key.1)))
                })
                .inc();
        }
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        if own_error {
            self.counts.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one client connection of `kind`.
    pub fn count_connection(&self, kind: Kind) {
        self.kinds[kind.index()].inc();
        self.counts.connections[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_duration(&self) -> &Histogram {
        &self.metrics.upstream_duration
    }
}

/// One credential source's series.
#[derive(Debug, Clone)]
pub struct CredentialMetrics {
    metrics: Arc<Metrics>,
    identity: IdentityLabel,
    pub expiry: Gauge,
    refreshed: Counter,
    refresh_failed: Counter,
}

impl CredentialMetrics {
    pub fn count_refresh(&self, ok: bool) {
        if ok {
            self.refreshed.inc();
        } else {
            self.refresh_failed.inc();
        }
    }

    /// This source is gone (see [`Metrics::forget_credentials`]).
    pub fn forget(&self) {
        self.metrics.forget_credentials(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_without_workload_labels() {
        let m = Arc::new(Metrics::new());
        let w = m.workload(WorkloadLabels::default());
        w.count_request(&http::Method::GET, http::StatusCode::OK, false);
        w.count_request(
            &http::Method::from_bytes(b"PURGE").unwrap(),
            http::StatusCode::OK,
            false,
        );
        m.credentials(IdentityLabel::default()).count_refresh(true);
        w.open_connections.inc();
        w.count_connection(Kind::ServerFirst);
        let text = m.encode();
        for needle in [
            "lattice_requests_total{method=\"GET\",status=\"200\"} 1",
            "lattice_requests_total{method=\"OTHER\",status=\"200\"} 1",
            "lattice_credential_refreshes_total{result=\"success\"} 1",
            // Families render an empty label set as `{}` (valid exposition).
            "lattice_open_connections{} 1",
            "lattice_upstream_duration_seconds_bucket",
            "lattice_signing_failures_total{} 0",
            "lattice_redirected_connections_total{} 0",
            "lattice_credential_expiry_timestamp_seconds{} 0",
            "lattice_client_connections_total{kind=\"server-first\"} 1",
            "lattice_client_connections_total{kind=\"tls\"} 0",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }

    /// Label values come from pods (names, namespaces, role ARNs): every
    /// one is escaped as the text formats require (`\\`, `\"`, `\n`), so
    /// none ends a value, a label set or a line early. (The page as a
    /// whole goes through the official parser in
    /// tests/tests/node_hardening.rs.)
    #[test]
    fn label_values_are_escaped() {
        let m = Arc::new(Metrics::new());
        let w = m.workload(WorkloadLabels::pod(
            "a\"b}\\",
            "c\nlattice_injected_total 1\n",
        ));
        w.count_request(&http::Method::GET, http::StatusCode::OK, false);
        m.credentials(IdentityLabel::new("irsa:x\"} 1\n#"))
            .count_refresh(true);
        let text = m.encode();
        for needle in [
            r#"lattice_requests_total{namespace="a\"b}\\",pod="c\nlattice_injected_total 1\n",method="GET",status="200"} 1"#,
            r#"lattice_credential_refreshes_total{identity="irsa:x\"} 1\n#",result="success"} 1"#,
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        assert!(
            text.lines()
                .all(|l| l.starts_with("# ") || l.starts_with("lattice_")),
            "a line not written by the agent:\n{text}"
        );
    }

    #[test]
    fn workload_series_carry_pod_labels_and_go_with_the_pod() {
        let m = Arc::new(Metrics::new());
        let labels = WorkloadLabels::pod("shop", "cart-0");
        let w = m.workload(labels.clone());
        w.count_request(
            &http::Method::POST,
            http::StatusCode::SERVICE_UNAVAILABLE,
            true,
        );
        w.open_connections.inc();
        w.count_connection(Kind::Tls);
        m.credentials(IdentityLabel::new("irsa:arn:aws:iam::1:role/cart"))
            .count_refresh(false);
        let text = m.encode();
        for needle in [
            "lattice_requests_total{namespace=\"shop\",pod=\"cart-0\",method=\"POST\",status=\"503\"} 1",
            "lattice_open_connections{namespace=\"shop\",pod=\"cart-0\"} 1",
            "lattice_client_connections_total{namespace=\"shop\",pod=\"cart-0\",kind=\"tls\"} 1",
            "lattice_credential_refreshes_total{identity=\"irsa:arn:aws:iam::1:role/cart\",result=\"error\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        assert_eq!(w.counts.requests.load(Ordering::Relaxed), 1);
        assert_eq!(w.counts.errors.load(Ordering::Relaxed), 1);
        assert_eq!(
            w.counts.connections[Kind::Tls.index()].load(Ordering::Relaxed),
            1
        );
        m.forget_workload(&w);
        assert!(!m.encode().contains("cart-0"));
    }

    /// Two sources with one label (two identities of the same role) share
    /// its series; they go with the last source, and a source created
    /// afterwards starts them afresh.
    #[test]
    fn credential_series_go_with_the_last_source_of_their_label() {
        let m = Arc::new(Metrics::new());
        let label = IdentityLabel::new("irsa:arn:aws:iam::1:role/cart");
        let a = m.credentials(label.clone());
        let b = m.credentials(label.clone());
        a.count_refresh(true);
        b.count_refresh(true);
        b.count_refresh(false);
        let text = m.encode();
        for needle in [
            "lattice_credential_refreshes_total{identity=\"irsa:arn:aws:iam::1:role/cart\",result=\"success\"} 2",
            "lattice_credential_refreshes_total{identity=\"irsa:arn:aws:iam::1:role/cart\",result=\"error\"} 1",
            "lattice_credential_expiry_timestamp_seconds{identity=\"irsa:arn:aws:iam::1:role/cart\"} 0",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        a.forget();
        assert!(m.encode().contains("role/cart"), "b still uses it");
        b.forget();
        assert!(!m.encode().contains("role/cart"), "{}", m.encode());
        // A late refresh through a forgotten handle brings nothing back.
        b.count_refresh(true);
        b.expiry.set(5);
        assert!(!m.encode().contains("role/cart"));
        let c = m.credentials(label);
        c.count_refresh(true);
        assert!(m.encode().contains(
            "lattice_credential_refreshes_total{identity=\"irsa:arn:aws:iam::1:role/cart\",result=\"success\"} 1"
        ));
    }
}
