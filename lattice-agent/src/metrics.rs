//! Prometheus metrics of the signing proxy, in a registry of their own.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// All metrics; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `lattice_requests_total{method,status}`: responses sent to clients.
    pub requests: Family<RequestLabels, Counter>,
    /// `lattice_upstream_duration_seconds`: forward until response headers.
    pub upstream_duration: Histogram,
    /// `lattice_signing_failures_total`.
    pub signing_failures: Counter,
    /// `lattice_credential_refreshes_total{result="success|error"}`.
    pub credential_refreshes: Family<ResultLabels, Counter>,
    /// `lattice_credential_expiry_timestamp_seconds` (0 while none or never expiring).
    pub credential_expiry: Gauge,
    /// `lattice_open_connections`: client connections being served.
    pub open_connections: Gauge,
    /// `lattice_redirected_connections_total`: accepted connections with an
    /// original destination.
    pub redirected_connections: Counter,
    /// `lattice_unknown_destination_connections_total`: accepted connections
    /// without one (answered 421).
    pub unknown_destination_connections: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lattice");
        let requests = Family::<RequestLabels, Counter>::default();
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
        let signing_failures = Counter::default();
        registry.register(
            "signing_failures",
            "Requests that could not be signed",
            signing_failures.clone(),
        );
        let credential_refreshes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "credential_refreshes",
            "Credential fetches from the provider chain, by result",
            credential_refreshes.clone(),
        );
        let credential_expiry = Gauge::default();
        registry.register(
            "credential_expiry_timestamp_seconds",
            "Unix time the current credentials expire (0: none, or no expiry)",
            credential_expiry.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections currently open",
            open_connections.clone(),
        );
        let redirected_connections = Counter::default();
        registry.register(
            "redirected_connections",
            "Accepted connections that had an original destination",
            redirected_connections.clone(),
        );
        let unknown_destination_connections = Counter::default();
        registry.register(
            "unknown_destination_connections",
            "Accepted connections without an original destination record",
            unknown_destination_connections.clone(),
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
        }
    }

    /// Counts one answered request. Unusual methods share one label value.
    pub fn count_request(&self, method: &http::Method, status: http::StatusCode) {
        let method = match *method {
            http::Method::GET
            | http::Method::HEAD
            | http::Method::POST
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::PATCH
            | http::Method::OPTIONS
            | http::Method::CONNECT
            | http::Method::TRACE => method.as_str().to_owned(),
            _ => "OTHER".to_owned(),
        };
        self.requests
            .get_or_create(&RequestLabels {
                method,
                status: status.as_u16().to_string(),
            })
            .inc();
    }

    pub fn count_refresh(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.credential_refreshes
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names() {
        let m = Metrics::new();
        m.count_request(&http::Method::GET, http::StatusCode::OK);
        m.count_request(
            &http::Method::from_bytes(b"PURGE").unwrap(),
            http::StatusCode::OK,
        );
        m.count_refresh(true);
        m.open_connections.inc();
        let text = m.encode();
        for needle in [
            "lattice_requests_total{method=\"GET\",status=\"200\"} 1",
            "lattice_requests_total{method=\"OTHER\",status=\"200\"} 1",
            "lattice_credential_refreshes_total{result=\"success\"} 1",
            "lattice_open_connections 1",
            "lattice_upstream_duration_seconds_bucket",
            "lattice_signing_failures_total 0",
            "lattice_redirected_connections_total 0",
            "lattice_credential_expiry_timestamp_seconds 0",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
