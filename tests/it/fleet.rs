//! Fleet scale (issue "Fleet scale"): several gateways sharing a real Redis (`redis-server`
//! started by the test on a free loopback port) as a second cache level and invalidation bus,
//! in front of one IAM simulator.
//!
//! Without `redis-server` on the PATH these tests say so and pass; `MFA_GATE_REQUIRE_REDIS=1`
//! (set by CI) makes them fail instead.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::future::join_all;
use hmac::Mac;
use http::{Method, StatusCode};
use mfa_gate::app::Gateway;
use mfa_gate::cache::seal::{FleetEntry, FleetKeys};
use mfa_gate::config::Config;
use mfa_gate::dev::iam_sim::{self, Api, IamSim, SimUser, V5_ACCESS_KEY, V5_SECRET_KEY};
use mfa_gate::dev::upstream::DemoUpstream;
use mfa_gate::iam::{Identity, TokenStatus, UserFacts};

use crate::support::{config_text, metric_value, private_ca, send, Answer, LOOPBACK};

const SECRET: &[u8] = b"fleet-test-secret-0123456789abcdef0123456789";
const PREFIX: &str = "mfa-gate-test:";
const ADMIN_TOKEN: &str = "fleet-admin-token";

/// A `redis-server` of the test's own, on loopback, without persistence.
struct Redis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// With TLS: the CA's PEM and the password.
    tls: Option<(Vec<u8>, String)>,
}

impl Redis {
    /// `None` (after saying why) when `redis-server` is not installed and not required.
    fn start() -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var_os("MFA_GATE_REQUIRE_REDIS").is_none(),
                "MFA_GATE_REQUIRE_REDIS is set but redis-server is not on the PATH"
            );
            eprintln!("SKIPPED: redis-server is not on the PATH (apt-get install redis-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = spawn_redis(port, dir.path(), &[]);
        let redis = Redis {
            child,
            port,
            dir,
            tls: None,
        };
        redis.wait_ready();
        Some(redis)
    }

    /// TLS only (no plain port), with a certificate from a private CA and `requirepass`.
    fn start_tls(password: &str) -> Option<(Redis, rcgen::Certificate)> {
        let mut redis = Redis::start()?;
        redis.kill();
        let (ca, leaf, leaf_key) = private_ca("127.0.0.1");
        let dir = redis.dir.path().to_path_buf();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("leaf.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("leaf.key"), leaf_key.serialize_pem()).unwrap();
        let port = redis.port.to_string();
        let args = [
            "--port",
            "0",
            "--tls-port",
            &port,
            "--tls-cert-file",
            &dir.join("leaf.pem").display().to_string(),
            "--tls-key-file",
            &dir.join("leaf.key").display().to_string(),
            "--tls-ca-cert-file",
            &dir.join("ca.pem").display().to_string(),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            password,
        ]
        .map(str::to_string);
        redis.child = spawn_redis(redis.port, &dir, &args);
        redis.tls = Some((ca.pem().into_bytes(), password.to_string()));
        redis.wait_ready();
        Some((redis, ca))
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn client(&self) -> redis::Client {
        match &self.tls {
            None => redis::Client::open(self.url()).unwrap(),
            Some((ca, password)) => redis::Client::build_with_tls(
                format!("rediss://:{password}@127.0.0.1:{}", self.port),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )
            .unwrap(),
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut connection) = self.client().get_connection() {
                if redis::cmd("PING").query::<String>(&mut connection).is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A new, empty Redis on the same port.
    fn restart(&mut self) {
        self.kill();
        self.child = spawn_redis(self.port, self.dir.path(), &[]);
        self.wait_ready();
    }

    fn connection(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }

    fn entry_keys(&self) -> Vec<String> {
        redis::cmd("KEYS")
            .arg(format!("{PREFIX}e:*"))
            .query(&mut self.connection())
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `extra` comes last, so it may override `--port`.
fn spawn_redis(port: u16, dir: &Path, extra: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts")
}

/// Gateways sharing one Redis, one IAM simulator and one upstream.
struct Fleet {
    gateways: Vec<Gateway>,
    sim: IamSim,
    _upstream: DemoUpstream,
    users: Vec<SimUser>,
    /// Holds the secret, admin token and AK/SK files.
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(redis_url: &str, size: usize, extra: &str) -> Fleet {
        let users = iam_sim::demo_users(Duration::from_secs(3600));
        let sim = IamSim::start(LOOPBACK.into(), users.clone()).await.unwrap();
        let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        std::fs::write(dir.path().join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
        std::fs::write(dir.path().join("ak"), V5_ACCESS_KEY).unwrap();
        std::fs::write(dir.path().join("sk"), V5_SECRET_KEY).unwrap();
        // Generous Redis timeouts: under a loaded CI machine a 100 ms command timeout would
        // (correctly) make a gateway skip Redis, and these tests are about what Redis is used for.
        let extra = format!(
            "[admin]\ntoken_file = \"{d}/admin-token\"\n\
             [iam.v5]\nendpoint = \"{sim}\"\nak_file = \"{d}/ak\"\nsk_file = \"{d}/sk\"\n\
             [cache.shared]\nredis_url = \"{redis_url}\"\nkey_prefix = \"{PREFIX}\"\n\
             secret_file = \"{d}/secret\"\ncommand_timeout = \"2s\"\nconnect_timeout = \"2s\"\n{extra}",
            d = dir.path().display(),
            sim = sim.url(),
        );
        let text = config_text(&sim.url(), &upstream.url(), &extra);
        let mut gateways = Vec::new();
        for _ in 0..size {
            let config = Config::from_toml(&text, Path::new("fleet.toml"))
                .unwrap_or_else(|err| panic!("fleet config refused: {err}\n{text}"));
            gateways.push(Gateway::start(config).await.unwrap());
        }
        let fleet = Fleet {
            gateways,
            sim,
            _upstream: upstream,
            users,
            _dir: dir,
        };
        for index in 0..size {
            fleet.wait_channel(index).await;
        }
        fleet
    }

    fn user(&self, name: &str) -> &SimUser {
        self.users.iter().find(|u| u.user_name == name).unwrap()
    }

    /// A new IAM user with a virtual MFA device, known to no cache.
    fn fresh_user(&self) -> SimUser {
        let mut user = iam_sim::demo_users(Duration::from_secs(3600)).remove(0);
        user.user_name = format!("fresh-{}", &user.user_id[..8]);
        self.sim.add_user(user.clone());
        user
    }

    async fn get(&self, gateway: usize, token: &str) -> Answer {
        let url = format!("http://{}/app", self.gateways[gateway].addr);
        send(Method::GET, &url, &[("x-auth-token", token)], Bytes::new()).await
    }

    async fn admin(&self, gateway: usize, path: &str) -> Answer {
        let url = format!("http://{}{path}", self.gateways[gateway].admin_addr);
        let bearer = format!("Bearer {ADMIN_TOKEN}");
        send(
            Method::POST,
            &url,
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await
    }

    fn metric(&self, gateway: usize, sample: &str) -> f64 {
        metric_value(&self.gateways[gateway].metrics.render(), sample)
    }

    fn shared(&self, gateway: usize, result: &str) -> f64 {
        self.metric(
            gateway,
            &format!("mfa_gate_shared_cache_requests_total{{result=\"{result}\"}}"),
        )
    }

    /// A fresh token asked at gateway 0 is stored in Redis, and gateway 1 answers it from
    /// there: one IAM verification for both.
    async fn assert_shared_from_0_to_1(&self, redis: &Redis) {
        let user = self.fresh_user();
        self.sim.reset_calls();
        let hits = self.shared(1, "hit");
        assert_eq!(self.get(0, &user.token).await.status, StatusCode::OK);
        let (_, entry_key) = Fleet::entry_key(&user.token);
        let stored = within(Duration::from_secs(2), || async {
            redis.entry_keys().contains(&entry_key)
        })
        .await;
        assert!(stored.is_some(), "gateway 0 stored nothing in Redis");
        assert_eq!(self.get(1, &user.token).await.status, StatusCode::OK);
        assert_eq!(self.sim.calls(Api::VerifyToken), 1, "gateway 1 read Redis");
        assert_eq!(self.shared(1, "hit"), hits + 1.0);
    }

    /// Waits until the gateway's invalidation channel is subscribed: its first purge
    /// message would be missed otherwise (a Redis PUBSUB NUMSUB would also do).
    async fn wait_channel(&self, gateway: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metric(gateway, "mfa_gate_shared_cache_up") != 1.0 {
            assert!(
                Instant::now() < deadline,
                "gateway {gateway}: Redis never up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// The Redis key of a token's entry, as the fleet computes it.
    fn entry_key(token: &str) -> ([u8; 32], String) {
        let keys = FleetKeys::derive(SECRET);
        let key: [u8; 32] = keys
            .token_mac()
            .clone()
            .chain_update(token.as_bytes())
            .finalize()
            .into_bytes()
            .into();
        (key, format!("{PREFIX}e:{}", hex::encode(key)))
    }
}

/// Polls `check` every 10 ms for up to `within`; answers how long it took to hold.
async fn within<F, Fut>(within: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_iam_fetch_per_token_for_the_whole_fleet() {
    let Some(redis) = Redis::start() else { return };
    let fleet = Fleet::start(&redis.url(), 3, "").await;
    let user = fleet.fresh_user();
    fleet.sim.reset_calls();

    // 3 gateways × 50 concurrent requests with one token nobody has seen.
    let requests = (0..150).map(|i| fleet.get(i % 3, &user.token));
    let answers = join_all(requests).await;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(
            answer.seen_header("x-auth-user-id").as_deref(),
            Some(user.user_id.as_str())
        );
    }
    assert_eq!(fleet.sim.calls(Api::VerifyToken), 1, "verify calls");
    assert_eq!(fleet.sim.calls(Api::MfaDevice), 1, "MFA device calls");
    // One gateway fetched; the two others took its answer from Redis.
    let hits: f64 = (0..3).map(|g| fleet.shared(g, "hit")).sum();
    let misses: f64 = (0..3).map(|g| fleet.shared(g, "miss")).sum();
    assert_eq!((hits, misses), (2.0, 1.0));
    let (_, entry_key) = Fleet::entry_key(&user.token);
    assert_eq!(redis.entry_keys(), vec![entry_key.clone()]);

    // The stored value is sealed: neither the token nor the identity can be read from Redis.
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&entry_key)
        .query(&mut redis.connection())
        .unwrap();
    let text = String::from_utf8_lossy(&value);
    for secret in [&user.token, &user.user_id, &user.user_name] {
        assert!(
            !text.contains(secret.as_str()),
            "{secret} readable in Redis"
        );
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut redis.connection())
        .unwrap();
    assert!(
        keys.iter()
            .all(|k| !k.contains(&user.token) && !k.contains(&user.user_id)),
        "{keys:?}"
    );
    // Redis' TTL is the entry's fresh lifetime: cache.ttl (5m) at most.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&entry_key)
        .query(&mut redis.connection())
        .unwrap();
    assert!(ttl > 0 && ttl <= 300_000, "PTTL {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_one_gateway_blocks_the_user_on_all_within_a_second() {
    let Some(redis) = Redis::start() else { return };
    let fleet = Fleet::start(&redis.url(), 3, "").await;
    let alice = fleet.user("alice").clone();
    for g in 0..3 {
        assert_eq!(fleet.get(g, &alice.token).await.status, StatusCode::OK);
    }
    // The device goes away in the IAM: every gateway still trusts its cached "has MFA".
    fleet.sim.set_mfa_device(&alice.user_id, None);
    assert_eq!(fleet.get(1, &alice.token).await.status, StatusCode::OK);

    let answer = fleet
        .admin(0, &format!("/admin/cache/purge?user_id={}", alice.user_id))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["purged"], 1);
    assert_eq!(answer.json()["fleet"], "published");
    for g in 1..3 {
        let took = within(Duration::from_secs(1), || async {
            fleet.get(g, &alice.token).await.status == StatusCode::FORBIDDEN
        })
        .await;
        assert!(took.is_some(), "gateway {g} still lets alice in after 1 s");
        assert_eq!(
            fleet.metric(
                g,
                "mfa_gate_shared_cache_invalidations_total{event=\"received\"}"
            ),
            1.0
        );
    }
    assert_eq!(
        fleet.metric(
            0,
            "mfa_gate_shared_cache_invalidations_total{event=\"published\"}"
        ),
        1.0
    );
    // The others' entries of bob were not touched.
    let bob = fleet.user("bob").clone();
    fleet.sim.reset_calls();
    let _ = fleet.get(2, &bob.token).await;
    let _ = fleet.get(2, &bob.token).await;
    assert_eq!(fleet.sim.calls(Api::VerifyToken), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_device_through_one_gateway_blocks_the_user_on_all() {
    let Some(redis) = Redis::start() else { return };
    let fleet = Fleet::start(&redis.url(), 2, "").await;
    let alice = fleet.user("alice").clone();
    for g in 0..2 {
        assert_eq!(fleet.get(g, &alice.token).await.status, StatusCode::OK);
    }
    let answer = fleet
        .admin(
            0,
            &format!("/admin/users/{}/mfa-devices/disable", alice.user_id),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["fleet"], "published");
    assert!(fleet.sim.mfa_devices(&alice.user_id).is_empty());
    let took = within(Duration::from_secs(1), || async {
        fleet.get(1, &alice.token).await.status == StatusCode::FORBIDDEN
    })
    .await;
    assert!(took.is_some(), "gateway 1 still lets alice in after 1 s");
    // What Redis holds for alice now, if anything, is the new answer: no device.
    let (alice_raw, alice_key) = Fleet::entry_key(&alice.token);
    let value: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&alice_key)
        .query(&mut redis.connection())
        .unwrap();
    if let Some(value) = value {
        let entry = FleetKeys::derive(SECRET)
            .open_entry(&alice_raw, &value)
            .unwrap();
        match entry.status {
            TokenStatus::Valid(facts) => assert_eq!(facts.mfa_device, Some(false)),
            TokenStatus::Invalid => panic!("alice's token is valid"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_fails_no_request_and_an_empty_restart_is_repopulated() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let fleet = Fleet::start(&redis.url(), 2, "").await;
    let alice = fleet.user("alice").clone();
    let carol = fleet.user("carol").clone();
    for g in 0..2 {
        assert_eq!(fleet.get(g, &alice.token).await.status, StatusCode::OK);
    }

    redis.kill();
    // Every request that would pass passes; every one that would not, does not.
    let mut fresh_users = Vec::new();
    for round in 0..20 {
        let g = round % 2;
        assert_eq!(fleet.get(g, &alice.token).await.status, StatusCode::OK);
        assert_eq!(
            fleet.get(g, &carol.token).await.status,
            StatusCode::FORBIDDEN
        );
        let fresh = fleet.fresh_user();
        let before = fleet.sim.calls(Api::VerifyToken);
        let answer = fleet.get(g, &fresh.token).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        // The IAM answers in Redis' place.
        assert_eq!(fleet.sim.calls(Api::VerifyToken), before + 1);
        fresh_users.push(fresh);
    }
    for g in 0..2 {
        assert_eq!(fleet.metric(g, "mfa_gate_shared_cache_up"), 0.0);
        assert!(fleet.shared(g, "error") >= 10.0);
    }
    // A purge now drops the local entries; the operator learns that the fleet was not told.
    let answer = fleet
        .admin(0, &format!("/admin/cache/purge?user_id={}", carol.user_id))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["purged"], 1);
    assert_eq!(answer.json()["fleet"], "failed");

    // Back, empty: the gateways find it by themselves and fill it again.
    redis.restart();
    for g in 0..2 {
        let up = within(Duration::from_secs(5), || async {
            fleet.metric(g, "mfa_gate_shared_cache_up") == 1.0
        })
        .await;
        assert!(up.is_some(), "gateway {g} never saw Redis again");
    }
    let resynced = within(Duration::from_secs(5), || async {
        (0..2).all(|g| {
            fleet.metric(
                g,
                "mfa_gate_shared_cache_invalidations_total{event=\"resync\"}",
            ) >= 1.0
        })
    })
    .await;
    assert!(
        resynced.is_some(),
        "the invalidation channel did not come back"
    );
    assert!(redis.entry_keys().is_empty());
    fleet.assert_shared_from_0_to_1(&redis).await;
    // Local entries learnt while the channel was down were dropped (purges may have been
    // missed): alice is looked up again, from the IAM or the refilled Redis.
    fleet.sim.reset_calls();
    assert_eq!(fleet.get(1, &alice.token).await.status, StatusCode::OK);
    assert_eq!(fleet.sim.calls(Api::VerifyToken), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_moved_or_tampered_redis_values_are_rejected_never_trusted() {
    let Some(redis) = Redis::start() else { return };
    let fleet = Fleet::start(&redis.url(), 2, "").await;
    let alice = fleet.user("alice").clone();
    let carol = fleet.user("carol").clone();
    let bob = fleet.user("bob").clone();
    assert_eq!(fleet.get(0, &alice.token).await.status, StatusCode::OK);
    assert_eq!(
        fleet.get(0, &carol.token).await.status,
        StatusCode::FORBIDDEN
    );
    let (_, alice_key) = Fleet::entry_key(&alice.token);
    let (carol_raw, carol_key) = Fleet::entry_key(&carol.token);
    let (bob_raw, bob_key) = Fleet::entry_key(&bob.token);
    let stored = within(Duration::from_secs(2), || async {
        let keys = redis.entry_keys();
        keys.contains(&alice_key) && keys.contains(&carol_key)
    })
    .await;
    assert!(stored.is_some());
    let mut connection = redis.connection();

    // 1. Alice's genuine "has MFA" entry copied under carol's key.
    let alice_value: Vec<u8> = redis::cmd("GET")
        .arg(&alice_key)
        .query(&mut connection)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&carol_key)
        .arg(&alice_value)
        .query(&mut connection)
        .unwrap();
    // 2. A "has MFA" entry for bob sealed under another secret (an attacker's).
    let forged = FleetKeys::derive(b"an attacker's guess at the secret!!").seal_entry(
        &bob_raw,
        &FleetEntry {
            status: TokenStatus::Valid(std::sync::Arc::new(UserFacts {
                identity: Identity::new(
                    &bob.user_id,
                    &bob.user_name,
                    &bob.domain_id,
                    &bob.domain_name,
                )
                .unwrap(),
                expires_at: SystemTime::now() + Duration::from_secs(3600),
                totp_login: true,
                mfa_device: Some(true),
                login_protect: None,
            })),
            fresh_until: SystemTime::now() + Duration::from_secs(3600),
        },
    );
    let _: () = redis::cmd("SET")
        .arg(&bob_key)
        .arg(forged)
        .query(&mut connection)
        .unwrap();
    // 3. Alice's own entry with one bit flipped.
    let mut tampered = alice_value.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x80;
    let _: () = redis::cmd("SET")
        .arg(&alice_key)
        .arg(tampered)
        .query(&mut connection)
        .unwrap();
    // 4. A key of another type where a fresh user's entry would be.
    let dave = fleet.fresh_user();
    let (_, dave_key) = Fleet::entry_key(&dave.token);
    let _: () = redis::cmd("RPUSH")
        .arg(&dave_key)
        .arg("has-mfa")
        .query(&mut connection)
        .unwrap();

    // Gateway 1 has nothing local: it reads each value, rejects it, asks the IAM.
    fleet.sim.reset_calls();
    assert_eq!(
        fleet.get(1, &carol.token).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(fleet.get(1, &bob.token).await.status, StatusCode::FORBIDDEN);
    assert_eq!(fleet.get(1, &alice.token).await.status, StatusCode::OK);
    assert_eq!(fleet.get(1, &dave.token).await.status, StatusCode::OK);
    assert_eq!(fleet.sim.calls(Api::VerifyToken), 4);
    assert_eq!(fleet.shared(1, "rejected"), 4.0);
    assert_eq!(fleet.shared(1, "hit"), 0.0);
    // Garbage is not an outage: Redis stays in use.
    assert_eq!(fleet.metric(1, "mfa_gate_shared_cache_up"), 1.0);
    assert_eq!(fleet.shared(1, "error"), 0.0);
    // And the garbage is replaced by genuine answers.
    let replaced = within(Duration::from_secs(2), || async {
        let value: Vec<u8> = redis::cmd("GET")
            .arg(&carol_key)
            .query(&mut redis.connection())
            .unwrap_or_default();
        FleetKeys::derive(SECRET)
            .open_entry(&carol_raw, &value)
            .is_ok_and(|entry| match entry.status {
                TokenStatus::Valid(facts) => facts.identity.user_id() == carol.user_id,
                TokenStatus::Invalid => false,
            })
    })
    .await;
    assert!(
        replaced.is_some(),
        "carol's key still holds the copied value"
    );

    // A purge message that does not open under the fleet's key is ignored, and counted.
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("{PREFIX}invalidate"))
        .arg(br#"{"origin":"attacker","user_id":null}"#.as_slice())
        .query(&mut connection)
        .unwrap();
    let counted = within(Duration::from_secs(2), || async {
        fleet.shared(1, "rejected") == 5.0
    })
    .await;
    assert!(
        counted.is_some(),
        "the forged purge message was not counted"
    );
    fleet.sim.reset_calls();
    assert_eq!(fleet.get(1, &alice.token).await.status, StatusCode::OK);
    assert_eq!(
        fleet.sim.calls(Api::VerifyToken),
        0,
        "the forged purge was obeyed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_never_answers_only_costs_the_command_timeout() {
    // Accepts connections and never answers a byte: a hung Redis.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let fleet = Fleet::start_unchecked(
        &format!("redis://{addr}"),
        "connect_timeout = \"300ms\"\ncommand_timeout = \"50ms\"\n",
    )
    .await;
    let alice = fleet.user("alice").clone();
    let carol = fleet.user("carol").clone();
    assert_eq!(fleet.get(0, &alice.token).await.status, StatusCode::OK);
    assert_eq!(
        fleet.get(0, &carol.token).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(fleet.metric(0, "mfa_gate_shared_cache_up"), 0.0);
    assert_eq!(fleet.shared(0, "error"), 2.0);
    assert_eq!(fleet.shared(0, "hit") + fleet.shared(0, "miss"), 0.0);
}

impl Fleet {
    /// One gateway whose Redis is not expected to come up.
    async fn start_unchecked(redis_url: &str, shared_extra: &str) -> Fleet {
        let users = iam_sim::demo_users(Duration::from_secs(3600));
        let sim = IamSim::start(LOOPBACK.into(), users.clone()).await.unwrap();
        let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        let extra = format!(
            "[cache.shared]\nredis_url = \"{redis_url}\"\nsecret_file = \"{}\"\n{shared_extra}",
            dir.path().join("secret").display()
        );
        let text = config_text(&sim.url(), &upstream.url(), &extra);
        let config = Config::from_toml(&text, Path::new("fleet.toml")).unwrap();
        let gateway = Gateway::start(config).await.unwrap();
        Fleet {
            gateways: vec![gateway],
            sim,
            _upstream: upstream,
            users,
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_password_file() {
    let Some((redis, _ca)) = Redis::start_tls("fleet-redis-password") else {
        return;
    };
    let dir = redis.dir.path().to_path_buf();
    std::fs::write(dir.join("password"), "fleet-redis-password\n").unwrap();
    std::fs::write(dir.join("wrong-password"), "not-the-password\n").unwrap();
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let shared = |password: &str, ca: bool| {
        let mut text = format!("password_file = \"{}\"\n", dir.join(password).display());
        if ca {
            text.push_str(&format!("ca_file = \"{}\"\n", dir.join("ca.pem").display()));
        }
        text
    };
    let fleet = Fleet::start(&url, 2, &shared("password", true)).await;
    fleet.assert_shared_from_0_to_1(&redis).await;

    // A server the gateway cannot verify (no ca_file: system roots only), or a wrong
    // password: the shared cache is down, requests are served from the IAM as usual.
    for extra in [shared("password", false), shared("wrong-password", true)] {
        let fleet = Fleet::start_unchecked(&url, &extra).await;
        let alice = fleet.user("alice").clone();
        assert_eq!(fleet.get(0, &alice.token).await.status, StatusCode::OK);
        assert_eq!(fleet.metric(0, "mfa_gate_shared_cache_up"), 0.0, "{extra}");
        assert_eq!(fleet.shared(0, "error"), 1.0, "{extra}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_share_answers_and_purges() {
    let Some(redis) = Redis::start() else { return };
    let users = iam_sim::demo_users(Duration::from_secs(3600));
    let sim = IamSim::start(LOOPBACK.into(), users.clone()).await.unwrap();
    let upstream = DemoUpstream::start(LOOPBACK.into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let text = config_text(
        &sim.url(),
        &upstream.url(),
        &format!(
            "[cache.shared]\nredis_url = \"{}\"\nkey_prefix = \"{PREFIX}\"\nsecret_file = \"{}\"\ncommand_timeout = \"2s\"\n",
            redis.url(),
            dir.path().join("secret").display()
        ),
    );
    let config = dir.path().join("gate.toml");
    std::fs::write(&config, text).unwrap();
    let (first, first_addr, first_admin) = crate::cli::Process::start(&config).await;
    let (second, second_addr, _) = crate::cli::Process::start(&config).await;
    let get = |addr: &str, token: &str| {
        let url = format!("http://{addr}/app");
        let token = token.to_string();
        async move { send(Method::GET, &url, &[("x-auth-token", &token)], Bytes::new()).await }
    };

    let alice = users[0].clone();
    sim.reset_calls();
    assert_eq!(get(&first_addr, &alice.token).await.status, StatusCode::OK);
    let (_, alice_key) = Fleet::entry_key(&alice.token);
    let stored = within(Duration::from_secs(2), || async {
        redis.entry_keys().contains(&alice_key)
    })
    .await;
    assert!(stored.is_some(), "the first process stored nothing");
    assert_eq!(get(&second_addr, &alice.token).await.status, StatusCode::OK);
    assert_eq!(
        sim.calls(Api::VerifyToken),
        1,
        "the second process read Redis"
    );

    sim.set_mfa_device(&alice.user_id, None);
    let purge = format!(
        "http://{first_admin}/admin/cache/purge?user_id={}",
        alice.user_id
    );
    assert_eq!(
        send(Method::POST, &purge, &[], Bytes::new()).await.status,
        StatusCode::OK
    );
    let denied = within(Duration::from_secs(1), || async {
        get(&second_addr, &alice.token).await.status == StatusCode::FORBIDDEN
    })
    .await;
    assert!(denied.is_some(), "the second process still lets alice in");

    for process in [first, second] {
        let (code, lines) = process.terminate().await;
        assert_eq!(code, Some(0));
        let log = lines.join("\n");
        assert!(!log.contains(&alice.token), "a token in the logs");
        assert!(
            log.contains("fleet purge") || log.contains("cache_purge"),
            "{log}"
        );
    }
}
