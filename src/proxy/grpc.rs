//! gRPC-over-HTTP/2 details the proxy needs: message framing, compression, deadlines,
//! statuses in headers and trailers.

use std::borrow::Cow;
use std::io::Read;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use tonic::Code;

use super::error::ProxyError;
use crate::facts::Outcome;

pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_STATUS_DETAILS_BIN: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// Length-prefixed message header: 1 byte compressed flag, 4 bytes big-endian length.
pub const HEADER_LEN: usize = 5;

/// The declared length of the message starting at `buf`, once its header is complete.
pub fn declared_len(buf: &[u8]) -> Option<usize> {
    let header: [u8; 4] = buf.get(1..HEADER_LEN)?.try_into().ok()?;
    Some(u32::from_be_bytes(header) as usize)
}

/// `message` as one uncompressed length-prefixed message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(HEADER_LEN + message.len());
    framed.extend_from_slice(&[0]);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed.freeze()
}

/// The first message of a gRPC body, decompressed if it was compressed.
pub fn first_message<'a>(
    body: &'a [u8],
    encoding: Option<&HeaderValue>,
    limit: usize,
) -> Result<Cow<'a, [u8]>, MessageError> {
    let len = declared_len(body).ok_or(MessageError::Truncated)?;
    let payload = body.get(HEADER_LEN..HEADER_LEN + len).ok_or(MessageError::Truncated)?;
    if body[0] == 0 {
        return Ok(Cow::Borrowed(payload));
    }
    match encoding.map(HeaderValue::as_bytes) {
        Some(b"gzip") => {
            let mut out = Vec::with_capacity(len.saturating_mul(2).min(limit));
            // Read one byte past the limit to tell "exactly at the limit" from "over it".
            flate2::read::GzDecoder::new(payload)
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| MessageError::Corrupt(format!("gzip: {e}")))?;
            if out.len() > limit {
                return Err(MessageError::TooLarge);
            }
            Ok(Cow::Owned(out))
        }
        Some(other) if other != b"identity" => {
            Err(MessageError::Unsupported(String::from_utf8_lossy(other).into_owned()))
        }
        _ => Err(MessageError::Corrupt("compressed flag set without a grpc-encoding".into())),
    }
}

#[derive(Debug, PartialEq)]
pub enum MessageError {
    Truncated,
    TooLarge,
    Unsupported(String),
    Corrupt(String),
}

impl MessageError {
    pub fn into_proxy_error(self, method: &str, limit: usize) -> ProxyError {
        let method = method.to_owned();
        match self {
            MessageError::Truncated => ProxyError::Malformed { method, reason: "truncated gRPC message".into() },
            MessageError::TooLarge => ProxyError::TooLarge { method, size: limit as u64 + 1, limit },
            MessageError::Unsupported(encoding) => ProxyError::UnsupportedEncoding { encoding },
            MessageError::Corrupt(reason) => ProxyError::Malformed { method, reason },
        }
    }
}

/// Gathers the chunks of a body, copying only when there is more than one.
#[derive(Debug, Default)]
pub enum Gathered {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Gathered {
    /// `expected` is the whole body's size when known, to allocate once.
    pub fn push(&mut self, chunk: Bytes, expected: usize) {
        // Clients may end a stream with an empty DATA frame (tonic does, after every
        // request): it must not turn one chunk into a copy.
        if chunk.is_empty() {
            return;
        }
        *self = match std::mem::take(self) {
            Gathered::Empty => Gathered::One(chunk),
            Gathered::One(first) => {
                let mut all = BytesMut::with_capacity(expected.max(first.len() + chunk.len()));
                all.extend_from_slice(&first);
                all.extend_from_slice(&chunk);
                Gathered::Many(all)
            }
            Gathered::Many(mut all) => {
                all.extend_from_slice(&chunk);
                Gathered::Many(all)
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Gathered::Empty => 0,
            Gathered::One(b) => b.len(),
            Gathered::Many(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            Gathered::Empty => &[],
            Gathered::One(b) => b,
            Gathered::Many(b) => b,
        }
    }

    pub fn freeze(self) -> Bytes {
        match self {
            Gathered::Empty => Bytes::new(),
            Gathered::One(b) => b,
            Gathered::Many(b) => b.freeze(),
        }
    }
}

/// The client's deadline from `grpc-timeout` (`<digits><unit>`, unit one of H M S m u n).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `d` (milliseconds; at most 8 digits, as the spec allows).
/// Every capped Search asks for the same value (`max_query_timeout`), so the last one made
/// on this thread is kept: a copy of it is a reference count, where making it is a format
/// and two allocations.
pub fn timeout_header(d: Duration) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Duration, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((made_for, value)) if *made_for == d => value.clone(),
        _ => {
            let ms = d.as_millis().min(99_999_999);
            let value = HeaderValue::from_str(&format!("{ms}m")).expect("digits and a unit are a valid header value");
            *last = Some((d, value.clone()));
            value
        }
    })
}

/// The gRPC status in a header block (trailers, or the headers of a trailers-only reply).
/// Parses the (percent-encoded) message only when the status is not OK.
pub fn outcome_in(headers: &HeaderMap) -> Option<Outcome> {
    let code = headers.get(GRPC_STATUS)?;
    if code.as_bytes() == b"0" {
        return Some(Outcome::default());
    }
    let status = tonic::Status::from_header_map(headers)?;
    Some(Outcome::grpc(status.code(), status.message()))
}

/// What a gRPC client makes of a non-200 HTTP reply (the gRPC HTTP/2 mapping).
pub fn code_for_http(status: http::StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn plain_message_is_borrowed_from_the_body() {
        let body = frame(0, b"hello");
        let msg = first_message(&body, None, 100).unwrap();
        assert!(matches!(msg, Cow::Borrowed(b"hello")));
    }

    #[test]
    fn gzip_message_is_decompressed_within_the_limit() {
        let body = frame(1, &gzip(&[7u8; 1000]));
        let gz = HeaderValue::from_static("gzip");
        assert_eq!(first_message(&body, Some(&gz), 1000).unwrap().len(), 1000);
        assert_eq!(first_message(&body, Some(&gz), 999), Err(MessageError::TooLarge));
    }

    #[test]
    fn unknown_encodings_and_short_bodies_are_refused() {
        let body = frame(1, b"xx");
        let zstd = HeaderValue::from_static("zstd");
        assert_eq!(first_message(&body, Some(&zstd), 10), Err(MessageError::Unsupported("zstd".into())));
        assert_eq!(first_message(&body[..4], None, 10), Err(MessageError::Truncated));
        assert_eq!(first_message(&frame(0, b"abc")[..6], None, 10), Err(MessageError::Truncated));
    }

    #[test]
    fn gathered_copies_only_when_split() {
        let mut g = Gathered::default();
        g.push(Bytes::from_static(b"ab"), 4);
        assert!(matches!(g, Gathered::One(_)));
        g.push(Bytes::from_static(b"cd"), 4);
        assert_eq!(g.as_slice(), b"abcd");
        assert_eq!(g.freeze(), Bytes::from_static(b"abcd"));
    }

    #[test]
    fn an_empty_chunk_after_the_body_copies_nothing() {
        let body = Bytes::from(vec![7u8; 3000]);
        let mut g = Gathered::default();
        g.push(body.clone(), 3000);
        g.push(Bytes::new(), 3000);
        assert!(matches!(g, Gathered::One(_)));
        assert_eq!(g.freeze().as_ptr(), body.as_ptr(), "the body's own buffer, not a copy");

        let mut g = Gathered::default();
        g.push(Bytes::new(), 0);
        assert!(g.is_empty());
        g.push(body.clone(), 3000);
        assert_eq!(g.freeze().as_ptr(), body.as_ptr());
    }

    #[test]
    fn grpc_timeout_units() {
        let mut h = HeaderMap::new();
        for (v, d) in
            [("5S", Duration::from_secs(5)), ("250m", Duration::from_millis(250)), ("2M", Duration::from_secs(120))]
        {
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            assert_eq!(timeout(&h), Some(d), "{v}");
        }
        h.insert("grpc-timeout", HeaderValue::from_static("5x"));
        assert_eq!(timeout(&h), None);
        h.insert("grpc-timeout", HeaderValue::from_static("1234567890S"));
        assert_eq!(timeout(&h), None, "more than 8 digits is invalid");
    }

    #[test]
    fn a_timeout_value_kept_for_reuse_follows_a_changed_cap() {
        assert_eq!(timeout_header(Duration::from_secs(300)), "300000m");
        assert_eq!(timeout_header(Duration::from_secs(300)), "300000m");
        assert_eq!(timeout_header(Duration::from_millis(2500)), "2500m");
        assert_eq!(timeout_header(Duration::from_secs(1_000_000)), "99999999m", "at most 8 digits");
        assert_eq!(timeout_header(Duration::from_secs(300)), "300000m");
    }

    #[test]
    fn status_headers_become_outcomes() {
        let mut h = HeaderMap::new();
        assert_eq!(outcome_in(&h), None);
        h.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(outcome_in(&h).unwrap().is_success());
        h.insert("grpc-status", HeaderValue::from_static("7"));
        h.insert("grpc-message", HeaderValue::from_static("PrivilegeSearch%3A%20permission%20deny"));
        let o = outcome_in(&h).unwrap();
        assert_eq!(o.grpc, Code::PermissionDenied);
        assert_eq!(o.message.as_deref(), Some("PrivilegeSearch: permission deny"));
    }
}
