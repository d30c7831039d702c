//! Binding the listeners, accepting connections, and draining on shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::auth::authority::Authority;
use crate::config::Config;
use crate::proxy::Proxy;
use crate::record::Recorder;
use crate::settings::Settings;
use crate::telemetry::Telemetry;

/// A started sidecar. Dropping it leaves it running; call [`Running::shutdown`] to drain.
pub struct Running {
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    grpc: JoinHandle<()>,
    admin: JoinHandle<()>,
}

/// Binds both listeners and starts serving in the background.
pub async fn start(
    config: Config,
    recorder: Arc<dyn Recorder>,
    telemetry: Arc<Telemetry>,
    settings: Arc<Settings>,
    auth: Option<Arc<Authority>>,
) -> io::Result<Running> {
    let listener = bind(config.listen, "client").await?;
    let admin_listener = bind(config.admin_listen, "admin").await?;
    let listen_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let proxy = Proxy::new(&config, recorder, telemetry.clone(), settings, auth);
    let (shutdown, stop) = watch::channel(false);
    let draining = Arc::new(AtomicBool::new(false));
    let admin =
        tokio::spawn(admin::serve(admin_listener, proxy.upstream().clone(), telemetry, draining.clone(), stop.clone()));
    let grpc = tokio::spawn(serve_grpc(listener, proxy, stop, config.drain_timeout));
    Ok(Running { listen_addr, admin_addr, shutdown, draining, grpc, admin })
}

impl Running {
    /// Stops accepting calls, lets in-flight ones finish (up to the drain timeout), then
    /// stops the admin listener.
    pub async fn shutdown(self) {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        let _ = self.grpc.await;
        let _ = self.admin.await;
    }
}

async fn bind(addr: SocketAddr, what: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen for {what} connections on {addr}: {e}")))
}

async fn serve_grpc(listener: TcpListener, proxy: Proxy, mut stop: watch::Receiver<bool>, drain_timeout: Duration) {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        // Large inserts need big windows and frames to stream at loopback speed.
        .adaptive_window(true)
        .max_frame_size(1 << 20)
        .max_header_list_size(64 * 1024);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically out of file descriptors: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = graceful.watch(http2.serve_connection(TokioIo::new(stream), proxy.for_peer(peer)));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("no longer accepting calls; draining in-flight calls");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all in-flight calls finished"),
        _ = tokio::time::sleep(drain_timeout) => tracing::warn!(?drain_timeout, "drain timeout reached; cutting the remaining calls"),
    }
}
