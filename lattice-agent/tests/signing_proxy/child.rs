//! The proxy child's main (see `lattice_tests::proxy_child`): what the
//! agent's single-pod mode assembles around the proxy, minus eBPF and
//! privileges, configured by the real `ProxyArgs` from `LATTICE_*`
//! variables. Every connection's original destination is the one the
//! parent named. Stops gracefully when stdin closes.
//!
//! This is the one place a test assembles the agent by hand; it goes once
//! the agent has an assembly entry the tests can call.

use std::{net::SocketAddr, sync::Arc};

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
use lattice_tests::proxy_child::{self, ChildConfig, ChildCreds};
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
    let config = ChildConfig::from_env();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log_filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(config));
}

async fn run(config: ChildConfig) {
    let args = Args::parse_from(["lattice-test-proxy"]);
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let (creds, region) = match config.creds {
        ChildCreds::Chain => {
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
        }
        ChildCreds::Static {
            access_key_id,
            secret_access_key,
            session_token,
        } => {
            let c = Credentials::new(
                access_key_id,
                secret_access_key,
                Some(session_token),
                None,
                "test",
            );
            (CredentialsCache::fixed(c), None)
        }
    };
    let mut cfg = ProxyConfig::from_args(&args.proxy).expect("proxy config");
    cfg.resolve_region(region).expect("proxy region");
    let cfg = Arc::new(cfg);

    let mut listeners = vec![tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()];
    if let Ok(l) = tokio::net::TcpListener::bind("[::1]:0").await {
        listeners.push(l);
    }
    let admin_listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let creds = WorkloadCredentials::Cache(creds);
    let readiness = Arc::new(Readiness::single(creds.clone()));
    readiness.set_attached(true);
    readiness.set_listening(true);
    let (proxy4, proxy6, admin_addr) = (
        listeners[0].local_addr().unwrap(),
        listeners.get(1).map(|l| l.local_addr().unwrap()),
        admin_listener.local_addr().unwrap(),
    );
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        readiness,
        Arc::clone(&metrics),
        None,
        shutdown.clone(),
    ));

    let stop = shutdown.clone();
    proxy_child::stop_at_end_of_input(move || stop.cancel());
    proxy_child::announce_ready(proxy4, proxy6, admin_addr);
    proxy::serve(
        WorkloadProxy {
            cfg,
            sockets: SocketFactory::Current,
            orig_dst: Arc::new(Fixed(config.upstream)),
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
