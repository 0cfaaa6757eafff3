//! SigV4 / SigV4A signing of one request head, as pure functions.
//!
//! The signed headers are exactly `host`, `x-amz-content-sha256`,
//! `x-amz-date`, `x-amz-security-token` (with session credentials) and, for
//! SigV4A, `x-amz-region-set`: nothing an intermediary or the application may
//! legitimately change afterwards. The query is signed as it is forwarded
//! ([`crate::query::wire_query`]); aws-sigv4 builds the canonical query from
//! it.
//!
//! Two paths compute the same signature. [`Signer`], what the proxy uses,
//! signs SigV4 with aws-sigv4's building blocks: the signing key from
//! `generate_signing_key`, derived once per day, credentials, region and
//! service and then reused (as an HMAC already keyed with it), and the
//! signature as `calculate_signature` computes it, HMAC-SHA256 of the
//! string to sign, over a canonical request hashed as it is written (no
//! intermediate request, header map or strings). [`sign`] hands the whole request to
//! aws-sigv4's `http_request::sign`, which derives the key every time, and
//! the tests hold the two paths to the same output. Both sign the canonical
//! path botocore computes, as the service does ([`normalized_path`]).
//!
//! SigV4A the same way: the signer derives the P-256 key as aws-sigv4's
//! `v4a::generate_signing_key` does, once per credentials (it depends on
//! the access key and secret only), and signs with ring, whose assembly
//! P-256 is several times faster than aws-sigv4's. ECDSA signatures are
//! randomised, so the tests compare SigV4A signatures by verifying them.

use std::{
    borrow::Cow,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{
        PayloadChecksumKind, SignableBody, SignableRequest, SigningParams, SigningSettings,
        UriPathNormalizationMode,
    },
    sign::{v4, v4a},
};
use aws_smithy_runtime_api::client::identity::Identity;
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::{HeaderName, HeaderValue};
use p256::elliptic_curve::sec1::ToSec1Point as _;
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair},
};
use sha2::{Digest as _, Sha256};

use crate::query;
pub use crate::uri_path::{canonical_path, normalized_path};

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
    #[error("canonical query")]
    Query(#[source] crate::query::QueryError),
    #[error("hex-encoding the {what}")]
    Hex {
        what: &'static str,
        #[source]
        source: hex::FromHexError,
    },
    #[error("signing time {secs_since_epoch:?} s since 1970 is not between 1970 and 9999")]
    Time { secs_since_epoch: Option<u64> },
    #[error("signing date {date:?} is not YYYYMMDD")]
    Date { date: String },
    #[error("the SigV4 signing key")]
    HmacKey(#[source] hmac::digest::InvalidLength),
    #[error("the SigV4A private key")]
    V4aSecret(#[source] p256::elliptic_curve::Error),
    #[error("the SigV4A key pair")]
    V4aKeyPair(#[source] ring::error::KeyRejected),
    #[error("ECDSA P-256 signing (SigV4A)")]
    Ecdsa(#[source] ring::error::Unspecified),
    #[error("the SigV4A signature ({len} bytes) is longer than a DER P-256 signature")]
    SignatureTooLong { len: usize },
    #[error("signing parameters")]
    Params(#[source] Box<dyn std::error::Error + Send + Sync>),
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

/// Signs requests for one [`SigningConfig`], keeping the signing key of
/// the credentials (and, for SigV4, the day) it last signed for, and the
/// `x-amz-date` of the second it last signed in.
pub struct Signer {
    cfg: SigningConfig,
    cached: Mutex<Cached>,
    /// ECDSA nonces (SigV4A).
    rng: SystemRandom,
}

#[derive(Default)]
struct Cached {
    key: Option<CachedKey>,
    time: Option<CachedTime>,
}

/// A derived signing key and what it was derived from. The session
/// token's header value is kept with it so it is not copied per request.
struct CachedKey {
    access_key_id: String,
    secret: String,
    token: Option<String>,
    /// `YYYYMMDD`, the credential scope's date the SigV4 key was derived
    /// for; a SigV4A key depends on the access key and secret only.
    date: Option<[u8; 8]>,
    key: SigningKey,
    token_header: Option<HeaderValue>,
}

#[derive(Clone)]
enum SigningKey {
    /// HMAC-SHA256 keyed with the day's SigV4 signing key: each request
    /// clones it instead of hashing the key's inner and outer pads again.
    V4(Hmac<Sha256>),
    /// The SigV4A P-256 key pair, derived as aws-sigv4 derives it
    /// (`v4a::generate_signing_key`), signed with by ring.
    V4a(Arc<EcdsaKeyPair>),
}

/// Where one request's signature starts, from [`Signer::prepared`].
struct Prepared {
    key: SigningKey,
    token_header: Option<HeaderValue>,
    amz_date: [u8; 16],
    amz_date_header: HeaderValue,
}

/// `x-amz-date` of one second, as text and as a header value.
struct CachedTime {
    unix_secs: u64,
    text: [u8; 16],
    header: HeaderValue,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The cached key and secret stay out of every log.
        f.debug_struct("Signer").field("cfg", &self.cfg).finish()
    }
}

const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
const V4_ALGORITHM: &str = "AWS4-HMAC-SHA256";
const V4A_ALGORITHM: &str = "AWS4-ECDSA-P256-SHA256";
/// SigV4A's region set: valid in every region.
const REGION_SET: &str = "*";

impl Signer {
    pub fn new(cfg: SigningConfig) -> Self {
        Self {
            cfg,
            cached: Mutex::new(Cached::default()),
            rng: SystemRandom::new(),
        }
    }

    pub fn config(&self) -> &SigningConfig {
        &self.cfg
    }

    /// Signs `req` with `creds` at `time`: the same headers as [`sign`]
    /// (for SigV4A, a signature that verifies with the same key; ECDSA
    /// signatures differ from one signing to the next).
    pub fn sign(
        &self,
        req: &RequestToSign<'_>,
        creds: &Credentials,
        time: SystemTime,
    ) -> Result<Signed, SignError> {
        let Prepared {
            key,
            token_header,
            amz_date,
            amz_date_header,
        } = self.prepared(creds, time)?;
        // ASCII digits, `T` and `Z`: always UTF-8.
        let amz_date =
            std::str::from_utf8(&amz_date).map_err(|_| SignError::HeaderValue("x-amz-date"))?;
        let date = &amz_date[..8];
        let token = creds.session_token();
        let v4a = matches!(key, SigningKey::V4a(_));
        let payload = match req.payload {
            Payload::Unsigned => UNSIGNED_PAYLOAD,
            Payload::Sha256Hex(h) => h.as_str(),
        };
        let signed_headers = match (v4a, token.is_some()) {
            (false, true) => "host;x-amz-content-sha256;x-amz-date;x-amz-security-token",
            (false, false) => "host;x-amz-content-sha256;x-amz-date",
            (true, true) => {
                "host;x-amz-content-sha256;x-amz-date;x-amz-region-set;x-amz-security-token"
            }
            (true, false) => "host;x-amz-content-sha256;x-amz-date;x-amz-region-set",
        };

        // The canonical request, hashed as it is written.
        let mut creq = Sha256::new();
        for part in [req.method, "\n"] {
            creq.update(part);
        }
        creq.update(canonical_path(req.path).as_bytes());
        creq.update("\n");
        if let Some(q) = req.query.filter(|q| !q.is_empty()) {
            let canonical = query::canonical_query(q).map_err(SignError::Query)?;
            creq.update(canonical);
        }
        for part in [
            "\nhost:",
            &trim_all(req.host),
            "\nx-amz-content-sha256:",
            payload,
            "\nx-amz-date:",
            amz_date,
            "\n",
        ] {
            creq.update(part);
        }
        if v4a {
            for part in ["x-amz-region-set:", REGION_SET, "\n"] {
                creq.update(part);
            }
        }
        if let Some(t) = token {
            // aws-sigv4 signs (and sends) the token exactly as given.
            for part in ["x-amz-security-token:", t, "\n"] {
                creq.update(part);
            }
        }
        for part in ["\n", signed_headers, "\n", payload] {
            creq.update(part);
        }
        let mut creq_hash = [0u8; 64];
        hex::encode_to_slice(creq.finalize(), &mut creq_hash).map_err(|source| SignError::Hex {
            what: "canonical request hash",
            source,
        })?;

        // SigV4A's scope has no region (the empty parts join to nothing).
        let (algorithm, scope) = if v4a {
            (
                V4A_ALGORITHM,
                [date, "/", &self.cfg.service, "/aws4_request", "", ""],
            )
        } else {
            (
                V4_ALGORITHM,
                [
                    date,
                    "/",
                    &self.cfg.region,
                    "/",
                    &self.cfg.service,
                    "/aws4_request",
                ],
            )
        };
        let string_to_sign = [algorithm, "\n", amz_date, "\n"]
            .into_iter()
            .chain(scope)
            .chain(["\n"]);
        // Lowercase hex: 64 digits of HMAC-SHA256, at most 144 of a DER
        // ECDSA P-256 signature.
        let mut signature = [0u8; 144];
        let signature_len = match key {
            // The string to sign goes straight into the keyed HMAC, and
            // the signature is hex on the stack: this runs for every
            // request.
            SigningKey::V4(mut mac) => {
                for part in string_to_sign {
                    mac.update(part.as_bytes());
                }
                mac.update(&creq_hash);
                hex::encode_to_slice(mac.finalize().into_bytes(), &mut signature[..64]).map_err(
                    |source| SignError::Hex {
                        what: "signature",
                        source,
                    },
                )?;
                64
            }
            SigningKey::V4a(pair) => {
                let mut message = Vec::with_capacity(160);
                for part in string_to_sign {
                    message.extend_from_slice(part.as_bytes());
                }
                message.extend_from_slice(&creq_hash);
                let der = pair.sign(&self.rng, &message).map_err(SignError::Ecdsa)?;
                let der = der.as_ref();
                let out = signature
                    .get_mut(..der.len() * 2)
                    .ok_or(SignError::SignatureTooLong { len: der.len() })?;
                hex::encode_to_slice(der, out).map_err(|source| SignError::Hex {
                    what: "signature",
                    source,
                })?;
                der.len() * 2
            }
        };
        // Lowercase hex digits: always UTF-8.
        let signature =
            std::str::from_utf8(&signature[..signature_len]).expect("hex digits are ASCII");
        let authorization = concat(&[
            &[algorithm, " Credential=", creds.access_key_id(), "/"],
            &scope,
            &[
                ", SignedHeaders=",
                signed_headers,
                ", Signature=",
                signature,
            ],
        ]);
        let mut authorization = HeaderValue::try_from(authorization)
            .map_err(|_| SignError::HeaderValue("authorization"))?;
        authorization.set_sensitive(true);

        let mut headers = Vec::with_capacity(5);
        headers.push((HeaderName::from_static("x-amz-date"), amz_date_header));
        headers.push((http::header::AUTHORIZATION, authorization));
        headers.push((
            HeaderName::from_static("x-amz-content-sha256"),
            match req.payload {
                Payload::Unsigned => HeaderValue::from_static(UNSIGNED_PAYLOAD),
                Payload::Sha256Hex(h) => HeaderValue::from_str(h)
                    .map_err(|_| SignError::HeaderValue("x-amz-content-sha256"))?,
            },
        ));
        if v4a {
            headers.push((
                HeaderName::from_static("x-amz-region-set"),
                HeaderValue::from_static(REGION_SET),
            ));
        }
        if let Some(t) = token_header {
            headers.push((HeaderName::from_static("x-amz-security-token"), t));
        }
        Ok(Signed { headers })
    }

    /// What signing `creds` at `time` starts from, each part computed
    /// only when what it depends on changed since the last request.
    fn prepared(&self, creds: &Credentials, time: SystemTime) -> Result<Prepared, SignError> {
        let unix_secs = time
            .duration_since(UNIX_EPOCH)
            .map_err(|_| SignError::Time {
                secs_since_epoch: None,
            })?
            .as_secs();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        let cached = &mut *cached;
        let now = match &cached.time {
            Some(t) if t.unix_secs == unix_secs => t,
            _ => {
                let text = amz_date(time)?;
                let header = HeaderValue::from_bytes(&text)
                    .map_err(|_| SignError::HeaderValue("x-amz-date"))?;
                cached.time.insert(CachedTime {
                    unix_secs,
                    text,
                    header,
                })
            }
        };
        let date = &now.text[..8];
        let key = match &cached.key {
            Some(c)
                if c.date.as_ref().is_none_or(|d| d.as_slice() == date)
                    && c.access_key_id == creds.access_key_id()
                    && c.secret == creds.secret_access_key()
                    && c.token.as_deref() == creds.session_token() =>
            {
                c
            }
            _ => cached.key.insert(self.derive(creds, date)?),
        };
        Ok(Prepared {
            key: key.key.clone(),
            token_header: key.token_header.clone(),
            amz_date: now.text,
            amz_date_header: now.header.clone(),
        })
    }

    /// Derives the signing key for `creds` (on `date`, `YYYYMMDD`, for
    /// SigV4).
    fn derive(&self, creds: &Credentials, date: &[u8]) -> Result<CachedKey, SignError> {
        let token_header = creds
            .session_token()
            .map(|t| {
                let mut v = HeaderValue::from_str(t)
                    .map_err(|_| SignError::HeaderValue("x-amz-security-token"))?;
                v.set_sensitive(true);
                Ok::<_, SignError>(v)
            })
            .transpose()?;
        let (key, date) = match self.cfg.algorithm {
            Algorithm::SigV4 => {
                let date_str = std::str::from_utf8(date).map_err(|_| SignError::Date {
                    date: String::from_utf8_lossy(date).into_owned(),
                })?;
                let derived = v4::generate_signing_key(
                    creds.secret_access_key(),
                    // Any time of that day: the key depends on the date only.
                    parse_date(date_str)?,
                    &self.cfg.region,
                    &self.cfg.service,
                );
                let mac =
                    Hmac::<Sha256>::new_from_slice(derived.as_ref()).map_err(SignError::HmacKey)?;
                let mut day = [0u8; 8];
                day.copy_from_slice(date);
                (SigningKey::V4(mac), Some(day))
            }
            Algorithm::SigV4a => (SigningKey::V4a(Arc::new(self.v4a_key_pair(creds)?)), None),
        };
        Ok(CachedKey {
            access_key_id: creds.access_key_id().to_owned(),
            secret: creds.secret_access_key().to_owned(),
            token: creds.session_token().map(str::to_owned),
            date,
            key,
            token_header,
        })
    }

    /// The SigV4A key pair of `creds`: the private scalar aws-sigv4
    /// derives, and its public point (which ring wants alongside and
    /// checks against it).
    fn v4a_key_pair(&self, creds: &Credentials) -> Result<EcdsaKeyPair, SignError> {
        let private = v4a::generate_signing_key(creds.access_key_id(), creds.secret_access_key());
        let secret = p256::SecretKey::from_slice(private.as_ref()).map_err(SignError::V4aSecret)?;
        let public = secret.public_key().to_sec1_point(false);
        EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            private.as_ref(),
            public.as_bytes(),
            &self.rng,
        )
        .map_err(SignError::V4aKeyPair)
    }
}

/// The parts, joined, in one allocation.
fn concat(parts: &[&[&str]]) -> String {
    let len = parts.iter().flat_map(|p| p.iter()).map(|p| p.len()).sum();
    let mut out = String::with_capacity(len);
    for part in parts.iter().flat_map(|p| p.iter()) {
        out.push_str(part);
    }
    out
}

/// `YYYYMMDDTHHMMSSZ` (UTC) of `time`, as `x-amz-date` spells it.
fn amz_date(time: SystemTime) -> Result<[u8; 16], SignError> {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| SignError::Time {
            secs_since_epoch: None,
        })?
        .as_secs();
    let out_of_range = SignError::Time {
        secs_since_epoch: Some(secs),
    };
    let days = i64::try_from(secs / 86_400).map_err(|_| SignError::Time {
        secs_since_epoch: Some(secs),
    })?;
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        return Err(out_of_range);
    }
    let rem = secs % 86_400;
    let mut out = *b"00000000T000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y as u64);
    put(4, 2, u64::from(m));
    put(6, 2, u64::from(d));
    put(9, 2, rem / 3600);
    put(11, 2, rem / 60 % 60);
    put(13, 2, rem % 60);
    Ok(out)
}

/// Midnight UTC of a `YYYYMMDD` date.
fn parse_date(date: &str) -> Result<SystemTime, SignError> {
    let bad = || SignError::Date {
        date: date.to_owned(),
    };
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, SignError> {
        date.get(r).and_then(|s| s.parse().ok()).ok_or_else(bad)
    };
    let days = days_from_civil(num(0..4)?, num(4..6)? as u32, num(6..8)? as u32);
    let secs = u64::try_from(days * 86_400).map_err(|_| bad())?;
    Ok(UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// (year, month, day) of a day count since 1970-01-01, proleptic
/// Gregorian (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A header value as SigV4 canonicalises it: spaces trimmed at both ends
/// and runs of spaces inside collapsed to one (aws-sigv4's rule).
fn trim_all(value: &str) -> Cow<'_, str> {
    let value = value.trim_matches(' ');
    if !value.contains("  ") {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len());
    let mut prev_space = false;
    for c in value.chars() {
        if c == ' ' && prev_space {
            continue;
        }
        prev_space = c == ' ';
        out.push(c);
    }
    Cow::Owned(out)
}

/// Signs `req` with `creds` at `time`, all of it by aws-sigv4.
pub fn sign(
    req: &RequestToSign<'_>,
    creds: &Credentials,
    cfg: &SigningConfig,
    time: SystemTime,
) -> Result<Signed, SignError> {
    let identity: Identity = creds.clone().into();
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    // aws-sigv4 keeps a `/` where a last `.` or `..` segment was (`/a/.`
    // is `/a/` to it, `/a` to botocore and the service): it gets the path
    // already normalised, and only encodes it.
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let params: SigningParams<'_> = match cfg.algorithm {
        Algorithm::SigV4 => v4::SigningParams::builder()
            .identity(&identity)
            .region(&cfg.region)
            .name(&cfg.service)
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| SignError::Params(Box::new(e)))?
            .into(),
        Algorithm::SigV4a => v4a::SigningParams::builder()
            .identity(&identity)
            .region_set("*")
            .name(&cfg.service)
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| SignError::Params(Box::new(e)))?
            .into(),
    };
    let path = normalized_path(req.path);
    let uri = match req.query {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.into_owned(),
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

    fn headers(s: &Signed) -> Vec<(String, String)> {
        let mut h: Vec<_> = s
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        h.sort();
        h
    }

    /// The signer's own SigV4 path and aws-sigv4's `http_request::sign`
    /// give the very same headers, whatever the request, credentials and
    /// time; one signer throughout, so its cached key must follow every
    /// change of day and credentials.
    #[test]
    fn signer_matches_aws_sigv4() {
        let signer = Signer::new(signing_config());
        // Never empty: hyper gives `/` for an empty path.
        let paths = [
            "/",
            "/a/b",
            "/a%20b/c:d/../e",
            "/p%2Fq/./r//s/",
            "/caf%C3%A9/~x-_.",
            "/a+b/@!$&'()*,;=",
            "//",
            "/..",
            // A last `.` or `..` segment: no trailing `/` (botocore).
            "/a/.",
            "/a/b/..",
            "/a/./b/.",
            "/a%2Fb/..",
            "/x//y/../",
            "/.",
        ];
        let queries: Vec<Option<String>> = [
            None,
            Some(""),
            Some("a=1"),
            Some("b=2&a=1"),
            Some("x=a+b&k=%2f&u=%7e&c=café"),
            Some("flag"),
            Some("a=&a=1&a=0&=x"),
            Some("tag=z&tag=y&tag=x"),
        ]
        .into_iter()
        .map(|q| q.map(|q| wire_query(q).unwrap().into_owned()))
        .collect();
        let creds = [
            credentials(None),
            credentials(Some("TOKEN+/=abc")),
            credentials(Some("  spaced  token ")),
            Credentials::new("AKIDOTHER", "other/secret", None, None, "t"),
        ];
        let times = [
            signing_time(),
            // The last second of a leap day, then the next day.
            UNIX_EPOCH + std::time::Duration::from_secs(1_709_251_199),
            UNIX_EPOCH + std::time::Duration::from_secs(1_709_251_200),
            UNIX_EPOCH + std::time::Duration::from_secs(951_782_400),
            UNIX_EPOCH + std::time::Duration::from_secs(4_102_444_799),
        ];
        let payloads = [Payload::Unsigned, Payload::sha256_of(b"hello")];
        let mut n = 0;
        for (i, path) in paths.iter().enumerate() {
            for (j, query) in queries.iter().enumerate() {
                // Every credential and time meets every path and query,
                // in an order that changes key and token often.
                let c = &creds[(i + j) % creds.len()];
                let time = times[(i * 3 + j) % times.len()];
                let req = RequestToSign {
                    method: ["GET", "POST", "PUT", "DELETE"][j % 4],
                    path,
                    query: query.as_deref(),
                    host: ["h.example", "example.com:8080", " svc.on.aws "][i % 3],
                    payload: &payloads[(i + 2 * j) % 2],
                };
                let ours = signer.sign(&req, c, time).unwrap();
                let theirs = sign(&req, c, &signing_config(), time).unwrap();
                assert_eq!(headers(&ours), headers(&theirs), "{req:?} at {time:?}");
                for (name, value) in &ours.headers {
                    let secret = name == "authorization" || name == "x-amz-security-token";
                    assert_eq!(value.is_sensitive(), secret, "{name}");
                }
                n += 1;
            }
        }
        assert_eq!(n, paths.len() * queries.len());
    }

    /// Whether `signed` carries a SigV4A signature of `req` by `creds`:
    /// checked with the public key of the private key aws-sigv4 derives
    /// from them, over the string to sign of our (botocore's) canonical
    /// request. ECDSA signatures are randomised: compared by verification.
    fn sigv4a_verifies(req: &RequestToSign<'_>, signed: &Signed, creds: &Credentials) -> bool {
        use p256::ecdsa::{Signature, VerifyingKey, signature::Verifier as _};
        let private = v4a::generate_signing_key(creds.access_key_id(), creds.secret_access_key());
        let public = p256::SecretKey::from_slice(private.as_ref())
            .unwrap()
            .public_key();
        let key = VerifyingKey::from(public);
        let t = trace(req, signed).unwrap();
        let der = hex::decode(signature(signed)).unwrap();
        let sig = Signature::from_der(&der).unwrap();
        key.verify(t.string_to_sign.as_bytes(), &sig).is_ok()
    }

    /// SigV4A signs the path botocore (and the service) canonicalises:
    /// the signature verifies over that canonical request, whatever dot
    /// and empty segments the path has.
    #[test]
    fn sigv4a_signs_the_canonical_path_botocore_computes() {
        let cfg = SigningConfig {
            algorithm: Algorithm::SigV4a,
            ..signing_config()
        };
        let creds = credentials(Some("TOKEN"));
        for path in [
            "/",
            "/a/b",
            "/a/.",
            "/a/b/..",
            "/a/./b/.",
            "/..",
            "/.",
            "//",
            "/x//y/../",
            "/a/b/",
        ] {
            let req = RequestToSign {
                method: "GET",
                path,
                query: None,
                host: "h.example",
                payload: &Payload::Unsigned,
            };
            let s = sign(&req, &creds, &cfg, signing_time()).unwrap();
            assert!(sigv4a_verifies(&req, &s, &creds), "{path}");
        }
    }

    /// The signer's own SigV4A gives aws-sigv4's headers, and a
    /// signature that verifies with the key aws-sigv4 derives, for every
    /// credential (the key cached per credentials follows each change),
    /// path, query and time.
    #[test]
    fn signer_sigv4a_matches_aws_sigv4() {
        let cfg = SigningConfig {
            algorithm: Algorithm::SigV4a,
            ..signing_config()
        };
        let signer = Signer::new(cfg.clone());
        let creds = [
            credentials(None),
            credentials(Some("TOKEN+/=abc")),
            Credentials::new("AKIDOTHER", "other/secret", None, None, "t"),
            Credentials::new("AKIDOTHER", "other/secret/2", Some("T2".into()), None, "t"),
        ];
        let times = [
            signing_time(),
            UNIX_EPOCH + std::time::Duration::from_secs(1_709_251_199),
            UNIX_EPOCH + std::time::Duration::from_secs(1_709_251_200),
        ];
        let queries = ["", "b=2&a=1", "x=a%20b&k=%2F&flag", "tag=z&tag=y&tag=x"];
        let without_signature = |s: &Signed| -> Vec<(String, String)> {
            headers(s)
                .into_iter()
                .map(|(n, v)| match v.split_once("Signature=") {
                    Some((head, _)) => (n, head.to_owned()),
                    None => (n, v),
                })
                .collect()
        };
        let mut n = 0;
        for (i, path) in ["/", "/a/b", "/a/./b/..", "/p%2Fq//r/", "/caf%C3%A9"]
            .iter()
            .enumerate()
        {
            for (j, query) in queries.iter().enumerate() {
                let c = &creds[(i + j) % creds.len()];
                let time = times[(i + 2 * j) % times.len()];
                let req = RequestToSign {
                    method: ["GET", "POST"][j % 2],
                    path,
                    query: Some(query),
                    host: "svc.on.aws",
                    payload: &Payload::Unsigned,
                };
                let ours = signer.sign(&req, c, time).unwrap();
                let theirs = sign(&req, c, &cfg, time).unwrap();
                assert_eq!(
                    without_signature(&ours),
                    without_signature(&theirs),
                    "{req:?}"
                );
                assert!(sigv4a_verifies(&req, &ours, c), "{req:?} with {c:?}");
                assert!(sigv4a_verifies(&req, &theirs, c), "{req:?} with {c:?}");
                // Another credential's key does not verify it.
                let other = &creds[(i + j + 2) % creds.len()];
                assert!(!sigv4a_verifies(&req, &ours, other), "{req:?}");
                for (name, value) in &ours.headers {
                    let secret = name == "authorization" || name == "x-amz-security-token";
                    assert_eq!(value.is_sensitive(), secret, "{name}");
                }
                n += 1;
            }
        }
        assert_eq!(n, 20);
    }

    #[test]
    fn amz_dates() {
        let at = |secs| {
            let d = amz_date(UNIX_EPOCH + std::time::Duration::from_secs(secs)).unwrap();
            String::from_utf8(d.to_vec()).unwrap()
        };
        assert_eq!(at(0), "19700101T000000Z");
        assert_eq!(at(1_440_938_160), "20150830T123600Z");
        assert_eq!(at(951_868_799), "20000229T235959Z");
        assert_eq!(at(1_709_251_200), "20240301T000000Z");
        assert_eq!(at(253_402_300_799), "99991231T235959Z");
        assert!(amz_date(UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_800)).is_err());
        for day in ["19700101", "20000229", "20240301", "20991231"] {
            let midnight = parse_date(day).unwrap();
            assert_eq!(
                &at(midnight.duration_since(UNIX_EPOCH).unwrap().as_secs())[..9],
                &format!("{day}T")
            );
        }
        assert!(parse_date("2024-3-1").is_err());
    }

    #[test]
    fn header_values_trimmed_as_aws_sigv4_does() {
        assert_eq!(trim_all("  a  b   c "), "a b c");
        assert_eq!(trim_all("a b"), "a b");
        assert!(matches!(trim_all(" x "), Cow::Borrowed("x")));
    }
}
