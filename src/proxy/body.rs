//! The one body type the proxy sends in either direction.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use super::inspect::Streamed;
use super::observe::Observed;
use crate::record::Receipt;

/// Every variant is `Unpin`, so polling needs no pin projection.
#[derive(Default)]
pub enum Body {
    /// A reply the sidecar composed itself: status in headers, no body.
    #[default]
    Empty,
    /// A request the sidecar read whole to inspect; these are its original bytes.
    Full(Option<Bytes>),
    /// A request streamed through untouched; `seen` counts its bytes for the call's facts.
    Raw { inner: Incoming, seen: Arc<AtomicU64> },
    /// A request read up to its bulk, the rest streamed through while it is scanned.
    Streamed(Streamed),
    /// A reply streamed back to the client while it is being observed.
    Observed(Observed),
    /// A reply the sidecar composed or rewrote (a filtered listing): its message, then its
    /// trailers, which wait for `receipt` when there is one (durable recorder).
    Complete { data: Option<Bytes>, receipt: Option<Receipt>, trailers: Option<http::HeaderMap> },
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Raw { inner, seen } => {
                let polled = Pin::new(inner).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled
                    && let Some(data) = frame.data_ref()
                {
                    seen.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                polled.map_err(Into::into)
            }
            Body::Streamed(inner) => inner.poll_frame(cx),
            Body::Observed(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Body::Complete { data, receipt, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                if let Some(waiting) = receipt {
                    let durable = std::task::ready!(waiting.as_mut().poll(cx));
                    *receipt = None;
                    if let Err(e) = durable {
                        trailers.take();
                        return Poll::Ready(Some(Ok(super::observe::not_durable(e))));
                    }
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(data) => data.is_none(),
            Body::Raw { inner, .. } => inner.is_end_stream(),
            Body::Streamed(inner) => inner.is_end_stream(),
            Body::Observed(inner) => inner.is_end_stream(),
            Body::Complete { data, receipt, trailers } => data.is_none() && receipt.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Body::Raw { inner, .. } => inner.size_hint(),
            Body::Streamed(inner) => inner.size_hint(),
            Body::Observed(inner) => inner.size_hint(),
            Body::Complete { .. } => SizeHint::default(),
        }
    }
}
