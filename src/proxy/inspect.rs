//! Reading an inspected call's request: gather its body (bounded), read the message
//! through its view, and keep the original bytes to send upstream unchanged.

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::error::ProxyError;
use super::grpc::{self, Gathered};
use crate::facts::RequestFacts;
use crate::milvus::{Rpc, views};

/// Gathers the whole request body of `rpc` and reads it. Refuses, before buffering
/// more, a message whose declared length is over `limit`.
pub async fn read_request(
    rpc: Rpc,
    headers: &HeaderMap,
    mut body: Incoming,
    limit: usize,
) -> Result<(Bytes, RequestFacts), ProxyError> {
    let method = rpc.name();
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
                return Err(ProxyError::TooLarge { method, size: len as u64, limit });
            }
            expected = len + grpc::HEADER_LEN;
        }
        if gathered.len() > limit + grpc::HEADER_LEN {
            return Err(ProxyError::TooLarge { method, size: gathered.len() as u64, limit });
        }
    }
    if gathered.is_empty() {
        return Err(ProxyError::Malformed { method, reason: "empty request body".into() });
    }
    let message = grpc::first_message(gathered.as_slice(), headers.get("grpc-encoding"), limit)
        .map_err(|e| e.into_proxy_error(method, limit))?;
    let facts = views::read_request(rpc.request(), &message)
        .map_err(|e| ProxyError::Malformed { method, reason: e.to_string() })?;
    drop(message);
    Ok((gathered.freeze(), facts))
}
