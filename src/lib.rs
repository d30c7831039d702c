//! milvus-sidecar: a gRPC sidecar in front of a Milvus proxy that forwards every call
//! unchanged and accounts for each one (see DESIGN.md in the shared notes).

pub mod admin;
pub mod config;
pub mod facts;
pub mod milvus;
pub mod proxy;
pub mod record;
mod server;

pub use server::{Running, start};
