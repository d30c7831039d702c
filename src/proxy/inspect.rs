//! Reading a request the sidecar must look into, and sending its original bytes upstream.
//!
//! Most inspected requests are small and read whole. An insert's rows are bulk the
//! sidecar never reads: it reads the insert up to its first row field, decides on it, and
//! streams the rest through ([`Streamed`]) while scanning the fields after the rows. The
//! bytes that complete the message are held back until that scan agrees with what was
//! authorized, so Milvus never holds a whole message the sidecar would have refused.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::error::ProxyError;
use super::grpc::{self, Gathered};
use super::scan::Scan;

/// What was read of a request before deciding on it.
pub enum Head {
    /// The whole body.
    Whole(Bytes),
    /// A message read up to a field it passes over; the rest has yet to arrive.
    Streaming(Streaming),
}

pub struct Streaming {
    read: Gathered,
    rest: Incoming,
    scan: Scan,
    /// The whole body's size, from the message's declared length.
    expected: usize,
}

/// Reads `method`'s request body: whole, or (for an uncompressed message with fields in
/// `bulky`) until the first bulky field that has not fully arrived. Refuses, before
/// buffering more, a message whose declared length is over `limit`.
pub async fn read(method: &str, mut body: Incoming, limit: usize, bulky: &'static [u32]) -> Result<Head, ProxyError> {
    let mut gathered = Gathered::default();
    let mut expected = 0;
    let mut scan: Option<Scan> = None;
    while let Some(data) = next_data(&mut body).await? {
        if let Some(scan) = scan.as_mut() {
            scan.feed(&data).map_err(|e| malformed(method, &e))?;
        }
        // A streamed message keeps only its start here: no room for the whole of it.
        gathered.push(data, if scan.is_some() { 0 } else { expected });
        if expected == 0
            && let Some(len) = grpc::declared_len(gathered.as_slice())
        {
            if len > limit {
                return Err(too_large(method, len, limit));
            }
            expected = len + grpc::HEADER_LEN;
            if !bulky.is_empty() && gathered.as_slice()[0] == 0 {
                let mut fresh = Scan::new(len, bulky);
                fresh.feed(&gathered.as_slice()[grpc::HEADER_LEN..]).map_err(|e| malformed(method, &e))?;
                scan = Some(fresh);
            }
        }
        if gathered.len() > limit + grpc::HEADER_LEN {
            return Err(too_large(method, gathered.len(), limit));
        }
        if let Some(waiting) = scan.take_if(|s| !s.is_done() && s.is_skipping()) {
            return Ok(Head::Streaming(Streaming { read: gathered, rest: body, scan: waiting, expected }));
        }
    }
    if gathered.is_empty() {
        return Err(ProxyError::Malformed { method: method.to_owned(), reason: "empty request body".into() });
    }
    Ok(Head::Whole(gathered.freeze()))
}

impl Streaming {
    /// The fields read so far, bulky ones left out: a message a view can read.
    pub fn sketch(&self) -> &[u8] {
        self.scan.sketch()
    }

    /// Reads the rest of the body too, for when a decision needs the whole message.
    pub async fn into_whole(self, method: &str, limit: usize) -> Result<Bytes, ProxyError> {
        let Streaming { mut read, mut rest, expected, .. } = self;
        while let Some(data) = next_data(&mut rest).await? {
            read.push(data, expected);
            if read.len() > limit + grpc::HEADER_LEN {
                return Err(too_large(method, read.len(), limit));
            }
        }
        Ok(read.freeze())
    }

    /// The body to send upstream: what was read, then the rest as it arrives. `check`
    /// judges the complete sketch before the bytes completing the message go out.
    pub fn forward(self, method: &str, limit: usize, check: Option<Check>) -> (Streamed, Arc<ScanResult>) {
        let result = Arc::new(ScanResult::default());
        let seen = self.read.len();
        let streamed = Streamed {
            read: Some(self.read.freeze()),
            rest: self.rest,
            scan: Some(self.scan),
            seen,
            limit,
            method: method.to_owned(),
            check,
            result: result.clone(),
        };
        (streamed, result)
    }
}

/// Says whether a complete sketch may go to Milvus; Err is why not.
pub type Check = Box<dyn Fn(&[u8]) -> Result<(), ProxyError> + Send + Sync>;

/// How a streamed request ended: its complete sketch and size, or why the sidecar broke
/// it off (Milvus then never received a complete message).
#[derive(Default)]
pub struct ScanResult(OnceLock<Result<Scanned, ProxyError>>);

pub struct Scanned {
    pub sketch: Vec<u8>,
    pub bytes: u64,
}

impl ScanResult {
    pub fn get(&self) -> Option<&Result<Scanned, ProxyError>> {
        self.0.get()
    }

    /// Why the sidecar broke the request off, if it did.
    pub fn refusal(&self) -> Option<ProxyError> {
        match self.0.get() {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }
}

/// A request body streamed upstream while its message is scanned.
pub struct Streamed {
    /// What was read before deciding, sent first.
    read: Option<Bytes>,
    rest: Incoming,
    /// Until the message is complete.
    scan: Option<Scan>,
    seen: usize,
    limit: usize,
    method: String,
    check: Option<Check>,
    result: Arc<ScanResult>,
}

#[derive(Debug)]
pub struct BrokenOff(pub String);

impl std::fmt::Display for BrokenOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BrokenOff {}

type Polled = Poll<Option<Result<Frame<Bytes>, crate::BoxError>>>;

impl Streamed {
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Polled {
        if let Some(chunk) = self.read.take() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let frame = match ready!(Pin::new(&mut self.rest).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return self.break_off(ProxyError::ClientGone(crate::error_chain(&e))),
            None if self.scan.is_some() => {
                let reason = "the request ended before its message was complete".to_owned();
                return self.break_off(ProxyError::Malformed { method: self.method.clone(), reason });
            }
            None => return Poll::Ready(None),
        };
        let Some(data) = frame.data_ref() else { return Poll::Ready(Some(Ok(frame))) };
        self.seen += data.len();
        if self.seen > self.limit + grpc::HEADER_LEN {
            let refusal =
                ProxyError::TooLarge { method: self.method.clone(), size: self.seen as u64, limit: self.limit };
            return self.break_off(refusal);
        }
        if let Some(scan) = self.scan.as_mut() {
            if let Err(e) = scan.feed(data) {
                return self.break_off(malformed(&self.method, &e));
            }
            if scan.is_done() {
                let sketch = self.scan.take().expect("checked above").into_sketch();
                if let Some(Err(refusal)) = self.check.as_ref().map(|check| check(&sketch)) {
                    return self.break_off(refusal);
                }
                let _ = self.result.0.set(Ok(Scanned { sketch, bytes: self.seen as u64 }));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    /// Ends the upstream request with an error (the pipe in `link.rs` resets the stream),
    /// keeping why.
    fn break_off(&mut self, why: ProxyError) -> Polled {
        self.scan = None;
        let message = why.to_string();
        let _ = self.result.0.set(Err(why));
        Poll::Ready(Some(Err(Box::new(BrokenOff(message)))))
    }

    pub fn is_end_stream(&self) -> bool {
        self.read.is_none() && self.scan.is_none() && self.rest.is_end_stream()
    }

    pub fn size_hint(&self) -> SizeHint {
        let read = self.read.as_ref().map_or(0, Bytes::len);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + read as u64);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + read as u64);
        }
        hint
    }
}

fn malformed(method: &str, e: &super::scan::Malformed) -> ProxyError {
    ProxyError::Malformed { method: method.to_owned(), reason: e.to_string() }
}

/// The next data chunk of a request body. gRPC requests carry no trailers; anything but
/// data is passed over.
async fn next_data(body: &mut Incoming) -> Result<Option<Bytes>, ProxyError> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ProxyError::ClientGone(crate::error_chain(&e)))?;
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

fn too_large(method: &str, size: usize, limit: usize) -> ProxyError {
    ProxyError::TooLarge { method: method.to_owned(), size: size as u64, limit }
}
