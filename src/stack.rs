//! The request pipeline of the main listener, as one tower stack, outermost first:
//!
//! 1. [`edge`]: request id, in-flight gauge, timing; turns every [`GatewayError`] into its JSON
//!    answer (the only place that does); counts the decision and writes the access log line.
//! 2. [`guard`]: refuses malformed and ambiguous requests (CONTRACT §4), normalises the path,
//!    reads the token; leaves the [`RequestInfo`] later layers rely on.
//! 3. [`AuthLayer`]: allowlist, identity and MFA, policy; issues the [`Principal`].
//! 4. [`ProxyService`]: forwards to the upstream.
//!
//! [`GatewayError`]: crate::error::GatewayError
//! [`RequestInfo`]: crate::proxy::RequestInfo
//! [`Principal`]: crate::proxy::Principal

pub mod context;
pub mod edge;
pub mod guard;
pub mod request_body;

pub use self::request_body::RequestBody;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tower::ServiceBuilder;

use crate::auth::{Auth, AuthLayer, AuthService};
use crate::metrics::Metrics;
use crate::proxy::{ProxyService, Upstream};

/// The service handed to hyper for every connection of the main listener. Its concrete type,
/// not a boxed one: the server clones it for every request, and a boxed service would allocate
/// for each clone and box the (already boxed) future once more.
pub type GatewayService = edge::EdgeService<guard::GuardService<AuthService<ProxyService>>>;

/// Builds the stack of the main listener.
pub fn build(
    auth: Arc<Auth>,
    upstream: Arc<ArcSwap<Upstream>>,
    metrics: Arc<Metrics>,
    max_header_bytes: usize,
) -> GatewayService {
    ServiceBuilder::new()
        .layer(edge::EdgeLayer::new(metrics))
        .layer(guard::GuardLayer::new(max_header_bytes))
        .layer(AuthLayer::new(auth))
        .service(ProxyService::new(upstream))
}
