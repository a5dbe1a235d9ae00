//! The main listener: accept loop, HTTP/1.1 and HTTP/2 (h2c, or ALPN over TLS) through
//! hyper-util's auto builder, connection limits, graceful drain. On HTTP/1 connections (plain,
//! or TLS without ALPN `h2`) the common request (no body, no upgrade) is served by the
//! gateway's own path ([`own_h1`]) until the first one that is not, from which on hyper serves
//! the connection.

pub mod framing;
pub mod head_deadline;
pub mod own_h1;
pub mod workers;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderValue;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::either::Either;
use tower::ServiceExt;

use crate::stack::context::RequestContext;
use crate::stack::edge::ConnInfo;
use crate::stack::RequestBody;

use self::framing::{FramingObserver, FramingVerdicts, Observed};
use self::head_deadline::{Activity, HeadDeadline};
use crate::stack::GatewayService;

/// hyper refuses a read buffer under 8 KiB.
const MIN_BUF_SIZE: usize = 8192;

/// Connection-level settings of the main listener.
#[derive(Clone)]
pub struct ServeSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
    /// Present when the listener speaks HTTPS; swapped in place when the files change.
    pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// A connection ended with an error. Requests hyper refused while parsing (malformed framing,
/// header syntax, too many or too large headers) never reach the stack, so they are counted
/// and logged here as `bad_request` decisions; hyper has already answered 400 or 431.
fn connection_error(
    err: &(dyn std::error::Error + Send + Sync + 'static),
    metrics: &crate::metrics::Metrics,
    peer: std::net::SocketAddr,
) {
    let parse = err
        .downcast_ref::<hyper::Error>()
        .filter(|err| err.is_parse() || err.is_parse_too_large());
    match parse {
        Some(parse) => {
            let status: u16 = if parse.is_parse_too_large() { 431 } else { 400 };
            metrics.decision_counters[1][crate::decision::Reason::BadRequest.index()].inc();
            tracing::info!(
                target: "mfa_gate::access",
                request_id = "-", method = "-", path = "-", status,
                decision = "deny", reason = "bad_request", user_id = "-", rule = "-",
                client = %peer.ip(), latency_ms = 0.0, error = %parse,
                "request"
            );
        }
        None => tracing::debug!(cause = %err, "connection ended with an error"),
    }
}

/// hyper's read buffer: room for the guard to measure an over-long header block and answer
/// 431 with a JSON body; blocks beyond this buffer get hyper's own bare 431.
fn buf_size(settings: &ServeSettings) -> usize {
    (settings.max_header_bytes + 16 * 1024).max(MIN_BUF_SIZE)
}

fn builder(settings: &ServeSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slowloris: a client dribbling its headers is cut off, by the connection's own
        // `HeadDeadline` (one timer per connection, where hyper's costs one per request).
        .header_read_timeout(None)
        .max_buf_size(buf_size(settings))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Serves `listener` until `shutdown` turns true, then stops accepting and lets open
/// connections finish for up to `shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    service: GatewayService,
    settings: ServeSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = builder(&settings);
    let graceful = GracefulShutdown::new();
    let proto = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(cause = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::server::stopped(&mut shutdown) => break,
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(cause = %err, "cannot set TCP_NODELAY");
        }
        let framing = FramingVerdicts::default();
        let observer = FramingObserver::new(framing.clone(), buf_size(&settings));
        let conn_info = Arc::new(ConnInfo {
            peer,
            peer_ip: HeaderValue::try_from(peer.ip().to_string())
                .expect("an IP address is a valid header value"),
            proto,
            framing,
            key_memo: Default::default(),
            identity_lines: Default::default(),
        });
        let activity = Arc::new(Activity::new());
        let deadline = HeadDeadline::new(settings.header_read_timeout, Arc::clone(&activity));
        // Every request of the connection, whichever server read it, starts here;
        // `own_writer`: the gateway's own HTTP/1.1 path writes the answer. Gives back what
        // the answer reports its end to.
        let start = {
            let activity = Arc::clone(&activity);
            move |request: &mut hyper::Request<RequestBody>, own_writer: bool| {
                request
                    .extensions_mut()
                    .insert(RequestContext::new(Arc::clone(&conn_info), own_writer));
                activity.request_started();
                Arc::clone(&activity)
            }
        };
        let hyper_start = start.clone();
        let hyper_stack = service.clone();
        let hyper_service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(RequestBody::Hyper);
            let activity = hyper_start(&mut request, false);
            let answer = hyper_stack.clone().oneshot(request);
            async move {
                let Ok(response) = answer.await;
                Ok::<_, Infallible>(activity.answered(response))
            }
        });
        let mut own_stack = service.clone();
        let builder = builder.clone();
        // Held by the connection's task from the start: the drain waits for it whichever
        // server is serving the connection.
        let watcher = graceful.watcher();
        let acceptor = settings
            .tls
            .as_ref()
            .map(|tls| tokio_rustls::TlsAcceptor::from(tls.load_full()));
        let handshake_timeout = settings.header_read_timeout;
        let metrics = settings.metrics.clone();
        let max_head = buf_size(&settings);
        let shutdown = shutdown.clone();
        workers::spawn_connection(stream, peer, move |stream| async move {
            let stream = match acceptor {
                None => Either::Left(stream),
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => Either::Right(stream),
                        Ok(Err(err)) => {
                            tracing::debug!(cause = %err, client = %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(client = %peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            // HTTP/2 is hyper's from the start when ALPN chose it (h2c's preface, on a plain
            // connection, the own path hands over).
            let h2 = matches!(&stream, Either::Right(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2"));
            let stream = if h2 {
                own_h1::Rewound::new(Bytes::new(), Observed::new(stream, observer, deadline))
            } else {
                // The common request is served by the gateway's own HTTP/1.1 path; hyper takes
                // the connection over at the first one that is not.
                let stream = Observed::behind_own_path(stream, observer, deadline);
                let own_answer = move |mut request| {
                    let activity = start(&mut request, true);
                    let answer = call_now(&mut own_stack, request);
                    async move {
                        let Ok(response) = answer.await;
                        activity.answered(response)
                    }
                };
                match own_h1::serve(stream, own_answer, max_head, shutdown).await {
                    own_h1::Outcome::Closed => return drop(watcher),
                    own_h1::Outcome::HandOver { read, mut io } => {
                        io.hand_over(&read);
                        own_h1::Rewound::new(read, io)
                    }
                }
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), hyper_service)
                .into_owned();
            if let Err(err) = watcher.watch(conn).await {
                connection_error(&*err, &metrics, peer);
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::info!(open_connections = open, grace = ?settings.shutdown_grace, "draining");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(settings.shutdown_grace) => {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
        }
    }
}

/// The stack's answer to `request`, from the connection's own `stack` when that is ready at
/// once — the gateway's layers are: what they wait for is in the futures they return — so that
/// a request does not clone the stack (a reference count touched per layer, twice); from a
/// clone driven ready first (tower's `oneshot`) when it is not.
fn call_now<S, R>(stack: &mut S, request: R) -> Either<S::Future, tower::util::Oneshot<S, R>>
where
    S: tower::Service<R, Error = Infallible> + Clone,
{
    // Polled with a waker that does nothing: a `Pending` here is not waited on, the clone is.
    match stack.poll_ready(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(Ok(())) => Either::Left(stack.call(request)),
        std::task::Poll::Ready(Err(never)) => match never {},
        std::task::Poll::Pending => Either::Right(stack.clone().oneshot(request)),
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here rather than across an await.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use super::*;

    /// Not ready at its first poll (it asks to be polled again), ready after; answers with
    /// how many polls it took and counts its calls.
    #[derive(Clone, Default)]
    struct SlowToStart {
        polls: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
    }

    impl tower::Service<&'static str> for SlowToStart {
        type Response = String;
        type Error = Infallible;
        type Future = std::future::Ready<Result<String, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.polls.fetch_add(1, Ordering::SeqCst) == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: &'static str) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let polls = self.polls.load(Ordering::SeqCst);
            std::future::ready(Ok(format!("{request} after {polls} polls")))
        }
    }

    #[tokio::test]
    async fn a_stack_ready_at_once_is_called_in_place_and_one_that_is_not_through_a_driven_clone() {
        let mut stack = SlowToStart::default();
        // Not ready at once: served by a clone that is polled ready with the task's waker.
        let first = call_now(&mut stack, "first");
        assert!(matches!(first, Either::Right(_)));
        assert_eq!(first.await, Ok("first after 2 polls".to_string()));
        // Ready now: called in place, no clone, no further wait.
        let second = call_now(&mut stack, "second");
        assert!(matches!(second, Either::Left(_)));
        assert_eq!(second.await, Ok("second after 3 polls".to_string()));
        assert_eq!(stack.calls.load(Ordering::SeqCst), 2);
    }
}
