//! `server.header_read_timeout` for HTTP/1 connections: a connection that waits for a request
//! head — idle between requests, or with part of a head read — is closed once it has waited
//! that long. That cuts off slowloris clients and idle keep-alive connections alike.
//!
//! hyper has this timeout too, but it allocates and registers a fresh timer for every request
//! head, cancels it once the head is read, and polls the socket once more after every answer to
//! start the next one: about 1,100 instructions a request on the cached path, where this one
//! costs about 330 (callgrind: 32,860 -> 32,090 per request; bench/README.md, "Speed work").
//!
//! Here a connection has one timer for its whole life, looked at only when a read finds no
//! data, and then with one atomic load until it fires. The timer never runs later than the
//! moment the connection is due to be closed. When it fires, the connection is closed if it
//! has waited for a head for the whole timeout; otherwise the timer is set for the next moment
//! that could be due. On a busy connection that is once per timeout, not once per request.
//!
//! A connection waits for a head when every request hyper handed to the gateway has had its
//! answer written ([`Activity`]), it was not upgraded to a tunnel, and the framing observer
//! still follows it (HTTP/2, which hyper reads frame by frame, has no head timeout, in hyper
//! either). The wait starts when the last answer was done, or when the connection was accepted.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::proxy::h1::RelayedHeaders;

/// What the gateway is doing with a connection's requests, as the service sees it.
#[derive(Debug)]
pub struct Activity {
    /// When the connection was accepted.
    born: Instant,
    /// When the last answer was done (`born` before the first), in nanoseconds after `born`.
    answered_at: AtomicU64,
    /// Requests hyper handed to the gateway.
    started: AtomicU32,
    /// Answers whose body hyper has written (or dropped).
    finished: AtomicU32,
    /// A `101 Switching Protocols` went out: the connection is a tunnel from now on.
    upgraded: AtomicBool,
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            born: Instant::now(),
            answered_at: AtomicU64::new(0),
            started: AtomicU32::new(0),
            finished: AtomicU32::new(0),
            upgraded: AtomicBool::new(false),
        }
    }

    /// hyper handed the gateway a request on this connection.
    pub fn request_started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// The gateway answered: the answer's body counts its end through `done`.
    pub fn answered<B>(self: Arc<Self>, response: http::Response<B>) -> http::Response<Answer<B>> {
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            self.upgraded.store(true, Ordering::Relaxed);
        }
        response.map(|body| Answer {
            body,
            _done: AnswerDone(self),
        })
    }

    pub fn is_upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// Since when no request has been in the gateway's hands; `None` while one is, or once the
    /// connection is a tunnel.
    fn idle_since(&self) -> Option<Instant> {
        let finished = self.finished.load(Ordering::Acquire);
        if self.started.load(Ordering::Relaxed) != finished || self.is_upgraded() {
            return None;
        }
        let nanos = self.answered_at.load(Ordering::Relaxed);
        Some(self.born + Duration::from_nanos(nanos))
    }

    fn answer_done(&self) {
        let nanos = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.answered_at.store(nanos, Ordering::Relaxed);
        self.finished.fetch_add(1, Ordering::Release);
    }
}

/// Counts an answer finished when hyper drops its body: after the body's last frame is
/// written, or when the connection ends first.
struct AnswerDone(Arc<Activity>);

impl Drop for AnswerDone {
    fn drop(&mut self) {
        self.0.answer_done();
    }
}

/// An answer's body that tells the connection's [`Activity`] when hyper is done with it.
pub struct Answer<B> {
    body: B,
    _done: AnswerDone,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Answer<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B: super::own_h1::RelayingBody> super::own_h1::RelayingBody for Answer<B> {
    fn take_relayed(&mut self) -> Option<RelayedHeaders> {
        self.body.take_relayed()
    }
}

/// One connection's head timer.
pub struct HeadDeadline {
    timeout: Duration,
    activity: Arc<Activity>,
    /// Made at the first read that finds no data, on the worker that serves the connection (a
    /// timer belongs to the runtime it was made on). Never set later than the connection is due
    /// to be closed.
    timer: Option<Pin<Box<Sleep>>>,
}

impl HeadDeadline {
    pub fn new(timeout: Duration, activity: Arc<Activity>) -> Self {
        HeadDeadline {
            timeout,
            activity,
            timer: None,
        }
    }

    /// The connection was upgraded: it carries a tunnel's bytes now, with no head to wait for.
    pub fn is_tunnel(&self) -> bool {
        self.activity.is_upgraded()
    }

    /// Called when a read found no data. `following`: the framing observer still follows the
    /// connection's HTTP/1 requests (it stops for good on HTTP/2 and tunnels, which have no
    /// heads to wait for). An error once the connection has waited for a head for `timeout`.
    pub fn poll_expired(&mut self, following: bool, cx: &mut Context<'_>) -> io::Result<()> {
        if !following {
            return Ok(());
        }
        let first = self.activity.born + self.timeout;
        let timer = match &mut self.timer {
            // Polled before, so this connection's task is woken when it fires: until then
            // there is nothing to do, and `is_elapsed` is one atomic load.
            Some(timer) if !timer.is_elapsed() => return Ok(()),
            Some(timer) => timer,
            None => {
                let timer = self.timer.insert(Box::pin(tokio::time::sleep_until(first)));
                if timer.as_mut().poll(cx).is_pending() {
                    return Ok(());
                }
                timer
            }
        };
        let now = Instant::now();
        let next = match self.activity.idle_since() {
            Some(since) if now >= since + self.timeout => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no complete request head within server.header_read_timeout",
                ))
            }
            Some(since) => since + self.timeout,
            // Busy: a wait can start now at the earliest.
            None => now + self.timeout,
        };
        timer.as_mut().reset(next);
        // Registers this task's waker: `next` is still to come.
        let _ = timer.as_mut().poll(cx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn response(status: u16) -> http::Response<()> {
        http::Response::builder().status(status).body(()).unwrap()
    }

    fn seconds(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Moves the paused clock on by `after` seconds, then has a read find no data: whether the
    /// connection is cut off.
    async fn cut_off(deadline: &mut HeadDeadline, following: bool, after: u64) -> bool {
        tokio::time::advance(seconds(after)).await;
        let mut cx = Context::from_waker(Waker::noop());
        match deadline.poll_expired(following, &mut cx) {
            Ok(()) => false,
            Err(err) => {
                assert_eq!(err.kind(), io::ErrorKind::TimedOut);
                true
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_waits_one_timeout_for_its_first_head() {
        let mut deadline = HeadDeadline::new(seconds(10), Arc::new(Activity::new()));
        assert!(!cut_off(&mut deadline, true, 0).await);
        assert!(!cut_off(&mut deadline, true, 9).await);
        assert!(cut_off(&mut deadline, true, 2).await);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_starts_when_the_last_answer_is_done() {
        let activity = Arc::new(Activity::new());
        let mut deadline = HeadDeadline::new(seconds(10), Arc::clone(&activity));

        // A request in the gateway's hands for three timeouts: nothing runs out.
        activity.request_started();
        assert!(!cut_off(&mut deadline, true, 0).await);
        for _ in 0..3 {
            assert!(!cut_off(&mut deadline, true, 10).await);
        }
        let answer = Arc::clone(&activity).answered(response(200));
        assert!(!cut_off(&mut deadline, true, 5).await);
        // Done at 35 s: the connection may wait until 45 s.
        drop(answer);
        assert!(!cut_off(&mut deadline, true, 9).await);
        assert!(cut_off(&mut deadline, true, 2).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_never_times_out() {
        let activity = Arc::new(Activity::new());
        let mut deadline = HeadDeadline::new(seconds(1), Arc::clone(&activity));
        activity.request_started();
        drop(Arc::clone(&activity).answered(response(101)));
        assert!(deadline.is_tunnel());
        for _ in 0..3 {
            assert!(!cut_off(&mut deadline, true, 5).await);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_the_observer_left_never_times_out() {
        // HTTP/2: the observer stops at the preface.
        let mut deadline = HeadDeadline::new(seconds(1), Arc::new(Activity::new()));
        for _ in 0..3 {
            assert!(!cut_off(&mut deadline, false, 5).await);
        }
    }
}
