//! The gateway's own HTTP/1.1 server for the common request: a head without a body, read,
//! decided and answered here. hyper takes the connection over at the first request that is
//! anything else, and serves it from there on.
//!
//! Why: on the cached path hyper's server side (its dispatcher and connection state machine,
//! the auto builder's HTTP/2 detection, a read buffer re-allocated on most requests, the answer
//! encoded through its generic machinery) cost about a third of the gateway's instructions per
//! request (bench/README.md, "Profile"), as its client side did before `crate::proxy::h1`.
//!
//! What is served here: HTTP/1.1 requests in origin form whose head httparse reads within the
//! listener's head limit, with no body (no `Content-Length` other than `0`, no
//! `Transfer-Encoding`), no `Expect`, `Upgrade`, `TE` or `HTTP2-Settings`, `Connection` absent,
//! `keep-alive` or `close` (answered with `connection: close`, then the connection ends: what
//! health probes and clients without keep-alive send, each on a new connection), and a method
//! other than `HEAD` and `CONNECT`. Anything else — HTTP/1.0, HTTP/2's preface, a body, an
//! upgrade, a `Connection` naming other headers, a malformed, oversized or unfinished head — is
//! handed to hyper ([`Outcome::HandOver`]) with the bytes already read,
//! so hyper parses that request from its first byte, as if it had read the connection all
//! along: the refusals (400, 431), body framing, 100-continue, upgrades and keep-alive rules
//! of those requests stay hyper's.
//!
//! The answers follow hyper's encoding: `HTTP/1.1 <code> <canonical reason>`, the headers in
//! the map's order, lowercase, `content-length` from the body's exact size (else
//! `transfer-encoding: chunked`), none for 1xx, 204 and 304, and a `date` unless the answer has
//! one. A forwarded answer's own headers come after the map's, as the upstream's lines were
//! (its order and spelling; hop-by-hop ones left out; `crate::proxy::h1::RelayedHeaders`), as
//! nginx relays them. A body error, or a body shorter or longer than its length, ends the
//! connection, as in hyper.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRAILER, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::proxy::h1::{
    chunk_size_line, header, header_name, RelayedHeaders, LAST_CHUNK, SET_BY_GATEWAY,
};
use crate::proxy::lower::is_lower;
use crate::stack::RequestBody;

/// An answer body; a forwarded answer's brings the upstream's header lines for this writer
/// ([`crate::proxy::h1::KeptHeaders::AsLines`]).
pub trait RelayingBody: Body<Data = Bytes> + Unpin {
    fn take_relayed(&mut self) -> Option<RelayedHeaders>;
}

impl RelayingBody for crate::proxy::Body {
    fn take_relayed(&mut self) -> Option<RelayedHeaders> {
        crate::proxy::Body::take_relayed(self)
    }
}

/// hyper's limit on a request's header lines (beyond it hyper answers 431).
const MAX_HEADERS: usize = 100;

/// The header lines of a request whose offsets are kept on the stack (a client's 5–15).
const FEW_HEADERS: usize = 24;

/// The read buffer's size, and the room it keeps for a read.
const READ_BUF: usize = 8 * 1024;
const MIN_READ_ROOM: usize = 1024;

/// Answer bytes collected before they are written even if the body has more to come; a body
/// piece larger than this is written as it is, not copied.
const WRITE_COALESCE: usize = 16 * 1024;

/// How the gateway's own handling of a connection ended.
pub enum Outcome<IO> {
    /// The connection is done: closed by either side, broken, or drained.
    Closed,
    /// A request this path does not serve: hyper serves the connection from it on, starting
    /// with the bytes already read (`read`, from the start of that request's head).
    HandOver { read: Bytes, io: IO },
}

/// A connection with bytes read from it that its next reader must see first.
pub struct Rewound<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Rewound<IO> {
    pub fn new(prefix: Bytes, inner: IO) -> Self {
        Rewound { prefix, inner }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewound<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let take = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..take]);
        self.prefix.advance(take);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewound<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `io`'s requests with `answer` for as long as they are the common kind (see the
/// module's documentation), until the connection closes, `shutdown` turns true while it is
/// idle or after an answer, or a request goes to hyper. `max_head`: the listener's head limit
/// (hyper's read buffer size, so that hyper, handed an over-long head, refuses it as before).
pub async fn serve<IO, A, F, B>(
    mut io: IO,
    mut answer: A,
    max_head: usize,
    shutdown: watch::Receiver<bool>,
) -> Outcome<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    A: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Response<B>>,
    B: RelayingBody,
    B::Error: std::fmt::Display,
{
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut out = Vec::with_capacity(1024);
    // Registered once for the connection's life (a wait per request cost ~500 instructions).
    // A drain that began before this connection was accepted is not a change `shutdown`
    // reports: it is read once here.
    let draining_before = *shutdown.borrow();
    let mut drain_watch = shutdown.clone();
    let drain = crate::server::stopped(&mut drain_watch);
    tokio::pin!(drain);
    loop {
        let (request, client_closes) = loop {
            match parse_request(&mut buf, max_head) {
                Parsed::Request(request, closes) => break (request, closes),
                Parsed::Partial => {}
                Parsed::NotOurs => {
                    return Outcome::HandOver {
                        read: buf.freeze(),
                        io,
                    }
                }
            }
            if buf.capacity() - buf.len() < MIN_READ_ROOM {
                buf.reserve(READ_BUF);
            }
            let read = if buf.is_empty() {
                // Idle between requests: a drain closes the connection here. The read is
                // tried first, so that the drain's wait (a mutex inside tokio's `Notify`) is
                // polled only when there is nothing to read yet, not again when the next
                // request has arrived (a request sent before the drain is still answered,
                // with `Connection: close`).
                tokio::select! {
                    biased;
                    read = io.read_buf(&mut buf) => read,
                    _ = &mut drain => return Outcome::Closed,
                }
            } else {
                io.read_buf(&mut buf).await
            };
            match read {
                Ok(0) if buf.is_empty() => return Outcome::Closed,
                // The client stopped in the middle of a head: what to say to that is hyper's.
                Ok(0) => {
                    return Outcome::HandOver {
                        read: buf.freeze(),
                        io,
                    }
                }
                Ok(_) => {}
                Err(_) => return Outcome::Closed,
            }
        };
        // The connection is watched while the answer is awaited, as hyper watches it: a
        // client that hangs up cancels its request (the IAM lookups it started go on detached;
        // `crate::cache`), and a pipelined request is read meanwhile.
        let answering = answer(request);
        tokio::pin!(answering);
        let response = loop {
            let room = buf.capacity() - buf.len() >= MIN_READ_ROOM;
            tokio::select! {
                biased;
                response = &mut answering => break response,
                read = io.read_buf(&mut buf), if room => match read {
                    Ok(0) | Err(_) => return Outcome::Closed,
                    Ok(_) => {}
                },
            }
        };
        // The only value ever sent is `true`: a change is a drain. (`has_changed` is one
        // load; `borrow` takes the channel's read lock, two atomic read-modify-writes.)
        let closing =
            client_closes || draining_before || matches!(shutdown.has_changed(), Ok(true));
        let keep = write_response(&mut io, &mut out, response, closing).await;
        if !keep || closing {
            let _ = io.shutdown().await;
            return Outcome::Closed;
        }
        // A connection kept open long does not keep the buffers of its largest request.
        if buf.is_empty() && buf.capacity() > 4 * READ_BUF {
            buf = BytesMut::with_capacity(READ_BUF);
        }
    }
}

/// What the front of the read buffer holds. (The request is not boxed: that would cost an
/// allocation per request to save a move.) Public for the `own_h1_parse` fuzz target only.
#[doc(hidden)]
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// A whole request this path serves (its head has been taken from the buffer), and whether
    /// the client asked to close the connection after it (`Connection: close`).
    Request(Request<RequestBody>, bool),
    /// The start of a head that may still turn out to be one.
    Partial,
    /// Something for hyper (the buffer is as it was).
    NotOurs,
}

/// Where a header line's name and value are in the head, as offsets (a head is smaller than
/// 4 GiB).
type Line = (u32, u32, u32, u32);

/// Reads a request from the front of `buf` if it is one this path serves (see the module's
/// documentation); public for the `own_h1_parse` fuzz target only.
#[doc(hidden)]
pub fn parse_request(buf: &mut BytesMut, max_head: usize) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(length)) if length <= max_head => length,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Parsed::Partial,
        _ => return Parsed::NotOurs,
    };
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Parsed::NotOurs;
    };
    let method = match method {
        "GET" => Method::GET,
        "HEAD" | "CONNECT" => return Parsed::NotOurs,
        other => match Method::from_bytes(other.as_bytes()) {
            Ok(method) => method,
            Err(_) => return Parsed::NotOurs,
        },
    };
    if !path.starts_with('/') {
        return Parsed::NotOurs;
    }
    let lines = &*parsed.headers;
    let base = buf.as_ptr() as usize;
    let offset = |bytes: &[u8]| (bytes.as_ptr() as usize - base) as u32;
    let mut few = [(0u32, 0u32, 0u32, 0u32); FEW_HEADERS];
    let mut many = Vec::new();
    let kept: &mut [Line] = if lines.len() <= FEW_HEADERS {
        &mut few
    } else {
        many.resize(lines.len(), (0, 0, 0, 0));
        &mut many
    };
    let mut closes = false;
    for (slot, line) in kept.iter_mut().zip(lines) {
        let name = line.name.as_bytes();
        match verdict(name, line.value) {
            LineVerdict::Ours => {}
            LineVerdict::OursThenClose => closes = true,
            LineVerdict::Hypers => return Parsed::NotOurs,
        }
        *slot = (
            offset(name),
            name.len() as u32,
            offset(line.value),
            line.value.len() as u32,
        );
    }
    let count = lines.len();
    let path_at = offset(path.as_bytes()) as usize;
    let path_len = path.len();

    let head = buf.split_to(length).freeze();
    match build(&head, method, path_at..path_at + path_len, &kept[..count]) {
        Some(request) => Parsed::Request(request, closes),
        None => {
            // Put the head back for hyper (rare: a target or header `http` refuses).
            let mut again = BytesMut::with_capacity(head.len() + buf.len());
            again.extend_from_slice(&head);
            again.extend_from_slice(buf);
            *buf = again;
            Parsed::NotOurs
        }
    }
}

/// What a request header line makes of its request for this path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineVerdict {
    /// Leaves the request to this path.
    Ours,
    /// `Connection: close`: this path's, and the connection ends after its answer.
    OursThenClose,
    /// The request is hyper's.
    Hypers,
}

fn verdict(name: &[u8], value: &[u8]) -> LineVerdict {
    let ours = match name.len() {
        2 => !is_lower!(name, b"te"),
        6 => !is_lower!(name, b"expect"),
        7 => !is_lower!(name, b"upgrade"),
        10 if is_lower!(name, b"connection") => {
            if is_lower!(value, b"close") {
                return LineVerdict::OursThenClose;
            }
            is_lower!(value, b"keep-alive")
        }
        14 if is_lower!(name, b"content-length") => value == b"0",
        14 => !is_lower!(name, b"http2-settings"),
        17 => !is_lower!(name, b"transfer-encoding"),
        _ => true,
    };
    if ours {
        LineVerdict::Ours
    } else {
        LineVerdict::Hypers
    }
}

/// The request of a head whose parts `http` accepts; header values share the head's bytes.
fn build(
    head: &Bytes,
    method: Method,
    path: std::ops::Range<usize>,
    lines: &[Line],
) -> Option<Request<RequestBody>> {
    let uri = Uri::from_maybe_shared(head.slice(path)).ok()?;
    let mut headers = HeaderMap::with_capacity(lines.len());
    for &(name_at, name_len, value_at, value_len) in lines {
        let (name_at, value_at) = (name_at as usize, value_at as usize);
        let name = header_name(&head[name_at..name_at + name_len as usize])?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len as usize))
                .ok()?;
        headers.append(name, value);
    }
    let mut request = Request::new(RequestBody::Empty);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(request)
}

/// How an answer's body is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// Writes `response` (with `connection: close` if `closing`); whether the connection can
/// carry another request.
async fn write_response<IO, B>(
    io: &mut IO,
    out: &mut Vec<u8>,
    response: Response<B>,
    closing: bool,
) -> bool
where
    IO: AsyncWrite + Unpin,
    B: RelayingBody,
    B::Error: std::fmt::Display,
{
    let (parts, mut body) = response.into_parts();
    out.clear();
    let relayed = body.take_relayed();
    let (framing, mut keep) = encode_head(
        out,
        parts.status,
        &parts.headers,
        relayed.as_ref(),
        &body,
        closing,
    );
    let mut remaining = match framing {
        Framing::Length(length) => length,
        Framing::Chunked => 0,
    };
    if framing != Framing::Length(0) {
        while !body.is_end_stream() {
            let data = match body.frame().await {
                None => break,
                Some(Err(err)) => {
                    tracing::debug!(cause = %err, "answer body failed; closing the connection");
                    keep = false;
                    break;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    // Trailers are not sent (hyper sends them only when asked with `TE`).
                    _ => continue,
                },
            };
            if let Framing::Length(_) = framing {
                if data.len() as u64 > remaining {
                    tracing::debug!("answer body longer than its length; closing");
                    keep = false;
                    break;
                }
                remaining -= data.len() as u64;
            } else {
                chunk_size_line(out, data.len());
            }
            // A small piece travels with what is pending; a large one is written as it is
            // rather than copied (and the buffer stays small).
            if data.len() <= WRITE_COALESCE {
                out.extend_from_slice(&data);
            } else if !send(io, out).await || io.write_all(&data).await.is_err() {
                return false;
            }
            if framing == Framing::Chunked {
                out.extend_from_slice(b"\r\n");
            }
            // A body with more to come is sent as it comes (a stream is not held back).
            if (!body.is_end_stream() || out.len() >= WRITE_COALESCE) && !send(io, out).await {
                return false;
            }
        }
    }
    match framing {
        Framing::Chunked if keep => out.extend_from_slice(LAST_CHUNK),
        Framing::Length(_) if remaining > 0 => {
            tracing::debug!("answer body shorter than its length; closing");
            keep = false;
        }
        _ => {}
    }
    drop(body);
    send(io, out).await && keep
}

/// Writes and empties `out`, then flushes (a TLS stream may hold records back until asked; on
/// plain TCP a flush does nothing); whether that worked. Flushed even with nothing pending: a
/// large body piece may have been written directly.
async fn send<IO: AsyncWrite + Unpin>(io: &mut IO, out: &mut Vec<u8>) -> bool {
    let written = (out.is_empty() || io.write_all(out).await.is_ok()) && io.flush().await.is_ok();
    out.clear();
    written
}

/// The status line and headers of an answer, as hyper writes them; its body's framing, and
/// whether the connection stays open after it. `relayed`: the upstream's header lines, written
/// after `headers` as they came.
fn encode_head<B: Body>(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    relayed: Option<&RelayedHeaders>,
    body: &B,
    closing: bool,
) -> (Framing, bool) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // 1xx, 204 and 304 have no body and no length.
    let bodyless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let exact = if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    let mut framing = None;
    let mut keep = !closing;
    let mut dated = false;
    for (name, value) in headers {
        if *name == CONTENT_LENGTH {
            if bodyless || framing.is_some() || exact == Some(0) {
                continue;
            }
            // The body's own size first; a streamed body of unknown size by the header.
            let length = exact.or_else(|| {
                std::str::from_utf8(value.as_bytes())
                    .ok()
                    .and_then(|text| text.trim().parse().ok())
            });
            if let Some(length) = length {
                header(
                    out,
                    "content-length",
                    itoa::Buffer::new().format(length).as_bytes(),
                );
                framing = Some(Framing::Length(length));
            }
            continue;
        }
        // The framing is this writer's to choose.
        if *name == TRANSFER_ENCODING || *name == TRAILER {
            continue;
        }
        if *name == CONNECTION
            && value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            keep = false;
        }
        dated |= *name == DATE;
        header(out, name.as_str(), value.as_bytes());
    }
    if let Some(relayed) = relayed {
        write_relayed(out, relayed, headers);
        dated |= relayed.dated;
    }
    let framing = match framing {
        Some(framing) => framing,
        None if bodyless => Framing::Length(0),
        None => match exact {
            Some(length) => {
                header(
                    out,
                    "content-length",
                    itoa::Buffer::new().format(length).as_bytes(),
                );
                Framing::Length(length)
            }
            None => {
                header(out, "transfer-encoding", b"chunked");
                Framing::Chunked
            }
        },
    };
    if closing {
        header(out, "connection", b"close");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        write_date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let framing = if bodyless {
        Framing::Length(0)
    } else {
        framing
    };
    (framing, keep)
}

/// Appends the upstream's header lines. Those the gateway sets on a forwarded answer (`map`)
/// were left out as they were parsed ([`SET_BY_GATEWAY`]), with the hop-by-hop ones and
/// `Content-Length`.
fn write_relayed(out: &mut Vec<u8>, relayed: &RelayedHeaders, map: &HeaderMap) {
    debug_assert!(
        map.keys().all(|name| SET_BY_GATEWAY.contains(name)),
        "a forwarded answer got a header the upstream's lines may hold too: {:?}",
        map.keys().collect::<Vec<_>>()
    );
    out.extend_from_slice(&relayed.lines);
}

thread_local! {
    /// The IMF-fixdate of the current second, formatted once per second per thread.
    static CURRENT_DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
}

/// Appends the current time as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn write_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    CURRENT_DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == date.1.len() {
                date.1.copy_from_slice(text.as_bytes());
                date.0 = second;
            } else {
                out.extend_from_slice(text.as_bytes());
                return;
            }
        }
        out.extend_from_slice(&date.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;
    use http_body_util::{Empty, Full};

    fn parse(text: &str) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(text);
        (parse_request(&mut buf, 64 * 1024), buf)
    }

    #[test]
    fn a_plain_request_without_a_body_is_ours_and_leaves_what_follows() {
        let (parsed, rest) = parse(
            "GET /a/b?c=1 HTTP/1.1\r\nHost: app\r\nX-Auth-Token: t\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next",
        );
        let Parsed::Request(request, false) = parsed else {
            panic!("not ours, or taken for a close");
        };
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri(), "/a/b?c=1");
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.headers()["host"], "app");
        assert_eq!(request.headers()["x-auth-token"], "t");
        let twos: Vec<_> = request.headers().get_all("x-two").iter().collect();
        assert_eq!(twos, ["1", "2"]);
        assert_eq!(&rest[..], b"GET /next");
        for ours in [
            "DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "GET /x HTTP/1.1\r\nConnection: Keep-Alive\r\n\r\n",
            "GET /x HTTP/1.1\r\nUser-Agent: close\r\n\r\n",
            "OPTIONS /x HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse(ours).0, Parsed::Request(_, false)),
                "{ours:?}"
            );
        }
    }

    #[test]
    fn a_request_asking_to_close_is_ours_and_says_so() {
        for closing in [
            "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /x HTTP/1.1\r\nHost: a\r\nconnection: Close\r\n\r\n",
            "GET /x HTTP/1.1\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
        ] {
            let Parsed::Request(request, true) = parse(closing).0 else {
                panic!("not ours, or not taken for a close: {closing:?}");
            };
            // Left in the request: the proxy drops it as hop-by-hop, as for hyper's requests.
            assert!(request.headers().contains_key(CONNECTION), "{closing:?}");
        }
    }

    #[test]
    fn anything_unusual_is_left_to_hyper_untouched() {
        for theirs in [
            "GET /x HTTP/1.0\r\nHost: a\r\n\r\n",
            "HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            "GET /x HTTP/1.1\r\nConnection: close, x-secret\r\n\r\n",
            "GET /x HTTP/1.1\r\nConnection: closed\r\n\r\n",
            "GET /x HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /x HTTP/1.1\r\nTE: trailers\r\n\r\n",
            "GET /x HTTP/1.1\r\nHTTP2-Settings: AAA\r\n\r\n",
            "GET /x HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET /x HTTP/1.1\r\nX: caf\u{7f}\r\n\r\n",
            "GE\x01T /x HTTP/1.1\r\n\r\n",
        ] {
            let (parsed, rest) = parse(theirs);
            assert!(matches!(parsed, Parsed::NotOurs), "{theirs:?}");
            assert_eq!(&rest[..], theirs.as_bytes(), "the bytes are kept for hyper");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(
            matches!(parse(&many).0, Parsed::NotOurs),
            "too many headers"
        );
        let long = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(100));
        assert!(matches!(
            parse_request(&mut BytesMut::from(long.as_str()), 64),
            Parsed::NotOurs
        ));
    }

    #[test]
    fn a_head_still_arriving_is_waited_for_until_the_limit() {
        assert!(matches!(parse("").0, Parsed::Partial));
        assert!(matches!(
            parse("GET /x HTTP/1.1\r\nHost: a").0,
            Parsed::Partial
        ));
        let mut buf = BytesMut::from("GET /x HTTP/1.1\r\nx: aaaaaaaaaa");
        assert!(matches!(parse_request(&mut buf, 16), Parsed::NotOurs));
    }

    #[test]
    fn more_header_lines_than_fit_on_the_stack_are_all_kept() {
        let lines: String = (0..FEW_HEADERS + 3)
            .map(|i| format!("x-{i}: v{i}\r\n"))
            .collect();
        let (parsed, _) = parse(&format!("GET / HTTP/1.1\r\n{lines}\r\n"));
        let Parsed::Request(request, _) = parsed else {
            panic!("not ours");
        };
        assert_eq!(request.headers().len(), FEW_HEADERS + 3);
        assert_eq!(request.headers()["x-26"], "v26");
    }

    fn head_of<B: Body>(
        status: u16,
        headers: &[(&str, &str)],
        body: &B,
        closing: bool,
    ) -> (String, Framing, bool) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let mut out = Vec::new();
        let (framing, keep) = encode_head(
            &mut out,
            StatusCode::from_u16(status).unwrap(),
            &map,
            None,
            body,
            closing,
        );
        (String::from_utf8(out).unwrap(), framing, keep)
    }

    #[test]
    fn answer_heads_are_framed_by_the_body_as_hyper_frames_them() {
        let full = Full::new(Bytes::from_static(b"hello"));
        let (head, framing, keep) =
            head_of(200, &[("x-a", "1"), ("content-length", "5")], &full, false);
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "),
            "{head}"
        );
        assert!(head.ends_with(" GMT\r\n\r\n"), "{head}");
        assert_eq!((framing, keep), (Framing::Length(5), true));

        let (head, framing, _) = head_of(
            404,
            &[("date", "Sun, 06 Nov 1994 08:49:37 GMT")],
            &full,
            false,
        );
        assert_eq!(
            head,
            "HTTP/1.1 404 Not Found\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\ncontent-length: 5\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(5));

        let empty = Empty::<Bytes>::new();
        let (head, framing, _) = head_of(
            200,
            &[("content-length", "0"), ("date", "d")],
            &empty,
            false,
        );
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(0));

        for status in [204, 304] {
            let (head, framing, _) = head_of(
                status,
                &[("content-length", "5"), ("date", "d")],
                &full,
                false,
            );
            assert!(!head.contains("content-length"), "{head}");
            assert_eq!(framing, Framing::Length(0));
        }

        let (head, _, _) = head_of(599, &[("date", "d")], &empty, false);
        assert!(head.starts_with("HTTP/1.1 599 <none>\r\n"), "{head}");
    }

    #[test]
    fn relayed_lines_follow_the_gateways_headers() {
        let relayed = RelayedHeaders {
            lines: Bytes::from_static(b"Set-Cookie: a\r\nDate: d\r\n"),
            dated: true,
        };
        let full = Full::new(Bytes::from_static(b"ok"));
        let mut map = HeaderMap::new();
        map.insert("x-request-id", HeaderValue::from_static("ours"));
        let mut out = Vec::new();
        encode_head(&mut out, StatusCode::OK, &map, Some(&relayed), &full, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nx-request-id: ours\r\nSet-Cookie: a\r\nDate: d\r\n\
             content-length: 2\r\n\r\n"
        );
    }

    /// A body of unknown length, as a streamed upstream answer is.
    struct Streamed;

    impl Body for Streamed {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(None)
        }
    }

    #[test]
    fn a_body_of_unknown_length_is_chunked_unless_a_length_is_given() {
        let (head, framing, _) = head_of(
            200,
            &[("transfer-encoding", "gzip"), ("date", "d")],
            &Streamed,
            false,
        );
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ndate: d\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(framing, Framing::Chunked);
        let (head, framing, _) = head_of(
            200,
            &[("content-length", "7"), ("date", "d")],
            &Streamed,
            false,
        );
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ncontent-length: 7\r\ndate: d\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(7));
    }

    #[test]
    fn connection_close_in_the_answer_or_a_drain_ends_the_connection() {
        let empty = Empty::<Bytes>::new();
        let (_, _, keep) = head_of(
            200,
            &[("connection", "x, Close"), ("date", "d")],
            &empty,
            false,
        );
        assert!(!keep);
        let (head, _, keep) = head_of(200, &[("date", "d")], &empty, true);
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert!(!keep);
    }

    const GET: &[u8] = b"GET /x HTTP/1.1\r\nhost: h\r\n\r\n";

    /// Reads from `client` until an answer head and its 2-byte body (`ok`) have arrived.
    async fn answer_of(client: &mut tokio::io::DuplexStream) -> String {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 1024];
        while !seen.ends_with(b"\r\n\r\nok") {
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(5), client.read(&mut chunk))
                    .await
                    .expect("no answer within 5 s")
                    .unwrap();
            assert!(
                n > 0,
                "closed before the answer: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8(seen).unwrap()
    }

    /// Waits up to 5 s for `serving` to end, and asserts that it ended the connection.
    async fn ends_closed<IO>(serving: tokio::task::JoinHandle<Outcome<IO>>, failure: &str) {
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), serving)
            .await
            .expect(failure)
            .unwrap();
        assert!(matches!(outcome, Outcome::Closed));
    }

    fn ok() -> Response<crate::proxy::Body> {
        Response::new(crate::proxy::Body::new(Full::new(Bytes::from_static(
            b"ok",
        ))))
    }

    #[tokio::test]
    async fn a_drain_closes_an_idle_connection_and_marks_the_answer_it_interrupts() {
        let (mut client, server) = tokio::io::duplex(4096);
        let (stop, shutdown) = watch::channel(false);
        let stop = std::sync::Arc::new(stop);
        let stop_in_answer = std::sync::Arc::clone(&stop);
        let answers = std::sync::atomic::AtomicUsize::new(0);
        let answer = move |_request| {
            // The second request's answer is written after the drain began.
            if answers.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 1 {
                stop_in_answer.send(true).unwrap();
            }
            std::future::ready(ok())
        };
        let serving = tokio::spawn(serve(server, answer, 16 * 1024, shutdown));

        client.write_all(GET).await.unwrap();
        let first = answer_of(&mut client).await;
        assert!(!first.contains("connection: close"), "{first}");
        client.write_all(GET).await.unwrap();
        let second = answer_of(&mut client).await;
        assert!(second.contains("connection: close\r\n"), "{second}");
        ends_closed(serving, "the connection was not closed").await;

        // Idle, no request in hand: the drain alone ends it.
        let (mut client, server) = tokio::io::duplex(4096);
        let (stop, shutdown) = watch::channel(false);
        let serving = tokio::spawn(serve(
            server,
            |_| std::future::ready(ok()),
            16 * 1024,
            shutdown,
        ));
        client.write_all(GET).await.unwrap();
        answer_of(&mut client).await;
        stop.send(true).unwrap();
        ends_closed(serving, "an idle connection outlived the drain").await;
    }

    #[tokio::test]
    async fn a_request_asking_to_close_is_answered_and_the_connection_ends_after_it() {
        let (mut client, server) = tokio::io::duplex(4096);
        let (_stop, shutdown) = watch::channel(false);
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&answered);
        let answer = move |_request| {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::future::ready(ok())
        };
        let serving = tokio::spawn(serve(server, answer, 16 * 1024, shutdown));
        client.write_all(GET).await.unwrap();
        let first = answer_of(&mut client).await;
        assert!(!first.contains("connection: close"), "{first}");
        // A request pipelined behind the one that asks to close is not answered.
        client
            .write_all(b"GET /bye HTTP/1.1\r\nConnection: close\r\n\r\nGET /late HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let last = answer_of(&mut client).await;
        assert!(last.contains("connection: close\r\n"), "{last}");
        ends_closed(serving, "the connection was not closed").await;
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        assert_eq!(answered.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_connection_accepted_as_the_drain_began_is_answered_with_connection_close() {
        let (stop, shutdown) = watch::channel(false);
        stop.send(true).unwrap();
        // The receiver is cloned after the change, as the accept loop's clone may be.
        let late = shutdown.clone();
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(GET).await.unwrap();
        let serving = tokio::spawn(serve(server, |_| std::future::ready(ok()), 16 * 1024, late));
        let answer = answer_of(&mut client).await;
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(matches!(serving.await.unwrap(), Outcome::Closed));
        drop(stop);
    }

    #[tokio::test]
    async fn a_rewound_connection_reads_the_kept_bytes_first() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut rewound = Rewound::new(Bytes::from_static(b"kept "), client);
        server.write_all(b"then more").await.unwrap();
        drop(server);
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "kept then more");
    }
}
