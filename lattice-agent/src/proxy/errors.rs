//! Why a request was not forwarded, and the response the client gets:
//! a status and a one-line `text/plain` body starting with `lattice-agent:`.
//! Responses from the upstream (Lattice's own 403s too) never pass here.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};

use super::body::ProxyBody;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(
        "no original destination recorded for the connection from {peer}; only intercepted connections are proxied"
    )]
    NoOriginalDestination { peer: SocketAddr },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("bad request: {0}")]
    Query(#[from] crate::query::QueryError),
    #[error("request headers exceed --max-header-bytes ({limit} bytes)")]
    HeadersTooLarge { limit: u64 },
    #[error("request body exceeds --max-signed-body ({limit} bytes)")]
    BodyTooLarge { limit: u64 },
    #[error("reading the request body: {0}")]
    ReadBody(String),
    #[error("no AWS credentials: {0}")]
    NoCredentials(String),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("upstream {dst}: {reason}")]
    UpstreamUnreachable { dst: SocketAddr, reason: String },
    /// `dst`: where the TLS connection went (a rule may name another
    /// port than the app's).
    #[error("upstream {dst}: TLS with {name}: {failure}")]
    UpstreamTls {
        dst: SocketAddr,
        name: String,
        failure: super::upstream::TlsFailure,
    },
    #[error("upstream {dst}: connect timed out after {}", fmt_duration(*after))]
    UpstreamConnectTimeout { dst: SocketAddr, after: Duration },
    #[error("upstream {dst}: no response within {}", fmt_duration(*after))]
    UpstreamTimeout { dst: SocketAddr, after: Duration },
    #[error("upstream {dst}: {reason}")]
    Upstream { dst: SocketAddr, reason: String },
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoOriginalDestination { .. } => StatusCode::MISDIRECTED_REQUEST,
            Self::BadRequest(_) | Self::Query(_) | Self::ReadBody(_) => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NoCredentials(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Signing(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::UpstreamUnreachable { .. } | Self::UpstreamTls { .. } | Self::Upstream { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamConnectTimeout { .. } | Self::UpstreamTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// The response: status, and `lattice-agent: <reason>` on one line.
    pub fn into_response(self) -> Response<ProxyBody> {
        let line = format!("lattice-agent: {}", self).replace(['\r', '\n'], " ") + "\n";
        let mut r = Response::new(
            Full::new(Bytes::from(line))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *r.status_mut() = self.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_refused_text() {
        let e = RequestError::UpstreamUnreachable {
            dst: "169.254.171.33:80".parse().unwrap(),
            reason: "connection refused".into(),
        };
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            e.to_string(),
            "upstream 169.254.171.33:80: connection refused"
        );
        let t = RequestError::UpstreamConnectTimeout {
            dst: "[fd00:ec2:80::1]:443".parse().unwrap(),
            after: Duration::from_millis(1500),
        };
        assert_eq!(t.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            t.to_string(),
            "upstream [fd00:ec2:80::1]:443: connect timed out after 1500ms"
        );
        let tls = RequestError::UpstreamTls {
            dst: "169.254.171.33:443".parse().unwrap(),
            name: "svc.example".into(),
            failure: super::super::upstream::TlsFailure::WrongName(vec!["a.example".into()]),
        };
        assert_eq!(tls.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            tls.to_string(),
            "upstream 169.254.171.33:443: TLS with svc.example: certificate not valid \
             for this name (it is for a.example)"
        );
    }
}
