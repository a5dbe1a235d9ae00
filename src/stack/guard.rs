//! The request guard: refuses what must never be forwarded or judged (CONTRACT §4 "Requests
//! refused" and "Path handling"), and establishes the facts every later layer relies on.
//!
//! Ambiguity is what auth-proxy bypasses are made of: two parsers (ours and the app's) reading
//! one request differently. Each check here removes one such disagreement: a second `Host`, a
//! second token, `Content-Length` next to `Transfer-Encoding` (request smuggling), a path that
//! decodes differently in the app than in the allowlist.

use std::sync::Arc;
use std::task::{Context, Poll};

use crate::stack::RequestBody;
use http::header::{
    HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING,
};
use http::{HeaderMap, Method, Request, Response, Version};

use futures_util::future::{ready, Either, Ready};

use crate::auth::token;
use crate::error::GatewayError;
use crate::proxy::{headers, path, Body, RequestInfo};
use crate::stack::context::RequestContext;

#[derive(Clone)]
pub struct GuardLayer {
    max_header_bytes: usize,
}

impl GuardLayer {
    pub fn new(max_header_bytes: usize) -> Self {
        GuardLayer { max_header_bytes }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = GuardService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GuardService {
            max_header_bytes: self.max_header_bytes,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct GuardService<S> {
    max_header_bytes: usize,
    inner: S,
}

/// What the guard reads of the header block, gathered in one pass over it: comparing a
/// name with a standard one is an integer compare, where each lookup by name hashes it.
#[derive(Default)]
struct Census<'a> {
    /// The header lines' bytes, near enough: `name: value\r\n`.
    bytes: usize,
    hosts: usize,
    x_auth_tokens: usize,
    authorizations: usize,
    /// The first value of each token header.
    x_auth_token: Option<&'a HeaderValue>,
    authorization: Option<&'a HeaderValue>,
    content_length: bool,
    transfer_encoding: bool,
    connection: bool,
}

impl<'a> Census<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let mut census = Census::default();
        for (name, value) in headers {
            census.bytes += name.as_str().len() + value.len() + 4;
            if name == HOST {
                census.hosts += 1;
            } else if name == token::X_AUTH_TOKEN {
                census.x_auth_tokens += 1;
                census.x_auth_token.get_or_insert(value);
            } else if name == AUTHORIZATION {
                census.authorizations += 1;
                census.authorization.get_or_insert(value);
            } else if name == CONTENT_LENGTH {
                census.content_length = true;
            } else if name == TRANSFER_ENCODING {
                census.transfer_encoding = true;
            } else if name == CONNECTION {
                census.connection = true;
            }
        }
        census
    }
}

/// The size of the header block as it arrived, near enough: request line plus the lines.
fn header_block_bytes(request: &Request<RequestBody>, census: &Census<'_>) -> usize {
    let uri = request.uri();
    let target = uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len() + 8);
    request.method().as_str().len() + target + 12 + census.bytes
}

/// The first value of each token header, for [`token::extract_values`].
type TokenValues<'a> = (Option<&'a HeaderValue>, Option<&'a HeaderValue>);

/// Checks the request head; answers the normalised path and where the token is.
fn check(
    request: &Request<RequestBody>,
    max_header_bytes: usize,
) -> Result<(Arc<str>, TokenValues<'_>), GatewayError> {
    if request.method() == Method::CONNECT {
        return Err(GatewayError::MethodNotAllowed {
            detail: "CONNECT is not supported".into(),
        });
    }
    if request.uri().path() == "*" {
        return Err(GatewayError::bad_request("asterisk-form request target"));
    }
    let headers = request.headers();
    let census = Census::of(headers);
    if header_block_bytes(request, &census) > max_header_bytes {
        return Err(GatewayError::HeadersTooLarge {
            limit: max_header_bytes,
        });
    }
    match (request.version(), census.hosts) {
        (_, n) if n > 1 => return Err(GatewayError::bad_request("repeated Host header")),
        (Version::HTTP_11, 0) => return Err(GatewayError::bad_request("missing Host header")),
        _ => {}
    }
    if census.x_auth_tokens > 1 {
        return Err(GatewayError::bad_request("repeated X-Auth-Token header"));
    }
    if census.authorizations > 1 {
        return Err(GatewayError::bad_request("repeated Authorization header"));
    }
    if token::conflicting_values(census.x_auth_token, census.authorization) {
        return Err(GatewayError::bad_request(
            "X-Auth-Token and Authorization carry different tokens",
        ));
    }
    if census.content_length && census.transfer_encoding {
        return Err(GatewayError::bad_framing(
            "Content-Length together with Transfer-Encoding",
        ));
    }
    if census.connection && headers::connection_names_identity(headers).is_some() {
        return Err(GatewayError::bad_request(
            "Connection header names an identity header",
        ));
    }
    let normal = path::normalize(request.uri().path())
        .map_err(|err| GatewayError::bad_request(err.to_string()))?;
    Ok((
        Arc::from(normal.as_ref()),
        (census.x_auth_token, census.authorization),
    ))
}

/// Admits the request or says why not; on admission leaves the [`RequestInfo`] in it.
fn admit(request: &mut Request<RequestBody>, max_header_bytes: usize) -> Result<(), GatewayError> {
    // Taken, not copied: no later layer reads them (they read the `RequestInfo` made here).
    let context = RequestContext::of_mut(request)?;
    let (Some(conn), Some(request_id)) = (context.conn.take(), context.request_id.take()) else {
        return Err(GatewayError::Internal(
            "request without connection info or request id",
        ));
    };
    // hyper drops Content-Length when Transfer-Encoding is present; the framing observer saw
    // the head as it arrived.
    let http1 = matches!(request.version(), Version::HTTP_10 | Version::HTTP_11);
    if http1 && conn.framing.next_conflict() == Some(true) {
        return Err(GatewayError::bad_framing(
            "Content-Length together with Transfer-Encoding",
        ));
    }
    let (path, (x_auth_token, authorization)) = check(request, max_header_bytes)?;
    // Read before the path is recorded, refused after: a refused token's request is logged
    // with its path too.
    let token = token::extract_values(x_auth_token, authorization);
    let context = RequestContext::of_mut(request)?;
    if let Some(slot) = &context.slot {
        slot.set_path(path.clone());
    }
    let token = token.map_err(|err| {
        tracing::debug!(cause = %err, "token refused before any IAM call");
        GatewayError::InvalidToken
    })?;
    context.info = Some(RequestInfo {
        request_id,
        conn,
        path,
        token,
    });
    Ok(())
}

impl<S> tower::Service<Request<RequestBody>> for GuardService<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    /// The checks are synchronous: a refusal is ready at once, an admitted request is the inner
    /// service's future itself (no allocation of a future of our own).
    type Future = Either<Ready<Result<Response<Body>, GatewayError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        match admit(&mut request, self.max_header_bytes) {
            // The inner service was polled ready just before, and is called right here.
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(err) => Either::Left(ready(Err(err))),
        }
    }
}
