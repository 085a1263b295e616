//! Monitoring over real HTTP, each database test on SQLite and on
//! PostgreSQL: a host's metrics batch through the agent protocol shows in
//! the instance's and the host's Monitor views; another account's
//! instance is not found, a host cannot write another host's instance,
//! bad batches are 422 naming the field and bad queries 400 naming the
//! parameter; retention and downsampling over the simulated clock; a
//! batch behind a busy writer answered within the agent's timeout and
//! written once the writer is free. And the
//! Prometheus path against a real Prometheus server scraping exposition
//! text in the agent's names.
#[macro_use]
mod common;
use common::{Server, ADMIN};
use gantry_controller::monitor;
use gantry_proto::metrics::*;
use gantry_proto::InstanceId;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

on_both!(ingest_and_view);
on_both!(isolation_and_validation);
on_both!(retention_and_downsampling);
on_both!(a_batch_behind_a_busy_writer_is_answered_then_written);

const HOUR: i64 = 3_600_000;
const MIN: i64 = 60_000;

/// A tenant token, a host and a Running instance placed on it.
async fn setup(s: &Server, name: &str) -> (String, String, String) {
    let (_, t) = s.account(name).await;
    let f = s.flavor(&format!("{name}-cpu"), None, 0).await;
    let img = s.image(&format!("{name}-img")).await;
    let h = s.host(&format!("{name}-h"), "none", 0).await;
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": format!("{name}-vm"), "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.id();
    assert_eq!(s.host_of(&id).await, h);
    s.observe(&id, "Running").await;
    (t, h, id)
}

/// A batch at `at` with the host at `host_cpu` and each `(instance, cpu)`
/// (one NIC, one GPU at 2 × cpu).
fn batch(at: i64, host_cpu: f64, instances: &[(&str, f64)]) -> MetricsBatch {
    MetricsBatch {
        sent_at_ms: at,
        interval_secs: 10,
        host: HostSample {
            cpu_pct: host_cpu,
            cpu_cores: 8,
            mem_used_bytes: 1 << 30,
            mem_total_bytes: 16 << 30,
            ..Default::default()
        },
        instances: instances
            .iter()
            .map(|(id, cpu)| InstanceSample {
                instance: id.parse::<InstanceId>().unwrap(),
                cpu_pct: *cpu,
                vcpus: 4,
                mem_used_bytes: 2 << 30,
                mem_total_bytes: 8 << 30,
                disk_read_bps: 0.0,
                disk_write_bps: 4096.0,
                disk_read_iops: 0.0,
                disk_write_iops: 1.0,
                nics: vec![NicSample {
                    name: "access".into(),
                    rx_bps: 100.0,
                    tx_bps: 200.0,
                }],
                gpus: vec![GpuSample {
                    index: 0,
                    uuid: "GPU-test-0".into(),
                    pci_bus_id: "0000:17:00.0".into(),
                    model: "NVIDIA H100".into(),
                    util_pct: Some((2.0 * cpu).min(100.0)),
                    mem_used_bytes: Some(1 << 30),
                    ..Default::default()
                }],
            })
            .collect(),
    }
}

async fn send(s: &Server, host: &str, b: &MetricsBatch) -> common::Reply {
    let cred = s.cred(host);
    s.post(AGENT_METRICS_PATH, &cred, serde_json::to_value(b).unwrap())
        .await
}

async fn view(s: &Server, path: &str, token: &str) -> MonitorView {
    let v = s.ok(Method::GET, path, token, None, 200).await;
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("not a Monitor view ({e}): {v}"))
}

fn find<'a>(v: &'a MonitorView, name: &str) -> &'a Series {
    v.series
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no series {name} in {v:?}"))
}

fn values(s: &Series) -> Vec<f64> {
    s.points.iter().map(|p| p.v).collect()
}

fn rfc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The middle of the current hour, so a few minutes never cross it.
fn mid_hour() -> i64 {
    chrono::Utc::now().timestamp_millis() / HOUR * HOUR - HOUR + 30 * MIN
}

async fn ingest_and_view(s: Server) {
    let (t, h, id) = setup(&s, "acme").await;
    let now = mid_hour();
    s.clock.set(now);
    for (i, cpu) in [10.0, 20.0, 30.0].into_iter().enumerate() {
        let at = now - 50_000 + i as i64 * 10_000;
        let r = send(&s, &h, &batch(at, cpu / 10.0, &[(&id, cpu)])).await;
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let v = view(&s, &format!("/v1/instances/{id}/monitor"), &t).await;
    assert_eq!((v.source, v.step_secs), (MonitorSource::Database, 10));
    assert_eq!(v.subject, id);
    assert_eq!(v.latest.unwrap().timestamp_millis(), now - 30_000);
    assert_eq!(v.state, Some(gantry_proto::InstanceState::Running));
    assert_eq!(values(find(&v, series::CPU_PCT)), [10.0, 20.0, 30.0]);
    assert_eq!(find(&v, series::CPU_PCT).unit, "percent");
    let gpu = find(&v, series::GPU_UTIL_PCT);
    assert_eq!(
        (gpu.labels["gpu"].as_str(), gpu.labels["uuid"].as_str()),
        ("0", "GPU-test-0")
    );
    assert_eq!(values(gpu), [20.0, 40.0, 60.0]);
    let rx = find(&v, series::NET_RX_BPS);
    assert_eq!(
        (rx.labels["nic"].as_str(), rx.unit.as_str()),
        ("access", "bytes/s")
    );
    assert_eq!(find(&v, series::GPU_MEM_USED_BYTES).unit, "bytes");
    // One step over the minute: the mean.
    let v = view(
        &s,
        &format!("/v1/instances/{id}/monitor?since=5m&step=60"),
        &t,
    )
    .await;
    assert_eq!(values(find(&v, series::CPU_PCT)), [20.0]);
    let p = find(&v, series::CPU_PCT).points[0].t.timestamp_millis();
    assert_eq!(p, (now - 50_000) / MIN * MIN, "points start at their step");
    // gantryctl: the current value and a sparkline per series.
    let (url, tok, ins) = (s.url.clone(), t.clone(), id.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_gantryctl"))
            .args([
                "instance", "get", &ins, "--view", "monitor", "--since", "10m",
            ])
            .env("GANTRY_URL", url)
            .env("GANTRY_TOKEN", tok)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cpu = text
        .lines()
        .find(|l| l.starts_with("cpu_pct "))
        .unwrap_or_default();
    assert!(cpu.contains("30.0%") && cpu.ends_with("▁▅█"), "{text}");
    assert!(
        text.contains("gpu_util_pct{gpu=0,uuid=GPU-test-0}"),
        "{text}"
    );
    assert!(
        text.contains("mem_used_bytes") && text.contains("2.0 GiB"),
        "{text}"
    );
    // The host's own view, for admins only.
    let hv = view(&s, &format!("/v1/admin/hosts/{h}/monitor?step=1m"), ADMIN).await;
    assert_eq!(values(find(&hv, series::CPU_PCT)), [2.0]);
    assert_eq!(
        hv.host_health.map(|h| format!("{h:?}")).as_deref(),
        Some("Healthy")
    );
    let r = s.get(&format!("/v1/admin/hosts/{h}/monitor"), &t).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // Batches are not audited (like heartbeats).
    let db = s.db().await;
    let audited: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_log WHERE path = '/v1/agent/metrics'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audited, 0);
}

/// Holds the database's writer the way a burst of other writes would: on
/// SQLite the writer's turn, on PostgreSQL a lock on the samples table
/// that every `INSERT` waits for (reads go on).
enum Busy {
    Turn(#[allow(dead_code)] gantry_controller::db::Writer),
    Lock(#[allow(dead_code)] sqlx::Transaction<'static, sqlx::Any>),
}

async fn busy_writer(s: &Server) -> Busy {
    use gantry_controller::db::Backend;
    if s.state.db.backend == Backend::Sqlite {
        return Busy::Turn(s.state.db.writer().await.unwrap());
    }
    let mut tx = s.state.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE metric_samples IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    Busy::Lock(tx)
}

/// The agent gives a batch one try of 3 s. Behind a writer busy for
/// longer, the batch is answered after about a second, still queued, and
/// shows in the view once the writer is free: not dropped, not an error.
async fn a_batch_behind_a_busy_writer_is_answered_then_written(s: Server) {
    let (t, h, id) = setup(&s, "acme").await;
    let now = mid_hour();
    s.clock.set(now);
    let path = format!("/v1/instances/{id}/monitor");
    let busy = busy_writer(&s).await;
    let t0 = std::time::Instant::now();
    let r = send(&s, &h, &batch(now - 10_000, 1.0, &[(&id, 42.0)])).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2_900),
        "a batch behind a busy writer was answered in {took:?}, not after about 1 s"
    );
    assert_eq!(
        view(&s, &path, &t).await.latest,
        None,
        "written while the writer was held"
    );
    drop(busy);
    let mut shown = None;
    for _ in 0..100 {
        let v = view(&s, &path, &t).await;
        if v.latest.is_some() {
            shown = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = shown.expect("the queued batch never showed in the view once the writer was free");
    assert_eq!(values(find(&v, series::CPU_PCT)), [42.0]);
    let (_, _, metrics) = s.text("/metrics", ADMIN).await;
    assert!(
        metrics.contains("gantry_controller_metrics_batches_total{outcome=\"queued\"}"),
        "{metrics}"
    );
}

async fn isolation_and_validation(s: Server) {
    let (t, h, id) = setup(&s, "acme").await;
    let (_, other) = s.account("other").await;
    let h2 = s.host("intruder", "none", 0).await;
    let now = chrono::Utc::now().timestamp_millis();
    s.clock.set(now);
    assert_eq!(
        send(&s, &h, &batch(now - 1000, 1.0, &[(&id, 10.0)]))
            .await
            .status,
        204
    );
    // Another account: not found, exactly like a missing instance.
    let r = s.get(&format!("/v1/instances/{id}/monitor"), &other).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let missing = InstanceId::new();
    let r2 = s
        .get(&format!("/v1/instances/{missing}/monitor"), &other)
        .await;
    assert_eq!(r2.status, 404);
    // Another host writing this instance: accepted, ignored, counted.
    let before = s
        .state
        .monitor
        .foreign_samples
        .load(std::sync::atomic::Ordering::Relaxed);
    let r = send(&s, &h2, &batch(now - 500, 1.0, &[(&id, 99.0)])).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let after = s
        .state
        .monitor
        .foreign_samples
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after - before, 1);
    let v = view(&s, &format!("/v1/instances/{id}/monitor"), &t).await;
    assert_eq!(
        values(find(&v, series::CPU_PCT)),
        [10.0],
        "the intruder's 99 is not there"
    );
    // Bad batches: 422 naming the field; nothing stored.
    let mut bad = batch(now, 1.0, &[(&id, 10.0)]);
    bad.instances[0].cpu_pct = 101.0;
    let r = send(&s, &h, &bad).await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (422, "instances[0].cpu_pct"),
        "{}",
        r.body
    );
    let mut bad = batch(now, 1.0, &[(&id, 10.0)]);
    bad.instances[0].gpus[0].util_pct = Some(-1.0);
    let r = send(&s, &h, &bad).await;
    assert_eq!(r.field(), "instances[0].gpus[0].util_pct", "{}", r.body);
    let r = send(&s, &h, &batch(now + HOUR, 1.0, &[])).await;
    assert_eq!((r.status, r.field().as_str()), (422, "sent_at_ms"));
    let mut raw = serde_json::to_value(batch(now, 1.0, &[])).unwrap();
    raw["host"]["colour"] = json!(1);
    let r = s.post(AGENT_METRICS_PATH, &s.cred(&h), raw).await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (400, "host.colour"),
        "{}",
        r.body
    );
    // Only hosts send batches.
    let r = s
        .post(
            AGENT_METRICS_PATH,
            &t,
            serde_json::to_value(batch(now, 1.0, &[])).unwrap(),
        )
        .await;
    assert_eq!(r.status, 403);
    // Bad queries: 400 naming the parameter.
    for (q, field) in [
        ("since=yesterday", "since"),
        ("since=1m&until=2m", "since"),
        ("step=0", "step"),
        ("since=7d&step=2w", "step"),
        ("until=soon", "until"),
        ("colour=red", "colour"),
    ] {
        let r = s.get(&format!("/v1/instances/{id}/monitor?{q}"), &t).await;
        assert_eq!(
            (r.status, r.field().as_str()),
            (400, field),
            "{q}: {}",
            r.body
        );
    }
}

/// Rows of `subject` in `tier`.
async fn rows(s: &Server, subject: &str, tier: i64) -> i64 {
    let db = s.db().await;
    sqlx::query_scalar("SELECT COUNT(*) FROM metric_samples WHERE subject = $1 AND tier = $2")
        .bind(subject)
        .bind(tier)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Runs the reconcile step twice at once (as two replicas would) at `at`.
async fn tick_at(s: &Server, at: i64) {
    s.clock.set(at);
    let (a, b) = tokio::join!(monitor::tick(&s.state), monitor::tick(&s.state));
    a.unwrap();
    b.unwrap();
    monitor::tick(&s.state).await.unwrap();
}

async fn retention_and_downsampling(s: Server) {
    let (t, h, id) = setup(&s, "acme").await;
    let h0 = chrono::Utc::now().timestamp_millis() / HOUR * HOUR - 2 * HOUR;
    // Three minutes of samples every 10 s: cpu = 10 m + k.
    for m in 0..3 {
        for k in 0..6 {
            let at = h0 + m * MIN + k * 10_000;
            s.clock.set(at);
            let r = send(&s, &h, &batch(at, 1.0, &[(&id, (10 * m + k) as f64)])).await;
            assert_eq!(r.status, 204, "{}", r.body);
        }
    }
    assert_eq!(rows(&s, &id, 0).await, 18);
    tick_at(&s, h0 + 3 * MIN + 20_000).await;
    assert_eq!(rows(&s, &id, 60).await, 3, "one row per complete minute");
    let path = format!(
        "/v1/instances/{id}/monitor?since={}&until={}&step=60",
        rfc(h0),
        rfc(h0 + 10 * MIN)
    );
    // Two hours on: raw samples pruned, minute means read instead.
    tick_at(&s, h0 + 2 * HOUR).await;
    assert_eq!(rows(&s, &id, 0).await, 0, "raw samples kept an hour");
    assert_eq!(rows(&s, &id, 60).await, 3);
    assert_eq!(rows(&s, &id, 3600).await, 1, "the hour is rolled up");
    let v = view(&s, &path, &t).await;
    assert_eq!(values(find(&v, series::CPU_PCT)), [2.5, 12.5, 22.5]);
    let ts: Vec<i64> = find(&v, series::CPU_PCT)
        .points
        .iter()
        .map(|p| p.t.timestamp_millis())
        .collect();
    assert_eq!(ts, [h0, h0 + MIN, h0 + 2 * MIN]);
    assert_eq!(values(find(&v, series::GPU_UTIL_PCT)), [5.0, 25.0, 45.0]);
    // Six days on: minute means still kept.
    tick_at(&s, h0 + 6 * 24 * HOUR).await;
    assert_eq!(rows(&s, &id, 60).await, 3, "minute means kept a week");
    // Eight days on: only the hourly mean.
    tick_at(&s, h0 + 8 * 24 * HOUR).await;
    assert_eq!(rows(&s, &id, 60).await, 0);
    let v = view(&s, &path, &t).await;
    assert_eq!(v.step_secs, 3600);
    assert_eq!(values(find(&v, series::CPU_PCT)), [12.5]);
    assert_eq!(find(&v, series::CPU_PCT).points[0].t.timestamp_millis(), h0);
    assert_eq!(
        values(find(&v, series::MEM_USED_BYTES)),
        [(2u64 << 30) as f64]
    );
    // The host's own samples went the same way.
    assert_eq!(rows(&s, &h, 3600).await, 1);
    // Ninety-one days on: nothing left.
    tick_at(&s, h0 + 91 * 24 * HOUR).await;
    assert_eq!(rows(&s, &id, 3600).await, 0, "hourly means kept 90 days");
    let v = view(&s, &path, &t).await;
    assert!(v.series.is_empty(), "{v:?}");
}

// ---- Prometheus

/// A real Prometheus server on a loopback port, killed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts Prometheus on `port`, scraping `target` every second.
async fn prometheus(target: &str, port: u16) -> Prometheus {
    let bin =
        std::env::var("GANTRY_TEST_PROMETHEUS").unwrap_or_else(|_| "/usr/bin/prometheus".into());
    assert!(
        std::path::Path::new(&bin).exists(),
        "{bin} is missing: run scripts/setup-prometheus (Debian's prometheus package), or \
         ./scripts/test"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - \
             job_name: agent\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let child = std::process::Command::new(&bin)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .expect("start prometheus");
    let p = Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}/"),
        _dir: dir,
    };
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("{}-/ready", p.url)).send().await {
            if r.status().is_success() {
                return p;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(p._dir.path().join("log")).unwrap_or_default();
    panic!("prometheus did not get ready: {log}");
}

/// The exposition text an agent would serve for one instance with one
/// GPU, its counters moving as a guest at 50% of 2 vCPUs and writing
/// 1 MiB/s would move them, `secs` after the start.
fn exposition(id: &str, secs: f64) -> String {
    let d = format!("gantry-{id}");
    format!(
        "# TYPE gantry_instance_info gauge\n\
         gantry_instance_info{{instance_id=\"{id}\",domain=\"{d}\"}} 1\n\
         # TYPE libvirt_domain_info_cpu_time_seconds_total counter\n\
         libvirt_domain_info_cpu_time_seconds_total{{domain=\"{d}\"}} {cpu}\n\
         # TYPE libvirt_domain_info_virtual_cpus gauge\n\
         libvirt_domain_info_virtual_cpus{{domain=\"{d}\"}} 2\n\
         # TYPE libvirt_domain_info_memory_usage_bytes gauge\n\
         libvirt_domain_info_memory_usage_bytes{{domain=\"{d}\"}} 1073741824\n\
         # TYPE libvirt_domain_block_stats_write_bytes_total counter\n\
         libvirt_domain_block_stats_write_bytes_total{{domain=\"{d}\",target_device=\"vda\"}} {w}\n\
         # TYPE libvirt_domain_interface_stats_receive_bytes_total counter\n\
         libvirt_domain_interface_stats_receive_bytes_total{{domain=\"{d}\",target_device=\"access\"}} {w}\n\
         # TYPE DCGM_FI_DEV_GPU_UTIL gauge\n\
         DCGM_FI_DEV_GPU_UTIL{{gpu=\"0\",UUID=\"GPU-test-0\",pci_bus_id=\"00000000:17:00.0\",device=\"nvidia0\",modelName=\"NVIDIA H100\",Hostname=\"h1\",gantry_instance=\"{id}\"}} 77\n\
         # TYPE DCGM_FI_DEV_FB_USED gauge\n\
         DCGM_FI_DEV_FB_USED{{gpu=\"0\",UUID=\"GPU-test-0\",pci_bus_id=\"00000000:17:00.0\",device=\"nvidia0\",modelName=\"NVIDIA H100\",Hostname=\"h1\",gantry_instance=\"{id}\"}} 1024\n",
        cpu = 0.5 * 2.0 * secs,
        w = 1_048_576.0 * secs,
    )
}

/// Serves [`exposition`] of `id` on a loopback port; answers the address.
async fn exporter(id: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let start = std::time::Instant::now();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let body = exposition(&id, start.elapsed().as_secs_f64());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = c.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(head.as_bytes()).await;
                let _ = c.write_all(body.as_bytes()).await;
            });
        }
    });
    addr
}

fn last(v: &MonitorView, name: &str) -> Option<(f64, Value)> {
    let s = v.series.iter().find(|s| s.name == name)?;
    Some((s.points.last()?.v, serde_json::to_value(&s.labels).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Prometheus: ./scripts/test runs it"]
async fn prometheus_view_shows_cpu_and_gpu_series() {
    // The controller first, to have the instance's id to export.
    let prom_port = free_port();
    let prom_url = format!("http://127.0.0.1:{prom_port}/");
    let s = Server::start_with(common::Backend::Sqlite, |c| {
        c.metrics.prometheus_url = Some(prom_url.parse().unwrap());
        c.metrics.prometheus_min_window_secs = 4;
    })
    .await
    .unwrap();
    let (t, h, id) = setup(&s, "acme").await;
    let target = exporter(id.clone()).await;
    let p = prometheus(&target, prom_port).await;
    assert_eq!(p.url, prom_url);
    // Batches are accepted but not stored.
    let now = chrono::Utc::now().timestamp_millis();
    assert_eq!(
        send(&s, &h, &batch(now, 1.0, &[(&id, 10.0)])).await.status,
        204
    );
    assert_eq!(rows(&s, &id, 0).await, 0);
    let path = format!("/v1/instances/{id}/monitor?since=2m&step=2");
    let mut seen = None;
    for _ in 0..60 {
        let v = view(&s, &path, &t).await;
        assert_eq!(v.source, MonitorSource::Prometheus);
        let cpu = last(&v, series::CPU_PCT).map(|c| c.0);
        if cpu.is_some_and(|c| (c - 50.0).abs() < 5.0) && last(&v, series::GPU_UTIL_PCT).is_some() {
            seen = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let v = seen.expect("the CPU and GPU series from Prometheus within 30 s");
    let (util, labels) = last(&v, series::GPU_UTIL_PCT).unwrap();
    assert_eq!(util, 77.0);
    assert_eq!(labels, json!({"gpu": "0", "uuid": "GPU-test-0"}));
    assert_eq!(
        last(&v, series::GPU_MEM_USED_BYTES).unwrap().0,
        1_073_741_824.0
    );
    assert_eq!(last(&v, series::MEM_USED_BYTES).unwrap().0, 1_073_741_824.0);
    let (rx, nic) = last(&v, series::NET_RX_BPS).expect("net_rx_bps");
    assert!((rx - 1_048_576.0).abs() < 0.1 * 1_048_576.0, "{rx}");
    assert_eq!(nic, json!({"nic": "access"}));
    let w = last(&v, series::DISK_WRITE_BPS).expect("disk_write_bps").0;
    assert!((w - 1_048_576.0).abs() < 0.1 * 1_048_576.0, "{w}");
    // Another account still sees nothing.
    let (_, other) = s.account("other").await;
    assert_eq!(
        s.get(&format!("/v1/instances/{id}/monitor"), &other)
            .await
            .status,
        404
    );
    drop(p);
}
