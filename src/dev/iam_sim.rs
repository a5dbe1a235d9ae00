//! A fake Huawei Cloud IAM server for `mfa-gate dev` and the integration tests.
//!
//! It serves the three IAM v3 calls the `huawei` provider makes and the two IAM v5 calls of the
//! admin action (CONTRACT §5), answering them the way the API pages in `shared/seeds/` and
//! `shared/IAM.md` document — same paths, headers, status codes, JSON bodies and error codes,
//! down to the `Iam.0004` spelling of the login-protect page:
//!
//! | call | path |
//! |---|---|
//! | verify a token | `GET /v3/auth/tokens` (`X-Auth-Token` + `X-Subject-Token`) |
//! | MFA device | `GET /v3.0/OS-MFA/users/{user_id}/virtual-mfa-device` |
//! | login protection | `GET /v3.0/OS-USER/users/{user_id}/login-protect` |
//! | v5: list MFA devices | `GET /v5/mfa-devices?user_id=&limit=&marker=` (AK/SK signed) |
//! | v5: disable an MFA device | `POST /v5/mfa-devices/disable` `{"user_id","serial_number"}` (AK/SK signed) |
//!
//! The v5 calls take no token: every one must be signed with `SDK-HMAC-SHA256` under the
//! simulator's access key ([`V5_ACCESS_KEY`]/[`V5_SECRET_KEY`] unless
//! [`IamSim::set_v5_credentials`] changed them). The signature is recomputed from the request as
//! received; like the Huawei API gateway, a wrong signature, an unknown AK, an `X-Sdk-Date` more
//! than 15 minutes off or a missing/unexpected `X-Security-Token` is answered 401 `APIGW.0301`
//! ("Incorrect IAM authentication information: …"). Then, in this order: 403 `PAP5.0001` with an
//! `encoded_authorization_message` while [`IamSim::set_v5_deny`] is on; 400 `IAM.0007` for a
//! missing or invalid parameter (400 `PAP5.0010` for an invalid marker); 404 `IAM.0004` for an
//! unknown user or serial number. Every v5 error body is
//! `{"error_msg","error_code","request_id"}`, the request id also sent as `X-Request-Id`.
//!
//! Disabling a device removes it from the user: once a user's last device is disabled, the v3
//! `virtual-mfa-device` lookup answers 404 `IAM.0004` for them. A user may have several devices
//! ([`IamSim::add_mfa_device`]); the v3 lookup shows the first one. Listing pages through the
//! devices sorted by user id and serial number, with opaque base64 markers (the documented
//! alphabet `A-Za-z0-9+/=`); [`IamSim::set_v5_page_size`] makes pages smaller than `limit`, as
//! a real server may.
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

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::iam::aksk;

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

/// The access key id the v5 calls must be signed with, until [`IamSim::set_v5_credentials`].
/// Shaped like a real one (20 upper-case characters); it opens nothing anywhere else.
pub const V5_ACCESS_KEY: &str = "MFAGATESIMACCESSKEY0";
/// The secret key that goes with [`V5_ACCESS_KEY`].
pub const V5_SECRET_KEY: &str = "mfaGateSimulatorSecretKeyForDevUse000000";
/// Largest v5 request body read; the disable body is under 300 bytes.
const V5_MAX_BODY_BYTES: usize = 64 * 1024;
/// Seed page 004: `serial_number` "Maximum: 150".
const V5_MAX_SERIAL_CHARS: usize = 150;
/// `GET /v5/mfa-devices`: `limit` default and maximum.
const V5_DEFAULT_LIMIT: usize = 100;
const V5_MAX_LIMIT: usize = 200;
/// `marker`: 4 to 400 characters.
const V5_MARKER_CHARS: std::ops::RangeInclusive<usize> = 4..=400;

/// One of the IAM calls the simulator serves; faults and call counters are kept per API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// `GET /v3/auth/tokens`
    VerifyToken,
    /// `GET /v3.0/OS-MFA/users/{user_id}/virtual-mfa-device`
    MfaDevice,
    /// `GET /v3.0/OS-USER/users/{user_id}/login-protect`
    LoginProtect,
    /// `GET /v5/mfa-devices`
    V5ListMfaDevices,
    /// `POST /v5/mfa-devices/disable`
    V5DisableMfaDevice,
}

impl Api {
    /// Every API, for iterating in tests.
    pub const ALL: [Api; 5] = [
        Api::VerifyToken,
        Api::MfaDevice,
        Api::LoginProtect,
        Api::V5ListMfaDevices,
        Api::V5DisableMfaDevice,
    ];

    /// The `api` label value the gateway's metrics use for this call (CONTRACT §6).
    pub fn as_str(self) -> &'static str {
        match self {
            Api::VerifyToken => "verify_token",
            Api::MfaDevice => "mfa_device",
            Api::LoginProtect => "login_protect",
            Api::V5ListMfaDevices => "v5_list_mfa_devices",
            Api::V5DisableMfaDevice => "v5_disable_mfa_device",
        }
    }

    fn index(self) -> usize {
        match self {
            Api::VerifyToken => 0,
            Api::MfaDevice => 1,
            Api::LoginProtect => 2,
            Api::V5ListMfaDevices => 3,
            Api::V5DisableMfaDevice => 4,
        }
    }

    /// An IAM v5 call (AK/SK signed, error bodies with `request_id`).
    fn is_v5(self) -> bool {
        matches!(self, Api::V5ListMfaDevices | Api::V5DisableMfaDevice)
    }
}

/// A way for one API to misbehave. Set with [`IamSim::set_fault`]; it persists until cleared.
///
/// Each variant stands for something seen in front of real IAM endpoints, and each must end in
/// a defined gateway outcome (CONTRACT §1: an IAM failure is never "user has MFA").
///
/// On the v5 calls, error bodies also carry `request_id`. `POST /v5/mfa-devices/disable`
/// answers success with no body, so [`Fault::MissingFields`], [`Fault::WrongTypes`] and
/// [`Fault::OtherUser`] have nothing to reshape there and it is answered normally; faults that
/// replace the answer (`Status`, `Throttle`, `Html`, `Garbage`, `Drop`) disable nothing, those
/// that reshape it (`Huge`, `Truncated`) do disable the device.
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
    /// `{"virtual_mfa_device":{}}`, `{"login_protect":{}}`, `{"mfa_devices":[{}]}`).
    MissingFields,
    /// 200 with valid JSON whose fields have the wrong types (`"user":{"id":42}`,
    /// `"enabled":"yes"`, …).
    WrongTypes,
    /// 200, but about another user than the one asked: on verify, `token.user` is another
    /// user's; on the MFA calls, the answer claims the strongest MFA (a bound device; login
    /// protection `vmfa`) with another user's `user_id`; the v5 list shows one device of
    /// another user. Requests that would fail authentication or authorization still get their
    /// normal error.
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
    calls: [AtomicUsize; Api::ALL.len()],
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
    /// How the v5 calls authenticate, authorize and page.
    v5: V5Settings,
}

/// The v5 side of the simulated account.
struct V5Settings {
    /// The one access key pair the simulated IAM knows.
    access_key: String,
    secret_key: String,
    /// `Some`: the key pair is temporary and every call must carry this `X-Security-Token`;
    /// `None`: permanent, and a call carrying a security token is refused.
    security_token: Option<String>,
    /// Every v5 call answered 403 `PAP5.0001` (an identity policy denies the action).
    deny: bool,
    /// Largest page the list answers, whatever the `limit`; `None`: `limit`.
    page_size: Option<usize>,
}

impl Default for V5Settings {
    fn default() -> Self {
        V5Settings {
            access_key: V5_ACCESS_KEY.to_owned(),
            secret_key: V5_SECRET_KEY.to_owned(),
            security_token: None,
            deny: false,
            page_size: None,
        }
    }
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
    /// Serial numbers of the bound virtual MFA devices, in binding order; the v3 lookup shows
    /// the first.
    mfa_devices: Vec<String>,
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
                mfa_devices: user.mfa_device.into_iter().collect(),
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

    /// Binds (`Some(serial_number)`) or unbinds (`None`) the user's virtual MFA device; any
    /// other device of the user is unbound. Unknown user ids are ignored.
    pub fn set_mfa_device(&self, user_id: &str, serial: Option<String>) {
        if let Some(user) = self.shared.state().users.get_mut(user_id) {
            user.mfa_devices = serial.into_iter().collect();
        }
    }

    /// Binds one more virtual MFA device to the user (listed by IAM v5; the v3 lookup keeps
    /// showing the first). A serial number already bound to the user, or an unknown user id,
    /// is ignored.
    pub fn add_mfa_device(&self, user_id: &str, serial: &str) {
        if let Some(user) = self.shared.state().users.get_mut(user_id) {
            if !user.mfa_devices.iter().any(|s| s == serial) {
                user.mfa_devices.push(serial.to_owned());
            }
        }
    }

    /// The serial numbers of the user's devices, in binding order (empty for an unknown user).
    pub fn mfa_devices(&self, user_id: &str) -> Vec<String> {
        self.shared
            .state()
            .users
            .get(user_id)
            .map(|user| user.mfa_devices.clone())
            .unwrap_or_default()
    }

    /// Replaces the access key pair the v5 calls must be signed with (permanent credentials:
    /// any security token is dropped).
    pub fn set_v5_credentials(&self, access_key: &str, secret_key: &str) {
        let mut state = self.shared.state();
        state.v5.access_key = access_key.to_owned();
        state.v5.secret_key = secret_key.to_owned();
        state.v5.security_token = None;
    }

    /// Makes the key pair temporary (`Some`): every v5 call must then carry this
    /// `X-Security-Token`, signed. `None`: permanent again.
    pub fn set_v5_security_token(&self, token: Option<&str>) {
        self.shared.state().v5.security_token = token.map(str::to_owned);
    }

    /// While on, every correctly signed v5 call is answered 403 `PAP5.0001` with an
    /// `encoded_authorization_message`, as when no identity policy allows the action.
    pub fn set_v5_deny(&self, deny: bool) {
        self.shared.state().v5.deny = deny;
    }

    /// Caps the number of devices per list page below `limit` (`None`: `limit` alone decides).
    /// A cap of 0 counts as 1.
    pub fn set_v5_page_size(&self, size: Option<usize>) {
        self.shared.state().v5.page_size = size.map(|size| size.max(1));
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
    V5ListMfaDevices,
    V5DisableMfaDevice,
    Unknown,
}

impl Route {
    fn parse(path: &str) -> Route {
        match path {
            "/v3/auth/tokens" => return Route::VerifyToken,
            "/v5/mfa-devices" => return Route::V5ListMfaDevices,
            "/v5/mfa-devices/disable" => return Route::V5DisableMfaDevice,
            _ => {}
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
            Route::V5ListMfaDevices => Some(Api::V5ListMfaDevices),
            Route::V5DisableMfaDevice => Some(Api::V5DisableMfaDevice),
            Route::Unknown => None,
        }
    }

    /// The one method the call takes; `None` for a path no API serves.
    fn method(&self) -> Option<Method> {
        match self {
            Route::V5DisableMfaDevice => Some(Method::POST),
            Route::Unknown => None,
            _ => Some(Method::GET),
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
/// A method other than the call's own on one of the API paths (Keystone's wording).
const METHOD_NOT_ALLOWED: IamError = IamError {
    status: StatusCode::METHOD_NOT_ALLOWED,
    code: "IAM.0007",
    msg: "The method is not allowed for the requested URL.",
};

/// An error answer of a v5 call: like [`IamError`], with a message that may name the parameter
/// or resource, and the `encoded_authorization_message` of a denial.
struct V5Error {
    status: StatusCode,
    code: &'static str,
    msg: String,
    encoded_authorization_message: Option<String>,
}

impl V5Error {
    fn new(status: StatusCode, code: &'static str, msg: impl Into<String>) -> V5Error {
        V5Error {
            status,
            code,
            msg: msg.into(),
            encoded_authorization_message: None,
        }
    }

    /// 401 from the API gateway in front of the IAM (its documented messages).
    fn unauthenticated(detail: &str) -> V5Error {
        V5Error::new(
            StatusCode::UNAUTHORIZED,
            "APIGW.0301",
            format!("Incorrect IAM authentication information: {detail}"),
        )
    }

    fn invalid_parameter(detail: &str) -> V5Error {
        V5Error::new(
            StatusCode::BAD_REQUEST,
            "IAM.0007",
            format!("invalid parameter: {detail}"),
        )
    }

    fn not_found(what: &str, id: &str) -> V5Error {
        V5Error::new(
            StatusCode::NOT_FOUND,
            "IAM.0004",
            format!("could not find {what}: {id}"),
        )
    }

    /// The 403 of the IAM v5 error-code page, with an opaque (here: base64 JSON, not
    /// encrypted) `encoded_authorization_message` naming the action.
    fn denied(action: &str) -> V5Error {
        let detail = json!({"action": action, "effect": "deny"}).to_string();
        V5Error {
            status: StatusCode::FORBIDDEN,
            code: "PAP5.0001",
            msg: format!(
                "access denied: no identity policy allows {action} on the requested resource"
            ),
            encoded_authorization_message: Some(base64_encode(detail.as_bytes())),
        }
    }
}

impl From<IamError> for V5Error {
    fn from(err: IamError) -> V5Error {
        V5Error::new(err.status, err.code, err.msg)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error_msg: &'a str,
    error_code: &'a str,
}

/// The v5 error body (IAM v5 "Error Codes" page).
#[derive(Serialize)]
struct V5ErrorBody<'a> {
    error_msg: &'a str,
    error_code: &'a str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoded_authorization_message: Option<&'a str>,
}

/// `GET /v5/mfa-devices` 200 body.
#[derive(Serialize)]
struct V5ListBody<'a> {
    mfa_devices: Vec<V5Device<'a>>,
    page_info: V5PageInfo,
}

#[derive(Serialize)]
struct V5Device<'a> {
    serial_number: &'a str,
    user_id: &'a str,
    enabled: bool,
}

#[derive(Serialize)]
struct V5PageInfo {
    /// Present only when more devices follow.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_marker: Option<String>,
    current_count: usize,
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
    /// Sent as `X-Request-Id` (v5 answers, whose error bodies carry the same id); `None`: a
    /// fresh one.
    request_id: Option<String>,
    /// `Allow` of a 405.
    allow: Option<&'static str>,
}

impl Answer {
    fn ok<T: Serialize>(body: &T) -> Answer {
        match serde_json::to_string(body) {
            Ok(body) => Answer {
                status: StatusCode::OK,
                body,
                subject_token: None,
                request_id: None,
                allow: None,
            },
            Err(_) => Answer::error(INTERNAL),
        }
    }

    fn error(err: IamError) -> Answer {
        Answer {
            status: err.status,
            body: error_body(err.code, err.msg),
            subject_token: None,
            request_id: None,
            allow: None,
        }
    }

    /// A v5 answer: the error body with `request_id`, the same id in `X-Request-Id`.
    fn v5(result: Result<Answer, V5Error>) -> Answer {
        let request_id = iam_id();
        let mut answer = match result {
            Ok(answer) => answer,
            Err(err) => {
                let body = V5ErrorBody {
                    error_msg: &err.msg,
                    error_code: err.code,
                    request_id: &request_id,
                    encoded_authorization_message: err.encoded_authorization_message.as_deref(),
                };
                Answer {
                    status: err.status,
                    // Serialising strings cannot fail; the fallback keeps this panic-free.
                    body: serde_json::to_string(&body).unwrap_or_default(),
                    subject_token: None,
                    request_id: None,
                    allow: None,
                }
            }
        };
        answer.request_id = Some(request_id);
        answer
    }

    /// The error body of `err` in the shape of `api`'s answers (v5 bodies carry `request_id`).
    fn error_for(api: Option<Api>, err: IamError) -> Answer {
        if api.is_some_and(Api::is_v5) {
            Answer::v5(Err(err.into()))
        } else {
            Answer::error(err)
        }
    }

    /// 200 without a body (`POST /v5/mfa-devices/disable`).
    fn empty() -> Answer {
        Answer {
            status: StatusCode::OK,
            body: String::new(),
            subject_token: None,
            request_id: None,
            allow: None,
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
        (Some(Fault::Throttle), _) => return json_response(&Answer::error_for(api, THROTTLED)),
        (Some(Fault::Html), _) => return html_page(),
        (Some(Fault::Garbage), _) => return garbage(),
        // The disable's success has no body to reshape (see [`Fault`]).
        (Some(Fault::MissingFields | Fault::WrongTypes), Some(Api::V5DisableMfaDevice)) => {}
        (Some(Fault::MissingFields), Some(api)) => return missing_fields(api),
        (Some(Fault::WrongTypes), Some(api)) => return wrong_types(api, &route),
        _ => {}
    }

    let other_user = matches!(fault, Some(Fault::OtherUser));
    let (parts, body) = req.into_parts();
    let answer = match route.method() {
        Some(method) if method != parts.method => {
            let mut answer = Answer::error_for(api, METHOD_NOT_ALLOWED);
            answer.allow = Some(if method == Method::POST {
                "POST"
            } else {
                "GET"
            });
            answer
        }
        _ => match &route {
            Route::V5ListMfaDevices | Route::V5DisableMfaDevice => {
                let body = Limited::new(body, V5_MAX_BODY_BYTES).collect().await;
                Answer::v5(match body {
                    Ok(body) => v5_call(shared, &route, &parts, &body.to_bytes(), other_user),
                    Err(_) => Err(V5Error::invalid_parameter(
                        "the request body could not be read or is too large",
                    )),
                })
            }
            _ => {
                let state = shared.state();
                let now = SystemTime::now();
                match &route {
                    Route::VerifyToken => verify_token(&state, &parts.headers, now, other_user),
                    Route::MfaDevice(user_id) => {
                        mfa_device(&state, &parts.headers, now, user_id, other_user)
                    }
                    Route::LoginProtect(user_id) => {
                        login_protect(&state, &parts.headers, now, user_id, other_user)
                    }
                    _ => Answer::error(NO_SUCH_API),
                }
            }
        },
    };

    match fault {
        Some(Fault::Huge) => huge(answer),
        Some(Fault::Truncated) => truncated(answer),
        _ => json_response(&answer),
    }
}

/// A v5 call: the signature first (401), then the deny switch (403), then the call itself.
fn v5_call(
    shared: &Shared,
    route: &Route,
    parts: &http::request::Parts,
    body: &[u8],
    other_user: bool,
) -> Result<Answer, V5Error> {
    let mut state = shared.state();
    check_signature(&state.v5, parts, body, SystemTime::now())?;
    let action = match route {
        Route::V5DisableMfaDevice => "iam:mfa:disableV5",
        _ => "iam:mfa:listMFADevicesV5",
    };
    if state.v5.deny {
        return Err(V5Error::denied(action));
    }
    match route {
        Route::V5DisableMfaDevice => v5_disable(&mut state, body),
        _ => v5_list(&state, parts.uri.query().unwrap_or(""), other_user),
    }
}

/// Verifies the `SDK-HMAC-SHA256` signature of a v5 call as the API gateway does: the AK must
/// be the simulator's, `X-Sdk-Date` within [`aksk::MAX_CLOCK_SKEW`], `host` and `x-sdk-date`
/// (and `x-security-token` when sent) among the signed headers, the security token the one of
/// temporary credentials (none for permanent ones), and the signature the one recomputed from
/// the request as received.
fn check_signature(
    v5: &V5Settings,
    parts: &http::request::Parts,
    body: &[u8],
    now: SystemTime,
) -> Result<(), V5Error> {
    const SIGNATURE_FAIL: &str = "verify aksk signature fail";
    let headers = &parts.headers;
    let authorization = single(headers, &header::AUTHORIZATION)
        .and_then(aksk::Authorization::parse)
        .ok_or_else(|| {
            V5Error::unauthenticated("the Authorization header is missing or malformed")
        })?;
    if authorization.access != v5.access_key {
        return Err(V5Error::unauthenticated(
            "Get secretKey failed,ak:******,err:ak not exist",
        ));
    }
    let date = single(headers, &aksk::X_SDK_DATE)
        .ok_or_else(|| V5Error::unauthenticated("x-sdk-date is missing"))?;
    let signed_at = aksk::parse_sdk_date(date)
        .ok_or_else(|| V5Error::unauthenticated("x-sdk-date is invalid"))?;
    let skew = match now.duration_since(signed_at) {
        Ok(behind) => behind,
        Err(ahead) => ahead.duration(),
    };
    if skew > aksk::MAX_CLOCK_SKEW {
        return Err(V5Error::unauthenticated(
            "x-sdk-date is more than 15 minutes away from the server time",
        ));
    }
    let signed = authorization.signed_header_names();
    let sent_token = headers.contains_key(aksk::X_SECURITY_TOKEN);
    let required_signed = ["host", "x-sdk-date"]
        .into_iter()
        .chain(sent_token.then_some("x-security-token"));
    for required in required_signed {
        if !signed
            .iter()
            .any(|name| name.eq_ignore_ascii_case(required))
        {
            return Err(V5Error::unauthenticated(SIGNATURE_FAIL));
        }
    }
    let token_ok = match (&v5.security_token, single(headers, &aksk::X_SECURITY_TOKEN)) {
        (None, None) => !sent_token,
        (Some(expected), Some(sent)) => expected == sent,
        _ => false,
    };
    if !token_ok {
        return Err(V5Error::unauthenticated(
            "the security token is missing, invalid or not for this access key",
        ));
    }
    // HTTP/2 carries the host in the URI, not in a `Host` header.
    let mut headers = headers.clone();
    if !headers.contains_key(header::HOST) {
        if let Some(value) = parts
            .uri
            .authority()
            .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
        {
            headers.insert(header::HOST, value);
        }
    }
    let canonical = aksk::canonical_request(&parts.method, &parts.uri, &headers, &signed, body)
        .map_err(|_| V5Error::unauthenticated(SIGNATURE_FAIL))?;
    let to_sign = aksk::string_to_sign(date, &canonical);
    if !aksk::verify_signature(&v5.secret_key, &to_sign, &authorization.signature) {
        return Err(V5Error::unauthenticated(SIGNATURE_FAIL));
    }
    Ok(())
}

/// `GET /v5/mfa-devices` ("Listing All Virtual MFA Devices"): every device of `user_id` (of
/// the account without it), sorted by user id and serial number, one page from `marker` on.
fn v5_list(state: &State, query: &str, other_user: bool) -> Result<Answer, V5Error> {
    let pairs = aksk::query_pairs(query)
        .ok_or_else(|| V5Error::invalid_parameter("the query string is not valid"))?;
    let (mut user_id, mut limit, mut marker) = (None, V5_DEFAULT_LIMIT, None);
    for (name, value) in pairs {
        match name.as_str() {
            "user_id" => user_id = Some(value),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=V5_MAX_LIMIT).contains(limit))
                    .ok_or_else(|| {
                        V5Error::invalid_parameter("limit must be an integer from 1 to 200")
                    })?;
            }
            "marker" => marker = Some(value),
            _ => {}
        }
    }
    if let Some(user_id) = &user_id {
        if user_id.is_empty() {
            return Err(V5Error::invalid_parameter("user_id must not be empty"));
        }
        if !state.users.contains_key(user_id) {
            return Err(V5Error::not_found("user", user_id));
        }
    }
    if other_user {
        // One device that is somebody else's, whatever was asked.
        let asked = user_id.as_deref().unwrap_or("");
        let other = other_user_of(state, asked);
        let serial = format!("iam/mfa/{other}");
        return Ok(Answer::ok(&V5ListBody {
            mfa_devices: vec![V5Device {
                serial_number: &serial,
                user_id: &other,
                enabled: true,
            }],
            page_info: V5PageInfo {
                next_marker: None,
                current_count: 1,
            },
        }));
    }
    let mut devices: Vec<(&str, &str)> = state
        .users
        .iter()
        .filter(|(id, _)| {
            user_id
                .as_deref()
                .is_none_or(|wanted| wanted == id.as_str())
        })
        .flat_map(|(id, user)| {
            user.mfa_devices
                .iter()
                .map(move |serial| (id.as_str(), serial.as_str()))
        })
        .collect();
    devices.sort_unstable();
    let start = match marker {
        None => 0,
        Some(marker) => {
            let (after_user, after_serial) = decode_marker(&marker).ok_or_else(|| {
                V5Error::new(StatusCode::BAD_REQUEST, "PAP5.0010", "invalid marker")
            })?;
            devices
                .partition_point(|&device| device <= (after_user.as_str(), after_serial.as_str()))
        }
    };
    let page_size = limit.min(state.v5.page_size.unwrap_or(usize::MAX));
    let end = start.saturating_add(page_size).min(devices.len());
    let page = &devices[start..end];
    let next_marker = match page.last() {
        Some(&(user, serial)) if end < devices.len() => Some(encode_marker(user, serial)),
        _ => None,
    };
    Ok(Answer::ok(&V5ListBody {
        mfa_devices: page
            .iter()
            .map(|&(user_id, serial_number)| V5Device {
                serial_number,
                user_id,
                enabled: true,
            })
            .collect(),
        page_info: V5PageInfo {
            next_marker,
            current_count: page.len(),
        },
    }))
}

/// `POST /v5/mfa-devices/disable` (seed page 004): unbinds the device from the user.
fn v5_disable(state: &mut State, body: &[u8]) -> Result<Answer, V5Error> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|_| V5Error::invalid_parameter("the request body is not a JSON object"))?;
    let field = |name: &str| match body.get(name) {
        Some(Value::String(value)) if !value.is_empty() => Ok(value.as_str()),
        Some(_) => Err(V5Error::invalid_parameter(&format!(
            "{name} must be a non-empty string"
        ))),
        None => Err(V5Error::invalid_parameter(&format!("{name} is required"))),
    };
    let user_id = field("user_id")?;
    let serial = field("serial_number")?;
    if serial.chars().count() > V5_MAX_SERIAL_CHARS {
        return Err(V5Error::invalid_parameter(&format!(
            "serial_number is longer than {V5_MAX_SERIAL_CHARS} characters"
        )));
    }
    let user = state
        .users
        .get_mut(user_id)
        .ok_or_else(|| V5Error::not_found("user", user_id))?;
    let position = user
        .mfa_devices
        .iter()
        .position(|bound| bound == serial)
        .ok_or_else(|| V5Error::not_found("mfa device", serial))?;
    user.mfa_devices.remove(position);
    Ok(Answer::empty())
}

/// The `next_marker` after a device: base64 of `user_id \n serial_number`.
fn encode_marker(user_id: &str, serial: &str) -> String {
    base64_encode(format!("{user_id}\n{serial}").as_bytes())
}

/// The device a marker points after; `None` when it is not one of ours or breaks the
/// documented shape (4 to 400 characters of `A-Za-z0-9+/=-_`).
fn decode_marker(marker: &str) -> Option<(String, String)> {
    let shape_ok = V5_MARKER_CHARS.contains(&marker.len())
        && marker
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'));
    if !shape_ok {
        return None;
    }
    let text = String::from_utf8(base64_decode(marker)?).ok()?;
    let (user_id, serial) = text.split_once('\n')?;
    Some((user_id.to_owned(), serial.to_owned()))
}

/// Standard base64 with padding (RFC 4648 §4), the alphabet the v5 markers are documented with.
fn base64_encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The inverse of [`base64_encode`]; `None` for anything it would not write.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    STANDARD.decode(text).ok()
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
            .and_then(|u| u.mfa_devices.first().cloned())
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
        .and_then(|u| u.mfa_devices.first().map(String::as_str))
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
    let headers = response.headers_mut();
    if let Some(value) = answer
        .subject_token
        .as_deref()
        .and_then(|token| HeaderValue::from_str(token).ok())
    {
        headers.insert(X_SUBJECT_TOKEN, value);
    }
    if let Some(value) = answer
        .request_id
        .as_deref()
        .and_then(|id| HeaderValue::from_str(id).ok())
    {
        headers.insert(X_REQUEST_ID, value);
    }
    if let Some(allow) = answer.allow {
        headers.insert(header::ALLOW, HeaderValue::from_static(allow));
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
    let mut answer = Answer::error_for(Some(api), err);
    answer.status = status;
    json_response(&answer)
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
        Api::V5ListMfaDevices => json!({"mfa_devices": [{}]}),
        // Answered normally instead (see [`Fault`]); an empty object if it ever gets here.
        Api::V5DisableMfaDevice => json!({}),
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
        (Api::V5ListMfaDevices, _) => json!({
            "mfa_devices": [{"serial_number": 42, "user_id": {"id": 42}, "enabled": "yes"}],
            "page_info": {"next_marker": 42, "current_count": "1"},
        }),
        // Answered normally instead (see [`Fault`]); a list if it ever gets here.
        (Api::V5DisableMfaDevice, _) => json!([]),
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
///
/// An answer without a body (the v5 disable) is promised as `{}`, of which `{` is sent.
fn truncated(answer: Answer) -> Response<Body> {
    let whole = if answer.body.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        Bytes::from(answer.body)
    };
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
        for (api, method, path, allow) in [
            (
                Api::V5ListMfaDevices,
                Method::POST,
                "/v5/mfa-devices",
                "GET",
            ),
            (
                Api::V5DisableMfaDevice,
                Method::GET,
                "/v5/mfa-devices/disable",
                "POST",
            ),
        ] {
            let r = send(&c, method, &format!("{}{path}", sim.url()), &[])
                .await
                .expect("answer");
            assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
            assert_eq!(r.headers["allow"], allow);
            assert_eq!(
                without_request_id(api, &r),
                err(
                    "IAM.0007",
                    "The method is not allowed for the requested URL."
                )
            );
        }
        let r = get(&c, &format!("{}/v5/mfa-devices/", sim.url()), &[]).await;
        assert_eq!(r.json()["error_code"], "APIG.0101");
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

    /// A normal call of `api` by (or, for v5, about) alice: v5 calls are signed, the disable
    /// asks for her first device.
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
            Api::V5ListMfaDevices => return send_v5(&list_request(sim, &alice.user_id)).await,
            Api::V5DisableMfaDevice => {
                let serial = alice.mfa_device.as_deref().unwrap_or("none");
                return send_v5(&disable_request(sim, &alice.user_id, serial)).await;
            }
        };
        send(c, Method::GET, &uri, &self_verify(&alice.token)).await
    }

    /// The v3 APIs, for the tests whose requests are v3-shaped.
    const V3: [Api; 3] = [Api::VerifyToken, Api::MfaDevice, Api::LoginProtect];

    /// A change made to a request after it was signed.
    type Tamper<'a> = Box<dyn FnOnce(&mut Request<Full<Bytes>>) + 'a>;

    /// A v5 request before signing.
    struct V5Request {
        method: Method,
        uri: String,
        body: Bytes,
    }

    fn list_request(sim: &IamSim, user_id: &str) -> V5Request {
        V5Request {
            method: Method::GET,
            uri: format!(
                "{}/v5/mfa-devices?{}",
                sim.url(),
                aksk::query_string(&[("user_id", user_id)])
            ),
            body: Bytes::new(),
        }
    }

    fn disable_request(sim: &IamSim, user_id: &str, serial: &str) -> V5Request {
        V5Request {
            method: Method::POST,
            uri: format!("{}/v5/mfa-devices/disable", sim.url()),
            body: Bytes::from(json!({"user_id": user_id, "serial_number": serial}).to_string()),
        }
    }

    fn sim_credentials() -> aksk::AkSk {
        aksk::AkSk::new(V5_ACCESS_KEY, V5_SECRET_KEY).expect("credentials")
    }

    /// Signs with the simulator's default credentials, now, and sends.
    async fn send_v5(request: &V5Request) -> Result<Reply, String> {
        send_signed(request, &sim_credentials(), SystemTime::now(), |_| {}).await
    }

    /// Signs `request` with `credentials` as of `at`, lets `tamper` change the signed request,
    /// and sends it.
    async fn send_signed(
        request: &V5Request,
        credentials: &aksk::AkSk,
        at: SystemTime,
        tamper: impl FnOnce(&mut Request<Full<Bytes>>),
    ) -> Result<Reply, String> {
        let mut req = Request::builder()
            .method(request.method.clone())
            .uri(&request.uri);
        if !request.body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let mut req = req.body(Full::new(request.body.clone())).expect("request");
        credentials.sign(&mut req, &request.body, at).expect("sign");
        tamper(&mut req);
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
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

    /// The body without its `request_id`, after checking that the id is a fresh 32-hex one
    /// matching `X-Request-Id` (v5 answers); v3 bodies are returned as they are.
    fn without_request_id(api: Api, reply: &Reply) -> Value {
        let mut body = reply.json();
        if api.is_v5() {
            let id = body
                .as_object_mut()
                .and_then(|body| body.remove("request_id"))
                .expect("v5 error bodies carry request_id");
            let id = id.as_str().expect("request_id is a string");
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
            assert_eq!(reply.headers["x-request-id"], id);
        }
        body
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
                let body = without_request_id(api, &r);
                if let Some(msg) = msg {
                    assert_eq!(body, err(code, msg));
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
                without_request_id(api, &r),
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
        for api in V3 {
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
                _ => "login_protect",
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
                _ => {
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
        for api in V3 {
            sim.set_fault(Some(api), Some(Fault::Truncated));
            let req = Request::get(match api {
                Api::VerifyToken => verify_uri(&sim),
                Api::MfaDevice => mfa_uri(&sim, &alice.user_id),
                _ => lp_uri(&sim, &alice.user_id),
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

    #[test]
    fn base64_round_trips() {
        for (raw, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(raw.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).expect(encoded), raw.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).expect("all"), all);
        for bad in ["Zg", "Zg=a", "Z===", "Zg==Zg==", "Z!==", "Zm9v-A=="] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
        assert_eq!(
            decode_marker(&encode_marker("u1", "iam::a:mfa:x")),
            Some(("u1".to_owned(), "iam::a:mfa:x".to_owned()))
        );
        for bad in ["abc", "Zm9vYmFy", "not base64!", &"A".repeat(404)] {
            assert_eq!(decode_marker(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn v5_list_pages_through_the_devices() {
        let (sim, alice, bob) = sim().await;
        for serial in ["iam::acc:mfa:b", "iam::acc:mfa:a?+/", "iam:zz"] {
            sim.add_mfa_device(&alice.user_id, serial);
        }
        sim.add_mfa_device(&alice.user_id, "iam::acc:mfa:b");
        assert_eq!(sim.mfa_devices(&alice.user_id).len(), 4);
        sim.set_mfa_device(&bob.user_id, Some("iam/mfa/b2".to_owned()));

        let r = send_v5(&list_request(&sim, &alice.user_id))
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.headers["content-type"], IAM_JSON);
        assert_eq!(
            r.json(),
            json!({"mfa_devices": [
                {"serial_number": "iam/mfa/a1", "user_id": alice.user_id, "enabled": true},
                {"serial_number": "iam::acc:mfa:a?+/", "user_id": alice.user_id, "enabled": true},
                {"serial_number": "iam::acc:mfa:b", "user_id": alice.user_id, "enabled": true},
                {"serial_number": "iam:zz", "user_id": alice.user_id, "enabled": true},
            ], "page_info": {"current_count": 4}})
        );

        // Pages of `limit`, each marker leading to the next.
        let mut seen = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut params = vec![("user_id", alice.user_id.as_str()), ("limit", "3")];
            if let Some(marker) = &marker {
                params.push(("marker", marker));
            }
            let request = V5Request {
                method: Method::GET,
                uri: format!(
                    "{}/v5/mfa-devices?{}",
                    sim.url(),
                    aksk::query_string(&params)
                ),
                body: Bytes::new(),
            };
            let body = send_v5(&request).await.expect("answer").json();
            let devices = body["mfa_devices"].as_array().expect("list").clone();
            assert_eq!(body["page_info"]["current_count"], json!(devices.len()));
            seen.extend(devices.iter().map(|d| d["serial_number"].clone()));
            match body["page_info"]["next_marker"].as_str() {
                Some(next) => {
                    assert!(next
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)));
                    marker = Some(next.to_owned());
                }
                None => break,
            }
        }
        assert_eq!(seen.len(), 4);
        assert_eq!(sim.calls(Api::V5ListMfaDevices), 3);

        // The page-size cap wins over `limit`.
        sim.set_v5_page_size(Some(1));
        let body = send_v5(&list_request(&sim, &alice.user_id))
            .await
            .expect("answer")
            .json();
        assert_eq!(body["page_info"]["current_count"], 1);
        assert!(body["page_info"]["next_marker"].is_string());
        sim.set_v5_page_size(None);

        // Without user_id: the whole account.
        let all = V5Request {
            method: Method::GET,
            uri: format!("{}/v5/mfa-devices", sim.url()),
            body: Bytes::new(),
        };
        let body = send_v5(&all).await.expect("answer").json();
        assert_eq!(body["page_info"]["current_count"], 5);
    }

    #[tokio::test]
    async fn v5_list_errors() {
        let (sim, alice, _) = sim().await;
        let query = |q: &str| V5Request {
            method: Method::GET,
            uri: format!("{}/v5/mfa-devices?{q}", sim.url()),
            body: Bytes::new(),
        };
        let user = format!("user_id={}", alice.user_id);
        for (q, status, code) in [
            ("user_id=".to_owned(), 400, "IAM.0007"),
            (format!("{user}&limit=0"), 400, "IAM.0007"),
            (format!("{user}&limit=201"), 400, "IAM.0007"),
            (format!("{user}&limit=ten"), 400, "IAM.0007"),
            (format!("{user}&marker=abc"), 400, "PAP5.0010"),
            (format!("{user}&marker=Zm9vYmFy"), 400, "PAP5.0010"),
            (format!("{user}&marker=%21%21%21%21"), 400, "PAP5.0010"),
            ("user_id=%ff".to_owned(), 400, "IAM.0007"),
            ("user_id=nobody".to_owned(), 404, "IAM.0004"),
        ] {
            let r = send_v5(&query(&q)).await.expect("answer");
            assert_eq!(r.status.as_u16(), status, "{q}");
            let body = without_request_id(Api::V5ListMfaDevices, &r);
            assert_eq!(body["error_code"], code, "{q}");
            assert!(body["error_msg"].is_string());
        }
        let r = send_v5(&query("user_id=nobody")).await.expect("answer");
        assert_eq!(
            without_request_id(Api::V5ListMfaDevices, &r),
            json!({"error_msg": "could not find user: nobody", "error_code": "IAM.0004"})
        );
        let r = send_v5(&query(&format!("{user}&limit=200")))
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn v5_disable_unbinds_the_device() {
        let (sim, alice, _) = sim().await;
        let c = client();
        sim.add_mfa_device(&alice.user_id, "iam::acc:mfa:spare");

        let r = send_v5(&disable_request(&sim, &alice.user_id, "iam/mfa/a1"))
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.is_empty());
        assert_eq!(sim.mfa_devices(&alice.user_id), ["iam::acc:mfa:spare"]);
        // The v3 lookup shows the remaining device…
        let v3 = [("x-auth-token", "tok-alice")];
        let r = get(&c, &mfa_uri(&sim, &alice.user_id), &v3).await;
        assert_eq!(
            r.json()["virtual_mfa_device"]["serial_number"],
            "iam::acc:mfa:spare"
        );
        // …and, once the last one is disabled, none.
        let r = send_v5(&disable_request(&sim, &alice.user_id, "iam::acc:mfa:spare"))
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::OK);
        let r = get(&c, &mfa_uri(&sim, &alice.user_id), &v3).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(
            r.json(),
            err("IAM.0004", "Could not find %(target)s: %(target_id)s.")
        );
        let body = send_v5(&list_request(&sim, &alice.user_id))
            .await
            .expect("answer")
            .json();
        assert_eq!(body["mfa_devices"], json!([]));
        assert_eq!(sim.calls(Api::V5DisableMfaDevice), 2);
    }

    #[tokio::test]
    async fn v5_disable_errors() {
        let (sim, alice, bob) = sim().await;
        let body = |text: &str| V5Request {
            method: Method::POST,
            uri: format!("{}/v5/mfa-devices/disable", sim.url()),
            body: Bytes::from(text.to_owned()),
        };
        let user = &alice.user_id;
        let long = "s".repeat(151);
        for (text, status, code, msg) in [
            (
                format!(r#"{{"user_id":"{user}"}}"#),
                400,
                "IAM.0007",
                "invalid parameter: serial_number is required",
            ),
            (
                r#"{"serial_number":"iam/mfa/a1"}"#.to_owned(),
                400,
                "IAM.0007",
                "invalid parameter: user_id is required",
            ),
            (
                format!(r#"{{"user_id":"{user}","serial_number":42}}"#),
                400,
                "IAM.0007",
                "invalid parameter: serial_number must be a non-empty string",
            ),
            (
                "not json".to_owned(),
                400,
                "IAM.0007",
                "invalid parameter: the request body is not a JSON object",
            ),
            (
                String::new(),
                400,
                "IAM.0007",
                "invalid parameter: the request body is not a JSON object",
            ),
            (
                format!(r#"{{"user_id":"{user}","serial_number":"{long}"}}"#),
                400,
                "IAM.0007",
                "invalid parameter: serial_number is longer than 150 characters",
            ),
            (
                r#"{"user_id":"nobody","serial_number":"iam/mfa/a1"}"#.to_owned(),
                404,
                "IAM.0004",
                "could not find user: nobody",
            ),
            (
                format!(r#"{{"user_id":"{user}","serial_number":"iam/mfa/other"}}"#),
                404,
                "IAM.0004",
                "could not find mfa device: iam/mfa/other",
            ),
            // Someone else's device is not this user's.
            (
                format!(
                    r#"{{"user_id":"{}","serial_number":"iam/mfa/a1"}}"#,
                    bob.user_id
                ),
                404,
                "IAM.0004",
                "could not find mfa device: iam/mfa/a1",
            ),
        ] {
            let r = send_v5(&body(&text)).await.expect("answer");
            assert_eq!(r.status.as_u16(), status, "{text}");
            assert_eq!(
                without_request_id(Api::V5DisableMfaDevice, &r),
                err(code, msg),
                "{text}"
            );
        }
        assert_eq!(sim.mfa_devices(&alice.user_id), ["iam/mfa/a1"]);
    }

    #[tokio::test]
    async fn v5_deny_switch() {
        let (sim, alice, _) = sim().await;
        sim.set_v5_deny(true);
        let r = send_v5(&disable_request(&sim, &alice.user_id, "iam/mfa/a1"))
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let body = without_request_id(Api::V5DisableMfaDevice, &r);
        assert_eq!(body["error_code"], "PAP5.0001");
        assert!(body["error_msg"]
            .as_str()
            .expect("msg")
            .starts_with("access denied: "));
        let encoded = body["encoded_authorization_message"]
            .as_str()
            .expect("encoded message");
        assert_eq!(
            base64_decode(encoded).expect("base64"),
            br#"{"action":"iam:mfa:disableV5","effect":"deny"}"#
        );
        let r = send_v5(&list_request(&sim, &alice.user_id))
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(r.json()["encoded_authorization_message"].is_string());
        assert_eq!(sim.mfa_devices(&alice.user_id), ["iam/mfa/a1"]);

        // Authentication comes first.
        let stranger = aksk::AkSk::new("SOMEONEELSE000000000", "x").expect("credentials");
        let r = send_signed(
            &list_request(&sim, &alice.user_id),
            &stranger,
            SystemTime::now(),
            |_| {},
        )
        .await
        .expect("answer");
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);

        sim.set_v5_deny(false);
        let r = send_v5(&list_request(&sim, &alice.user_id))
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn v5_signatures_are_verified() {
        let (sim, alice, _) = sim().await;
        let list = list_request(&sim, &alice.user_id);
        let disable = disable_request(&sim, &alice.user_id, "iam/mfa/a1");
        let good = sim_credentials();
        let now = SystemTime::now();
        let minutes = |m: u64| Duration::from_secs(m * 60);
        let unauthenticated = |r: &Reply, detail: &str| {
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{detail}");
            let body = r.json();
            assert_eq!(body["error_code"], "APIGW.0301", "{detail}");
            let msg = body["error_msg"].as_str().expect("msg");
            assert!(
                msg.starts_with("Incorrect IAM authentication information: "),
                "{msg}"
            );
            assert!(msg.contains(detail), "{msg} / {detail}");
        };

        // Accepted within 15 minutes either way.
        for at in [now - minutes(14), now + minutes(14)] {
            let r = send_signed(&list, &good, at, |_| {}).await.expect("answer");
            assert_eq!(r.status, StatusCode::OK);
        }
        for at in [now - minutes(16), now + minutes(16)] {
            let r = send_signed(&list, &good, at, |_| {}).await.expect("answer");
            unauthenticated(&r, "15 minutes");
        }

        let wrong_sk = aksk::AkSk::new(V5_ACCESS_KEY, "wrong").expect("credentials");
        let r = send_signed(&disable, &wrong_sk, now, |_| {})
            .await
            .expect("answer");
        unauthenticated(&r, "verify aksk signature fail");
        let unknown = aksk::AkSk::new("UNKNOWNACCESSKEY0000", V5_SECRET_KEY).expect("credentials");
        let r = send_signed(&disable, &unknown, now, |_| {})
            .await
            .expect("answer");
        unauthenticated(&r, "ak not exist");
        assert!(!String::from_utf8_lossy(&r.body).contains("UNKNOWNACCESSKEY0000"));

        // Anything changed after signing breaks the signature.
        let tampered: [(&str, Tamper<'_>); 5] = [
            (
                "body",
                Box::new(|req| {
                    *req.body_mut() = Full::new(Bytes::from(
                        r#"{"user_id":"x","serial_number":"iam/mfa/a1"}"#,
                    ));
                }),
            ),
            (
                "query",
                Box::new(|req| {
                    let uri = format!("{}&limit=1", req.uri());
                    *req.uri_mut() = uri.parse().expect("uri");
                }),
            ),
            (
                "content-type",
                Box::new(|req| {
                    req.headers_mut()
                        .insert("content-type", HeaderValue::from_static("text/plain"));
                }),
            ),
            (
                "method",
                Box::new(|req| {
                    *req.uri_mut() = format!("{}/v5/mfa-devices", sim.url())
                        .parse()
                        .expect("uri");
                    *req.method_mut() = Method::GET;
                }),
            ),
            (
                "host unsigned",
                Box::new(|req| {
                    let auth = req.headers()["authorization"].to_str().expect("ascii");
                    let auth = auth.replace(
                        "SignedHeaders=content-type;host;",
                        "SignedHeaders=content-type;",
                    );
                    req.headers_mut().insert(
                        "authorization",
                        HeaderValue::from_str(&auth).expect("value"),
                    );
                }),
            ),
        ];
        for (what, tamper) in tampered {
            let request = if what == "query" { &list } else { &disable };
            let r = send_signed(request, &good, now, tamper)
                .await
                .expect("answer");
            unauthenticated(&r, "verify aksk signature fail");
        }
        let r = send_signed(&list, &good, now, |req| {
            req.headers_mut().remove("authorization");
        })
        .await
        .expect("answer");
        unauthenticated(&r, "Authorization");
        let r = send_signed(&list, &good, now, |req| {
            req.headers_mut()
                .insert("x-sdk-date", HeaderValue::from_static("yesterday"));
        })
        .await
        .expect("answer");
        unauthenticated(&r, "x-sdk-date");
        assert_eq!(sim.mfa_devices(&alice.user_id), ["iam/mfa/a1"]);

        // Other credentials, once configured, are the only ones that work.
        sim.set_v5_credentials("NEWACCESSKEY00000000", "new-secret");
        let r = send_v5(&list).await.expect("answer");
        unauthenticated(&r, "ak not exist");
        let new = aksk::AkSk::new("NEWACCESSKEY00000000", "new-secret").expect("credentials");
        let r = send_signed(&list, &new, now, |_| {}).await.expect("answer");
        assert_eq!(r.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn v5_security_tokens() {
        let (sim, alice, _) = sim().await;
        let list = list_request(&sim, &alice.user_id);
        let now = SystemTime::now();
        let temporary = |token: &str| {
            sim_credentials()
                .with_security_token(Some(token))
                .expect("token")
        };
        // Permanent credentials: a security token is refused.
        let r = send_signed(&list, &temporary("t1"), now, |_| {})
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);

        sim.set_v5_security_token(Some("t1"));
        let r = send_v5(&list).await.expect("answer");
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "token required");
        let r = send_signed(&list, &temporary("t2"), now, |_| {})
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "wrong token");
        let r = send_signed(&list, &temporary("t1"), now, |_| {})
            .await
            .expect("answer");
        assert_eq!(r.status, StatusCode::OK);
        // The token must be signed.
        let r = send_signed(&list, &temporary("t1"), now, |req| {
            let auth = req.headers()["authorization"].to_str().expect("ascii");
            let auth = auth.replace(";x-security-token", "");
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&auth).expect("value"),
            );
        })
        .await
        .expect("answer");
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "unsigned token");
    }

    #[tokio::test]
    async fn v5_body_faults() {
        let (sim, alice, bob) = sim().await;
        let list = list_request(&sim, &alice.user_id);
        let disable = disable_request(&sim, &alice.user_id, "iam/mfa/a1");

        sim.set_fault(Some(Api::V5ListMfaDevices), Some(Fault::MissingFields));
        let r = send_v5(&list).await.expect("answer");
        assert_eq!(r.json(), json!({"mfa_devices": [{}]}));
        sim.set_fault(Some(Api::V5ListMfaDevices), Some(Fault::WrongTypes));
        let r = send_v5(&list).await.expect("answer");
        assert!(r.json()["mfa_devices"][0]["serial_number"].is_number());
        assert!(r.json()["page_info"]["next_marker"].is_number());
        sim.set_fault(Some(Api::V5ListMfaDevices), Some(Fault::OtherUser));
        let r = send_v5(&list).await.expect("answer");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["mfa_devices"][0]["user_id"], json!(bob.user_id));
        sim.set_fault(Some(Api::V5ListMfaDevices), Some(Fault::Huge));
        let r = send_v5(&list).await.expect("answer");
        assert_eq!(r.body.len(), HUGE_BODY_BYTES);
        assert!(r.json()["mfa_devices"].is_array());
        sim.set_fault(Some(Api::V5ListMfaDevices), Some(Fault::Truncated));
        assert!(send_v5(&list).await.is_err(), "truncated");

        // Nothing to reshape on the disable: answered normally.
        sim.set_fault(Some(Api::V5DisableMfaDevice), Some(Fault::Garbage));
        let r = send_v5(&disable).await.expect("answer");
        assert!(serde_json::from_slice::<Value>(&r.body).is_err());
        assert_eq!(
            sim.mfa_devices(&alice.user_id),
            ["iam/mfa/a1"],
            "not disabled"
        );
        for fault in [Fault::MissingFields, Fault::WrongTypes, Fault::OtherUser] {
            sim.set_mfa_device(&alice.user_id, Some("iam/mfa/a1".to_owned()));
            sim.set_fault(Some(Api::V5DisableMfaDevice), Some(fault.clone()));
            let r = send_v5(&disable).await.expect("answer");
            assert_eq!(r.status, StatusCode::OK, "{fault:?}");
            assert!(r.body.is_empty(), "{fault:?}");
            assert!(sim.mfa_devices(&alice.user_id).is_empty(), "{fault:?}");
        }
        // A truncated disable promises `{}`; the device is gone all the same.
        sim.set_mfa_device(&alice.user_id, Some("iam/mfa/a1".to_owned()));
        sim.set_fault(Some(Api::V5DisableMfaDevice), Some(Fault::Truncated));
        assert!(send_v5(&disable).await.is_err(), "truncated");
        assert!(sim.mfa_devices(&alice.user_id).is_empty());
        assert_eq!(sim.calls(Api::V5DisableMfaDevice), 5);
    }
}
