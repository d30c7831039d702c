//! The HTTP/2 connection to the upstream Milvus, driven with `h2` itself: one multiplexed
//! connection, made when a call first needs it and again after it closes.
//!
//! A call's headers, and a body the sidecar already holds (every inspected request that is
//! not streamed, a Search among them), go out from the call's own task; only a streamed body
//! gets a task of its own to pipe it under the upstream's flow control. hyper's pooled
//! client, which this replaces, passed each call through a pool checkout, a dispatch channel
//! to its connection task and a spawned body pipe (see the README's Performance section for
//! what that cost).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response, Uri};
use http_body::{Body as _, Frame};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::body::Body;
use super::coalesce::Coalesce;
use crate::config::UpstreamTlsArgs;

pub type Connector = HttpsConnector<HttpConnector>;
type Io = TokioIo<Coalesce<MaybeHttpsStream<TokioIo<TcpStream>>>>;

/// Plain TCP for an `http://` upstream, TLS for `https://`.
pub fn connector(tls: &UpstreamTlsArgs, connect_timeout: Duration) -> Connector {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    tcp.set_keepalive(Some(Duration::from_secs(60)));
    tcp.enforce_http(false); // https:// URIs go through it to the TLS layer
    let builder = HttpsConnectorBuilder::new().with_tls_config(crate::tls::upstream_client_config(tls)).https_or_http();
    let builder = match &tls.upstream_tls_server_name {
        Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(
            ServerName::try_from(name.clone()).expect("the server name was checked when parsed"),
        )),
        None => builder,
    };
    builder.enable_http2().wrap_connector(tcp)
}

/// How the connection is made and kept.
#[derive(Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// While calls are in flight, a ping this often; no pong within `keep_alive_timeout`
    /// and the connection is dropped (its calls fail, the next call connects again).
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
}

pub struct Link {
    connector: Connector,
    /// Where to connect (scheme and authority).
    target: Uri,
    h2: h2::client::Builder,
    settings: Settings,
    /// The live connection's handle; None before the first call and after it closed.
    current: Arc<Mutex<Option<Live>>>,
    /// One connection attempt at a time; the calls behind it use what it made.
    connecting: tokio::sync::Mutex<()>,
    /// Calls sent and not yet done with their reply, for the keep-alive.
    open: Arc<AtomicUsize>,
}

/// A call counted in [`Link::open`] until this is dropped (with its reply).
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Open(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct Live {
    sender: SendRequest<Bytes>,
    /// Tells this connection from the one after it, so that a closing connection cannot
    /// clear its successor.
    generation: u64,
}

/// Why a call could not be sent or its reply headers not received.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Http2(#[from] h2::Error),
}

impl Link {
    pub fn new(connector: Connector, target: Uri, settings: Settings) -> Self {
        let mut h2 = h2::client::Builder::new();
        h2.enable_push(false)
            // Replies (large query results) stream at loopback speed with these windows; a
            // slow client holds at most a window per call and four in all, unread.
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            // Frames as on the client side (src/server/mod.rs).
            .max_frame_size(256 << 10);
        Link {
            connector,
            target,
            h2,
            settings,
            current: Arc::new(Mutex::new(None)),
            connecting: tokio::sync::Mutex::new(()),
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Sends `request` and waits for the reply's headers. A connection found closed before
    /// it took the request is replaced and the request sent on the new one.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<ReplyBody>, LinkError> {
        let open = Open::new(&self.open);
        let Live { sender, generation } = self.live().await?;
        let mut sender = match sender.ready().await {
            Ok(sender) => sender,
            Err(closed) => {
                forget(&self.current, generation);
                tracing::debug!(error = %closed, "the upstream connection closed; connecting again");
                self.live().await?.sender.ready().await?
            }
        };
        let (parts, body) = request.into_parts();
        let ends_here = body.is_end_stream();
        let (reply, mut stream) = sender.send_request(Request::from_parts(parts, ()), ends_here)?;
        match body {
            _ if ends_here => {}
            // Queued whole; h2 sends it as the upstream's window allows.
            Body::Full(Some(data)) => stream.send_data(data, true)?,
            body => {
                tokio::spawn(pipe(body, stream));
            }
        }
        let (parts, recv) = reply.await?.into_parts();
        Ok(Response::from_parts(parts, ReplyBody { recv, trailers_next: false, done: false, _open: open }))
    }

    /// The live connection, made if there is none.
    async fn live(&self) -> Result<Live, LinkError> {
        if let Some(live) = self.current.lock().expect("never poisoned").clone() {
            return Ok(live);
        }
        // Boxed: inline, the connecting code would make every call's future (moved several
        // times per call) as large as itself.
        Box::pin(self.reconnect()).await
    }

    async fn reconnect(&self) -> Result<Live, LinkError> {
        let _turn = self.connecting.lock().await;
        if let Some(live) = self.current.lock().expect("never poisoned").clone() {
            return Ok(live);
        }
        let live = tokio::time::timeout(self.settings.connect_timeout, self.connect())
            .await
            .map_err(|_| LinkError::Connect(format!("no connection within {:?}", self.settings.connect_timeout)))??;
        *self.current.lock().expect("never poisoned") = Some(live.clone());
        Ok(live)
    }

    async fn connect(&self) -> Result<Live, LinkError> {
        use tower_service::Service;
        let mut connector = self.connector.clone();
        let io = async {
            poll_fn(|cx| connector.poll_ready(cx)).await?;
            connector.call(self.target.clone()).await
        }
        .await
        .map_err(|e| LinkError::Connect(crate::error_chain(&*e)))?;
        // Writes coalesced: see coalesce.rs.
        let io = TokioIo::new(Coalesce::new(io));
        let (sender, connection) = self.h2.handshake::<Io, Bytes>(io).await?;
        let generation = next_generation();
        tokio::spawn(drive(connection, self.open.clone(), self.settings, self.current.clone(), generation));
        Ok(Live { sender, generation })
    }
}

/// Drops the handle of a connection that closed, unless a newer one is there already.
fn forget(current: &Mutex<Option<Live>>, generation: u64) {
    let mut current = current.lock().expect("never poisoned");
    if current.as_ref().is_some_and(|live| live.generation == generation) {
        *current = None;
    }
}

fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs the connection until it closes, or until a ping goes unanswered while calls wait on
/// it; then makes way for a new one.
async fn drive(
    mut connection: h2::client::Connection<Io, Bytes>,
    open: Arc<AtomicUsize>,
    settings: Settings,
    current: Arc<Mutex<Option<Live>>>,
    generation: u64,
) {
    let pinger = connection.ping_pong();
    let outcome = tokio::select! {
        ended = &mut connection => ended.map_err(|e| e.to_string()),
        silent = keep_alive(pinger, &open, &settings) => Err(silent),
    };
    if let Err(reason) = outcome {
        tracing::warn!(%reason, "the upstream connection ended");
    }
    forget(&current, generation);
}

/// Returns why the connection should be given up. Pings only while calls are open: Milvus
/// (grpc-go) answers pings on an idle connection with GOAWAY `too_many_pings`.
async fn keep_alive(pinger: Option<h2::PingPong>, open: &AtomicUsize, settings: &Settings) -> String {
    let Some(mut pinger) = pinger else { return std::future::pending().await };
    loop {
        tokio::time::sleep(settings.keep_alive_interval).await;
        if open.load(Ordering::Relaxed) == 0 {
            continue;
        }
        if let Err(e) = pinger.send_ping(h2::Ping::opaque()) {
            return format!("keep-alive ping not sent: {e}");
        }
        match tokio::time::timeout(settings.keep_alive_timeout, poll_fn(|cx| pinger.poll_pong(cx))).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keep-alive ping failed: {e}"),
            Err(_) => {
                return format!("no answer to a keep-alive ping within {:?}", settings.keep_alive_timeout);
            }
        }
    }
}

/// Streams a request body the sidecar does not hold whole, as the upstream's window allows.
/// A body that fails (a streamed insert the scan refused, a client gone) resets the
/// upstream's stream, so Milvus never takes an incomplete message as complete.
async fn pipe(mut body: Body, mut stream: SendStream<Bytes>) {
    loop {
        // At most one frame waits in h2 beyond what the window lets out.
        stream.reserve_capacity(1);
        let window = poll_fn(|cx| {
            if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(false);
            }
            if stream.capacity() > 0 {
                return Poll::Ready(true);
            }
            Poll::Ready(matches!(ready!(stream.poll_capacity(cx)), Some(Ok(_))))
        })
        .await;
        if !window {
            return;
        }
        // A Milvus that resets the stream meanwhile ends the wait for the client's next frame.
        let frame = poll_fn(|cx| {
            if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let Some(frame) = frame else { return };
        let sent = match frame {
            None => stream.send_data(Bytes::new(), true).map(|()| true),
            Some(Err(_)) => {
                stream.send_reset(Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let last = body.is_end_stream();
                    stream.send_data(data, last).map(|()| last)
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => stream.send_trailers(trailers).map(|()| true),
                    Err(_) => Ok(false),
                },
            },
        };
        if !matches!(sent, Ok(false)) {
            return;
        }
    }
}

/// A reply from the upstream, frame by frame; the window is given back as each frame is
/// passed on, so the client's pace is the upstream's.
pub struct ReplyBody {
    recv: RecvStream,
    trailers_next: bool,
    done: bool,
    _open: Open,
}

impl http_body::Body for ReplyBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.trailers_next {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only once the stream is gone, which the next poll reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.trailers_next = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, Uri};
    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    use super::{Body, Link, Settings, connector};

    fn call() -> Request<Body> {
        Request::post("/milvus.proto.milvus.MilvusService/Search")
            .header("content-type", "application/grpc")
            .body(Body::Full(Some(Bytes::from_static(&[0, 0, 0, 0, 1, 7]))))
            .unwrap()
    }

    /// A connection that takes a call and then goes silent (its kernel still acknowledges,
    /// nothing answers) is dropped by the keep-alive, failing that call; the next call gets
    /// a new connection and its reply.
    #[tokio::test]
    async fn a_silent_upstream_is_given_up_by_the_keep_alive_and_the_next_call_reconnects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target: Uri = format!("http://{}", listener.local_addr().unwrap()).parse().unwrap();
        let server = tokio::spawn(async move {
            // First connection: take one request, then never poll the connection again.
            let (socket, _) = listener.accept().await.unwrap();
            let mut silent = h2::server::handshake(socket).await.unwrap();
            let (request, respond) = silent.accept().await.unwrap().unwrap();
            assert_eq!(request.uri().path(), "/milvus.proto.milvus.MilvusService/Search");
            // Second connection: answer as Milvus would.
            let (socket, _) = listener.accept().await.unwrap();
            let mut live = h2::server::handshake(socket).await.unwrap();
            let (_, mut reply) = live.accept().await.unwrap().unwrap();
            let mut stream = reply.send_response(Response::new(()), false).unwrap();
            stream.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false).unwrap();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            stream.send_trailers(trailers).unwrap();
            let _keep = (silent, respond);
            while live.accept().await.is_some() {}
        });
        let settings = Settings {
            connect_timeout: Duration::from_secs(2),
            keep_alive_interval: Duration::from_millis(200),
            keep_alive_timeout: Duration::from_millis(200),
        };
        let link = Link::new(connector(&Default::default(), Duration::from_secs(2)), target, settings);

        let first = tokio::time::timeout(Duration::from_secs(5), link.send(call())).await;
        let Err(err) = first.expect("the keep-alive gives the silent connection up") else {
            panic!("the silent upstream answered");
        };
        assert!(matches!(err, super::LinkError::Http2(_)), "{err:?}");

        let reply = tokio::time::timeout(Duration::from_secs(5), link.send(call())).await.unwrap().unwrap();
        let collected = reply.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), Bytes::from_static(&[0, 0, 0, 0, 0]));
        server.abort();
    }
}
