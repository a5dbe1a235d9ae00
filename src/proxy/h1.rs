//! HTTP/1.1 on the upstream leg, written and read by the gateway itself: the request head
//! encoded into one buffer, the answer's head parsed by `httparse`, and the answer's body
//! framing (RFC 9112 §6) decoded as it streams through.
//!
//! Why not hyper's client: on the cached path its connection task (a second task per request,
//! a channel each way, its own header map encoding and decoding) cost as much as everything
//! else the gateway does. The upstream is one server the operator chose, the request head is
//! one the gateway has already parsed and rewritten, and the answer is handed to hyper's server
//! side as an ordinary `Response`, so what is needed here is small: encode, parse, frame.
//! Everything unusual is refused as a bad upstream answer (502) rather than guessed at.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH};
use http::{Method, StatusCode, Version};

use crate::proxy::lower::is_lower;

/// The most header bytes an upstream answer may carry (nginx's `proxy_buffer_size` is 4–8 KiB
/// by default; hyper's client allowed about 400 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The most header lines an upstream answer may carry (hyper's client allowed 100).
pub const MAX_HEADERS: usize = 128;

/// The longest chunk-size line (with extensions) and the most trailer bytes accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why an upstream answer cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("malformed answer head: {0}")]
    Head(httparse::Error),
    #[error("answer head over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("answer with an invalid header")]
    Header,
    #[error("answer with an invalid or conflicting Content-Length")]
    ContentLength,
    #[error("answer with both Transfer-Encoding and Content-Length")]
    Ambiguous,
    #[error("malformed chunked body")]
    Chunked,
}

/// How the request's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body, and no `Content-Length` either.
    None,
    /// A body of exactly this many bytes (`Content-Length`), possibly zero.
    Length(u64),
    /// A body of unknown length (the client sent it chunked, or HTTP/2 without a length).
    Chunked,
}

impl RequestFraming {
    /// Whether body bytes follow the head.
    pub fn has_body(self) -> bool {
        matches!(self, RequestFraming::Chunked)
            || matches!(self, RequestFraming::Length(n) if n > 0)
    }

    /// The framing of a body that hyper's server side describes by `end_stream` (nothing to
    /// come) and `exact` (its size hint, when the client said it). Methods that define a body
    /// get `Content-Length: 0` for an empty one, as hyper's client did; a client's explicit
    /// `Content-Length: 0` is kept.
    pub fn of(method: &Method, headers: &HeaderMap, end_stream: bool, exact: Option<u64>) -> Self {
        match (end_stream, exact) {
            (true, _) | (false, Some(0)) => {
                let defines_body = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
                if defines_body || crate::proxy::headers::has(headers, &CONTENT_LENGTH) {
                    RequestFraming::Length(0)
                } else {
                    RequestFraming::None
                }
            }
            (false, Some(length)) => RequestFraming::Length(length),
            (false, None) => RequestFraming::Chunked,
        }
    }
}

/// Writes the request line.
pub fn request_line(out: &mut Vec<u8>, method: &Method, target: &str) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// Writes one header line. The caller vouches for the name and value (a `HeaderName` and
/// `HeaderValue`, or bytes checked by [`is_header_value`]).
pub fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Whether `value` may be sent as a header value as it is: what `HeaderValue::from_str`
/// accepts (no control characters other than tab).
pub fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Ends the head: the framing header `framing` calls for, and the blank line.
pub fn end_head(out: &mut Vec<u8>, framing: RequestFraming) {
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(length) => {
            header(
                out,
                "content-length",
                itoa::Buffer::new().format(length).as_bytes(),
            );
        }
        RequestFraming::Chunked => header(out, "transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
}

/// The size line that starts a chunk of `length` bytes.
pub fn chunk_size_line(out: &mut Vec<u8>, length: usize) {
    use std::io::Write;
    // Writing to a `Vec` cannot fail.
    let _ = write!(out, "{length:x}\r\n");
}

/// The end of a chunked body: the last chunk and no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// What an answer's end-to-end headers are parsed into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeptHeaders {
    /// A header map: the answer goes to hyper's server side (or through the stack's layers
    /// to anything that reads its headers).
    InMap,
    /// Their lines as they came ([`RelayedHeaders`]): the answer goes to the gateway's own
    /// HTTP/1.1 writer (`crate::server::own_h1`), which copies them as they are.
    AsLines,
}

/// The headers the gateway sets on every forwarded answer, replacing the upstream's
/// (`crate::stack::edge`): left out of [`RelayedHeaders`], so that the writer copies the
/// upstream's lines as one block, after the answer's map.
pub const SET_BY_GATEWAY: [HeaderName; 1] = [crate::proxy::headers::X_REQUEST_ID];

/// An answer's end-to-end header lines as the upstream sent them, for the gateway's own
/// HTTP/1.1 writer: one `name: value\r\n` line each, in the upstream's order and spelling,
/// hop-by-hop ones, `Content-Length` (the writer frames the body by its size) and
/// [`SET_BY_GATEWAY`] left out.
/// Copying them as one block costs a fraction of a header map's hashing, per-value allocations
/// and re-encoding, which were a sixth of the gateway's instructions per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedHeaders {
    pub lines: Bytes,
    /// One of them is `Date` (else the writer adds one).
    pub dated: bool,
}

impl RelayedHeaders {
    /// Each line, `\r\n` included.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        memchr::memchr_iter(b'\n', &self.lines).map(move |end| {
            let line = &self.lines[start..=end];
            start = end + 1;
            line
        })
    }
}

/// An answer's head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// The end-to-end headers: hop-by-hop ones (RFC 9110 §7.6.1) and those `Connection`
    /// names are left out as the head is parsed. Empty when they were kept as lines.
    pub headers: HeaderMap,
    /// With [`KeptHeaders::AsLines`]: the end-to-end headers.
    pub relayed: Option<RelayedHeaders>,
    pub framing: ResponseFraming,
    /// The upstream keeps the connection open after this answer.
    pub keep_alive: bool,
}

/// What a hop-by-hop header name is to the answer's parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Connection,
    TransferEncoding,
    Upgrade,
    Other,
}

/// Whether `name` is a hop-by-hop header left out of an answer (RFC 9110 §7.6.1, plus the
/// `Keep-Alive`, `Proxy-Connection` and `Proxy-Authenticate`/`-Authorization` of older
/// proxies), and which. Dispatched on the length first: every
/// answer header passes through here, and most are end-to-end.
fn hop_by_hop(name: &[u8]) -> Option<Hop> {
    match name.len() {
        2 if is_lower!(name, b"te") => Some(Hop::Other),
        7 if is_lower!(name, b"trailer") => Some(Hop::Other),
        7 if is_lower!(name, b"upgrade") => Some(Hop::Upgrade),
        10 if is_lower!(name, b"connection") => Some(Hop::Connection),
        10 if is_lower!(name, b"keep-alive") => Some(Hop::Other),
        16 if is_lower!(name, b"proxy-connection") => Some(Hop::Other),
        17 if is_lower!(name, b"transfer-encoding") => Some(Hop::TransferEncoding),
        18 if is_lower!(name, b"proxy-authenticate") => Some(Hop::Other),
        19 if is_lower!(name, b"proxy-authorization") => Some(Hop::Other),
        _ => None,
    }
}

/// The comma-separated items of a header value, trimmed, empty ones left out.
fn items(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// Parses an answer head from the front of `buffer` and removes it; `None` while it is
/// incomplete. `method` is the request's (an answer to `HEAD` has no body). With
/// `keep_upgrade` (a WebSocket request), a 101's `Upgrade` survives and `Connection: upgrade`
/// is set. Header values share the head's bytes rather than being copied one by one; with
/// [`KeptHeaders::AsLines`] they are copied as one block instead of put in a map.
pub fn parse_response_head(
    buffer: &mut BytesMut,
    method: &Method,
    keep_upgrade: bool,
    kept_as: KeptHeaders,
) -> Result<Option<ResponseHead>, ParseError> {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buffer,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD_BYTES => {
            return Err(ParseError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ParseError::HeadTooLarge),
        Err(err) => return Err(ParseError::Head(err)),
    };
    if length > MAX_HEAD_BYTES {
        return Err(ParseError::HeadTooLarge);
    }
    let status = parsed
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(ParseError::Head(httparse::Error::Status))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Only a switch keeps its `Upgrade` (a 426's is the upstream's business with the gateway).
    let keep_upgrade = keep_upgrade && status == StatusCode::SWITCHING_PROTOCOLS;
    let lines = &*parsed.headers;

    // One pass: the framing headers are read, and where each header that may be kept starts
    // and ends in the head is noted (offsets fit in u32: the head is at most MAX_HEAD_BYTES).
    let mut close = false;
    let mut connection_names = false;
    let mut transfer_encoding: Option<&[u8]> = None;
    let mut content_length: Option<u64> = None;
    let base = buffer.as_ptr() as usize;
    let offset = |bytes: &[u8]| (bytes.as_ptr() as usize - base) as u32;
    // On the stack for the usual answer; a long head's offsets go to the heap.
    let mut few = [(0u32, 0u32, 0u32, 0u32); FEW_HEADERS];
    let mut many = Vec::new();
    let kept: &mut [(u32, u32, u32, u32)] = if lines.len() <= FEW_HEADERS {
        &mut few
    } else {
        many.resize(lines.len(), (0, 0, 0, 0));
        &mut many
    };
    let mut count = 0;
    for line in lines {
        let name = line.name.as_bytes();
        match hop_by_hop(name) {
            Some(Hop::Connection) => {
                for token in items(line.value) {
                    if is_lower!(token, b"close") {
                        close = true;
                    } else if !is_lower!(token, b"keep-alive") {
                        connection_names = true;
                    }
                }
                continue;
            }
            Some(Hop::TransferEncoding) => {
                transfer_encoding = Some(line.value);
                continue;
            }
            Some(Hop::Upgrade) if keep_upgrade => {}
            Some(Hop::Upgrade | Hop::Other) => continue,
            None if is_lower!(name, b"content-length") => {
                // A list of identical values (`5, 5`) is one length (RFC 9112 §6.3 item 5).
                for item in line.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    let parsed = content_length_value(item)?;
                    if content_length.is_some_and(|seen| seen != parsed) {
                        return Err(ParseError::ContentLength);
                    }
                    content_length = Some(parsed);
                }
            }
            None => {}
        }
        kept[count] = (
            offset(name),
            name.len() as u32,
            offset(line.value),
            line.value.len() as u32,
        );
        count += 1;
    }
    let framing = framing(method, status, transfer_encoding, content_length)?;

    // Rare: `Connection` names headers of its own, which are hop-by-hop too.
    if connection_names {
        let bytes = &buffer[..length];
        let listed = |name: &[u8]| {
            lines
                .iter()
                .filter(|line| hop_by_hop(line.name.as_bytes()) == Some(Hop::Connection))
                .flat_map(|line| items(line.value))
                .any(|token| token.eq_ignore_ascii_case(name))
        };
        let mut still = 0;
        for index in 0..count {
            let (name_at, name_len, ..) = kept[index];
            let name = &bytes[name_at as usize..(name_at + name_len) as usize];
            let upgrade_kept = keep_upgrade && hop_by_hop(name) == Some(Hop::Upgrade);
            if upgrade_kept || !listed(name) {
                kept[still] = kept[index];
                still += 1;
            }
        }
        count = still;
    }
    if kept_as == KeptHeaders::AsLines && !keep_upgrade {
        let relayed = relay_lines(&buffer[..length], &kept[..count]);
        buffer.advance(length);
        return Ok(Some(ResponseHead {
            status,
            version,
            headers: HeaderMap::new(),
            relayed: Some(relayed),
            framing,
            keep_alive: version == Version::HTTP_11 && !close,
        }));
    }
    let head = buffer.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(count + usize::from(keep_upgrade));
    for &(name_at, name_len, value_at, value_len) in &kept[..count] {
        let (name_at, value_at) = (name_at as usize, value_at as usize);
        let name =
            header_name(&head[name_at..name_at + name_len as usize]).ok_or(ParseError::Header)?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len as usize))
                .map_err(|_| ParseError::Header)?;
        headers.append(name, value);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        relayed: None,
        framing,
        keep_alive: version == Version::HTTP_11 && !close,
    }))
}

/// The kept header lines of `head` (offsets of name and value in it) as [`RelayedHeaders`].
/// httparse has checked names and values by the rules `HeaderName` and `HeaderValue` apply
/// (tokens; no control characters but tab), so nothing the map would refuse is relayed
/// (`tests::httparse_accepts_the_names_and_values_http_accepts`).
fn relay_lines(head: &[u8], kept: &[(u32, u32, u32, u32)]) -> RelayedHeaders {
    let mut lines = BytesMut::with_capacity(head.len());
    let mut dated = false;
    // Lines already written `name: value\r\n` (most are) are copied in runs, as they lie.
    let mut run = 0..0;
    for &(name_at, name_len, value_at, value_len) in kept {
        let (name_at, value_at) = (name_at as usize, value_at as usize);
        let (name_end, value_end) = (name_at + name_len as usize, value_at + value_len as usize);
        let name = &head[name_at..name_end];
        let set_by_gateway = SET_BY_GATEWAY
            .iter()
            .any(|set| name.eq_ignore_ascii_case(set.as_str().as_bytes()));
        if set_by_gateway || is_lower!(name, b"content-length") {
            continue;
        }
        dated |= is_lower!(name, b"date");
        let as_written = &head[name_end..value_at] == b": "
            && head.get(value_end..value_end + 2) == Some(b"\r\n");
        if as_written && run.end == name_at {
            run.end = value_end + 2;
            continue;
        }
        lines.extend_from_slice(&head[run.clone()]);
        if as_written {
            run = name_at..value_end + 2;
        } else {
            run = 0..0;
            lines.extend_from_slice(name);
            lines.extend_from_slice(b": ");
            lines.extend_from_slice(&head[value_at..value_end]);
            lines.extend_from_slice(b"\r\n");
        }
    }
    lines.extend_from_slice(&head[run]);
    RelayedHeaders {
        lines: lines.freeze(),
        dated,
    }
}

/// The header lines of an answer whose offsets [`parse_response_head`] keeps on the stack (an
/// nginx or a framework answer has 5–10).
const FEW_HEADERS: usize = 24;

/// A header name as a request or an answer carries it. The names most clients and upstreams
/// send are matched directly, which costs a fraction of `HeaderName::from_bytes` (lowercasing
/// into a scratch buffer, a lookup among all standard names, and for a custom name such as
/// `X-Auth-Token` a heap copy); any other name goes through `from_bytes`. `None`: not a valid
/// header name (httparse has already checked the names of the heads parsed here).
pub fn header_name(name: &[u8]) -> Option<HeaderName> {
    use http::header::{
        ACCEPT, ACCEPT_ENCODING, ACCEPT_LANGUAGE, ACCEPT_RANGES, AUTHORIZATION, CACHE_CONTROL,
        CONTENT_ENCODING, CONTENT_TYPE, COOKIE, DATE, ETAG, EXPIRES, HOST, LAST_MODIFIED, LOCATION,
        ORIGIN, REFERER, SERVER, SET_COOKIE, USER_AGENT, VARY,
    };
    let common = match name.len() {
        4 if is_lower!(name, b"host") => HOST,
        4 if is_lower!(name, b"date") => DATE,
        4 if is_lower!(name, b"etag") => ETAG,
        4 if is_lower!(name, b"vary") => VARY,
        6 if is_lower!(name, b"accept") => ACCEPT,
        6 if is_lower!(name, b"server") => SERVER,
        6 if is_lower!(name, b"cookie") => COOKIE,
        6 if is_lower!(name, b"origin") => ORIGIN,
        7 if is_lower!(name, b"expires") => EXPIRES,
        7 if is_lower!(name, b"referer") => REFERER,
        8 if is_lower!(name, b"location") => LOCATION,
        10 if is_lower!(name, b"user-agent") => USER_AGENT,
        10 if is_lower!(name, b"set-cookie") => SET_COOKIE,
        12 if is_lower!(name, b"content-type") => CONTENT_TYPE,
        12 if is_lower!(name, b"x-auth-token") => crate::auth::token::X_AUTH_TOKEN,
        12 if is_lower!(name, b"x-request-id") => crate::proxy::headers::X_REQUEST_ID,
        13 if is_lower!(name, b"authorization") => AUTHORIZATION,
        13 if is_lower!(name, b"cache-control") => CACHE_CONTROL,
        13 if is_lower!(name, b"last-modified") => LAST_MODIFIED,
        13 if is_lower!(name, b"accept-ranges") => ACCEPT_RANGES,
        14 if is_lower!(name, b"content-length") => CONTENT_LENGTH,
        15 if is_lower!(name, b"accept-encoding") => ACCEPT_ENCODING,
        15 if is_lower!(name, b"accept-language") => ACCEPT_LANGUAGE,
        15 if is_lower!(name, b"x-forwarded-for") => crate::proxy::headers::X_FORWARDED_FOR,
        16 if is_lower!(name, b"content-encoding") => CONTENT_ENCODING,
        _ => return HeaderName::from_bytes(name).ok(),
    };
    Some(common)
}

/// One `Content-Length` value: digits only, no sign, no more than fit in a `u64`.
fn content_length_value(item: &[u8]) -> Result<u64, ParseError> {
    if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::ContentLength);
    }
    std::str::from_utf8(item)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(ParseError::ContentLength)
}

/// How an answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body: an answer to `HEAD`, or 1xx, 204, 304.
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// The framing of an answer from its status, its last `Transfer-Encoding` and its length.
fn framing(
    method: &Method,
    status: StatusCode,
    transfer_encoding: Option<&[u8]>,
    content_length: Option<u64>,
) -> Result<ResponseFraming, ParseError> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(ResponseFraming::None);
    }
    if let Some(codings) = transfer_encoding {
        if content_length.is_some() {
            return Err(ParseError::Ambiguous);
        }
        let chunked = items(codings)
            .next_back()
            .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked {
            ResponseFraming::Chunked
        } else {
            ResponseFraming::UntilClose
        });
    }
    Ok(content_length.map_or(ResponseFraming::UntilClose, ResponseFraming::Length))
}

/// What the chunked decoder found in the bytes it has.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The body is complete (last chunk and trailers read).
    End,
    /// More bytes are needed.
    More,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

/// Decodes a chunked body (RFC 9112 §7.1) from a buffer that fills as bytes arrive. Chunk
/// extensions and trailers are read and dropped.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
        }
    }
}

/// The line at the front of `buffer`, without its CRLF, once it is complete.
fn take_line(buffer: &mut BytesMut, limit: usize) -> Result<Option<BytesMut>, ParseError> {
    match memchr::memchr(b'\n', buffer) {
        // The same limit whether the line arrived at once or in pieces.
        Some(end) if end > limit => Err(ParseError::Chunked),
        Some(end) => {
            let mut line = buffer.split_to(end + 1);
            if end == 0 || line[end - 1] != b'\r' {
                return Err(ParseError::Chunked);
            }
            line.truncate(end - 1);
            Ok(Some(line))
        }
        None if buffer.len() > limit => Err(ParseError::Chunked),
        None => Ok(None),
    }
}

/// The chunk size at the start of a size line; extensions (`;name=value`) are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, ParseError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 16 || !(rest.is_empty() || rest[0] == b';') {
        return Err(ParseError::Chunked);
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| ParseError::Chunked)?;
    u64::from_str_radix(text, 16).map_err(|_| ParseError::Chunked)
}

impl ChunkedDecoder {
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Decoded, ParseError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(buffer, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::More);
                    };
                    self.state = match chunk_size(&line)? {
                        0 => ChunkState::Trailers(0),
                        size => ChunkState::Data(size),
                    };
                }
                ChunkState::Data(remaining) => {
                    if buffer.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take =
                        usize::try_from(remaining).map_or(buffer.len(), |r| r.min(buffer.len()));
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(buffer.split_to(take).freeze()));
                }
                ChunkState::DataEnd => {
                    if buffer.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buffer[..2] != b"\r\n" {
                        return Err(ParseError::Chunked);
                    }
                    buffer.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers(seen) => {
                    let Some(line) = take_line(buffer, MAX_TRAILER_BYTES - seen)? else {
                        return Ok(Decoded::More);
                    };
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                        return Ok(Decoded::End);
                    }
                    let seen = seen + line.len() + 2;
                    if seen > MAX_TRAILER_BYTES {
                        return Err(ParseError::Chunked);
                    }
                    self.state = ChunkState::Trailers(seen);
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(text: &str) -> Result<Option<ResponseHead>, ParseError> {
        parse_response_head(
            &mut BytesMut::from(text),
            &Method::GET,
            false,
            KeptHeaders::InMap,
        )
    }

    /// Relayed lines are not checked again: what httparse accepts in a name or a value must
    /// be what `HeaderName` and `HeaderValue` accept, byte for byte.
    #[test]
    fn httparse_accepts_the_names_and_values_http_accepts() {
        for byte in 0..=255u8 {
            let mut name = b"HTTP/1.1 200 OK\r\nx".to_vec();
            name.extend_from_slice(&[byte, b':', b' ', b'v', b'\r', b'\n', b'\r', b'\n']);
            let mut value = b"HTTP/1.1 200 OK\r\nx: a".to_vec();
            value.extend_from_slice(&[byte, b'b', b'\r', b'\n', b'\r', b'\n']);
            let parses = |head: &[u8]| {
                let mut slots = [httparse::EMPTY_HEADER; 4];
                let mut parsed = httparse::Response::new(&mut slots);
                matches!(parsed.parse(head), Ok(httparse::Status::Complete(_)))
            };
            // A colon ends the name.
            if byte != b':' {
                assert_eq!(
                    parses(&name),
                    HeaderName::from_bytes(&[b'x', byte]).is_ok(),
                    "name byte {byte:#04x}"
                );
            }
            // A CR or LF ends the line (httparse refuses a lone one): never inside a value.
            if byte != b'\r' && byte != b'\n' {
                assert_eq!(
                    parses(&value),
                    HeaderValue::from_bytes(&[b'a', byte, b'b']).is_ok(),
                    "value byte {byte:#04x}"
                );
            }
        }
    }

    #[test]
    fn headers_kept_as_lines_are_the_end_to_end_ones_as_they_came() {
        let mut buffer = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nConnection: keep-alive, X-Hop\r\nX-Request-ID: up\r\n\
               X-Hop: 1\r\nContent-Length: 2\r\nTransfer-Encoding-Not: x\r\n\
               Keep-Alive: timeout=5\r\nset-cookie: b=2\r\n\r\nokNEXT"[..],
        );
        let head = parse_response_head(&mut buffer, &Method::GET, false, KeptHeaders::AsLines)
            .unwrap()
            .unwrap();
        assert_eq!(&buffer[..], b"okNEXT");
        assert!(head.headers.is_empty());
        assert_eq!(head.framing, ResponseFraming::Length(2));
        assert!(head.keep_alive);
        let relayed = head.relayed.unwrap();
        assert_eq!(
            relayed.lines,
            &b"Set-Cookie: a=1\r\nTransfer-Encoding-Not: x\r\nset-cookie: b=2\r\n"[..]
        );
        assert!(!relayed.dated);
        let lines: Vec<&[u8]> = relayed.lines().collect();
        assert_eq!(
            lines,
            [
                &b"Set-Cookie: a=1\r\n"[..],
                b"Transfer-Encoding-Not: x\r\n",
                b"set-cookie: b=2\r\n"
            ]
        );

        // Lines written otherwise are written `name: value`.
        let mut buffer = BytesMut::from(
            &b"HTTP/1.1 204 No Content\r\nX-Tight:v\r\nDATE: d\r\nX-Pad: \t p  \r\nX-End: e\r\n\r\n"[..],
        );
        let head = parse_response_head(&mut buffer, &Method::GET, false, KeptHeaders::AsLines)
            .unwrap()
            .unwrap();
        let relayed = head.relayed.unwrap();
        assert_eq!(
            relayed.lines,
            &b"X-Tight: v\r\nDATE: d\r\nX-Pad: p\r\nX-End: e\r\n"[..]
        );
        assert!(relayed.dated);
    }

    #[test]
    fn hop_by_hop_names_are_found_in_any_case_and_nothing_else_is() {
        let hop = [
            ("connection", Hop::Connection),
            ("keep-alive", Hop::Other),
            ("te", Hop::Other),
            ("trailer", Hop::Other),
            ("transfer-encoding", Hop::TransferEncoding),
            ("upgrade", Hop::Upgrade),
            ("proxy-connection", Hop::Other),
            ("proxy-authenticate", Hop::Other),
            ("proxy-authorization", Hop::Other),
        ];
        for (name, role) in hop {
            assert_eq!(hop_by_hop(name.as_bytes()), Some(role), "{name}");
            assert_eq!(
                hop_by_hop(name.to_uppercase().as_bytes()),
                Some(role),
                "{name}"
            );
        }
        for name in [
            "content-length",
            "t",
            "tf",
            "trailers",
            "connectio",
            "keep-alivf",
            "proxy-authorizatio",
            "x-upgrade",
            "",
        ] {
            assert_eq!(hop_by_hop(name.as_bytes()), None, "{name}");
        }
    }

    #[test]
    fn the_request_head_is_a_line_headers_and_the_framing() {
        let mut out = Vec::new();
        request_line(&mut out, &Method::POST, "/p?q=1");
        header(&mut out, "host", b"app");
        end_head(&mut out, RequestFraming::Length(5));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\n\r\n"
        );
        let mut out = Vec::new();
        end_head(&mut out, RequestFraming::Chunked);
        assert_eq!(out, b"transfer-encoding: chunked\r\n\r\n");
        let mut out = Vec::new();
        end_head(&mut out, RequestFraming::None);
        assert_eq!(out, b"\r\n");
        assert!(is_header_value("caf\u{e9} \tok"));
        assert!(!is_header_value("bad\nname"));
        assert!(!is_header_value("del\u{7f}"));
    }

    #[test]
    fn request_framing_follows_the_body_and_the_method() {
        let none = HeaderMap::new();
        let mut with_length = HeaderMap::new();
        with_length.insert("content-length", HeaderValue::from_static("0"));
        let of = RequestFraming::of;
        assert_eq!(of(&Method::GET, &none, true, Some(0)), RequestFraming::None);
        assert_eq!(
            of(&Method::GET, &with_length, true, Some(0)),
            RequestFraming::Length(0)
        );
        assert_eq!(
            of(&Method::POST, &none, true, Some(0)),
            RequestFraming::Length(0)
        );
        assert_eq!(
            of(&Method::POST, &none, false, Some(7)),
            RequestFraming::Length(7)
        );
        assert_eq!(
            of(&Method::POST, &none, false, None),
            RequestFraming::Chunked
        );
    }

    #[test]
    fn an_answer_head_is_parsed_and_removed_from_the_buffer() {
        let mut buffer = BytesMut::from(
            "HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\nokNEXT",
        );
        let head = parse_response_head(&mut buffer, &Method::GET, false, KeptHeaders::InMap)
            .unwrap()
            .unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(head.headers["content-length"], "2");
        assert_eq!(&buffer[..], b"okNEXT");
        assert!(head.keep_alive);
        assert_eq!(head.framing, ResponseFraming::Length(2));
    }

    #[test]
    fn hop_by_hop_answer_headers_are_left_out_and_a_101_keeps_its_upgrade() {
        let text =
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n\
                    X-Secret: 1\r\nx-secret: 2\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\n\
                    Proxy-Authenticate: Basic\r\nTrailer: x\r\nX-Kept: yes\r\n\r\n";
        let parsed = head(text).unwrap().unwrap();
        let names: Vec<&str> = parsed.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!(parsed.framing, ResponseFraming::Chunked);
        assert!(parsed.keep_alive);

        let switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                         Connection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n";
        let mut buffer = BytesMut::from(switching);
        let parsed = parse_response_head(&mut buffer, &Method::GET, true, KeptHeaders::InMap)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.headers["upgrade"], "websocket");
        assert_eq!(parsed.headers["connection"], "upgrade");
        assert_eq!(parsed.headers["sec-websocket-accept"], "abc");
        // A refusal to switch keeps its `Upgrade` to itself.
        let refusal =
            "HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n";
        let mut buffer = BytesMut::from(refusal);
        let parsed = parse_response_head(&mut buffer, &Method::GET, true, KeptHeaders::InMap)
            .unwrap()
            .unwrap();
        assert!(!parsed.headers.contains_key("upgrade"));
        assert!(!parsed.headers.contains_key("connection"));
        // Without a WebSocket request, an upgrade is not passed on.
        let parsed = head(switching).unwrap().unwrap();
        assert!(!parsed.headers.contains_key("upgrade"));
        assert!(!parsed.headers.contains_key("connection"));
    }

    #[test]
    fn an_incomplete_head_waits_and_an_endless_one_is_refused() {
        assert!(head("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(head(&endless).unwrap_err(), ParseError::HeadTooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let many = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(head(&many).unwrap_err(), ParseError::HeadTooLarge);
        assert!(matches!(
            head("HTTP/1.1 2xx OK\r\n\r\n"),
            Err(ParseError::Head(_))
        ));
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nbad name: 1\r\n\r\n"),
            Err(ParseError::Head(_))
        ));
    }

    #[test]
    fn common_names_are_the_names_from_bytes_gives_in_any_case() {
        for name in [
            "host",
            "date",
            "etag",
            "vary",
            "accept",
            "server",
            "cookie",
            "origin",
            "expires",
            "referer",
            "location",
            "user-agent",
            "set-cookie",
            "content-type",
            "x-auth-token",
            "x-request-id",
            "authorization",
            "cache-control",
            "last-modified",
            "accept-ranges",
            "content-length",
            "accept-encoding",
            "accept-language",
            "x-forwarded-for",
            "content-encoding",
            "x-custom",
            "dat",
            "servers",
            "x-auth-tokens",
        ] {
            for spelling in [name.to_string(), name.to_uppercase()] {
                assert_eq!(
                    header_name(spelling.as_bytes()).unwrap(),
                    HeaderName::from_bytes(spelling.as_bytes()).unwrap(),
                    "{spelling}"
                );
            }
        }
        assert_eq!(header_name(b"bad name"), None);
        assert_eq!(header_name(b""), None);
    }

    #[test]
    fn an_answer_with_more_headers_than_fit_on_the_stack_keeps_them_all() {
        for count in [
            FEW_HEADERS - 1,
            FEW_HEADERS,
            FEW_HEADERS + 1,
            MAX_HEADERS - 1,
        ] {
            let lines: String = (0..count).map(|i| format!("X-{i}: v{i}\r\n")).collect();
            let parsed = head(&format!(
                "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n{lines}\r\n"
            ))
            .unwrap()
            .unwrap();
            assert_eq!(parsed.headers.len(), count);
            for i in 0..count {
                assert_eq!(parsed.headers[format!("x-{i}").as_str()], format!("v{i}"));
            }
        }
    }

    #[test]
    fn keep_alive_needs_http_1_1_and_no_close() {
        let http10 = head("HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(!http10.keep_alive);
        let close = head("HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!close.keep_alive);
    }

    fn framing(method: Method, text: &str) -> Result<ResponseFraming, ParseError> {
        parse_response_head(
            &mut BytesMut::from(text),
            &method,
            false,
            KeptHeaders::InMap,
        )
        .map(|head| head.unwrap().framing)
    }

    #[test]
    fn the_answer_framing_follows_rfc_9112() {
        use ResponseFraming::*;
        let get = || Method::GET;
        assert_eq!(
            framing(Method::HEAD, "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"),
            Ok(None)
        );
        assert_eq!(framing(get(), "HTTP/1.1 204 No Content\r\n\r\n"), Ok(None));
        assert_eq!(
            framing(
                get(),
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"
            ),
            Ok(None)
        );
        assert_eq!(
            framing(
                get(),
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            ),
            Ok(Chunked)
        );
        assert_eq!(
            framing(get(), "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Ok(UntilClose)
        );
        assert_eq!(framing(get(), "HTTP/1.1 200 OK\r\n\r\n"), Ok(UntilClose));
        assert_eq!(
            framing(get(), "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(Length(5))
        );
        for bad in ["5, 6", "-1", "+5", "", "0x5", "99999999999999999999"] {
            let text = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(
                framing(get(), &text),
                Err(ParseError::ContentLength),
                "{bad:?}"
            );
        }
        let both = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(framing(get(), both), Err(ParseError::Ambiguous));
    }

    /// Decodes `wire` fed in pieces of `step` bytes; the data, and the bytes left after the end.
    fn decode_in_steps(wire: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), ParseError> {
        let mut decoder = ChunkedDecoder::default();
        let mut buffer = BytesMut::new();
        let mut data = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buffer)? {
                Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                Decoded::End => return Ok((data, buffer.to_vec())),
                Decoded::More if fed < wire.len() => {
                    let end = (fed + step).min(wire.len());
                    buffer.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
                Decoded::More => return Err(ParseError::Chunked),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let wire = b"5;name=value\r\nhello\r\n6 ; x\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let (data, rest) = decode_in_steps(wire, wire.len()).unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for wire in [
            &b"x\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"\r\n",
        ] {
            assert_eq!(
                decode_in_steps(wire, 3),
                Err(ParseError::Chunked),
                "{wire:?}"
            );
        }
        let long_line = vec![b'1'; MAX_CHUNK_LINE + 2];
        assert_eq!(decode_in_steps(&long_line, 512), Err(ParseError::Chunked));
        // Refused as well when the whole line, end included, arrives in one read.
        let mut long_extension = b"5;".to_vec();
        long_extension.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE));
        long_extension.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        let whole = long_extension.len();
        assert_eq!(
            decode_in_steps(&long_extension, whole),
            Err(ParseError::Chunked)
        );
        assert_eq!(
            decode_in_steps(&long_extension, 7),
            Err(ParseError::Chunked)
        );
        let mut endless_trailers = b"0\r\n".to_vec();
        endless_trailers.extend(std::iter::repeat_n(&b"x: 1\r\n"[..], 4000).flatten());
        assert_eq!(
            decode_in_steps(&endless_trailers, 512),
            Err(ParseError::Chunked)
        );
    }

    proptest! {
        #[test]
        fn chunked_bodies_decode_the_same_however_they_arrive(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            step in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for chunk in &chunks {
                chunk_size_line(&mut wire, chunk.len());
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(LAST_CHUNK);
            let (data, rest) = decode_in_steps(&wire, step).unwrap();
            prop_assert_eq!(data, chunks.concat());
            prop_assert!(rest.is_empty());
        }
    }
}
