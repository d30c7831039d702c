//! Settings from flags and environment variables (flags win).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "milvus-sidecar", version, about = "A transparent gRPC sidecar for Milvus")]
pub struct Cli {
    /// Log line format.
    #[arg(long, env = "MILVUS_SIDECAR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Accept Milvus gRPC calls and forward them to the upstream Milvus proxy.
    Serve(Config),
}

/// Everything `serve` needs. Tests build it with [`Config::local`].
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address for Milvus SDK clients (gRPC over HTTP/2).
    #[arg(long, env = "MILVUS_SIDECAR_LISTEN", default_value = "0.0.0.0:19538")]
    pub listen: SocketAddr,

    /// The Milvus proxy every call is forwarded to.
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM", default_value = "http://127.0.0.1:19530", value_parser = parse_upstream)]
    pub upstream: http::Uri,

    /// Address of the health endpoints (`/healthz`, `/readyz`).
    #[arg(long, env = "MILVUS_SIDECAR_ADMIN_LISTEN", default_value = "0.0.0.0:9531")]
    pub admin_listen: SocketAddr,

    /// Largest gRPC message the sidecar reads into memory to inspect (bytes). Larger
    /// inspected calls are refused with RESOURCE_EXHAUSTED; calls that are not inspected
    /// stream through whatever their size.
    #[arg(long, env = "MILVUS_SIDECAR_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// How long to wait for a TCP connection to the upstream.
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Longest a call may wait for the upstream's reply headers when the client set no
    /// deadline of its own (`grpc-timeout`); unset means no limit, as with Milvus itself.
    #[arg(long, env = "MILVUS_SIDECAR_UPSTREAM_TIMEOUT", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Option<Duration>,

    /// On SIGTERM, how long in-flight calls may take to finish before they are cut.
    #[arg(long, env = "MILVUS_SIDECAR_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Tokio worker threads (0: one per CPU).
    #[arg(long, env = "MILVUS_SIDECAR_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

impl Config {
    /// Loopback listeners on free ports in front of `upstream`, other settings at their defaults.
    pub fn local(upstream: http::Uri) -> Self {
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        Config {
            listen: loopback,
            upstream,
            admin_listen: loopback,
            max_message_bytes: 256 * 1024 * 1024,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_timeout: None,
            drain_timeout: Duration::from_secs(30),
            worker_threads: 0,
        }
    }
}

fn parse_upstream(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(_)) => Ok(uri),
        (Some("https"), _) => Err("TLS to the upstream is not supported yet; use http://".into()),
        _ => Err(format!("expected http://HOST:PORT, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_must_be_plain_http_with_an_authority() {
        assert!(parse_upstream("http://milvus:19530").is_ok());
        assert!(parse_upstream("milvus:19530").is_err());
        assert!(parse_upstream("https://milvus:19530").is_err());
        assert!(parse_upstream("http:///x").is_err());
    }

    #[test]
    fn defaults_match_the_documented_ports() {
        let cli = Cli::try_parse_from(["milvus-sidecar", "serve"]).unwrap();
        let Command::Serve(cfg) = cli.command;
        assert_eq!(cfg.listen.port(), 19538);
        assert_eq!(cfg.admin_listen.port(), 9531);
        assert_eq!(cfg.upstream, "http://127.0.0.1:19530");
        assert_eq!(cfg.max_message_bytes, 268_435_456);
        assert_eq!(cfg.upstream_timeout, None);
    }
}
