//! `lattice-agent self-check`: computations whose right answers are known
//! independently of this code, run by this very binary on the machine it
//! was built for. It needs no privileges, network or credentials, so it runs
//! under an emulator (qemu-user) as well, which is how the arm64 image is
//! tested on an x86_64 build machine.
//!
//! - SigV4: two requests signed by botocore (`SigV4Auth`), the same vectors
//!   the unit tests in [`crate::sign`] check.
//! - TLS crypto (rustls on ring, whose assembly differs per architecture):
//!   HKDF-SHA256 against RFC 5869 test case 1, and an X25519 agreement whose
//!   two sides must derive the same secret.
//! - The embedded eBPF object: it parses, and holds the four programs with
//!   their attach types and the five maps the agent uses.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aya_obj::{
    Object, ProgramSection,
    programs::{CgroupSockAddrAttachType, CgroupSockoptAttachType},
};
use lattice_common::names;
use rustls::{SupportedCipherSuite, crypto::ring};

use crate::{
    query::{self, wire_query},
    sign::{self, Algorithm, Payload, RequestToSign, SigningConfig},
};

/// Access key ID of the SigV4 vectors (the AWS test suite's).
pub const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
/// Secret access key of the SigV4 vectors.
pub const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

/// 2015-08-30T12:36:00Z, the AWS test suite's time.
pub fn signing_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160)
}

/// The vectors' static credentials, with an optional session token.
pub fn credentials(token: Option<&str>) -> Credentials {
    Credentials::new(
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY,
        token.map(str::to_owned),
        None,
        "self-check",
    )
}

/// SigV4 for VPC Lattice in us-west-2, as the vectors were signed.
pub fn signing_config() -> SigningConfig {
    SigningConfig {
        service: "vpc-lattice-svcs".into(),
        region: "us-west-2".into(),
        algorithm: Algorithm::SigV4,
    }
}

/// A request and the signature botocore computed for it.
///
/// botocore 1.x, as tests/python/sigv4_verifier.py verifies:
/// `req = AWSRequest(method, "http://" + host + path + "?" + query,
/// headers={"host": host, "x-amz-content-sha256": payload})`, signed by
/// `SigV4Auth(Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY, token),
/// "vpc-lattice-svcs", "us-west-2")` with `_timestamp = "20150830T123600Z"`
/// and `headers_to_sign` = host, x-amz-content-sha256, x-amz-date and, with
/// a token, x-amz-security-token.
#[derive(Debug, Clone, Copy)]
pub struct KnownSignature {
    pub name: &'static str,
    pub method: &'static str,
    pub path: &'static str,
    /// The query as the application sent it (before [`wire_query`]).
    pub query: &'static str,
    pub host: &'static str,
    /// The body whose SHA-256 is signed; `None` signs `UNSIGNED-PAYLOAD`.
    pub body: Option<&'static [u8]>,
    pub token: Option<&'static str>,
    /// Hex signature from the Authorization header.
    pub signature: &'static str,
}

/// GET with an unsorted query, UNSIGNED-PAYLOAD, no session token.
pub const BOTOCORE_UNSIGNED: KnownSignature = KnownSignature {
    name: "unsigned payload",
    method: "GET",
    path: "/",
    query: "b=2&a=1",
    host: "svc-0123.7d67968.vpc-lattice-svcs.us-west-2.on.aws",
    body: None,
    token: None,
    signature: "740fb25ed95276775ac7d76fff25400b035e68eabbb8f2159c2fa85a75b933c3",
};

/// POST with a session token, the body's hash, a path with dot segments and
/// encoded bytes, and a query needing re-encoding.
pub const BOTOCORE_TOKEN_BODY: KnownSignature = KnownSignature {
    name: "session token and body hash",
    method: "POST",
    path: "/a%20b/c:d/../e",
    query: "x=a%2Fb&sp=a+b&u=%E2%82%AC",
    host: "example.com:8080",
    body: Some(b"hello"),
    token: Some("SESSIONTOKEN"),
    signature: "1d1d0cebb8338b9e2cba8816ea18d213bac44abc702608174d72228ca2ec54a4",
};

impl KnownSignature {
    pub fn payload(&self) -> Payload {
        self.body.map_or(Payload::Unsigned, Payload::sha256_of)
    }

    /// The request to sign, with its query as forwarded
    /// (`wire_query(self.query)`) and [`Self::payload`].
    pub fn request<'a>(&'a self, query: &'a str, payload: &'a Payload) -> RequestToSign<'a> {
        RequestToSign {
            method: self.method,
            path: self.path,
            query: Some(query),
            host: self.host,
            payload,
        }
    }

    /// Signs the request as the proxy does ([`sign::Signer`]) and returns
    /// its headers.
    pub fn sign(&self) -> Result<sign::Signed, SelfCheckError> {
        let query = wire_query(self.query).map_err(|source| SelfCheckError::Query {
            vector: self.name,
            source,
        })?;
        let payload = self.payload();
        sign::Signer::new(signing_config())
            .sign(
                &self.request(&query, &payload),
                &credentials(self.token),
                signing_time(),
            )
            .map_err(|source| SelfCheckError::Sign {
                vector: self.name,
                source,
            })
    }

    /// Signs the request and compares the signature with botocore's.
    pub fn check(&self) -> Result<(), SelfCheckError> {
        let signed = self.sign()?;
        let got = signed
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|auth| auth.rsplit_once("Signature="))
            .map(|(_, sig)| sig.to_owned())
            .unwrap_or_default();
        if got != self.signature {
            return Err(SelfCheckError::Signature {
                vector: self.name,
                got,
                want: self.signature,
            });
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SelfCheckError {
    #[error("SigV4 vector \"{vector}\": query")]
    Query {
        vector: &'static str,
        #[source]
        source: query::QueryError,
    },
    #[error("SigV4 vector \"{vector}\"")]
    Sign {
        vector: &'static str,
        #[source]
        source: sign::SignError,
    },
    #[error("SigV4 vector \"{vector}\": signature {got:?}, botocore's is {want}")]
    Signature {
        vector: &'static str,
        got: String,
        want: &'static str,
    },
    #[error("TLS crypto: TLS13_AES_128_GCM_SHA256 is not a TLS 1.3 suite")]
    NotTls13,
    #[error("TLS crypto: HKDF expand: output too long")]
    HkdfLength,
    #[error("TLS crypto: HKDF-SHA256 gave {got}, RFC 5869 says {want}")]
    HkdfVector { got: String, want: &'static str },
    #[error("TLS crypto: X25519")]
    X25519(#[source] rustls::Error),
    #[error("TLS crypto: X25519: {0}")]
    X25519Agreement(&'static str),
    #[error("the embedded eBPF object does not parse")]
    EbpfParse(#[source] aya_obj::ParseError),
    #[error("the embedded eBPF object: program {name} is missing or not a {want} program")]
    EbpfProgram {
        name: &'static str,
        want: &'static str,
    },
    #[error("the embedded eBPF object: map {0} is missing")]
    EbpfMap(&'static str),
}

/// Runs the checks and prints what passed, one line a check.
pub fn report() -> Result<(), SelfCheckError> {
    for line in run()? {
        println!("{line}");
    }
    Ok(())
}

/// What passed, one line a check.
pub fn run() -> Result<Vec<String>, SelfCheckError> {
    let vectors = [BOTOCORE_UNSIGNED, BOTOCORE_TOKEN_BODY];
    for vector in &vectors {
        vector.check()?;
    }
    let mut report = vec![format!(
        "sigv4: ok ({} botocore signatures reproduced)",
        vectors.len()
    )];
    report.push(check_tls_crypto()?);
    report.push(check_ebpf_object(crate::bpf::EBPF_OBJECT)?);
    report.push(format!(
        "self-check passed on {} ({})",
        std::env::consts::ARCH,
        std::env::consts::OS
    ));
    Ok(report)
}

/// RFC 5869 appendix A.1 (HKDF-SHA256, test case 1).
const HKDF_IKM: [u8; 22] = [0x0b; 22];
const HKDF_SALT: [u8; 13] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c,
];
const HKDF_INFO: [u8; 10] = [0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9];
const HKDF_OKM: &str =
    "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865";

/// The TLS provider the proxy uses upstream (rustls on ring).
fn check_tls_crypto() -> Result<String, SelfCheckError> {
    let SupportedCipherSuite::Tls13(suite) = ring::cipher_suite::TLS13_AES_128_GCM_SHA256 else {
        return Err(SelfCheckError::NotTls13);
    };
    let mut okm = [0u8; 42];
    suite
        .hkdf_provider
        .extract_from_secret(Some(&HKDF_SALT), &HKDF_IKM)
        .expand_slice(&[&HKDF_INFO], &mut okm)
        .map_err(|_| SelfCheckError::HkdfLength)?;
    if hex::encode(okm) != HKDF_OKM {
        return Err(SelfCheckError::HkdfVector {
            got: hex::encode(okm),
            want: HKDF_OKM,
        });
    }

    let x25519 = ring::kx_group::X25519;
    let tls = SelfCheckError::X25519;
    let alice = x25519.start().map_err(tls)?;
    let bob = x25519.start().map_err(tls)?;
    let (alice_pub, bob_pub) = (alice.pub_key().to_vec(), bob.pub_key().to_vec());
    if alice_pub == bob_pub {
        return Err(SelfCheckError::X25519Agreement(
            "two key shares are equal (random source broken?)",
        ));
    }
    let alice_secret = alice.complete(&bob_pub).map_err(tls)?;
    let bob_secret = bob.complete(&alice_pub).map_err(tls)?;
    if alice_secret.secret_bytes() != bob_secret.secret_bytes() {
        return Err(SelfCheckError::X25519Agreement(
            "the two sides derived different secrets",
        ));
    }
    Ok("tls crypto: ok (HKDF-SHA256 RFC 5869 vector, X25519 agreement)".into())
}

/// Parses `object` as aya does before loading and checks what the agent
/// attaches and configures is there.
fn check_ebpf_object(object: &[u8]) -> Result<String, SelfCheckError> {
    let obj = Object::parse(object).map_err(SelfCheckError::EbpfParse)?;
    let programs = [
        (names::PROG_CONNECT4, "cgroup/connect4"),
        (names::PROG_CONNECT6, "cgroup/connect6"),
        (names::PROG_SOCK_OPS, "sockops"),
        (names::PROG_GETSOCKOPT, "cgroup/getsockopt"),
    ];
    for (name, want) in programs {
        let kind = obj
            .programs
            .get(name)
            .and_then(|p| section_kind(&p.section));
        if kind != Some(want) {
            return Err(SelfCheckError::EbpfProgram { name, want });
        }
    }
    for map in names::PINNED_MAPS {
        if !obj.maps.contains_key(map) {
            return Err(SelfCheckError::EbpfMap(map));
        }
    }
    Ok(format!(
        "ebpf object: ok ({} bytes, {} programs, {} maps checked)",
        object.len(),
        programs.len(),
        names::PINNED_MAPS.len()
    ))
}

/// The ELF section name of the program types the agent attaches.
fn section_kind(section: &ProgramSection) -> Option<&'static str> {
    Some(match section {
        ProgramSection::CgroupSockAddr {
            attach_type: CgroupSockAddrAttachType::Connect4,
        } => "cgroup/connect4",
        ProgramSection::CgroupSockAddr {
            attach_type: CgroupSockAddrAttachType::Connect6,
        } => "cgroup/connect6",
        ProgramSection::SockOps => "sockops",
        ProgramSection::CgroupSockopt {
            attach_type: CgroupSockoptAttachType::Get,
        } => "cgroup/getsockopt",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_on_the_build_machine() {
        let report = run().unwrap();
        assert_eq!(report.len(), 4, "{report:?}");
        assert!(report[3].contains(std::env::consts::ARCH), "{report:?}");
    }

    #[test]
    fn a_wrong_signature_is_reported() {
        let wrong = KnownSignature {
            signature: BOTOCORE_TOKEN_BODY.signature,
            ..BOTOCORE_UNSIGNED
        };
        let err = wrong.check().unwrap_err();
        assert!(
            matches!(err, SelfCheckError::Signature { got, .. } if got == BOTOCORE_UNSIGNED.signature)
        );
    }

    #[test]
    fn a_damaged_ebpf_object_is_reported() {
        let object = crate::bpf::EBPF_OBJECT;
        assert!(matches!(
            check_ebpf_object(&object[..object.len() / 2]),
            Err(SelfCheckError::EbpfParse(_))
        ));
    }
}
