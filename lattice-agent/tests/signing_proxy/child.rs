//! The proxy child's main (see `lattice_tests::proxy_child`): the agent's
//! own assembly entry without eBPF or privileges (`app::build_proxy_only`),
//! configured by the real flags from `LATTICE_*` variables. Every
//! connection's original destination is the one the parent named. Stops
//! gracefully when stdin closes.

use std::{net::SocketAddr, sync::Arc};

use aws_credential_types::Credentials;
use clap::Parser;
use lattice_agent::{app, cli::ProxyArgs, config, orig_dst::OriginalDestination};
use lattice_tests::proxy_child::{self, ChildConfig, ChildCreds};

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
    let child = ChildConfig::from_env();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&child.log_filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse_from(["lattice-test-proxy"]);
    let mut serve = config::serve_config(&args.proxy).expect("proxy config");
    serve.admin_addr = "127.0.0.1:0".parse().unwrap();
    // None: aws-config's default chain, from this process's environment.
    let fixed = match child.creds {
        ChildCreds::Chain => None,
        ChildCreds::Static {
            access_key_id,
            secret_access_key,
            session_token,
        } => Some(Credentials::new(
            access_key_id,
            secret_access_key,
            Some(session_token),
            None,
            "test",
        )),
    };

    let bound =
        app::build_proxy_only(serve, 0, Arc::new(Fixed(child.upstream)), fixed).expect("build");
    let addrs = bound.addrs().clone();
    let stop = bound.shutdown_handle();
    proxy_child::stop_at_end_of_input(move || stop.shutdown());
    proxy_child::announce_ready(
        addrs.proxy[0],
        addrs.proxy.get(1).copied(),
        addrs.admin.expect("admin listener"),
    );
    bound.serve().expect("serve");
    println!("STOPPED");
}
