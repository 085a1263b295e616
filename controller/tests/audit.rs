//! Audit durability and audit spam, idempotency keys, refusal sentences,
//! the admin token rule, private state files and SQLite durability, over
//! real HTTP on SQLite and (where marked) PostgreSQL.

#[macro_use]
mod common;

use common::{Backend, Server, ADMIN};
use gantry_controller::db::Db;
use reqwest::Method;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;

on_both!(refusals_say_why);
on_both!(audit_row_is_written_ahead);
on_both!(unauditable_calls_do_not_run);
on_both!(idempotency_keys);

async fn refusals_say_why(s: Server) {
    let (acct, tok) = s.account("acme").await;
    let cases = [
        (
            None,
            "a bearer token is required (Authorization: Bearer ...)".to_string(),
        ),
        (
            Some("wrong-token-xxxxxxxxxxxx".to_string()),
            "the bearer token is not valid (unknown token or wrong secret)".into(),
        ),
        (
            Some(format!("{}0000", &tok[..tok.len() - 4])),
            "the bearer token is not valid (unknown token or wrong secret)".into(),
        ),
    ];
    for (t, want) in cases {
        let r = s.raw(Method::GET, "/v1/flavors", t.as_deref(), None).await;
        assert_eq!((r.status, r.error()), (401, want));
    }
    let toks = s.get("/v1/admin/tokens", ADMIN).await.body;
    let tid = toks[0]["id"].as_str().unwrap();
    let path = format!("/v1/admin/tokens/{tid}");
    s.ok(Method::DELETE, &path, ADMIN, None, 200).await;
    let r = s.get("/v1/flavors", &tok).await;
    assert_eq!(
        (r.status, r.error()),
        (
            401,
            "this token was revoked by an admin; ask an admin for a new one".into()
        )
    );
    // A revoked token of a disabled account is still just revoked.
    let path = format!("/v1/admin/accounts/{acct}/disable");
    s.ok(Method::POST, &path, ADMIN, None, 200).await;
    assert_eq!(s.get("/v1/flavors", &tok).await.status, 401);
    // 405: the standard error body, naming the allowed methods.
    let r = s.call(Method::PUT, "/v1/volumes", ADMIN, None).await;
    assert_eq!(
        (r.status, r.error()),
        (
            405,
            "method PUT is not allowed on this path (allowed: POST, GET, HEAD)".into()
        ),
        "{}",
        r.body
    );
    let r = s.raw(Method::POST, "/healthz", None, None).await;
    assert_eq!(
        (r.status, r.error()),
        (
            405,
            "method POST is not allowed on this path (allowed: GET, HEAD)".into()
        )
    );
}

/// A trigger (on both backends) that makes `stmt` on `audit_log` fail when
/// `cond` holds.
async fn audit_trigger(db: &Db, name: &str, stmt: &str, cond: &str) {
    let sqls = match db.backend {
        gantry_controller::db::Backend::Sqlite => vec![format!(
            "CREATE TRIGGER {name} BEFORE {stmt} ON audit_log WHEN {cond} BEGIN \
             SELECT RAISE(ABORT, 'audit writes fail (test)'); END"
        )],
        gantry_controller::db::Backend::Postgres => vec![
            format!(
                "CREATE FUNCTION {name}() RETURNS trigger AS $$ BEGIN \
                 RAISE EXCEPTION 'audit writes fail (test)'; END $$ LANGUAGE plpgsql"
            ),
            format!(
                "CREATE TRIGGER {name} BEFORE {stmt} ON audit_log FOR EACH ROW WHEN ({cond}) \
                 EXECUTE FUNCTION {name}()"
            ),
        ],
    };
    for sql in sqls {
        sqlx::query(&sql).execute(&db.pool).await.unwrap();
    }
}

async fn accounts_named(s: &Server, name: &str) -> usize {
    let all = s.get("/v1/admin/accounts", ADMIN).await.body;
    all.as_array()
        .unwrap()
        .iter()
        .filter(|a| a["name"] == name)
        .count()
}

/// A change committed by its handler keeps its audit row even when the
/// outcome cannot be written (as when the controller is killed between
/// the two): the row is there, its outcome unknown.
async fn audit_row_is_written_ahead(s: Server) {
    let db = s.db().await;
    audit_trigger(&db, "no_outcome", "UPDATE", "1 = 1").await;
    // The old way (one row written after the handler) fails here too.
    audit_trigger(&db, "no_late_row", "INSERT", "NEW.status <> 0").await;
    let r = s
        .post("/v1/admin/accounts", ADMIN, json!({"name": "kept"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(accounts_named(&s, "kept").await, 1);
    let log = s.get("/v1/admin/audit", ADMIN).await.body;
    let rows: Vec<&Value> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"] == "/v1/admin/accounts" && e["method"] == "POST")
        .collect();
    assert_eq!(rows.len(), 1, "{log}");
    assert_eq!(rows[0]["status"], 0);
    assert_eq!(rows[0]["actor"], "bootstrap-admin");
    assert_eq!(rows[0]["note"], gantry_controller::audit::NO_OUTCOME);
}

/// A call whose audit row cannot be written is not run.
async fn unauditable_calls_do_not_run(s: Server) {
    let db = s.db().await;
    audit_trigger(&db, "no_rows", "INSERT", "1 = 1").await;
    let r = s
        .post("/v1/admin/accounts", ADMIN, json!({"name": "ghost"}))
        .await;
    assert_eq!(
        (r.status, r.error()),
        (
            503,
            "the call cannot be audited right now, so it was not run; retry shortly".into()
        )
    );
    assert_eq!(accounts_named(&s, "ghost").await, 0);
}

async fn keyed(s: &Server, path: &str, token: &str, key: &str, body: Value) -> (u16, Value, bool) {
    let r = s
        .http
        .post(format!("{}{path}", s.url))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let replayed = r.headers().get("idempotency-replayed").is_some();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null), replayed)
}

async fn credit(s: &Server, acct: &str) -> i64 {
    let a = s
        .get(&format!("/v1/admin/accounts/{acct}"), ADMIN)
        .await
        .body;
    a["credit_micros"].as_i64().unwrap()
}

async fn idempotency_keys(s: Server) {
    let (acct, tok) = s.account("payer").await;
    let path = format!("/v1/admin/accounts/{acct}/credits");
    let body = json!({"amount_micros": 5_000_000, "note": "top-up"});
    let first = keyed(&s, &path, ADMIN, "k-1", body.clone()).await;
    assert_eq!((first.0, first.2), (200, false), "{}", first.1);
    // A retry replays the answer; the credit moved once.
    let again = keyed(&s, &path, ADMIN, "k-1", body.clone()).await;
    assert_eq!(again, (200, first.1.clone(), true));
    assert_eq!(credit(&s, &acct).await, 105_000_000);
    // The same key for another request: 422 naming the header.
    let other = json!({"amount_micros": 6_000_000, "note": "top-up"});
    let (code, b, _) = keyed(&s, &path, ADMIN, "k-1", other).await;
    assert_eq!(
        (code, b["field"].as_str()),
        (422, Some("Idempotency-Key")),
        "{b}"
    );
    let (code, b, _) = keyed(&s, &path, ADMIN, "bad key", body.clone()).await;
    assert_eq!(
        (code, b["field"].as_str()),
        (400, Some("Idempotency-Key")),
        "{b}"
    );
    // Keys are per caller: a tenant's k-1 is its own (a volume, created once).
    let vol = json!({"name": "v", "size_gib": 10});
    let v1 = keyed(&s, "/v1/volumes", &tok, "k-1", vol.clone()).await;
    assert_eq!(v1.0, 201, "{}", v1.1);
    let v2 = keyed(&s, "/v1/volumes", &tok, "k-1", vol).await;
    assert_eq!((v2.0, &v2.1["id"], v2.2), (201, &v1.1["id"], true));
    assert_eq!(
        s.get("/v1/volumes", &tok)
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Instance creates too: one instance, the same answer.
    s.host("h", "none", 0).await;
    let f = s.flavor("c", None, 0).await;
    let img = s.image("ubuntu").await;
    let ins = json!({"name": "web", "flavor": f, "image": img});
    let i1 = keyed(&s, "/v1/instances", &tok, "create-web", ins.clone()).await;
    assert_eq!(i1.0, 202, "{}", i1.1);
    let i2 = keyed(&s, "/v1/instances", &tok, "create-web", ins).await;
    assert_eq!(i2, (202, i1.1.clone(), true));
    let all = s.get("/v1/instances", &tok).await.body;
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    // A first request that never answered (killed): 409, never run twice.
    let db = s.db().await;
    sqlx::query("UPDATE idempotency_keys SET status = NULL WHERE idem_key = 'k-1' AND actor = 'bootstrap-admin'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (code, b, _) = keyed(&s, &path, ADMIN, "k-1", body.clone()).await;
    assert_eq!(code, 409, "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .starts_with("Idempotency-Key \"k-1\": the first request"),
        "{b}"
    );
    assert_eq!(credit(&s, &acct).await, 105_000_000);
    // After 24 h the key is forgotten (and pruned).
    let day = 24 * 3600 * 1000 + 1000;
    sqlx::query("UPDATE idempotency_keys SET created_ms = created_ms - $1")
        .bind(day as i64)
        .execute(&db.pool)
        .await
        .unwrap();
    let late = keyed(&s, &path, ADMIN, "k-1", body).await;
    assert_eq!((late.0, late.2), (200, false));
    assert_eq!(credit(&s, &acct).await, 110_000_000);
    let now = chrono::Utc::now().timestamp_millis();
    gantry_controller::api::idempotency::prune(&s.state, now).await;
    let left: Vec<String> = sqlx::query_scalar("SELECT idem_key FROM idempotency_keys")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, vec!["k-1".to_string()], "only the fresh key is left");
}

/// Refused requests without a valid token leave no audit rows, however
/// many and however long; they are counted in the metrics. Known callers'
/// rows have bounded paths.
#[tokio::test]
async fn anonymous_refusals_are_counted_not_audited() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let (_, tok) = s.account("acme").await;
    let long = format!("/v1/instances/{}/actions", "a".repeat(20_000));
    for i in 0..40 {
        let t = (i % 2 == 0).then_some("gty_forged_0000");
        let r = s.raw(Method::POST, &long, t, Some(b"{}".to_vec())).await;
        assert!(r.status == 401 || r.status == 429, "{}", r.status);
    }
    let db = s.db().await;
    let anon: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE actor = 'anonymous'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(anon, 0);
    let (code, _, metrics) = s.text("/metrics", ADMIN).await;
    assert_eq!(code, 200);
    let count = |reason: &str| -> u64 {
        let key = format!("gantry_api_refused_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |n| n.parse().unwrap())
    };
    assert_eq!(
        count("missing") + count("unknown") + count("source_limited"),
        40,
        "{metrics}"
    );
    let r = s
        .raw(Method::POST, &long, Some(&tok), Some(b"{}".to_vec()))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let paths: Vec<String> =
        sqlx::query_scalar("SELECT path FROM audit_log WHERE path LIKE '/v1/instances/%'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(paths.len(), 1);
    assert_eq!(
        paths[0].chars().count(),
        gantry_controller::audit::MAX_PATH_CHARS
    );
}

/// With the peer address known (`ConnectInfo`), one source that sends too
/// many refused requests gets 429 with `Retry-After`; valid tokens from
/// the same address still work.
#[tokio::test]
async fn refusals_are_limited_per_source_address() {
    let dir = tempfile::tempdir().unwrap();
    let st = gantry_controller::open(Default::default(), dir.path(), Some(ADMIN.into()))
        .await
        .unwrap();
    let listener = gantry_controller::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = gantry_controller::api::router(st)
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let n = gantry_controller::auth::SOURCE_BURST + 10;
    let mut last = None;
    for _ in 0..n {
        last = Some(http.get(format!("{url}/v1/flavors")).send().await.unwrap());
    }
    let last = last.unwrap();
    assert_eq!(last.status().as_u16(), 429);
    let wait: u64 = last.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&wait), "Retry-After: {wait}");
    let body: Value = last.json().await.unwrap();
    assert_eq!(
        body["error"],
        format!("too many refused requests from this address; retry in {wait} s")
    );
    let ok = http
        .get(format!("{url}/v1/flavors"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
}

#[tokio::test]
async fn short_admin_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let e = gantry_controller::open(Default::default(), dir.path(), Some("x".into()))
        .await
        .err()
        .expect("a one-character admin token is refused");
    assert_eq!(
        e.to_string(),
        "the admin token (GANTRY_ADMIN_TOKEN or admin_token) must be at least 16 characters; \
         this one has 1"
    );
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The state dir is 0700 and the database files 0600, also when an
/// earlier start left them open to others.
#[tokio::test]
async fn state_files_are_private() {
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = top.path().join("state");
    for round in 0..2 {
        let st = gantry_controller::open(Default::default(), &dir, Some(ADMIN.into()))
            .await
            .unwrap();
        sqlx::query("INSERT INTO flavors (id, name, vcpus, memory_mib, root_disk_gib, gpu_count, price_micros_per_hour, created_ms) VALUES ('flv-x', 'x', 1, 1, 1, 0, 0, 0)")
            .execute(&st.db.pool)
            .await
            .ok();
        assert_eq!(mode(&dir), 0o700, "round {round}");
        for f in ["controller.db", "controller.db-wal", "controller.db-shm"] {
            let p = dir.join(f);
            assert!(
                p.exists(),
                "{} exists: {:?}",
                p.display(),
                std::fs::read_dir(&dir)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect::<Vec<_>>()
            );
            assert_eq!(mode(&p), 0o600, "{f}, round {round}");
        }
        st.db.pool.close().await;
        drop(st);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["controller.db", "controller.db-wal", "controller.db-shm"] {
            let p = dir.join(f);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).ok();
        }
    }
}

/// Commits per second with `synchronous = FULL` (what the controller runs)
/// and `NORMAL`, one small write transaction at a time, for the docs.
#[tokio::test]
async fn sqlite_commit_throughput() {
    const N: u32 = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut rates = vec![];
    for mode in ["FULL", "NORMAL"] {
        let file = dir.path().join(format!("{mode}.db"));
        let db = Db::connect(&format!("sqlite://{}?mode=rwc", file.display()), 4)
            .await
            .unwrap();
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(
            sync, 2,
            "the controller's connections run synchronous = FULL"
        );
        let mut conn = db.pool.acquire().await.unwrap();
        sqlx::query(&format!("PRAGMA synchronous = {mode}"))
            .execute(&mut *conn)
            .await
            .unwrap();
        let t = std::time::Instant::now();
        for i in 0..N {
            let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
            sqlx::query("INSERT INTO audit_log (id, at_ms, actor, method, path, status) VALUES ($1, 0, 'a', 'POST', '/x', 200)")
                .bind(format!("r{i}"))
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        let rate = f64::from(N) / t.elapsed().as_secs_f64();
        println!(
            "synchronous = {mode}: {N} commits in {:?}: {rate:.0} commits/s",
            t.elapsed()
        );
        rates.push(rate);
    }
    assert!(rates.iter().all(|r| *r > 0.0));
    // Through the API: each audited create is three commits (audit row,
    // the change, its outcome).
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let t = std::time::Instant::now();
    for i in 0..N {
        let r = s
            .post(
                "/v1/admin/accounts",
                ADMIN,
                json!({"name": format!("a{i}")}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let rate = f64::from(N) / t.elapsed().as_secs_f64();
    println!(
        "API: {N} sequential account creates in {:?}: {rate:.0}/s",
        t.elapsed()
    );
}

/// The real binary, killed (SIGKILL) in the middle of a burst of writes,
/// three times: every account it committed has its audit row (finished,
/// or at status 0 = interrupted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_mid_burst_every_committed_change_has_its_row() {
    for round in 0..3u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gantry-controller"))
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path())
            .env("GANTRY_ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr_file = dir.path().join("listen-addr");
        let t = std::time::Instant::now();
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                break a.trim().to_string();
            }
            assert!(
                t.elapsed().as_secs() < 30,
                "the controller did not start in 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = vec![];
        for w in 0..16 {
            let (stop, url) = (stop.clone(), format!("http://{addr}/v1/admin/accounts"));
            writers.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let body = json!({"name": format!("w{w}-{i}")});
                    let _ = http.post(&url).bearer_auth(ADMIN).json(&body).send().await;
                    i += 1;
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(400 + 250 * round)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for w in writers {
            w.await.unwrap();
        }
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("controller.db").display()
        );
        let db = Db::connect(&url, 1).await.unwrap();
        let count = |sql: &'static str| {
            let pool = db.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        let accounts = count("SELECT COUNT(*) FROM accounts").await;
        let done = count(
            "SELECT COUNT(*) FROM audit_log WHERE path = '/v1/admin/accounts' AND status = 201",
        )
        .await;
        let open = count("SELECT COUNT(*) FROM audit_log WHERE status = 0").await;
        println!(
            "round {round}: {accounts} accounts committed, {done} rows 201, {open} interrupted"
        );
        assert!(accounts > 0, "round {round}: the burst wrote nothing");
        assert!(
            done <= accounts,
            "round {round}: {done} rows say created, {accounts} accounts"
        );
        assert!(
            accounts <= done + open,
            "round {round}: {accounts} accounts but only {done} rows 201 and {open} interrupted"
        );
    }
}
