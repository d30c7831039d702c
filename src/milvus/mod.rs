//! What the sidecar knows about Milvus: which RPCs it looks into, and how to read them.

mod catalogue;
pub mod views;

pub use catalogue::{Reply, Request, Rpc, SERVICE_PREFIX};
