//! The proxy child's main: the agent's own assembly entry without eBPF or
//! privileges (`app::build_proxy_only`). Configured by the real flags from
//! `LATTICE_*` variables; `LATTICE_TEST_UPSTREAM` is every connection's
//! original destination; `LATTICE_TEST_CREDS` is `chain` (aws-config's
//! default chain from this process's environment) or `static:AK:SK:TOKEN`.
//! Prints `READY proxy=… [proxy6=…] admin=…`, stops gracefully when stdin
//! closes.

use std::{io::Read as _, net::SocketAddr, sync::Arc};

use aws_credential_types::Credentials;
use clap::Parser;
use lattice_agent::{app, cli::ProxyArgs, config, orig_dst::OriginalDestination};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    proxy: ProxyArgs,
}

/// Maps every peer to one address (or to nothing).
struct Fixed(Option<SocketAddr>);

impl OriginalDestination for Fixed {
    fn original_destination(&self, _peer: SocketAddr) -> Option<SocketAddr> {
        self.0
    }
}

pub fn main() {
    let filter = std::env::var("LATTICE_TEST_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse_from(["lattice-test-proxy"]);
    let mut serve = config::serve_config(&args.proxy).expect("proxy config");
    serve.admin_addr = "127.0.0.1:0".parse().unwrap();
    let creds_spec = std::env::var("LATTICE_TEST_CREDS").expect("LATTICE_TEST_CREDS");
    let fixed = (creds_spec != "chain").then(|| {
        let parts: Vec<&str> = creds_spec
            .strip_prefix("static:")
            .expect("static:AK:SK:TOKEN")
            .splitn(3, ':')
            .collect();
        Credentials::new(parts[0], parts[1], Some(parts[2].to_owned()), None, "test")
    });
    let upstream = std::env::var("LATTICE_TEST_UPSTREAM")
        .ok()
        .map(|u| u.parse().expect("LATTICE_TEST_UPSTREAM"));

    let bound = app::build_proxy_only(serve, 0, Arc::new(Fixed(upstream)), fixed).expect("build");
    let addrs = bound.addrs().clone();
    let mut ready = format!("READY proxy={}", addrs.proxy[0]);
    if let Some(v6) = addrs.proxy.get(1) {
        ready.push_str(&format!(" proxy6={v6}"));
    }
    ready.push_str(&format!(" admin={}", addrs.admin.expect("admin listener")));
    let stop = bound.shutdown_handle();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        stop.shutdown();
    });
    println!("{ready}");
    bound.serve().expect("serve");
    println!("STOPPED");
}
