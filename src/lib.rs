//! mfa-gate: an authenticating reverse proxy that lets a request through only if its caller's
//! cloud IAM user has MFA.
//!
//! Request flow on the main listener (see [`stack`]): the edge layer gives the request an id and
//! answers every error; the guard refuses ambiguous requests and normalises the path; the auth
//! layer applies the allowlist, looks the token up (cache, then IAM) and applies the policy; the
//! proxy forwards with identity headers. The admin listener serves metrics, health and admin
//! actions.
//!
//! - [`config`]: the TOML schema and its validation.
//! - [`app`]: composition root; starts a [`app::Gateway`].
//! - [`server`]: accept loop, HTTP/1.1 + HTTP/2, TLS, graceful drain.
//! - [`stack`]: the tower pipeline ([`stack::edge`], [`stack::guard`]).
//! - [`auth`]: token extraction and the auth layer.
//! - [`policy`]: the compiled allowlist and MFA requirement (pure).
//! - [`decision`]: decision and reason vocabulary.
//! - [`cache`]: per-token cache with coalescing and stale-if-error.
//! - [`iam`]: provider trait; [`iam::huawei`] the Huawei Cloud IAM client.
//! - [`proxy`]: the upstream leg (its own HTTP/1.1 client and connection pool), header hygiene,
//!   path normalisation.
//! - [`error`]: `GatewayError` and the JSON answers.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/admin/*`.
//! - [`metrics`]: the Prometheus registry.
//! - [`reload`]: config and certificate reloads (SIGHUP, file changes).
//! - [`tls`]: rustls configuration.
//! - [`dev`]: `mfa-gate dev`: IAM simulator and demo upstream.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod assertion;
pub mod auth;
pub mod cache;
pub mod config;
pub mod decision;
pub mod dev;
pub mod error;
pub mod explain;
pub mod iam;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod stack;
pub mod tls;
