//! One write per burst of HTTP/2 frames on the upstream connection.
//!
//! h2 flushes its socket after every DATA frame it queues, and a streamed body's frames come
//! from the pipe task one turn at a time: a 4 MiB Insert left in 260 `writev`s, one per
//! 16 KiB frame (the frame size Milvus allows), each a segment the upstream wakes up for
//! (with hyper's client, a small Search also left in two, headers and body). This wrapper
//! keeps what is written up to [`CAPACITY`] and treats a flush after a write as a hint
//! only: it asks for the connection to be polled again, and writes when a flush comes with
//! nothing written since the last one, after [`MAX_DEFERRALS`] put-off flushes, or when
//! full. Every poll of the connection ends with a flush, so nothing waits more than a few
//! turns of the task; writes of `CAPACITY` or more go straight through, uncopied.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper::rt::{Read, ReadBufCursor, Write};

/// Bytes gathered before they are written without waiting for a flush.
pub const CAPACITY: usize = 64 << 10;

/// Flushes put off in a row before one goes through whatever is still being written: under
/// a steady load every turn of the connection writes something.
const MAX_DEFERRALS: u8 = 4;

pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` has gone out (a partial write).
    sent: usize,
    /// Flushes put off since the last write went out.
    deferrals: u8,
    /// Something was gathered since the last flush was put off.
    wrote: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Coalesce { inner, buf: Vec::new(), sent: 0, deferrals: 0, wrote: false }
    }
}

impl<T: Write + Unpin> Coalesce<T> {
    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        self.deferrals = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_gather(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.buf.len() + len > CAPACITY {
            ready!(self.poll_drain(cx))?;
        }
        if len >= CAPACITY {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(CAPACITY);
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        self.wrote = true;
        Poll::Ready(Ok(len))
    }
}

impl<T: Write + Unpin> Write for Coalesce<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_gather(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_gather(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if this.wrote && this.deferrals < MAX_DEFERRALS {
            // More frames may be queued in this turn or the next: come back once more.
            this.deferrals += 1;
            this.wrote = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: Read + Unpin> Read for Coalesce<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use super::*;

    /// A socket that records each write it is given, taking at most `limit` bytes at once.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        limit: Option<usize>,
        shut: bool,
    }

    impl Write for Socket {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = self.limit.map_or(buf.len(), |l| l.min(buf.len()));
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);
    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Harness {
        io: Coalesce<Socket>,
        wakes: Arc<Wakes>,
        waker: Waker,
    }

    impl Harness {
        fn new(socket: Socket) -> Self {
            let wakes = Arc::new(Wakes::default());
            Harness { io: Coalesce::new(socket), waker: Waker::from(wakes.clone()), wakes }
        }
        fn write(&mut self, bufs: &[&[u8]]) -> usize {
            let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
            match Pin::new(&mut self.io).poll_write_vectored(&mut Context::from_waker(&self.waker), &slices) {
                Poll::Ready(Ok(n)) => n,
                other => panic!("write: {other:?}"),
            }
        }
        fn flush(&mut self) {
            let flushed = Pin::new(&mut self.io).poll_flush(&mut Context::from_waker(&self.waker));
            assert!(matches!(flushed, Poll::Ready(Ok(()))), "flush: {flushed:?}");
        }
        fn writes(&self) -> Vec<Vec<u8>> {
            self.io.inner.writes.clone()
        }
        fn wakes(&self) -> usize {
            self.wakes.0.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn headers_and_body_flushed_in_two_turns_leave_in_one_write() {
        let mut h = Harness::new(Socket::default());
        assert_eq!(h.write(&[b"head", b"ers"]), 7);
        h.flush();
        assert!(h.writes().is_empty(), "the first flush after a write is put off");
        assert_eq!(h.wakes(), 1, "and the connection is asked to come back");
        h.write(&[b"body"]);
        h.flush();
        assert!(h.writes().is_empty(), "something new was written: put off again");
        h.flush();
        assert_eq!(h.writes(), vec![b"headersbody".to_vec()], "a flush with nothing new writes all at once");
        assert_eq!(h.wakes(), 2);
        h.flush();
        assert_eq!(h.writes().len(), 1, "nothing left to write");
    }

    #[test]
    fn a_steady_stream_of_writes_still_goes_out_after_a_few_flushes() {
        let mut h = Harness::new(Socket::default());
        for i in 0..=MAX_DEFERRALS {
            h.write(&[&[i]]);
            h.flush();
        }
        let expected: Vec<u8> = (0..=MAX_DEFERRALS).collect();
        assert_eq!(h.writes(), vec![expected]);
    }

    #[test]
    fn a_full_buffer_goes_out_and_large_writes_pass_through_uncopied() {
        let mut h = Harness::new(Socket::default());
        let frame = vec![7u8; CAPACITY / 4 + 9];
        for _ in 0..4 {
            h.write(&[&frame]);
        }
        assert_eq!(h.writes().len(), 1, "the fourth frame did not fit: the first three went out");
        assert_eq!(h.writes()[0].len(), 3 * frame.len());
        let large = vec![1u8; CAPACITY];
        assert_eq!(h.write(&[&large]), CAPACITY);
        let writes = h.writes();
        assert_eq!(writes.len(), 3, "what was gathered goes first, then the large write as it came");
        assert_eq!(writes[1].len(), frame.len());
        assert_eq!(writes[2], large);
    }

    #[test]
    fn partial_writes_and_shutdown_lose_nothing() {
        let mut h = Harness::new(Socket { limit: Some(3), ..Default::default() });
        h.write(&[b"abcdefgh"]);
        h.flush();
        h.flush();
        assert_eq!(h.writes().concat(), b"abcdefgh");
        h.write(&[b"tail"]);
        let shut = Pin::new(&mut h.io).poll_shutdown(&mut Context::from_waker(&h.waker));
        assert!(matches!(shut, Poll::Ready(Ok(()))));
        assert_eq!(h.writes().concat(), b"abcdefghtail", "shutdown writes what was gathered first");
        assert!(h.io.inner.shut);
    }
}
