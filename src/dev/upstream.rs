//! A demo and test upstream: an HTTP server that tells what it received.
//!
//! `mfa-gate dev` puts it behind the gateway so that a newcomer's `curl` shows, in readable
//! JSON, the request as the app sees it — above all the `X-Auth-*` identity headers the gateway
//! added. The integration tests use the same server to assert what the gateway forwards
//! ([`DemoUpstream::requests`]), how it reuses connections
//! ([`DemoUpstream::connections_accepted`]) and how it streams, times out and upgrades.
//!
//! By default every request is answered, after its whole body was read (hashed on the fly,
//! never buffered), with 200 and
//!
//! ```json
//! {"method": "GET", "uri": "/path?q", "version": "HTTP/1.1",
//!  "headers": {"name": "value", "repeated": ["a", "b"]},
//!  "body_bytes": 0, "body_sha256": "e3b0c442…"}
//! ```
//!
//! Request headers steer the answer (tests only need to set them on the client request):
//!
//! | header | effect |
//! |---|---|
//! | `x-echo-body: 1` | stream the request body back as it arrives (chunked) |
//! | `x-echo-status: 418` | answer that status (200..=599) |
//! | `x-echo-delay-ms: N` | wait N ms before sending the response head |
//! | `x-echo-size: N` | answer N bytes of `0123456789abcdef…`, streamed in 64 KiB chunks |
//! | `x-echo-header: name=value` | add that response header (repeatable) |
//!
//! `x-echo-body` wins over `x-echo-size`. A steering header with a bad value is answered 400
//! with `{"error": "…"}`.
//! A WebSocket upgrade (`Connection: upgrade`, `Upgrade: websocket`, RFC 6455 §4.2) is accepted
//! with 101 and then every byte received on the connection is echoed back.

use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Every answer's body: a full buffer or a stream (echo, sized body).
type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Chunk size of `x-echo-size` bodies.
const CHUNK_BYTES: usize = 64 * 1024;
/// The repeating content of `x-echo-size` bodies: easy to verify at any offset.
const PATTERN: &[u8; 16] = b"0123456789abcdef";
/// Upper bound of `x-echo-delay-ms`: long enough for any timeout test, short enough that a
/// typo cannot park a connection for days.
const MAX_DELAY_MS: u64 = 3_600_000;
/// RFC 6455 §1.3: appended to `Sec-WebSocket-Key` before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const X_ECHO_BODY: HeaderName = HeaderName::from_static("x-echo-body");
const X_ECHO_STATUS: HeaderName = HeaderName::from_static("x-echo-status");
const X_ECHO_DELAY_MS: HeaderName = HeaderName::from_static("x-echo-delay-ms");
const X_ECHO_SIZE: HeaderName = HeaderName::from_static("x-echo-size");
const X_ECHO_HEADER: HeaderName = HeaderName::from_static("x-echo-header");
const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// A request as the upstream received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// `path?query` as received (also for HTTP/2, whose URI carries scheme and authority).
    pub uri: String,
    /// Header names lowercase, repeated names kept. Grouped by name in order of first
    /// appearance (hyper's `HeaderMap` does not keep the interleaving of different names).
    pub headers: Vec<(String, String)>,
    /// Request body bytes received.
    pub body_len: u64,
    /// `HTTP/1.1`, `HTTP/2.0`, …
    pub version: String,
}

impl SeenRequest {
    /// The values of header `name` (any case), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).into_iter().next()
    }
}

/// A running demo upstream.
///
/// Cheap to clone and share: all state is behind `Arc`s. The server stops, cutting open
/// connections, when [`DemoUpstream::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct DemoUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Held only by the handles, so that dropping the last one stops the server.
    stopper: Arc<Stopper>,
}

impl fmt::Debug for DemoUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Signals the server and its connections to stop, at the latest when dropped.
struct Stopper {
    tx: watch::Sender<bool>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.tx.send_replace(true);
    }
}

/// State shared by the handles and the server task.
#[derive(Default)]
struct Shared {
    /// Fully received requests in the order they completed; tests assert on forwarding.
    requests: Mutex<Vec<SeenRequest>>,
    /// TCP connections accepted, for keep-alive and pooling tests.
    connections: AtomicUsize,
}

impl Shared {
    fn requests(&self) -> MutexGuard<'_, Vec<SeenRequest>> {
        // A panicking test thread must not make every later request panic as well.
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, seen: SeenRequest) {
        self.requests().push(seen);
    }
}

impl DemoUpstream {
    /// Binds `bind` (port 0 picks a free port) and serves until shut down.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn start(bind: SocketAddr) -> std::io::Result<DemoUpstream> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), rx));
        tracing::debug!(%addr, "demo upstream listening");
        Ok(DemoUpstream {
            addr,
            shared,
            stopper: Arc::new(Stopper { tx }),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure as `upstream.url`, e.g. `http://127.0.0.1:40124`
    /// (a wildcard bind address is replaced by loopback).
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Every request fully received (body read to its end), in that order. A WebSocket
    /// upgrade request counts when it is answered with 101.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.requests().clone()
    }

    /// `requests().len()`, without the copy.
    pub fn request_count(&self) -> usize {
        self.shared.requests().len()
    }

    /// New TCP connections accepted since start or the last [`DemoUpstream::clear`].
    pub fn connections_accepted(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Forgets the recorded requests and resets the connection counter.
    pub fn clear(&self) {
        self.shared.requests().clear();
        self.shared.connections.store(0, Ordering::SeqCst);
    }

    /// Stops accepting connections and cuts the open ones (upgraded ones included).
    /// Idempotent.
    pub fn shutdown(&self) {
        self.stopper.tx.send_replace(true);
    }
}

/// Resolves when `shutdown` was called or every handle is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // `Err` means the sender is gone: that is a stop too.
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve_connection(stream, Arc::clone(&shared), stop.clone()));
                }
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::debug!(cause = %err, "demo upstream accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    tracing::debug!("demo upstream stopped");
}

/// Serves one connection: HTTP/1.1 with keep-alive and upgrades, or h2c (prior knowledge).
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    // Small echo chunks must not wait for Nagle: latency tests measure the gateway, not this.
    let _ = stream.set_nodelay(true);
    let service = {
        let stop = stop.clone();
        service_fn(move |req| {
            let shared = Arc::clone(&shared);
            let stop = stop.clone();
            async move { Ok::<_, Infallible>(handle(shared, stop, req).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(cause = %err, "demo upstream connection ended with an error");
            }
        }
        () = stopped(&mut stop) => {}
    }
}

/// What the steering headers ask for.
#[derive(Default)]
struct Steering {
    echo_body: bool,
    status: Option<StatusCode>,
    delay: Option<Duration>,
    size: Option<u64>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Steering {
    fn parse(headers: &HeaderMap) -> Result<Steering, String> {
        let mut steering = Steering::default();
        if let Some(value) = text(headers, &X_ECHO_BODY)? {
            steering.echo_body = match value.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => return Err(format!("x-echo-body: expected 1 or 0, got {value:?}")),
            };
        }
        if let Some(value) = text(headers, &X_ECHO_STATUS)? {
            let status = value
                .parse::<u16>()
                .ok()
                .filter(|s| (200..=599).contains(s))
                .and_then(|s| StatusCode::from_u16(s).ok())
                .ok_or_else(|| format!("x-echo-status: expected 200..=599, got {value:?}"))?;
            steering.status = Some(status);
        }
        if let Some(value) = text(headers, &X_ECHO_DELAY_MS)? {
            let ms = value
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms <= MAX_DELAY_MS)
                .ok_or_else(|| {
                    format!("x-echo-delay-ms: expected 0..={MAX_DELAY_MS}, got {value:?}")
                })?;
            steering.delay = Some(Duration::from_millis(ms));
        }
        if let Some(value) = text(headers, &X_ECHO_SIZE)? {
            let size = value
                .parse::<u64>()
                .map_err(|_| format!("x-echo-size: expected a byte count, got {value:?}"))?;
            steering.size = Some(size);
        }
        for value in headers.get_all(X_ECHO_HEADER) {
            let value = value
                .to_str()
                .map_err(|_| "x-echo-header: not text".to_owned())?;
            let parsed = value.split_once('=').and_then(|(name, v)| {
                let name = HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
                let v = HeaderValue::from_str(v.trim()).ok()?;
                Some((name, v))
            });
            let pair = parsed
                .ok_or_else(|| format!("x-echo-header: expected name=value, got {value:?}"))?;
            steering.headers.push(pair);
        }
        Ok(steering)
    }
}

/// The text of a single-valued steering header (the last one wins when repeated).
fn text<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h str>, String> {
    match headers.get_all(name).iter().next_back() {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| format!("{name}: not text")),
    }
}

async fn handle(
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let seen = SeenRequest {
        method: req.method().to_string(),
        uri: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().to_string(), |pq| pq.as_str().to_owned()),
        headers: req
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), lossy(value)))
            .collect(),
        body_len: 0,
        version: version(req.version()).to_owned(),
    };

    if is_websocket_upgrade(&req) {
        return websocket(shared, stop, &mut req, seen);
    }

    let steering = match Steering::parse(req.headers()) {
        Ok(steering) => steering,
        Err(problem) => {
            let body = req.into_body();
            return match drain(body).await {
                Ok((len, _)) => {
                    shared.record(SeenRequest {
                        body_len: len,
                        ..seen
                    });
                    json_response(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({ "error": problem }),
                    )
                }
                Err(err) => client_went_away(&err),
            };
        }
    };

    if steering.echo_body {
        if let Some(delay) = steering.delay {
            tokio::time::sleep(delay).await;
        }
        let body = echo_body(req.into_body(), shared, seen);
        let mut response = Response::new(body);
        *response.status_mut() = steering.status.unwrap_or(StatusCode::OK);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return finish(response, steering.headers);
    }

    let (body_len, body_sha256) = match drain(req.into_body()).await {
        Ok(drained) => drained,
        Err(err) => return client_went_away(&err),
    };
    let seen = SeenRequest { body_len, ..seen };
    shared.record(seen.clone());
    if let Some(delay) = steering.delay {
        tokio::time::sleep(delay).await;
    }
    let status = steering.status.unwrap_or(StatusCode::OK);

    let response = match steering.size {
        Some(size) => {
            let mut response = Response::new(sized_body(size));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            response
        }
        None => json_response(status, &Echo::new(&seen, body_sha256)),
    };
    finish(response, steering.headers)
}

/// Adds the `x-echo-header` headers last, so that they can override the defaults.
fn finish(mut response: Response<Body>, extra: Vec<(HeaderName, HeaderValue)>) -> Response<Body> {
    for (name, value) in extra {
        response.headers_mut().append(name, value);
    }
    response
}

/// The answer when the request body fails half-way: the client is gone or broke the framing,
/// so nobody reads this; hyper closes the connection.
fn client_went_away(err: &hyper::Error) -> Response<Body> {
    tracing::debug!(cause = %err, "demo upstream: request body failed");
    json_response(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({ "error": "request body failed" }),
    )
}

/// The default answer's JSON, with the fields in reading order.
#[derive(Serialize)]
struct Echo<'a> {
    method: &'a str,
    uri: &'a str,
    version: &'a str,
    headers: Map<String, Value>,
    body_bytes: u64,
    body_sha256: String,
}

impl<'a> Echo<'a> {
    fn new(seen: &'a SeenRequest, body_sha256: String) -> Echo<'a> {
        let mut headers = Map::new();
        for (name, value) in &seen.headers {
            let value = Value::String(value.clone());
            match headers.get_mut(name) {
                None => {
                    headers.insert(name.clone(), value);
                }
                Some(Value::Array(values)) => values.push(value),
                Some(first) => {
                    let first = first.take();
                    headers.insert(name.clone(), Value::Array(vec![first, value]));
                }
            }
        }
        Echo {
            method: &seen.method,
            uri: &seen.uri,
            version: &seen.version,
            headers,
            body_bytes: seen.body_len,
            body_sha256,
        }
    }
}

/// Pretty JSON with a final newline: it is read by people in a terminal after `curl`.
fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn lossy(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

fn version(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

/// Reads a body to its end, counting and hashing it frame by frame (never buffering it).
async fn drain(mut body: Incoming) -> Result<(u64, String), hyper::Error> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    Ok((len, hex::encode(hasher.finalize())))
}

/// `x-echo-body`: the request body's data frames, sent back as they arrive. The request is
/// recorded when its body ends (not if it fails).
fn echo_body(body: Incoming, shared: Arc<Shared>, seen: SeenRequest) -> Body {
    struct Echoing {
        body: Incoming,
        shared: Arc<Shared>,
        seen: SeenRequest,
    }
    let stream =
        futures_util::stream::unfold(Some(Echoing { body, shared, seen }), |state| async move {
            let mut state = state?;
            loop {
                match state.body.frame().await {
                    None => {
                        state.shared.record(state.seen);
                        return None;
                    }
                    Some(Err(err)) => {
                        return Some((Err(std::io::Error::other(err)), None));
                    }
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            state.seen.body_len += data.len() as u64;
                            return Some((Ok(Frame::data(data)), Some(state)));
                        }
                        // Trailers are not echoed.
                        Err(_) => continue,
                    },
                }
            }
        });
    StreamBody::new(stream).boxed_unsync()
}

/// `x-echo-size`: `size` bytes of [`PATTERN`], in [`CHUNK_BYTES`] frames.
fn sized_body(size: u64) -> Body {
    // CHUNK_BYTES is a multiple of the pattern length, so every frame starts at offset 0 of
    // the pattern and one shared buffer serves them all.
    let chunk = Bytes::from(PATTERN.repeat(CHUNK_BYTES / PATTERN.len()));
    let stream = futures_util::stream::unfold(size, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = usize::try_from(left).map_or(CHUNK_BYTES, |left| left.min(CHUNK_BYTES));
            let frame = Frame::data(chunk.slice(..n));
            Some((Ok::<_, std::io::Error>(frame), left - n as u64))
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// `Connection` names the `upgrade` token and `Upgrade` names `websocket` (RFC 6455 §4.2.1:
/// both compared case-insensitively), on an HTTP/1.1 GET.
fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket")
}

/// Answers 101 and echoes raw bytes on the upgraded connection until either side closes it
/// or the server stops. No WebSocket framing is interpreted: echoing bytes echoes frames.
fn websocket(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    req: &mut Request<Incoming>,
    seen: SeenRequest,
) -> Response<Body> {
    let accept = req
        .headers()
        .get(SEC_WEBSOCKET_KEY)
        .and_then(|key| key.to_str().ok())
        .map(|key| websocket_accept(key.trim()))
        .and_then(|accept| HeaderValue::from_str(&accept).ok());
    let on_upgrade = hyper::upgrade::on(req);
    shared.record(seen);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!(cause = %err, "demo upstream: upgrade failed");
                return;
            }
        };
        let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
        tokio::select! {
            copied = tokio::io::copy(&mut reader, &mut writer) => {
                if let Err(err) = copied {
                    tracing::debug!(cause = %err, "demo upstream: websocket echo ended");
                }
                let _ = writer.shutdown().await;
            }
            () = stopped(&mut stop) => {}
        }
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(accept) = accept {
        headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// RFC 6455 §4.2.2: `base64(SHA-1(key + GUID))`.
fn websocket_accept(key: &str) -> String {
    base64(&sha1(format!("{key}{WEBSOCKET_GUID}").as_bytes()))
}

/// SHA-1 (RFC 3174), only for `Sec-WebSocket-Accept`, which needs no collision resistance;
/// small enough not to warrant a dependency.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut message = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bit_len.to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*word);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (state, value) in h.iter_mut().zip([a, b, c, d, e]) {
            *state = state.wrapping_add(value);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::Empty;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use tokio::io::AsyncReadExt;

    type TestClient = Client<HttpConnector, Body>;

    fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn upstream() -> DemoUpstream {
        DemoUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("start upstream")
    }

    fn empty() -> Body {
        Empty::new()
            .map_err(|never: Infallible| match never {})
            .boxed_unsync()
    }

    async fn send(client: &TestClient, req: Request<Body>) -> (http::response::Parts, Bytes) {
        let resp = client.request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts, body)
    }

    #[test]
    fn sha1_base64_and_websocket_accept() {
        assert_eq!(
            hex::encode(sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex::encode(sha1(b"")),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        let long = vec![b'a'; 1000];
        assert_eq!(
            hex::encode(sha1(&long)),
            "291e9a6c66994949b57ba5e650361e98fc36b1ba"
        );
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // RFC 6455 §1.3's example.
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn echoes_the_request_as_pretty_json() {
        let up = upstream().await;
        let c = client();
        let req = Request::post(format!("{}/hello/world?x=1&y=2", up.url()))
            .header("x-auth-user-id", "0123")
            .header("x-auth-mfa", "mfa_device")
            .header("accept", "a")
            .header("accept", "b")
            .body(full("hello"))
            .expect("request");
        let (parts, body) = send(&c, req).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers["content-type"], "application/json");
        let text = std::str::from_utf8(&body).expect("utf-8");
        assert!(
            text.starts_with("{\n  \"method\": \"POST\",\n  \"uri\": "),
            "{text}"
        );
        assert!(text.ends_with("}\n"));
        let json: Value = serde_json::from_str(text).expect("json");
        assert_eq!(json["method"], "POST");
        assert_eq!(json["uri"], "/hello/world?x=1&y=2");
        assert_eq!(json["version"], "HTTP/1.1");
        assert_eq!(json["headers"]["x-auth-user-id"], "0123");
        assert_eq!(json["headers"]["x-auth-mfa"], "mfa_device");
        assert_eq!(json["headers"]["accept"], serde_json::json!(["a", "b"]));
        assert_eq!(json["body_bytes"], 5);
        assert_eq!(
            json["body_sha256"],
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );

        let seen = up.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(up.request_count(), 1);
        let seen = &seen[0];
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.uri, "/hello/world?x=1&y=2");
        assert_eq!(seen.version, "HTTP/1.1");
        assert_eq!(seen.body_len, 5);
        assert_eq!(seen.header("X-Auth-User-Id"), Some("0123"));
        assert_eq!(seen.header_values("accept"), ["a", "b"]);
        assert!(seen.headers.iter().all(|(n, _)| *n == n.to_lowercase()));
        assert_eq!(
            seen.headers.iter().filter(|(n, _)| n == "accept").count(),
            2
        );
    }

    #[tokio::test]
    async fn echoes_a_5_mib_streamed_body() {
        let up = upstream().await;
        let c = client();
        const TOTAL: usize = 5 * 1024 * 1024;
        let piece = Bytes::from((0..=255u8).cycle().take(32 * 1024).collect::<Vec<_>>());
        let pieces = TOTAL / piece.len();
        let mut expected = Sha256::new();
        for _ in 0..pieces {
            expected.update(&piece);
        }
        let stream = futures_util::stream::iter(
            (0..pieces).map(move |_| Ok::<_, std::io::Error>(Frame::data(piece.clone()))),
        );
        let req = Request::put(format!("{}/upload", up.url()))
            .header("x-echo-body", "1")
            .body(StreamBody::new(stream).boxed_unsync())
            .expect("request");
        let resp = c.request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get("content-length").is_none(), "streamed");
        let mut body = resp.into_body().into_data_stream();
        let mut got = Sha256::new();
        let mut len = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.expect("chunk");
            len += chunk.len();
            got.update(&chunk);
        }
        assert_eq!(len, TOTAL);
        assert_eq!(got.finalize(), expected.finalize());
        let seen = up.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].body_len, TOTAL as u64);
        assert_eq!(seen[0].method, "PUT");
    }

    #[tokio::test]
    async fn status_delay_size_and_header_steering() {
        let up = upstream().await;
        let c = client();

        let req = Request::get(format!("{}/teapot", up.url()))
            .header("x-echo-status", "418")
            .header("x-echo-header", "x-custom=yes please")
            .header("x-echo-header", "cache-control=no-store")
            .body(empty())
            .expect("request");
        let (parts, body) = send(&c, req).await;
        assert_eq!(parts.status.as_u16(), 418);
        assert_eq!(parts.headers["x-custom"], "yes please");
        assert_eq!(parts.headers["cache-control"], "no-store");
        let json: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["uri"], "/teapot");

        let req = Request::get(format!("{}/slow", up.url()))
            .header("x-echo-delay-ms", "300")
            .body(empty())
            .expect("request");
        let started = std::time::Instant::now();
        let resp = c.request(req).await.expect("response");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(resp.status(), StatusCode::OK);

        let size = 3 * CHUNK_BYTES as u64 + 5;
        let req = Request::get(format!("{}/big", up.url()))
            .header("x-echo-size", size.to_string())
            .body(empty())
            .expect("request");
        let resp = c.request(req).await.expect("response");
        assert_eq!(resp.headers()["content-length"], size.to_string().as_str());
        let all = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(all.len() as u64, size);
        assert!(all.iter().enumerate().all(|(i, b)| *b == PATTERN[i % 16]));

        let req = Request::get(format!("{}/zero", up.url()))
            .header("x-echo-size", "0")
            .body(empty())
            .expect("request");
        let (_, body) = send(&c, req).await;
        assert!(body.is_empty());

        // Bodies that HTTP forbids are left out by hyper, whatever the echo would be.
        let req = Request::get(format!("{}/nothing", up.url()))
            .header("x-echo-status", "204")
            .body(empty())
            .expect("request");
        let (parts, body) = send(&c, req).await;
        assert_eq!(parts.status, StatusCode::NO_CONTENT);
        assert!(body.is_empty());
        let req = Request::head(format!("{}/head", up.url()))
            .body(empty())
            .expect("request");
        let (parts, body) = send(&c, req).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert!(body.is_empty());

        // Echoed bodies take the status and the delay too.
        let req = Request::post(format!("{}/echo", up.url()))
            .header("x-echo-body", "1")
            .header("x-echo-status", "201")
            .header("x-echo-delay-ms", "100")
            .body(full("ping"))
            .expect("request");
        let started = std::time::Instant::now();
        let (parts, body) = send(&c, req).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(parts.status, StatusCode::CREATED);
        assert_eq!(&body[..], b"ping");

        for (name, value) in [
            ("x-echo-status", "99"),
            ("x-echo-status", "abc"),
            ("x-echo-delay-ms", "-1"),
            ("x-echo-size", "lots"),
            ("x-echo-body", "maybe"),
            ("x-echo-header", "no-equals-sign"),
        ] {
            let req = Request::get(format!("{}/bad", up.url()))
                .header(name, value)
                .body(empty())
                .expect("request");
            let (parts, body) = send(&c, req).await;
            assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{name}: {value}");
            let json: Value = serde_json::from_slice(&body).expect("json");
            assert!(json["error"].as_str().expect("error").contains(name));
        }
        assert_eq!(up.request_count(), 4 + 3 + 6);
    }

    #[tokio::test]
    async fn keep_alive_h2c_and_clear() {
        let up = upstream().await;
        let c = client();
        for _ in 0..5 {
            let req = Request::get(format!("{}/", up.url()))
                .body(empty())
                .expect("request");
            send(&c, req).await;
        }
        assert_eq!(
            up.connections_accepted(),
            1,
            "keep-alive reuses one connection"
        );
        assert_eq!(up.request_count(), 5);
        up.clear();
        assert_eq!(up.request_count(), 0);
        assert_eq!(up.connections_accepted(), 0);

        let h2: TestClient = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let req = Request::get(format!("{}/h2?q=1", up.url()))
            .body(empty())
            .expect("request");
        let (parts, body) = send(&h2, req).await;
        assert_eq!(parts.version, Version::HTTP_2);
        let json: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["version"], "HTTP/2.0");
        assert_eq!(json["uri"], "/h2?q=1");
        assert_eq!(up.requests()[0].version, "HTTP/2.0");
        assert_eq!(up.requests()[0].uri, "/h2?q=1");
    }

    #[tokio::test]
    async fn websocket_upgrade_echoes_bytes() {
        let up = upstream().await;
        let mut s = TcpStream::connect(up.addr()).await.expect("connect");
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.expect("read head");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).expect("utf-8").to_ascii_lowercase();
        assert!(
            head.starts_with("http/1.1 101 switching protocols\r\n"),
            "{head}"
        );
        assert!(head.contains("upgrade: websocket\r\n"));
        assert!(head.contains("connection: upgrade\r\n"));
        assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"));

        for message in [&b"\x81\x05hello"[..], b"any raw bytes \x00\xff"] {
            s.write_all(message).await.expect("write");
            let mut echoed = vec![0; message.len()];
            s.read_exact(&mut echoed).await.expect("echo");
            assert_eq!(echoed, message);
        }
        s.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.expect("eof");
        assert!(rest.is_empty());

        let seen = up.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].uri, "/ws");
        assert_eq!(seen[0].header("upgrade"), Some("websocket"));
    }

    #[tokio::test]
    async fn shutdown_and_drop_stop_the_server() {
        let up = upstream().await;
        let addr = up.addr();
        up.shutdown();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());

        let up = upstream().await;
        let addr = up.addr();
        drop(up);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
