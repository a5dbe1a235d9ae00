//! A read-side observer of HTTP/1.1 request framing, for the one fact hyper does not pass on:
//! whether a request head carried both `Content-Length` and `Transfer-Encoding`.
//!
//! hyper follows RFC 9112 §6.3 for such a request (the transfer coding wins, `Content-Length` is
//! dropped, the connection is closed afterwards), which already prevents request smuggling
//! through the gateway. The contract asks for more: refuse the request with 400 (RFC 9112 §6.1
//! allows a server to), because a message framed two ways is an attack, not a client to serve.
//! hyper removes the `Content-Length` header before the request reaches a service, so the bytes
//! are watched here, as they are read, and the verdict for each request head is queued for the
//! request guard in the order the heads arrived.
//!
//! The observer walks the same framing hyper does (head, then a `Content-Length` body or a
//! chunked body) but never changes a byte. When it cannot follow (a head larger than its limit,
//! HTTP/2, an upgraded connection, malformed framing that hyper will refuse anyway) it stops
//! observing; the guard then gets no verdict and relies on hyper.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::head_deadline::HeadDeadline;

/// Verdicts for the request heads read on one connection, oldest first.
#[derive(Debug, Clone, Default)]
pub struct FramingVerdicts(Arc<Mutex<VecDeque<bool>>>);

impl FramingVerdicts {
    /// Whether the next request on this connection had both `Content-Length` and
    /// `Transfer-Encoding`; `None` when the observer did not follow that head.
    pub fn next_conflict(&self) -> Option<bool> {
        self.0.lock().expect("framing lock poisoned").pop_front()
    }

    fn push(&self, conflict: bool) {
        self.0
            .lock()
            .expect("framing lock poisoned")
            .push_back(conflict);
    }
}

#[derive(Debug)]
enum State {
    /// Collecting a request head until the empty line.
    Head(Vec<u8>),
    /// Skipping a body of this many bytes.
    Body(u64),
    /// In a chunked body: reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// In a chunked body: skipping chunk data plus its CRLF.
    ChunkData(u64),
    /// In a chunked body, after the last chunk: reading trailer lines until an empty one.
    /// hyper's chunked decoder ends a trailer line at CRLF only (a bare LF is one more byte of
    /// the line, and the empty line that ends the section is CRLF too), so lines are not split
    /// on LF here as they are in a head. `line_started`: the current line has a byte;
    /// `after_cr`: its last byte was CR, which hyper requires an LF after.
    Trailers { line_started: bool, after_cr: bool },
    /// Not following this connection any more.
    Off,
}

/// The framing of a request body, as the head declares it.
struct HeadFacts {
    conflict: bool,
    chunked: bool,
    content_length: Option<u64>,
}

/// Reads the framing headers of a head (request line included, final CRLFCRLF included).
/// `None` when the head is not an HTTP/1.x request the observer can follow.
///
/// The head is read as bytes, in place: header values may carry obs-text (bytes >= 0x80), but
/// names and the framing values compared here are ASCII. Whitespace is trimmed as `str::trim`
/// trims ASCII; Unicode spaces around a framing value would be kept, and hyper refuses such a
/// head anyway (a non-ASCII `Content-Length` or `Transfer-Encoding` is a 400).
fn parse_head(head: &[u8]) -> Option<HeadFacts> {
    // hyper (httparse) accepts a bare LF as a line end, so lines are split on LF.
    let mut lines = lines(head).map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request_line = lines.next()?;
    // Only the exact HTTP/2 preface switches hyper to HTTP/2; a `PRI / HTTP/1.1` request is
    // an ordinary HTTP/1.1 request and must be followed like any other.
    if request_line == b"PRI * HTTP/2.0" || !request_line.windows(8).any(|w| w == b" HTTP/1.") {
        return None;
    }
    let mut has_te = false;
    let mut chunked = false;
    let mut content_length = None;
    let mut has_cl = false;
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = trim_end(&line[..colon]);
        let value = &line[colon + 1..];
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_te = true;
            chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            has_cl = true;
            content_length = std::str::from_utf8(trim(value))
                .ok()
                .and_then(|value| value.parse().ok());
        }
    }
    Some(HeadFacts {
        conflict: has_te && has_cl,
        chunked,
        content_length,
    })
}

/// The LF-separated lines of `bytes` (LF excluded; the part after the last LF included), as
/// `split(|b| *b == b'\n')` would give them. The LFs are found with SIMD (`memchr`): a head
/// carries an IAM token of several KiB, and every request's head passes through here.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', bytes)
        .map(Some)
        .chain(std::iter::once(None))
        .map(move |end| {
            let end = end.unwrap_or(bytes.len());
            let line = &bytes[start..end];
            start = end + 1;
            line
        })
}

/// The ASCII characters `char::is_whitespace` (and so `str::trim`) treats as whitespace.
fn is_space(byte: u8) -> bool {
    matches!(byte, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

fn trim_end(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !is_space(*b))
        .map_or(0, |at| at + 1);
    &bytes[..end]
}

fn trim(bytes: &[u8]) -> &[u8] {
    let bytes = trim_end(bytes);
    let start = bytes
        .iter()
        .position(|b| !is_space(*b))
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// Queues the verdict for a complete head and answers the state that follows it.
fn after_head(head: &[u8], verdicts: &FramingVerdicts) -> State {
    match parse_head(head) {
        Some(facts) => {
            verdicts.push(facts.conflict);
            if facts.chunked {
                State::ChunkSize(Vec::new())
            } else {
                match facts.content_length {
                    Some(0) | None => State::Head(Vec::new()),
                    Some(n) => State::Body(n),
                }
            }
        }
        None => State::Off,
    }
}

/// Follows request framing over a stream of bytes.
#[derive(Debug)]
pub struct FramingObserver {
    state: State,
    verdicts: FramingVerdicts,
    max_head: usize,
}

impl FramingObserver {
    pub fn new(verdicts: FramingVerdicts, max_head: usize) -> Self {
        FramingObserver {
            state: State::Head(Vec::new()),
            verdicts,
            max_head,
        }
    }

    /// Feeds bytes just read from the client.
    pub fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head(head) => {
                    // A head starts at its request line; stray CRLFs before it are allowed.
                    if head.is_empty() {
                        let skip = bytes
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            return;
                        }
                        // The usual case: the whole head arrived in this read. It is read in
                        // place; only a head split over reads is collected into `head`.
                        if let Some(end) = head_end(bytes) {
                            if end > self.max_head {
                                self.state = State::Off;
                                return;
                            }
                            self.state = after_head(&bytes[..end], &self.verdicts);
                            bytes = &bytes[end..];
                            continue;
                        }
                    }
                    let before = head.len();
                    head.extend_from_slice(bytes);
                    let search_from = before.saturating_sub(2);
                    match head_end(&head[search_from..]) {
                        Some(at) => {
                            let end = search_from + at;
                            let used = end - before;
                            bytes = &bytes[used..];
                            let head = std::mem::take(head);
                            // The limit applies to the head, however the reads were split.
                            if end > self.max_head {
                                self.state = State::Off;
                                return;
                            }
                            self.state = after_head(&head[..end], &self.verdicts);
                        }
                        None => {
                            if head.len() > self.max_head {
                                self.state = State::Off;
                            }
                            return;
                        }
                    }
                }
                State::Body(remaining) => {
                    let take = (*remaining).min(bytes.len() as u64);
                    *remaining -= take;
                    bytes = &bytes[take as usize..];
                    if *remaining == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => match bytes.iter().position(|b| *b == b'\n') {
                    Some(at) => {
                        line.extend_from_slice(&bytes[..=at]);
                        bytes = &bytes[at + 1..];
                        if line.len() > self.max_head {
                            self.state = State::Off;
                            return;
                        }
                        let text = String::from_utf8_lossy(line);
                        let size = text.trim_end().split(';').next().unwrap_or_default().trim();
                        self.state = match u64::from_str_radix(size, 16) {
                            Ok(0) => State::Trailers {
                                line_started: false,
                                after_cr: false,
                            },
                            // Chunk data is followed by CRLF.
                            Ok(n) => State::ChunkData(n.saturating_add(2)),
                            Err(_) => State::Off,
                        };
                    }
                    None => {
                        line.extend_from_slice(bytes);
                        if line.len() > self.max_head {
                            self.state = State::Off;
                        }
                        return;
                    }
                },
                State::ChunkData(remaining) => {
                    let take = (*remaining).min(bytes.len() as u64);
                    *remaining -= take;
                    bytes = &bytes[take as usize..];
                    if *remaining == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers {
                    line_started,
                    after_cr,
                } => {
                    if *after_cr {
                        if bytes[0] != b'\n' {
                            // hyper refuses the body ("Invalid trailer end LF").
                            self.state = State::Off;
                            return;
                        }
                        bytes = &bytes[1..];
                        if !*line_started {
                            self.state = State::Head(Vec::new());
                            continue;
                        }
                        *line_started = false;
                        *after_cr = false;
                        continue;
                    }
                    match memchr::memchr(b'\r', bytes) {
                        Some(at) => {
                            *line_started |= at > 0;
                            *after_cr = true;
                            bytes = &bytes[at + 1..];
                        }
                        None => {
                            *line_started = true;
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Stops observing (the connection was upgraded to a tunnel).
    pub fn stop(&mut self) {
        self.state = State::Off;
    }

    /// Still following the connection's requests: not stopped for HTTP/2, a tunnel, or
    /// framing hyper refuses.
    pub fn following(&self) -> bool {
        !matches!(self.state, State::Off)
    }
}

/// Where a head ends (just past its empty line): LF, optional CR, LF — the line ends hyper's
/// parser accepts (CRLF CRLF, LF LF, and mixtures).
fn head_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find_map(|i| match bytes.get(i + 1) {
        Some(b'\n') => Some(i + 2),
        Some(b'\r') if bytes.get(i + 2) == Some(&b'\n') => Some(i + 3),
        _ => None,
    })
}

/// An IO stream whose reads are shown to a [`FramingObserver`] on their way to hyper, and
/// whose waits for a request head are bounded by a [`HeadDeadline`].
pub struct Observed<IO> {
    inner: IO,
    observer: FramingObserver,
    deadline: HeadDeadline,
    /// The gateway's own HTTP/1.1 path reads the connection (`super::own_h1`): it parses
    /// every head itself and serves none with a body, so there is nothing to observe until
    /// hyper takes over ([`Observed::hand_over`]); the head deadline applies all along.
    own_path: bool,
}

impl<IO> Observed<IO> {
    pub fn new(inner: IO, observer: FramingObserver, deadline: HeadDeadline) -> Self {
        Observed {
            inner,
            observer,
            deadline,
            own_path: false,
        }
    }

    /// A stream read by the gateway's own HTTP/1.1 path first.
    pub fn behind_own_path(inner: IO, observer: FramingObserver, deadline: HeadDeadline) -> Self {
        Observed {
            own_path: true,
            ..Observed::new(inner, observer, deadline)
        }
    }

    /// hyper reads the connection from now on, starting with `already_read` (the bytes the
    /// own path read and left for it, from the start of a request head).
    pub fn hand_over(&mut self, already_read: &[u8]) {
        self.own_path = false;
        self.observer.observe(already_read);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Observed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        match result {
            Poll::Ready(Ok(())) if this.own_path => {}
            Poll::Ready(Ok(())) => {
                if this.deadline.is_tunnel() {
                    // The bytes of a tunnel are not HTTP requests.
                    this.observer.stop();
                }
                this.observer.observe(&buf.filled()[before..]);
            }
            Poll::Pending => {
                let following = this.own_path || this.observer.following();
                if let Err(err) = this.deadline.poll_expired(following, cx) {
                    return Poll::Ready(Err(err));
                }
            }
            Poll::Ready(Err(_)) => {}
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Observed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn lines_split_as_slice_split_does(bytes in proptest::collection::vec(
            prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a'), any::<u8>()], 0..64)) {
            let expected: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
            prop_assert_eq!(lines(&bytes).collect::<Vec<_>>(), expected);
        }

        #[test]
        fn head_end_finds_the_first_blank_line(bytes in proptest::collection::vec(
            prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'a')], 0..32)) {
            let slow = (0..bytes.len()).find_map(|i| match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
                (b'\n', Some(b'\n'), _) => Some(i + 2),
                (b'\n', Some(b'\r'), Some(b'\n')) => Some(i + 3),
                _ => None,
            });
            prop_assert_eq!(head_end(&bytes), slow);
        }
    }

    fn verdicts_for(stream: &[u8], split: &[usize]) -> Vec<bool> {
        let verdicts = FramingVerdicts::default();
        let mut observer = FramingObserver::new(verdicts.clone(), 65536);
        let mut start = 0;
        for &cut in split.iter().chain(std::iter::once(&stream.len())) {
            let cut = cut.clamp(start, stream.len());
            observer.observe(&stream[start..cut]);
            start = cut;
        }
        std::iter::from_fn(|| verdicts.next_conflict()).collect()
    }

    const STREAM: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: y\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\ncontent-length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
GET /e HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn each_head_gets_a_verdict_in_order() {
        assert_eq!(
            verdicts_for(STREAM, &[]),
            [false, false, false, true, false]
        );
    }

    #[test]
    fn bodies_that_look_like_heads_are_skipped() {
        let stream = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n\
GET /next HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(verdicts_for(stream, &[]), [false, false]);
    }

    #[test]
    fn bare_lf_heads_and_obs_text_are_followed_like_hyper_does() {
        let stream =
            b"POST / HTTP/1.1\nHost: x\nContent-Length: 3\nTransfer-Encoding: chunked\n\n0\r\n\r\n";
        assert_eq!(verdicts_for(stream, &[]), [true]);
        let stream = b"T / HTTP/1.1\n\r\nContent-Length:\r\nTransfer-Encoding:\r\n\r\n";
        assert_eq!(verdicts_for(stream, &[]).first(), Some(&false));
        let stream = b"POST / HTTP/1.1\r\nX-Note: caf\xe9\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(verdicts_for(stream, &[]), [true]);
    }

    #[test]
    fn trailer_lines_end_at_crlf_only_as_in_hyper() {
        // hyper's chunked decoder reads the bare LF after the last chunk as the first byte of a
        // trailer line, so the "request" after it is trailer text and /d is the next request.
        let stream = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\n\
GET /smuggled HTTP/1.1\r\nX: y\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(verdicts_for(stream, &[]), [false, true]);
        let split: Vec<usize> = (0..stream.len()).collect();
        assert_eq!(verdicts_for(stream, &split), [false, true]);
        // A CR in a trailer that is not followed by LF: hyper refuses the body, nothing follows.
        let stream = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\rz\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(verdicts_for(stream, &[]), [false]);
    }

    #[test]
    fn a_pri_method_over_http1_is_still_followed() {
        let stream = b"PRI / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(verdicts_for(stream, &[]), [true]);
    }

    #[test]
    fn http2_prior_knowledge_is_not_followed() {
        assert!(verdicts_for(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &[]).is_empty());
    }

    proptest! {
        #[test]
        fn verdicts_do_not_depend_on_how_reads_are_split(
            mut cuts in proptest::collection::vec(0usize..STREAM.len(), 0..12)
        ) {
            cuts.sort_unstable();
            prop_assert_eq!(verdicts_for(STREAM, &cuts), vec![false, false, false, true, false]);
        }
    }
}
