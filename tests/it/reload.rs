//! Config reloads while serving: SIGHUP and file changes, good and bad configs, with a request
//! stream running and no failed request.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use mfa_gate::dev::iam_sim::{self, IamSim};
use mfa_gate::dev::upstream::DemoUpstream;

use crate::cli::Process;
use crate::support::{config_text, metric_value, send, Harness, LOOPBACK};

#[tokio::test]
async fn reload_applies_allowlist_and_policy_to_the_next_request() {
    let h = Harness::start().await;
    assert_eq!(
        h.get("/public/x", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(h.get_as("/", "carol").await.status, StatusCode::FORBIDDEN);
    let text = config_text(
        &h.sim.url(),
        &h.upstream.url(),
        "[policy]\nmode = \"report_only\"\n[[allow]]\nname = \"public\"\npaths = [\"/public/**\"]\n",
    );
    let config =
        mfa_gate::config::Config::from_toml(&text, std::path::Path::new("t.toml")).unwrap();
    h.gateway.reload(config).await.unwrap();
    assert_eq!(h.get("/public/x", &[]).await.status, StatusCode::OK);
    assert_eq!(h.get_as("/", "carol").await.status, StatusCode::OK);
    assert_eq!(
        h.metric("mfa_gate_config_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("mfa_gate_allowlist_matches_total{rule=\"public\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn sighup_and_file_changes_reload_without_failing_a_request() {
    let users = iam_sim::demo_users(Duration::from_secs(3600));
    let sim = IamSim::start(LOOPBACK.into(), users.clone()).await.unwrap();
    let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mfa-gate.toml");
    let base = config_text(&sim.url(), &upstream.url(), "");
    std::fs::write(&path, &base).unwrap();
    let (process, listen, admin) = Process::start(&path).await;

    // A steady stream of requests by a user with MFA, all of which must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let stream = {
        let (stop, failures, sent) = (stop.clone(), failures.clone(), sent.clone());
        let url = format!("http://{listen}/app");
        let token = users[0].token.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let answer =
                    send(Method::GET, &url, &[("x-auth-token", &token)], Bytes::new()).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if answer.status != StatusCode::OK {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let public = format!("http://{listen}/public/x");
    assert_eq!(
        send(Method::GET, &public, &[], Bytes::new()).await.status,
        StatusCode::UNAUTHORIZED
    );

    // A good config by SIGHUP.
    let with_rule = format!("{base}[[allow]]\nname = \"public\"\npaths = [\"/public/**\"]\n");
    write_atomic(&path, &with_rule);
    process.signal("-HUP");
    wait_until(|| async {
        send(Method::GET, &public, &[], Bytes::new()).await.status == StatusCode::OK
    })
    .await;

    // A bad config noticed by the file watch: refused, counted, the old one keeps serving.
    write_atomic(
        &path,
        &format!("{with_rule}[polcy]\nmode = \"report_only\"\n"),
    );
    let metrics_url = format!("http://{admin}/metrics");
    wait_until(|| async {
        let text = send(Method::GET, &metrics_url, &[], Bytes::new())
            .await
            .text();
        metric_value(&text, "mfa_gate_config_reloads_total{result=\"error\"}") >= 1.0
    })
    .await;
    assert_eq!(
        send(Method::GET, &public, &[], Bytes::new()).await.status,
        StatusCode::OK
    );

    // A good config again by file change: the rule is gone.
    write_atomic(&path, &base);
    wait_until(|| async {
        send(Method::GET, &public, &[], Bytes::new()).await.status == StatusCode::UNAUTHORIZED
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    stream.await.unwrap();
    let text = send(Method::GET, &metrics_url, &[], Bytes::new())
        .await
        .text();
    // Two good reloads at least (the file watch may also pick up the SIGHUP'd file first).
    assert!(metric_value(&text, "mfa_gate_config_reloads_total{result=\"ok\"}") >= 2.0);
    let (code, lines) = process.terminate().await;
    assert_eq!(code, Some(0));
    assert!(sent.load(Ordering::Relaxed) > 10, "the stream ran");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests during reloads"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("config reload refused") && l.contains("polcy")),
        "the refused reload is logged with its cause"
    );
}

/// Replaces a file in one step, as Kubernetes does with ConfigMaps: a watcher never reads it
/// half written.
fn write_atomic(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_until<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..50 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition not reached within 5 s");
}

#[tokio::test]
async fn a_rotated_admin_token_file_takes_effect_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    let extra = format!("[admin]\ntoken_file = \"{}\"\n", token_file.display());
    let h = Harness::with_config(&extra).await;
    let path = dir.path().join("mfa-gate.toml");
    std::fs::write(&path, config_text(&h.sim.url(), &h.upstream.url(), &extra)).unwrap();
    let mut reloader = mfa_gate::reload::Reloader::new(&path, &h.gateway);
    let purge = h.admin_url("/admin/cache/purge");
    let with = |token: &'static str| [("authorization", token)];

    assert_eq!(
        send(
            Method::POST,
            &purge,
            &with("Bearer first-token"),
            Bytes::new()
        )
        .await
        .status,
        StatusCode::OK
    );
    std::fs::write(&token_file, "second-token\n").unwrap();
    reloader.poll(&h.gateway).await;
    assert_eq!(
        send(
            Method::POST,
            &purge,
            &with("Bearer first-token"),
            Bytes::new()
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(
            Method::POST,
            &purge,
            &with("Bearer second-token"),
            Bytes::new()
        )
        .await
        .status,
        StatusCode::OK
    );
}

/// The proxy keeps one service per client connection, with the upstream it last used cached:
/// a reload that moves `[upstream]` must still reach the next request on a connection that
/// stayed open across it.
#[tokio::test]
async fn a_new_upstream_reaches_the_next_request_of_a_connection_kept_open() {
    let h = Harness::start().await;
    let moved_to = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
    let stream = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let token = h.token("alice");
    let mut status = || {
        let request = http::Request::get("/where")
            .header("host", "localhost")
            .header("x-auth-token", &token)
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let answer = sender.send_request(request);
        async move {
            tokio::time::timeout(Duration::from_secs(10), answer)
                .await
                .expect("request timed out")
                .expect("request failed on the kept-open connection")
                .status()
        }
    };
    assert_eq!(status().await, StatusCode::OK);
    assert_eq!(h.upstream.request_count(), 1);

    let text = config_text(&h.sim.url(), &moved_to.url(), "");
    let config =
        mfa_gate::config::Config::from_toml(&text, std::path::Path::new("t.toml")).unwrap();
    h.gateway.reload(config).await.unwrap();

    assert_eq!(status().await, StatusCode::OK);
    assert_eq!(
        moved_to.request_count(),
        1,
        "the new upstream got the request"
    );
    assert_eq!(
        h.upstream.request_count(),
        1,
        "the old one got nothing more"
    );
}
