//! A fake Huawei Cloud IAM server for `mfa-gate dev` and the integration tests.
//!
//! It serves the three IAM v3 calls the `huawei` provider makes (CONTRACT §5), answering them
//! the way the API pages in `shared/seeds/` and `shared/IAM.md` document — same paths, headers,
//! status codes, JSON bodies and error codes, down to the `Iam.0004` spelling of the
//! login-protect page:
//!
//! | call | path |
//! |---|---|
//! | verify a token | `GET /v3/auth/tokens` (`X-Auth-Token` + `X-Subject-Token`) |
//! | MFA device | `GET /v3.0/OS-MFA/users/{user_id}/virtual-mfa-device` |
//! | login protection | `GET /v3.0/OS-USER/users/{user_id}/login-protect` |
//!
//! Tests steer it while it runs: users and tokens can be added, revoked and changed, every call
//! is counted on arrival, the `X-Auth-Token`s received are recorded, and a [`Fault`] per API
//! makes the IAM misbehave the ways a real one (or the load balancer in front of it) does, so
//! that the gateway's failure handling can be proven without a cloud account.
//!
//! The simulator never panics on anything a client sends; a malformed request gets an IAM-style
//! error answer.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// The response body type of every answer: either a full buffer or, for [`Fault::Truncated`],
/// a stream that breaks off.
type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// `X-Auth-Token`: the caller's token, on every IAM call.
const X_AUTH_TOKEN: HeaderName = HeaderName::from_static("x-auth-token");
/// `X-Subject-Token`: the token to verify (request) and its echo (response).
const X_SUBJECT_TOKEN: HeaderName = HeaderName::from_static("x-subject-token");
/// Huawei answers carry a request id; the gateway may log it.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The content type the IAM sends with its JSON bodies.
const IAM_JSON: &str = "application/json;charset=UTF-8";
/// Size of the [`Fault::Huge`] body: far beyond any sane limit for these small answers.
const HUGE_BODY_BYTES: usize = 1 << 20;
/// The role listed in verified tokens (the gateway ignores roles; they make the body realistic).
const DEMO_ROLE: (&str, &str) = ("readonly", "0c0e3e1b4a2d4f6e8a9b7c5d3e1f2a4b");

/// One of the IAM calls the simulator serves; faults and call counters are kept per API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// `GET /v3/auth/tokens`
    VerifyToken,
    /// `GET /v3.0/OS-MFA/users/{user_id}/virtual-mfa-device`
    MfaDevice,
    /// `GET /v3.0/OS-USER/users/{user_id}/login-protect`
    LoginProtect,
}

impl Api {
    /// Every API, for iterating in tests.
    pub const ALL: [Api; 3] = [Api::VerifyToken, Api::MfaDevice, Api::LoginProtect];

    /// The `api` label value the gateway's metrics use for this call (CONTRACT §6).
    pub fn as_str(self) -> &'static str {
        match self {
            Api::VerifyToken => "verify_token",
            Api::MfaDevice => "mfa_device",
            Api::LoginProtect => "login_protect",
        }
    }

    fn index(self) -> usize {
        match self {
            Api::VerifyToken => 0,
            Api::MfaDevice => 1,
            Api::LoginProtect => 2,
        }
    }
}

/// A way for one API to misbehave. Set with [`IamSim::set_fault`]; it persists until cleared.
///
/// Each variant stands for something seen in front of real IAM endpoints, and each must end in
/// a defined gateway outcome (CONTRACT §1: an IAM failure is never "user has MFA").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally, but only after this delay (exercises `iam.timeout`).
    Latency(Duration),
    /// Answer this status with the IAM error body for it: 400 `IAM.0007`, 401 `IAM.0001`,
    /// 403 `IAM.0002`, 404 `IAM.0004` (`Iam.0004` on login-protect), 429 `IAM.0012`,
    /// 500 `IAM.0006`, 503 a service-unavailable body; other 4xx get `IAM.0007` and other 5xx
    /// `IAM.0006`. A status outside 200..=599 is answered as 500: an interim (1xx) status
    /// cannot end an HTTP exchange.
    Status(u16),
    /// 429 with the OTC throttling body (`IAM.0012`).
    Throttle,
    /// 200 with an HTML page (`text/html`), like a misconfigured load balancer or captive portal.
    Html,
    /// 200 `application/json` whose body is not JSON.
    Garbage,
    /// 200 whose `Content-Length` promises the whole normal answer, of which only the first
    /// half is sent before the connection is closed.
    Truncated,
    /// 200 `application/json` of exactly 1 MiB: the normal answer (or error body) with a
    /// `"padding"` member, so that only a body-size limit can tell it apart.
    Huge,
    /// 200 with valid JSON lacking the fields the answer must have (`{"token":{}}`,
    /// `{"virtual_mfa_device":{}}`, `{"login_protect":{}}`).
    MissingFields,
    /// 200 with valid JSON whose fields have the wrong types (`"user":{"id":42}`,
    /// `"enabled":"yes"`, …).
    WrongTypes,
    /// 200, but about another user than the one asked: on verify, `token.user` is another
    /// user's; on the MFA calls, the answer claims the strongest MFA (a bound device; login
    /// protection `vmfa`) with another user's `user_id`. Requests that would fail
    /// authentication or authorization still get their normal error.
    OtherUser,
    /// Accept the request, then close the connection without any answer.
    Drop,
}

/// A user of the simulated IAM together with one token of theirs.
///
/// Several `SimUser`s may share a `user_id` (two tokens of the same user); the per-user fields
/// (`user_name`, domain, `mfa_device`, `login_protect`) of the one added last win.
#[derive(Clone, Debug)]
pub struct SimUser {
    /// IAM user id (32 hex characters on the real IAM).
    pub user_id: String,
    /// IAM user name.
    pub user_name: String,
    /// Account (domain) id.
    pub domain_id: String,
    /// Account (domain) name.
    pub domain_name: String,
    /// The token this user presents.
    pub token: String,
    /// The token's `methods`, e.g. `["password"]` or `["password","totp"]`.
    pub methods: Vec<String>,
    /// The token's `expires_at`; from then on the token is refused like on the real IAM.
    pub expires_at: SystemTime,
    /// `Some(serial_number)` when a virtual MFA device is bound.
    pub mfa_device: Option<String>,
    /// `Some((enabled, verification_method))` when login protection was ever configured;
    /// `None` answers 404 `Iam.0004` as on the seed page.
    pub login_protect: Option<(bool, String)>,
}

/// A running simulated IAM on a loopback (or any) address.
///
/// Cheap to clone and share: all state is behind `Arc`s. The server stops when
/// [`IamSim::shutdown`] is called or the last clone is dropped; open connections are cut
/// at that moment, so a stopped simulator looks like an IAM that went away.
#[derive(Clone)]
pub struct IamSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Held only by the handles (never by the server task), so that dropping the last handle
    /// stops the server.
    stopper: Arc<Stopper>,
}

impl fmt::Debug for IamSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IamSim")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Signals the server task and all its connections to stop, at the latest when dropped.
struct Stopper {
    tx: watch::Sender<bool>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.tx.send_replace(true);
    }
}

/// State shared between the handles and the server task.
struct Shared {
    /// Users, tokens, faults and the tokens seen; one lock, because answers must see a
    /// consistent snapshot (a token and its user) and the lock is never held across an await.
    state: Mutex<State>,
    /// Requests per [`Api`] (indexed by [`Api::index`]), counted on arrival so that tests can
    /// assert on caching and coalescing even when the answer is a fault.
    calls: [AtomicUsize; 3],
}

#[derive(Default)]
struct State {
    /// By token value.
    tokens: HashMap<String, TokenRecord>,
    /// By user id.
    users: HashMap<String, UserRecord>,
    faults: HashMap<Api, Fault>,
    /// Every `X-Auth-Token` value received, in arrival order.
    seen_tokens: Vec<String>,
    /// Every `X-Subject-Token` value received, in arrival order.
    seen_subject_tokens: Vec<String>,
}

struct TokenRecord {
    user_id: String,
    methods: Vec<String>,
    /// When the token was added to the simulator (never after `expires_at`).
    issued_at: SystemTime,
    expires_at: SystemTime,
}

struct UserRecord {
    user_name: String,
    domain_id: String,
    domain_name: String,
    mfa_device: Option<String>,
    login_protect: Option<(bool, String)>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock (only possible in a test's own code) must not turn
        // every later answer into a panic too.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn add_user(&mut self, user: SimUser) {
        let now = SystemTime::now();
        self.tokens.insert(
            user.token,
            TokenRecord {
                user_id: user.user_id.clone(),
                methods: user.methods,
                issued_at: now.min(user.expires_at),
                expires_at: user.expires_at,
            },
        );
        self.users.insert(
            user.user_id,
            UserRecord {
                user_name: user.user_name,
                domain_id: user.domain_id,
                domain_name: user.domain_name,
                mfa_device: user.mfa_device,
                login_protect: user.login_protect,
            },
        );
    }
}

impl IamSim {
    /// Binds `bind` (port 0 picks a free port) and serves until shut down.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn start(bind: SocketAddr, users: Vec<SimUser>) -> std::io::Result<IamSim> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let mut state = State::default();
        for user in users {
            state.add_user(user);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            calls: Default::default(),
        });
        let (tx, rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), rx));
        tracing::debug!(%addr, "IAM simulator listening");
        Ok(IamSim {
            addr,
            shared,
            stopper: Arc::new(Stopper { tx }),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure as `iam.endpoint`, e.g. `http://127.0.0.1:40123`
    /// (a wildcard bind address is replaced by loopback, which is where it can be reached).
    pub fn url(&self) -> String {
        base_url(self.addr)
    }

    /// Requests received for `api` since start or the last [`IamSim::reset_calls`], counted on
    /// arrival (faulted ones included).
    pub fn calls(&self, api: Api) -> usize {
        self.shared.calls[api.index()].load(Ordering::SeqCst)
    }

    /// Sets every call counter back to zero.
    pub fn reset_calls(&self) {
        for counter in &self.shared.calls {
            counter.store(0, Ordering::SeqCst);
        }
    }

    /// Makes `api` (`None`: every API) misbehave as `fault` (`None`: answer normally again).
    pub fn set_fault(&self, api: Option<Api>, fault: Option<Fault>) {
        let apis = match api {
            Some(api) => vec![api],
            None => Api::ALL.to_vec(),
        };
        let mut state = self.shared.state();
        for api in apis {
            match &fault {
                Some(fault) => {
                    state.faults.insert(api, fault.clone());
                }
                None => {
                    state.faults.remove(&api);
                }
            }
        }
    }

    /// Adds a user and their token, or replaces the entry with the same token (and the
    /// per-user data of the same `user_id`).
    pub fn add_user(&self, user: SimUser) {
        self.shared.state().add_user(user);
    }

    /// Revokes a token: from now on the IAM answers as for a token it never issued.
    pub fn remove_token(&self, token: &str) {
        self.shared.state().tokens.remove(token);
    }

    /// Binds (`Some(serial_number)`) or unbinds (`None`) the user's virtual MFA device.
    /// Unknown user ids are ignored.
    pub fn set_mfa_device(&self, user_id: &str, serial: Option<String>) {
        if let Some(user) = self.shared.state().users.get_mut(user_id) {
            user.mfa_device = serial;
        }
    }

    /// Sets the user's login protection (`None`: never configured, answered with 404).
    /// Unknown user ids are ignored.
    pub fn set_login_protect(&self, user_id: &str, value: Option<(bool, String)>) {
        if let Some(user) = self.shared.state().users.get_mut(user_id) {
            user.login_protect = value;
        }
    }

    /// Every `X-Auth-Token` value received so far (one entry per header line, any path), in
    /// arrival order, so that tests can assert exactly what the gateway sent.
    pub fn seen_tokens(&self) -> Vec<String> {
        self.shared.state().seen_tokens.clone()
    }

    /// Every `X-Subject-Token` value received so far, in arrival order.
    pub fn seen_subject_tokens(&self) -> Vec<String> {
        self.shared.state().seen_subject_tokens.clone()
    }

    /// Stops accepting connections and cuts the open ones. Idempotent.
    pub fn shutdown(&self) {
        self.stopper.tx.send_replace(true);
    }
}

/// Three demo users in one demo account, with readable random tokens (`demo-alice-<16 hex>`)
/// valid for `expires_in`:
///
/// * `alice` — virtual MFA device bound, login protection `vmfa`, logged in with TOTP;
/// * `bob` — no MFA device, login protection enabled with `sms` only;
/// * `carol` — no device, login protection never configured (404).
pub fn demo_users(expires_in: Duration) -> Vec<SimUser> {
    let now = SystemTime::now();
    let expires_at = now.checked_add(expires_in).unwrap_or(now);
    let domain_id = iam_id();
    let user = |name: &str, methods: &[&str]| SimUser {
        user_id: iam_id(),
        user_name: name.to_owned(),
        domain_id: domain_id.clone(),
        domain_name: "mfa-gate-demo".to_owned(),
        token: format!("demo-{name}-{:016x}", rand::random::<u64>()),
        methods: methods.iter().map(|m| (*m).to_owned()).collect(),
        expires_at,
        mfa_device: None,
        login_protect: None,
    };
    let mut alice = user("alice", &["password", "totp"]);
    alice.mfa_device = Some(format!("iam/mfa/{}", alice.user_id));
    alice.login_protect = Some((true, "vmfa".to_owned()));
    let mut bob = user("bob", &["password"]);
    bob.login_protect = Some((true, "sms".to_owned()));
    let carol = user("carol", &["password"]);
    vec![alice, bob, carol]
}

/// A random id in the form the IAM uses for users and domains: 32 lowercase hex characters.
fn iam_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `http://IP:PORT` for a bound address, with loopback in place of a wildcard address.
fn base_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Resolves when `shutdown` was called or every handle is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // `Err` means the sender is gone: that is a stop too.
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(serve_connection(stream, Arc::clone(&shared), stop.clone()));
                }
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::debug!(cause = %err, "IAM simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    tracing::debug!("IAM simulator stopped");
}

/// Serves one connection (HTTP/1.1 keep-alive or h2c) until it ends, a [`Fault::Drop`] cuts
/// it, or the simulator stops.
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    // Fired by a `Fault::Drop` answer: dropping the connection future closes the socket
    // without writing anything.
    let kill = Arc::new(Notify::new());
    let service = {
        let kill = Arc::clone(&kill);
        service_fn(move |req| {
            let shared = Arc::clone(&shared);
            let kill = Arc::clone(&kill);
            async move { Ok::<_, Infallible>(handle(&shared, &kill, req).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(cause = %err, "IAM simulator connection ended with an error");
            }
        }
        () = kill.notified() => {}
        () = stopped(&mut stop) => {}
    }
}

/// Which call a path is, with the user id from the path for the per-user calls.
enum Route {
    VerifyToken,
    MfaDevice(String),
    LoginProtect(String),
    Unknown,
}

impl Route {
    fn parse(path: &str) -> Route {
        if path == "/v3/auth/tokens" {
            return Route::VerifyToken;
        }
        let user_id = |prefix: &str, suffix: &str| {
            path.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(suffix))
                .filter(|id| !id.is_empty() && !id.contains('/'))
                .map(str::to_owned)
        };
        if let Some(id) = user_id("/v3.0/OS-MFA/users/", "/virtual-mfa-device") {
            Route::MfaDevice(id)
        } else if let Some(id) = user_id("/v3.0/OS-USER/users/", "/login-protect") {
            Route::LoginProtect(id)
        } else {
            Route::Unknown
        }
    }

    fn api(&self) -> Option<Api> {
        match self {
            Route::VerifyToken => Some(Api::VerifyToken),
            Route::MfaDevice(_) => Some(Api::MfaDevice),
            Route::LoginProtect(_) => Some(Api::LoginProtect),
            Route::Unknown => None,
        }
    }
}

/// An IAM error answer: status, `error_code` and `error_msg`.
#[derive(Clone, Copy)]
struct IamError {
    status: StatusCode,
    code: &'static str,
    msg: &'static str,
}

/// Missing, unknown or revoked `X-Auth-Token` (IAM error codes: 401 `IAM.0001`).
const UNAUTHENTICATED: IamError = IamError {
    status: StatusCode::UNAUTHORIZED,
    code: "IAM.0001",
    msg: "The request you have made requires authentication.",
};
/// Expired `X-Auth-Token` (IAM error codes: 401 `IAM.0066`).
const TOKEN_EXPIRED: IamError = IamError {
    status: StatusCode::UNAUTHORIZED,
    code: "IAM.0066",
    msg: "The token has expired.",
};
/// Seed pages 000/002, 403 example 1.
const FORBIDDEN: IamError = IamError {
    status: StatusCode::FORBIDDEN,
    code: "IAM.0002",
    msg: "You are not authorized to perform the requested action.",
};
/// Seed page 000, 404.
const NOT_FOUND: IamError = IamError {
    status: StatusCode::NOT_FOUND,
    code: "IAM.0004",
    msg: "Could not find %(target)s: %(target_id)s.",
};
/// Seed page 002, 404 — the official example really spells it `Iam.0004`.
const LOGIN_PROTECT_NOT_FOUND: IamError = IamError {
    status: StatusCode::NOT_FOUND,
    code: "Iam.0004",
    msg: "Could not find %(target)s: %(target_id)s.",
};
/// Unknown or expired subject token; the token itself is never echoed.
const TOKEN_NOT_FOUND: IamError = IamError {
    status: StatusCode::NOT_FOUND,
    code: "IAM.0004",
    msg: "Could not find token: %(target_id)s.",
};
/// Missing or repeated `X-Subject-Token` (IAM error codes: 400 `IAM.0009`).
const SUBJECT_TOKEN_INVALID: IamError = IamError {
    status: StatusCode::BAD_REQUEST,
    code: "IAM.0009",
    msg: "X-Subject-Token is invalid in the request.",
};
/// IAM error codes: 400 `IAM.0007`.
const INVALID_PARAMETER: IamError = IamError {
    status: StatusCode::BAD_REQUEST,
    code: "IAM.0007",
    msg: "Request parameter %(key)s is invalid.",
};
/// OTC IAM throttling (IAM error codes: 429 `IAM.0012`).
const THROTTLED: IamError = IamError {
    status: StatusCode::TOO_MANY_REQUESTS,
    code: "IAM.0012",
    msg: "The throttling threshold has been reached. Threshold: 10 times per 1 seconds",
};
/// Seed pages 000/002, 500.
const INTERNAL: IamError = IamError {
    status: StatusCode::INTERNAL_SERVER_ERROR,
    code: "IAM.0006",
    msg: "An unexpected error prevented the server from fulfilling your request.",
};
/// The IAM pages list 503 without an example body; this one keeps the IAM shape.
const UNAVAILABLE: IamError = IamError {
    status: StatusCode::SERVICE_UNAVAILABLE,
    code: "IAM.0503",
    msg: "The service is temporarily unavailable. Please try again later.",
};
/// A path no IAM API serves: what the Huawei API gateway in front of the IAM answers.
const NO_SUCH_API: IamError = IamError {
    status: StatusCode::NOT_FOUND,
    code: "APIG.0101",
    msg: "The API does not exist or has not been published in the environment.",
};
/// A method other than GET on one of the three paths (Keystone's wording).
const METHOD_NOT_ALLOWED: IamError = IamError {
    status: StatusCode::METHOD_NOT_ALLOWED,
    code: "IAM.0007",
    msg: "The method is not allowed for the requested URL.",
};

#[derive(Serialize)]
struct ErrorBody<'a> {
    error_msg: &'a str,
    error_code: &'a str,
}

/// `GET /v3/auth/tokens` 200 body, fields in the order of the IAM's example.
#[derive(Serialize)]
struct TokenBody<'a> {
    token: TokenInfo<'a>,
}

#[derive(Serialize)]
struct TokenInfo<'a> {
    methods: &'a [String],
    expires_at: String,
    issued_at: String,
    user: TokenUser<'a>,
    domain: IdName<'a>,
    roles: [Role<'a>; 1],
}

#[derive(Serialize)]
struct TokenUser<'a> {
    domain: IdName<'a>,
    id: &'a str,
    name: &'a str,
    password_expires_at: &'a str,
}

#[derive(Serialize)]
struct IdName<'a> {
    id: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
struct Role<'a> {
    name: &'a str,
    id: &'a str,
}

/// Seed pages 000/001, 200 body.
#[derive(Serialize)]
struct MfaDeviceBody<'a> {
    virtual_mfa_device: MfaDevice<'a>,
}

#[derive(Serialize)]
struct MfaDevice<'a> {
    user_id: &'a str,
    serial_number: &'a str,
}

/// Seed page 002, 200 body.
#[derive(Serialize)]
struct LoginProtectBody<'a> {
    login_protect: LoginProtect<'a>,
}

#[derive(Serialize)]
struct LoginProtect<'a> {
    user_id: &'a str,
    enabled: bool,
    verification_method: &'a str,
}

/// What an endpoint answers before any fault reshapes it.
struct Answer {
    status: StatusCode,
    body: String,
    /// Echoed as `X-Subject-Token` on a successful verify.
    subject_token: Option<String>,
}

impl Answer {
    fn ok<T: Serialize>(body: &T) -> Answer {
        match serde_json::to_string(body) {
            Ok(body) => Answer {
                status: StatusCode::OK,
                body,
                subject_token: None,
            },
            Err(_) => Answer::error(INTERNAL),
        }
    }

    fn error(err: IamError) -> Answer {
        Answer {
            status: err.status,
            body: error_body(err.code, err.msg),
            subject_token: None,
        }
    }
}

fn error_body(code: &str, msg: &str) -> String {
    let body = ErrorBody {
        error_msg: msg,
        error_code: code,
    };
    // Serialising two strings cannot fail; the fallback only keeps this path panic-free.
    serde_json::to_string(&body).unwrap_or_default()
}

async fn handle(shared: &Shared, kill: &Notify, req: Request<Incoming>) -> Response<Body> {
    let route = Route::parse(req.uri().path());
    let api = route.api();
    if let Some(api) = api {
        shared.calls[api.index()].fetch_add(1, Ordering::SeqCst);
    }
    let fault = {
        let mut state = shared.state();
        for value in req.headers().get_all(X_AUTH_TOKEN) {
            state.seen_tokens.push(lossy(value));
        }
        for value in req.headers().get_all(X_SUBJECT_TOKEN) {
            state.seen_subject_tokens.push(lossy(value));
        }
        api.and_then(|api| state.faults.get(&api).cloned())
    };
    tracing::debug!(method = %req.method(), path = req.uri().path(), ?fault, "IAM simulator request");

    // Faults that replace the answer without looking at the request.
    match (&fault, api) {
        (Some(Fault::Drop), _) => {
            kill.notify_one();
            return std::future::pending().await;
        }
        (Some(Fault::Latency(delay)), _) => tokio::time::sleep(*delay).await,
        (Some(Fault::Status(status)), Some(api)) => return status_fault(*status, api),
        (Some(Fault::Throttle), _) => return json_response(&Answer::error(THROTTLED)),
        (Some(Fault::Html), _) => return html_page(),
        (Some(Fault::Garbage), _) => return garbage(),
        (Some(Fault::MissingFields), Some(api)) => return missing_fields(api),
        (Some(Fault::WrongTypes), Some(api)) => return wrong_types(api, &route),
        _ => {}
    }

    let other_user = matches!(fault, Some(Fault::OtherUser));
    let answer = if req.method() != Method::GET && !matches!(route, Route::Unknown) {
        Answer::error(METHOD_NOT_ALLOWED)
    } else {
        let state = shared.state();
        let now = SystemTime::now();
        match &route {
            Route::VerifyToken => verify_token(&state, req.headers(), now, other_user),
            Route::MfaDevice(user_id) => {
                mfa_device(&state, req.headers(), now, user_id, other_user)
            }
            Route::LoginProtect(user_id) => {
                login_protect(&state, req.headers(), now, user_id, other_user)
            }
            Route::Unknown => Answer::error(NO_SUCH_API),
        }
    };

    match fault {
        Some(Fault::Huge) => huge(answer),
        Some(Fault::Truncated) => truncated(answer),
        _ => {
            let mut response = json_response(&answer);
            if answer.status == StatusCode::METHOD_NOT_ALLOWED {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            response
        }
    }
}

/// Header values are recorded as text even when a client sends bytes that are not.
fn lossy(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

/// The single value of a header, or `None` when it is absent, repeated or not text.
fn single<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

/// The caller's token record, or the 401 the IAM answers instead.
fn authenticate<'s>(
    state: &'s State,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<&'s TokenRecord, IamError> {
    let token = single(headers, &X_AUTH_TOKEN).ok_or(UNAUTHENTICATED)?;
    let record = state.tokens.get(token).ok_or(UNAUTHENTICATED)?;
    if record.expires_at <= now {
        return Err(TOKEN_EXPIRED);
    }
    Ok(record)
}

/// `GET /v3/auth/tokens`. Like Keystone's default policy, a token may verify tokens of its own
/// user (the gateway sends the same token in both headers); another user's token is 403.
fn verify_token(state: &State, headers: &HeaderMap, now: SystemTime, other_user: bool) -> Answer {
    let caller = match authenticate(state, headers, now) {
        Ok(caller) => caller,
        Err(err) => return Answer::error(err),
    };
    let Some(subject_token) = single(headers, &X_SUBJECT_TOKEN) else {
        return Answer::error(SUBJECT_TOKEN_INVALID);
    };
    let Some(subject) = state
        .tokens
        .get(subject_token)
        .filter(|subject| subject.expires_at > now)
    else {
        return Answer::error(TOKEN_NOT_FOUND);
    };
    if subject.user_id != caller.user_id {
        return Answer::error(FORBIDDEN);
    }
    let Some(user) = state.users.get(&subject.user_id) else {
        return Answer::error(TOKEN_NOT_FOUND);
    };
    let (user_id, user_name) = if other_user {
        let other = other_user_of(state, &subject.user_id);
        let name = state
            .users
            .get(&other)
            .map_or_else(|| "someone-else".to_owned(), |u| u.user_name.clone());
        (other, name)
    } else {
        (subject.user_id.clone(), user.user_name.clone())
    };
    let domain = IdName {
        id: &user.domain_id,
        name: &user.domain_name,
    };
    let body = TokenBody {
        token: TokenInfo {
            methods: &subject.methods,
            expires_at: iam_time(subject.expires_at),
            issued_at: iam_time(subject.issued_at),
            user: TokenUser {
                domain: IdName {
                    id: &user.domain_id,
                    name: &user.domain_name,
                },
                id: &user_id,
                name: &user_name,
                password_expires_at: "",
            },
            domain,
            roles: [Role {
                name: DEMO_ROLE.0,
                id: DEMO_ROLE.1,
            }],
        },
    };
    let mut answer = Answer::ok(&body);
    if answer.status == StatusCode::OK {
        answer.subject_token = Some(subject_token.to_owned());
    }
    answer
}

/// Authenticates the caller and checks that they ask about themselves (seed pages: "IAM users
/// do not need to be authorized when querying their own" — and the simulator has no admins).
fn own_user(
    state: &State,
    headers: &HeaderMap,
    now: SystemTime,
    user_id: &str,
) -> Result<(), IamError> {
    let caller = authenticate(state, headers, now)?;
    if caller.user_id != user_id {
        return Err(FORBIDDEN);
    }
    Ok(())
}

/// `GET /v3.0/OS-MFA/users/{user_id}/virtual-mfa-device` (seed pages 000, 001).
fn mfa_device(
    state: &State,
    headers: &HeaderMap,
    now: SystemTime,
    user_id: &str,
    other_user: bool,
) -> Answer {
    if let Err(err) = own_user(state, headers, now, user_id) {
        return Answer::error(err);
    }
    if other_user {
        let other = other_user_of(state, user_id);
        let serial = state
            .users
            .get(&other)
            .and_then(|u| u.mfa_device.clone())
            .unwrap_or_else(|| format!("iam/mfa/{other}"));
        return Answer::ok(&MfaDeviceBody {
            virtual_mfa_device: MfaDevice {
                user_id: &other,
                serial_number: &serial,
            },
        });
    }
    match state
        .users
        .get(user_id)
        .and_then(|u| u.mfa_device.as_deref())
    {
        Some(serial) => Answer::ok(&MfaDeviceBody {
            virtual_mfa_device: MfaDevice {
                user_id,
                serial_number: serial,
            },
        }),
        None => Answer::error(NOT_FOUND),
    }
}

/// `GET /v3.0/OS-USER/users/{user_id}/login-protect` (seed page 002).
fn login_protect(
    state: &State,
    headers: &HeaderMap,
    now: SystemTime,
    user_id: &str,
    other_user: bool,
) -> Answer {
    if let Err(err) = own_user(state, headers, now, user_id) {
        return Answer::error(err);
    }
    if other_user {
        let other = other_user_of(state, user_id);
        return Answer::ok(&LoginProtectBody {
            login_protect: LoginProtect {
                user_id: &other,
                enabled: true,
                verification_method: "vmfa",
            },
        });
    }
    match state
        .users
        .get(user_id)
        .and_then(|u| u.login_protect.as_ref())
    {
        Some((enabled, method)) => Answer::ok(&LoginProtectBody {
            login_protect: LoginProtect {
                user_id,
                enabled: *enabled,
                verification_method: method,
            },
        }),
        None => Answer::error(LOGIN_PROTECT_NOT_FOUND),
    }
}

/// Another user's id for [`Fault::OtherUser`]: the smallest other registered user id, so the
/// choice is stable, or a made-up one when the simulator knows a single user.
fn other_user_of(state: &State, user_id: &str) -> String {
    state
        .users
        .keys()
        .filter(|id| id.as_str() != user_id)
        .min()
        .cloned()
        .unwrap_or_else(|| {
            if user_id == "ffffffffffffffffffffffffffffffff" {
                "00000000000000000000000000000000".to_owned()
            } else {
                "ffffffffffffffffffffffffffffffff".to_owned()
            }
        })
}

/// A timestamp as the IAM writes it: `2020-09-05T06:50:44.390000Z` (microseconds, UTC).
/// Times outside what RFC 3339 can express are clamped instead of panicking.
fn iam_time(time: SystemTime) -> String {
    /// 9999-12-31T23:59:59Z, the last second RFC 3339 can write.
    const MAX_SECS: u64 = 253_402_300_799;
    let clamped = match time.duration_since(UNIX_EPOCH) {
        Ok(since) if since.as_secs() <= MAX_SECS => time,
        Ok(_) => UNIX_EPOCH + Duration::from_secs(MAX_SECS),
        Err(_) => UNIX_EPOCH,
    };
    humantime::format_rfc3339_micros(clamped).to_string()
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn response(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(id) = HeaderValue::from_str(&iam_id()) {
        headers.insert(X_REQUEST_ID, id);
    }
    response
}

fn json_response(answer: &Answer) -> Response<Body> {
    let mut response = response(answer.status, IAM_JSON, full(answer.body.clone()));
    if let Some(value) = answer
        .subject_token
        .as_deref()
        .and_then(|token| HeaderValue::from_str(token).ok())
    {
        response.headers_mut().insert(X_SUBJECT_TOKEN, value);
    }
    response
}

/// [`Fault::Status`]: the IAM error body that goes with the status.
fn status_fault(status: u16, api: Api) -> Response<Body> {
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let err = match status.as_u16() {
        400 => INVALID_PARAMETER,
        401 => UNAUTHENTICATED,
        403 => FORBIDDEN,
        404 if api == Api::LoginProtect => LOGIN_PROTECT_NOT_FOUND,
        404 => NOT_FOUND,
        429 => THROTTLED,
        503 => UNAVAILABLE,
        500..=599 => INTERNAL,
        _ => INVALID_PARAMETER,
    };
    json_response(&Answer {
        status,
        body: error_body(err.code, err.msg),
        subject_token: None,
    })
}

/// [`Fault::Html`]: what a load balancer's error or maintenance page looks like.
fn html_page() -> Response<Body> {
    const PAGE: &str = "<!DOCTYPE html>\n<html>\n<head><title>Service Maintenance</title></head>\n\
        <body>\n<h1>We'll be back soon</h1>\n<p>The service is under maintenance.</p>\n\
        </body>\n</html>\n";
    response(StatusCode::OK, "text/html; charset=utf-8", full(PAGE))
}

/// [`Fault::Garbage`]: a body that starts like JSON and then is not.
fn garbage() -> Response<Body> {
    const GARBAGE: &[u8] = b"{\"token\":{\"user\":\xff\xfe<<not json>> \x00\x01 ]]}";
    response(StatusCode::OK, IAM_JSON, full(GARBAGE))
}

/// [`Fault::MissingFields`]: the envelope of the answer without its content.
fn missing_fields(api: Api) -> Response<Body> {
    let body = match api {
        Api::VerifyToken => json!({"token": {}}),
        Api::MfaDevice => json!({"virtual_mfa_device": {}}),
        Api::LoginProtect => json!({"login_protect": {}}),
    };
    response(StatusCode::OK, IAM_JSON, full(body.to_string()))
}

/// [`Fault::WrongTypes`]: every field present, none of the right type.
fn wrong_types(api: Api, route: &Route) -> Response<Body> {
    let body = match (api, route) {
        (Api::VerifyToken, _) => json!({"token": {
            "methods": "password",
            "expires_at": 1_599_288_644,
            "issued_at": true,
            "user": {"domain": "demo", "id": 42, "name": ["alice"], "password_expires_at": 0},
            "domain": [],
            "roles": {},
        }}),
        (Api::MfaDevice, Route::MfaDevice(user_id)) => json!({"virtual_mfa_device": {
            "user_id": [user_id],
            "serial_number": 42,
        }}),
        (Api::LoginProtect, Route::LoginProtect(user_id)) => json!({"login_protect": {
            "user_id": {"id": user_id},
            "enabled": "yes",
            "verification_method": 1,
        }}),
        (Api::MfaDevice, _) => json!({"virtual_mfa_device": {"user_id": 42, "serial_number": 42}}),
        (Api::LoginProtect, _) => json!({"login_protect": {"user_id": 42, "enabled": "yes"}}),
    };
    response(StatusCode::OK, IAM_JSON, full(body.to_string()))
}

/// [`Fault::Huge`]: the answer's JSON object with a `"padding"` member appended, 200, exactly
/// [`HUGE_BODY_BYTES`] long.
fn huge(answer: Answer) -> Response<Body> {
    let inner = answer
        .body
        .strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
        .unwrap_or("");
    let separator = if inner.is_empty() { "" } else { "," };
    let frame_len = 1 + inner.len() + separator.len() + "\"padding\":\"\"}".len();
    let padding = "x".repeat(HUGE_BODY_BYTES.saturating_sub(frame_len));
    let body = format!("{{{inner}{separator}\"padding\":\"{padding}\"}}");
    response(StatusCode::OK, IAM_JSON, full(body))
}

/// [`Fault::Truncated`]: `Content-Length` of the whole answer, half of it sent, then the
/// stream fails, which makes hyper close the connection mid-body. The short pause before the
/// failure lets hyper flush the head and the first half: the client must see a 200 whose body
/// breaks off, not a connection that failed before any answer (that is [`Fault::Drop`]).
fn truncated(answer: Answer) -> Response<Body> {
    let whole = Bytes::from(answer.body);
    let sent = whole.slice(..whole.len() / 2);
    let frames = futures_util::stream::unfold(Some(sent), |sent| async move {
        match sent {
            Some(sent) => Some((Ok(Frame::data(sent)), None)),
            None => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Err(std::io::Error::other("simulated truncation")), None))
            }
        }
    });
    let body = StreamBody::new(frames).boxed_unsync();
    let mut response = response(StatusCode::OK, IAM_JSON, body);
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use serde_json::Value;

    type TestClient = Client<HttpConnector, Empty<Bytes>>;

    fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn localhost() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn user(name: &str, token: &str) -> SimUser {
        SimUser {
            user_id: format!("{name:0>32}"),
            user_name: name.to_owned(),
            domain_id: "d".repeat(32),
            domain_name: "domain A".to_owned(),
            token: token.to_owned(),
            methods: vec!["password".to_owned(), "totp".to_owned()],
            expires_at: UNIX_EPOCH + Duration::from_micros(1_599_288_644_390_000),
            mfa_device: Some(format!("iam/mfa/{name}")),
            login_protect: Some((true, "vmfa".to_owned())),
        }
    }

    /// alice: device + vmfa; bob: nothing configured. Both valid for an hour.
    async fn sim() -> (IamSim, SimUser, SimUser) {
        let hour = SystemTime::now() + Duration::from_secs(3600);
        let alice = SimUser {
            expires_at: hour,
            ..user("a1", "tok-alice")
        };
        let bob = SimUser {
            expires_at: hour,
            mfa_device: None,
            login_protect: None,
            methods: vec!["password".to_owned()],
            ..user("b2", "tok-bob")
        };
        let sim = IamSim::start(localhost(), vec![alice.clone(), bob.clone()])
            .await
            .expect("start simulator");
        (sim, alice, bob)
    }

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("JSON body")
        }
    }

    async fn send(
        client: &TestClient,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        let mut req = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Empty::new()).expect("request");
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    async fn get(client: &TestClient, uri: &str, headers: &[(&str, &str)]) -> Reply {
        send(client, Method::GET, uri, headers)
            .await
            .expect("answer")
    }

    fn verify_uri(sim: &IamSim) -> String {
        format!("{}/v3/auth/tokens?nocatalog=true", sim.url())
    }

    fn mfa_uri(sim: &IamSim, user_id: &str) -> String {
        format!(
            "{}/v3.0/OS-MFA/users/{user_id}/virtual-mfa-device",
            sim.url()
        )
    }

    fn lp_uri(sim: &IamSim, user_id: &str) -> String {
        format!("{}/v3.0/OS-USER/users/{user_id}/login-protect", sim.url())
    }

    fn self_verify(token: &str) -> [(&'static str, &str); 2] {
        [("x-auth-token", token), ("x-subject-token", token)]
    }

    fn err(code: &str, msg: &str) -> Value {
        json!({"error_msg": msg, "error_code": code})
    }

    #[test]
    fn timestamps_look_like_the_iam_ones() {
        let t = UNIX_EPOCH + Duration::from_micros(1_599_288_644_390_000);
        assert_eq!(iam_time(t), "2020-09-05T06:50:44.390000Z");
        assert_eq!(iam_time(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(iam_time(far), "9999-12-31T23:59:59.000000Z");
    }

    #[test]
    fn demo_users_are_as_documented() {
        let users = demo_users(Duration::from_secs(600));
        let names: Vec<_> = users.iter().map(|u| u.user_name.as_str()).collect();
        assert_eq!(names, ["alice", "bob", "carol"]);
        for u in &users {
            assert_eq!(u.user_id.len(), 32);
            assert!(u.user_id.chars().all(|c| c.is_ascii_hexdigit()));
            assert_eq!(u.domain_id, users[0].domain_id);
            let prefix = format!("demo-{}-", u.user_name);
            let suffix = u.token.strip_prefix(&prefix).expect("readable token");
            assert_eq!(suffix.len(), 16);
            assert!(u.expires_at > SystemTime::now());
        }
        assert!(users[0].mfa_device.is_some());
        assert_eq!(users[0].login_protect, Some((true, "vmfa".to_owned())));
        assert_eq!(users[0].methods, ["password", "totp"]);
        assert_eq!(users[1].mfa_device, None);
        assert_eq!(users[1].login_protect, Some((true, "sms".to_owned())));
        assert_eq!(users[1].methods, ["password"]);
        assert_eq!(users[2].mfa_device, None);
        assert_eq!(users[2].login_protect, None);
    }

    #[tokio::test]
    async fn verify_token_answers_like_the_iam() {
        let (sim, alice, _) = sim().await;
        let c = client();
        let r = get(&c, &verify_uri(&sim), &self_verify(&alice.token)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers["content-type"], "application/json;charset=UTF-8");
        assert_eq!(r.headers["x-subject-token"], "tok-alice");
        let body = r.json();
        let token = &body["token"];
        assert_eq!(token["methods"], json!(["password", "totp"]));
        assert_eq!(token["expires_at"], json!(iam_time(alice.expires_at)));
        let issued = token["issued_at"].as_str().expect("issued_at");
        assert_eq!(issued.len(), "2020-09-04T06:50:44.390000Z".len());
        assert!(issued.ends_with('Z'));
        assert_eq!(
            token["user"],
            json!({"domain": {"id": alice.domain_id, "name": "domain A"},
                   "id": alice.user_id, "name": "a1", "password_expires_at": ""})
        );
        assert_eq!(
            token["domain"],
            json!({"id": alice.domain_id, "name": "domain A"})
        );
        assert!(token["roles"].is_array());
        // Field order follows the IAM's own example.
        let text = std::str::from_utf8(&r.body).expect("utf-8");
        assert!(text.starts_with(r#"{"token":{"methods":["#), "{text}");
        assert_eq!(sim.calls(Api::VerifyToken), 1);
    }

    #[tokio::test]
    async fn verify_token_errors() {
        let (sim, alice, bob) = sim().await;
        let c = client();
        let uri = verify_uri(&sim);
        let unauth = err(
            "IAM.0001",
            "The request you have made requires authentication.",
        );

        let r = get(&c, &uri, &[("x-subject-token", "tok-alice")]).await;
        assert_eq!(
            (r.status, r.json()),
            (StatusCode::UNAUTHORIZED, unauth.clone())
        );

        let r = get(&c, &uri, &self_verify("no-such-token")).await;
        assert_eq!(
            (r.status, r.json()),
            (StatusCode::UNAUTHORIZED, unauth.clone())
        );

        let r = get(&c, &uri, &[("x-auth-token", "tok-alice")]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            r.json(),
            err("IAM.0009", "X-Subject-Token is invalid in the request.")
        );

        let secret = "secret-unknown-subject";
        let r = get(
            &c,
            &uri,
            &[("x-auth-token", "tok-alice"), ("x-subject-token", secret)],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json()["error_code"], "IAM.0004");
        let msg = r.json()["error_msg"].as_str().expect("msg").to_owned();
        assert!(msg.starts_with("Could not find token"), "{msg}");
        assert!(!String::from_utf8_lossy(&r.body).contains(secret));
        assert!(r.headers.get("x-subject-token").is_none());

        let r = get(
            &c,
            &uri,
            &[
                ("x-auth-token", "tok-alice"),
                ("x-subject-token", &bob.token),
            ],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.json()["error_code"], "IAM.0002");

        // Repeated X-Auth-Token is not authentication.
        let r = get(
            &c,
            &uri,
            &[
                ("x-auth-token", "tok-alice"),
                ("x-auth-token", "tok-alice"),
                ("x-subject-token", "tok-alice"),
            ],
        )
        .await;
        assert_eq!((r.status, r.json()), (StatusCode::UNAUTHORIZED, unauth));

        // Expired.
        sim.add_user(SimUser {
            token: "tok-old".to_owned(),
            expires_at: SystemTime::now() - Duration::from_secs(1),
            ..alice
        });
        let r = get(&c, &uri, &self_verify("tok-old")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.json(), err("IAM.0066", "The token has expired."));
        let r = get(
            &c,
            &uri,
            &[
                ("x-auth-token", "tok-alice"),
                ("x-subject-token", "tok-old"),
            ],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(sim.calls(Api::VerifyToken), 8);
    }

    #[tokio::test]
    async fn mfa_device_answers() {
        let (sim, alice, bob) = sim().await;
        let c = client();

        let r = get(
            &c,
            &mfa_uri(&sim, &alice.user_id),
            &[("x-auth-token", "tok-alice")],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers["content-type"], "application/json;charset=UTF-8");
        assert_eq!(
            r.json(),
            json!({"virtual_mfa_device": {"user_id": alice.user_id, "serial_number": "iam/mfa/a1"}})
        );

        let r = get(
            &c,
            &mfa_uri(&sim, &bob.user_id),
            &[("x-auth-token", "tok-bob")],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(
            r.json(),
            err("IAM.0004", "Could not find %(target)s: %(target_id)s.")
        );

        let r = get(
            &c,
            &mfa_uri(&sim, &bob.user_id),
            &[("x-auth-token", "tok-alice")],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(
            r.json(),
            err(
                "IAM.0002",
                "You are not authorized to perform the requested action."
            )
        );

        let r = get(&c, &mfa_uri(&sim, &alice.user_id), &[]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.json()["error_code"], "IAM.0001");

        let r = get(
            &c,
            &mfa_uri(&sim, &alice.user_id),
            &[("x-auth-token", "nope")],
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);

        sim.set_mfa_device(&bob.user_id, Some("iam:bob".to_owned()));
        let r = get(
            &c,
            &mfa_uri(&sim, &bob.user_id),
            &[("x-auth-token", "tok-bob")],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["virtual_mfa_device"]["serial_number"], "iam:bob");
        sim.set_mfa_device(&alice.user_id, None);
        let r = get(
            &c,
            &mfa_uri(&sim, &alice.user_id),
            &[("x-auth-token", "tok-alice")],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(sim.calls(Api::MfaDevice), 7);
        assert_eq!(sim.calls(Api::LoginProtect), 0);
    }

    #[tokio::test]
    async fn login_protect_answers() {
        let (sim, alice, bob) = sim().await;
        let c = client();

        let r = get(
            &c,
            &lp_uri(&sim, &alice.user_id),
            &[("x-auth-token", "tok-alice")],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.json(),
            json!({"login_protect": {"user_id": alice.user_id, "enabled": true, "verification_method": "vmfa"}})
        );

        let r = get(
            &c,
            &lp_uri(&sim, &bob.user_id),
            &[("x-auth-token", "tok-bob")],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        // Spelled exactly as on seed page 002.
        assert_eq!(
            r.json(),
            err("Iam.0004", "Could not find %(target)s: %(target_id)s.")
        );
        assert!(String::from_utf8_lossy(&r.body).contains("\"Iam.0004\""));

        let r = get(
            &c,
            &lp_uri(&sim, &alice.user_id),
            &[("x-auth-token", "tok-bob")],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.json()["error_code"], "IAM.0002");

        let r = get(&c, &lp_uri(&sim, &alice.user_id), &[]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);

        sim.set_login_protect(&bob.user_id, Some((false, "none".to_owned())));
        let r = get(
            &c,
            &lp_uri(&sim, &bob.user_id),
            &[("x-auth-token", "tok-bob")],
        )
        .await;
        assert_eq!(
            r.json(),
            json!({"login_protect": {"user_id": bob.user_id, "enabled": false, "verification_method": "none"}})
        );
        assert_eq!(sim.calls(Api::LoginProtect), 5);
    }

    #[tokio::test]
    async fn other_paths_and_methods() {
        let (sim, alice, _) = sim().await;
        let c = client();
        let r = get(&c, &format!("{}/v3/users", sim.url()), &[]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json()["error_code"], "APIG.0101");
        let r = get(
            &c,
            &format!("{}/v3.0/OS-MFA/users//virtual-mfa-device", sim.url()),
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);

        for uri in [
            verify_uri(&sim),
            mfa_uri(&sim, &alice.user_id),
            lp_uri(&sim, &alice.user_id),
        ] {
            let r = send(&c, Method::POST, &uri, &self_verify("tok-alice"))
                .await
                .expect("answer");
            assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{uri}");
            assert_eq!(r.headers["allow"], "GET");
            assert_eq!(r.json()["error_code"], "IAM.0007");
        }
        for api in Api::ALL {
            assert_eq!(sim.calls(api), 1, "{api:?}");
        }
    }

    #[tokio::test]
    async fn calls_and_tokens_are_recorded() {
        let (sim, alice, _) = sim().await;
        let c = client();
        get(&c, &verify_uri(&sim), &self_verify("tok-alice")).await;
        get(&c, &verify_uri(&sim), &self_verify("tok-unknown")).await;
        get(
            &c,
            &mfa_uri(&sim, &alice.user_id),
            &[("x-auth-token", "tok-alice")],
        )
        .await;
        assert_eq!(sim.calls(Api::VerifyToken), 2);
        assert_eq!(sim.calls(Api::MfaDevice), 1);
        assert_eq!(sim.calls(Api::LoginProtect), 0);
        assert_eq!(sim.seen_tokens(), ["tok-alice", "tok-unknown", "tok-alice"]);
        assert_eq!(sim.seen_subject_tokens(), ["tok-alice", "tok-unknown"]);
        sim.reset_calls();
        for api in Api::ALL {
            assert_eq!(sim.calls(api), 0);
        }
    }

    #[tokio::test]
    async fn revocation_and_replacement() {
        let (sim, alice, _) = sim().await;
        let c = client();
        assert_eq!(
            get(&c, &verify_uri(&sim), &self_verify("tok-alice"))
                .await
                .status,
            200
        );
        sim.remove_token("tok-alice");
        let r = get(&c, &verify_uri(&sim), &self_verify("tok-alice")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.json()["error_code"], "IAM.0001");
        let r = get(
            &c,
            &mfa_uri(&sim, &alice.user_id),
            &[("x-auth-token", "tok-alice")],
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);

        sim.add_user(SimUser {
            methods: vec!["password".to_owned()],
            ..alice.clone()
        });
        let r = get(&c, &verify_uri(&sim), &self_verify("tok-alice")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["token"]["methods"], json!(["password"]));
    }

    async fn faulted(
        sim: &IamSim,
        c: &TestClient,
        api: Api,
        alice: &SimUser,
    ) -> Result<Reply, String> {
        let uri = match api {
            Api::VerifyToken => verify_uri(sim),
            Api::MfaDevice => mfa_uri(sim, &alice.user_id),
            Api::LoginProtect => lp_uri(sim, &alice.user_id),
        };
        send(c, Method::GET, &uri, &self_verify(&alice.token)).await
    }

    #[tokio::test]
    async fn status_faults_carry_iam_bodies() {
        let (sim, alice, _) = sim().await;
        let c = client();
        let cases = [
            (
                500,
                "IAM.0006",
                Some("An unexpected error prevented the server from fulfilling your request."),
            ),
            (503, "IAM.0503", None),
            (
                403,
                "IAM.0002",
                Some("You are not authorized to perform the requested action."),
            ),
            (401, "IAM.0001", None),
            (429, "IAM.0012", None),
            (400, "IAM.0007", None),
        ];
        for api in Api::ALL {
            for (status, code, msg) in cases {
                sim.set_fault(Some(api), Some(Fault::Status(status)));
                let r = faulted(&sim, &c, api, &alice).await.expect("answer");
                assert_eq!(r.status.as_u16(), status, "{api:?}");
                assert_eq!(r.headers["content-type"], IAM_JSON);
                assert_eq!(r.json()["error_code"], code, "{api:?} {status}");
                if let Some(msg) = msg {
                    assert_eq!(r.json(), err(code, msg));
                }
            }
        }
        sim.set_fault(Some(Api::LoginProtect), Some(Fault::Status(404)));
        let r = faulted(&sim, &c, Api::LoginProtect, &alice)
            .await
            .expect("answer");
        assert_eq!(r.json()["error_code"], "Iam.0004");
        sim.set_fault(Some(Api::MfaDevice), Some(Fault::Status(99)));
        let r = faulted(&sim, &c, Api::MfaDevice, &alice)
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn faults_are_per_api_and_persist_until_cleared() {
        let (sim, alice, _) = sim().await;
        let c = client();
        sim.set_fault(Some(Api::MfaDevice), Some(Fault::Status(500)));
        for _ in 0..2 {
            assert_eq!(
                faulted(&sim, &c, Api::MfaDevice, &alice)
                    .await
                    .expect("a")
                    .status,
                500
            );
            assert_eq!(
                faulted(&sim, &c, Api::VerifyToken, &alice)
                    .await
                    .expect("a")
                    .status,
                200
            );
        }
        sim.set_fault(None, Some(Fault::Throttle));
        for api in Api::ALL {
            let r = faulted(&sim, &c, api, &alice).await.expect("answer");
            assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(
                r.json(),
                err(
                    "IAM.0012",
                    "The throttling threshold has been reached. Threshold: 10 times per 1 seconds"
                )
            );
        }
        sim.set_fault(Some(Api::VerifyToken), None);
        assert_eq!(
            faulted(&sim, &c, Api::VerifyToken, &alice)
                .await
                .expect("a")
                .status,
            200
        );
        assert_eq!(
            faulted(&sim, &c, Api::LoginProtect, &alice)
                .await
                .expect("a")
                .status,
            429
        );
        sim.set_fault(None, None);
        for api in Api::ALL {
            assert_eq!(faulted(&sim, &c, api, &alice).await.expect("a").status, 200);
        }
        // Faulted requests are counted too.
        assert_eq!(sim.calls(Api::MfaDevice), 2 + 1 + 1);
    }

    #[tokio::test]
    async fn latency_fault_delays_a_normal_answer() {
        let (sim, alice, _) = sim().await;
        let c = client();
        sim.set_fault(
            Some(Api::VerifyToken),
            Some(Fault::Latency(Duration::from_millis(300))),
        );
        let started = std::time::Instant::now();
        let r = faulted(&sim, &c, Api::VerifyToken, &alice)
            .await
            .expect("answer");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["token"]["user"]["id"], json!(alice.user_id));
        assert_eq!(sim.calls(Api::VerifyToken), 1);
    }

    #[tokio::test]
    async fn body_faults() {
        let (sim, alice, _) = sim().await;
        let c = client();
        for api in Api::ALL {
            sim.set_fault(Some(api), Some(Fault::Html));
            let r = faulted(&sim, &c, api, &alice).await.expect("answer");
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.headers["content-type"]
                .to_str()
                .expect("ct")
                .starts_with("text/html"));
            assert!(r.body.starts_with(b"<!DOCTYPE html>"));

            sim.set_fault(Some(api), Some(Fault::Garbage));
            let r = faulted(&sim, &c, api, &alice).await.expect("answer");
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.headers["content-type"], IAM_JSON);
            assert!(serde_json::from_slice::<Value>(&r.body).is_err());

            sim.set_fault(Some(api), Some(Fault::Huge));
            let r = faulted(&sim, &c, api, &alice).await.expect("answer");
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.body.len(), HUGE_BODY_BYTES);
            let body = r.json();
            assert!(body["padding"].as_str().expect("padding").len() > 1_000_000);
            let key = match api {
                Api::VerifyToken => "token",
                Api::MfaDevice => "virtual_mfa_device",
                Api::LoginProtect => "login_protect",
            };
            assert!(body[key].is_object(), "{api:?}");

            sim.set_fault(Some(api), Some(Fault::MissingFields));
            let r = faulted(&sim, &c, api, &alice).await.expect("answer");
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.json(), json!({ key: {} }));

            sim.set_fault(Some(api), Some(Fault::WrongTypes));
            let r = faulted(&sim, &c, api, &alice).await.expect("answer");
            assert_eq!(r.status, StatusCode::OK);
            let body = r.json();
            match api {
                Api::VerifyToken => {
                    assert_eq!(body["token"]["user"]["id"], json!(42));
                    assert!(body["token"]["methods"].is_string());
                }
                Api::MfaDevice => {
                    assert!(body[key]["serial_number"].is_number());
                    assert!(body[key]["user_id"].is_array());
                }
                Api::LoginProtect => {
                    assert_eq!(body[key]["enabled"], json!("yes"));
                    assert!(body[key]["verification_method"].is_number());
                }
            }
        }
    }

    #[tokio::test]
    async fn other_user_fault_answers_about_someone_else() {
        let (sim, alice, bob) = sim().await;
        let c = client();
        sim.set_fault(None, Some(Fault::OtherUser));
        let r = faulted(&sim, &c, Api::VerifyToken, &alice)
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["token"]["user"]["id"], json!(bob.user_id));

        // bob has no device and no login protection, yet "someone" has both.
        let r = faulted(&sim, &c, Api::MfaDevice, &bob)
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.json()["virtual_mfa_device"]["user_id"],
            json!(alice.user_id)
        );
        let r = faulted(&sim, &c, Api::LoginProtect, &bob)
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.json(),
            json!({"login_protect": {"user_id": alice.user_id, "enabled": true, "verification_method": "vmfa"}})
        );

        // Authentication still applies.
        let r = get(&c, &verify_uri(&sim), &self_verify("nope")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn truncated_fault_cuts_the_body() {
        let (sim, alice, _) = sim().await;
        let c = client();
        for api in Api::ALL {
            sim.set_fault(Some(api), Some(Fault::Truncated));
            let req = Request::get(match api {
                Api::VerifyToken => verify_uri(&sim),
                Api::MfaDevice => mfa_uri(&sim, &alice.user_id),
                Api::LoginProtect => lp_uri(&sim, &alice.user_id),
            })
            .header("x-auth-token", &alice.token)
            .header("x-subject-token", &alice.token)
            .body(Empty::new())
            .expect("request");
            let resp = c.request(req).await.expect("head arrives");
            assert_eq!(resp.status(), StatusCode::OK);
            let declared: usize = resp.headers()["content-length"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("number");
            assert!(declared > 20);
            assert!(resp.into_body().collect().await.is_err(), "{api:?}");
        }
    }

    #[tokio::test]
    async fn drop_fault_closes_without_an_answer() {
        let (sim, alice, _) = sim().await;
        let c = client();
        sim.set_fault(Some(Api::MfaDevice), Some(Fault::Drop));
        let r = faulted(&sim, &c, Api::MfaDevice, &alice).await;
        assert!(r.is_err(), "no answer expected");
        assert_eq!(sim.calls(Api::MfaDevice), 1);
        // The other APIs still answer.
        let r = faulted(&sim, &c, Api::VerifyToken, &alice)
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn malformed_requests_do_not_hurt_the_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (sim, _, _) = sim().await;
        for raw in [
            &b"GET /v3/auth/tokens HTTP/1.1\r\nHost: x\r\nX-Auth-Token: \xff\xfe\r\nX-Subject-Token: \xff\r\n\r\n"[..],
            b"GARBAGE\r\n\r\n",
            b"GET /v3.0/OS-MFA/users/%ff%00/virtual-mfa-device HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let mut s = TcpStream::connect(sim.addr()).await.expect("connect");
            s.write_all(raw).await.expect("write");
            let mut buf = vec![0; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
        }
        assert_eq!(sim.seen_tokens().len(), 1);
        let c = client();
        let r = get(&c, &verify_uri(&sim), &self_verify("tok-alice")).await;
        assert_eq!(r.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn shutdown_and_drop_stop_the_server() {
        let (first, _, _) = sim().await;
        let addr = first.addr();
        assert!(TcpStream::connect(addr).await.is_ok());
        first.shutdown();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());

        let (second, _, _) = sim().await;
        let addr = second.addr();
        let clone = second.clone();
        drop(second);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            TcpStream::connect(addr).await.is_ok(),
            "a clone keeps it alive"
        );
        drop(clone);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn keep_alive_and_url() {
        let (sim, _, _) = sim().await;
        assert_eq!(sim.url(), format!("http://127.0.0.1:{}", sim.addr().port()));
        assert_eq!(
            base_url(SocketAddr::from(([0, 0, 0, 0], 80))),
            "http://127.0.0.1:80"
        );
        assert_eq!(
            base_url("[::]:81".parse().expect("addr")),
            "http://[::1]:81"
        );
        let c = client();
        for _ in 0..5 {
            assert_eq!(
                get(&c, &verify_uri(&sim), &self_verify("tok-alice"))
                    .await
                    .status,
                200
            );
        }
    }
}
