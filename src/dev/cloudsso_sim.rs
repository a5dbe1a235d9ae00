//! A fake Alibaba Cloud CloudSSO endpoint and a demo OIDC-style IdP, for `mfa-gate dev
//! --provider alibaba_cloudsso` and the tests of the `alibaba_cloudsso` provider.
//!
//! | call | path |
//! |---|---|
//! | `GetUserMFAAuthenticationSettings` (seed page 003) | `POST /?DirectoryId=…&UserId=…` with `x-acs-action`, `x-acs-version: 2021-05-15` |
//! | the IdP's JWKS | `GET /jwks.json` |
//!
//! Every CloudSSO call must carry a valid `ACS3-HMAC-SHA256` signature (`shared/IAM.md`): the
//! simulator recomputes it with the AccessKey it was started with, so a client that signs
//! wrongly fails here exactly as against Alibaba Cloud — `SignatureDoesNotMatch` (403), an
//! unknown AccessKey id `InvalidAccessKeyId.NotFound` (404), a reused nonce, a stale
//! `x-acs-date` or a missing STS token each with their own error. The answers and error bodies
//! (`{"RequestId","HostId","Code","Message","Recommend"}`) follow seed page 003 and
//! `shared/IAM.md`; the statuses marked UNCONFIRMED there are guessed the same way as in the
//! provider (`EntityNotExists.*` → 404).
//!
//! The IdP signs demo JWTs with an ES256 key generated at start (ring cannot generate RSA
//! keys); [`CloudSsoSim::add_rsa_test_key`] adds a fixed, publicly known RSA key for RS256
//! tests. Keys can be rotated. Tests steer the simulator while it runs: users and their MFA
//! setting, a [`Fault`] per API, call counters (counted on arrival), the requests received.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair as _, RsaKeyPair, RsaPublicKeyComponents,
    ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256, RSA_PSS_SHA256,
};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::iam::acs3::{self, Acs3Request};
use crate::iam::alibaba::{AccessKey, ACTION, API_VERSION};
use crate::iam::jwt::{Algorithm, JwksLocation, JwtSettings, DEFAULT_ALGORITHMS, DEFAULT_LEEWAY};

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// The content type of CloudSSO's answers.
const ACS_JSON: &str = "application/json;charset=utf-8";
/// Largest request body read; the gateway sends none.
const MAX_REQUEST_BODY: usize = 64 * 1024;
/// How far `x-acs-date` may be from the simulator's clock (`shared/IAM.md`: 15 minutes).
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);
/// Path of the demo IdP's JWKS.
const JWKS_PATH: &str = "/jwks.json";
/// The `HostId` of error bodies.
const HOST_ID: &str = "cloudsso.simulator.aliyuncs.com";
/// Headers that must be signed in every call.
const REQUIRED_SIGNED: [&str; 6] = [
    "host",
    "x-acs-action",
    "x-acs-content-sha256",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-version",
];

/// A 2048-bit RSA key, PKCS#8, made once with `openssl genpkey` for tests. **Publicly known:
/// never trust it anywhere.** ring cannot generate RSA keys, and RS256 must be tested too.
const RSA_TEST_KEY_PKCS8: [&str; 26] = [
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC1oj8xe/xiAIGx",
    "oJTZiYPk+1tlagtB4ycSYZDy13u8K/dnYTpVzxQ1nTZQJz5SJe8JX2g0pEuWo6RZ",
    "NWHnBrphsBxmvsOOguAseDlECdHipd2PSzcMehWGUg8+WEF3Hr/e4tvJXO6g4g1T",
    "3APEJa96gbmSJeOxm0wQlTpuxilRoB/HfNuWZO93XznXRbJTwIGVKlLs/1fp1mo3",
    "Mhpph5AbCvI1UPHCK/lwGchKhJKkS5vbeX0C+LVxAWsLQ7oLf0qk0d05WRneGnGp",
    "QhcLffRPHgcYOeHyjEFPlgqQmp4hjrhXbM/qugLV21Uedv0jR+PsYpOhNFXtIKSW",
    "Oh6HYMplAgMBAAECggEAGCNbPZLKHCYQFlCOZ4iIcDZdU5FvtI5hA2bW8gbkCUJY",
    "izMXIw81kth1PtqwRA+JgFffC9vntbnCnh5jh+XTgCb850SjzX0kGJTTm3CopXPA",
    "iYoH408YLDUclH77GD8MZa0FY3HHvra76bCcCYWul9vEkyEY7OIEDlIepVkNZazm",
    "DC/AAbLNPGYOP2GL9s9SzTqN74Cd91TRzXLrfrwAo23JcK7ljBxopU8oBvoGu/id",
    "yGW/yrD8UTKiFMQVLaoUmXplrwXheUpqeTOaIvFiqKNz3oZFdCPbvosFGvfktVh+",
    "L3FIuIOSHVyOXy+cieEwG3gDRYPMxWJDsOIIDhulUwKBgQDmRxezHVPv26iIg2uh",
    "YTMA+JcbXezQIkGhYUN8gCllgqLqJYoitZ6+KscHWRYV+ouWhQilWmiZKgG8WhTl",
    "ILyzzrR8qK8h1VyYGX1RSThcBNNHDjPfserj5+X+wJmJB9HECiUgUPMlhW9BVo8i",
    "h/Mrp0r0/Am7K3MgMdtLrc+R1wKBgQDJ7CgSyEHd2CMxf5hNsVXjHxIDsWMr6ad5",
    "gqAQr/4N7J68bw82Tp06g83muWCQJp3jTMjAe9F+0AgB1W9DYlLyNBH3x9zKML+8",
    "6hs8wYHKBdT8cV2lLniKhsclE4j9yOLe4Ep8+hM1pIaZBx3BI0hQ9oGLs1EweuXg",
    "W+nPqBe2IwKBgGDlv2I+UAiZHJS9ADg7B1Q8RpFcd36pO4alv9kOsNynGNiADV1H",
    "oVGR/IfqA7Ih6EThG99AaM0ycOKJ4Ur8+IqMy0O9U1xgRIM4DpR6w/1shl7a6hcR",
    "7a4S8aO99Z1Erg7Y2gB8L6Q1Prh2rOox3LAcyBzIRWv9/4anlAiHTdWnAoGAFdg4",
    "lZ+YkJl7ZTV6kp0mv4Vy+3dLVUrX1WtuSZ/gij0ZByW0rZlfpR7xPY68hZvH5Pk/",
    "lqNOjLuQwjIG8XFHq/A6KWYz2qPfel6RR8dfdS2gVxcknGQkokfmb3pnjZ0X/iih",
    "plefkGQWM6PzchuRDUE9zpE9rVL+X4FSECcNOaUCgYEA5bZYOlOndZSc1mIzFUvB",
    "2QWAt7wqp8AYlogCt4EqtzoYBCi8rvyfTjm5B6hGcAjbSmY775UK1h5ICt9pDq40",
    "26szy/BFtBVdc7PnA/ScugEztVWU/HcGtFZoAz2PwpLADUIyQbOgYX0RvxpJzV+M",
    "sp7Ag9yptFlzUHJojp6kXto=",
];

/// One of the calls the simulator serves; faults and counters are per API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// `GetUserMFAAuthenticationSettings` (`POST /`).
    MfaSettings,
    /// `GET /jwks.json`.
    Jwks,
}

impl Api {
    /// Every API.
    pub const ALL: [Api; 2] = [Api::MfaSettings, Api::Jwks];

    fn index(self) -> usize {
        match self {
            Api::MfaSettings => 0,
            Api::Jwks => 1,
        }
    }
}

/// A way for one API to misbehave, set with [`CloudSsoSim::set_fault`] until cleared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally after this delay.
    Latency(Duration),
    /// CloudSSO: HTTP 400 `Throttling.User` (as Alibaba Cloud throttles); JWKS: 429.
    Throttle,
    /// This status with a matching error body: CloudSSO 400 `InvalidParameter`, 403
    /// `NoPermission`, 404 `EntityNotExists.Directory`, 429 `Throttling.User`, 500
    /// `InternalError`, 503 `ServiceUnavailable` (other 4xx/5xx: the 400/500 ones). Outside
    /// 200..=599 the status is 500.
    Status(u16),
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with an HTML page, like a captive portal or a load balancer's error page.
    Html,
    /// 200 JSON without the answer's field (`{"RequestId"}` / `{"keys":[]}`).
    MissingFields,
    /// Accept the request, then close the connection without an answer.
    Drop,
}

/// A CloudSSO user's `UserMFAAuthenticationSettings` (seed page 003).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MfaSetting {
    Enabled,
    Disabled,
}

impl MfaSetting {
    fn as_str(self) -> &'static str {
        match self {
            MfaSetting::Enabled => "Enabled",
            MfaSetting::Disabled => "Disabled",
        }
    }
}

/// A user of the simulated CloudSSO directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimUser {
    /// CloudSSO `UserId`, e.g. `u-00q8wbq42wiltcrk****`; the demo JWTs' `sub`.
    pub user_id: String,
    /// The demo JWTs' `preferred_username`.
    pub user_name: String,
    pub mfa: MfaSetting,
}

impl SimUser {
    pub fn new(user_id: &str, user_name: &str, mfa: MfaSetting) -> SimUser {
        SimUser {
            user_id: user_id.to_owned(),
            user_name: user_name.to_owned(),
            mfa,
        }
    }
}

/// Two demo users: `alice` with MFA `Enabled`, `bob` with `Disabled`. A JWT minted for any
/// other id is well signed but names no user of the directory (answered 401 by the gateway).
pub fn demo_users() -> Vec<SimUser> {
    let id = || format!("u-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    vec![
        SimUser::new(&id(), "alice", MfaSetting::Enabled),
        SimUser::new(&id(), "bob", MfaSetting::Disabled),
    ]
}

/// The directory and AccessKey the simulator accepts, and the audience of its JWTs.
#[derive(Clone)]
pub struct SimConfig {
    pub directory_id: String,
    pub access_key_id: String,
    pub access_key_secret: String,
    /// When set, every call must carry it as `x-acs-security-token` (STS credentials).
    pub security_token: Option<String>,
    /// `aud` of the minted JWTs.
    pub audience: String,
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("directory_id", &self.directory_id)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl SimConfig {
    /// A demo directory and a fresh random AccessKey.
    pub fn demo() -> SimConfig {
        let random = || uuid::Uuid::new_v4().simple().to_string();
        SimConfig {
            directory_id: format!("d-{}", &random()[..12]),
            access_key_id: format!("LTAI5tDemo{}", &random()[..14]),
            access_key_secret: random(),
            security_token: None,
            audience: "mfa-gate".to_owned(),
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig::demo()
    }
}

/// A request the simulator received on `POST /`, as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// Header names lowercased, values lossily decoded, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// The first value of a header (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A JWT signing key of the demo IdP.
pub struct SigningKey {
    kid: String,
    pair: Pair,
}

enum Pair {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.algorithm())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new P-256 key.
    pub fn generate_es256(kid: &str) -> SigningKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("the system RNG works");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("ring reads the key it just made");
        SigningKey {
            kid: kid.to_owned(),
            pair: Pair::Es256(pair),
        }
    }

    /// The fixed, publicly known RSA test key (RS256).
    pub fn rsa_test_key(kid: &str) -> SigningKey {
        let der = STANDARD
            .decode(RSA_TEST_KEY_PKCS8.concat())
            .expect("the test key constant is base64");
        let pair = RsaKeyPair::from_pkcs8(&der).expect("the test key constant is a PKCS#8 RSA key");
        SigningKey {
            kid: kid.to_owned(),
            pair: Pair::Rs256(pair),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.pair {
            Pair::Es256(_) => Algorithm::Es256,
            Pair::Rs256(_) => Algorithm::Rs256,
        }
    }

    /// The public JWK, with `kid`, `alg` and `use: sig`.
    pub fn jwk(&self) -> Value {
        match &self.pair {
            Pair::Es256(pair) => {
                // Uncompressed point: 0x04 || x || y.
                let point = pair.public_key().as_ref();
                json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                })
            }
            Pair::Rs256(pair) => {
                let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                    "n": URL_SAFE_NO_PAD.encode(&public.n),
                    "e": URL_SAFE_NO_PAD.encode(&public.e),
                })
            }
        }
    }

    /// The RSA modulus (empty for an EC key).
    pub fn public_modulus(&self) -> Vec<u8> {
        match &self.pair {
            Pair::Es256(_) => Vec::new(),
            Pair::Rs256(pair) => RsaPublicKeyComponents::<Vec<u8>>::from(pair.public()).n,
        }
    }

    /// The public key as ring encodes it: DER `RSAPublicKey`, or the uncompressed EC point.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        match &self.pair {
            Pair::Es256(pair) => pair.public_key().as_ref().to_vec(),
            Pair::Rs256(pair) => pair.public().as_ref().to_vec(),
        }
    }

    /// Signs `message` with the key's algorithm (ES256: fixed-width `r || s`).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.pair {
            Pair::Es256(pair) => pair
                .sign(&rng, message)
                .expect("signing with a valid key")
                .as_ref()
                .to_vec(),
            Pair::Rs256(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
                    .expect("signing with a valid key");
                signature
            }
        }
    }

    /// The signature of the JWS signing input `b64(header).b64(claims)`.
    pub fn sign_input(&self, header: &Value, claims: &Value) -> Vec<u8> {
        self.sign(signing_input(header, claims).as_bytes())
    }

    /// A PS256 signature of `b64(header).b64(claims)`; `None` for an EC key.
    pub fn sign_pss(&self, header: &Value, claims: &Value) -> Option<Vec<u8>> {
        let Pair::Rs256(pair) = &self.pair else {
            return None;
        };
        let mut signature = vec![0; pair.public().modulus_len()];
        pair.sign(
            &RSA_PSS_SHA256,
            &SystemRandom::new(),
            signing_input(header, claims).as_bytes(),
            &mut signature,
        )
        .ok()?;
        Some(signature)
    }

    /// A JWT with header `{"alg","kid","typ":"JWT"}` and these claims.
    pub fn mint(&self, claims: &Value) -> String {
        let header = json!({"alg": self.algorithm().as_str(), "kid": self.kid, "typ": "JWT"});
        encode_jwt(&header, claims, &self.sign_input(&header, claims))
    }
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// Assembles a compact JWS from its parts (for crafting hostile tokens in tests).
pub fn encode_jwt(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}",
        signing_input(header, claims),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// A running simulator. Cheap to clone; stops when [`CloudSsoSim::shutdown`] is called or the
/// last clone is dropped.
#[derive(Clone)]
pub struct CloudSsoSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stopper: Arc<Stopper>,
}

impl fmt::Debug for CloudSsoSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudSsoSim")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct Stopper {
    tx: watch::Sender<bool>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.tx.send_replace(true);
    }
}

struct Shared {
    config: SimConfig,
    /// The base URL, also the JWTs' `iss`.
    url: String,
    state: Mutex<State>,
    /// Requests per [`Api`], counted on arrival.
    calls: [AtomicUsize; 2],
    /// `POST /` requests being answered now, and the most at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

struct State {
    users: HashMap<String, (String, MfaSetting)>,
    faults: HashMap<Api, Fault>,
    /// Keys published in the JWKS, in order.
    published: Vec<Arc<SigningKey>>,
    /// The key [`CloudSsoSim::mint`] signs with.
    current: Arc<SigningKey>,
    /// Numbers the generated `kid`s.
    generated: usize,
    /// Signature nonces already used (replays are refused).
    nonces: HashSet<String>,
    seen_user_ids: Vec<String>,
    last_request: Option<SeenRequest>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts a `POST /` in flight while alive.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> InFlight<'a> {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CloudSsoSim {
    /// Binds `bind` (port 0 picks a free port) and serves until shut down.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn start(
        bind: SocketAddr,
        config: SimConfig,
        users: Vec<SimUser>,
    ) -> std::io::Result<CloudSsoSim> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let first = Arc::new(SigningKey::generate_es256("demo-es256-1"));
        let state = State {
            users: users
                .into_iter()
                .map(|user| (user.user_id, (user.user_name, user.mfa)))
                .collect(),
            faults: HashMap::new(),
            published: vec![first.clone()],
            current: first,
            generated: 1,
            nonces: HashSet::new(),
            seen_user_ids: Vec::new(),
            last_request: None,
        };
        let shared = Arc::new(Shared {
            config,
            url: base_url(addr),
            state: Mutex::new(state),
            calls: Default::default(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let (tx, rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), rx));
        tracing::debug!(%addr, "CloudSSO simulator listening");
        Ok(CloudSsoSim {
            addr,
            shared,
            stopper: Arc::new(Stopper { tx }),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, for `iam.endpoint`; also the demo JWTs' issuer.
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// For `iam.jwt.jwks_url`.
    pub fn jwks_url(&self) -> String {
        format!("{}{JWKS_PATH}", self.shared.url)
    }

    /// For `iam.jwt.issuer`.
    pub fn issuer(&self) -> String {
        self.shared.url.clone()
    }

    /// For `iam.jwt.audience`.
    pub fn audience(&self) -> &str {
        &self.shared.config.audience
    }

    /// For `iam.directory_id`.
    pub fn directory_id(&self) -> &str {
        &self.shared.config.directory_id
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// The AccessKey the simulator accepts.
    pub fn access_key(&self) -> AccessKey {
        let config = &self.shared.config;
        AccessKey::new(
            config.access_key_id.clone(),
            config.access_key_secret.clone(),
            config.security_token.clone(),
        )
        .expect("the simulator's AccessKey is well-formed")
    }

    /// JWT settings that trust this IdP (JWKS by URL, default algorithms and leeway).
    pub fn jwt_settings(&self) -> JwtSettings {
        JwtSettings {
            jwks: JwksLocation::Url(self.jwks_url()),
            issuer: self.issuer(),
            audience: self.shared.config.audience.clone(),
            user_id_claim: "sub".to_owned(),
            algorithms: DEFAULT_ALGORITHMS.to_vec(),
            leeway: DEFAULT_LEEWAY,
        }
    }

    /// Adds or changes a user (`Some`), or removes it (`None`).
    pub fn set_user(&self, user_id: &str, user_name: &str, mfa: Option<MfaSetting>) {
        let mut state = self.shared.state();
        match mfa {
            Some(mfa) => {
                state
                    .users
                    .insert(user_id.to_owned(), (user_name.to_owned(), mfa));
            }
            None => {
                state.users.remove(user_id);
            }
        }
    }

    /// Makes `api` (`None`: every API) misbehave as `fault` (`None`: answer normally again).
    pub fn set_fault(&self, api: Option<Api>, fault: Option<Fault>) {
        let apis = api.map_or_else(|| Api::ALL.to_vec(), |api| vec![api]);
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

    /// Requests received for `api`, counted on arrival (faulted and refused ones included).
    pub fn calls(&self, api: Api) -> usize {
        self.shared.calls[api.index()].load(Ordering::SeqCst)
    }

    /// Sets the call counters and the in-flight maximum back to zero.
    pub fn reset_calls(&self) {
        for counter in &self.shared.calls {
            counter.store(0, Ordering::SeqCst);
        }
        self.shared.max_in_flight.store(0, Ordering::SeqCst);
    }

    /// The most `POST /` requests answered at once since start or [`CloudSsoSim::reset_calls`].
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Every `UserId` query parameter received, decoded, in arrival order.
    pub fn seen_user_ids(&self) -> Vec<String> {
        self.shared.state().seen_user_ids.clone()
    }

    /// The last `POST /` received.
    pub fn last_request(&self) -> Option<SeenRequest> {
        self.shared.state().last_request.clone()
    }

    /// The standard claims of a demo JWT for `user_id`, valid from now for `lifetime`: `iss`,
    /// `aud`, `sub`, `preferred_username`, `iat`, `nbf`, `exp`, `amr: ["pwd"]`.
    pub fn claims_for(&self, user_id: &str, user_name: &str, lifetime: Duration) -> Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        json!({
            "iss": self.issuer(),
            "aud": self.shared.config.audience,
            "sub": user_id,
            "preferred_username": user_name,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime.as_secs(),
            "amr": ["pwd"],
        })
    }

    /// A JWT over `claims`, signed with the current key.
    pub fn mint(&self, claims: &Value) -> String {
        let key = self.shared.state().current.clone();
        key.mint(claims)
    }

    /// A JWT over `claims`, signed with the published key `kid`.
    ///
    /// # Panics
    ///
    /// When no published key has that `kid`.
    pub fn mint_with(&self, kid: &str, claims: &Value) -> String {
        let key = self
            .shared
            .state()
            .published
            .iter()
            .find(|key| key.kid() == kid)
            .cloned()
            .unwrap_or_else(|| panic!("no published key {kid:?}"));
        key.mint(claims)
    }

    /// The `kid` of the key [`CloudSsoSim::mint`] signs with.
    pub fn current_kid(&self) -> String {
        self.shared.state().current.kid().to_owned()
    }

    /// Generates a new ES256 key, publishes it and signs with it from now on; with
    /// `retire_old`, every other published key is withdrawn from the JWKS. Returns the new
    /// `kid`.
    pub fn rotate_key(&self, retire_old: bool) -> String {
        let mut state = self.shared.state();
        state.generated += 1;
        let key = Arc::new(SigningKey::generate_es256(&format!(
            "demo-es256-{}",
            state.generated
        )));
        if retire_old {
            state.published.clear();
        }
        state.published.push(key.clone());
        state.current = key;
        state.current.kid().to_owned()
    }

    /// Publishes the fixed RSA test key (RS256) as `demo-rs256` (the current key stays the
    /// signer; use [`CloudSsoSim::mint_with`]). Returns its `kid`.
    pub fn add_rsa_test_key(&self) -> String {
        const KID: &str = "demo-rs256";
        let mut state = self.shared.state();
        if !state.published.iter().any(|key| key.kid() == KID) {
            state
                .published
                .push(Arc::new(SigningKey::rsa_test_key(KID)));
        }
        KID.to_owned()
    }

    /// The JWKS document as served.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .shared
            .state()
            .published
            .iter()
            .map(|key| key.jwk())
            .collect();
        json!({ "keys": keys })
    }

    /// Stops accepting connections and cuts the open ones. Idempotent.
    pub fn shutdown(&self) {
        self.stopper.tx.send_replace(true);
    }
}

fn base_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(stream, Arc::clone(&shared), stop.clone()));
                }
                Err(err) => {
                    tracing::debug!(cause = %err, "CloudSSO simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
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
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(cause = %err, "CloudSSO simulator connection ended with an error");
            }
        }
        () = kill.notified() => {}
        () = stopped(&mut stop) => {}
    }
}

/// A CloudSSO error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AcsError {
    status: StatusCode,
    code: &'static str,
    message: &'static str,
}

const fn acs_error(status: u16, code: &'static str, message: &'static str) -> AcsError {
    let status = match StatusCode::from_u16(status) {
        Ok(status) => status,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    AcsError {
        status,
        code,
        message,
    }
}

const INCOMPLETE_SIGNATURE: AcsError = acs_error(
    400,
    "IncompleteSignature",
    "The request signature does not conform to Aliyun standards.",
);
const SIGNATURE_MISMATCH: AcsError = acs_error(
    403,
    "SignatureDoesNotMatch",
    "Specified signature does not match our calculation.",
);
const UNKNOWN_ACCESS_KEY: AcsError = acs_error(
    404,
    "InvalidAccessKeyId.NotFound",
    "Specified access key is not found.",
);
const SECURITY_TOKEN_MISMATCH: AcsError = acs_error(
    400,
    "InvalidSecurityToken.MismatchWithAccessKey",
    "The security token does not match the access key.",
);
const STALE_DATE: AcsError = acs_error(
    400,
    "InvalidTimeStamp.Expired",
    "Specified time stamp or date value is expired.",
);
const NONCE_USED: AcsError = acs_error(
    400,
    "SignatureNonceUsed",
    "Specified signature nonce was used already.",
);
const UNKNOWN_ACTION: AcsError = acs_error(
    404,
    "InvalidAction.NotFound",
    "Specified api is not found, please check your url and method.",
);
const BAD_VERSION: AcsError = acs_error(
    400,
    "InvalidVersion",
    "Specified parameter Version is not valid.",
);
const BAD_PARAMETER: AcsError = acs_error(
    400,
    "InvalidParameter",
    "The specified parameter is not valid.",
);
const MISSING_DIRECTORY: AcsError = acs_error(
    400,
    "MissingDirectoryId",
    "DirectoryId is mandatory for this action.",
);
const MISSING_USER: AcsError =
    acs_error(400, "MissingUserId", "UserId is mandatory for this action.");
const NO_DIRECTORY: AcsError = acs_error(
    404,
    "EntityNotExists.Directory",
    "The specified directory does not exist.",
);
const NO_USER: AcsError = acs_error(
    404,
    "EntityNotExists.User",
    "The specified user does not exist.",
);
const NO_PERMISSION: AcsError = acs_error(
    403,
    "NoPermission",
    "You are not authorized to perform this operation.",
);
const THROTTLED: AcsError = acs_error(
    400,
    "Throttling.User",
    "Request was denied due to user flow control.",
);
const THROTTLED_429: AcsError = acs_error(
    429,
    "Throttling.User",
    "Request was denied due to user flow control.",
);
const INTERNAL: AcsError = acs_error(
    500,
    "InternalError",
    "The request processing has failed due to some unknown error.",
);
const UNAVAILABLE: AcsError = acs_error(
    503,
    "ServiceUnavailable",
    "The request has failed due to a temporary failure of the server.",
);

async fn handle(shared: &Shared, kill: &Notify, req: Request<Incoming>) -> Response<Body> {
    let api = match req.uri().path() {
        "/" => Some(Api::MfaSettings),
        JWKS_PATH => Some(Api::Jwks),
        _ => None,
    };
    if let Some(api) = api {
        shared.calls[api.index()].fetch_add(1, Ordering::SeqCst);
    }
    let _in_flight = (api == Some(Api::MfaSettings)).then(|| InFlight::enter(shared));
    let fault = api.and_then(|api| shared.state().faults.get(&api).cloned());
    tracing::debug!(method = %req.method(), path = req.uri().path(), ?fault, "CloudSSO simulator request");

    match (&fault, api) {
        (Some(Fault::Drop), _) => {
            kill.notify_one();
            return std::future::pending().await;
        }
        (Some(Fault::Latency(delay)), _) => tokio::time::sleep(*delay).await,
        (Some(Fault::Throttle), Some(Api::MfaSettings)) => return error_response(THROTTLED),
        (Some(Fault::Throttle), Some(Api::Jwks)) => return error_response(THROTTLED_429),
        (Some(Fault::Status(status)), _) => return error_response(status_fault(*status)),
        (Some(Fault::Garbage), _) => {
            return response(
                StatusCode::OK,
                ACS_JSON,
                b"{\"UserMFAAuthentication\xff<<".to_vec(),
            )
        }
        (Some(Fault::Html), _) => {
            return response(
                StatusCode::OK,
                "text/html; charset=utf-8",
                b"<!DOCTYPE html><html><body><h1>Maintenance</h1></body></html>".to_vec(),
            )
        }
        (Some(Fault::MissingFields), Some(Api::MfaSettings)) => {
            return json_response(StatusCode::OK, &json!({"RequestId": request_id()}))
        }
        (Some(Fault::MissingFields), Some(Api::Jwks)) => {
            return json_response(StatusCode::OK, &json!({"keys": []}))
        }
        _ => {}
    }

    match api {
        Some(Api::Jwks) if req.method() == Method::GET || req.method() == Method::HEAD => {
            let jwks = {
                let state = shared.state();
                let keys: Vec<Value> = state.published.iter().map(|key| key.jwk()).collect();
                json!({ "keys": keys })
            };
            json_response(StatusCode::OK, &jwks)
        }
        Some(Api::MfaSettings) => match mfa_settings(shared, req).await {
            Ok(setting) => json_response(
                StatusCode::OK,
                &json!({
                    "RequestId": request_id(),
                    "UserMFAAuthenticationSettings": setting.as_str(),
                }),
            ),
            Err(err) => error_response(err),
        },
        _ => error_response(UNKNOWN_ACTION),
    }
}

/// [`Fault::Status`]: the error that goes with the status.
fn status_fault(status: u16) -> AcsError {
    match status {
        400 => BAD_PARAMETER,
        403 => NO_PERMISSION,
        404 => NO_DIRECTORY,
        429 => THROTTLED_429,
        503 => UNAVAILABLE,
        401..=499 => AcsError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            ..BAD_PARAMETER
        },
        200..=399 | 501..=599 => AcsError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            ..INTERNAL
        },
        _ => INTERNAL,
    }
}

/// Authenticates and answers one `GetUserMFAAuthenticationSettings`.
async fn mfa_settings(shared: &Shared, req: Request<Incoming>) -> Result<MfaSetting, AcsError> {
    let (parts, body) = req.into_parts();
    let seen = SeenRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let params = decode_query(&seen.query).ok_or(BAD_PARAMETER)?;
    {
        let mut state = shared.state();
        state.seen_user_ids.extend(
            params
                .iter()
                .filter(|(key, _)| key == "UserId")
                .map(|(_, value)| value.clone()),
        );
        state.last_request = Some(seen);
    }
    let body = Limited::new(body, MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|_| BAD_PARAMETER)?
        .to_bytes();
    if parts.method != Method::POST && parts.method != Method::GET {
        return Err(UNKNOWN_ACTION);
    }
    authenticate(
        shared,
        &parts.method,
        parts.uri.path(),
        &params,
        &parts.headers,
        &body,
    )?;

    if single(&parts.headers, "x-acs-action") != Some(ACTION) {
        return Err(UNKNOWN_ACTION);
    }
    if single(&parts.headers, "x-acs-version") != Some(API_VERSION) {
        return Err(BAD_VERSION);
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let directory = param("DirectoryId").ok_or(MISSING_DIRECTORY)?;
    let user_id = param("UserId").ok_or(MISSING_USER)?;
    if directory != shared.config.directory_id {
        return Err(NO_DIRECTORY);
    }
    shared
        .state()
        .users
        .get(user_id)
        .map(|(_, mfa)| *mfa)
        .ok_or(NO_USER)
}

/// Checks the `ACS3-HMAC-SHA256` signature the way the API does: the AccessKey, the signed
/// header set, the STS token, the body hash, the clock, the nonce, then the signature itself,
/// recomputed from the request as received.
fn authenticate(
    shared: &Shared,
    method: &Method,
    path: &str,
    params: &[(String, String)],
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), AcsError> {
    let config = &shared.config;
    let authorization = single(headers, "authorization").ok_or(INCOMPLETE_SIGNATURE)?;
    let auth = acs3::parse_authorization(authorization).ok_or(INCOMPLETE_SIGNATURE)?;
    if auth.access_key_id != config.access_key_id {
        return Err(UNKNOWN_ACCESS_KEY);
    }
    let signed: Vec<String> = auth
        .signed_headers
        .iter()
        .map(|name| name.to_ascii_lowercase())
        .collect();
    let must_sign = headers
        .keys()
        .map(HeaderName::as_str)
        .filter(|name| name.starts_with("x-acs-") || *name == "content-type")
        .chain(REQUIRED_SIGNED);
    for name in must_sign {
        if !signed.iter().any(|signed| signed == name) {
            return Err(INCOMPLETE_SIGNATURE);
        }
    }
    if single(headers, "x-acs-security-token") != config.security_token.as_deref() {
        return Err(SECURITY_TOKEN_MISMATCH);
    }
    let content_sha256 = single(headers, "x-acs-content-sha256").ok_or(INCOMPLETE_SIGNATURE)?;
    if !content_sha256.eq_ignore_ascii_case(&acs3::hex_sha256(body)) {
        return Err(INCOMPLETE_SIGNATURE);
    }
    let date = single(headers, "x-acs-date")
        .and_then(|date| humantime::parse_rfc3339(date).ok())
        .ok_or(STALE_DATE)?;
    let now = SystemTime::now();
    let skew = now
        .duration_since(date)
        .unwrap_or_else(|err| err.duration());
    if skew > MAX_CLOCK_SKEW {
        return Err(STALE_DATE);
    }

    let mut values = Vec::with_capacity(signed.len());
    for name in &signed {
        values.push((
            name.as_str(),
            single(headers, name).ok_or(INCOMPLETE_SIGNATURE)?,
        ));
    }
    let query: Vec<(&str, &str)> = params
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    let canonical = acs3::canonical_request(&Acs3Request {
        method: method.as_str(),
        path,
        query: &query,
        headers: &values,
        hashed_payload: content_sha256,
    });
    let hashed = acs3::hex_sha256(canonical.as_bytes());
    if !acs3::signature_matches(config.access_key_secret.as_bytes(), &hashed, auth.signature) {
        tracing::debug!(%canonical, "CloudSSO simulator: signature mismatch");
        return Err(SIGNATURE_MISMATCH);
    }
    // Only a correctly signed request spends its nonce.
    let nonce = single(headers, "x-acs-signature-nonce").ok_or(INCOMPLETE_SIGNATURE)?;
    if !shared.state().nonces.insert(nonce.to_owned()) {
        return Err(NONCE_USED);
    }
    Ok(())
}

/// The single value of a header as text; `None` when absent, repeated or not text.
fn single<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

/// Splits and percent-decodes a query string (`+` is a literal plus, as in RFC 3986); `None`
/// for an invalid escape or non-UTF-8.
fn decode_query(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(key)?, percent_decode(value)?))
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn request_id() -> String {
    uuid::Uuid::new_v4()
        .hyphenated()
        .to_string()
        .to_ascii_uppercase()
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

fn response(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    response(status, ACS_JSON, body.to_string().into_bytes())
}

/// The error body of `shared/IAM.md`: `{"RequestId","HostId","Code","Message","Recommend"}`.
fn error_response(err: AcsError) -> Response<Body> {
    json_response(
        err.status,
        &json!({
            "RequestId": request_id(),
            "HostId": HOST_ID,
            "Code": err.code,
            "Message": err.message,
            "Recommend": format!("https://api.aliyun.com/troubleshoot?q={}&product=cloudsso", err.code),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};

    type TestClient = Client<HttpConnector, Empty<Bytes>>;

    fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn sim() -> CloudSsoSim {
        CloudSsoSim::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SimConfig::demo(),
            vec![
                SimUser::new("u-alice", "alice", MfaSetting::Enabled),
                SimUser::new("u-bob", "bob", MfaSetting::Disabled),
            ],
        )
        .await
        .expect("start")
    }

    /// A change that breaks a [`Call`].
    type Breakage = Box<dyn Fn(&mut Call<'_>)>;

    /// A request signed like the provider signs, with knobs to break it.
    struct Call<'a> {
        user_id: &'a str,
        directory_id: String,
        key_id: String,
        secret: String,
        token: Option<String>,
        date: SystemTime,
        nonce: String,
        action: &'a str,
        tamper_query: bool,
        skip_signing: Option<&'a str>,
    }

    impl<'a> Call<'a> {
        fn new(sim: &CloudSsoSim, user_id: &'a str) -> Call<'a> {
            Call {
                user_id,
                directory_id: sim.directory_id().to_owned(),
                key_id: sim.config().access_key_id.clone(),
                secret: sim.config().access_key_secret.clone(),
                token: sim.config().security_token.clone(),
                date: SystemTime::now(),
                nonce: uuid::Uuid::new_v4().simple().to_string(),
                action: ACTION,
                tamper_query: false,
                skip_signing: None,
            }
        }

        async fn send(&self, sim: &CloudSsoSim) -> (StatusCode, Value) {
            let host = sim.addr().to_string();
            let query = [
                ("DirectoryId", self.directory_id.as_str()),
                ("UserId", self.user_id),
            ];
            let date = humantime::format_rfc3339_seconds(self.date).to_string();
            let hash = acs3::hex_sha256(b"");
            let mut headers: Vec<(&str, &str)> = vec![
                ("host", &host),
                ("x-acs-action", self.action),
                ("x-acs-version", API_VERSION),
                ("x-acs-date", &date),
                ("x-acs-signature-nonce", &self.nonce),
                ("x-acs-content-sha256", &hash),
            ];
            if let Some(token) = &self.token {
                headers.push(("x-acs-security-token", token));
            }
            let signed_set: Vec<(&str, &str)> = headers
                .iter()
                .copied()
                .filter(|(name, _)| Some(*name) != self.skip_signing)
                .collect();
            let signed = acs3::sign(
                &Acs3Request {
                    method: "POST",
                    path: "/",
                    query: &query,
                    headers: &signed_set,
                    hashed_payload: &hash,
                },
                self.secret.as_bytes(),
            );
            let mut query_string = acs3::canonical_query(&query);
            if self.tamper_query {
                query_string.push_str("&Extra=1");
            }
            let mut builder = Request::post(format!("{}/?{query_string}", sim.url()));
            for (name, value) in &headers {
                builder = builder.header(*name, *value);
            }
            let req = builder
                .header("authorization", signed.authorization(&self.key_id))
                .body(Empty::new())
                .expect("request");
            let resp = client().request(req).await.expect("answer");
            let status = resp.status();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
    }

    #[tokio::test]
    async fn answers_signed_calls() {
        let sim = sim().await;
        let (status, body) = Call::new(&sim, "u-alice").send(&sim).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["UserMFAAuthenticationSettings"], "Enabled");
        assert!(body["RequestId"].is_string());
        let (_, body) = Call::new(&sim, "u-bob").send(&sim).await;
        assert_eq!(body["UserMFAAuthenticationSettings"], "Disabled");
        let (status, body) = Call::new(&sim, "u-nobody").send(&sim).await;
        assert_eq!(
            (status, body["Code"].as_str()),
            (StatusCode::NOT_FOUND, Some("EntityNotExists.User"))
        );
        for key in ["RequestId", "HostId", "Code", "Message", "Recommend"] {
            assert!(body[key].is_string(), "{key}");
        }
        assert_eq!(sim.calls(Api::MfaSettings), 3);
        assert_eq!(sim.seen_user_ids(), ["u-alice", "u-bob", "u-nobody"]);
    }

    #[tokio::test]
    async fn refuses_bad_signatures() {
        let sim = sim().await;
        let cases: Vec<(Breakage, u16, &str)> = vec![
            (
                Box::new(|c| c.secret = "wrong".into()),
                403,
                "SignatureDoesNotMatch",
            ),
            (
                Box::new(|c| c.tamper_query = true),
                403,
                "SignatureDoesNotMatch",
            ),
            (
                Box::new(|c| c.key_id = "LTAI5tSomeoneElse".into()),
                404,
                "InvalidAccessKeyId.NotFound",
            ),
            (
                Box::new(|c| c.skip_signing = Some("x-acs-date")),
                400,
                "IncompleteSignature",
            ),
            (
                Box::new(|c| c.token = Some("sts".into())),
                400,
                "InvalidSecurityToken.MismatchWithAccessKey",
            ),
            (
                Box::new(|c| c.date = SystemTime::now() - Duration::from_secs(16 * 60)),
                400,
                "InvalidTimeStamp.Expired",
            ),
            (
                Box::new(|c| c.action = "ListUsers"),
                404,
                "InvalidAction.NotFound",
            ),
            (
                Box::new(|c| c.directory_id = "d-other".into()),
                404,
                "EntityNotExists.Directory",
            ),
        ];
        for (edit, status, code) in cases {
            let mut call = Call::new(&sim, "u-alice");
            edit(&mut call);
            let (got, body) = call.send(&sim).await;
            assert_eq!((got.as_u16(), body["Code"].as_str()), (status, Some(code)));
        }
        // A replayed nonce.
        let call = Call::new(&sim, "u-alice");
        assert_eq!(call.send(&sim).await.0, StatusCode::OK);
        let (status, body) = call.send(&sim).await;
        assert_eq!(
            (status.as_u16(), body["Code"].as_str()),
            (400, Some("SignatureNonceUsed"))
        );
    }

    #[tokio::test]
    async fn faults() {
        let sim = sim().await;
        sim.set_fault(Some(Api::MfaSettings), Some(Fault::Throttle));
        let (status, body) = Call::new(&sim, "u-alice").send(&sim).await;
        assert_eq!(
            (status.as_u16(), body["Code"].as_str()),
            (400, Some("Throttling.User"))
        );
        sim.set_fault(None, Some(Fault::Status(503)));
        assert_eq!(
            Call::new(&sim, "u-alice").send(&sim).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        sim.set_fault(None, Some(Fault::Garbage));
        assert_eq!(
            Call::new(&sim, "u-alice").send(&sim).await,
            (StatusCode::OK, Value::Null)
        );
        sim.set_fault(None, None);
        assert_eq!(
            Call::new(&sim, "u-alice").send(&sim).await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn idp_serves_jwks_and_rotates() {
        let sim = sim().await;
        let get = || async {
            let resp = client()
                .request(
                    Request::get(sim.jwks_url())
                        .body(Empty::new())
                        .expect("req"),
                )
                .await
                .expect("answer");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            serde_json::from_slice::<Value>(&body).expect("json")
        };
        let jwks = get().await;
        assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(1));
        assert_eq!(jwks["keys"][0]["kid"], "demo-es256-1");
        assert_eq!(jwks, sim.jwks());
        let rsa = sim.add_rsa_test_key();
        let new = sim.rotate_key(false);
        let kids: Vec<Value> = get().await["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k["kid"].clone())
            .collect();
        assert_eq!(
            kids,
            [json!("demo-es256-1"), json!(rsa), json!(new.clone())]
        );
        sim.rotate_key(true);
        assert_eq!(get().await["keys"].as_array().map(Vec::len), Some(1));
        assert_eq!(sim.calls(Api::Jwks), 3);

        let claims = sim.claims_for("u-alice", "alice", Duration::from_secs(60));
        assert_eq!(claims["iss"], json!(sim.url()));
        assert_eq!(claims["aud"], "mfa-gate");
        let token = sim.mint(&claims);
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().expect("header"))
                .expect("b64"),
        )
        .expect("json");
        assert_eq!(
            header,
            json!({"alg": "ES256", "kid": sim.current_kid(), "typ": "JWT"})
        );
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            decode_query("a=1&b=%2A%20x&c&d=+").expect("valid"),
            [
                ("a".into(), "1".into()),
                ("b".into(), "* x".into()),
                ("c".into(), String::new()),
                ("d".into(), "+".into())
            ]
        );
        assert!(decode_query("a=%zz").is_none());
        assert!(decode_query("a=%f").is_none());
        assert!(decode_query("a=%ff").is_none());
    }

    #[test]
    fn rsa_test_key_loads() {
        let key = SigningKey::rsa_test_key("k");
        assert_eq!(key.public_modulus().len(), 256);
        assert_eq!(key.jwk()["e"], "AQAB");
        assert_eq!(key.sign(b"x").len(), 256);
    }
}
