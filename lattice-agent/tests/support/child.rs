//! The proxy child's main: what `mode.rs` does around the proxy, minus eBPF
//! and privileges. Configured by the real `ProxyArgs` from `LATTICE_*`
//! variables; `LATTICE_TEST_UPSTREAM` is every connection's original
//! destination; `LATTICE_TEST_CREDS` is `chain` (aws-config's default chain
//! from this process's environment) or `static:AK:SK:TOKEN`. Prints
//! `READY proxy=… [proxy6=…] admin=…`, stops gracefully when stdin closes.

use std::{io::Read as _, net::SocketAddr, sync::Arc};

use aws_credential_types::Credentials;
use clap::Parser;
use lattice_agent::{
    admin::{self, Readiness},
    cli::ProxyArgs,
    credentials::{self, CredentialsCache, CredentialsConfig, WorkloadCredentials},
    metrics::{IdentityLabel, Metrics, WorkloadLabels},
    netns::SocketFactory,
    orig_dst::OriginalDestination,
    proxy::{self, ProxyConfig, WorkloadProxy},
};
use tokio_util::sync::CancellationToken;

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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let args = Args::parse_from(["lattice-test-proxy"]);
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let creds_spec = std::env::var("LATTICE_TEST_CREDS").expect("LATTICE_TEST_CREDS");
    let (creds, region) = if creds_spec == "chain" {
        let setup = credentials::default_chain(&CredentialsConfig {
            region: args.proxy.region.clone(),
            role_arn: args.proxy.role_arn.clone(),
            role_session_name: Some(args.proxy.role_session_name.clone()),
        })
        .await;
        let cache = CredentialsCache::spawn(
            setup.provider,
            metrics.credentials(IdentityLabel::default()),
            shutdown.clone(),
        );
        (cache, setup.region)
    } else {
        let parts: Vec<&str> = creds_spec
            .strip_prefix("static:")
            .expect("static:AK:SK:TOKEN")
            .splitn(3, ':')
            .collect();
        let c = Credentials::new(parts[0], parts[1], Some(parts[2].to_owned()), None, "test");
        (CredentialsCache::fixed(c), None)
    };
    let mut cfg = ProxyConfig::from_args(&args.proxy).expect("proxy config");
    cfg.resolve_region(region).expect("proxy region");
    let cfg = Arc::new(cfg);
    let upstream = std::env::var("LATTICE_TEST_UPSTREAM")
        .ok()
        .map(|u| u.parse().expect("LATTICE_TEST_UPSTREAM"));

    let mut listeners = vec![tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()];
    if let Ok(l) = tokio::net::TcpListener::bind("[::1]:0").await {
        listeners.push(l);
    }
    let admin_listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let creds = WorkloadCredentials::Cache(creds);
    let readiness = Arc::new(Readiness::single(creds.clone()));
    readiness.set_attached(true);
    readiness.set_listening(true);
    let mut ready = format!("READY proxy={}", listeners[0].local_addr().unwrap());
    if let Some(l6) = listeners.get(1) {
        ready.push_str(&format!(" proxy6={}", l6.local_addr().unwrap()));
    }
    ready.push_str(&format!(" admin={}", admin_listener.local_addr().unwrap()));
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        readiness,
        Arc::clone(&metrics),
        None,
        shutdown.clone(),
    ));

    let stop = shutdown.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        stop.cancel();
    });
    println!("{ready}");
    proxy::serve(
        WorkloadProxy {
            cfg,
            sockets: SocketFactory::Current,
            orig_dst: Arc::new(Fixed(upstream)),
            creds,
            metrics: metrics.workload(WorkloadLabels::default()),
        },
        listeners,
        shutdown,
    )
    .await
    .expect("serve");
    let _ = admin_task.await;
    println!("STOPPED");
}
