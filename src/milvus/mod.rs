//! What the sidecar knows about Milvus: which RPCs it looks into, and how to read them.

pub mod access;
mod catalogue;
pub mod headers;
pub mod views;
pub mod wire;

pub use catalogue::{Reply, Request, Rpc, SERVICE_PREFIX};
