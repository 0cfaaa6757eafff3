//! Why a request was not forwarded, and the response the client gets:
//! a status and a one-line `text/plain` body starting with `lattice-agent:`
//! and naming the whole cause chain. Responses from the upstream
//! (Lattice's own 403s too) never pass here.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};

use super::{
    body::{BoxError, ProxyBody},
    upstream::{TlsFailure, Unreachable},
};
use crate::{credentials::CredentialsUnavailable, error_chain, sign::SignError};

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(
        "no original destination recorded for the connection from {peer}; only intercepted connections are proxied"
    )]
    NoOriginalDestination { peer: SocketAddr },
    #[error("bad request")]
    BadRequest(#[source] BadRequest),
    #[error("bad request")]
    Query(#[from] crate::query::QueryError),
    #[error("request headers exceed --max-header-bytes ({limit} bytes)")]
    HeadersTooLarge { limit: u64 },
    #[error("request body exceeds --max-signed-body ({limit} bytes)")]
    BodyTooLarge { limit: u64 },
    #[error("reading the request body")]
    ReadBody(#[source] BoxError),
    #[error("no AWS credentials")]
    NoCredentials(#[source] CredentialsUnavailable),
    #[error("signing failed")]
    Signing(#[source] SignError),
    #[error("upstream {dst}")]
    UpstreamUnreachable {
        dst: SocketAddr,
        #[source]
        source: Unreachable,
    },
    /// `dst`: where the TLS connection went (a rule may name another
    /// port than the app's).
    #[error("upstream {dst}: TLS with {name}")]
    UpstreamTls {
        dst: SocketAddr,
        name: String,
        #[source]
        failure: TlsFailure,
    },
    #[error("upstream {dst}: connect timed out after {}", fmt_duration(*after))]
    UpstreamConnectTimeout { dst: SocketAddr, after: Duration },
    #[error("upstream {dst}: no response within {}", fmt_duration(*after))]
    UpstreamTimeout { dst: SocketAddr, after: Duration },
    #[error("upstream {dst}")]
    Upstream {
        dst: SocketAddr,
        #[source]
        source: UpstreamError,
    },
}

/// What is wrong with a request's head.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("missing Host header")]
    MissingHost,
    #[error("more than one Host header")]
    MultipleHosts,
    #[error("invalid Host header")]
    InvalidHost(#[source] http::uri::InvalidUri),
    #[error("invalid authority")]
    InvalidAuthority,
    #[error("invalid authority")]
    AuthorityNotAHeader(#[source] http::header::InvalidHeaderValue),
    #[error("request target")]
    Target(#[source] http::Error),
}

impl From<BadRequest> for RequestError {
    fn from(e: BadRequest) -> Self {
        Self::BadRequest(e)
    }
}

/// Why an upstream connection failed once it was made (or could not be
/// had).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream for this connection")]
    NoConnection,
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Client(#[from] hyper_util::client::legacy::Error),
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

    /// The response: status, and `lattice-agent: <error: causes>` on one
    /// line.
    pub fn into_response(self) -> Response<ProxyBody> {
        let line = format!("lattice-agent: {}\n", error_chain(&self));
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

    async fn body_of(e: RequestError) -> (StatusCode, String) {
        let resp = e.into_response();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[test]
    fn upstream_refused_text() {
        let e = RequestError::UpstreamUnreachable {
            dst: "169.254.171.33:80".parse().unwrap(),
            source: Unreachable::Refused,
        };
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            error_chain(&e),
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
            failure: TlsFailure::WrongName(vec!["a.example".into()]),
        };
        assert_eq!(tls.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            error_chain(&tls),
            "upstream 169.254.171.33:443: TLS with svc.example: certificate not valid \
             for this name (it is for a.example)"
        );
    }

    /// The body names every cause, on one line, once.
    #[tokio::test]
    async fn bodies_name_the_causes() {
        let io = std::io::Error::other("boom\nsecond line");
        let (status, body) = body_of(RequestError::UpstreamUnreachable {
            dst: "169.254.171.33:80".parse().unwrap(),
            source: Unreachable::from(io),
        })
        .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            body,
            "lattice-agent: upstream 169.254.171.33:80: connect: boom second line\n"
        );
        let (status, body) = body_of(RequestError::BadRequest(BadRequest::MissingHost)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body, "lattice-agent: bad request: missing Host header\n");
        let (status, body) = body_of(RequestError::NoCredentials(
            CredentialsUnavailable::NotLoaded,
        ))
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "lattice-agent: no AWS credentials: credentials not loaded yet\n"
        );
        let (status, body) = body_of(RequestError::Signing(SignError::Time {
            secs_since_epoch: None,
        }))
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            body,
            "lattice-agent: signing failed: signing time None s since 1970 is not between 1970 and 9999\n"
        );
    }
}
