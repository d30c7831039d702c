//! Reading a request the sidecar must look into: gather its body (bounded), and keep the
//! original bytes to send upstream unchanged.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::error::ProxyError;
use super::grpc::{self, Gathered};

/// Gathers the whole request body of `method`. Refuses, before buffering more, a message
/// whose declared length is over `limit`.
pub async fn gather(method: &str, mut body: Incoming, limit: usize) -> Result<Bytes, ProxyError> {
    let too_large = |size: u64| ProxyError::TooLarge { method: method.to_owned(), size, limit };
    let mut gathered = Gathered::default();
    let mut expected = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ProxyError::ClientGone(crate::error_chain(&e)))?;
        // gRPC requests carry no trailers; anything but data is ignored.
        let Ok(data) = frame.into_data() else { continue };
        gathered.push(data, expected);
        if expected == 0
            && let Some(len) = grpc::declared_len(gathered.as_slice())
        {
            if len > limit {
                return Err(too_large(len as u64));
            }
            expected = len + grpc::HEADER_LEN;
        }
        if gathered.len() > limit + grpc::HEADER_LEN {
            return Err(too_large(gathered.len() as u64));
        }
    }
    if gathered.is_empty() {
        return Err(ProxyError::Malformed { method: method.to_owned(), reason: "empty request body".into() });
    }
    Ok(gathered.freeze())
}
