//! What the layers of the stack hand each other about one request, in one request extension.
//!
//! The server puts it in; the edge adds the request id and the decision slot; the guard turns
//! the connection's facts and the id into the [`RequestInfo`]; the auth layer adds the
//! [`Principal`]; the proxy takes both out. One extension is one allocation and one map entry
//! per request, where one extension per fact cost five of each, and four removes.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request};

use crate::decision::DecisionSlot;
use crate::error::GatewayError;
use crate::proxy::{Principal, RequestInfo};
use crate::stack::edge::ConnInfo;

#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Where the connection came from (the server); taken by the guard.
    pub conn: Option<Arc<ConnInfo>>,
    /// The request's `X-Request-Id` (the edge); taken by the guard.
    pub request_id: Option<HeaderValue>,
    /// Where the auth layer leaves its decision for the edge to count and log (the edge).
    pub slot: Option<DecisionSlot>,
    /// When the edge took the request in (the edge): what a remembered answer's freshness is
    /// judged against, instead of a reading of the clock of its own (~16–50 ns).
    pub arrived: Option<Instant>,
    /// The facts later layers rely on (the guard, on admission).
    pub info: Option<RequestInfo>,
    /// Permission to forward (the auth layer, on an allow).
    pub principal: Option<Principal>,
    /// The answer is written by the gateway's own HTTP/1.1 writer (the server): a forwarded
    /// answer's headers are then kept as the upstream's lines, not put in a map
    /// ([`crate::proxy::h1::KeptHeaders`]).
    pub own_writer: bool,
}

impl RequestContext {
    /// The context of a request that arrived on a connection from `conn`.
    pub fn new(conn: Arc<ConnInfo>, own_writer: bool) -> Self {
        RequestContext {
            conn: Some(conn),
            request_id: None,
            slot: None,
            arrived: None,
            info: None,
            principal: None,
            own_writer,
        }
    }

    // (`match` rather than `ok_or`: the error is made, and dropped, only when it is returned.)
    pub fn of<B>(request: &Request<B>) -> Result<&RequestContext, GatewayError> {
        match request.extensions().get::<RequestContext>() {
            Some(context) => Ok(context),
            None => Err(GatewayError::Internal("request without its context")),
        }
    }

    pub fn of_mut<B>(request: &mut Request<B>) -> Result<&mut RequestContext, GatewayError> {
        match request.extensions_mut().get_mut::<RequestContext>() {
            Some(context) => Ok(context),
            None => Err(GatewayError::Internal("request without its context")),
        }
    }
}
