//! `own_h1_parse`: the gateway's own HTTP/1.1 request parser (`src/server/own_h1.rs`) against
//! `httparse`, the parser hyper reads request heads with.
//!
//! Like `checks_hyper.rs`, compiled into the fuzz crate and, by `#[path]`, into the gateway's
//! test suite (`tests/it/fuzz_regressions.rs`); it uses only crates the gateway depends on.
//!
//! Input: one byte choosing the size of the pieces the client's bytes arrive in (`0`: all at
//! once; else its value modulo 16, plus 1), then the bytes a client sends.
//!
//! - the parser never panics;
//! - it answers the same whether the bytes arrive at once or in pieces;
//! - a head it does not serve (or not yet) is left in the buffer as it was, byte for byte
//!   (hyper must read exactly what the client sent);
//! - a request it serves is one `httparse` reads as HTTP/1.1 with the same method, target (as
//!   `http::Uri` reads it, as hyper does) and header lines (as a `HeaderMap` of them iterates:
//!   the values of a name together, names lowercased, values byte for byte), within the head
//!   limit; it takes exactly that head from the buffer; it has no body framing other than
//!   `Content-Length: 0`, no `Expect`, `Upgrade`, `TE` or `HTTP2-Settings`, and `Connection`
//!   only as `keep-alive` or `close` — said to close exactly when a `Connection` line is
//!   `close`; its method is neither `HEAD` nor `CONNECT` and its target starts
//!   with `/`.

use bytes::BytesMut;
use mfa_gate::server::own_h1::{parse_request, Parsed};

/// The head limit the checks run with: small, so that the fuzzer reaches it.
const MAX_HEAD: usize = 1024;

/// What a parse came to: a request (method, target, header lines, whether it asks to close),
/// waiting, or hyper's; and
/// the bytes left in the buffer after it plus those not fed yet.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Request(String, String, Vec<(String, Vec<u8>)>, bool),
    Partial,
    NotOurs,
}

fn run(wire: &[u8], step: usize) -> (Outcome, Vec<u8>) {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    loop {
        let end = if step == 0 {
            wire.len()
        } else {
            (fed + step).min(wire.len())
        };
        buf.extend_from_slice(&wire[fed..end]);
        fed = end;
        let before = buf.clone();
        let outcome = match parse_request(&mut buf, MAX_HEAD) {
            Parsed::Request(request, closes) => {
                let lines = request
                    .headers()
                    .iter()
                    .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
                    .collect();
                Outcome::Request(
                    request.method().to_string(),
                    request.uri().to_string(),
                    lines,
                    closes,
                )
            }
            Parsed::Partial => Outcome::Partial,
            Parsed::NotOurs => Outcome::NotOurs,
        };
        if outcome != Outcome::Partial && !matches!(outcome, Outcome::Request(..)) {
            assert_eq!(buf, before, "a head left to hyper was changed");
        }
        if outcome == Outcome::Partial {
            assert_eq!(buf, before, "a waiting head was changed");
            if fed < wire.len() {
                continue;
            }
        }
        let mut left = buf.to_vec();
        left.extend_from_slice(&wire[fed..]);
        return (outcome, left);
    }
}

pub fn own_h1_parse(data: &[u8]) {
    let [step, wire @ ..] = data else {
        return;
    };
    let step = if *step == b'0' || *step == 0 {
        0
    } else {
        usize::from(*step % 16) + 1
    };
    let (whole, left) = run(wire, 0);
    let (pieces, left_pieces) = run(wire, step);
    assert_eq!(whole, pieces, "at once and in pieces of {step} differ");
    let Outcome::Request(method, target, lines, closes) = &whole else {
        return;
    };
    assert_eq!(left, left_pieces, "different bytes left after the head");

    // The oracle: httparse, as hyper runs it.
    let mut slots = [httparse::EMPTY_HEADER; 100];
    let mut parsed = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(length)) = parsed.parse(wire) else {
        panic!("served a head httparse does not read whole: {whole:?}");
    };
    assert!(length <= MAX_HEAD, "served a head over the limit");
    assert_eq!(&wire[length..], &left[..], "took other bytes than the head");
    assert_eq!(
        parsed.version,
        Some(1),
        "served a request that is not HTTP/1.1"
    );
    assert_eq!(parsed.method, Some(method.as_str()));
    // The target as `http` reads httparse's, as hyper reads it (a fragment is dropped).
    let path = parsed.path.expect("a complete head has a target");
    let as_hyper = http::Uri::try_from(path).ok().map(|uri| uri.to_string());
    assert_eq!(
        as_hyper.as_deref(),
        Some(target.as_str()),
        "target {path:?}"
    );
    assert!(
        target.starts_with('/'),
        "served a target not in origin form"
    );
    assert!(method != "HEAD" && method != "CONNECT", "served {method}");
    assert_eq!(
        parsed.headers.len(),
        lines.len(),
        "header lines lost or added"
    );
    // In the order a `HeaderMap` gives them (the values of a name together, names in the
    // order they first came), as hyper hands them on.
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for line in parsed.headers.iter() {
        let name = line.name.to_ascii_lowercase();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    for name in &names {
        for line in parsed.headers.iter() {
            if line.name.eq_ignore_ascii_case(name) {
                expected.push((name.clone(), line.value.to_vec()));
            }
        }
    }
    assert_eq!(&expected, lines, "header lines changed");
    for (name, value) in lines {
        match name.as_str() {
            "content-length" => assert_eq!(&value[..], b"0", "served a body"),
            "transfer-encoding" | "expect" | "upgrade" | "te" | "http2-settings" => {
                panic!("served a request with {name}")
            }
            "connection" => assert!(
                value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close"),
                "connection"
            ),
            _ => {}
        }
    }
    let asks_to_close = lines
        .iter()
        .any(|(name, value)| name == "connection" && value.eq_ignore_ascii_case(b"close"));
    assert_eq!(*closes, asks_to_close, "Connection: close taken or missed");
}
