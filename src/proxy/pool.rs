//! The pool of keep-alive HTTP/1 connections to the one upstream.
//!
//! hyper-util's general client keys its pool by scheme and authority (hashed with SipHash on
//! every checkout and every return), races a new connection against each checkout and keeps a
//! reaper task; with a single upstream none of that is needed. Here the idle connections are a
//! stack: a request takes the most recently used one (its socket is the warmest, and the
//! others age out), and gives it back as soon as the answer's body has been read to its end.
//!
//! What it keeps from hyper-util: `TCP_NODELAY` and the connect timeout (set on the
//! connector), the idle timeout, and the retry of a request that a reused connection could not
//! take (the upstream closed it while it sat idle): such a request was never sent, so sending
//! it on another connection is safe whatever its method.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

use crate::server::workers;

/// How many times a request that a reused connection refused is tried on another one before
/// the pool opens a new connection for it.
const REUSE_ATTEMPTS: usize = 4;

/// A connection waiting for its next request.
struct Idle {
    sender: SendRequest<Incoming>,
    since: Instant,
}

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    /// Scheme and authority of the upstream: what the connector dials.
    origin: Uri,
    idle_timeout: Duration,
    /// One stack per worker lane ([`crate::server::workers`]): a connection's task runs on
    /// the worker that opened it, so it is lent only to requests on that worker. Oldest at
    /// the front, most recently used at the back.
    idle: Box<[Mutex<VecDeque<Idle>>]>,
}

/// Connections to the upstream. Cheap to clone.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to the upstream: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("upstream connection failed: {0}")]
    Http(#[source] hyper::Error),
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        idle_timeout: Duration,
    ) -> Pool {
        Pool(Arc::new(Inner {
            connector,
            origin,
            idle_timeout,
            idle: (0..workers::lanes())
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
        }))
    }

    /// Sends `request` (origin-form target, `Host` set) on an idle connection or a new one.
    /// The answer's body gives the connection back to the pool once read to its end.
    pub async fn send(
        &self,
        mut request: Request<Incoming>,
    ) -> Result<Response<PooledBody>, SendError> {
        let mut reused_attempts = 0;
        loop {
            // After a few refusals the request gets a new connection, and the idle ones are
            // left in the pool for others.
            let idle = if reused_attempts < REUSE_ATTEMPTS {
                self.take_idle().await
            } else {
                None
            };
            let (mut sender, reused) = match idle {
                Some(sender) => (sender, true),
                // Boxed: connecting (TCP, maybe TLS) is rare and its future is large; inline,
                // it would be part of every request's future and be copied with it.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.lease(sender, response)),
                Err(mut err) => match err.take_message() {
                    // Never written to the connection: safe to send elsewhere.
                    Some(unsent) if reused => {
                        tracing::debug!(cause = %err.error(), "idle upstream connection refused a request; trying another");
                        reused_attempts += 1;
                        request = unsent;
                    }
                    _ => return Err(SendError::Http(err.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that can take a request, if any.
    async fn take_idle(&self) -> Option<SendRequest<Incoming>> {
        loop {
            let idle = self.lane().lock().expect("pool lock").pop_back()?;
            if idle.sender.is_closed() || idle.since.elapsed() > self.0.idle_timeout {
                continue;
            }
            let mut sender = idle.sender;
            if sender.is_ready() {
                return Some(sender);
            }
            // Given back when its last body was read; the connection's task may not have
            // caught up yet. It becomes ready, or closed if the upstream ends the connection.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, SendError> {
        let io = self
            .0
            .connector
            .clone()
            .oneshot(self.0.origin.clone())
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            // `with_upgrades`: a WebSocket answer hands the connection over to the tunnel.
            if let Err(err) = connection.with_upgrades().await {
                tracing::debug!(cause = %err, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Wraps the answer so that its connection returns to the pool after its body.
    fn lease(
        &self,
        sender: SendRequest<Incoming>,
        response: Response<Incoming>,
    ) -> Response<PooledBody> {
        // A switched connection belongs to the tunnel from now on.
        let reusable = response.status() != StatusCode::SWITCHING_PROTOCOLS;
        let mut lease = reusable.then(|| Lease {
            sender,
            pool: self.clone(),
        });
        if response.body().is_end_stream() {
            if let Some(lease) = lease.take() {
                lease.release();
            }
        }
        response.map(|inner| PooledBody { inner, lease })
    }

    /// The idle connections of the calling thread's worker.
    fn lane(&self) -> &Mutex<VecDeque<Idle>> {
        &self.0.idle[workers::lane() % self.0.idle.len()]
    }

    fn put(&self, sender: SendRequest<Incoming>) {
        let now = Instant::now();
        let mut idle = self.lane().lock().expect("pool lock");
        // The oldest are at the front: drop those that have waited too long.
        while idle
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) > self.0.idle_timeout)
        {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }
}

/// A connection lent to one answer.
struct Lease {
    sender: SendRequest<Incoming>,
    pool: Pool,
}

impl Lease {
    fn release(self) {
        if !self.sender.is_closed() {
            self.pool.put(self.sender);
        }
    }
}

/// The upstream's answer body; gives its connection back to the pool once read to its end.
/// Dropped before that, the connection is not reused (hyper closes it: the rest of the body
/// is still on the wire).
pub struct PooledBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // hyper's server does not poll a body that says it has ended.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
