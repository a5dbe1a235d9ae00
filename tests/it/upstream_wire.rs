//! The upstream leg on the wire (`src/proxy/h1.rs`, `src/proxy/pool.rs`): what the gateway
//! writes to the upstream, and how it reads every kind of answer an HTTP/1.1 server may send,
//! against a scripted upstream that speaks raw bytes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::faults::raw_upstream;
use crate::support::{send, Harness};

/// A keep-alive upstream that answers each request head it reads with `answer(head)`, on as
/// many requests per connection as the client sends. Requests must have no body.
struct Scripted {
    url: String,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(answer: fn(&str) -> Vec<u8>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (connections.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = pending.drain(..end + 4).collect();
                            let head = String::from_utf8_lossy(&head).into_owned();
                            let reply = answer(&head);
                            seen.lock().unwrap().push(head);
                            if stream.write_all(&reply).await.is_err() {
                                return;
                            }
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        Scripted {
            url,
            connections,
            heads,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// The request path of a head (`GET /path HTTP/1.1`).
fn path_of(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or_default()
}

#[tokio::test]
async fn chunked_answers_pass_through_whole_and_keep_the_connection() {
    let upstream = Scripted::start(|_| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
            .to_vec()
    })
    .await;
    let h = Harness::with_upstream("", &upstream.url).await;
    let token = h.token("alice");
    for round in 0..5 {
        let answer = h.get("/c", &[("x-auth-token", &token)]).await;
        assert_eq!(answer.status, StatusCode::OK, "round {round}");
        assert_eq!(answer.text(), "hello world", "round {round}");
    }
    assert_eq!(
        upstream.connections(),
        1,
        "a chunked answer ends where it says"
    );
}

#[tokio::test]
async fn interim_answers_are_skipped_and_the_final_one_forwarded() {
    let upstream = Scripted::start(|_| {
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
          HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
            .to_vec()
    })
    .await;
    let h = Harness::with_upstream("", &upstream.url).await;
    let token = h.token("alice");
    let answer = h.get("/i", &[("x-auth-token", &token)]).await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.text(), "done");
}

#[tokio::test]
async fn an_answer_delimited_by_close_is_read_to_the_end_and_its_connection_not_reused() {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let url = raw_upstream(move |mut stream, _head| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            // HTTP/1.0, no length: the body ends when the connection does.
            let _ = stream
                .write_all(b"HTTP/1.0 200 OK\r\n\r\nfirst part, ")
                .await;
            tokio::time::sleep(Duration::from_millis(30)).await;
            let _ = stream.write_all(b"second part").await;
        }
    })
    .await;
    let h = Harness::with_upstream("", &url).await;
    let token = h.token("alice");
    for round in 0..3 {
        let answer = h.get("/u", &[("x-auth-token", &token)]).await;
        assert_eq!(answer.status, StatusCode::OK, "round {round}");
        assert_eq!(answer.text(), "first part, second part", "round {round}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn ambiguous_or_malformed_answers_are_a_json_502_never_passed_on() {
    let upstream = Scripted::start(|head| match path_of(head) {
        "/both" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                     0\r\n\r\n"
            .to_vec(),
        "/lengths" => {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec()
        }
        "/status" => b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
        _ => {
            let header = format!("x-big: {}\r\n", "a".repeat(1000));
            let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
            answer.extend(header.repeat(70).into_bytes());
            answer.extend_from_slice(b"Content-Length: 0\r\n\r\n");
            answer
        }
    })
    .await;
    let h = Harness::with_upstream("", &upstream.url).await;
    let token = h.token("alice");
    for path in ["/both", "/lengths", "/status", "/huge-head"] {
        let answer = h.get(path, &[("x-auth-token", &token)]).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_GATEWAY,
            "{path}: {}",
            answer.text()
        );
        assert_eq!(
            answer.error_code(),
            "MFAGATE.UPSTREAM_UNAVAILABLE",
            "{path}"
        );
    }
    assert_eq!(
        h.metric("mfa_gate_upstream_responses_total{class=\"error\"}")
            .await,
        4.0
    );
}

#[tokio::test]
async fn an_upstream_gone_mid_body_cuts_the_client_off_instead_of_ending_the_body() {
    let url = raw_upstream(|mut stream, _head| async move {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
            .await;
    })
    .await;
    let h = Harness::with_upstream("", &url).await;
    let token = h.token("alice");
    let mut client = TcpStream::connect(h.addr()).await.unwrap();
    let request = format!("GET /cut HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {token}\r\n\r\n");
    client.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut received))
        .await
        .expect("the gateway closes the client connection");
    // Either nothing at all (hyper gave up before flushing the head) or the head with the
    // upstream's length and fewer bytes than it promised: never a complete answer.
    let text = String::from_utf8_lossy(&received);
    if !text.is_empty() {
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("content-length: 100"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(body.len() < 100, "read result {read:?}: {text}");
    }
    assert!(
        !text.contains("transfer-encoding"),
        "re-framed as complete: {text}"
    );
}

#[tokio::test]
async fn answers_without_a_body_keep_the_connection_whatever_their_length_says() {
    let upstream = Scripted::start(|head| {
        if head.starts_with("HEAD ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n".to_vec()
        } else if path_of(head) == "/304" {
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n".to_vec()
        } else {
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
        }
    })
    .await;
    let h = Harness::with_upstream("", &upstream.url).await;
    let token = h.token("alice");
    for round in 0..3 {
        let head = send(
            Method::HEAD,
            &h.url("/h"),
            &[("x-auth-token", &token)],
            Bytes::new(),
        )
        .await;
        assert_eq!(head.status, StatusCode::OK, "round {round}");
        assert_eq!(head.headers["content-length"], "12");
        let not_modified = h.get("/304", &[("x-auth-token", &token)]).await;
        assert_eq!(
            not_modified.status,
            StatusCode::NOT_MODIFIED,
            "round {round}"
        );
        let empty = h.get("/204", &[("x-auth-token", &token)]).await;
        assert_eq!(empty.status, StatusCode::NO_CONTENT, "round {round}");
    }
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn hop_by_hop_answer_headers_stay_between_upstream_and_gateway() {
    let upstream = Scripted::start(|_| {
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\nKeep-Alive: timeout=5\r\n\
          X-Internal: secret\r\nProxy-Authenticate: Basic\r\nX-Public: yes\r\n\
          Content-Length: 2\r\n\r\nok"
            .to_vec()
    })
    .await;
    let h = Harness::with_upstream("", &upstream.url).await;
    let token = h.token("alice");
    let answer = h.get("/hop", &[("x-auth-token", &token)]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["x-public"], "yes");
    for name in ["x-internal", "keep-alive", "proxy-authenticate"] {
        assert!(!answer.headers.contains_key(name), "{name} forwarded");
    }
}

/// Whichever server writes the answer — the gateway's own HTTP/1.1 writer, which copies the
/// upstream's header lines (a bodiless GET), or hyper, through a header map (a POST) — the
/// client gets the upstream's end-to-end headers value for value, one `Date`, one length,
/// and the gateway's request id instead of the upstream's.
#[tokio::test]
async fn answer_headers_reach_the_client_whole_and_the_request_id_is_the_gateways() {
    let upstream = Scripted::start(|_| {
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Request-Id: upstream-id\r\n\
          X-Multi: one\r\nset-cookie: b=2\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
          Content-Length: 2\r\n\r\nok"
            .to_vec()
    })
    .await;
    let h = Harness::with_upstream("", &upstream.url).await;
    let token = h.token("alice");
    let headers = [
        ("x-auth-token", token.as_str()),
        ("x-request-id", "client-id-7"),
    ];
    let own = h.get("/own", &headers).await;
    let hyper = send(Method::POST, &h.url("/hyper"), &headers, Bytes::from("abc")).await;
    for (server, answer) in [("own", own), ("hyper", hyper)] {
        assert_eq!(answer.status, StatusCode::OK, "{server}");
        assert_eq!(answer.text(), "ok", "{server}");
        let all = |name: &str| -> Vec<&str> {
            answer
                .headers
                .get_all(name)
                .iter()
                .map(|value| value.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("set-cookie"), ["a=1", "b=2"], "{server}");
        assert_eq!(all("x-request-id"), ["client-id-7"], "{server}");
        assert_eq!(all("x-multi"), ["one"], "{server}");
        assert_eq!(all("date"), ["Sun, 06 Nov 1994 08:49:37 GMT"], "{server}");
        assert_eq!(all("content-length"), ["2"], "{server}");
    }
}

#[tokio::test]
async fn the_upstream_head_is_plain_http_1_1_with_one_host_and_no_client_hop_headers() {
    let upstream =
        Scripted::start(|_| b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
    let h = Harness::with_upstream("", &upstream.url).await;
    let token = h.token("alice");
    let answer = h
        .get(
            "/p/./q?x=1",
            &[
                ("x-auth-token", &token),
                ("connection", "x-drop-me"),
                ("x-drop-me", "1"),
                ("te", "trailers"),
                ("x_auth_user_id", "admin"),
                ("x-keep", "kept"),
            ],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let heads = upstream.heads();
    let head = heads.last().expect("the upstream saw the request");
    let mut lines = head.split("\r\n");
    assert_eq!(lines.next(), Some("GET /p/q?x=1 HTTP/1.1"));
    let names: Vec<String> = lines
        .filter(|line| !line.is_empty())
        .map(|line| line.split(':').next().unwrap().to_ascii_lowercase())
        .collect();
    assert_eq!(names.iter().filter(|n| *n == "host").count(), 1, "{head}");
    for gone in [
        "connection",
        "x-drop-me",
        "te",
        "x_auth_user_id",
        "content-length",
    ] {
        assert!(
            !names.iter().any(|n| n == gone),
            "{gone} sent upstream: {head}"
        );
    }
    for present in [
        "x-keep",
        "x-auth-token",
        "x-auth-user-id",
        "x-auth-mfa",
        "x-request-id",
    ] {
        assert!(
            names.iter().any(|n| n == present),
            "{present} missing: {head}"
        );
    }
    assert!(head.contains("\r\nx-auth-user-id: "), "{head}");
    assert!(
        !head.contains("admin"),
        "the spoofed identity reached the upstream: {head}"
    );
}

#[tokio::test]
async fn an_upstream_that_refuses_a_body_before_reading_it_gets_its_answer_through() {
    // It answers 413 after the head and closes with the body unread (the kernel then resets
    // the connection): the gateway's body write fails, and the 413 is what the client gets.
    let url = raw_upstream(|mut stream, _head| async move {
        let _ = stream
            .write_all(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\
                  Connection: close\r\n\r\ntoo big!",
            )
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    })
    .await;
    let h = Harness::with_upstream("", &url).await;
    let token = h.token("alice");
    let body = Bytes::from(vec![b'x'; 32 * 1024 * 1024]);
    let answer = send(
        Method::POST,
        &h.url("/upload"),
        &[("x-auth-token", &token)],
        body,
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        answer.text()
    );
    assert_eq!(answer.text(), "too big!");
}

/// Whether `haystack` holds `needle`.
fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn a_streamed_upload_reaches_the_upstream_piece_by_piece() {
    // The upstream says when it has seen the second piece; the client sends the end of its body
    // only then. A gateway that held small pieces back until more came would never get there.
    let (seen, seen_by_test) = tokio::sync::oneshot::channel::<()>();
    let seen = Arc::new(Mutex::new(Some(seen)));
    let url = raw_upstream(move |mut stream, head| {
        let seen = seen.clone();
        async move {
            let mut received = head;
            let mut buf = [0u8; 4096];
            let mut told = false;
            while !received.ends_with(b"0\r\n\r\n") {
                if !told && holds(&received, b"second") {
                    if let Some(seen) = seen.lock().unwrap().take() {
                        let _ = seen.send(());
                    }
                    told = true;
                }
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngot!")
                .await;
        }
    })
    .await;
    let h = Harness::with_upstream("", &url).await;
    let token = h.token("alice");
    let mut client = TcpStream::connect(h.addr()).await.unwrap();
    let head = format!(
        "POST /stream HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {token}\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
    );
    client.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.write_all(b"6\r\nsecond\r\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), seen_by_test)
        .await
        .expect("the second piece reached the upstream before the body ended")
        .unwrap();
    client.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !holds(&answer, b"got!") {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert_ne!(n, 0, "closed early: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
