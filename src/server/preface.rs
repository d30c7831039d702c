//! A client connection's first bytes, read before hyper takes the connection.
//!
//! hyper's HTTP/2 server waits for the client's preface with no time limit, and its
//! keep-alive pings start only after it: a client that connects and says nothing would
//! hold one of the `--max-connections` slots until it closes. Reading the preface here,
//! under the handshake deadline, closes such connections; it also lets a client that
//! speaks the wrong protocol be told so, in its own protocol where that is possible.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Said to a client that sent an HTTP/1 request, such as a browser, curl or a load
/// balancer's HTTP health check, under a 505 status.
const HTTP1_ANSWER: &str = "milvus-sidecar serves gRPC over HTTP/2 only: point a Milvus SDK (pymilvus...) at this address. \
    For health checks, use the admin port's /healthz or /readyz.\n";

/// How long, at most, the rest of an HTTP/1 request is read after the answer, so that
/// closing with it unread does not reset the connection before the client reads the answer.
const HTTP1_LINGER: Duration = Duration::from_secs(1);

/// Why a connection was closed before it reached hyper.
#[derive(Debug, thiserror::Error)]
pub enum NotHttp2 {
    #[error("the client closed the connection before sending the HTTP/2 preface")]
    Closed,
    #[error("the client sent an HTTP/1 request; answered 505 (gRPC needs HTTP/2)")]
    Http1,
    #[error(
        "the client started a TLS handshake, but this listener is plaintext: give the sidecar --tls-cert and --tls-key, or connect without TLS"
    )]
    Tls,
    #[error("the client sent {0:?} where the HTTP/2 preface belongs")]
    Other(String),
    #[error("reading the HTTP/2 preface: {0}")]
    Io(#[from] io::Error),
}

/// Reads the client's HTTP/2 preface. The stream returned gives it again to whoever reads
/// it next, so hyper sees the connection from its first byte.
pub async fn read<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> Result<Prefaced<S>, NotHttp2> {
    let mut got = [0u8; PREFACE.len()];
    let mut len = 0;
    while len < PREFACE.len() {
        // Reads no further than the preface: what follows is hyper's to read.
        let n = stream.read(&mut got[len..]).await?;
        if n == 0 {
            return Err(NotHttp2::Closed);
        }
        len += n;
        // Judged on every read, so an HTTP/1 request shorter than the preface is answered
        // at once rather than when the deadline passes.
        if got[..len] != PREFACE[..len] {
            return Err(refuse(stream, &got[..len]).await);
        }
    }
    Ok(Prefaced { inner: stream, replayed: 0 })
}

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, got: &[u8]) -> NotHttp2 {
    match got[0] {
        // A TLS record of type handshake: a ClientHello.
        0x16 => NotHttp2::Tls,
        // HTTP/1 methods are upper-case tokens; "PRI" is one too, and the loop above only
        // gets here once the bytes part from it.
        b'A'..=b'Z' => {
            if let Err(e) = answer_http1(&mut stream).await {
                tracing::debug!(error = %e, "the 505 answer to an HTTP/1 client was not delivered");
            }
            NotHttp2::Http1
        }
        _ => NotHttp2::Other(String::from_utf8_lossy(got).into_owned()),
    }
}

async fn answer_http1<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> io::Result<()> {
    let answer = format!(
        "HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: text/plain; charset=utf-8\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{HTTP1_ANSWER}",
        HTTP1_ANSWER.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    let mut left = 64 << 10;
    let _ = tokio::time::timeout(HTTP1_LINGER, async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    })
    .await;
    Ok(())
}

/// A stream whose HTTP/2 preface was read and is given again to its next reader.
pub struct Prefaced<S> {
    inner: S,
    /// How much of the preface was given again; once all of it, reads go to `inner`.
    replayed: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefaced<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < PREFACE.len() {
            // The bytes read were checked to be the preface, so they are given from it.
            let rest = &PREFACE[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefaced<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    // h2 writes a frame's header and payload in one call where the stream takes vectors.
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The preface arriving a few bytes at a time, followed by the client's first frame:
    /// the reader gets all of it, in order, after `read` returns.
    #[tokio::test]
    async fn a_preface_in_pieces_is_read_and_given_again_whole() {
        let (mut client, server) = tokio::io::duplex(1024);
        let frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        let sent = tokio::spawn(async move {
            for piece in PREFACE.chunks(5) {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.write_all(frame).await.unwrap();
            client
        });
        let mut stream = read(server).await.expect("a whole preface is accepted");
        let mut seen = vec![0u8; PREFACE.len() + frame.len()];
        // Reads of 7 bytes: the preface is given across several reads too.
        for chunk in seen.chunks_mut(7) {
            stream.read_exact(chunk).await.unwrap();
        }
        assert_eq!(&seen[..PREFACE.len()], PREFACE);
        assert_eq!(&seen[PREFACE.len()..], frame);
        drop(sent.await.unwrap());
    }

    #[tokio::test]
    async fn a_short_http1_request_is_answered_505_without_waiting_for_more() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(5), read(server)).await.expect("judged at once");
        assert!(matches!(refused, Err(NotHttp2::Http1)), "{:?}", refused.err());
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 505 "), "{answer}");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
    }

    #[tokio::test]
    async fn a_tls_client_hello_and_other_bytes_are_named() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"\x16\x03\x01\x02\x00\x01").await.unwrap();
        assert!(matches!(read(server).await.err(), Some(NotHttp2::Tls)));

        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"\x00\x01junk").await.unwrap();
        let refused = read(server).await.err().expect("refused");
        assert!(refused.to_string().contains("\\0\\u{1}junk"), "{refused}");

        let (client, server) = tokio::io::duplex(1024);
        drop(client);
        assert!(matches!(read(server).await.err(), Some(NotHttp2::Closed)));
    }
}
