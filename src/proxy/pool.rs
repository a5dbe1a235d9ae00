//! The pool of keep-alive HTTP/1.1 connections to the one upstream, and the exchange of one
//! request and answer on such a connection ([`super::h1`] does the encoding and parsing).
//!
//! The request's own task does the exchange: it takes an idle connection (a stack, most
//! recently used first: its socket is the warmest, and the others age out), writes the request
//! head (and a small body) in one write, reads the answer's head, and hands hyper's server side
//! a body that reads the rest straight from the upstream socket. Once that body has been read to
//! its end the connection goes back to the pool. There is no connection task and no channel in
//! between, which is what hyper's client cost on every request.
//!
//! What it keeps from hyper-util's client: `TCP_NODELAY`, the connect timeout, the 90 s idle
//! timeout, TLS to the upstream (rustls), the hand-over of a `101 Switching Protocols`
//! connection to the WebSocket tunnel, and the retry of a request that a reused connection
//! turned out to be closed for: an idle connection the upstream has closed is noticed before
//! use, and one closed just as the request went out is retried when the request has no body
//! and its method is idempotent (RFC 9110 §9.2.2), so sending it again is safe.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use crate::stack::RequestBody;
use bytes::{Bytes, BytesMut};
use http::{Method, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_rustls::client::TlsStream;

use super::h1::{self, ChunkedDecoder, Decoded, ParseError, RequestFraming, ResponseFraming};

use crate::server::workers;

/// How many times a request that a reused connection turned out to be closed for is tried on
/// another idle one before the pool opens a new connection for it.
const REUSE_ATTEMPTS: usize = 4;

/// Room made in a connection's read buffer before each read.
const READ_SIZE: usize = 16 * 1024;

/// A request body's first bytes up to this size go out in the same write as its head.
const COALESCE_BYTES: usize = 16 * 1024;

/// A connection to the upstream, plain or TLS.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}

/// One keep-alive connection: the socket with its buffers, and the timer of its requests.
struct Conn {
    link: Link,
    /// `upstream.timeout` of the request on this connection. One timer for the connection's
    /// life, set again for each request: moving a registered deadline later is one atomic
    /// operation, where a fresh timer per request (`tokio::time::timeout`) is registered in the
    /// timer wheel and removed again, and wraps, so copies, the whole exchange's future.
    timer: Pin<Box<Sleep>>,
}

/// A connection's socket and buffers.
struct Link {
    io: Io,
    /// Bytes read from the upstream and not yet consumed.
    buffer: BytesMut,
    /// What is about to be written: the request head, with the start of its body.
    out: Vec<u8>,
}

impl Link {
    /// Whether an idle connection can still take a request: the upstream has neither closed
    /// it nor sent anything unasked. Costs no system call while the socket has been quiet.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match &mut self.io {
            Io::Plain(tcp) => match tcp.poll_read_ready(&mut cx) {
                Poll::Pending => true,
                Poll::Ready(Err(_)) => false,
                // Readable: the end of the stream, or bytes no request asked for; either way
                // the connection is done. A stale readiness reads as `WouldBlock`.
                Poll::Ready(Ok(())) => matches!(
                    tcp.try_read(&mut [0u8; 1]),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock
                ),
            },
            // TLS may carry records that are not data (a session ticket): let rustls read them.
            Io::Tls(tls) => {
                let mut byte = [0u8; 1];
                let mut buf = ReadBuf::new(&mut byte);
                Pin::new(&mut **tls)
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }

    /// Writes the request (`self.out` holds its head) and reads the answer's head; with it,
    /// whether the whole request went out (else the connection cannot be reused).
    async fn exchange(
        &mut self,
        request: &Outgoing<'_>,
        body: &mut RequestBody,
    ) -> Result<(h1::ResponseHead, bool), SendError> {
        match self.write_request(body, request.framing).await {
            Ok(()) => Ok((self.read_head(request).await?, true)),
            // An upstream may answer before the body is in (413, 401) and close the connection
            // without reading the rest; its answer is still in the socket, and is the one the
            // client should get rather than a 502.
            Err(SendError::Stale(write_error)) if request.framing.has_body() => {
                match self.read_head(request).await {
                    Ok(head) => Ok((head, false)),
                    Err(_) => Err(SendError::Stale(write_error)),
                }
            }
            Err(err) => Err(err),
        }
    }

    async fn write_request(
        &mut self,
        body: &mut RequestBody,
        framing: RequestFraming,
    ) -> Result<(), SendError> {
        let chunked = framing == RequestFraming::Chunked;
        if framing.has_body() {
            // Each piece goes out as soon as it came in (a streaming upload is not held back);
            // the head waits in `out` for the first one, so a small body travels with it.
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(SendError::Body)?;
                // Trailers are not forwarded (hyper's client did not either).
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    h1::chunk_size_line(&mut self.out, data.len());
                }
                if data.len() <= COALESCE_BYTES {
                    self.out.extend_from_slice(&data);
                } else {
                    self.io
                        .write_all(&self.out)
                        .await
                        .map_err(SendError::Stale)?;
                    self.out.clear();
                    self.io.write_all(&data).await.map_err(SendError::Stale)?;
                }
                if chunked {
                    self.out.extend_from_slice(b"\r\n");
                }
                self.io
                    .write_all(&self.out)
                    .await
                    .map_err(SendError::Stale)?;
                self.out.clear();
            }
            if chunked {
                self.out.extend_from_slice(h1::LAST_CHUNK);
            }
        }
        self.io
            .write_all(&self.out)
            .await
            .map_err(SendError::Stale)?;
        self.out.clear();
        self.io.flush().await.map_err(SendError::Stale)
    }

    /// Reads until an answer head (informational answers other than 101 are skipped).
    async fn read_head(&mut self, request: &Outgoing<'_>) -> Result<h1::ResponseHead, SendError> {
        let mut received = false;
        loop {
            if !self.buffer.is_empty() {
                received = true;
                let parsed = h1::parse_response_head(
                    &mut self.buffer,
                    request.method,
                    request.websocket,
                    request.kept_as,
                )?;
                if let Some(head) = parsed {
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        continue;
                    }
                    return Ok(head);
                }
            }
            self.buffer.reserve(READ_SIZE);
            match self.io.read_buf(&mut self.buffer).await {
                Ok(0) if !received => return Err(SendError::Closed),
                Ok(0) => return Err(SendError::ClosedMidHead),
                Ok(_) => {}
                Err(err) if !received => return Err(SendError::Stale(err)),
                Err(err) => return Err(SendError::Io(err)),
            }
        }
    }
}

/// A request as the upstream gets it.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// The whole head, encoded (request line, headers, framing header, blank line).
    pub head: &'a [u8],
    /// How `head` frames the body.
    pub framing: RequestFraming,
    /// A WebSocket upgrade: a 101 answer keeps its `Upgrade` header.
    pub websocket: bool,
    /// What the answer's headers are parsed into (who writes the answer to the client).
    pub kept_as: h1::KeptHeaders,
}

/// The upstream's answer.
pub struct Answer {
    pub response: Response<UpstreamBody>,
    /// Its header lines as they came, when asked for ([`h1::KeptHeaders::AsLines`]).
    pub relayed: Option<h1::RelayedHeaders>,
    /// When its head had been read: the end of the upstream's part for the caller's timing,
    /// without a reading of the clock of its own.
    pub at: tokio::time::Instant,
}

/// A connection waiting for its next request.
struct Idle {
    conn: Conn,
    /// By tokio's clock, as the requests' deadlines are (and as tests can move it).
    since: tokio::time::Instant,
}

/// Where the upstream is, and how to speak to it.
struct Inner {
    /// Host name or address as `TcpStream::connect` takes it (no brackets).
    host: String,
    port: u16,
    /// TLS to the upstream, for an `https` URL.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// One stack per worker lane ([`crate::server::workers`]): a socket is registered with
    /// the worker that opened it, so it is lent only to requests on that worker. Oldest at the
    /// front, most recently used at the back.
    idle: Box<[Mutex<VecDeque<Idle>>]>,
}

/// Connections to the upstream. Cheap to clone.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to the upstream: {0}")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("upstream connection closed before an answer")]
    Closed,
    /// Failed before the upstream sent anything: on a reused connection, a sign that it had
    /// closed the connection as the request went out.
    #[error("upstream connection failed: {0}")]
    Stale(#[source] io::Error),
    #[error("upstream connection closed in the middle of the answer head")]
    ClosedMidHead,
    #[error("upstream connection failed: {0}")]
    Io(#[source] io::Error),
    #[error("bad upstream answer: {0}")]
    Parse(#[from] ParseError),
    #[error("the client's request body failed: {0}")]
    Body(#[source] hyper::Error),
    /// No answer head by the request's deadline.
    #[error("no upstream answer in time")]
    Timeout,
}

/// An exchange on a connection that gives up when the connection's timer fires. The timer is
/// looked at only when the exchange has to wait.
struct Within<'a, F> {
    work: Pin<&'a mut F>,
    timer: Pin<&'a mut Sleep>,
}

impl<F, T> Future for Within<'_, F>
where
    F: Future<Output = Result<T, SendError>>,
{
    type Output = Result<T, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(outcome) = self.work.as_mut().poll(cx) {
            return Poll::Ready(outcome);
        }
        ready!(self.timer.as_mut().poll(cx));
        Poll::Ready(Err(SendError::Timeout))
    }
}

impl SendError {
    /// The connection was found closed before anything came back.
    fn is_stale(&self) -> bool {
        matches!(self, SendError::Closed | SendError::Stale(_))
    }
}

/// Methods whose request may be sent twice with the effect of once (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl Pool {
    /// A pool for the upstream at `url` (`http` or `https`; for `https`, `tls` is used).
    pub fn new(
        url: &Uri,
        tls: rustls::ClientConfig,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> anyhow::Result<Pool> {
        let https = url.scheme_str() == Some("https");
        let host = url
            .host()
            .ok_or_else(|| anyhow::anyhow!("upstream.url has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = match https {
            false => None,
            true => {
                let mut tls = tls;
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|err| anyhow::anyhow!("upstream.url: {host}: {err}"))?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(tls)), name))
            }
        };
        Ok(Pool(Arc::new(Inner {
            host,
            port,
            tls,
            connect_timeout,
            idle_timeout,
            idle: (0..workers::lanes())
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
        })))
    }

    /// Sends the request on an idle connection or a new one, and gives up at `deadline` if no
    /// answer head has come by then. The answer's body gives the connection back to the pool
    /// once read to its end. `now`: the caller's reading of the clock as it sends, against
    /// which idle connections are aged (a reading costs ~16 ns; the caller has one).
    pub async fn send(
        &self,
        request: Outgoing<'_>,
        mut body: RequestBody,
        now: tokio::time::Instant,
        deadline: tokio::time::Instant,
    ) -> Result<Answer, SendError> {
        let resendable = matches!(
            request.framing,
            RequestFraming::None | RequestFraming::Length(0)
        ) && is_idempotent(request.method);
        let mut reused_attempts = 0;
        loop {
            // After a few closed ones the request gets a new connection.
            let idle = if reused_attempts < REUSE_ATTEMPTS {
                self.take_idle(now)
            } else {
                None
            };
            let (mut conn, reused) = match idle {
                Some(mut conn) => {
                    conn.timer.as_mut().reset(deadline);
                    (conn, true)
                }
                // Boxed: connecting (TCP, maybe TLS) is rare and its future is large; inline,
                // it would be part of every request's future and be copied with it.
                None => match Box::pin(tokio::time::timeout_at(deadline, self.connect(deadline)))
                    .await
                {
                    Ok(conn) => (conn?, false),
                    Err(_) => return Err(SendError::Timeout),
                },
            };
            conn.link.out.extend_from_slice(request.head);
            let outcome = {
                let exchange = std::pin::pin!(conn.link.exchange(&request, &mut body));
                Within {
                    work: exchange,
                    timer: conn.timer.as_mut(),
                }
                .await
            };
            match outcome {
                Ok((head, complete)) => {
                    let at = tokio::time::Instant::now();
                    return Ok(self.answer(conn, head, complete, at));
                }
                Err(err) if reused && resendable && err.is_stale() => {
                    tracing::debug!(cause = %err, "reused upstream connection was closed; sending again");
                    reused_attempts += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// The answer, with a body that reads the rest from `conn`; its head was read `at`.
    fn answer(
        &self,
        conn: Conn,
        head: h1::ResponseHead,
        complete: bool,
        at: tokio::time::Instant,
    ) -> Answer {
        let framing = head.framing;
        let switching = head.status == StatusCode::SWITCHING_PROTOCOLS;
        let reusable =
            complete && !switching && framing != ResponseFraming::UntilClose && head.keep_alive;
        let mut body = UpstreamBody {
            state: BodyState::Done,
            lease: None,
            upgraded: None,
        };
        if switching {
            // The connection belongs to the tunnel from now on.
            body.upgraded = Some(Upgraded(conn));
        } else {
            body.state = match framing {
                ResponseFraming::None | ResponseFraming::Length(0) => BodyState::Done,
                ResponseFraming::Length(length) => BodyState::Length(length),
                ResponseFraming::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
                ResponseFraming::UntilClose => BodyState::UntilClose,
            };
            let whole = match body.state {
                BodyState::Done => true,
                BodyState::Length(length) => conn.link.buffer.len() as u64 >= length,
                _ => false,
            };
            body.lease = Some(Lease {
                conn,
                pool: self.clone(),
                reusable,
                idle_from: whole.then_some(at),
            });
            if matches!(body.state, BodyState::Done) {
                body.finish();
            }
        }
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        Answer {
            response,
            relayed: head.relayed,
            at,
        }
    }

    /// The most recently used idle connection that can take a request at `now`, if any.
    fn take_idle(&self, now: tokio::time::Instant) -> Option<Conn> {
        let mut idle = self.lane().lock().expect("pool lock");
        while let Some(Idle { mut conn, since }) = idle.pop_back() {
            if now.saturating_duration_since(since) > self.0.idle_timeout {
                // The rest are older still.
                idle.clear();
                return None;
            }
            if conn.link.is_open() {
                return Some(conn);
            }
        }
        None
    }

    /// A new connection, its timer set for the request at `deadline` that it is opened for.
    async fn connect(&self, deadline: tokio::time::Instant) -> Result<Conn, SendError> {
        let inner = &self.0;
        let connect = TcpStream::connect((inner.host.as_str(), inner.port));
        let tcp = match tokio::time::timeout(inner.connect_timeout, connect).await {
            Err(_) => {
                return Err(SendError::Connect(
                    format!("no connection within {:?}", inner.connect_timeout).into(),
                ))
            }
            Ok(Err(err)) => return Err(SendError::Connect(Box::new(err))),
            Ok(Ok(tcp)) => tcp,
        };
        // Nagle's algorithm plus delayed ACKs costs ~40 ms per small request on keep-alive
        // connections.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(cause = %err, "cannot set TCP_NODELAY upstream");
        }
        let io = match &inner.tls {
            None => Io::Plain(tcp),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|err| SendError::Connect(Box::new(err)))?;
                Io::Tls(Box::new(tls))
            }
        };
        Ok(Conn {
            link: Link {
                io,
                buffer: BytesMut::with_capacity(READ_SIZE),
                out: Vec::with_capacity(1024),
            },
            timer: Box::pin(tokio::time::sleep_until(deadline)),
        })
    }

    /// The idle connections of the calling thread's worker.
    fn lane(&self) -> &Mutex<VecDeque<Idle>> {
        &self.0.idle[workers::lane() % self.0.idle.len()]
    }

    /// `conn` is idle from `now` on.
    fn put(&self, conn: Conn, now: tokio::time::Instant) {
        let mut idle = self.lane().lock().expect("pool lock");
        // The oldest are at the front: drop those that have waited too long.
        while idle
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) > self.0.idle_timeout)
        {
            idle.pop_front();
        }
        idle.push_back(Idle { conn, since: now });
    }
}

/// A connection lent to one answer.
struct Lease {
    conn: Conn,
    pool: Pool,
    /// The upstream keeps the connection open after this answer.
    reusable: bool,
    /// When the connection is idle from, if the whole body came with the head (the common
    /// small answer): the head's reading. Otherwise the clock is read when the body ends.
    idle_from: Option<tokio::time::Instant>,
}

/// What is left of an answer's body.
enum BodyState {
    Done,
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

/// The upstream's answer body, read from its connection as hyper's server side asks for it.
/// Read to its end, it gives the connection back to the pool; dropped before that, it closes
/// the connection (the rest of the body is still on the wire).
pub struct UpstreamBody {
    state: BodyState,
    lease: Option<Lease>,
    upgraded: Option<Upgraded>,
}

/// The upstream connection of a `101 Switching Protocols` answer, for the tunnel.
pub struct Upgraded(Conn);

impl Upgraded {
    /// The connection, and what the upstream sent after the 101 head.
    pub fn into_parts(self) -> (Io, Bytes) {
        (self.0.link.io, self.0.link.buffer.freeze())
    }
}

impl UpstreamBody {
    /// The upstream connection of a `101` answer (once).
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        self.upgraded.take()
    }

    /// The body is complete: the connection goes back to the pool if it can be reused and
    /// nothing unasked is left in its buffer.
    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(lease) = self.lease.take() {
            if lease.reusable && lease.conn.link.buffer.is_empty() {
                let idle_from = lease.idle_from.unwrap_or_else(tokio::time::Instant::now);
                lease.pool.put(lease.conn, idle_from);
            }
        }
    }

    /// The body cannot be completed: the connection is closed.
    fn fail(&mut self, err: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.state = BodyState::Done;
        self.lease = None;
        Poll::Ready(Some(Err(err)))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(lease) = this.lease.as_mut() else {
                return Poll::Ready(None);
            };
            let buffer = &mut lease.conn.link.buffer;
            match &mut this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(remaining) if !buffer.is_empty() => {
                    let take =
                        usize::try_from(*remaining).map_or(buffer.len(), |r| r.min(buffer.len()));
                    let data = buffer.split_to(take).freeze();
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::Chunked(decoder) if !buffer.is_empty() => match decoder.decode(buffer) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => {}
                    Err(err) => return this.fail(io::Error::new(io::ErrorKind::InvalidData, err)),
                },
                BodyState::UntilClose if !buffer.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(buffer.split().freeze()))));
                }
                _ => {}
            }
            let conn = &mut lease.conn.link;
            conn.buffer.reserve(READ_SIZE);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.buffer
            )) {
                Ok(0) if matches!(this.state, BodyState::UntilClose) => {
                    this.state = BodyState::Done;
                    this.lease = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection in the middle of the body",
                    ))
                }
                Ok(_) => {}
                Err(err) => return this.fail(err),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(remaining) => SizeHint::with_exact(remaining),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `GET` through `pool`, its answer read to the end (which gives the connection back).
    async fn get(pool: &Pool) -> StatusCode {
        let response = send_get(pool).await;
        let status = response.status();
        response.into_body().collect().await.unwrap();
        status
    }

    /// A `GET` through `pool`: the answer as soon as its head is read.
    async fn send_get(pool: &Pool) -> Response<UpstreamBody> {
        let outgoing = Outgoing {
            method: &Method::GET,
            head: b"GET /x HTTP/1.1\r\nhost: upstream\r\n\r\n",
            framing: RequestFraming::None,
            websocket: false,
            kept_as: h1::KeptHeaders::InMap,
        };
        let now = tokio::time::Instant::now();
        let Answer { response, .. } = pool
            .send(
                outgoing,
                RequestBody::Empty,
                now,
                now + Duration::from_secs(5),
            )
            .await
            .expect("the upstream answers");
        response
    }

    /// Moves tokio's clock, by which idle connections are aged, and lets it run on.
    async fn idle_for(duration: Duration) {
        tokio::time::pause();
        tokio::time::advance(duration).await;
        tokio::time::resume();
    }

    /// An upstream without timers of its own (a demo server's keep-alive timeout would close
    /// the connection as the clock moves): answers every head with `200 ok`; counts the
    /// connections it accepted.
    async fn timeless_upstream() -> (Uri, Arc<std::sync::atomic::AtomicUsize>) {
        timeless_upstream_holding(None).await
    }

    /// [`timeless_upstream`], but the body of its very first answer, when `held` is given,
    /// follows the head only once `held` is notified.
    async fn timeless_upstream_holding(
        held: Option<Arc<tokio::sync::Notify>>,
    ) -> (Uri, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let first = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                let mut held = held.clone().filter(|_| first);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut chunk = [0u8; 512];
                    while let Ok(n @ 1..) = stream.read(&mut chunk).await {
                        seen.extend_from_slice(&chunk[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n";
                            if stream.write_all(head).await.is_err() {
                                return;
                            }
                            if let Some(held) = held.take() {
                                held.notified().await;
                            }
                            if stream.write_all(b"ok").await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    #[tokio::test]
    async fn an_idle_connection_is_reused_until_the_idle_timeout_and_not_after() {
        let (url, accepted) = timeless_upstream().await;
        let accepted = || accepted.load(std::sync::atomic::Ordering::SeqCst);
        let tls = crate::tls::client_config(None).unwrap();
        let pool = Pool::new(&url, tls, Duration::from_secs(5), Duration::from_secs(90)).unwrap();

        assert_eq!(get(&pool).await, StatusCode::OK);
        assert_eq!(get(&pool).await, StatusCode::OK);
        assert_eq!(accepted(), 1, "kept alive and reused");

        idle_for(Duration::from_secs(89)).await;
        assert_eq!(get(&pool).await, StatusCode::OK);
        assert_eq!(accepted(), 1, "89 s idle: still reused");

        idle_for(Duration::from_secs(91)).await;
        assert_eq!(get(&pool).await, StatusCode::OK);
        assert_eq!(accepted(), 2, "91 s idle: a new connection");
    }

    #[tokio::test]
    async fn a_connection_whose_body_came_after_its_head_is_idle_from_the_bodys_end() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (url, accepted) = timeless_upstream_holding(Some(Arc::clone(&release))).await;
        let accepted = || accepted.load(std::sync::atomic::Ordering::SeqCst);
        let tls = crate::tls::client_config(None).unwrap();
        let pool = Pool::new(&url, tls, Duration::from_secs(5), Duration::from_secs(90)).unwrap();

        let response = send_get(&pool).await;
        // 60 s between the head and the end of the body, then 60 s idle: 60 s since the
        // connection was last used, not 120.
        idle_for(Duration::from_secs(60)).await;
        release.notify_one();
        response.into_body().collect().await.unwrap();
        idle_for(Duration::from_secs(60)).await;
        assert_eq!(get(&pool).await, StatusCode::OK);
        assert_eq!(accepted(), 1, "60 s idle after its body: reused");
    }
}
