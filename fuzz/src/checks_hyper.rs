//! `framing_differential`: the framing observer against the parser that really frames the
//! requests, hyper's HTTP/1 server, modelled on `httparse` (the crate and version hyper parses
//! heads with) and hyper 1.x's framing rules (`proto/h1/role.rs`, `Server::parse`).
//!
//! Needs `httparse`: a dependency of the fuzz crate and of the gateway (which parses upstream
//! answers with it), so that `tests/it/fuzz_regressions.rs` replays the committed inputs through
//! this check too.
//!
//! Input: the bytes a client sends on one connection.
//!
//! For every request hyper would hand to the gateway, in order, the observer's verdict (the one
//! the request guard pops for it) must be `Some(true)` when hyper saw both `Content-Length` and
//! `Transfer-Encoding` (CONTRACT §4: refuse with 400), and `Some(false)` or `None` (hyper
//! decides alone) otherwise. The model follows the connection through `Content-Length` and
//! chunked bodies; it stops at an upgrade, a `Connection` header, HTTP/1.0, a conflict (hyper
//! closes the connection after it) or anything hyper refuses.

use mfa_gate::server::framing::{FramingObserver, FramingVerdicts};

/// What the server uses for its default `max_header_bytes` (64 KiB + 16 KiB of slack).
const MAX_HEAD: usize = 64 * 1024 + 16 * 1024;

pub fn framing_differential(data: &[u8]) {
    let expected = hyper_conflicts(data);
    for (reads, size) in [("one read", data.len().max(1)), ("one-byte reads", 1)] {
        let verdicts = FramingVerdicts::default();
        let mut observer = FramingObserver::new(verdicts.clone(), MAX_HEAD);
        for chunk in data.chunks(size) {
            observer.observe(chunk);
        }
        for (index, &conflict) in expected.iter().enumerate() {
            let verdict = verdicts.next_conflict();
            assert!(
                verdict == Some(conflict) || (verdict.is_none() && !conflict),
                "request {index} ({reads}): hyper sees {}, the observer says {verdict:?}",
                if conflict {
                    "Content-Length with Transfer-Encoding"
                } else {
                    "no conflict"
                },
            );
        }
    }
}

/// For each request hyper's HTTP/1 server would dispatch from `stream`, whether its head had
/// both `Content-Length` and `Transfer-Encoding`.
fn hyper_conflicts(stream: &[u8]) -> Vec<bool> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut request = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = request.parse(&stream[at..]) else {
            break;
        };
        let (Some(method), Some(path), Some(version)) =
            (request.method, request.path, request.version)
        else {
            break;
        };
        if http::Method::from_bytes(method.as_bytes()).is_err()
            || path.parse::<http::Uri>().is_err()
            || method == "CONNECT"
        {
            break;
        }
        let http11 = version == 1;
        let mut is_te = false;
        let mut is_te_chunked = false;
        let mut is_cl = false;
        let mut content_length: Option<u64> = None;
        let mut follow = http11;
        let mut refused = false;
        for header in request.headers.iter() {
            let name = header.name.to_ascii_lowercase();
            match name.as_str() {
                "transfer-encoding" => {
                    if !http11 {
                        refused = true;
                        break;
                    }
                    is_te = true;
                    if is_cl {
                        content_length = None;
                    }
                    // `HeaderValue::to_str` (visible ASCII, space, tab), then the last coding.
                    let text = header
                        .value
                        .iter()
                        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
                        .then(|| String::from_utf8_lossy(header.value));
                    is_te_chunked = text.is_some_and(|value| {
                        value
                            .rsplit(',')
                            .next()
                            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
                    });
                }
                "content-length" => {
                    is_cl = true;
                    if is_te {
                        continue;
                    }
                    let Some(len) = digits(header.value) else {
                        refused = true;
                        break;
                    };
                    if content_length.is_some_and(|previous| previous != len) {
                        refused = true;
                        break;
                    }
                    content_length = Some(len);
                }
                "connection" | "upgrade" => follow = false,
                _ => {}
            }
        }
        if refused || (is_te && !is_te_chunked) {
            break;
        }
        let conflict = is_te && is_cl;
        out.push(conflict);
        if conflict || !follow {
            break;
        }
        let body_len = if is_te_chunked {
            chunked_len(&stream[at + head_len..])
        } else {
            usize::try_from(content_length.unwrap_or(0)).ok()
        };
        let Some(next) = body_len.and_then(|body| (at + head_len).checked_add(body)) else {
            break;
        };
        at = next;
    }
    out
}

/// The length of the chunked body at the start of `body`, trailers included, as hyper's chunked
/// decoder (`proto/h1/decode.rs`) reads it; `None` when hyper would refuse it or it is not
/// complete.
fn chunked_len(body: &[u8]) -> Option<usize> {
    #[derive(Clone, Copy)]
    enum State {
        Start,
        Size,
        SizeLws,
        Extension,
        SizeLf,
        BodyCr,
        BodyLf,
        EndCr,
        Trailer,
        TrailerLf,
        EndLf,
    }
    /// hyper's `CHUNKED_EXTENSIONS_LIMIT` and `TRAILER_LIMIT`, per body.
    const LIMIT: usize = 16 * 1024;
    let hex = |b: u8| char::from(b).to_digit(16).map(u64::from);
    let mut state = State::Start;
    let mut size = 0u64;
    let mut extension_bytes = 0;
    let mut trailer_bytes = 0;
    let mut trailers = 0;
    let mut at = 0;
    while at < body.len() {
        let b = body[at];
        at += 1;
        state = match state {
            State::Start => {
                size = hex(b)?;
                State::Size
            }
            State::Size => match b {
                b'\t' | b' ' => State::SizeLws,
                b';' => State::Extension,
                b'\r' => State::SizeLf,
                _ => {
                    size = size.checked_mul(16)?.checked_add(hex(b)?)?;
                    State::Size
                }
            },
            State::SizeLws => match b {
                b'\t' | b' ' => State::SizeLws,
                b';' => State::Extension,
                b'\r' => State::SizeLf,
                _ => return None,
            },
            State::Extension => match b {
                b'\r' => State::SizeLf,
                b'\n' => return None,
                _ => {
                    extension_bytes += 1;
                    if extension_bytes >= LIMIT {
                        return None;
                    }
                    State::Extension
                }
            },
            State::SizeLf if b == b'\n' && size == 0 => State::EndCr,
            State::SizeLf if b == b'\n' => {
                // The data, then its CRLF.
                let data = usize::try_from(size).ok()?;
                at = at.checked_add(data)?;
                State::BodyCr
            }
            State::BodyCr if b == b'\r' => State::BodyLf,
            State::BodyLf if b == b'\n' => State::Start,
            State::EndCr if b == b'\r' => State::EndLf,
            State::EndCr | State::Trailer => {
                trailer_bytes += 1;
                if trailer_bytes >= LIMIT {
                    return None;
                }
                if b == b'\r' {
                    State::TrailerLf
                } else {
                    State::Trailer
                }
            }
            State::TrailerLf if b == b'\n' => {
                trailers += 1;
                if trailers > 100 {
                    return None;
                }
                State::EndCr
            }
            State::EndLf if b == b'\n' => return Some(at),
            State::SizeLf | State::BodyCr | State::BodyLf | State::TrailerLf | State::EndLf => {
                return None
            }
        };
    }
    None
}

/// hyper's `Content-Length` value: one run of ASCII digits, no sign, no list, no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}
