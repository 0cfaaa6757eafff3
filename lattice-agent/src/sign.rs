//! SigV4 / SigV4A signing of one request head, as pure functions.
//!
//! The signed headers are exactly `host`, `x-amz-content-sha256`,
//! `x-amz-date`, `x-amz-security-token` (with session credentials) and, for
//! SigV4A, `x-amz-region-set`: nothing an intermediary or the application may
//! legitimately change afterwards. The query is signed as it is forwarded
//! ([`crate::query::wire_query`]); aws-sigv4 builds the canonical query from
//! it.

use std::{fmt::Write as _, time::SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{
        PayloadChecksumKind, SignableBody, SignableRequest, SigningParams, SigningSettings,
    },
    sign::{v4, v4a},
};
use aws_smithy_runtime_api::client::identity::Identity;
use http::{HeaderName, HeaderValue};
use sha2::{Digest as _, Sha256};

use crate::query;

/// Signing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `AWS4-HMAC-SHA256`, scoped to one region.
    SigV4,
    /// `AWS4-ECDSA-P256-SHA256`, valid in every region (region set `*`).
    SigV4a,
}

/// What to sign for.
#[derive(Debug, Clone)]
pub struct SigningConfig {
    pub service: String,
    pub region: String,
    pub algorithm: Algorithm,
}

/// The `x-amz-content-sha256` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// `UNSIGNED-PAYLOAD`: the body streams through unhashed.
    Unsigned,
    /// Lowercase hex SHA-256 of the whole body.
    Sha256Hex(String),
}

impl Payload {
    /// Hashes a complete body.
    pub fn sha256_of(body: &[u8]) -> Self {
        Self::Sha256Hex(hex::encode(Sha256::digest(body)))
    }
}

/// The parts of a request that are signed.
#[derive(Debug, Clone, Copy)]
pub struct RequestToSign<'a> {
    pub method: &'a str,
    /// The path as sent on the wire (percent-encoded, not normalized).
    pub path: &'a str,
    /// The query as forwarded ([`crate::query::wire_query`]), without `?`.
    pub query: Option<&'a str>,
    /// Host header / `:authority` value as forwarded upstream.
    pub host: &'a str,
    pub payload: &'a Payload,
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("signing parameters: {0}")]
    Params(String),
    #[error("signing: {0}")]
    Sign(#[from] aws_sigv4::http_request::SigningError),
    #[error("signature header {0} is not a valid header value")]
    HeaderValue(&'static str),
}

/// A computed signature: the headers to set on the request.
#[derive(Debug, Clone)]
pub struct Signed {
    /// `authorization`, `x-amz-date`, `x-amz-content-sha256`, and where they
    /// apply `x-amz-security-token` and `x-amz-region-set`. Authorization and
    /// the token are marked sensitive.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Signed {
    pub fn get(&self, name: &str) -> Option<&HeaderValue> {
        self.headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v)
    }
}

/// Signs `req` with `creds` at `time`.
pub fn sign(
    req: &RequestToSign<'_>,
    creds: &Credentials,
    cfg: &SigningConfig,
    time: SystemTime,
) -> Result<Signed, SignError> {
    let identity: Identity = creds.clone().into();
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let params: SigningParams<'_> = match cfg.algorithm {
        Algorithm::SigV4 => v4::SigningParams::builder()
            .identity(&identity)
            .region(&cfg.region)
            .name(&cfg.service)
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| SignError::Params(e.to_string()))?
            .into(),
        Algorithm::SigV4a => v4a::SigningParams::builder()
            .identity(&identity)
            .region_set("*")
            .name(&cfg.service)
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| SignError::Params(e.to_string()))?
            .into(),
    };
    let uri = match req.query {
        Some(q) if !q.is_empty() => format!("{}?{q}", req.path),
        _ => req.path.to_owned(),
    };
    let body = match req.payload {
        Payload::Unsigned => SignableBody::UnsignedPayload,
        Payload::Sha256Hex(h) => SignableBody::Precomputed(h.clone()),
    };
    let signable =
        SignableRequest::new(req.method, uri, std::iter::once(("host", req.host)), body)?;
    let (instructions, _signature) = aws_sigv4::http_request::sign(signable, &params)?.into_parts();
    let (headers, _params) = instructions.into_parts();
    let headers = headers
        .into_iter()
        .map(|h| {
            let name = HeaderName::from_static(h.name());
            let mut value =
                HeaderValue::from_str(h.value()).map_err(|_| SignError::HeaderValue(h.name()))?;
            value.set_sensitive(h.sensitive() || name == http::header::AUTHORIZATION);
            Ok((name, value))
        })
        .collect::<Result<Vec<_>, SignError>>()?;
    Ok(Signed { headers })
}

/// The canonical path: dot segments and empty segments removed, then every
/// byte but unreserved ones and `/` percent-encoded again (a `%` of the wire
/// form becomes `%25`).
pub fn canonical_path(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut normalized = String::with_capacity(path.len() + 1);
    for s in &segments {
        normalized.push('/');
        normalized.push_str(s);
    }
    if normalized.is_empty() || (path.ends_with('/') && !segments.is_empty()) {
        normalized.push('/');
    }
    let mut encoded = String::with_capacity(normalized.len());
    query::encode_into(normalized.as_bytes(), true, &mut encoded);
    encoded
}

/// Canonical request and string-to-sign of a signed request, for
/// `--log-signing`. The security token is shown as `REDACTED`; the hash in
/// the string-to-sign is of the real canonical request, so it can be
/// compared with the one a server reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningTrace {
    pub canonical_request: String,
    pub string_to_sign: String,
}

/// Rebuilds the canonical request from the signing output. `None` when the
/// output lacks the expected headers.
pub fn trace(req: &RequestToSign<'_>, signed: &Signed) -> Option<SigningTrace> {
    let auth = signed.get("authorization")?.to_str().ok()?;
    let (algorithm, rest) = auth.split_once(' ')?;
    let mut credential = None;
    let mut signed_headers = None;
    for part in rest.split(", ") {
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed_headers = Some(v);
        }
    }
    let scope = credential?.split_once('/')?.1;
    let signed_headers = signed_headers?;
    let date = signed.get("x-amz-date")?.to_str().ok()?;
    let payload_hash = signed.get("x-amz-content-sha256")?.to_str().ok()?;

    let mut real = String::new();
    let mut shown = String::new();
    for name in signed_headers.split(';') {
        let value = if name == "host" {
            req.host.trim()
        } else {
            signed.get(name)?.to_str().ok()?.trim()
        };
        let _ = writeln!(real, "{name}:{value}");
        if name == "x-amz-security-token" {
            let _ = writeln!(shown, "{name}:REDACTED");
        } else {
            let _ = writeln!(shown, "{name}:{value}");
        }
    }
    let head = format!(
        "{}\n{}\n{}\n",
        req.method,
        canonical_path(req.path),
        req.query
            .map(query::canonical_query)
            .transpose()
            .ok()?
            .unwrap_or_default()
    );
    let tail = format!("\n{signed_headers}\n{payload_hash}");
    let real_creq = format!("{head}{real}{tail}");
    let hash = hex::encode(Sha256::digest(real_creq.as_bytes()));
    Some(SigningTrace {
        canonical_request: format!("{head}{shown}{tail}"),
        string_to_sign: format!("{algorithm}\n{date}\n{scope}\n{hash}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        query::wire_query,
        self_check::{
            BOTOCORE_TOKEN_BODY, BOTOCORE_UNSIGNED, credentials, signing_config, signing_time,
        },
    };

    fn header<'a>(s: &'a Signed, name: &str) -> &'a str {
        s.get(name).unwrap().to_str().unwrap()
    }

    fn signature(s: &Signed) -> &str {
        header(s, "authorization")
            .rsplit_once("Signature=")
            .unwrap()
            .1
    }

    // The vectors and how botocore computed them: see crate::self_check,
    // which checks the same signatures in the built binary.
    #[test]
    fn sigv4_unsigned_payload_matches_botocore() {
        let v = BOTOCORE_UNSIGNED;
        let s = v.sign().unwrap();
        assert_eq!(header(&s, "x-amz-date"), "20150830T123600Z");
        assert_eq!(header(&s, "x-amz-content-sha256"), "UNSIGNED-PAYLOAD");
        assert!(s.get("x-amz-security-token").is_none());
        assert!(header(&s, "authorization").starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-west-2/vpc-lattice-svcs/aws4_request, \
             SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature="
        ));
        assert_eq!(signature(&s), v.signature);
    }

    #[test]
    fn sigv4_with_token_and_body_hash_matches_botocore() {
        let v = BOTOCORE_TOKEN_BODY;
        // Signed as forwarded, in the app's order: aws-sigv4 sorts it.
        let q = wire_query(v.query).unwrap();
        assert_eq!(q, "x=a%2Fb&sp=a%20b&u=%E2%82%AC");
        let payload = v.payload();
        let req = v.request(&q, &payload);
        let s = sign(
            &req,
            &credentials(v.token),
            &signing_config(),
            signing_time(),
        )
        .unwrap();
        assert_eq!(header(&s, "x-amz-security-token"), "SESSIONTOKEN");
        assert!(s.get("x-amz-security-token").unwrap().is_sensitive());
        assert!(s.get("authorization").unwrap().is_sensitive());
        assert_eq!(
            header(&s, "x-amz-content-sha256"),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(
            header(&s, "authorization").contains(
                "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,"
            )
        );
        assert_eq!(signature(&s), v.signature);
        // botocore's canonical request (token redacted in ours) and string-to-sign.
        let t = trace(&req, &s).unwrap();
        assert_eq!(
            t.canonical_request,
            "POST\n/a%2520b/e\nsp=a%20b&u=%E2%82%AC&x=a%2Fb\nhost:example.com:8080\n\
             x-amz-content-sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\n\
             x-amz-date:20150830T123600Z\nx-amz-security-token:REDACTED\n\n\
             host;x-amz-content-sha256;x-amz-date;x-amz-security-token\n\
             2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(
            t.string_to_sign,
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-west-2/vpc-lattice-svcs/aws4_request\n\
             8d81c8e6470d7a21c91f999a9fcea15c63e07c784bfe2d528b7de29d9ca8ae3e"
        );
    }

    /// The logged canonical request is the one aws-sigv4 signed: the
    /// signature recomputed from our string-to-sign equals the real one.
    #[test]
    fn trace_reproduces_the_signature() {
        let payload = Payload::Unsigned;
        let q = wire_query("z=1&a=%7e&a=b").unwrap();
        let req = RequestToSign {
            method: "PUT",
            path: "/p%2Fq/./r//s/",
            query: Some(&q),
            host: "h.example",
            payload: &payload,
        };
        let c = credentials(Some("TOKEN-SECRET"));
        let s = sign(&req, &c, &signing_config(), signing_time()).unwrap();
        let t = trace(&req, &s).unwrap();
        assert!(
            t.canonical_request
                .contains("x-amz-security-token:REDACTED")
        );
        assert!(!t.canonical_request.contains("TOKEN-SECRET"));
        assert!(!t.string_to_sign.contains("TOKEN-SECRET"));
        assert!(
            t.canonical_request
                .starts_with("PUT\n/p%252Fq/r/s/\na=b&a=~&z=1\n")
        );
        let key = v4::generate_signing_key(
            c.secret_access_key(),
            signing_time(),
            "us-west-2",
            "vpc-lattice-svcs",
        );
        let recomputed = v4::calculate_signature(key, t.string_to_sign.as_bytes());
        assert_eq!(recomputed, signature(&s));
    }

    #[test]
    fn sigv4a_headers() {
        let cfg = SigningConfig {
            algorithm: Algorithm::SigV4a,
            ..signing_config()
        };
        let req = RequestToSign {
            method: "GET",
            path: "/",
            query: None,
            host: "h.example",
            payload: &Payload::Unsigned,
        };
        let s = sign(&req, &credentials(None), &cfg, signing_time()).unwrap();
        assert_eq!(header(&s, "x-amz-region-set"), "*");
        assert!(header(&s, "authorization").starts_with(
            "AWS4-ECDSA-P256-SHA256 Credential=AKIDEXAMPLE/20150830/vpc-lattice-svcs/aws4_request, \
             SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-region-set, Signature="
        ));
        let t = trace(&req, &s).unwrap();
        assert!(t.string_to_sign.starts_with(
            "AWS4-ECDSA-P256-SHA256\n20150830T123600Z\n20150830/vpc-lattice-svcs/aws4_request\n"
        ));
    }

    #[test]
    fn canonical_paths() {
        assert_eq!(canonical_path(""), "/");
        assert_eq!(canonical_path("/"), "/");
        assert_eq!(canonical_path("/a/./b/../c"), "/a/c");
        assert_eq!(canonical_path("//a//b/"), "/a/b/");
        assert_eq!(canonical_path("/a%20b"), "/a%2520b");
        assert_eq!(canonical_path("/c:d@e"), "/c%3Ad%40e");
    }
}
