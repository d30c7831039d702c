//! TLS on both sides of the sidecar: the client listener (certificate and key from files,
//! reloaded when they change; optional client certificates) and an `https://` upstream.
//! rustls with the ring provider, named explicitly so a second provider linked in by some
//! other crate can never make the choice ambiguous.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::watch;

use crate::config::{TlsArgs, UpstreamTlsArgs};

/// TLS 1.3 and 1.2; nothing older.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---- the client listener ----

/// The listener's TLS settings. The current `ServerConfig` is read once per connection
/// (never per request) and replaced whole when the files change.
pub struct ServerTls {
    files: Files,
    current: RwLock<Arc<ServerConfig>>,
}

#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl Files {
    fn all(&self) -> impl Iterator<Item = &Path> {
        [self.cert.as_path(), self.key.as_path()].into_iter().chain(self.client_ca.as_deref())
    }

    /// What tells a changed file from the one loaded: modification time and size of each.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.all().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
    }
}

impl ServerTls {
    /// Loads the certificate, key and (optional) client CA named by `args`; None when no
    /// certificate is configured.
    pub fn load(args: &TlsArgs) -> anyhow::Result<Option<Arc<ServerTls>>> {
        let (cert, key) = match (&args.tls_cert, &args.tls_key) {
            (None, None) => {
                anyhow::ensure!(args.tls_client_ca.is_none(), "--tls-client-ca needs --tls-cert and --tls-key");
                return Ok(None);
            }
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            (Some(_), None) => anyhow::bail!("--tls-cert needs --tls-key (MILVUS_SIDECAR_TLS_KEY) too"),
            (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert (MILVUS_SIDECAR_TLS_CERT) too"),
        };
        let files = Files { cert, key, client_ca: args.tls_client_ca.clone() };
        let config = server_config(&files)?;
        Ok(Some(Arc::new(ServerTls { files, current: RwLock::new(Arc::new(config)) })))
    }

    /// The configuration a new connection is accepted with.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    pub fn describe(&self) -> String {
        let mut out = format!("certificate {}, key {}", self.files.cert.display(), self.files.key.display());
        match &self.files.client_ca {
            Some(ca) => out.push_str(&format!(", client certificates required (CA {})", ca.display())),
            None => out.push_str(", no client certificates"),
        }
        out
    }

    /// Every `every`, looks at the files' modification times and sizes; when one changed,
    /// loads them again and swaps the configuration in. A file that does not load is logged
    /// and the configuration in use stays (connections keep being accepted with it).
    pub fn watch(self: Arc<Self>, every: Duration, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut seen = self.files.stamp();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let now = self.files.stamp();
                if now == seen {
                    continue;
                }
                // Remembered even when loading fails: the error is logged once per change,
                // and the next write (the fix) is seen as a change again.
                seen = now;
                match server_config(&self.files) {
                    Ok(config) => {
                        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(config);
                        tracing::info!(files = %self.describe(), "TLS certificate reloaded; new connections use it");
                    }
                    Err(e) => tracing::error!(
                        error = %format!("{e:#}"),
                        "TLS files changed but do not load; still serving with the previous certificate"
                    ),
                }
            }
        })
    }
}

fn server_config(files: &Files) -> anyhow::Result<ServerConfig> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .with_context(|| format!("no private key in {}", files.key.display()))?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(VERSIONS)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = Arc::new(root_store(&read_certs(ca)?, ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .with_context(|| format!("client CA {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .with_context(|| format!("certificate {} with key {}", files.cert.display(), files.key.display()))?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate (BEGIN CERTIFICATE) in {}", path.display());
    Ok(certs)
}

fn root_store(certs: &[CertificateDer<'static>], path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).with_context(|| format!("a CA certificate in {} is not usable", path.display()))?;
    }
    Ok(roots)
}

// ---- the upstream ----

/// CA certificates read from a file when the arguments are parsed, so that a bad file
/// stops the sidecar before it starts.
#[derive(Debug, Clone)]
pub struct CaFile {
    pub path: PathBuf,
    pub roots: Arc<RootCertStore>,
}

pub fn parse_ca_file(s: &str) -> Result<CaFile, String> {
    let path = PathBuf::from(s);
    let certs = read_certs(&path).map_err(|e| format!("{e:#}"))?;
    let roots = root_store(&certs, &path).map_err(|e| format!("{e:#}"))?;
    Ok(CaFile { path, roots: Arc::new(roots) })
}

pub fn parse_server_name(s: &str) -> Result<String, String> {
    ServerName::try_from(s).map_err(|e| format!("not a DNS name or IP address: {e}"))?;
    Ok(s.to_owned())
}

/// The client side towards an `https://` upstream: its CA file, else the public web roots.
/// ALPN (h2) is set by the connector.
pub fn upstream_client_config(args: &UpstreamTlsArgs) -> ClientConfig {
    let roots = match &args.upstream_tls_ca {
        Some(ca) => ca.roots.clone(),
        None => Arc::new(RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }),
    };
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_and_bad_ca_files_are_refused_when_parsed() {
        assert!(parse_server_name("milvus.internal").is_ok());
        assert!(parse_server_name("10.0.0.1").is_ok());
        assert!(parse_server_name("not a name").is_err());
        let err = parse_ca_file("/nonexistent/ca.pem").unwrap_err();
        assert!(err.contains("cannot read /nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn key_without_certificate_is_refused() {
        let args = TlsArgs { tls_key: Some("k.pem".into()), ..TlsArgs::default() };
        let err = ServerTls::load(&args).err().unwrap();
        assert!(err.to_string().contains("--tls-key needs --tls-cert"), "{err}");
        assert!(ServerTls::load(&TlsArgs::default()).unwrap().is_none());
    }
}
