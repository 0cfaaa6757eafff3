//! Plain TCP relay to the original destination.
//!
//! Exercises interception end to end for non-HTTP traffic and until the
//! signing proxy serves the listeners.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};

use crate::orig_dst::OriginalDestination;

pub async fn serve(listeners: Vec<TcpListener>, orig_dst: Arc<dyn OriginalDestination>) {
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let orig_dst = orig_dst.clone();
        tasks.spawn(accept_loop(listener, orig_dst));
    }
    while tasks.join_next().await.is_some() {}
}

async fn accept_loop(listener: TcpListener, orig_dst: Arc<dyn OriginalDestination>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let orig = orig_dst.original_destination(peer);
                tokio::spawn(relay(client, peer, orig));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relay(mut client: TcpStream, peer: SocketAddr, orig: Option<SocketAddr>) {
    use tokio::io::AsyncWriteExt;
    let Some(orig) = orig else {
        tracing::warn!(%peer, "no original destination recorded; closing");
        let _ = client
            .write_all(format!("lattice-agent: no original destination for {peer}\n").as_bytes())
            .await;
        return;
    };
    match TcpStream::connect(orig).await {
        Ok(mut upstream) => {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
        Err(e) => {
            tracing::warn!(%peer, upstream = %orig, error = %e, "upstream connect failed");
            let _ = client
                .write_all(format!("lattice-agent: upstream {orig}: {e}\n").as_bytes())
                .await;
        }
    }
}
