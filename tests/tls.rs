//! TLS on the client listener (trust, mutual TLS, certificate reload), the refusal to serve
//! plaintext on a network address, and TLS towards an `https://` upstream.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::certs::{Ca, Leaf, temp_dir, write};
use common::fake::FakeUpstream;
use common::{RawCodec, Sidecar, at_least, http_get, path, sample};
use milvus_sidecar::config::Config;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The listener's files, in a directory of the test's own.
struct Files {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new(tag: &str, leaf: &Leaf) -> Files {
        let dir = temp_dir(tag);
        let cert = write(&dir, "server.pem", &leaf.cert);
        let key = write(&dir, "server.key", &leaf.key);
        Files { dir, cert, key }
    }

    fn serve(&self, config: &mut Config) {
        config.tls.tls_cert = Some(self.cert.clone());
        config.tls.tls_key = Some(self.key.clone());
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One Echo call over TLS to the sidecar at `addr`, trusting `ca` (none: no roots at all),
/// presenting `identity` if given. Err is the connect or the call failure, as text.
async fn echo_over_tls(addr: SocketAddr, ca: Option<&str>, identity: Option<&Leaf>) -> Result<Bytes, String> {
    let mut tls = ClientTlsConfig::new().domain_name("localhost");
    if let Some(ca) = ca {
        tls = tls.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    let endpoint =
        Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).map_err(|e| e.to_string())?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {}", milvus_sidecar::error_chain(&e)))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| format!("ready: {e}"))?;
    let body = Bytes::from_static(b"\x0a\x02hi");
    let reply = grpc
        .unary(tonic::Request::new(body), path("Echo"), RawCodec)
        .await
        .map_err(|s| format!("call: {:?} {}", s.code(), s.message()))?;
    Ok(reply.into_inner())
}

#[tokio::test]
async fn a_client_trusting_the_ca_gets_through_and_one_without_it_is_refused() {
    let upstream = FakeUpstream::start().await;
    let ca = Ca::new("test CA");
    let files = Files::new("tls-trust", &ca.server());
    let sidecar = Sidecar::start_with(upstream.addr, |c| files.serve(c)).await;

    let echoed = echo_over_tls(sidecar.addr(), Some(&ca.pem), None).await.expect("TLS call with the CA");
    assert_eq!(&echoed[..], b"\x0a\x02hi");
    assert_eq!(upstream.count("Echo"), 1);

    let err = echo_over_tls(sidecar.addr(), None, None).await.unwrap_err();
    assert!(err.contains("connect") || err.contains("Unavailable"), "refused without the CA: {err}");
    let other = Ca::new("another CA");
    let err = echo_over_tls(sidecar.addr(), Some(&other.pem), None).await.unwrap_err();
    assert!(err.contains("connect") || err.contains("Unavailable"), "refused with the wrong CA: {err}");

    // A plaintext HTTP/2 client is not served either.
    let plain = Channel::from_shared(format!("http://{}", sidecar.addr())).unwrap().connect().await;
    if let Ok(channel) = plain {
        let mut grpc = tonic::client::Grpc::new(channel);
        let call = async {
            grpc.ready().await.map_err(|e| e.to_string())?;
            grpc.unary(tonic::Request::new(Bytes::new()), path("Echo"), RawCodec).await.map_err(|e| e.to_string())
        };
        assert!(call.await.is_err(), "plaintext call on the TLS listener must fail");
    }
    assert_eq!(upstream.count("Echo"), 1, "refused clients reach nothing");
    // Two clients without the right CA and one without TLS.
    let series = r#"milvus_sidecar_client_connections_unserved_total{reason="tls_refused"}"#;
    at_least(sidecar.running.admin_addr, series, 3.0).await;
}

#[tokio::test]
async fn a_tls_client_that_sends_no_preface_is_closed_at_the_handshake_timeout() {
    let upstream = FakeUpstream::start().await;
    let ca = Ca::new("test CA");
    let files = Files::new("tls-silent", &ca.server());
    let sidecar = Sidecar::start_with(upstream.addr, |c| {
        files.serve(c);
        c.limits.handshake_timeout = Duration::from_millis(500);
    })
    .await;

    // As a TCP health check does: connect, then close having sent nothing.
    drop(tokio::net::TcpStream::connect(sidecar.addr()).await.unwrap());
    let admin = sidecar.running.admin_addr;
    let unserved = |reason: &str| format!(r#"milvus_sidecar_client_connections_unserved_total{{reason="{reason}"}}"#);
    at_least(admin, &unserved("closed"), 1.0).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(sidecar.addr()).await.unwrap();
    let started = Instant::now();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the TLS handshake itself succeeds");
    // The handshake done, the client says nothing more: the deadline still runs.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut tls, &mut byte))
        .await
        .expect("closed by the sidecar");
    let took = started.elapsed();
    assert!(matches!(read, Ok(0) | Err(_)), "closed without a byte of HTTP/2: {read:?}");
    assert!(took >= Duration::from_millis(400), "closed at the deadline, not before: {took:?}");

    let echoed = echo_over_tls(sidecar.addr(), Some(&ca.pem), None).await.expect("a TLS client that speaks is served");
    assert_eq!(&echoed[..], b"\x0a\x02hi");
    assert_eq!(at_least(admin, &unserved("handshake_timeout"), 1.0).await, 1.0);
    let scrape = http_get(admin, "/metrics").await.1;
    assert_eq!(sample(&scrape, &unserved("tls_refused")), 0.0, "{scrape}");
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let upstream = FakeUpstream::start().await;
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = Files::new("tls-mutual", &ca.server());
    let client_ca_file = write(&files.dir, "clients.pem", &client_ca.pem);
    let sidecar = Sidecar::start_with(upstream.addr, |c| {
        files.serve(c);
        c.tls.tls_client_ca = Some(client_ca_file.clone());
    })
    .await;

    let err = echo_over_tls(sidecar.addr(), Some(&ca.pem), None).await.unwrap_err();
    assert!(!err.is_empty());
    let stranger = Ca::new("unknown CA").client();
    echo_over_tls(sidecar.addr(), Some(&ca.pem), Some(&stranger)).await.unwrap_err();
    assert_eq!(upstream.count("Echo"), 0, "no call without a trusted client certificate");

    let echoed = echo_over_tls(sidecar.addr(), Some(&ca.pem), Some(&client_ca.client())).await;
    assert_eq!(&echoed.expect("a client certificate from the CA is accepted")[..], b"\x0a\x02hi");
}

#[tokio::test]
async fn a_changed_certificate_is_used_for_new_connections_and_a_bad_one_is_ignored() {
    let upstream = FakeUpstream::start().await;
    let first = Ca::new("first CA");
    let files = Files::new("tls-reload", &first.server());
    let sidecar = Sidecar::start_with(upstream.addr, |c| {
        files.serve(c);
        c.tls.tls_reload_interval = Duration::from_millis(50);
    })
    .await;
    echo_over_tls(sidecar.addr(), Some(&first.pem), None).await.expect("first certificate");

    let second = Ca::new("second CA");
    let leaf = second.server();
    std::fs::write(&files.key, &leaf.key).unwrap();
    std::fs::write(&files.cert, &leaf.cert).unwrap();
    wait_until(|| async { echo_over_tls(sidecar.addr(), Some(&second.pem), None).await.is_ok() }).await;
    echo_over_tls(sidecar.addr(), Some(&first.pem), None).await.expect_err("the old certificate is gone");

    // A broken file is logged and ignored: the second certificate stays in use.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo_over_tls(sidecar.addr(), Some(&second.pem), None).await.expect("still the second certificate");
}

async fn wait_until<F: std::future::Future<Output = bool>>(check: impl Fn() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "not reloaded within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn plaintext_on_a_network_address_needs_to_be_asked_for() {
    let upstream = FakeUpstream::start().await;
    let mut config = Config::local(format!("http://{}", upstream.addr).parse().unwrap());
    config.listen = "0.0.0.0:0".parse().unwrap();
    let refused = common::start(config.clone(), std::sync::Arc::new(common::Captured::default()))
        .await
        .err()
        .expect("plaintext on 0.0.0.0 is refused");
    let message = refused.to_string();
    assert!(message.contains("without TLS") && message.contains("--plaintext"), "{message}");

    config.tls.plaintext = true;
    let running =
        common::start(config, std::sync::Arc::new(common::Captured::default())).await.expect("--plaintext allows it");
    running.shutdown().await;
}

#[tokio::test]
async fn an_https_upstream_is_reached_over_tls_with_its_ca_and_server_name() {
    // The upstream: a TLS sidecar in front of the fake (it serves TLS as Milvus would).
    let upstream = FakeUpstream::start().await;
    let ca = Ca::new("upstream CA");
    let files = Files::new("tls-upstream", &ca.server());
    let tls_front = Sidecar::start_with(upstream.addr, |c| files.serve(c)).await;
    let port = tls_front.addr().port();

    let ca_file = write(&files.dir, "upstream-ca.pem", &ca.pem);
    let ca_arg = milvus_sidecar::tls::parse_ca_file(ca_file.to_str().unwrap()).unwrap();
    let front = |uri: String, name: Option<&str>| {
        let ca = ca_arg.clone();
        let name = name.map(str::to_owned);
        async move {
            let mut config = Config::local(uri.parse().unwrap());
            config.upstream_tls.upstream_tls_ca = Some(ca);
            config.upstream_tls.upstream_tls_server_name = name;
            let captured = std::sync::Arc::new(common::Captured::default());
            common::start(config, captured).await.unwrap()
        }
    };

    // By host name (the certificate names localhost)...
    let by_name = front(format!("https://localhost:{port}"), None).await;
    let mut client = common::RawClient::connect(by_name.listen_addr).await;
    let echoed = client.unary("Echo", Bytes::from_static(b"\x0a\x01x")).await.expect("through https upstream");
    assert_eq!(&echoed.get_ref()[..], b"\x0a\x01x");

    // ...by address with the name to check given apart...
    let by_addr = front(format!("https://127.0.0.1:{port}"), Some("localhost")).await;
    let mut client = common::RawClient::connect(by_addr.listen_addr).await;
    client.unary("Echo", Bytes::from_static(b"\x0a\x01y")).await.expect("server name override");

    // ...and a name the certificate does not carry is refused.
    let wrong = front(format!("https://127.0.0.1:{port}"), Some("milvus.example")).await;
    let mut client = common::RawClient::connect(wrong.listen_addr).await;
    let status = client.unary("Echo", Bytes::from_static(b"\x0a\x01z")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(upstream.count("Echo"), 2);
}

#[tokio::test]
async fn upstream_tls_flags_without_an_https_upstream_are_refused() {
    let upstream = FakeUpstream::start().await;
    let mut config = Config::local(format!("http://{}", upstream.addr).parse().unwrap());
    config.upstream_tls.upstream_tls_server_name = Some("milvus".into());
    let err = common::start(config, std::sync::Arc::new(common::Captured::default())).await.err().unwrap();
    assert!(err.to_string().contains("need an https:// --upstream"), "{err}");
}
