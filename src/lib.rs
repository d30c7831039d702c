//! milvus-sidecar: a gRPC sidecar in front of a Milvus proxy that forwards every call
//! unchanged and accounts for each one (see DESIGN.md in the shared notes).

pub mod admin;
mod app;
pub mod auth;
pub mod busy_poll;
pub mod cli;
pub mod config;
pub mod facts;
pub mod milvus;
pub mod proxy;
pub mod readiness;
pub mod record;
mod server;
pub mod settings;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod tls;

pub use app::App;
pub use server::{Running, start};

/// Errors of bodies sent through hyper, which takes any error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Formats an error with its chain of causes, which is where hyper and tokio-postgres keep
/// the useful part ("client error (Connect)" alone says nothing; "Connection refused" does).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
