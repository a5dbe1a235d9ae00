//! Path normalisation: the one place where the gateway decides which path a request is for.
//!
//! An authenticating proxy is only as strong as its agreement with the upstream about which
//! resource a request names. When the two read a path differently, a rule that exempts
//! `/public/**` lets `/public/../admin` or `/public/..;/admin` through to whatever the upstream
//! makes of it. Envoy CVE-2019-9901 (`..` segments not resolved before route and RBAC matching)
//! and CVE-2021-29492 (`%2F` / `%5C` left encoded by Envoy but decoded by upstreams) are this
//! bug, and so is the `..;` trick against Tomcat behind nginx. So the gateway normalises once,
//! matches the allowlist against the result, forwards that same string upstream (contract §4),
//! and refuses with `400` every path whose meaning upstreams are known to disagree about
//! instead of guessing which reading the upstream will pick.
//!
//! [`normalize`] takes the path of an origin-form request target whose query was already cut:
//!
//! - it must start with `/`;
//! - raw control bytes, space, non-ASCII bytes, `\` and `#` are refused (and a raw `?`, which
//!   would mean the caller left the query on);
//! - a `%` must start a two-hex-digit escape. Escapes of unreserved characters (RFC 3986 §2.3)
//!   are decoded, so `%2e` is `.`; escapes of `/`, `\`, `;`, `?`, `#` and of control bytes are
//!   refused; every other escape is kept, with upper-case hex digits (RFC 3986 §6.2.2.1);
//! - repeated `/` are merged, then `.` and `..` segments are resolved as RFC 3986 §5.2.4
//!   `remove_dot_segments` does. A `..` above the root is refused, and so is a dot segment
//!   carrying parameters (`..;x`, `.;x`);
//! - a trailing `/` is kept, since `/status` and `/status/` may be different resources.
//!
//! The output starts with `/`, never contains `//`, has no `.` or `..` segment, and is its own
//! normal form. Almost every real path is already normal, so a first pass checks exactly that
//! without allocating and hands the input back borrowed; only the rest are rebuilt.

use std::borrow::Cow;

/// Why a path was refused.
///
/// Every variant means `400` (reason `bad_request`). The `Display` text goes into the response
/// body, so it names the offending construct and never echoes the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Only origin-form targets carry a path that rules can be matched against.
    #[error("path does not start with '/'")]
    NotAbsolute,
    /// Control bytes are not allowed in a request target (RFC 9112 §3.2) and upstreams
    /// truncate or strip them in different ways.
    #[error("control character in path")]
    ControlChar,
    /// A raw space can only come from a broken client or a request-splitting attempt.
    #[error("space in path")]
    Space,
    /// Request targets are ASCII; upstreams differ on raw UTF-8, Latin-1 and look-alike
    /// folding, while the percent-encoded form is unambiguous and allowed.
    #[error("non-ascii byte in path")]
    NonAscii,
    /// IIS and many frameworks on Windows read `\` as `/`.
    #[error("'\\' in path")]
    Backslash,
    /// A fragment is never sent; a raw `#` means a broken client, and upstreams may cut the
    /// path there.
    #[error("'#' in path")]
    Hash,
    /// The caller cuts the query at the first `?`, so one here means the caller passed more
    /// than the path; refusing it keeps a query from being matched as if it were path.
    #[error("'?' in path")]
    QuestionMark,
    /// A `%` not followed by two hex digits has no agreed meaning.
    #[error("invalid percent escape in path")]
    InvalidEscape,
    /// Upstreams that decode it see one more segment boundary than the allowlist did.
    #[error("encoded '/' in path")]
    EncodedSlash,
    /// Upstreams that decode it and read `\` as `/` see one more segment boundary.
    #[error("encoded '\\' in path")]
    EncodedBackslash,
    /// Upstreams that decode it before stripping path parameters see a different path.
    #[error("encoded ';' in path")]
    EncodedSemicolon,
    /// Upstreams that decode it see a query where the allowlist saw path.
    #[error("encoded '?' in path")]
    EncodedQuestionMark,
    /// Upstreams that decode it may cut the path there.
    #[error("encoded '#' in path")]
    EncodedHash,
    /// NUL ends strings in C upstreams, other control bytes get stripped or logged raw.
    #[error("encoded control character in path")]
    EncodedControl,
    /// Servlet containers strip path parameters, so `..;x` is `..` to them but an ordinary
    /// segment under RFC 3986: exactly the disagreement a bypass needs.
    #[error("dot segment with parameters in path")]
    DotSegmentParams,
    /// There is no resource above the root; upstreams either clamp or serve files outside the
    /// intended tree, and neither should be guessed at.
    #[error("path climbs above the root")]
    AboveRoot,
}

/// Normalises the path component of an origin-form request target (the caller already cut the
/// query at the first `?`).
///
/// Returns `Cow::Borrowed(path)` when the path is already normal, so the common case costs one
/// scan and no allocation; a path that needs rewriting costs one allocation.
///
/// # Errors
///
/// A [`PathError`] for a path that upstreams could read differently from the gateway; the
/// request must then be refused with `400`.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if is_normal(path)? {
        Ok(Cow::Borrowed(path))
    } else {
        rebuild(path).map(Cow::Owned)
    }
}

/// The hot path. Refuses every byte-level problem, and tells whether `path` is already in
/// normal form.
///
/// Refusals that depend on the segment structure (`..` above the root, `..;x`) are left to
/// [`rebuild`]: any path that could trigger them contains a dot segment and is not normal.
/// Because every byte-level check happens here, before [`rebuild`] runs, the error reported
/// for a path with several problems is always the first byte-level one, whatever else the
/// path contains.
fn is_normal(path: &str) -> Result<bool, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut normal = true;
    let mut segment_start = 1;
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'/' => {
                normal &= Segment::of(&bytes[segment_start..i]) == Segment::Plain;
                segment_start = i + 1;
            }
            b'%' => {
                let escape = Escape::parse(bytes, i)?;
                normal &= matches!(escape, Escape::Kept(byte) if bytes[i..i + 3] == encode(byte));
                i += 2;
            }
            byte => check_raw(byte)?,
        }
        i += 1;
    }
    // An empty last segment is the trailing slash, which is kept.
    normal &= matches!(
        Segment::of(&bytes[segment_start..]),
        Segment::Plain | Segment::Empty
    );
    Ok(normal)
}

/// The slow path: decodes and re-encodes each segment into one buffer, resolving dot segments
/// as they come, so that merging `/` happens before `..` is applied (`/a//../b` is `/b`).
///
/// It re-checks every byte it copies, so it never relies on [`is_normal`] having run.
fn rebuild(path: &str) -> Result<String, PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    // Normalising never lengthens a path, so this is the only allocation.
    let mut out = String::with_capacity(path.len());
    let mut trailing_slash = false;
    for segment in rest.as_bytes().split(|&byte| byte == b'/') {
        let start = out.len();
        out.push('/');
        decode_into(segment, &mut out)?;
        let kind = Segment::of(&out.as_bytes()[start + 1..]);
        // A path that ends in a dot segment names a directory (RFC 3986 §5.2.4: `/a/b/..` is
        // `/a/`), as does one that ends in `/`.
        trailing_slash = kind != Segment::Plain;
        match kind {
            Segment::Plain => {}
            Segment::Empty | Segment::Dot => out.truncate(start),
            Segment::DotDot => {
                out.truncate(start);
                let parent = out.rfind('/').ok_or(PathError::AboveRoot)?;
                out.truncate(parent);
            }
            Segment::DotWithParams => return Err(PathError::DotSegmentParams),
        }
    }
    if trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// Appends the normal form of one segment (which holds no `/`) to `out`.
fn decode_into(segment: &[u8], out: &mut String) -> Result<(), PathError> {
    let mut i = 0;
    while i < segment.len() {
        match segment[i] {
            b'%' => {
                match Escape::parse(segment, i)? {
                    Escape::Unreserved(byte) => out.push(char::from(byte)),
                    Escape::Kept(byte) => out.extend(encode(byte).map(char::from)),
                }
                i += 3;
            }
            byte => {
                check_raw(byte)?;
                // `check_raw` let through ASCII only, so the byte is the whole character.
                out.push(char::from(byte));
                i += 1;
            }
        }
    }
    Ok(())
}

/// Refuses a byte that may not appear unencoded in a path.
fn check_raw(byte: u8) -> Result<(), PathError> {
    match byte {
        0x00..=0x1F | 0x7F => Err(PathError::ControlChar),
        b' ' => Err(PathError::Space),
        0x80..=0xFF => Err(PathError::NonAscii),
        b'\\' => Err(PathError::Backslash),
        b'#' => Err(PathError::Hash),
        b'?' => Err(PathError::QuestionMark),
        _ => Ok(()),
    }
}

/// What an accepted `%XX` escape stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// Equivalent to the raw character (RFC 3986 §2.3, §6.2.2.2), so it is decoded: otherwise
    /// `%2e%2e` would slip past dot-segment resolution, and `/%61dmin` past a rule for `/admin`.
    Unreserved(u8),
    /// Kept encoded: decoding it would hand the upstream a different request target.
    Kept(u8),
}

impl Escape {
    /// Reads the escape whose `%` is at `bytes[percent]`, refusing the ones that would make the
    /// path ambiguous.
    fn parse(bytes: &[u8], percent: usize) -> Result<Self, PathError> {
        let digit = |at: usize| bytes.get(at).copied().and_then(hex_value);
        let (Some(high), Some(low)) = (digit(percent + 1), digit(percent + 2)) else {
            return Err(PathError::InvalidEscape);
        };
        match high << 4 | low {
            b'/' => Err(PathError::EncodedSlash),
            b'\\' => Err(PathError::EncodedBackslash),
            b';' => Err(PathError::EncodedSemicolon),
            b'?' => Err(PathError::EncodedQuestionMark),
            b'#' => Err(PathError::EncodedHash),
            0x00..=0x1F | 0x7F => Err(PathError::EncodedControl),
            byte if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') => {
                Ok(Self::Unreserved(byte))
            }
            byte => Ok(Self::Kept(byte)),
        }
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// The one spelling of an escape that survives normalisation, so that `%c3` and `%C3` match
/// the same rules.
fn encode(byte: u8) -> [u8; 3] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    [
        b'%',
        HEX[usize::from(byte >> 4)],
        HEX[usize::from(byte & 0x0F)],
    ]
}

/// How a segment (the text between two `/`, after decoding) takes part in dot-segment
/// resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    Empty,
    Dot,
    DotDot,
    /// `.` or `..` followed by `;`: see [`PathError::DotSegmentParams`].
    DotWithParams,
    Plain,
}

impl Segment {
    fn of(segment: &[u8]) -> Self {
        match segment {
            b"" => Self::Empty,
            b"." => Self::Dot,
            b".." => Self::DotDot,
            [b'.', b';', ..] | [b'.', b'.', b';', ..] => Self::DotWithParams,
            _ => Self::Plain,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;
    use proptest::prelude::*;

    #[track_caller]
    fn normal(input: &str) -> String {
        match normalize(input) {
            Ok(out) => out.into_owned(),
            Err(err) => panic!("{input:?} refused: {err}"),
        }
    }

    #[track_caller]
    fn refused(input: &str) -> PathError {
        match normalize(input) {
            Ok(out) => panic!("{input:?} accepted as {out:?}"),
            Err(err) => err,
        }
    }

    #[track_caller]
    fn assert_rewrites(cases: &[(&str, &str)]) {
        for &(input, expected) in cases {
            assert_eq!(normal(input), expected, "input {input:?}");
        }
    }

    #[track_caller]
    fn assert_refused(error: PathError, inputs: &[&str]) {
        for &input in inputs {
            assert_eq!(refused(input), error, "input {input:?}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for input in [
            "/",
            "/a",
            "/a/",
            "/a/b/c",
            "/a/b/c/",
            "/a;jsessionid=1",
            "/a/...;x",
            "/...",
            "/.hidden",
            "/a..",
            "/a.b/c..d/",
            "/;",
            "/a;b/c;d=e",
            "/%20",
            "/%25",
            "/%2A",
            "/%C3%A9",
            "/a%20b/%FF",
            "/%252e",
            "/~user/x-y_z.html",
            "/a:b@c!$&'()*+,=",
            "/status",
        ] {
            match normalize(input) {
                Ok(Cow::Borrowed(out)) => assert_eq!(out, input),
                other => panic!("{input:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn must_start_with_slash() {
        assert_refused(
            PathError::NotAbsolute,
            &[
                "",
                "a",
                "a/b",
                "*",
                ".",
                "../a",
                "%2F",
                "http://host/a",
                " /a",
            ],
        );
    }

    #[test]
    fn raw_control_bytes_are_refused() {
        assert_refused(
            PathError::ControlChar,
            &[
                "/\0", "/a\tb", "/a\n", "/\r\n", "/\x01", "/\x1f", "/\x7f", "/a/\x0bb",
            ],
        );
    }

    #[test]
    fn raw_space_is_refused() {
        assert_refused(PathError::Space, &["/ ", "/a b", "/a/ /b"]);
    }

    #[test]
    fn raw_non_ascii_is_refused() {
        assert_refused(
            PathError::NonAscii,
            &[
                "/caf\u{e9}",
                "/\u{80}",
                "/\u{2215}",
                "/a/\u{ff0e}\u{ff0e}/b",
                "/\u{1f600}",
            ],
        );
    }

    #[test]
    fn raw_backslash_hash_and_question_mark_are_refused() {
        assert_refused(
            PathError::Backslash,
            &["/\\", "/a\\b", "/public\\..\\admin"],
        );
        assert_refused(PathError::Hash, &["/#", "/a#b", "/a/#/../b"]);
        assert_refused(PathError::QuestionMark, &["/?", "/a?b=c"]);
    }

    #[test]
    fn invalid_escapes_are_refused() {
        assert_refused(
            PathError::InvalidEscape,
            &[
                "/%",
                "/%4",
                "/a%",
                "/a%4",
                "/%zz",
                "/%4g",
                "/%g4",
                "/%%41",
                "/% 1",
                "/%-1",
                "/%+1",
                "/%\u{e9}",
                "/%4\u{e9}",
                "/%/",
                "/%4/",
            ],
        );
    }

    #[test]
    fn unreserved_escapes_are_decoded() {
        assert_rewrites(&[
            ("/%41", "/A"),
            ("/%61", "/a"),
            ("/%7A%5a", "/zZ"),
            ("/%30%39", "/09"),
            ("/a%2eb", "/a.b"),
            ("/a%2Eb", "/a.b"),
            ("/%2D%5f%7E", "/-_~"),
            ("/%61dmin", "/admin"),
            ("/%2ehidden", "/.hidden"),
        ]);
    }

    #[test]
    fn escapes_of_delimiters_are_refused_in_any_case() {
        assert_refused(
            PathError::EncodedSlash,
            &["/%2F", "/%2f", "/a%2Fb", "/public%2f..%2fadmin"],
        );
        assert_refused(
            PathError::EncodedBackslash,
            &["/%5C", "/%5c", "/a%5c..%5cb"],
        );
        assert_refused(
            PathError::EncodedSemicolon,
            &["/%3B", "/%3b", "/a%3bb", "/..%3bx"],
        );
        assert_refused(
            PathError::EncodedQuestionMark,
            &["/%3F", "/%3f", "/a%3Fb=c"],
        );
        assert_refused(PathError::EncodedHash, &["/%23", "/a%23b"]);
    }

    #[test]
    fn escapes_of_control_bytes_are_refused() {
        assert_refused(
            PathError::EncodedControl,
            &[
                "/%00", "/a/%00", "/%01", "/%0a", "/%0A", "/%0d%0a", "/%1F", "/%1f", "/%7F", "/%7f",
            ],
        );
    }

    #[test]
    fn other_escapes_are_kept_with_upper_case_hex() {
        assert_rewrites(&[
            ("/%c3%a9", "/%C3%A9"),
            ("/%C3%a9", "/%C3%A9"),
            ("/%2a", "/%2A"),
            ("/%ff", "/%FF"),
            ("/%fF%Ff", "/%FF%FF"),
            ("/a%20b", "/a%20b"),
            ("/%25", "/%25"),
            ("/%80", "/%80"),
        ]);
        assert_eq!(normal("/caf%c3%a9"), normal("/caf%C3%A9"));
    }

    #[test]
    fn escapes_are_decoded_once() {
        // `%25` is `%` and stays encoded, so what follows it is not an escape to decode.
        assert_rewrites(&[("/%252e%252e/x", "/%252e%252e/x"), ("/%252F", "/%252F")]);
    }

    #[test]
    fn repeated_slashes_are_merged() {
        assert_rewrites(&[
            ("//", "/"),
            ("///", "/"),
            ("//a", "/a"),
            ("//a///b", "/a/b"),
            ("/a//", "/a/"),
            ("/a//b//", "/a/b/"),
        ]);
    }

    #[test]
    fn dot_segments_are_resolved() {
        assert_rewrites(&[
            ("/a/./b", "/a/b"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/.", "/"),
            ("/./", "/"),
            ("/a/..", "/"),
            ("/a/../", "/"),
            ("/a/./b/./", "/a/b/"),
            ("/a/b/c/../../d", "/a/d"),
            ("/a/b/./../c/.", "/a/c/"),
            ("/./a", "/a"),
        ]);
    }

    #[test]
    fn dot_segments_are_resolved_after_decoding() {
        assert_rewrites(&[
            ("/a/%2e/b", "/a/b"),
            ("/a/b/%2e%2e/c", "/a/c"),
            ("/a/b/%2E%2e", "/a/"),
            ("/a/b/.%2e/c", "/a/c"),
            ("/a/b/%2e./c", "/a/c"),
            ("/a/%2E", "/a/"),
        ]);
    }

    #[test]
    fn slashes_are_merged_before_dot_segments_are_resolved() {
        assert_rewrites(&[
            ("/a//../b", "/b"),
            ("/a/b//..", "/a/"),
            ("/a/.//b", "/a/b"),
            ("/a/b//../../c", "/c"),
        ]);
        // `//..` is `/..`: merging does not create a parent to climb out of.
        assert_eq!(refused("//.."), PathError::AboveRoot);
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        assert_refused(
            PathError::AboveRoot,
            &[
                "/..",
                "/../",
                "/../a",
                "/a/../..",
                "/a/b/../../..",
                "/./..",
                "//..",
                "/%2e%2e/x",
                "/%2E%2E",
                "/.%2e",
                "/a/..//../b",
            ],
        );
    }

    #[test]
    fn dot_segments_with_parameters_are_refused() {
        assert_refused(
            PathError::DotSegmentParams,
            &[
                "/..;x",
                "/.;x",
                "/..;",
                "/.;",
                "/a/..;/b",
                "/a/.;/b",
                "/%2e%2e;foo",
                "/%2E;",
                "/a/.%2e;x",
                "/a/..;jsessionid=1/",
            ],
        );
    }

    #[test]
    fn semicolons_elsewhere_are_kept() {
        assert_rewrites(&[
            ("/a;jsessionid=1", "/a;jsessionid=1"),
            ("/a/...;x", "/a/...;x"),
            ("/a.;x", "/a.;x"),
            ("/a..;x", "/a..;x"),
            ("/;/..", "/"),
            ("/a;b/../c", "/c"),
            ("/x;.;/y", "/x;.;/y"),
        ]);
    }

    #[test]
    fn dotted_names_are_ordinary_segments() {
        assert_rewrites(&[
            ("/...", "/..."),
            ("/a/.../b", "/a/.../b"),
            ("/.hidden", "/.hidden"),
            ("/a..", "/a.."),
            ("/..a", "/..a"),
            ("/%2e%2e%2e", "/..."),
            ("/%2ehidden/..", "/"),
        ]);
    }

    #[test]
    fn trailing_slash_is_kept() {
        assert_rewrites(&[
            ("/", "/"),
            ("/a/", "/a/"),
            ("/a//", "/a/"),
            ("/a/./", "/a/"),
            ("/a/b/../", "/a/"),
            ("/a", "/a"),
        ]);
    }

    #[test]
    fn known_bypass_shapes() {
        assert_rewrites(&[
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2E/admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("/public/./../admin", "/admin"),
            ("/public//../admin", "/admin"),
        ]);
        assert_eq!(refused("/public/..;/admin"), PathError::DotSegmentParams);
        assert_eq!(refused("/public%2f..%2fadmin"), PathError::EncodedSlash);
        assert_eq!(refused("/public%2F..%2Fadmin"), PathError::EncodedSlash);
        assert_eq!(refused("/public\\..\\admin"), PathError::Backslash);
        assert_eq!(refused("/public%5c..%5cadmin"), PathError::EncodedBackslash);
        assert_eq!(
            refused("/public/%2e%2e%3b/admin"),
            PathError::EncodedSemicolon
        );
        assert_eq!(refused("/admin%00.js"), PathError::EncodedControl);
        assert_eq!(refused("/a/%00"), PathError::EncodedControl);
        assert_eq!(refused("/a%3bb"), PathError::EncodedSemicolon);
        assert_eq!(refused("/%"), PathError::InvalidEscape);
        assert_eq!(refused("/%zz"), PathError::InvalidEscape);
        assert_eq!(refused("/caf\u{e9}"), PathError::NonAscii);
        assert_eq!(refused("/public/../../admin"), PathError::AboveRoot);
    }

    #[test]
    fn the_first_byte_level_problem_is_reported() {
        assert_eq!(refused("/%2F\\"), PathError::EncodedSlash);
        assert_eq!(refused("/\\%2F"), PathError::Backslash);
        // Byte-level problems win over structural ones, wherever they are.
        assert_eq!(refused("/../%zz"), PathError::InvalidEscape);
        assert_eq!(refused("/..;x/#"), PathError::Hash);
    }

    #[test]
    fn display_texts_are_short_lowercase_phrases() {
        assert_eq!(PathError::EncodedSlash.to_string(), "encoded '/' in path");
        assert_eq!(
            PathError::EncodedBackslash.to_string(),
            "encoded '\\' in path"
        );
        assert_eq!(PathError::Backslash.to_string(), "'\\' in path");
        for err in [
            PathError::NotAbsolute,
            PathError::ControlChar,
            PathError::Space,
            PathError::NonAscii,
            PathError::Backslash,
            PathError::Hash,
            PathError::QuestionMark,
            PathError::InvalidEscape,
            PathError::EncodedSlash,
            PathError::EncodedBackslash,
            PathError::EncodedSemicolon,
            PathError::EncodedQuestionMark,
            PathError::EncodedHash,
            PathError::EncodedControl,
            PathError::DotSegmentParams,
            PathError::AboveRoot,
        ] {
            let text = err.to_string();
            assert_eq!(text, text.to_lowercase(), "{err:?}");
            assert!(text.contains("path"), "{err:?}: {text}");
        }
    }

    /// Characters that make escapes, dot segments and slashes collide often.
    const CONFUSING: &[char] = &[
        '/', '.', '%', '2', 'e', 'E', 'f', 'F', ';', 'a', '\\', '5', 'c', '0',
    ];

    fn confusing() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(CONFUSING), 0..24)
            .prop_map(|chars| chars.into_iter().collect())
    }

    /// Pieces of paths that need rewriting but are mostly accepted.
    const TOKENS: &[&str] = &[
        "/", "//", ".", "..", "%2e", "%2E", "a", "b", ";", ";x", "%41", "%61", "%c3", "%C3", "%25",
        "%2a", "~",
    ];

    /// Inputs that are mostly accepted, so the output invariants get exercised.
    fn plausible() -> impl Strategy<Value = String> {
        prop_oneof![
            confusing().prop_map(|s| format!("/{s}")),
            prop::collection::vec(prop::sample::select(TOKENS), 0..16)
                .prop_map(|tokens| format!("/{}", tokens.concat())),
            "/[-._~a-zA-Z0-9/;%:@!$&'()*+,=]{0,32}",
        ]
    }

    fn check_output(input: &str) -> Result<(), TestCaseError> {
        let Ok(out) = normalize(input) else {
            return Ok(());
        };
        prop_assert!(out.starts_with('/'), "{input:?} -> {out:?}");
        prop_assert!(!out.contains("//"), "{input:?} -> {out:?}");
        for segment in out.split('/') {
            prop_assert!(
                Segment::of(segment.as_bytes()) == Segment::Plain || segment.is_empty(),
                "{input:?} -> {out:?}"
            );
        }
        match normalize(&out) {
            Ok(Cow::Borrowed(again)) => prop_assert_eq!(again, &*out),
            other => prop_assert!(false, "{input:?} -> {out:?} -> {other:?}"),
        }
        // Owned only when something changed: a normal input must come back borrowed.
        if let Cow::Owned(owned) = &out {
            prop_assert_ne!(owned, input);
        }
        Ok(())
    }

    /// Re-spells `input` without changing its meaning: percent-encodes some unreserved
    /// characters and flips the case of some escapes' hex digits, driven by `choices`.
    fn respell(input: &str, choices: &[u8]) -> String {
        let mut choice = choices.iter().copied().cycle();
        let mut next = move || choice.next().unwrap_or(0);
        let mut out = String::new();
        let mut chars = input.chars();
        while let Some(c) = chars.next() {
            if c == '%' {
                // An escape (or what a `%` makes of the next two characters) is kept in place,
                // so its digits are not mistaken for unreserved characters.
                out.push('%');
                for digit in chars.by_ref().take(2) {
                    if next() % 2 == 0 {
                        out.push(digit.to_ascii_lowercase());
                    } else {
                        out.push(digit.to_ascii_uppercase());
                    }
                }
            } else if (c.is_ascii_alphanumeric() || "-._~".contains(c)) && next() % 3 != 0 {
                let byte = u32::from(c);
                let written = if next() % 2 == 0 {
                    write!(out, "%{byte:02x}")
                } else {
                    write!(out, "%{byte:02X}")
                };
                written.expect("writing to a String cannot fail");
            } else {
                out.push(c);
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn output_is_normal_for_confusing_input(input in confusing()) {
            check_output(&input)?;
            check_output(&format!("/{input}"))?;
        }

        #[test]
        fn output_is_normal_for_plausible_input(input in plausible()) {
            check_output(&input)?;
        }

        #[test]
        fn output_is_normal_for_any_input(input in any::<String>()) {
            check_output(&input)?;
            check_output(&format!("/{input}"))?;
        }

        #[test]
        fn respelling_does_not_change_the_result(
            input in prop_oneof![plausible(), confusing(), any::<String>()],
            choices in prop::collection::vec(any::<u8>(), 1..16),
        ) {
            let respelled = respell(&input, &choices);
            prop_assert_eq!(
                normalize(&input).map(Cow::into_owned),
                normalize(&respelled).map(Cow::into_owned),
                "respelled as {:?}", respelled
            );
        }

        #[test]
        fn redundant_slashes_and_dots_do_not_change_the_result(input in plausible()) {
            if let Ok(out) = normalize(&input) {
                prop_assert_eq!(normal(&out.replace('/', "//")), &*out);
                prop_assert_eq!(normal(&out.replace('/', "/./")), &*out);
                prop_assert_eq!(normal(&out.replace('/', "/x/../")), &*out);
            }
        }
    }
}
