//! TLS on both sides: HTTPS and HTTP/2 via ALPN on the main listener, certificate rotation
//! without dropping connections, and an HTTPS upstream behind a private CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mfa_gate::app::Gateway;
use mfa_gate::config::Config;
use mfa_gate::dev::iam_sim::{self, IamSim};
use mfa_gate::dev::upstream::DemoUpstream;
use rcgen::{CertifiedKey, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::support::{config_text, Harness, LOOPBACK};

fn self_signed() -> CertifiedKey {
    rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
}

fn write_pair(dir: &Path, pair: &CertifiedKey) {
    std::fs::write(dir.join("tls.crt"), pair.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), pair.key_pair.serialize_pem()).unwrap();
}

fn client_config(roots: &[&CertificateDer<'static>], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// A gateway serving HTTPS with the pair in `dir`.
async fn https_gateway(dir: &Path) -> (Gateway, IamSim, DemoUpstream, String) {
    let users = iam_sim::demo_users(Duration::from_secs(3600));
    let token = users[0].token.clone();
    let sim = IamSim::start(LOOPBACK.into(), users).await.unwrap();
    let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
    let text = config_text(
        &sim.url(),
        &upstream.url(),
        &format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            dir.join("tls.crt").display(),
            dir.join("tls.key").display()
        ),
    );
    let config = Config::from_toml(&text, &dir.join("gate.toml")).unwrap();
    (Gateway::start(config).await.unwrap(), sim, upstream, token)
}

#[tokio::test]
async fn https_serves_http2_and_http1_via_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let pair = self_signed();
    write_pair(dir.path(), &pair);
    let (gateway, _sim, _upstream, token) = https_gateway(dir.path()).await;

    for (alpn, version) in [
        (&b"h2"[..], Version::HTTP_2),
        (&b"http/1.1"[..], Version::HTTP_11),
    ] {
        let stream = tls_connect(gateway.addr, client_config(&[pair.cert.der()], &[alpn])).await;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn));
        let request = Request::get(format!("https://localhost:{}/secure", gateway.addr.port()))
            .header("x-auth-token", &token)
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = if version == Version::HTTP_2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut request = request;
            request.headers_mut().remove("host");
            sender.send_request(request).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender.send_request(request).await.unwrap()
        };
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), version);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
        assert_eq!(seen["headers"]["x-auth-mfa"], "mfa_device");
    }
}

/// HTTP/1.1 over TLS goes through the gateway's own HTTP/1.1 path too (`src/server/own_h1.rs`),
/// and hyper takes the connection over at a request with a body: every answer comes whole, on
/// one connection, with the `https` facts.
#[tokio::test]
async fn https_http1_requests_are_answered_whole_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let pair = self_signed();
    write_pair(dir.path(), &pair);
    let (gateway, _sim, _upstream, token) = https_gateway(dir.path()).await;
    let stream = tls_connect(
        gateway.addr,
        client_config(&[pair.cert.der()], &[b"http/1.1"]),
    )
    .await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for (method, path, body) in [
        ("GET", "/one", ""),
        ("GET", "/two", ""),
        ("POST", "/three", "with a body"),
        ("GET", "/four", ""),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("x-auth-token", &token)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
            .await
            .expect("the answer came")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(response.headers().contains_key("date"));
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(seen["uri"], path);
        assert_eq!(seen["body_bytes"], body.len());
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    }
}

#[tokio::test]
async fn certificate_rotation_keeps_open_connections_and_refuses_a_bad_pair() {
    let dir = tempfile::tempdir().unwrap();
    let first = self_signed();
    let second = self_signed();
    write_pair(dir.path(), &first);
    let (gateway, _sim, _upstream, token) = https_gateway(dir.path()).await;
    let mut reloader = mfa_gate::reload::Reloader::new(&dir.path().join("gate.toml"), &gateway);
    let both = client_config(&[first.cert.der(), second.cert.der()], &[b"http/1.1"]);

    // A client keeps a connection open across the rotation.
    let stream = tls_connect(gateway.addr, both.clone()).await;
    assert_eq!(
        stream.get_ref().1.peer_certificates().unwrap()[0],
        *first.cert.der()
    );
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = || {
        Request::get("/kept")
            .header("host", "localhost")
            .header("x-auth-token", &token)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(
        sender.send_request(request()).await.unwrap().status(),
        StatusCode::OK
    );

    write_pair(dir.path(), &second);
    reloader.poll(&gateway).await;
    let fresh = tls_connect(gateway.addr, both.clone()).await;
    assert_eq!(
        fresh.get_ref().1.peer_certificates().unwrap()[0],
        *second.cert.der()
    );
    assert_eq!(
        sender.send_request(request()).await.unwrap().status(),
        StatusCode::OK
    );

    // A broken pair (key of another certificate) is refused; the second one keeps serving.
    std::fs::write(dir.path().join("tls.key"), first.key_pair.serialize_pem()).unwrap();
    reloader.poll(&gateway).await;
    let after = tls_connect(gateway.addr, both).await;
    assert_eq!(
        after.get_ref().1.peer_certificates().unwrap()[0],
        *second.cert.der()
    );
    assert_eq!(
        sender.send_request(request()).await.unwrap().status(),
        StatusCode::OK
    );
}

/// An HTTPS upstream whose certificate is signed by a private CA; answers 200 "tls-upstream".
async fn tls_upstream(leaf: &rcgen::Certificate, key: &KeyPair) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"tls-upstream"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_upstream_with_a_private_ca() {
    let (ca, leaf, leaf_key) = crate::support::private_ca("127.0.0.1");
    let upstream = tls_upstream(&leaf, &leaf_key).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();

    let url = format!("https://127.0.0.1:{}", upstream.port());
    let h = Harness::with_upstream(
        &format!(
            "[upstream]\nca_file = \"{}\"\n",
            dir.path().join("ca.pem").display()
        ),
        &url,
    )
    .await;
    let answer = h.get_as("/", "alice").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "tls-upstream");

    // Without the CA (webpki roots only) the upstream is not trusted: 502, never plaintext.
    let h = Harness::with_upstream("", &url).await;
    let answer = h.get_as("/", "alice").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
}
