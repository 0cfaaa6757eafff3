//! The signer against two independent references, on generated requests:
//! paths with dot segments, repeated slashes and percent-escapes; queries
//! with repeated keys, empty values, `=` and `+`; methods, hosts, payload
//! hashes, credentials with and without a session token, times.
//!
//! Each request goes through what the proxy does with it: the target
//! parsed as hyper parses it, the query rewritten for the wire
//! (`query::wire_query`), the path forwarded byte for byte. The signature
//! must be the one the service computes over what is forwarded:
//! - aws-sigv4's `http_request::sign` gives the same headers (SigV4A: a
//!   signature that verifies with the key aws-sigv4 derives);
//! - botocore, driven through tests/python/sigv4_batch.py (the verifier's
//!   own check, one Python process for every case), computes the same
//!   SigV4 signature, and its canonical request is the one our SigV4A
//!   signature verifies over.

use std::{
    borrow::Cow,
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aws_credential_types::Credentials;
use lattice_agent::{
    query::wire_query,
    sign::{self, Algorithm, Payload, RequestToSign, Signed, Signer, SigningConfig},
};
use lattice_tests::verifier;
use p256::ecdsa::{Signature, VerifyingKey, signature::Verifier as _};
use proptest::{prelude::*, strategy::ValueTree as _, test_runner::TestRunner};
use sha2::{Digest as _, Sha256};

const REGION: &str = "us-west-2";
const SERVICE: &str = "vpc-lattice-svcs";

/// A request as an app sends it, and what the signer is given for it.
#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    /// The request target as sent (path and query).
    target: String,
    host: String,
    payload: Payload,
    access_key: String,
    secret: String,
    token: Option<String>,
    time: SystemTime,
}

impl Case {
    fn credentials(&self) -> Credentials {
        Credentials::new(
            &self.access_key,
            &self.secret,
            self.token.clone(),
            None,
            "test",
        )
    }
}

/// What the proxy forwards for a case and signs: `None` when it refuses
/// the request (a target hyper rejects, a query it cannot sign).
struct Forwarded {
    path: String,
    query: Option<String>,
    /// The request target on the wire upstream.
    target: String,
}

fn forwarded(case: &Case) -> Option<Forwarded> {
    let pq = http::uri::PathAndQuery::try_from(case.target.as_str()).ok()?;
    let path = pq.path().to_owned();
    let wire = match pq.query() {
        Some(q) => Some(wire_query(q).ok()?),
        None => None,
    };
    // As the proxy builds it: the app's target unless the query changed.
    let target = match &wire {
        Some(Cow::Owned(q)) if q.is_empty() => path.clone(),
        Some(Cow::Owned(q)) => format!("{path}?{q}"),
        _ => pq.as_str().to_owned(),
    };
    Some(Forwarded {
        path,
        query: wire.map(Cow::into_owned),
        target,
    })
}

/// Path segments: dot segments (also escaped), empty ones (repeated
/// slashes), escapes of reserved, unreserved and UTF-8 bytes, sub-delims.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("%2E".to_owned()),
        Just("%2e%2E".to_owned()),
        Just("%2F".to_owned()),
        Just("%7e".to_owned()),
        Just("caf%C3%A9".to_owned()),
        Just("a+b".to_owned()),
        "[A-Za-z0-9._~!$&'()*+,;=:@%-]{1,6}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    (prop::collection::vec(segment(), 0..6), any::<bool>()).prop_map(|(segments, slash)| {
        let mut p = format!("/{}", segments.join("/"));
        if slash && !p.ends_with('/') {
            p.push('/');
        }
        p
    })
}

/// Query segments: few names (so they repeat), bare names, empty values,
/// `=` in values, `+`, escapes in either case, stray `%`, empty segments.
fn query() -> impl Strategy<Value = Option<String>> {
    let name = prop_oneof![
        Just("a"),
        Just("tag"),
        Just("Tag"),
        Just(""),
        Just("x+y"),
        Just("%7e"),
        Just("k%2f")
    ];
    let value = prop_oneof![
        Just(None),
        Just(Some(String::new())),
        "[A-Za-z0-9=+%._~!*'(),;:@/?-]{0,6}".prop_map(Some),
        Just(Some("%2B".to_owned())),
        Just(Some("%E2%82%AC".to_owned())),
    ];
    let pair = (name, value).prop_map(|(n, v)| match v {
        Some(v) => format!("{n}={v}"),
        None => n.to_owned(),
    });
    prop::option::of(prop::collection::vec(pair, 0..5).prop_map(|p| p.join("&")))
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]),
        path(),
        query(),
        prop::sample::select(vec![
            "svc-0123.7d67968.vpc-lattice-svcs.us-west-2.on.aws",
            "example.com:8080",
            "169.254.171.33",
        ]),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..32)),
        "AKID[A-Z0-9]{4,12}",
        "[A-Za-z0-9/+]{8,40}",
        prop::option::of("[A-Za-z0-9/+=]{8,60}"),
        // 2000-01-01 to 2099-12-31.
        946_684_800u64..4_102_444_799,
    )
        .prop_map(
            |(method, path, query, host, body, access_key, secret, token, secs)| Case {
                method,
                target: match query {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                },
                host: host.to_owned(),
                payload: body.map_or(Payload::Unsigned, |b| Payload::sha256_of(&b)),
                access_key,
                secret,
                token,
                time: UNIX_EPOCH + Duration::from_secs(secs),
            },
        )
}

fn config(algorithm: Algorithm) -> SigningConfig {
    SigningConfig {
        service: SERVICE.to_owned(),
        region: REGION.to_owned(),
        algorithm,
    }
}

fn header<'a>(s: &'a Signed, name: &str) -> Option<&'a str> {
    s.get(name).map(|v| v.to_str().expect("ASCII header"))
}

fn signature(s: &Signed) -> &str {
    header(s, "authorization")
        .and_then(|a| a.rsplit_once("Signature="))
        .expect("a signature")
        .1
}

/// Headers, sorted, with the signature cut off the Authorization value.
fn unsigned_headers(s: &Signed) -> Vec<(String, String)> {
    let mut h: Vec<_> = s
        .headers
        .iter()
        .map(|(n, v)| {
            let v = v.to_str().expect("ASCII header");
            let v = v.split_once("Signature=").map_or(v, |(head, _)| head);
            (n.to_string(), v.to_owned())
        })
        .collect();
    h.sort();
    h
}

/// Whether `sig` (hex DER) is an ECDSA signature of `string_to_sign` by
/// the SigV4A key aws-sigv4 derives from `creds`.
fn sigv4a_verifies(creds: &Credentials, string_to_sign: &str, sig: &str) -> bool {
    let private = aws_sigv4::sign::v4a::generate_signing_key(
        creds.access_key_id(),
        creds.secret_access_key(),
    );
    let public = p256::SecretKey::from_slice(private.as_ref())
        .expect("a P-256 scalar")
        .public_key();
    let Ok(der) = hex::decode(sig) else {
        return false;
    };
    let Ok(sig) = Signature::from_der(&der) else {
        return false;
    };
    VerifyingKey::from(public)
        .verify(string_to_sign.as_bytes(), &sig)
        .is_ok()
}

/// The SigV4A string to sign over `canonical_request`.
fn sigv4a_string_to_sign(amz_date: &str, canonical_request: &str) -> String {
    format!(
        "AWS4-ECDSA-P256-SHA256\n{amz_date}\n{}/{SERVICE}/aws4_request\n{}",
        &amz_date[..8],
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    )
}

fn to_sign<'a>(case: &'a Case, fwd: &'a Forwarded) -> RequestToSign<'a> {
    RequestToSign {
        method: case.method,
        path: &fwd.path,
        query: fwd.query.as_deref(),
        host: &case.host,
        payload: &case.payload,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Ours and aws-sigv4's agree on every generated request (one signer
    /// per algorithm throughout: its cached keys follow every change of
    /// credentials and day).
    #[test]
    fn signer_agrees_with_aws_sigv4(cases in prop::collection::vec(case(), 1..8)) {
        let v4 = Signer::new(config(Algorithm::SigV4));
        let v4a = Signer::new(config(Algorithm::SigV4a));
        for case in &cases {
            let Some(fwd) = forwarded(case) else { continue };
            let req = to_sign(case, &fwd);
            let creds = case.credentials();

            let ours = v4.sign(&req, &creds, case.time).unwrap();
            let theirs = sign::sign(&req, &creds, &config(Algorithm::SigV4), case.time).unwrap();
            prop_assert_eq!(unsigned_headers(&ours), unsigned_headers(&theirs), "{:?}", case);
            prop_assert_eq!(signature(&ours), signature(&theirs), "{:?}", case);

            let ours = v4a.sign(&req, &creds, case.time).unwrap();
            let theirs = sign::sign(&req, &creds, &config(Algorithm::SigV4a), case.time).unwrap();
            prop_assert_eq!(unsigned_headers(&ours), unsigned_headers(&theirs), "{:?}", case);
            let trace = sign::trace(&req, &ours).unwrap();
            prop_assert!(
                sigv4a_verifies(&creds, &trace.string_to_sign, signature(&ours)),
                "{:?}", case
            );
            prop_assert!(
                sigv4a_verifies(&creds, &trace.string_to_sign, signature(&theirs)),
                "{:?}", case
            );
        }
    }
}

/// What the batch script returns for one request.
struct Botocore {
    canonical_request: String,
    signature: String,
}

/// botocore's verdicts on `requests` (service-side JSON, see
/// tests/python/sigv4_batch.py), in one Python process.
fn botocore(requests: &[serde_json::Value]) -> Vec<Botocore> {
    let python = verifier::python().unwrap_or_else(|missing| panic!("{missing}"));
    let script = verifier::script().with_file_name("sigv4_batch.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting python");
    let input = serde_json::to_vec(requests).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("python ran");
    writer.join().unwrap().expect("writing the requests");
    assert!(
        out.status.success(),
        "sigv4_batch.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    answers
        .into_iter()
        .map(|a| Botocore {
            canonical_request: a["canonical_request"].as_str().unwrap().to_owned(),
            signature: a["signature"].as_str().unwrap().to_owned(),
        })
        .collect()
}

/// The request the service receives: forwarded target and the signed
/// headers the proxy set.
fn as_received(case: &Case, fwd: &Forwarded, signed: &Signed) -> serde_json::Value {
    let names: Vec<&str> = header(signed, "authorization")
        .and_then(|a| a.split_once("SignedHeaders="))
        .and_then(|(_, rest)| rest.split_once(','))
        .expect("SignedHeaders")
        .0
        .split(';')
        .collect();
    let headers: Vec<(&str, &str)> = names
        .iter()
        .map(|&n| match n {
            "host" => (n, case.host.as_str()),
            _ => (n, header(signed, n).expect("a signed header is sent")),
        })
        .collect();
    serde_json::json!({
        "method": case.method,
        "target": fwd.target,
        "headers": headers,
        "signed": names,
        "secret": case.secret,
        "token": case.token,
        "region": REGION,
        "service": SERVICE,
    })
}

/// Hundreds of generated requests, each signed with SigV4 and SigV4A,
/// checked by botocore as the service would check what is forwarded.
#[test]
fn botocore_accepts_what_the_signer_signs() {
    const CASES: usize = 600;
    let mut runner = TestRunner::default();
    let strategy = case();
    let v4 = Signer::new(config(Algorithm::SigV4));
    let v4a = Signer::new(config(Algorithm::SigV4a));
    let mut checked = Vec::new();
    let mut requests = Vec::new();
    while checked.len() < CASES {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        let Some(fwd) = forwarded(&case) else {
            continue;
        };
        let creds = case.credentials();
        for signer in [&v4, &v4a] {
            let signed = signer
                .sign(&to_sign(&case, &fwd), &creds, case.time)
                .unwrap();
            requests.push(as_received(&case, &fwd, &signed));
            checked.push((case.clone(), signed));
        }
    }
    let answers = botocore(&requests);
    assert_eq!(answers.len(), checked.len());
    let mut v4a_checked = 0;
    for ((case, signed), answer) in checked.iter().zip(&answers) {
        let amz_date = header(signed, "x-amz-date").unwrap();
        if header(signed, "x-amz-region-set").is_some() {
            let sts = sigv4a_string_to_sign(amz_date, &answer.canonical_request);
            assert!(
                sigv4a_verifies(&case.credentials(), &sts, signature(signed)),
                "SigV4A of {case:?} does not verify over botocore's canonical request:\n{}",
                answer.canonical_request
            );
            v4a_checked += 1;
        } else {
            assert_eq!(
                signature(signed),
                answer.signature,
                "SigV4 of {case:?}; botocore's canonical request:\n{}",
                answer.canonical_request
            );
        }
    }
    assert_eq!(v4a_checked, CASES / 2);
}
