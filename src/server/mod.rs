//! Binding the listeners, accepting connections, and draining on shutdown.

mod preface;

use std::io;

use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::admin;
use crate::auth::authority::Authority;
use crate::config::{Config, ListenerLimits};
use crate::proxy::{PeerService, Proxy};
use crate::record::Recorder;
use crate::settings::Settings;
use crate::telemetry::{Telemetry, Unserved};
use crate::tls::ServerTls;

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
    let tls = client_transport(&config).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:#}")))?;
    let listener = bind(config.listen, "client").await?;
    let admin_listener = bind(config.admin_listen, "admin").await?;
    let listen_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let draining = Arc::new(AtomicBool::new(false));
    let proxy = Proxy::new(&config, recorder, telemetry.clone(), settings, auth, draining.clone());
    let (shutdown, stop) = watch::channel(false);
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        proxy.upstream().clone(),
        telemetry.clone(),
        proxy.readiness().clone(),
        stop.clone(),
    ));
    if let Some(tls) = &tls {
        tls.clone().watch(config.tls.tls_reload_interval, stop.clone());
    }
    telemetry.metrics.connections_limited_to(config.limits.max_connections);
    let grpc =
        tokio::spawn(serve_grpc(listener, proxy, telemetry, tls, config.limits.clone(), stop, config.drain_timeout));
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

/// TLS for the client listener, or None for plaintext, which is allowed only on a loopback
/// address or with `--plaintext`. Says in the log which one is in force.
fn client_transport(config: &Config) -> anyhow::Result<Option<Arc<ServerTls>>> {
    if config.upstream.scheme_str() != Some("https") && config.upstream_tls.is_set() {
        anyhow::bail!("--upstream-tls-ca / --upstream-tls-server-name need an https:// --upstream");
    }
    let listen = config.listen;
    let tls = ServerTls::load(&config.tls).context("cannot load the client listener's TLS files")?;
    match &tls {
        Some(tls) => tracing::info!(%listen, files = %tls.describe(), "client listener: TLS 1.2+ (h2)"),
        None if listen.ip().is_loopback() => {
            tracing::info!(%listen, "client listener: PLAINTEXT (loopback address only)")
        }
        None if config.tls.plaintext => tracing::warn!(
            %listen,
            "client listener: PLAINTEXT on a network address (--plaintext): credentials and data travel unencrypted"
        ),
        None => anyhow::bail!(
            "refusing to serve clients on {listen} without TLS: credentials would cross the network in clear text. \
             Give a certificate (--tls-cert and --tls-key, or MILVUS_SIDECAR_TLS_CERT and MILVUS_SIDECAR_TLS_KEY), \
             listen on a loopback address, or accept plaintext explicitly with --plaintext (MILVUS_SIDECAR_PLAINTEXT=true)"
        ),
    }
    Ok(tls)
}

async fn serve_grpc(
    listener: TcpListener,
    proxy: Proxy,
    telemetry: Arc<Telemetry>,
    tls: Option<Arc<ServerTls>>,
    limits: ListenerLimits,
    mut stop: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        // Large inserts need big windows to stream at loopback speed. Frames of 256 KiB
        // rather than 1 MiB: each frame is a buffer of its own, and smaller ones cost less
        // to allocate and fault in (4 MiB inserts: 2.6 -> 2.1 ms CPU, peak RSS 27 -> 23 MiB).
        .adaptive_window(true)
        .max_frame_size(256 << 10)
        .max_header_list_size(limits.max_header_list_bytes)
        .max_concurrent_streams(limits.max_concurrent_streams)
        // A peer that vanished without closing (a dead host, a cut network) would hold one of
        // the --max-connections slots forever: pings find it within 80 s.
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
    // One permit per open connection: when none is left, the loop stops accepting and new
    // connections wait in the kernel's listen backlog until one closes.
    let connections = Arc::new(Semaphore::new(limits.max_connections as usize));
    let mut warned_full = false;
    loop {
        let permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !warned_full {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached; new connections wait"
                    );
                    warned_full = true;
                }
                tokio::select! {
                    permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    _ = stop.changed() => break,
                }
            }
        };
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
        if connections.available_permits() > 0 {
            warned_full = false;
        }
        let _ = stream.set_nodelay(true);
        let service = proxy.for_peer(peer);
        let watcher = graceful.watcher();
        let http2 = http2.clone();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = telemetry.metrics.connection_opened();
            let client = Client { peer, deadline, http2: &http2, service, watcher, telemetry: &telemetry };
            let Some(acceptor) = acceptor else {
                return client.serve(stream).await;
            };
            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => client.serve(stream).await,
                // Gone without a word, as a TCP health check or a port scan goes.
                Ok(Err(e)) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
                    telemetry.metrics.connection_unserved(Unserved::Closed);
                    tracing::debug!(%peer, error = %e, "client connection closed during the TLS handshake");
                }
                Ok(Err(e)) => {
                    telemetry.metrics.connection_unserved(Unserved::TlsRefused);
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                }
                Err(_) => {
                    telemetry.metrics.connection_unserved(Unserved::HandshakeTimeout);
                    tracing::info!(%peer, "TLS handshake not finished within --handshake-timeout; closed");
                }
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

/// One accepted client connection.
struct Client<'a> {
    peer: SocketAddr,
    /// When its TLS handshake (if any) and its HTTP/2 preface must be done.
    deadline: tokio::time::Instant,
    http2: &'a http2::Builder<TokioExecutor>,
    service: PeerService,
    watcher: Watcher,
    telemetry: &'a Telemetry,
}

impl Client<'_> {
    /// Serves the connection, its TLS (if any) done: the HTTP/2 preface by the deadline,
    /// then its calls until it closes.
    async fn serve<S>(self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let unserved = |why| self.telemetry.metrics.connection_unserved(why);
        let stream = match tokio::time::timeout_at(self.deadline, preface::read(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(preface::NotHttp2::Closed | preface::NotHttp2::Io(_))) => {
                unserved(Unserved::Closed);
                return tracing::debug!(%peer, "client connection closed before its HTTP/2 preface");
            }
            Ok(Err(e)) => {
                unserved(Unserved::NotHttp2);
                return tracing::info!(%peer, "{e}; closed");
            }
            Err(_) => {
                unserved(Unserved::HandshakeTimeout);
                return tracing::info!(%peer, "no HTTP/2 preface within --handshake-timeout; closed");
            }
        };
        if let Err(e) = self.watcher.watch(self.http2.serve_connection(TokioIo::new(stream), self.service)).await {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    }
}
