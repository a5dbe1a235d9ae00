//! `server.header_read_timeout` bounds the wait for a request head, and nothing else: not a slow
//! answer, not a slow request body, not a WebSocket tunnel. (The slowloris cases are in
//! `hostile.rs` and `forwarding.rs`.)

use std::time::{Duration, Instant};

use crate::hostile::{RawConn, Reply};
use crate::support::Harness;

const TIMEOUT: &str = "[server]\nheader_read_timeout = \"300ms\"\n";

fn assert_status(reply: &Reply, status: u16) {
    assert_eq!(
        reply.status,
        Some(status),
        "{:?}",
        String::from_utf8_lossy(&reply.raw)
    );
}

fn get(token: &str, extra: &str) -> Vec<u8> {
    format!("GET /app HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {token}\r\n{extra}\r\n").into_bytes()
}

/// An answer that takes three timeouts to come is still delivered, and the connection then
/// serves the next request.
#[tokio::test]
async fn a_slow_answer_is_not_cut_off_and_the_connection_serves_on() {
    let h = Harness::with_config(TIMEOUT).await;
    let token = h.token("alice");
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(&get(&token, "X-Echo-Delay-Ms: 900\r\n"));
    let slow = conn.reply(false, Duration::from_secs(5)).await;
    assert_status(&slow, 200);
    conn.send(&get(&token, ""));
    let next = conn.reply(false, Duration::from_secs(5)).await;
    assert_status(&next, 200);
    assert_eq!(h.upstream.request_count(), 2);
}

/// A request body sent slowly, over three timeouts, is read whole: the timeout is for heads.
#[tokio::test]
async fn a_slow_request_body_is_not_cut_off() {
    let h = Harness::with_config(TIMEOUT).await;
    let token = h.token("alice");
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(
        format!("POST /upload HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {token}\r\nContent-Length: 9\r\n\r\n")
            .as_bytes(),
    );
    for piece in [b"abc", b"def", b"ghi"] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        conn.send(piece);
    }
    let answer = conn.reply(false, Duration::from_secs(5)).await;
    assert_status(&answer, 200);
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_len, 9);
}

/// A keep-alive connection left idle is closed once it has waited a timeout for the next head,
/// as hyper's own header timeout did; not before.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_timeout() {
    let h = Harness::with_config(TIMEOUT).await;
    let token = h.token("alice");
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(&get(&token, ""));
    assert_eq!(
        conn.reply(false, Duration::from_secs(5)).await.status,
        Some(200)
    );
    let idle = Instant::now();
    let after = conn.reply(false, Duration::from_secs(5)).await;
    let waited = idle.elapsed();
    assert_eq!(after.status, None);
    assert!(
        after.raw.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&after.raw)
    );
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
}

/// A WebSocket tunnel that is quiet for three timeouts stays open.
#[tokio::test]
async fn a_quiet_websocket_tunnel_stays_open() {
    let h = Harness::with_config(TIMEOUT).await;
    let token = h.token("alice");
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(&get(
        &token,
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    ));
    let switched = conn.reply(true, Duration::from_secs(5)).await;
    assert_status(&switched, 101);
    tokio::time::sleep(Duration::from_millis(900)).await;
    // The demo upstream echoes what comes through the tunnel; an echo framed as an answer head
    // is read here as one.
    conn.send(b"HTTP/1.1 299 Still\r\nContent-Length: 0\r\n\r\n");
    let echoed = conn.reply(false, Duration::from_secs(5)).await;
    assert_status(&echoed, 299);
}
