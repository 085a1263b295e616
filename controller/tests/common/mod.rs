//! Test harness: starts the real controller in-process on an ephemeral
//! port, on SQLite (a temp dir) or on a fresh PostgreSQL database, and
//! calls it over HTTP.
#![allow(dead_code)]

use gantry_controller::clock::FakeClock;
use gantry_controller::Config;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ADMIN: &str = "test-admin-token-0123456789";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Defines `mod NAME { sqlite, postgres }`: the async test fn `NAME(Server)`
/// run on a fresh SQLite and a fresh PostgreSQL controller, with an
/// optional config tweak `|c: &mut Config| ...`. The PostgreSQL variant is
/// ignored by a plain `cargo test` (`./scripts/test` runs it) and fails
/// with a sentence when `GANTRY_TEST_PG_URL` is missing.
#[allow(unused_macros)]
macro_rules! on_both {
    ($name:ident $(, $tweak:expr)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use crate::common::{Backend, Server};
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                if let Some(s) = Server::start_with(Backend::Sqlite, tweak).await {
                    super::$name(s).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            #[ignore = "needs PostgreSQL: ./scripts/test runs it"]
            async fn postgres() {
                if let Some(s) = Server::start_with(Backend::Postgres, tweak).await {
                    super::$name(s).await;
                }
            }
            #[allow(unused_variables)]
            fn tweak(c: &mut gantry_controller::Config) {
                $( ($tweak)(c); )?
            }
        }
    };
}

/// The PostgreSQL server URL; a missing one fails the test with a sentence
/// (tests that need it are `#[ignore = "needs PostgreSQL: ./scripts/test
/// runs it"]`). Never `None`; the `Option` stays for existing callers.
pub fn pg_url() -> Option<String> {
    match std::env::var("GANTRY_TEST_PG_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => panic!(
            "GANTRY_TEST_PG_URL is not set: run ./scripts/test, or scripts/setup-postgres and \
             source .cache/env/postgres.env"
        ),
    }
}

/// A fresh, empty database on the PostgreSQL server at `url`.
pub async fn fresh_pg_db(url: &str) -> String {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let name = format!("gantry_t_{}", uuid::Uuid::new_v4().simple());
    let mut c = sqlx::AnyConnection::connect(url)
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .expect("create test database");
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{name}")
}

/// A fresh database of `backend` (SQLite in `dir`) migrated up to, not
/// including, migration `version`, for a test of that migration: the pool
/// (one connection) and the database URL; `None` where PostgreSQL is not
/// configured (see [`pg_url`]).
pub async fn db_before_migration(
    backend: Backend,
    dir: &std::path::Path,
    version: i64,
) -> Option<(sqlx::AnyPool, String)> {
    let (url, kind) = match backend {
        Backend::Sqlite => {
            let db = dir.join("c.db");
            (format!("sqlite://{}?mode=rwc", db.display()), "sqlite")
        }
        Backend::Postgres => (fresh_pg_db(&pg_url()?).await, "postgres"),
    };
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(kind);
    let mut m = sqlx::migrate::Migrator::new(src).await.unwrap();
    let old: Vec<_> = m
        .migrations
        .iter()
        .filter(|x| x.version < version)
        .cloned()
        .collect();
    m.migrations = old.into();
    m.run(&pool).await.unwrap();
    Some((pool, url))
}

pub struct Server {
    pub url: String,
    /// The controller's database (to look at rows directly).
    pub db_url: String,
    pub http: reqwest::Client,
    /// Simulated hosts: host id -> (credential, capacity).
    hosts: Mutex<HashMap<String, (String, Value)>>,
    /// The simulated agents' clock for `sent_at_ms` (only grows).
    sent_at: AtomicI64,
    /// The controller's billing clock: follows the system clock until a
    /// test sets it.
    pub clock: Arc<FakeClock>,
    /// The controller's state (to run a reconcile step directly).
    pub state: gantry_controller::AppState,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn error(&self) -> String {
        self.body["error"].as_str().unwrap_or_default().to_string()
    }
    pub fn field(&self) -> String {
        self.body["field"].as_str().unwrap_or_default().to_string()
    }
    pub fn id(&self) -> String {
        self.body["id"]
            .as_str()
            .expect("reply has an id")
            .to_string()
    }
}

impl Server {
    /// Starts a controller; `None` when the backend is not available.
    pub async fn start(backend: Backend) -> Option<Self> {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            rate_limit_per_second: 100_000,
            rate_limit_burst: 100_000,
            ..Config::default()
        };
        if backend == Backend::Postgres {
            let url = pg_url()?;
            cfg.database_url = Some(fresh_pg_db(&url).await);
        }
        tweak(&mut cfg);
        let db_url = cfg.database_url(dir.path());
        let clock = Arc::new(FakeClock::default());
        let state =
            gantry_controller::open_with_clock(cfg, dir.path(), Some(ADMIN.into()), clock.clone())
                .await
                .expect("controller starts");
        let listener = gantry_controller::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(gantry_controller::serve(state.clone(), listener, async {
            let _ = rx.await;
        }));
        Some(Self {
            url: format!("http://{addr}"),
            db_url,
            http: reqwest::Client::new(),
            hosts: Mutex::default(),
            sent_at: AtomicI64::new(chrono::Utc::now().timestamp_millis()),
            clock,
            state,
            _dir: dir,
            stop: Some(tx),
        })
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply { status, body }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Reply {
        self.raw(
            method,
            path,
            Some(token),
            body.map(|b| serde_json::to_vec(&b).unwrap()),
        )
        .await
    }

    /// A GET answered with text: status, content type, body.
    pub async fn text(&self, path: &str, token: &str) -> (u16, String, String) {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(token)
            .send()
            .await
            .expect("request sent");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (resp.status().as_u16(), ct, resp.text().await.unwrap())
    }

    /// The controller's database, for looking at rows.
    pub async fn db(&self) -> gantry_controller::db::Db {
        gantry_controller::db::Db::connect(&self.db_url, 2)
            .await
            .expect("database")
    }

    /// `GET /v1/agent/work?wait_secs=0&<query>` as `host`.
    pub async fn work_q(&self, host: &str, query: &str) -> Value {
        let cred = self.cred(host);
        self.ok(
            Method::GET,
            &format!("/v1/agent/work?wait_secs=0&{query}"),
            &cred,
            None,
            200,
        )
        .await
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        self.call(Method::POST, path, token, Some(body)).await
    }

    /// Asserts the status, showing the body when it differs.
    pub async fn ok(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        want: u16,
    ) -> Value {
        let r = self.call(method.clone(), path, token, body).await;
        assert_eq!(r.status, want, "{method} {path}: {}", r.body);
        r.body
    }

    /// An account (billing complete, credit 100 units) and a token for it.
    pub async fn account(&self, name: &str) -> (String, String) {
        let a = self
            .ok(
                Method::POST,
                "/v1/admin/accounts",
                ADMIN,
                Some(json!({"name": name, "billing_profile_complete": true})),
                201,
            )
            .await;
        let id = a["id"].as_str().unwrap().to_string();
        self.ok(
            Method::POST,
            &format!("/v1/admin/accounts/{id}/credits"),
            ADMIN,
            Some(json!({"amount_micros": 100_000_000, "note": "test"})),
            200,
        )
        .await;
        let t = self
            .ok(
                Method::POST,
                "/v1/admin/tokens",
                ADMIN,
                Some(json!({"name": format!("{name}-tok"), "account": id})),
                201,
            )
            .await;
        (id, t["token"].as_str().unwrap().to_string())
    }

    /// A fresh join token (admin).
    pub async fn join_token(&self) -> String {
        let t = self
            .ok(
                Method::POST,
                "/v1/admin/join-tokens",
                ADMIN,
                Some(json!({})),
                201,
            )
            .await;
        t["token"].as_str().unwrap().to_string()
    }

    /// The capacity body of a simulated host with `gpus` GPUs of `model`.
    pub fn capacity(model: &str, gpus: usize) -> Value {
        let gpus: Vec<Value> = (0..gpus)
            .map(|i| json!({"model": model, "pci": format!("0000:{:02x}:00.0", 0x10 + i)}))
            .collect();
        json!({"vcpus": 128, "memory_mib": 1_048_576, "disk_gib": 20_000, "gpus": gpus})
    }

    /// Joins a simulated host through the real protocol (join token, then
    /// its own credential) and returns its id.
    pub async fn host(&self, name: &str, model: &str, gpus: usize) -> String {
        let token = self.join_token().await;
        let cap = Self::capacity(model, gpus);
        let r = self
            .post(
                "/v1/agent/join",
                &token,
                json!({"name": name, "address": format!("{name}.example"), "capacity": cap}),
            )
            .await;
        assert_eq!(r.status, 201, "join: {}", r.body);
        let id = r.body["host"].as_str().unwrap().to_string();
        let cred = r.body["credential"].as_str().unwrap().to_string();
        self.hosts.lock().unwrap().insert(id.clone(), (cred, cap));
        id
    }

    /// Joins a simulated host with this capacity body (see
    /// [`Server::capacity`]); its heartbeats report it until
    /// [`Server::set_capacity`].
    pub async fn host_with(&self, name: &str, cap: Value) -> String {
        let token = self.join_token().await;
        let r = self
            .post(
                "/v1/agent/join",
                &token,
                json!({"name": name, "address": format!("{name}.example"), "capacity": cap}),
            )
            .await;
        assert_eq!(r.status, 201, "join: {}", r.body);
        let id = r.body["host"].as_str().unwrap().to_string();
        let cred = r.body["credential"].as_str().unwrap().to_string();
        self.hosts.lock().unwrap().insert(id.clone(), (cred, cap));
        id
    }

    /// What the simulated host's later heartbeats report as its capacity.
    pub fn set_capacity(&self, host: &str, cap: Value) {
        self.hosts.lock().unwrap().get_mut(host).unwrap().1 = cap;
    }

    /// Adds a host the test joined itself (or gives a simulated host its
    /// new credential after joining again): later heartbeats and polls use
    /// this credential and capacity.
    pub fn set_cred(&self, host: &str, cred: &str, cap: Value) {
        self.hosts
            .lock()
            .unwrap()
            .insert(host.to_string(), (cred.to_string(), cap));
    }

    /// The credential of a simulated host.
    pub fn cred(&self, host: &str) -> String {
        self.hosts.lock().unwrap()[host].0.clone()
    }

    /// A heartbeat of `host`: healthy, its capacity, nothing observed, no
    /// usage; `extra` replaces fields.
    pub async fn heartbeat(&self, host: &str, extra: Value) -> Reply {
        let (cred, cap) = self.hosts.lock().unwrap()[host].clone();
        let mut body = json!({
            "sent_at_ms": self.sent_at.fetch_add(1, Ordering::SeqCst) + 1,
            "capacity": cap, "health": "healthy", "instances": [], "usage": []
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.post("/v1/agent/heartbeat", &cred, body).await
    }

    /// `GET /v1/agent/work?wait_secs=N` as `host`.
    pub async fn work(&self, host: &str, wait_secs: u64) -> Value {
        let cred = self.cred(host);
        self.ok(
            Method::GET,
            &format!("/v1/agent/work?wait_secs={wait_secs}"),
            &cred,
            None,
            200,
        )
        .await
    }

    /// `?access_rev=R&tls=F&groups_rev=G&buckets_rev=B` of what `host` has
    /// now: a poll with them waits (like an agent's) instead of answering
    /// with the news.
    pub async fn known(&self, host: &str) -> String {
        let w = self.work(host, 0).await;
        format!(
            "access_rev={}&tls={}&groups_rev={}&buckets_rev={}",
            w["access"]["rev"].as_u64().unwrap_or(0),
            w["tls"]["fingerprint"].as_str().unwrap_or(""),
            w["groups"]["rev"].as_u64().unwrap_or(0),
            w["buckets"]["rev"].as_u64().unwrap_or(0)
        )
    }

    /// A work long poll of `host` that already has the host's access state
    /// and certificate, as an agent polls.
    pub async fn poll(&self, host: &str, wait_secs: u64) -> Value {
        let known = self.known(host).await;
        let cred = self.cred(host);
        self.ok(
            Method::GET,
            &format!("/v1/agent/work?wait_secs={wait_secs}&{known}"),
            &cred,
            None,
            200,
        )
        .await
    }

    /// Reports an operation of `host`.
    pub async fn report(&self, host: &str, op: &str, body: Value) -> Reply {
        let cred = self.cred(host);
        self.post(&format!("/v1/agent/ops/{op}"), &cred, body).await
    }

    /// The host an instance is on.
    pub async fn host_of(&self, instance: &str) -> String {
        let hw = self
            .ok(
                Method::GET,
                &format!("/v1/instances/{instance}/hardware"),
                ADMIN,
                None,
                200,
            )
            .await;
        hw["host"]
            .as_str()
            .expect("instance has a host")
            .to_string()
    }

    /// The unfinished operation of `instance` in its host's work, if any.
    pub async fn op_of(&self, instance: &str) -> Option<Value> {
        let host = self.host_of(instance).await;
        let w = self.work(&host, 0).await;
        w["ops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["instance"] == instance)
            .cloned()
    }

    /// Plays the instance's host reaching `state`, as an agent would: a
    /// settled state ends the instance's pending operation (not a
    /// snapshot: see [`Server::finish_snapshot`]) through an operation
    /// report; anything else arrives in a heartbeat.
    pub async fn observe(&self, instance: &str, state: &str) {
        let host = self.host_of(instance).await;
        let settles = ["Running", "Stopped", "Suspended", "Released", "Failed"].contains(&state);
        if let Some(op) = self.op_of(instance).await {
            if settles && op["command"]["kind"] != "snapshot" {
                let id = op["id"].as_str().unwrap();
                let r = self
                    .report(
                        &host,
                        id,
                        json!({"outcome": "succeeded", "progress": 100, "instance_state": state}),
                    )
                    .await;
                assert_eq!(r.status, 204, "{}", r.body);
                return;
            }
        }
        let r = self
            .heartbeat(
                &host,
                json!({"instances": [{"id": instance, "state": state}]}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    /// Reports the instance's pending snapshot operation as succeeded with
    /// these sizes (the instance back to Running).
    pub async fn finish_snapshot(&self, instance: &str, logical: u64, compressed: u64) -> Reply {
        let host = self.host_of(instance).await;
        let op = self.op_of(instance).await.expect("a snapshot operation");
        assert_eq!(op["command"]["kind"], "snapshot", "{op}");
        self.report(
            &host,
            op["id"].as_str().unwrap(),
            json!({"outcome": "succeeded", "progress": 100, "instance_state": "Running",
                "snapshot": {"logical_bytes": logical, "compressed_bytes": compressed}}),
        )
        .await
    }

    /// A host pre-registered by an admin (it has not joined).
    pub async fn registered_host(&self, name: &str, model: &str, gpus: usize) -> String {
        let gpus: Vec<Value> = (0..gpus)
            .map(|i| json!({"model": model, "pci": format!("0000:{:02x}:00.0", 0x10 + i)}))
            .collect();
        let h = self
            .ok(
                Method::POST,
                "/v1/admin/hosts",
                ADMIN,
                Some(
                    json!({"name": name, "address": format!("{name}.example"), "vcpus": 128,
                    "memory_mib": 1_048_576, "disk_gib": 20_000, "gpus": gpus}),
                ),
                201,
            )
            .await;
        h["id"].as_str().unwrap().to_string()
    }

    pub async fn flavor(&self, name: &str, model: Option<&str>, gpus: u32) -> String {
        let f = self
            .ok(
                Method::POST,
                "/v1/admin/flavors",
                ADMIN,
                Some(
                    json!({"name": name, "vcpus": 4, "memory_mib": 8192, "root_disk_gib": 50,
                    "gpu_model": model, "gpu_count": gpus, "price_micros_per_hour": 2_000_000}),
                ),
                201,
            )
            .await;
        f["id"].as_str().unwrap().to_string()
    }

    pub async fn image(&self, name: &str) -> String {
        let i = self
            .ok(
                Method::POST,
                "/v1/admin/images",
                ADMIN,
                Some(json!({"name": name, "size_gib": 10,
                    "origin": {"from": "file", "disk": format!("/srv/images/{name}.qcow2")}})),
                201,
            )
            .await;
        i["id"].as_str().unwrap().to_string()
    }
}

/// Polls `check` every 200 ms for up to 15 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for: {what}");
}
