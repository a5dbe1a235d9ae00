//! Shared test fixtures: a gateway wired to a fresh IAM simulator and demo upstream, and
//! clients that speak HTTP (hyper) or raw bytes (so nothing normalises a hostile request).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mfa_gate::app::Gateway;
use mfa_gate::config::Config;
use mfa_gate::dev::iam_sim::{self, IamSim, SimUser};
use mfa_gate::dev::upstream::DemoUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

/// Merges TOML snippets by table so tests can override any key of the base config.
/// `[[allow]]` blocks are appended as they are.
pub fn config_text(iam: &str, upstream: &str, extra: &str) -> String {
    let mut tables: BTreeMap<String, Vec<String>> = BTreeMap::new();
    tables.insert("server".into(), vec!["listen = \"127.0.0.1:0\"".into()]);
    tables.insert("admin".into(), vec!["listen = \"127.0.0.1:0\"".into()]);
    tables.insert("upstream".into(), vec![format!("url = \"{upstream}\"")]);
    tables.insert("iam".into(), vec![format!("endpoint = \"{iam}\"")]);
    let mut arrays = String::new();
    let mut current: Option<String> = None;
    for line in extra.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("[[") {
            current = None;
            arrays.push_str(trimmed);
            arrays.push('\n');
        } else if trimmed.starts_with('[') {
            let name = trimmed.trim_matches(['[', ']']).to_string();
            tables.entry(name.clone()).or_default();
            current = Some(name);
        } else if let Some(table) = &current {
            let lines = tables.get_mut(table).unwrap();
            // A key given again replaces the base's.
            if let Some((key, _)) = trimmed.split_once('=') {
                let key = key.trim();
                lines.retain(|l| l.split_once('=').map(|(k, _)| k.trim()) != Some(key));
            }
            lines.push(trimmed.to_string());
        } else if !trimmed.is_empty() {
            arrays.push_str(trimmed);
            arrays.push('\n');
        }
    }
    let mut text = String::new();
    for (table, lines) in tables {
        text.push_str(&format!("[{table}]\n"));
        for line in lines {
            text.push_str(&line);
            text.push('\n');
        }
    }
    text.push_str(&arrays);
    text
}

/// A gateway with its IAM simulator and upstream.
pub struct Harness {
    pub gateway: Gateway,
    pub sim: IamSim,
    pub upstream: DemoUpstream,
    pub users: Vec<SimUser>,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::with(Some(""), None).await
    }

    /// `extra`: TOML merged into the base config.
    pub async fn with_config(extra: &str) -> Harness {
        Harness::with(Some(extra), None).await
    }

    /// `extra` may name the simulator's own URL as `SIM` (for `[iam.v5]`).
    pub async fn with_v5(extra: &str) -> Harness {
        Harness::with(Some(extra), None).await
    }

    /// With an upstream URL of the test's own (e.g. a misbehaving server).
    pub async fn with_upstream(extra: &str, upstream_url: &str) -> Harness {
        Harness::with(Some(extra), Some(upstream_url)).await
    }

    async fn with(extra: Option<&str>, upstream_url: Option<&str>) -> Harness {
        let users = iam_sim::demo_users(Duration::from_secs(3600));
        let sim = IamSim::start(LOOPBACK.into(), users.clone()).await.unwrap();
        let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
        let upstream_url = upstream_url.map_or_else(|| upstream.url(), str::to_string);
        let extra = extra
            .unwrap_or_default()
            .replace("\"SIM\"", &format!("\"{}\"", sim.url()));
        let text = config_text(&sim.url(), &upstream_url, &extra);
        let config = Config::from_toml(&text, Path::new("test.toml"))
            .unwrap_or_else(|err| panic!("test config refused: {err}\n{text}"));
        let gateway = Gateway::start(config).await.unwrap();
        Harness {
            gateway,
            sim,
            upstream,
            users,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.gateway.addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.admin_addr)
    }

    /// The token of a demo user: "alice" (MFA device), "bob" (login protection by SMS only),
    /// "carol" (no MFA).
    pub fn token(&self, name: &str) -> String {
        self.user(name).token.clone()
    }

    pub fn user(&self, name: &str) -> &SimUser {
        self.users
            .iter()
            .find(|u| u.user_name == name)
            .unwrap_or_else(|| panic!("no demo user {name}"))
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        send(Method::GET, &self.url(path), headers, Bytes::new()).await
    }

    pub async fn get_as(&self, path: &str, user: &str) -> Answer {
        let token = self.token(user);
        self.get(path, &[("x-auth-token", &token)]).await
    }

    pub async fn metrics(&self) -> String {
        let answer = send(Method::GET, &self.admin_url("/metrics"), &[], Bytes::new()).await;
        assert_eq!(answer.status, StatusCode::OK);
        answer.text()
    }

    /// The value of one sample in `/metrics`, e.g.
    /// `mfa_gate_decisions_total{decision="allow",reason="mfa_verified"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }
}

/// Finds `sample` (name with labels exactly as rendered) in a text exposition.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no sample {sample} in metrics"))
}

/// A whole answer, body read.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.text()))
    }

    /// The JSON `error_code` of one of the gateway's own answers.
    pub fn error_code(&self) -> String {
        self.json()["error_code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The upstream's echo of the headers it received: `headers[name]`.
    pub fn seen_header(&self, name: &str) -> Option<String> {
        let json = self.json();
        match &json["headers"][name] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(values) => Some(
                values
                    .iter()
                    .map(|v| v.as_str().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(" | "),
            ),
            _ => None,
        }
    }
}

/// One HTTP/1.1 request through a fresh hyper client.
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Bytes) -> Answer {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(request.body(Full::new(body)).unwrap()),
    )
    .await
    .expect("request timed out")
    .expect("request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends raw bytes and reads until the server closes or `wait` passes without more data.
pub async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in a raw answer.
pub fn raw_status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

/// A private CA and a leaf certificate for `name` signed by it (with the leaf's key).
pub fn private_ca(name: &str) -> (rcgen::Certificate, rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    (ca, leaf, leaf_key)
}
