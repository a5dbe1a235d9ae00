//! A corpus of hostile requests, sent as raw bytes so that no client library normalises them
//! first, each judged against CONTRACT §4: the status the gateway answers, and what (if
//! anything) reached the upstream — one request with the normalised path, the real identity
//! and none of the client's spoofed headers, or nothing at all.
//!
//! The expectations come from the contract, not from what the code does today. Every row runs
//! against a fresh gateway (so "nothing reached the upstream" is exact), and all failing rows
//! are reported together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mfa_gate::dev::upstream::SeenRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::Harness;

/// The gateway of the corpus: a request-level subtree rule, a GET-only exact rule, and an
/// identity rule that lets carol (no MFA) into one subtree. No peer is a trusted proxy, so the
/// decision endpoint must ignore `X-Forwarded-*` from the test client.
const CONFIG: &str = r#"
[server]
max_header_bytes = 8192
trusted_proxies = ["10.255.0.0/16"]

[[allow]]
name = "public"
paths = ["/public/**"]

[[allow]]
name = "status"
paths = ["/status"]
methods = ["GET"]

[[allow]]
name = "break-glass"
user_names = ["carol"]
paths = ["/breakglass/**"]
"#;

/// Spoofed header values carry this marker; it must never show up upstream.
const SPOOF: &str = "spoofed";

/// What the upstream must have seen for one row.
#[derive(Debug, Clone, Copy)]
enum Effect {
    /// Nothing reached it.
    Nothing,
    /// Exactly one request: this method, this normalised `path?query`, the identity headers of
    /// this demo user (`None`: no identity headers at all) and this `X-Auth-Mfa`.
    Once {
        method: &'static str,
        uri: &'static str,
        user: Option<&'static str>,
        mfa: &'static str,
    },
}

/// A `GET` forwarded with the identity of `user` (or none) and `mfa`.
fn get(uri: &'static str, user: Option<&'static str>, mfa: &'static str) -> Effect {
    Effect::Once {
        method: "GET",
        uri,
        user,
        mfa,
    }
}

/// Forwarded as a request-allowlisted one: no identity, `X-Auth-Mfa: none`.
fn anonymous(uri: &'static str) -> Effect {
    get(uri, None, "none")
}

/// Forwarded with alice's identity (MFA device bound).
fn as_alice(uri: &'static str) -> Effect {
    get(uri, Some("alice"), "mfa_device")
}

/// One row of the corpus.
struct Case {
    name: &'static str,
    /// Raw request bytes; `{alice}` and `{carol}` are replaced by the demo users' tokens.
    request: Vec<u8>,
    /// Acceptable statuses (one, except where the contract leaves a choice).
    status: &'static [u16],
    effect: Effect,
}

fn case(name: &'static str, request: impl AsRef<[u8]>, status: u16, effect: Effect) -> Case {
    // Leaked once per row so that the table can hold `&'static [u16]` for every row.
    let status: &'static [u16] = Box::leak(Box::new([status]));
    Case {
        name,
        request: request.as_ref().to_vec(),
        status,
        effect,
    }
}

fn case_any(
    name: &'static str,
    request: impl AsRef<[u8]>,
    status: &'static [u16],
    effect: Effect,
) -> Case {
    Case {
        name,
        request: request.as_ref().to_vec(),
        status,
        effect,
    }
}

/// `GET {target} HTTP/1.1` with `Host: gw` and the given header lines (each without CRLF).
fn get_req(target: &str, headers: &[&str]) -> String {
    request("GET", target, headers)
}

fn request(method: &str, target: &str, headers: &[&str]) -> String {
    let mut text = format!("{method} {target} HTTP/1.1\r\nHost: gw\r\n");
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text
}

const ALICE: &str = "X-Auth-Token: {alice}";
const CAROL: &str = "X-Auth-Token: {carol}";

#[allow(clippy::too_many_lines)]
fn corpus() -> Vec<Case> {
    use Effect::Nothing;
    let many_headers: Vec<String> = (0..120).map(|i| format!("X-Filler-{i}: {i}")).collect();
    let many_headers: Vec<&str> = many_headers.iter().map(String::as_str).collect();
    let mut with_alice = vec![ALICE];
    with_alice.extend(&many_headers);
    let big_header = format!("X-Big: {}", "b".repeat(9_000));
    let huge_header = format!("X-Huge: {}", "h".repeat(40_000));
    let long_path = format!("/public/{}", "a".repeat(9_000));
    let very_long_path = format!("/public/{}", "a".repeat(70_000));

    vec![
        // --- Dot segments, plain, encoded, mixed case: resolved before matching. ---
        case("dotdot_out_of_public", get_req("/public/../admin", &[]), 401, Nothing),
        case("encoded_dotdot", get_req("/public/%2e%2e/admin", &[]), 401, Nothing),
        case("mixed_case_encoded_dotdot", get_req("/public/%2e%2E/admin", &[]), 401, Nothing),
        case("half_encoded_dotdot", get_req("/public/.%2E/admin", &[]), 401, Nothing),
        case("other_half_encoded_dotdot", get_req("/public/%2E./admin", &[]), 401, Nothing),
        case("dot_segments_inside_public_stay_public", get_req("/public/./a/../x", &[]), 200, anonymous("/public/x")),
        case("dotdot_forwarded_as_normalised", get_req("/public/../admin", &[ALICE]), 200, as_alice("/admin")),
        case("encoded_dotdot_forwarded_as_normalised", get_req("/x/%2E%2e/y/./z", &[ALICE]), 200, as_alice("/y/z")),
        case("dotdot_above_root", get_req("/public/../../admin", &[]), 400, Nothing),
        case("trailing_dotdot_leaves_public", get_req("/public/..", &[]), 401, Nothing),
        case("trailing_dot_stays_in_public", get_req("/public/.", &[]), 200, anonymous("/public/")),
        case("trailing_dotdot_inside_public", get_req("/public/x/..", &[]), 200, anonymous("/public/")),
        case("encoded_dotdot_above_root", get_req("/%2e%2e/public/x", &[]), 400, Nothing),
        case("encoded_unreserved_is_decoded_before_matching", get_req("/%70ublic/x", &[]), 200, anonymous("/public/x")),
        case("encoded_unreserved_cannot_hide_admin", get_req("/public/%2E%2E/%61dmin", &[]), 401, Nothing),
        // --- Encoded delimiters and NUL: ambiguous, refused. ---
        case("encoded_slash", get_req("/public/..%2fadmin", &[]), 400, Nothing),
        case("encoded_slash_upper", get_req("/public%2F..%2Fadmin", &[]), 400, Nothing),
        case("encoded_slash_with_token", get_req("/public%2fx", &[ALICE]), 400, Nothing),
        case("encoded_backslash", get_req("/public/..%5cadmin", &[]), 400, Nothing),
        case("encoded_semicolon", get_req("/public/..%3b/admin", &[]), 400, Nothing),
        case("encoded_question_mark", get_req("/admin%3f/public/x", &[]), 400, Nothing),
        case("encoded_hash", get_req("/admin%23/public/x", &[]), 400, Nothing),
        case("encoded_nul", get_req("/public/x%00.js", &[]), 400, Nothing),
        case("encoded_newline", get_req("/public/x%0d%0aX-Auth-Mfa:%20mfa_device", &[]), 400, Nothing),
        case("invalid_percent_escape", get_req("/public/%zz", &[]), 400, Nothing),
        case("truncated_percent_escape", get_req("/public/%2", &[]), 400, Nothing),
        case("iis_percent_u_encoding", get_req("/public/%u002e%u002e/admin", &[]), 400, Nothing),
        case("double_encoding_is_decoded_once", get_req("/public/%252e%252e/admin", &[]), 200, anonymous("/public/%252e%252e/admin")),
        case("other_escapes_kept_upper_case", get_req("/public/caf%c3%a9", &[]), 200, anonymous("/public/caf%C3%A9")),
        // --- Path parameters on dot segments (Tomcat's `..;`). ---
        case("dotdot_semicolon", get_req("/public/..;/admin", &[]), 400, Nothing),
        case("dot_semicolon", get_req("/public/.;x/admin", &[]), 400, Nothing),
        case("encoded_dotdot_semicolon", get_req("/public/%2e%2e;jsessionid=1/admin", &[]), 400, Nothing),
        case("semicolon_segment_is_just_a_segment", get_req("/admin;/public/x", &[]), 401, Nothing),
        case("semicolon_segment_popped_by_dotdot", get_req("/public;x/../admin", &[]), 401, Nothing),
        // --- Repeated slashes: merged, and merged before `..` is resolved. ---
        case("leading_double_slash", get_req("//public/x", &[]), 200, anonymous("/public/x")),
        case("double_slash_then_dotdot", get_req("/public//../admin", &[]), 401, Nothing),
        case("double_slash_dotdot_forwarded_normalised", get_req("/a//../b", &[ALICE]), 200, as_alice("/b")),
        case("many_slashes", get_req("///public///x//", &[]), 200, anonymous("/public/x/")),
        case("double_slash_dotdot_above_root", get_req("//../public/x", &[]), 400, Nothing),
        // --- Fragments (hyper drops them while parsing: judged without them). ---
        case("fragment_after_admin", get_req("/admin#/public/x", &[]), 401, Nothing),
        case("fragment_with_dotdot", get_req("/public/x#/../../admin", &[]), 200, anonymous("/public/x")),
        // --- Raw backslash, control, space and non-ASCII bytes. ---
        case("raw_backslash", get_req("/public\\..\\admin", &[]), 400, Nothing),
        case("raw_backslash_with_token", get_req("/a\\b", &[ALICE]), 400, Nothing),
        case("raw_control_byte", b"GET /public/\x01/../admin HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        case("raw_del_byte", b"GET /public/\x7f HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        case("raw_tab_in_target", b"GET /public/a\tb HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        case("raw_non_ascii_utf8", b"GET /public/caf\xc3\xa9 HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        case("raw_non_ascii_fullwidth_dots", b"GET /public/\xef\xbc\x8e\xef\xbc\x8e/admin HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        case("raw_latin1_byte", b"GET /public/\xff HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        // --- Matching rules: subtree boundary, exactness, case, query never matched. ---
        case("subtree_root_itself", get_req("/public", &[]), 200, anonymous("/public")),
        case("subtree_prefix_is_not_a_string_prefix", get_req("/publicity", &[]), 401, Nothing),
        case("matching_is_case_sensitive", get_req("/PUBLIC/x", &[]), 401, Nothing),
        case("exact_rule_is_not_a_subtree", get_req("/status/x", &[]), 401, Nothing),
        case("exact_rule_without_trailing_slash", get_req("/status/", &[]), 401, Nothing),
        case("query_is_never_matched", get_req("/admin?/public/x", &[]), 401, Nothing),
        case("query_with_path_lookalike", get_req("/admin?path=/public/../x", &[]), 401, Nothing),
        case("query_kept_verbatim", get_req("/public/x?a=../../admin&b=%2e%2e", &[]), 200, anonymous("/public/x?a=../../admin&b=%2e%2e")),
        case("exact_rule_with_query", get_req("/status?verbose=1", &[]), 200, anonymous("/status?verbose=1")),
        // --- Methods: case-sensitive, never overridden by headers. ---
        case("lowercase_get_is_not_get", request("get", "/status", &[]), 401, Nothing),
        case("mixed_case_get_is_not_get", request("GeT", "/status", &[]), 401, Nothing),
        case("post_on_get_only_rule", request("POST", "/status", &["Content-Length: 0"]), 401, Nothing),
        case("head_on_get_only_rule", request("HEAD", "/status", &[]), 401, Nothing),
        case("method_override_cannot_turn_post_into_get", request("POST", "/status", &["X-HTTP-Method-Override: GET", "Content-Length: 0"]), 401, Nothing),
        case("original_method_cannot_turn_post_into_get", request("POST", "/status", &["X-Original-Method: GET", "X-Forwarded-Method: GET", "Content-Length: 0"]), 401, Nothing),
        case("method_override_stripped_on_allowed_get", get_req("/status", &["X-HTTP-Method-Override: DELETE", "X_HTTP_Method_Override: DELETE"]), 200, anonymous("/status")),
        case("method_override_stripped_on_delete", request("DELETE", "/public/x", &["X-HTTP-Method-Override: PUT"]), 200, Effect::Once { method: "DELETE", uri: "/public/x", user: None, mfa: "none" }),
        case("lowercase_method_forwarded_as_is", request("get", "/app", &[ALICE]), 200, Effect::Once { method: "get", uri: "/app", user: Some("alice"), mfa: "mfa_device" }),
        // --- Spoofed identity headers, in every spelling: removed, the real ones written. ---
        case("spoofed_identity_on_allowlisted_path", get_req("/public/x", &["X-Auth-User-Id: spoofed", "X-Auth-Mfa: spoofed-mfa_device", "X-Auth-User-Name: spoofed"]), 200, anonymous("/public/x")),
        case("spoofed_identity_underscore_spelling", get_req("/public/x", &["X_Auth_User_Id: spoofed", "X_AUTH_MFA: spoofed", "x_auth_domain_id: spoofed"]), 200, anonymous("/public/x")),
        case("spoofed_identity_dot_spelling", get_req("/public/x", &["X.Auth.User.Id: spoofed", "X.Auth.Mfa: spoofed", "X.Auth.Domain.Name: spoofed"]), 200, anonymous("/public/x")),
        case("spoofed_identity_with_real_token", get_req("/app", &[ALICE, "X-Auth-User-Id: spoofed", "X_Auth_User_Name: spoofed", "X.Auth.Domain.Id: spoofed", "x-auth-domain-name: spoofed", "X-AUTH-MFA: spoofed"]), 200, as_alice("/app")),
        case("duplicated_identity_headers", get_req("/app", &[ALICE, "X-Auth-User-Id: spoofed-1", "X-Auth-User-Id: spoofed-2", "X-Auth-Mfa: spoofed", "x-auth-mfa: spoofed"]), 200, as_alice("/app")),
        case("spoofed_forwarding_headers", get_req("/app", &[ALICE, "X-Forwarded-Proto: spoofed", "X_Forwarded_Host: spoofed", "X.Forwarded.Proto: spoofed"]), 200, as_alice("/app")),
        case("mixed_separator_spelling", get_req("/app", &[ALICE, "X-Auth_User.Id: spoofed", "x.auth_mfa: spoofed", "X_Auth-Domain.Name: spoofed"]), 200, as_alice("/app")),
        case("token_on_allowlisted_path_carries_no_identity", get_req("/public/x", &[ALICE]), 200, anonymous("/public/x")),
        case("invalid_token_on_allowlisted_path", get_req("/public/x", &["X-Auth-Token: not-a-real-token"]), 200, anonymous("/public/x")),
        case("repeated_token_on_allowlisted_path", get_req("/public/x", &[CAROL, ALICE]), 400, Nothing),
        // --- Hop-by-hop headers: never forwarded (and no h2c upgrade behind the gateway). ---
        case("h2c_upgrade_not_forwarded", get_req("/public/x", &["Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: spoofed"]), 200, anonymous("/public/x")),
        case("connection_named_header_dropped", get_req("/public/x", &["Connection: X-Hop", "X-Hop: spoofed"]), 200, anonymous("/public/x")),
        case("proxy_and_hop_headers_dropped", get_req("/public/x", &["Proxy-Authorization: Basic spoofed", "Proxy-Connection: spoofed", "Keep-Alive: spoofed", "TE: spoofed"]), 200, anonymous("/public/x")),
        case("spoofed_mfa_does_not_help_carol", get_req("/app", &[CAROL, "X-Auth-Mfa: mfa_device", "X_Auth_Mfa: mfa_device"]), 403, Nothing),
        // --- Identity rule: break-glass for carol, only in its subtree. ---
        case("identity_rule_in_subtree", get_req("/breakglass/tools", &[CAROL]), 200, get("/breakglass/tools", Some("carol"), "none")),
        case("identity_rule_dotdot_escape", get_req("/breakglass/../admin", &[CAROL]), 403, Nothing),
        case("identity_rule_encoded_dotdot_escape", get_req("/breakglass/%2e%2e/admin", &[CAROL]), 403, Nothing),
        case("identity_rule_dotdot_semicolon_escape", get_req("/breakglass/..;/admin", &[CAROL]), 400, Nothing),
        case("identity_rule_string_prefix", get_req("/breakglassx/admin", &[CAROL]), 403, Nothing),
        case("identity_rule_needs_a_token", get_req("/breakglass/tools", &[]), 401, Nothing),
        // --- Tokens: one place only. ---
        case("repeated_x_auth_token", get_req("/app", &[CAROL, ALICE]), 400, Nothing),
        case("repeated_x_auth_token_other_case", get_req("/app", &["x-auth-token: {carol}", "X-AUTH-TOKEN: {alice}"]), 400, Nothing),
        case("repeated_authorization", get_req("/app", &["Authorization: Bearer {carol}", "Authorization: Bearer {alice}"]), 400, Nothing),
        // Two different tokens: only one could be verified, the other would ride along. Refused.
        case("two_different_tokens_are_refused", get_req("/app", &[CAROL, "Authorization: Bearer {alice}"]), 400, Nothing),
        case("underscore_token_header_is_not_the_token", get_req("/app", &["X_Auth_Token: {alice}"]), 401, Nothing),
        case("two_tokens_in_one_header", get_req("/app", &["X-Auth-Token: {carol}, {alice}"]), 401, Nothing),
        case("non_ascii_token", b"GET /app HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: caf\xc3\xa9\r\n\r\n", 401, Nothing),
        case("lowercase_bearer_scheme", get_req("/app", &["Authorization: bEaReR {alice}"]), 200, as_alice("/app")),
        // --- Host. ---
        case("repeated_host", b"GET /public/x HTTP/1.1\r\nHost: gw\r\nHost: evil.example\r\n\r\n", 400, Nothing),
        case("repeated_host_other_case", b"GET /public/x HTTP/1.1\r\nHost: gw\r\nhost: gw\r\n\r\n", 400, Nothing),
        case("missing_host_http11", b"GET /public/x HTTP/1.1\r\n\r\n", 400, Nothing),
        case("absolute_form_without_host_http11", b"GET http://gw/public/x HTTP/1.1\r\n\r\n", 400, Nothing),
        case("http10_without_host_allowlisted", b"GET /public/x HTTP/1.0\r\n\r\n", 200, anonymous("/public/x")),
        case("http10_without_host_with_token", "GET /app HTTP/1.0\r\nX-Auth-Token: {alice}\r\n\r\n", 200, as_alice("/app")),
        case("http10_without_host_no_token", b"GET /admin HTTP/1.0\r\n\r\n", 401, Nothing),
        // --- Absolute-form targets naming another host: never a forward proxy. ---
        case("absolute_form_other_host_allowlisted", b"GET http://evil.example/public/x HTTP/1.1\r\nHost: gw\r\n\r\n", 200, anonymous("/public/x")),
        case("absolute_form_other_host_no_token", b"GET http://evil.example/admin HTTP/1.1\r\nHost: gw\r\n\r\n", 401, Nothing),
        case("absolute_form_other_host_with_token", "GET http://evil.example:9/app?q=1 HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {alice}\r\n\r\n", 200, as_alice("/app?q=1")),
        case("absolute_form_dotdot", b"GET http://gw/public/../admin HTTP/1.1\r\nHost: gw\r\n\r\n", 401, Nothing),
        case("absolute_form_encoded_slash", b"GET http://gw/public%2f..%2fadmin HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        case_any("connect_is_never_tunnelled", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", &[400, 405], Nothing),
        case("asterisk_form", b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        case("asterisk_form_with_get", b"GET * HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        case("authority_form_with_get", b"GET gw:80 HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        // --- Connection naming identity headers: refused. ---
        case("connection_names_user_id", get_req("/app", &[ALICE, "Connection: X-Auth-User-Id"]), 400, Nothing),
        case("connection_names_mfa_underscore", get_req("/app", &[ALICE, "Connection: keep-alive, x_auth_mfa"]), 400, Nothing),
        case("connection_names_identity_on_allowlisted_path", get_req("/public/x", &["Connection: X-Auth-Domain-Name"]), 400, Nothing),
        case("second_connection_header_names_identity", get_req("/app", &[ALICE, "Connection: keep-alive", "Connection: X.Auth.User.Name"]), 400, Nothing),
        // --- Original-URI headers on the proxy path and the decision endpoint. ---
        case("forwarded_uri_on_proxy_path_no_token", get_req("/admin", &["X-Forwarded-Uri: /public/x", "X-Original-URI: /public/x", "X-Forwarded-Method: GET"]), 401, Nothing),
        case("forwarded_uri_on_proxy_path_stripped", get_req("/app", &[ALICE, "X-Forwarded-Uri: /spoofed", "X-Original-URI: /spoofed", "X_Original_Uri: /spoofed", "X-Original-Method: spoofed"]), 200, as_alice("/app")),
        case("forwarded_uri_from_untrusted_peer", get_req("/.mfa-gate/auth", &["X-Forwarded-Uri: /public/x", "X-Forwarded-Method: GET"]), 401, Nothing),
        case("original_uri_from_untrusted_peer", get_req("/.mfa-gate/auth", &["X-Original-URI: /status", "X-Original-Method: GET"]), 401, Nothing),
        case("malformed_forwarded_uri_from_untrusted_peer_is_ignored", get_req("/.mfa-gate/auth", &["X-Forwarded-Uri: /public/..%2fadmin"]), 401, Nothing),
        case("decision_endpoint_never_forwards", get_req("/.mfa-gate/auth", &[ALICE]), 200, Nothing),
        case("decision_endpoint_dotdot_spelling", get_req("/public/../.mfa-gate/auth", &[ALICE, "X-Forwarded-Uri: /public/x"]), 200, Nothing),
        // --- Framing: smuggling shapes are refused before anything is forwarded. ---
        case("cl_and_te", request("POST", "/app", &[ALICE, "Content-Length: 4", "Transfer-Encoding: chunked"]) + "0\r\n\r\n", 400, Nothing),
        case("te_and_cl", request("POST", "/public/x", &["Transfer-Encoding: chunked", "Content-Length: 35"]) + "0\r\n\r\nGET /admin HTTP/1.1\r\nHost: gw\r\n\r\n", 400, Nothing),
        case("cl_and_obfuscated_te", request("POST", "/public/x", &["Content-Length: 5", "Transfer-Encoding: xchunked"]) + "0\r\n\r\n", 400, Nothing),
        case("te_chunked_then_identity", request("POST", "/app", &[ALICE, "Transfer-Encoding: chunked, identity"]) + "5\r\nhello\r\n0\r\n\r\n", 400, Nothing),
        case("te_xchunked", request("POST", "/app", &[ALICE, "Transfer-Encoding: xchunked"]) + "5\r\nhello\r\n0\r\n\r\n", 400, Nothing),
        case("te_two_headers_last_not_chunked", request("POST", "/app", &[ALICE, "Transfer-Encoding: chunked", "Transfer-Encoding: identity"]) + "5\r\nhello\r\n0\r\n\r\n", 400, Nothing),
        case("te_space_before_colon", request("POST", "/app", &[ALICE, "Transfer-Encoding : chunked"]) + "5\r\nhello\r\n0\r\n\r\n", 400, Nothing),
        case("te_obs_fold", request("POST", "/app", &[ALICE, "X-Pad: a", " Transfer-Encoding: chunked"]) + "5\r\nhello\r\n0\r\n\r\n", 400, Nothing),
        case("te_vertical_tab", request("POST", "/app", &[ALICE, "Transfer-Encoding:\x0bchunked"]) + "5\r\nhello\r\n0\r\n\r\n", 400, Nothing),
        case("te_in_http10", "POST /app HTTP/1.0\r\nHost: gw\r\nX-Auth-Token: {alice}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400, Nothing),
        case("te_upper_case_is_chunked", request("POST", "/app", &[ALICE, "Transfer-Encoding: CHUNKED"]) + "5\r\nhello\r\n0\r\n\r\n", 200, Effect::Once { method: "POST", uri: "/app", user: Some("alice"), mfa: "mfa_device" }),
        case("duplicate_content_length_differing", request("POST", "/app", &[ALICE, "Content-Length: 5", "Content-Length: 6"]) + "hello!", 400, Nothing),
        case("content_length_list_differing", request("POST", "/app", &[ALICE, "Content-Length: 5, 6"]) + "hello!", 400, Nothing),
        case("signed_content_length", request("POST", "/app", &[ALICE, "Content-Length: +5"]) + "hello", 400, Nothing),
        case("negative_content_length", request("POST", "/app", &[ALICE, "Content-Length: -5"]) + "hello", 400, Nothing),
        case("hex_content_length", request("POST", "/app", &[ALICE, "Content-Length: 0x5"]) + "hello", 400, Nothing),
        // --- Header syntax. ---
        case("space_before_colon_on_token", get_req("/app", &["X-Auth-Token : {alice}"]), 400, Nothing),
        case("nul_in_header_value", b"GET /public/x HTTP/1.1\r\nHost: gw\r\nX-Foo: a\x00b\r\n\r\n", 400, Nothing),
        case("bare_cr_in_header_value", b"GET /public/x HTTP/1.1\r\nHost: gw\r\nX-Foo: a\rX-Auth-User-Id: spoofed\r\n\r\n", 400, Nothing),
        case("control_in_header_name", b"GET /public/x HTTP/1.1\r\nHost: gw\r\nX-Auth-User-Id\x01: spoofed\r\n\r\n", 400, Nothing),
        // --- Sizes. ---
        case("header_block_over_max_header_bytes", get_req("/app", &[ALICE, &big_header]), 431, Nothing),
        case("header_block_beyond_any_buffer", get_req("/app", &[ALICE, &huge_header]), 431, Nothing),
        case_any("uri_over_max_header_bytes", get_req(&long_path, &[]), &[414, 431], Nothing),
        case_any("uri_beyond_any_buffer", get_req(&very_long_path, &[]), &[414, 431], Nothing),
        case_any("too_many_headers", get_req("/app", &with_alice), &[400, 431], Nothing),
    ]
}

/// Reads the upstream's view of one row and lists what contradicts the expectation.
fn check_effect(h: &Harness, effect: Effect, seen: &[SeenRequest]) -> Vec<String> {
    let mut problems = Vec::new();
    let (method, uri, user, mfa) = match effect {
        Effect::Nothing => {
            if !seen.is_empty() {
                let uris: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
                problems.push(format!("reached the upstream: {uris:?}"));
            }
            return problems;
        }
        Effect::Once {
            method,
            uri,
            user,
            mfa,
        } => (method, uri, user, mfa),
    };
    let [seen] = seen else {
        problems.push(format!(
            "expected exactly one upstream request, saw {}",
            seen.len()
        ));
        return problems;
    };
    if seen.method != method {
        problems.push(format!(
            "upstream method {:?}, expected {method:?}",
            seen.method
        ));
    }
    if seen.uri != uri {
        problems.push(format!("upstream uri {:?}, expected {uri:?}", seen.uri));
    }
    let identity = [
        "x-auth-user-id",
        "x-auth-user-name",
        "x-auth-domain-id",
        "x-auth-domain-name",
    ];
    match user {
        Some(name) => {
            let u = h.user(name);
            for (header, value) in
                identity
                    .iter()
                    .zip([&u.user_id, &u.user_name, &u.domain_id, &u.domain_name])
            {
                let values = seen.header_values(header);
                if values != [value.as_str()] {
                    problems.push(format!(
                        "upstream {header} {values:?}, expected [{value:?}]"
                    ));
                }
            }
        }
        None => {
            for header in identity {
                let values = seen.header_values(header);
                if !values.is_empty() {
                    problems.push(format!(
                        "upstream {header} {values:?} on an anonymous request"
                    ));
                }
            }
        }
    }
    let values = seen.header_values("x-auth-mfa");
    if values != [mfa] {
        problems.push(format!(
            "upstream x-auth-mfa {values:?}, expected [{mfa:?}]"
        ));
    }
    for (name, value) in &seen.headers {
        if value.to_ascii_lowercase().contains(SPOOF) {
            problems.push(format!(
                "spoofed header reached the upstream: {name}: {value}"
            ));
        }
        let folded: String = name
            .chars()
            .map(|c| match c {
                '_' | '.' => '-',
                c => c.to_ascii_lowercase(),
            })
            .collect();
        if folded != *name && (folded.starts_with("x-auth-") || folded.starts_with("x-forwarded-"))
        {
            problems.push(format!(
                "look-alike of a managed header reached the upstream: {name}"
            ));
        }
        if [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "upgrade",
            "proxy-connection",
            "proxy-authorization",
            "http2-settings",
        ]
        .contains(&folded.as_str())
        {
            problems.push(format!(
                "hop-by-hop header reached the upstream: {name}: {value}"
            ));
        }
        if [
            "x-http-method-override",
            "x-forwarded-uri",
            "x-original-uri",
            "x-forwarded-method",
            "x-original-method",
        ]
        .contains(&folded.as_str())
        {
            problems.push(format!("client's {name} reached the upstream"));
        }
    }
    problems
}

/// Runs one row against its own gateway; `Err` lists what went wrong.
async fn run(case: Case) -> Result<(), String> {
    let h = Harness::with_config(CONFIG).await;
    let mut bytes = case.request.clone();
    for name in ["alice", "carol"] {
        bytes = replace(
            &bytes,
            format!("{{{name}}}").as_bytes(),
            h.token(name).as_bytes(),
        );
    }
    let is_head = bytes.starts_with(b"HEAD ");
    let reply = exchange_with(h.addr(), &bytes, is_head, Duration::from_secs(5)).await;
    // Anything forwarded behind the answer's back (a smuggled second request) would arrive
    // within this pause.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut problems = Vec::new();
    match reply.status {
        Some(status) if case.status.contains(&status) => {}
        Some(status) => problems.push(format!(
            "status {status}, expected {:?}; answer {:?}",
            case.status,
            short(&reply.raw)
        )),
        None => problems.push(format!(
            "no answer (connection closed or timed out), expected {:?}",
            case.status
        )),
    }
    // The gateway's own refusals are JSON with the contract's error codes. hyper answers the
    // requests it cannot parse itself, with an empty body; those are judged by status alone.
    if let (Some(status @ (400 | 401 | 403 | 431)), false) = (reply.status, reply.body.is_empty()) {
        let code = match status {
            400 | 431 => "MFAGATE.BAD_REQUEST",
            403 => "MFAGATE.NO_MFA",
            _ => "MFAGATE.",
        };
        if !String::from_utf8_lossy(&reply.body).contains(code) {
            problems.push(format!(
                "{status} without a {code} JSON body: {:?}",
                short(&reply.raw)
            ));
        }
    }
    if reply.status == Some(401)
        && !reply
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    {
        problems.push(format!(
            "401 without WWW-Authenticate: Bearer: {:?}",
            short(&reply.raw)
        ));
    }
    // The gateway's own answers never echo a token (the upstream's echo does, legitimately).
    if reply.status != Some(200) {
        for name in ["alice", "carol"] {
            let token = h.token(name);
            if reply
                .raw
                .windows(token.len())
                .any(|w| w == token.as_bytes())
            {
                problems.push(format!("{name}'s token echoed in the answer"));
            }
        }
    }
    problems.extend(check_effect(&h, case.effect, &h.upstream.requests()));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}", case.name, problems.join("; ")))
    }
}

/// The first bytes of an answer, for a one-line failure message.
fn short(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(300)]).into_owned()
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corpus_follows_the_contract() {
    let cases = corpus();
    let total = cases.len();
    assert!(total >= 40, "the corpus shrank to {total} rows");
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), total, "row names must be unique");

    let mut failures: Vec<String> = futures_util::stream::iter(cases)
        .map(run)
        .buffer_unordered(4)
        .filter_map(|result| async move { result.err() })
        .collect()
        .await;
    failures.sort();
    assert!(
        failures.is_empty(),
        "{} of {total} hostile requests broke the contract:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The untrusted-peer rows above mean something only if the same headers from a trusted proxy
/// do change the decision.
#[tokio::test]
async fn forwarded_uri_is_believed_from_trusted_proxies_only() {
    let trusted = Harness::with_config(&CONFIG.replace("10.255.0.0/16", "127.0.0.1/32")).await;
    let untrusted = Harness::with_config(CONFIG).await;
    let ask = get_req(
        "/.mfa-gate/auth",
        &["X-Forwarded-Uri: /public/x?y=1", "X-Forwarded-Method: GET"],
    );
    let reply = exchange(trusted.addr(), ask.as_bytes()).await;
    assert_eq!(reply.status, Some(200), "{}", reply.text());
    let reply = exchange(untrusted.addr(), ask.as_bytes()).await;
    assert_eq!(reply.status, Some(401), "{}", reply.text());
    // The original URI goes through the same normalisation as any request.
    let ask = get_req(
        "/.mfa-gate/auth",
        &[
            "X-Forwarded-Uri: /public/..%2fadmin",
            "X-Forwarded-Method: GET",
        ],
    );
    let reply = exchange(trusted.addr(), ask.as_bytes()).await;
    assert_eq!(reply.status, Some(400), "{}", reply.text());
    let ask = get_req(
        "/.mfa-gate/auth",
        &["X-Original-URI: /public/../admin", "X-Original-Method: GET"],
    );
    let reply = exchange(trusted.addr(), ask.as_bytes()).await;
    assert_eq!(reply.status, Some(401), "{}", reply.text());
    // X-Forwarded-* wins over X-Original-*.
    for (forwarded, original, status) in
        [("/admin", "/public/x", 401), ("/public/x", "/admin", 200)]
    {
        let ask = get_req(
            "/.mfa-gate/auth",
            &[
                &format!("X-Forwarded-Uri: {forwarded}"),
                &format!("X-Original-URI: {original}"),
            ],
        );
        let reply = exchange(trusted.addr(), ask.as_bytes()).await;
        assert_eq!(
            reply.status,
            Some(status),
            "{forwarded} over {original}: {}",
            reply.text()
        );
    }
    // Methods are case-sensitive here too: `get` does not match a GET-only rule.
    for (method, status) in [("GET", 200), ("get", 401), ("POST", 401)] {
        let ask = get_req(
            "/.mfa-gate/auth",
            &[
                "X-Original-URI: /status",
                &format!("X-Original-Method: {method}"),
            ],
        );
        let reply = exchange(trusted.addr(), ask.as_bytes()).await;
        assert_eq!(reply.status, Some(status), "{method}: {}", reply.text());
    }
    assert_eq!(trusted.upstream.request_count(), 0);
    assert_eq!(untrusted.upstream.request_count(), 0);
}

/// Slowloris: a head dribbled past `server.header_read_timeout` closes the connection (a 408
/// first is fine) and nothing is forwarded, even when the head, once complete, would be
/// allowlisted and carries a valid token.
#[tokio::test]
async fn slowloris_heads_are_cut_off_and_never_forwarded() {
    let h = Harness::with_config(&format!(
        "{CONFIG}\n[server]\nheader_read_timeout = \"400ms\"\n"
    ))
    .await;
    let token = h.token("alice");

    // One byte every 100 ms: always busy, never done.
    let mut stream = TcpStream::connect(h.addr()).await.unwrap();
    let head = format!(
        "GET /public/x HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {token}\r\nX-Pad: {}",
        "p".repeat(100)
    );
    let started = Instant::now();
    let mut cut = false;
    for byte in head.as_bytes() {
        if stream.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let rest = read_until_closed(&mut stream, Duration::from_secs(2)).await;
    assert!(
        cut || rest.is_some(),
        "connection still open after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut off only after {:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(rest.as_deref().unwrap_or_default()).into_owned();
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );

    // A head completed just after the deadline is not served either.
    let mut stream = TcpStream::connect(h.addr()).await.unwrap();
    stream
        .write_all(
            format!("GET /public/x HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {token}\r\n").as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = stream.write_all(b"\r\n").await;
    let rest = read_until_closed(&mut stream, Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(rest.as_deref().unwrap_or_default()).into_owned();
    assert!(rest.is_some(), "connection still open");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.upstream.request_count(), 0, "{:?}", h.upstream.requests());
    // And the gateway still serves everyone else.
    let reply = exchange(h.addr(), get_req("/public/x", &[]).as_bytes()).await;
    assert_eq!(reply.status, Some(200), "{}", reply.text());
}

/// Pipelined requests are judged one by one: an allowlisted first request does not carry a
/// second one past the gateway, in the same write or hidden in a body.
#[tokio::test]
async fn pipelined_requests_are_judged_one_by_one() {
    let h = Harness::with_config(CONFIG).await;
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(
        format!(
            "{}{}{}",
            get_req("/public/x", &[]),
            get_req("/admin", &[]),
            request("GET", "/status", &["Content-Length: 33"])
                + "GET /admin HTTP/1.1\r\nHost: gw\r\n\r\n"
        )
        .as_bytes(),
    );
    let wait = Duration::from_secs(5);
    let first = conn.reply(false, wait).await;
    let second = conn.reply(false, wait).await;
    let third = conn.reply(false, wait).await;
    assert_eq!(first.status, Some(200), "{}", first.text());
    assert_eq!(second.status, Some(401), "{}", second.text());
    assert_eq!(third.status, Some(200), "{}", third.text());
    // The body of the third request is a body, not a fourth request.
    let fourth = conn.reply(false, Duration::from_millis(300)).await;
    assert_eq!(fourth.status, None, "{}", fourth.text());
    let seen = h.upstream.requests();
    let uris: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(uris, ["/public/x", "/status"]);
    assert_eq!(seen[1].body_len, 33);
}

/// The same rules over HTTP/2 (h2c prior knowledge): path tricks, repeated tokens and spoofed
/// identity headers get the same answers as over HTTP/1.1.
#[tokio::test]
async fn http2_requests_get_the_same_judgement() {
    let h = Harness::with_config(CONFIG).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let alice = h.token("alice");
    let carol = h.token("carol");
    // (path, headers, status, the uri forwarded if any)
    type H2Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, Option<&'a str>);
    let cases: Vec<H2Case> = vec![
        ("/public/../admin", vec![], 401, None),
        ("/public/%2e%2E/admin", vec![], 401, None),
        ("/public%2fx", vec![], 400, None),
        ("/public/..;/admin", vec![], 400, None),
        ("/public/x%00", vec![], 400, None),
        ("//public/./x", vec![], 200, Some("/public/x")),
        ("/status/", vec![], 401, None),
        (
            "/app",
            vec![("x-auth-token", &carol), ("x-auth-token", &alice)],
            400,
            None,
        ),
        (
            "/app",
            vec![("x-auth-token", &carol), ("x-auth-mfa", "mfa_device")],
            403,
            None,
        ),
        (
            "/app",
            vec![
                ("x-auth-token", &alice),
                ("x_auth_user_id", "spoofed"),
                ("x.auth.mfa", "spoofed"),
                ("x-http-method-override", "DELETE"),
            ],
            200,
            Some("/app"),
        ),
    ];
    for (path, headers, status, forwarded) in cases {
        h.upstream.clear();
        let mut request = Request::get(h.url(path));
        for (name, value) in &headers {
            request = request.header(*name, *value);
        }
        let response = client
            .request(request.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status().as_u16(), status, "h2 {path} {headers:?}");
        let _ = response.into_body().collect().await;
        let seen = h.upstream.requests();
        match forwarded {
            None => assert!(seen.is_empty(), "h2 {path}: forwarded {seen:?}"),
            Some(uri) => {
                assert_eq!(seen.len(), 1, "h2 {path}");
                assert_eq!(seen[0].uri, uri);
                assert!(
                    seen[0].headers.iter().all(|(_, v)| !v.contains(SPOOF)),
                    "h2 {path}: {:?}",
                    seen[0].headers
                );
                assert_eq!(seen[0].header("x-http-method-override"), None);
                assert_eq!(seen[0].method, "GET");
                let mfa = if path == "/app" { "mfa_device" } else { "none" };
                assert_eq!(seen[0].header_values("x-auth-mfa"), [mfa]);
            }
        }
    }
}

/// A raw upstream that answers every request head with `answer` and records every byte it
/// receives afterwards on that connection.
async fn recording_upstream(answer: &'static str) -> (String, Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
    let record = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 16384];
                let mut answered = false;
                loop {
                    let read =
                        tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf));
                    match read.await {
                        Ok(Ok(0) | Err(_)) => return,
                        Ok(Ok(n)) => record.lock().unwrap().extend_from_slice(&buf[..n]),
                        // Quiet for a while: the request is complete.
                        Err(_) if !answered => {
                            answered = true;
                            let _ = stream.write_all(answer.as_bytes()).await;
                        }
                        Err(_) => {}
                    }
                }
            });
        }
    });
    (url, received)
}

/// An upgrade the upstream refuses must not turn the client connection into a tunnel: what the
/// client sends next is a new request, judged by the gateway (WebSocket smuggling).
#[tokio::test]
async fn refused_websocket_upgrades_are_not_tunnelled() {
    let (url, received) =
        recording_upstream("HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n").await;
    let h = Harness::with_upstream(CONFIG, &url).await;
    let mut conn = RawConn::open(h.addr()).await;
    conn.send(
        get_req(
            "/public/ws",
            &[
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 1337",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            ],
        )
        .as_bytes(),
    );
    let reply = conn.reply(false, Duration::from_secs(5)).await;
    assert_eq!(reply.status, Some(426), "{}", reply.text());
    conn.send(get_req("/admin", &["X-Smuggled: yes"]).as_bytes());
    let reply = conn.reply(false, Duration::from_secs(5)).await;
    assert_eq!(reply.status, Some(401), "{}", reply.text());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let received = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    assert!(received.starts_with("GET /public/ws "), "{received}");
    assert!(!received.contains("/admin"), "smuggled through: {received}");
    assert!(
        !received.contains("X-Smuggled"),
        "smuggled through: {received}"
    );
}

/// Identity headers sent as chunked trailers are client-supplied header fields too: they never
/// reach the upstream.
#[tokio::test]
async fn identity_headers_in_trailers_never_reach_the_upstream() {
    let (url, received) =
        recording_upstream("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let h = Harness::with_upstream(CONFIG, &url).await;
    let token = h.token("alice");
    let ask = format!(
        "POST /app HTTP/1.1\r\nHost: gw\r\nX-Auth-Token: {token}\r\nTE: trailers\r\n\
         Trailer: X-Auth-User-Id, X-Auth-Mfa\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\n\
         X-Auth-User-Id: spoofed\r\nX-Auth-Mfa: spoofed\r\nX_Auth_User_Name: spoofed\r\n\r\n"
    );
    let reply = exchange(h.addr(), ask.as_bytes()).await;
    assert!(matches!(reply.status, Some(200 | 400)), "{}", reply.text());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let received = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    assert!(
        !received.contains(SPOOF),
        "spoofed trailer forwarded: {received}"
    );
    if reply.status == Some(200) {
        let alice = h.user("alice");
        assert!(
            received
                .to_ascii_lowercase()
                .contains(&format!("x-auth-user-id: {}", alice.user_id)),
            "{received}"
        );
    }
}

/// Reads until the peer closes (`Some(bytes)`) or `wait` passes (`None`).
async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// One answer read off a raw connection.
#[derive(Debug)]
pub(crate) struct Reply {
    /// `None` when the connection closed (or the deadline passed) before a status line.
    pub status: Option<u16>,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Everything read.
    pub raw: Vec<u8>,
    /// The body ended the way its framing said it would (not cut short).
    pub complete: bool,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

/// Sends raw bytes on a fresh connection and reads one response (up to 5 s).
pub(crate) async fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
    exchange_with(addr, request, false, Duration::from_secs(5)).await
}

/// Sends raw bytes on a fresh connection and reads exactly one response, however it is framed.
pub(crate) async fn exchange_with(
    addr: SocketAddr,
    request: &[u8],
    head_request: bool,
    wait: Duration,
) -> Reply {
    let mut conn = RawConn::open(addr).await;
    conn.send(request);
    conn.reply(head_request, wait).await
}

/// A client connection that writes raw bytes and reads responses one at a time.
///
/// Writing runs beside reading, so a server that answers before reading everything (431, 400)
/// is heard; the write half stays open until the connection is dropped (a half-close is not a
/// hang-up).
pub(crate) struct RawConn {
    reader: OwnedReadHalf,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    writes: Vec<JoinHandle<()>>,
    /// Read, not yet handed out as a [`Reply`].
    pending: Vec<u8>,
    eof: bool,
}

impl RawConn {
    pub async fn open(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (reader, writer) = stream.into_split();
        RawConn {
            reader,
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            writes: Vec::new(),
            pending: Vec::new(),
            eof: false,
        }
    }

    /// Queues bytes to write (in order with earlier ones); write errors are ignored.
    pub fn send(&mut self, bytes: &[u8]) {
        let bytes = bytes.to_vec();
        let writer = self.writer.clone();
        self.writes.push(tokio::spawn(async move {
            let _ = writer.lock().await.write_all(&bytes).await;
        }));
    }

    /// The next response, or a `Reply` with `status: None` if the connection ended (or `wait`
    /// passed) before a complete head arrived.
    pub async fn reply(&mut self, head_request: bool, wait: Duration) -> Reply {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some((reply, used)) = parse_reply(&self.pending, head_request, self.eof) {
                self.pending.drain(..used);
                return reply;
            }
            if self.eof {
                return Reply {
                    status: None,
                    headers: Vec::new(),
                    body: Vec::new(),
                    raw: std::mem::take(&mut self.pending),
                    complete: false,
                };
            }
            match tokio::time::timeout_at(deadline, self.reader.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.pending.extend_from_slice(&buf[..n]),
                // Out of time: judged as if the peer had closed.
                Err(_) => self.eof = true,
            }
        }
    }
}

impl Drop for RawConn {
    fn drop(&mut self) {
        for write in &self.writes {
            write.abort();
        }
    }
}

/// A complete response at the start of `raw` and the number of bytes it took, if there is one
/// (`eof`: no more bytes will come, so an unframed or cut-short body ends here).
fn parse_reply(raw: &[u8], head_request: bool, eof: bool) -> Option<(Reply, usize)> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse::<u16>().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut reply = Reply {
        status: Some(status),
        headers,
        body: Vec::new(),
        raw: Vec::new(),
        complete: true,
    };
    let rest = &raw[head_end..];
    let used = if head_request || status < 200 || status == 204 || status == 304 {
        head_end
    } else if reply
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        match dechunk(rest) {
            Some((body, used)) => {
                reply.body = body;
                head_end + used
            }
            None if eof => {
                reply.body = rest.to_vec();
                reply.complete = false;
                raw.len()
            }
            None => return None,
        }
    } else if let Some(length) = reply
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        if rest.len() >= length {
            reply.body = rest[..length].to_vec();
            head_end + length
        } else if eof {
            reply.body = rest.to_vec();
            reply.complete = false;
            raw.len()
        } else {
            return None;
        }
    } else if eof {
        // Delimited by the close of the connection.
        reply.body = rest.to_vec();
        raw.len()
    } else {
        return None;
    };
    reply.raw = raw[..used].to_vec();
    Some((reply, used))
}

/// The body of a complete chunked encoding and the bytes it took, or `None` if the last chunk
/// has not arrived.
fn dechunk(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + data[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[at..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // The last-chunk line's CRLF, any trailer lines, then an empty line.
            let end = data[at - 2..].windows(4).position(|w| w == b"\r\n\r\n")?;
            return Some((body, at - 2 + end + 4));
        }
        if data.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&data[at..at + size]);
        at += size + 2;
    }
}
