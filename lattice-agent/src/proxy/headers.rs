//! Header hygiene: hop-by-hop headers (RFC 9110 §7.6.1), client-sent
//! signature headers, and the request's authority.

use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE},
    request::Parts,
    uri::Authority,
};

use super::errors::{BadRequest, RequestError};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers the signer sets; whatever the client sent for them is dropped.
const SIGNING_HEADERS: [HeaderName; 5] = [
    http::header::AUTHORIZATION,
    HeaderName::from_static("x-amz-date"),
    HeaderName::from_static("x-amz-security-token"),
    HeaderName::from_static("x-amz-content-sha256"),
    HeaderName::from_static("x-amz-region-set"),
];

const HOP_BY_HOP_COUNT: usize = 6;

/// Hop-by-hop headers removed whatever `Connection` says (`Connection`
/// first and `TE` last: [`remove_hop_by_hop`] treats those two apart).
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TRANSFER_ENCODING,
    UPGRADE,
    TE,
];

/// Removes hop-by-hop headers: `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, and
/// `TE` except its `trailers` token (kept for gRPC).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names notes which are there: most messages carry
    // none, and most of the rest only `Connection`, so nothing else is
    // looked up.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    let [connection, rest @ .., te] = present;
    if connection {
        // Headers `Connection` names; `close` and `keep-alive` (the usual
        // tokens) need no lookup of their own.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            // `Connection: te` must not take `TE: trailers` with it.
            if name != TE {
                headers.remove(&name);
            }
        }
        headers.remove(CONNECTION);
    }
    for (name, there) in HOP_BY_HOP[1..HOP_BY_HOP.len() - 1].iter().zip(rest) {
        if there {
            headers.remove(name);
        }
    }
    if !te {
        return;
    }
    let te_trailers = headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    if headers.remove(TE).is_some() && te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Drops client-sent `Authorization` and `X-Amz-*` signature headers.
pub fn remove_client_signing(headers: &mut HeaderMap) {
    if !headers.keys().any(|n| SIGNING_HEADERS.contains(n)) {
        return;
    }
    for name in SIGNING_HEADERS {
        headers.remove(name);
    }
}

/// Total size of the request head as sent (approximately: request target
/// plus `name: value\r\n` per header).
pub fn head_size(parts: &Parts) -> u64 {
    let target = parts.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let headers: usize = parts
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    (parts.method.as_str().len() + target + 12 + headers) as u64
}

/// The authority the client addressed: the URI's (HTTP/2 `:authority`, or an
/// HTTP/1 absolute-form target), else the `Host` header. Signed and sent
/// upstream as is; never used to choose where to connect.
pub fn authority(parts: &Parts) -> Result<Authority, RequestError> {
    if let Some(a) = parts.uri.authority() {
        return check(a.clone());
    }
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h,
        (None, _) => return Err(BadRequest::MissingHost.into()),
        (Some(_), Some(_)) => return Err(BadRequest::MultipleHosts.into()),
    };
    let a = Authority::try_from(host.as_bytes()).map_err(BadRequest::InvalidHost)?;
    check(a)
}

fn check(a: Authority) -> Result<Authority, RequestError> {
    if a.as_str().contains('@') || a.host().is_empty() {
        return Err(BadRequest::InvalidAuthority.into());
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_removed_end_to_end_kept() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Private, te"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip, trailers;q=1"),
            ("content-type", "application/grpc"),
            ("x-amz-target", "kept"),
            ("trailer", "grpc-status"),
        ]);
        remove_hop_by_hop(&mut h);
        // The order of different field names carries no meaning (RFC 9110
        // §5.3); removal reorders them.
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "te", "trailer", "x-amz-target"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn end_to_end_headers_untouched() {
        let pairs = [
            ("host", "svc.example"),
            ("x-amz-target", "kept"),
            ("content-type", "application/json"),
            ("x-multi", "1"),
            ("x-multi", "2"),
        ];
        let mut h = map(&pairs);
        remove_hop_by_hop(&mut h);
        remove_client_signing(&mut h);
        assert_eq!(h, map(&pairs));
    }

    #[test]
    fn te_without_trailers_dropped() {
        let mut h = map(&[("te", "gzip")]);
        remove_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn client_signature_headers_dropped() {
        let mut h = map(&[
            ("Authorization", "AWS4-HMAC-SHA256 Credential=FAKE"),
            ("X-Amz-Date", "20000101T000000Z"),
            ("X-Amz-Security-Token", "FAKE"),
            ("X-Amz-Content-Sha256", "abc"),
            ("x-amz-meta", "kept"),
        ]);
        remove_client_signing(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-amz-meta"));
    }

    #[test]
    fn authority_from_host_or_uri() {
        let (p, ()) = Request::builder()
            .uri("/x")
            .header("host", "svc.example:8080")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(authority(&p).unwrap().as_str(), "svc.example:8080");

        let (p, ()) = Request::builder()
            .uri("http://h2.example/x")
            .header("host", "ignored.example")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(authority(&p).unwrap().as_str(), "h2.example");

        let (p, ()) = Request::builder().uri("/x").body(()).unwrap().into_parts();
        assert!(matches!(
            authority(&p),
            Err(RequestError::BadRequest(BadRequest::MissingHost))
        ));

        let (p, ()) = Request::builder()
            .uri("/x")
            .header("host", "a.example")
            .header("host", "b.example")
            .body(())
            .unwrap()
            .into_parts();
        assert!(authority(&p).is_err());

        let (p, ()) = Request::builder()
            .uri("/x")
            .header("host", "user@a.example")
            .body(())
            .unwrap()
            .into_parts();
        assert!(authority(&p).is_err());
    }
}
