//! The sidecar's own reasons to answer a call itself, and the gRPC status each one gets.
//! Replies from Milvus are never rewritten; only these are composed here.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream Milvus at {upstream} is unavailable: {reason}")]
    UpstreamUnavailable { upstream: Arc<str>, reason: String },

    #[error("upstream Milvus at {upstream} did not answer within {after:?} ({limit})")]
    UpstreamTimeout { upstream: Arc<str>, after: Duration, limit: &'static str },

    #[error(
        "{method} message of {size} bytes exceeds the sidecar's limit of {limit} bytes \
         (--max-message-bytes / MILVUS_SIDECAR_MAX_MESSAGE_BYTES)"
    )]
    TooLarge { method: String, size: u64, limit: usize },

    #[error("the sidecar cannot read {encoding:?}-compressed messages; send them uncompressed or with gzip")]
    UnsupportedEncoding { encoding: String },

    #[error("{method}: request body is not a valid milvus.proto.milvus.{method}Request ({reason})")]
    Malformed { method: String, reason: String },

    #[error("the client went away before its request was complete: {0}")]
    ClientGone(String),

    #[error("the request was not complete within {after:?} ({limit}); nothing was sent to Milvus")]
    RequestTimeout { after: Duration, limit: &'static str },

    /// Milvus's own wording, so SDKs show the same message through the sidecar.
    #[error("{0}")]
    Unauthenticated(&'static str),

    #[error("{0}")]
    PermissionDenied(String),

    #[error("{0}")]
    AuthUnavailable(String),
}

impl From<crate::auth::authority::AuthError> for ProxyError {
    fn from(e: crate::auth::authority::AuthError) -> Self {
        use crate::auth::authority::AuthError;
        match e {
            AuthError::Unauthenticated(msg) => ProxyError::Unauthenticated(msg),
            AuthError::PermissionDenied(msg) => ProxyError::PermissionDenied(msg),
            AuthError::Unavailable(msg) => ProxyError::AuthUnavailable(msg),
        }
    }
}

impl ProxyError {
    /// Every variant names its code here; a new variant does not compile until it has one.
    pub fn code(&self) -> Code {
        match self {
            ProxyError::UpstreamUnavailable { .. } => Code::Unavailable,
            ProxyError::UpstreamTimeout { .. } => Code::DeadlineExceeded,
            ProxyError::TooLarge { .. } => Code::ResourceExhausted,
            ProxyError::UnsupportedEncoding { .. } => Code::Unimplemented,
            ProxyError::Malformed { .. } => Code::InvalidArgument,
            ProxyError::ClientGone(_) => Code::Cancelled,
            ProxyError::RequestTimeout { .. } => Code::DeadlineExceeded,
            ProxyError::Unauthenticated(_) => Code::Unauthenticated,
            ProxyError::PermissionDenied(_) => Code::PermissionDenied,
            ProxyError::AuthUnavailable(_) => Code::Unavailable,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code(), self.to_string())
    }
}
