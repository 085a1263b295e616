//! Controller benchmark (run by `scripts/bench-controller`; figures go to
//! docs/benchmarks.md):
//!
//! 1. placement decision time at 1,000 and 10,000 hosts: the pure weighing
//!    ([`scheduler::choose`]) and the whole decision as placement runs it
//!    (write transaction, candidate query, weighing, rollback);
//! 2. API latency for list/get at a fixed open-loop rate (default 500
//!    requests/s) with 1,000 hosts and 10,000 instances.
//!
//! Each runs on SQLite, and on PostgreSQL when `GANTRY_TEST_PG_URL` is set;
//! `GANTRY_BENCH_PLACEMENT_ONLY=1` runs only the placement part (with 300
//! decisions at 10,000 hosts too).

use gantry_controller::db::{now_ms, Db};
use gantry_controller::scheduler::{self, Candidate, Need};
use gantry_controller::{auth, AppState, Config};
use gantry_proto::api::v1::Placement;
use gantry_proto::ids::*;
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-admin-token-0123456789";

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(label: &str, mut d: Vec<Duration>) {
    d.sort();
    println!(
        "{label:<58} n={:<6} p50={:>7.3} ms  p99={:>7.3} ms  max={:>7.3} ms",
        d.len(),
        pct(&d, 0.50),
        pct(&d, 0.99),
        pct(&d, 1.0)
    );
}

fn need() -> Need {
    Need {
        vcpus: 8,
        memory_mib: 65_536,
        disk_gib: 100,
        gpu_model: Some("H100".into()),
        gpu_count: 2,
        placement: Placement::Pack,
        region: "default".into(),
        host: None,
    }
}

/// Adds hosts `from..to` (8 H100 each, some partly used) in one transaction.
async fn add_hosts(db: &Db, from: usize, to: usize) {
    let mut tx = db.begin_write().await.unwrap();
    let now = now_ms();
    for i in from..to {
        let id = HostId::new().to_string();
        sqlx::query(
            "INSERT INTO hosts (id, name, address, vcpus, memory_mib, disk_gib, used_vcpus, \
             gpu_total, health, last_heartbeat_ms, created_ms) VALUES ($1, $2, $3, 128, 1048576, \
             20000, $4, 8, 'healthy', $5, $5)",
        )
        .bind(&id)
        .bind(format!("host-{i:05}"))
        .bind(format!("10.0.{}.{}", i / 250, i % 250))
        .bind((i % 16) as i64 * 8)
        .bind(now)
        .execute(&mut *tx)
        .await
        .unwrap();
        for g in 0..8 {
            let used = (g < i % 7).then(|| format!("ins-{:032x}", i * 8 + g));
            sqlx::query("INSERT INTO host_gpus (host_id, pci, model, instance_id) VALUES ($1, $2, 'H100', $3)")
                .bind(&id)
                .bind(format!("0000:{:02x}:00.0", 0x10 + g))
                .bind(used)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        sqlx::query(
            "INSERT INTO host_gpu_pools (host_id, model, total, free) VALUES ($1, 'H100', 8, $2)",
        )
        .bind(&id)
        .bind(8 - (i % 7) as i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

/// Decisions per kind run before the measured ones.
const WARM_UP: usize = 32;

async fn placement(st: &AppState, hosts: usize, rounds: usize) {
    analyze(st).await;
    let n = need();
    let mut tx = st.db.begin_write().await.unwrap();
    // Every schedulable host, so the weighing sees all of them.
    let cands = scheduler::candidates(&mut tx, &n, 0, false).await.unwrap();
    drop(tx);
    let mut pure = Vec::with_capacity(rounds * 4);
    for _ in 0..rounds * 4 {
        let t = Instant::now();
        std::hint::black_box(scheduler::choose(std::hint::black_box(&cands), &n));
        pure.push(t.elapsed());
    }
    report(
        &format!("  choose() over all {} hosts (in memory)", cands.len()),
        pure,
    );
    let spread = Need {
        placement: Placement::Spread,
        ..need()
    };
    let cpu = Need {
        gpu_model: None,
        gpu_count: 0,
        ..need()
    };
    let cpu_spread = Need {
        placement: Placement::Spread,
        ..cpu.clone()
    };
    let needs = [
        ("", &n),
        (" (spread)", &spread),
        (" (CPU only)", &cpu),
        (" (CPU, spread)", &cpu_spread),
    ];
    for (label, n) in needs {
        let mut full = Vec::with_capacity(rounds);
        let mut best = None;
        // Unmeasured: every pooled connection prepares its statements once,
        // as in a controller that has been running.
        for i in 0..WARM_UP + rounds {
            let t = Instant::now();
            let mut tx = st.db.begin_write().await.unwrap();
            let c: Vec<Candidate> = scheduler::candidates(&mut tx, n, 0, true).await.unwrap();
            best = scheduler::choose(&c, n).map(|i| c[i].clone());
            tx.rollback().await.unwrap();
            if i >= WARM_UP {
                full.push(t.elapsed());
            }
        }
        // The shortlist's best is the best of all hosts.
        let all = cands_for(st, n).await;
        let want = scheduler::choose(&all, n).map(|i| all[i].id.clone());
        assert_eq!(
            best.map(|b| b.id),
            want,
            "shortlist and full weighing differ"
        );
        report(
            &format!("  decision{label}: tx + shortlist + choose(), {hosts} hosts"),
            full,
        );
    }
}

/// On PostgreSQL, refreshes the planner's statistics after the bulk insert
/// (what autovacuum does on its own a little later; measuring while it runs
/// would time the analysis). SQLite keeps no statistics unless asked.
async fn analyze(st: &AppState) {
    if st.cfg.database_url.is_some() {
        sqlx::query("ANALYZE hosts")
            .execute(&st.db.pool)
            .await
            .unwrap();
        sqlx::query("ANALYZE host_gpu_pools")
            .execute(&st.db.pool)
            .await
            .unwrap();
    }
}

/// Every schedulable host, to check the shortlist against.
async fn cands_for(st: &AppState, n: &Need) -> Vec<Candidate> {
    let mut tx = st.db.begin_write().await.unwrap();
    let all = scheduler::candidates(&mut tx, n, 0, false).await.unwrap();
    tx.rollback().await.unwrap();
    all
}

/// 100 accounts with a token each and `count` CPU instances spread over
/// the hosts. Returns (tokens, instance ids).
async fn add_instances(st: &AppState, count: usize) -> (Vec<String>, Vec<String>) {
    let db = &st.db;
    let mut tx = db.begin_write().await.unwrap();
    let now = now_ms();
    let flavor = FlavorId::new().to_string();
    sqlx::query(
        "INSERT INTO flavors (id, name, vcpus, memory_mib, root_disk_gib, gpu_count, \
         price_micros_per_hour, created_ms) VALUES ($1, 'cpu4', 4, 8192, 50, 0, 1000000, $2)",
    )
    .bind(&flavor)
    .bind(now)
    .execute(&mut *tx)
    .await
    .unwrap();
    let hosts: Vec<String> = sqlx::query_scalar("SELECT id FROM hosts ORDER BY name")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let mut accounts = Vec::new();
    for a in 0..100 {
        let id = AccountId::new();
        sqlx::query("INSERT INTO accounts (id, name, snapshot_quota_gib, created_ms) VALUES ($1, $2, 100, $3)")
            .bind(id.to_string())
            .bind(format!("acct-{a}"))
            .bind(now)
            .execute(&mut *tx)
            .await
            .unwrap();
        accounts.push(id);
    }
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let id = InstanceId::new().to_string();
        sqlx::query(
            "INSERT INTO instances (id, account_id, name, flavor_id, host_id, desired_state, \
             observed_state, state_since_ms, root_disk_gib, running_since_ms, created_ms) VALUES \
             ($1, $2, $3, $4, $5, 'Running', 'Running', $6, 50, $6, $6)",
        )
        .bind(&id)
        .bind(accounts[i % accounts.len()].to_string())
        .bind(format!("vm-{i}"))
        .bind(&flavor)
        .bind(&hosts[i % hosts.len()])
        .bind(now)
        .execute(&mut *tx)
        .await
        .unwrap();
        ids.push(id);
    }
    tx.commit().await.unwrap();
    let mut tokens = Vec::new();
    for (i, a) in accounts.iter().enumerate() {
        let tid = TokenId::new();
        let (tok, hash) = auth::mint(tid);
        auth::store_token(db, tid, &format!("t{i}"), &hash, Some(*a))
            .await
            .unwrap();
        tokens.push(tok);
    }
    (tokens, ids)
}

/// Open-loop load: requests are sent on schedule whether or not earlier
/// ones answered; latency counts from the scheduled time.
async fn load(url: &str, tokens: &[String], ids: &[String], rate: u64, secs: u64) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let total = rate * secs;
    let gap = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let at = start + gap * i as u32;
        tokio::time::sleep_until(at.into()).await;
        let k = i as usize;
        let is_list = i % 2 == 0;
        // Instance k belongs to account k % 100 (see add_instances).
        let (path, tok) = if is_list {
            (
                "/v1/instances?status=Running".to_string(),
                tokens[k % tokens.len()].clone(),
            )
        } else {
            let j = (k * 7919) % ids.len();
            (
                format!("/v1/instances/{}", ids[j]),
                tokens[j % tokens.len()].clone(),
            )
        };
        let req = http.get(format!("{url}{path}")).bearer_auth(tok);
        tasks.push(tokio::spawn(async move {
            let ok = match req.send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            (is_list, ok, at.elapsed())
        }));
    }
    let (mut lists, mut gets, mut errors) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        let (is_list, ok, d) = t.await.unwrap();
        errors += usize::from(!ok);
        if is_list {
            lists.push(d)
        } else {
            gets.push(d)
        }
    }
    let wall = start.elapsed().as_secs_f64();
    println!(
        "  offered {rate} req/s for {secs} s: {} requests in {wall:.1} s, {errors} errors",
        total
    );
    let mut all = lists.clone();
    all.extend(gets.iter().copied());
    report("  list (100 rows, own account) + get, all", all);
    report("  list /v1/instances?status=Running", lists);
    report("  get /v1/instances/{id}", gets);
}

/// Closed loop: `workers` clients send back-to-back for `secs`; the
/// request rate the service sustains on this machine.
async fn capacity(url: &str, tokens: &[String], ids: &[String], workers: usize, secs: u64) {
    let http = reqwest::Client::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (http, url) = (http.clone(), url.to_string());
        let (tokens, ids) = (tokens.to_vec(), ids.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = w;
            while Instant::now() < end {
                let (path, tok) = if k % 2 == 0 {
                    (
                        "/v1/instances?status=Running".to_string(),
                        &tokens[k % tokens.len()],
                    )
                } else {
                    let j = (k * 7919) % ids.len();
                    (
                        format!("/v1/instances/{}", ids[j]),
                        &tokens[j % tokens.len()],
                    )
                };
                let t = Instant::now();
                let r = http
                    .get(format!("{url}{path}"))
                    .bearer_auth(tok)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                r.bytes().await.unwrap();
                lat.push(t.elapsed());
                k += workers;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    println!(
        "  closed loop, {workers} clients, {secs} s: {:.0} requests/s sustained",
        all.len() as f64 / secs as f64
    );
    report("  closed-loop latency (list + get)", all);
}

async fn run(label: &str, database_url: Option<String>, rate: u64, secs: u64) {
    println!("== {label}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        database_url,
        rate_limit_per_second: 1_000_000,
        rate_limit_burst: 1_000_000,
        max_db_connections: std::env::var("GANTRY_BENCH_DB_CONNECTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(Config::default().max_db_connections),
        ..Config::default()
    };
    let st = gantry_controller::open(cfg, dir.path(), Some(TOKEN.into()))
        .await
        .unwrap();
    add_hosts(&st.db, 0, 1000).await;
    placement(&st, 1000, 300).await;
    if std::env::var("GANTRY_BENCH_PLACEMENT_ONLY").is_ok() {
        add_hosts(&st.db, 1000, 10_000).await;
        placement(&st, 10_000, 300).await;
        return;
    }
    let (tokens, ids) = add_instances(&st, 10_000).await;
    let listener = gantry_controller::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(gantry_controller::serve(st.clone(), listener, async {
        let _ = rx.await;
    }));
    load(&url, &tokens, &ids, rate / 5, 2).await; // warm-up, not reported separately
    println!("  (above: warm-up)");
    load(&url, &tokens, &ids, rate, secs).await;
    capacity(&url, &tokens, &ids, 8, 10).await;
    let _ = stop.send(());
    let _ = server.await;
    add_hosts(&st.db, 1000, 10_000).await;
    placement(&st, 10_000, 100).await;
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rate: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(500);
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    run("SQLite", None, rate, secs).await;
    match std::env::var("GANTRY_TEST_PG_URL") {
        Ok(url) if !url.is_empty() && std::env::var("GANTRY_BENCH_SQLITE_ONLY").is_err() => {
            let db = fresh_pg(&url).await;
            run("PostgreSQL", Some(db), rate, secs).await;
        }
        _ => println!("== PostgreSQL: skipped (GANTRY_TEST_PG_URL is not set)"),
    }
}

async fn fresh_pg(url: &str) -> String {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let name = format!("gantry_bench_{}", uuid::Uuid::new_v4().simple());
    let mut c = sqlx::AnyConnection::connect(url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .unwrap();
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}
