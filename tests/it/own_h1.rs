//! The gateway's own HTTP/1.1 path (`src/server/own_h1.rs`) and its hand-over to hyper, on
//! one connection: what a client sees must not depend on which of the two served a request.

use std::time::Duration;

use crate::hostile::RawConn;
use crate::support::Harness;

const WAIT: Duration = Duration::from_secs(5);

/// `METHOD PATH VERSION`, then `Host`, the token and `extra` header lines (each ending in CRLF).
fn request(line: &str, token: &str, extra: &str) -> String {
    format!("{line}\r\nHost: app\r\nX-Auth-Token: {token}\r\n{extra}\r\n")
}

fn get(path: &str, token: &str) -> String {
    request(&format!("GET {path} HTTP/1.1"), token, "")
}

/// The upstream's JSON echo of the request it got.
fn echoed(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|err| {
        panic!(
            "not the upstream's echo ({err}): {}",
            String::from_utf8_lossy(body)
        )
    })
}

#[tokio::test]
async fn answers_are_framed_and_dated_as_hyper_frames_them() {
    let h = Harness::start().await;
    let token = h.token("alice");
    let mut conn = RawConn::open(h.addr()).await;

    conn.send(get("/framed", &token).as_bytes());
    let reply = conn.reply(false, WAIT).await;
    assert_eq!(reply.status, Some(200), "{}", reply.text());
    assert!(
        reply.raw.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        reply.text()
    );
    assert!(reply.complete);
    assert_eq!(
        reply.header("content-length"),
        Some(reply.body.len().to_string().as_str())
    );
    assert_eq!(reply.headers.iter().filter(|(n, _)| n == "date").count(), 1);
    let date = reply.header("date").unwrap();
    assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    assert!(reply.header("x-request-id").is_some());
    assert_eq!(echoed(&reply.body)["uri"], "/framed");

    // The gateway's own refusal on the same connection: JSON, framed, dated, and the
    // connection stays open.
    conn.send(b"GET /framed HTTP/1.1\r\nHost: app\r\n\r\n");
    let refused = conn.reply(false, WAIT).await;
    assert_eq!(refused.status, Some(401), "{}", refused.text());
    assert!(refused.raw.starts_with(b"HTTP/1.1 401 Unauthorized\r\n"));
    assert_eq!(
        refused.header("content-length"),
        Some(refused.body.len().to_string().as_str())
    );
    assert!(refused.header("date").is_some());
    let body: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(body["error_code"], "MFAGATE.NO_TOKEN", "{body}");

    conn.send(get("/again", &token).as_bytes());
    assert_eq!(conn.reply(false, WAIT).await.status, Some(200));
    assert_eq!(h.upstream.connections_accepted(), 1);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let h = Harness::start().await;
    let token = h.token("alice");
    let mut conn = RawConn::open(h.addr()).await;
    let three = format!(
        "{}{}{}",
        get("/one", &token),
        get("/two", &token),
        get("/three", &token)
    );
    conn.send(three.as_bytes());
    for path in ["/one", "/two", "/three"] {
        let reply = conn.reply(false, WAIT).await;
        assert_eq!(reply.status, Some(200), "{}", reply.text());
        assert_eq!(echoed(&reply.body)["uri"], path);
    }
}

#[tokio::test]
async fn a_head_split_over_many_writes_is_served() {
    let h = Harness::start().await;
    let request = get("/split", &h.token("alice"));
    let mut conn = RawConn::open(h.addr()).await;
    for piece in request.as_bytes().chunks(7) {
        conn.send(piece);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let reply = conn.reply(false, WAIT).await;
    assert_eq!(reply.status, Some(200), "{}", reply.text());
    assert_eq!(echoed(&reply.body)["uri"], "/split");
}

#[tokio::test]
async fn hyper_takes_over_at_the_first_request_with_a_body_and_serves_the_rest() {
    let h = Harness::start().await;
    let token = h.token("alice");
    let mut conn = RawConn::open(h.addr()).await;

    conn.send(get("/before", &token).as_bytes());
    assert_eq!(conn.reply(false, WAIT).await.status, Some(200));

    // A body, sent in the same write as the next request (pipelined behind it).
    let post = format!(
        "{}hello{}",
        request("POST /upload HTTP/1.1", &token, "Content-Length: 5\r\n"),
        get("/after", &token)
    );
    conn.send(post.as_bytes());
    let uploaded = conn.reply(false, WAIT).await;
    assert_eq!(uploaded.status, Some(200), "{}", uploaded.text());
    let seen = echoed(&uploaded.body);
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["body_bytes"], 5);
    let after = conn.reply(false, WAIT).await;
    assert_eq!(after.status, Some(200), "{}", after.text());
    assert_eq!(echoed(&after.body)["uri"], "/after");

    // Still one client connection and one upstream connection for all of it.
    conn.send(get("/last", &token).as_bytes());
    assert_eq!(conn.reply(false, WAIT).await.status, Some(200));
    assert_eq!(h.upstream.request_count(), 4);
    assert_eq!(h.upstream.connections_accepted(), 1);
}

#[tokio::test]
async fn requests_the_own_path_leaves_to_hyper_are_answered_by_it() {
    let h = Harness::start().await;
    let token = h.token("alice");

    // HTTP/1.0: hyper answers in kind and closes.
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(request("GET /old HTTP/1.0", &token, "").as_bytes());
    let reply = conn.reply(false, WAIT).await;
    assert_eq!(reply.status, Some(200), "{}", reply.text());
    assert!(
        reply.raw.starts_with(b"HTTP/1.0 200 OK\r\n"),
        "{}",
        reply.text()
    );

    // HEAD: the length of the GET, no body.
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(request("HEAD /h HTTP/1.1", &token, "").as_bytes());
    let reply = conn.reply(true, WAIT).await;
    assert_eq!(reply.status, Some(200), "{}", reply.text());
    assert!(reply.body.is_empty());

    // A malformed head after a good request: hyper's 400.
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(get("/fine", &token).as_bytes());
    assert_eq!(conn.reply(false, WAIT).await.status, Some(200));
    conn.send(b"GET /bad HTTP/1.1\r\nHost: app\r\nBad Header: x\r\n\r\n");
    assert_eq!(conn.reply(false, WAIT).await.status, Some(400));
}

#[tokio::test]
async fn a_request_asking_to_close_is_answered_with_connection_close_and_the_connection_ends() {
    let h = Harness::start().await;
    let token = h.token("alice");
    // Alone on its connection (as health probes send it), and after a kept-alive request on
    // the same connection; either way the upstream connection stays open for the next.
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(request("GET /probe HTTP/1.1", &token, "Connection: close\r\n").as_bytes());
    let reply = conn.reply(false, WAIT).await;
    assert_eq!(reply.status, Some(200), "{}", reply.text());
    assert_eq!(reply.header("connection"), Some("close"));
    assert_eq!(
        conn.reply(false, Duration::from_millis(500)).await.status,
        None,
        "the connection was closed"
    );
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(get("/first", &token).as_bytes());
    assert_eq!(conn.reply(false, WAIT).await.status, Some(200));
    conn.send(request("GET /bye HTTP/1.1", &token, "Connection: Close\r\n").as_bytes());
    let reply = conn.reply(false, WAIT).await;
    assert_eq!(reply.status, Some(200), "{}", reply.text());
    assert_eq!(reply.header("connection"), Some("close"));
    let seen = echoed(&reply.body);
    assert_eq!(seen["uri"], "/bye");
    assert!(
        seen["headers"].get("connection").is_none(),
        "the client's Connection is not forwarded: {seen}"
    );
    assert_eq!(
        conn.reply(false, Duration::from_millis(500)).await.status,
        None,
        "the connection was closed"
    );
    assert_eq!(h.upstream.request_count(), 3);
    assert_eq!(h.upstream.connections_accepted(), 1);
}

#[tokio::test]
async fn a_chunked_upstream_answer_reaches_the_client_whole() {
    let h = Harness::start().await;
    let token = h.token("alice");
    let mut conn = RawConn::open(h.addr()).await;
    // 200,000 bytes, streamed by the upstream in 64 KiB chunks without a length.
    conn.send(request("GET /big HTTP/1.1", &token, "X-Echo-Size: 200000\r\n").as_bytes());
    let reply = conn.reply(false, WAIT).await;
    assert_eq!(reply.status, Some(200));
    assert!(reply.complete, "the body ended as its framing said");
    assert_eq!(reply.body.len(), 200_000);
    assert!(reply.body.starts_with(b"0123456789abcdef"));
    conn.send(get("/next", &token).as_bytes());
    assert_eq!(conn.reply(false, WAIT).await.status, Some(200));
}
