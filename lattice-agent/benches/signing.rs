//! Micro-benchmark of the proxy's per-request signing: one headers-only
//! request (what every request costs without `--sign-payload`), SigV4 and
//! SigV4A, with session credentials, as the proxy signs ([`Signer`], its
//! key kept between requests). `cargo xtask bench` reports the SigV4 figure
//! and SigV4A figures against their targets. `*_aws_sigv4_per_request` is
//! aws-sigv4's `http_request::sign` alone, deriving the key every time, for
//! comparison (for SigV4A, what the signer did before it kept the key and
//! signed with ring).

use std::{hint::black_box, time::SystemTime};

use aws_credential_types::Credentials;
use criterion::{Criterion, criterion_group, criterion_main};
use lattice_agent::sign::{self, Algorithm, Payload, RequestToSign, Signer, SigningConfig};

fn signing(c: &mut Criterion) {
    let creds = Credentials::new(
        "AKIDLATTICEBENCH",
        "lattice/bench/SECRET+key0123456789abcdefgh",
        Some("SESSION-TOKEN-lattice-bench".to_owned()),
        None,
        "bench",
    );
    let req = RequestToSign {
        method: "GET",
        path: "/api/v1/items/42",
        query: Some("limit=10&page=2"),
        host: "inventory-8080-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws",
        payload: &Payload::Unsigned,
    };
    let mut group = c.benchmark_group("sign");
    for (name, algorithm) in [("sigv4", Algorithm::SigV4), ("sigv4a", Algorithm::SigV4a)] {
        let cfg = SigningConfig {
            service: "vpc-lattice-svcs".to_owned(),
            region: "us-west-2".to_owned(),
            algorithm,
        };
        let signer = Signer::new(cfg.clone());
        group.bench_function(format!("{name}_headers_only"), |b| {
            b.iter(|| {
                signer
                    .sign(black_box(&req), &creds, SystemTime::now())
                    .unwrap()
            });
        });
        group.bench_function(format!("{name}_aws_sigv4_per_request"), |b| {
            b.iter(|| sign::sign(black_box(&req), &creds, &cfg, SystemTime::now()).unwrap());
        });
    }
    group.finish();
}

criterion_group!(benches, signing);
criterion_main!(benches);
