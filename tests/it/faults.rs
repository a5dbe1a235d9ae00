//! Fault injection: an IAM that is down, slow, overloaded or talking nonsense, an upstream that
//! hangs up at the worst moment, a client that walks away mid-request, and a flood of bogus
//! tokens. Each test asserts the outcome the contract promises AND that nothing reached the
//! upstream unverified.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mfa_gate::app::Gateway;
use mfa_gate::config::Config;
use mfa_gate::dev::iam_sim::{Api, Fault};
use mfa_gate::dev::upstream::DemoUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::hostile::exchange;
use crate::support::{config_text, send, Answer, Harness, LOOPBACK};

const DENY_IAM: &str = "mfa_gate_decisions_total{decision=\"deny\",reason=\"iam_unavailable\"}";

/// Checks one of the gateway's `503 iam_unavailable` answers.
fn assert_iam_unavailable(answer: &Answer, what: &str) {
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {}",
        answer.text()
    );
    assert_eq!(answer.error_code(), "MFAGATE.IAM_UNAVAILABLE", "{what}");
}

/// A gateway whose IAM endpoint is a port nobody listens on.
#[tokio::test]
async fn iam_down_is_a_fast_503_and_allowlisted_paths_still_work() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let iam = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
    let text = config_text(
        &iam,
        &upstream.url(),
        "[iam]\ntimeout = \"2s\"\n[[allow]]\nname = \"health\"\npaths = [\"/healthz\"]\n",
    );
    let config = Config::from_toml(&text, Path::new("test.toml")).unwrap();
    let gateway = Gateway::start(config).await.unwrap();
    let url = |path: &str| format!("http://{}{path}", gateway.addr);

    let started = Instant::now();
    let answer = send(
        Method::GET,
        &url("/app"),
        &[("x-auth-token", "some-token-0123456789")],
        Bytes::new(),
    )
    .await;
    assert_iam_unavailable(&answer, "connection refused");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "connection refused took {:?}",
        started.elapsed()
    );
    assert!(!answer.text().contains("some-token"), "token echoed");
    assert_eq!(upstream.request_count(), 0);

    // A request that needs no IAM is unaffected.
    let answer = send(Method::GET, &url("/healthz"), &[], Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(upstream.request_count(), 1);
    assert_eq!(upstream.requests()[0].uri, "/healthz");

    let metrics = send(
        Method::GET,
        &format!("http://{}/metrics", gateway.admin_addr),
        &[],
        Bytes::new(),
    )
    .await
    .text();
    assert_eq!(
        crate::support::metric_value(
            &metrics,
            "mfa_gate_iam_requests_total{api=\"verify_token\",outcome=\"transport_error\"}"
        ),
        1.0
    );
    assert_eq!(crate::support::metric_value(&metrics, DENY_IAM), 1.0);
}

/// Every way the IAM can fail, on every call the policy needs: `503 iam_unavailable`, answered
/// within `iam.timeout`, nothing forwarded, and nothing cached (the next request after the IAM
/// recovers goes through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_iam_failure_fails_closed() {
    let faults = [
        Fault::Status(500),
        Fault::Status(502),
        Fault::Status(503),
        Fault::Status(504),
        Fault::Status(429),
        Fault::Throttle,
        Fault::Html,
        Fault::Garbage,
        Fault::Truncated,
        Fault::Huge,
        Fault::MissingFields,
        Fault::WrongTypes,
        Fault::Drop,
        Fault::Latency(Duration::from_secs(3)),
    ];
    // (API faulted, policy.require, demo user)
    let targets = [
        (Api::VerifyToken, "mfa_device", "alice"),
        (Api::MfaDevice, "mfa_device", "alice"),
        (Api::MfaDevice, "mfa_device", "carol"),
        (Api::LoginProtect, "login_protect", "alice"),
        (Api::LoginProtect, "login_protect", "bob"),
    ];
    let mut runs = Vec::new();
    for (api, require, user) in targets {
        for fault in &faults {
            runs.push((api, require, user, fault.clone()));
        }
    }
    let failures: Vec<String> = futures_util::stream::iter(runs)
        .map(|(api, require, user, fault)| async move {
            let what = format!("{fault:?} on {api:?} (require = {require}) for {user}");
            let h = Harness::with_config(&format!(
                "[iam]\ntimeout = \"400ms\"\n[policy]\nrequire = \"{require}\"\n"
            ))
            .await;
            h.sim.set_fault(Some(api), Some(fault));
            let started = Instant::now();
            let answer = h.get_as("/app", user).await;
            let elapsed = started.elapsed();
            let mut problems = Vec::new();
            if answer.status != StatusCode::SERVICE_UNAVAILABLE
                || answer.error_code() != "MFAGATE.IAM_UNAVAILABLE"
            {
                problems.push(format!("answered {} {:.200}", answer.status, answer.text()));
            }
            if elapsed > Duration::from_millis(2000) {
                problems.push(format!("took {elapsed:?} with iam.timeout = 400ms"));
            }
            if h.upstream.request_count() != 0 {
                problems.push(format!("forwarded: {:?}", h.upstream.requests()));
            }
            h.sim.set_fault(None, None);
            let after = h.get_as("/app", user).await;
            let expected = if user == "alice" {
                StatusCode::OK
            } else {
                StatusCode::FORBIDDEN
            };
            if after.status != expected {
                problems.push(format!(
                    "after recovery answered {} (IAM error cached?)",
                    after.status
                ));
            }
            if problems.is_empty() {
                None
            } else {
                Some(format!("{what}: {}", problems.join("; ")))
            }
        })
        .buffer_unordered(4)
        .filter_map(|failure| async move { failure })
        .collect()
        .await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An IAM answer about another user than the one whose token was presented must never let the
/// request through, as whoever.
#[tokio::test]
async fn answers_about_another_user_are_never_trusted() {
    for (api, require, user) in [
        (None, "mfa_device", "carol"),
        (Some(Api::VerifyToken), "mfa_device", "carol"),
        (Some(Api::VerifyToken), "mfa_device", "alice"),
        (Some(Api::MfaDevice), "mfa_device", "carol"),
        (Some(Api::LoginProtect), "login_protect", "carol"),
        (Some(Api::LoginProtect), "login_protect", "bob"),
        (None, "any", "bob"),
    ] {
        let h = Harness::with_config(&format!("[policy]\nrequire = \"{require}\"\n")).await;
        h.sim.set_fault(api, Some(Fault::OtherUser));
        let answer = h.get_as("/app", user).await;
        let what = format!("OtherUser on {api:?} (require = {require}) for {user}");
        assert!(
            [401, 403, 503].contains(&answer.status.as_u16()),
            "{what}: {} {}",
            answer.status,
            answer.text()
        );
        assert_eq!(
            h.upstream.request_count(),
            0,
            "{what}: {:?}",
            h.upstream.requests()
        );
    }
}

/// `policy.on_iam_error = "allow"` lets the request through, but never with an identity or an
/// MFA claim the IAM did not confirm.
#[tokio::test]
async fn fail_open_forwards_without_identity() {
    let h = Harness::with_config("[policy]\non_iam_error = \"allow\"\n").await;
    h.sim.set_fault(None, Some(Fault::Status(503)));
    let token = h.token("carol");
    let answer = h
        .get(
            "/app",
            &[
                ("x-auth-token", &token),
                ("x-auth-user-id", "spoofed"),
                ("x-auth-mfa", "mfa_device"),
            ],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header_values("x-auth-mfa"), ["none"]);
    for header in [
        "x-auth-user-id",
        "x-auth-user-name",
        "x-auth-domain-id",
        "x-auth-domain-name",
    ] {
        assert_eq!(seen[0].header(header), None, "{header}");
    }
    assert_eq!(
        h.metric("mfa_gate_decisions_total{decision=\"allow\",reason=\"iam_unavailable\"}")
            .await,
        1.0
    );
}

/// A raw TCP upstream: for each connection, `behave` gets the stream after the request head
/// was read.
pub(crate) async fn raw_upstream<F, Fut>(behave: F) -> String
where
    F: Fn(TcpStream, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let behave = Arc::new(behave);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let behave = behave.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                behave(stream, head).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn upstream_reset_before_headers_is_a_json_502() {
    let url = raw_upstream(|stream, _| async move {
        // RST instead of FIN: the harshest hang-up.
        let _ = stream.set_zero_linger();
        drop(stream);
    })
    .await;
    let h = Harness::with_upstream("", &url).await;
    let answer = h.get_as("/app", "alice").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text());
    assert_eq!(answer.error_code(), "MFAGATE.UPSTREAM_UNAVAILABLE");
    assert!(answer.json()["request_id"].is_string());
    assert_eq!(
        h.metric("mfa_gate_upstream_responses_total{class=\"error\"}")
            .await,
        1.0
    );
    // Still serving: the next request gets the same clean answer, not a hang.
    let answer = h.get_as("/app", "alice").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
}

/// An upstream that promises 100000 bytes and resets after 1000: the client must see a
/// truncated response, never a clean end of a shorter body.
#[tokio::test]
async fn upstream_reset_mid_body_is_never_a_clean_end() {
    let url = raw_upstream(|mut stream, _| async move {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                    Content-Length: 100000\r\n\r\n";
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(&[b'x'; 1000]).await;
        let _ = stream.flush().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = stream.set_zero_linger();
        drop(stream);
    })
    .await;
    let h = Harness::with_upstream("", &url).await;
    let token = h.token("alice");

    // Raw: a 200 head, then fewer bytes than framed, then the connection ends.
    let ask = format!("GET /big HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {token}\r\n\r\n");
    let reply = exchange(h.addr(), ask.as_bytes()).await;
    assert_eq!(reply.status, Some(200), "{}", reply.text());
    assert!(
        !reply.complete,
        "the client saw a clean end of a {} byte body (framing: {:?} / {:?})",
        reply.body.len(),
        reply.header("content-length"),
        reply.header("transfer-encoding")
    );
    assert!(reply.body.len() < 100_000);

    // Through hyper: reading the body fails.
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(h.url("/big"))
        .header("x-auth-token", &token)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .expect("body neither ended nor failed");
    assert!(
        body.is_err(),
        "a truncated upstream body ended cleanly ({} bytes)",
        body.map(|b| b.to_bytes().len()).unwrap_or_default()
    );
}

/// What the raw upstream of [`client_disconnect_mid_request_aborts_the_upstream_request`] saw
/// of each request body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BodySeen {
    /// The head arrived; the body is being read.
    Reading,
    Complete(usize),
    /// The connection ended after this many body bytes.
    Aborted(usize),
}

#[tokio::test]
async fn client_disconnect_mid_request_aborts_the_upstream_request() {
    let seen: Arc<Mutex<Vec<BodySeen>>> = Arc::default();
    let record = seen.clone();
    let url = raw_upstream(move |mut stream, head| {
        let record = record.clone();
        async move {
            let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            let length: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let index = {
                let mut seen = record.lock().unwrap();
                seen.push(BodySeen::Reading);
                seen.len() - 1
            };
            let mut got = head.len() - end;
            let mut buf = [0u8; 16384];
            while got < length {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        record.lock().unwrap()[index] = BodySeen::Aborted(got);
                        return;
                    }
                    Ok(n) => got += n,
                }
            }
            record.lock().unwrap()[index] = BodySeen::Complete(got);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        }
    })
    .await;
    let h = Harness::with_upstream("", &url).await;
    let token = h.token("alice");

    let mut client = TcpStream::connect(h.addr()).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {token}\r\n\
         Content-Length: 1000000\r\n\r\n"
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&[b'u'; 10_000]).await.unwrap();
    // Wait until the upstream has the request, then walk away.
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.metric("mfa_gate_inflight_requests").await, 1.0);
    drop(client);

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = seen.lock().unwrap()[0].clone();
        match state {
            BodySeen::Aborted(n) => {
                assert!(n < 1_000_000, "{n}");
                break;
            }
            BodySeen::Complete(n) => panic!("the upstream saw a complete body of {n} bytes"),
            BodySeen::Reading => {}
        }
        assert!(
            Instant::now() < deadline,
            "the upstream request was not aborted after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.metric("mfa_gate_inflight_requests").await != 0.0 {
        assert!(Instant::now() < deadline, "in-flight gauge stuck above 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The gateway keeps serving.
    let answer = send(
        Method::POST,
        &h.url("/upload"),
        &[("x-auth-token", &token)],
        Bytes::from_static(b"small body"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.text(), "ok");
    assert_eq!(seen.lock().unwrap()[1], BodySeen::Complete(10));
    assert_eq!(h.metric("mfa_gate_inflight_requests").await, 0.0);
}

/// With `iam.max_concurrency = 1` and a stalled IAM, many distinct tokens do not queue without
/// bound: each gets its 503 within about `iam.timeout`, and the IAM never has more than the cap
/// in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_concurrency_cap_gives_fast_503s_not_a_queue() {
    let h = Harness::with_config("[iam]\nmax_concurrency = 1\ntimeout = \"800ms\"\n").await;
    h.sim.set_fault(
        Some(Api::VerifyToken),
        Some(Fault::Latency(Duration::from_secs(5))),
    );
    let url = h.url("/app");
    let started = Instant::now();
    let asking = tokio::spawn(futures_util::future::join_all((0..24).map(move |i| {
        let url = url.clone();
        async move {
            let token = format!("distinct-token-{i:04}-{}", uuid::Uuid::new_v4().simple());
            let asked = Instant::now();
            let answer = send(Method::GET, &url, &[("x-auth-token", &token)], Bytes::new()).await;
            (answer, asked.elapsed())
        }
    })));
    // Well inside the first call's timeout, the cap lets exactly one call reach the IAM; without
    // it all 24 would be there by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = h.sim.calls(Api::VerifyToken);
    assert!(
        early <= 1,
        "{early} verify calls in flight at once with max_concurrency = 1"
    );
    let answers = asking.await.unwrap();
    for (answer, elapsed) in &answers {
        assert_iam_unavailable(answer, "saturated");
        assert!(
            *elapsed < Duration::from_millis(2500),
            "a saturated IAM took {elapsed:?} to refuse (iam.timeout = 800ms)"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(h.sim.calls(Api::VerifyToken) >= 1);
    assert_eq!(h.upstream.request_count(), 0);
    assert_eq!(h.metric(DENY_IAM).await, 24.0);
}

/// 10,000 distinct bogus tokens do not evict a real user's cache entry, and cost at most one
/// IAM verify each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_token_flood_does_not_evict_real_users() {
    const BOGUS: usize = 10_000;
    let h = Harness::with_config("[cache]\nmax_entries = 1000\n").await;
    assert_eq!(h.get_as("/app", "alice").await.status, StatusCode::OK);
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
    let mfa_calls = h.sim.calls(Api::MfaDevice);

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = h.url("/app");
    let started = Instant::now();
    let statuses: Vec<StatusCode> = futures_util::stream::iter(0..BOGUS)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let request = Request::get(&url)
                    .header("x-auth-token", format!("bogus-{i:06}-token"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = client.request(request).await.expect("request");
                let status = response.status();
                let _ = response.into_body().collect().await;
                status
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let flood = started.elapsed();
    let unauthorized = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(unauthorized, BOGUS, "every bogus token gets 401");
    let verify_calls = h.sim.calls(Api::VerifyToken) - 1;
    assert!(
        verify_calls <= BOGUS,
        "{verify_calls} verify calls for {BOGUS} bogus tokens"
    );
    assert_eq!(h.upstream.request_count(), 1, "only alice's request");

    // alice is still answered from the cache.
    let before = h.sim.calls(Api::VerifyToken);
    let answer = h.get_as("/app", "alice").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        h.sim.calls(Api::VerifyToken),
        before,
        "alice's entry was evicted by the flood"
    );
    assert_eq!(h.sim.calls(Api::MfaDevice), mfa_calls);
    eprintln!("{BOGUS} bogus tokens in {flood:?}");
}

/// A client hanging up while its IAM lookup is in flight leaves no request counted in flight.
#[tokio::test]
async fn client_gone_during_iam_lookup_leaves_nothing_in_flight() {
    let h = Harness::with_config("[iam]\ntimeout = \"2s\"\n").await;
    h.sim.set_fault(
        Some(Api::VerifyToken),
        Some(Fault::Latency(Duration::from_millis(500))),
    );
    let token = h.token("alice");
    let mut client = TcpStream::connect(h.addr()).await.unwrap();
    client
        .write_all(
            format!("GET /app HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {token}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(h.metric("mfa_gate_inflight_requests").await, 0.0);
    assert_eq!(
        h.upstream.request_count(),
        0,
        "forwarded for a client that left"
    );
    // The lookup finished detached and was cached: no second verify.
    h.sim.set_fault(None, None);
    assert_eq!(h.get_as("/app", "alice").await.status, StatusCode::OK);
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
}

/// One bogus token hammered concurrently costs one IAM verify: concurrent misses are coalesced
/// and the "invalid" answer is cached for `cache.negative_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bogus_token_repeated_costs_one_verify() {
    let h = Harness::start().await;
    h.sim.set_fault(
        Some(Api::VerifyToken),
        Some(Fault::Latency(Duration::from_millis(200))),
    );
    let url = h.url("/app");
    let answers = futures_util::future::join_all((0..100).map(|_| {
        let url = url.clone();
        async move {
            send(
                Method::GET,
                &url,
                &[("x-auth-token", "the-same-bogus-token")],
                Bytes::new(),
            )
            .await
        }
    }))
    .await;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text());
        assert_eq!(answer.error_code(), "MFAGATE.INVALID_TOKEN");
    }
    for _ in 0..10 {
        let answer = h
            .get("/app", &[("x-auth-token", "the-same-bogus-token")])
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(h.sim.calls(Api::VerifyToken), 1);
    assert_eq!(h.upstream.request_count(), 0);
}
