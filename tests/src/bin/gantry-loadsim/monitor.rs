//! The monitoring load: every simulated host sends a
//! [`MetricsBatch`] of its Running instances every `--metrics-secs` on its
//! own task, lossy like the agent (one try, a short timeout, counted as
//! sent or dropped); resident instances (`--resident-per-host`) that run
//! the whole time; tenants reading their instances' Monitor views; and the
//! database's size, to turn growth into bytes per instance per day.

use crate::api::{Api, NO_BODY};
use crate::controller::Setup;
use crate::host::{Host, Shared};
use futures::StreamExt;
use gantry_proto::ids::InstanceId;
use gantry_proto::metrics::{
    GpuSample, HostSample, InstanceSample, MetricsBatch, NicSample, AGENT_METRICS_PATH,
};
use reqwest::Method;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The latency kind of metrics batches.
pub const BATCH: &str = "agent: metrics batch";
/// The latency kind of Monitor view reads.
pub const VIEW: &str = "tenant: monitor view";
/// A batch is dropped when not answered within this (the agent's choice).
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Batch and sample counts.
#[derive(Default)]
pub struct Sent {
    pub batches: AtomicU64,
    pub dropped: AtomicU64,
    /// Instance samples in batches the controller took.
    pub instance_samples: AtomicU64,
}

/// A plausible sample of one instance (figures vary a little).
fn instance_sample(id: InstanceId, gpu: bool) -> InstanceSample {
    let r = || rand::random_range(0.0..1.0f64);
    InstanceSample {
        instance: id,
        cpu_pct: 100.0 * r(),
        vcpus: 4,
        mem_used_bytes: (2.0e9 + 4.0e9 * r()) as u64,
        mem_total_bytes: 8 << 30,
        disk_read_bps: 1.0e6 * r(),
        disk_write_bps: 4.0e6 * r(),
        disk_read_iops: 100.0 * r(),
        disk_write_iops: 300.0 * r(),
        nics: ["access", "group"]
            .iter()
            .map(|n| NicSample {
                name: (*n).into(),
                rx_bps: 1.0e5 * r(),
                tx_bps: 1.0e5 * r(),
            })
            .collect(),
        gpus: if gpu {
            vec![GpuSample {
                index: 0,
                uuid: format!("GPU-{}", &id.to_string()[4..]),
                pci_bus_id: "00000000:01:00.0".into(),
                model: crate::host::GPU_MODEL.into(),
                util_pct: Some(100.0 * r()),
                mem_used_bytes: Some((40.0e9 * r()) as u64),
                mem_total_bytes: Some(80 << 30),
                temperature_c: Some(40.0 + 30.0 * r()),
                power_w: Some(100.0 + 500.0 * r()),
                energy_j: None,
                ecc_uncorrected: Some(0),
                last_xid: Some(0),
            }]
        } else {
            Vec::new()
        },
    }
}

fn batch(host: &Host, secs: u64) -> MetricsBatch {
    let ids = host.running_ids();
    let gpu = host.name.ends_with('0') || host.name.ends_with('4') || host.name.ends_with('8');
    MetricsBatch {
        sent_at_ms: chrono::Utc::now().timestamp_millis(),
        interval_secs: secs as u32,
        host: HostSample {
            cpu_pct: rand::random_range(0.0..100.0),
            cpu_cores: 128,
            mem_used_bytes: 200 << 30,
            mem_total_bytes: 1 << 40,
            disk_used_bytes: 2 << 40,
            disk_total_bytes: 20 << 40,
            disk_read_bps: 1.0e7,
            disk_write_bps: 2.0e7,
            net_rx_bps: 1.0e6,
            net_tx_bps: 1.0e6,
            gpus: Vec::new(),
        },
        instances: ids.into_iter().map(|i| instance_sample(i, gpu)).collect(),
    }
}

/// Sends a batch every `secs`, the first after `offset`; a failed batch
/// is dropped, never retried.
pub async fn metrics_loop(
    host: Arc<Host>,
    sh: Arc<Shared>,
    sent: Arc<Sent>,
    secs: u64,
    offset: Duration,
) {
    let mut next = Instant::now() + offset;
    loop {
        tokio::time::sleep_until(next).await;
        let b = batch(&host, secs);
        let n = b.instances.len() as u64;
        let r: Result<serde_json::Value, _> = sh
            .api
            .call(
                BATCH,
                Method::POST,
                AGENT_METRICS_PATH,
                host.credential(),
                Some(&b),
                BATCH_TIMEOUT,
            )
            .await;
        match r {
            Ok(_) => {
                sent.batches.fetch_add(1, Ordering::Relaxed);
                sent.instance_samples.fetch_add(n, Ordering::Relaxed);
            }
            Err(_) => {
                sent.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        next += Duration::from_secs(secs);
        let now = Instant::now();
        if next < now {
            sh.api.stats.count("metrics batches started late");
            next = now;
        }
    }
}

/// Starts every host's sender (none when `secs` is 0), each offset so
/// batches spread over the interval.
pub fn spawn_senders(
    loops: &mut JoinSet<()>,
    hosts: &[Arc<Host>],
    sh: &Arc<Shared>,
    secs: u64,
) -> Arc<Sent> {
    let sent = Arc::new(Sent::default());
    if secs == 0 {
        return sent;
    }
    for (i, h) in hosts.iter().enumerate() {
        let offset = Duration::from_millis(secs * 1000 * i as u64 / hosts.len() as u64);
        loops.spawn(metrics_loop(
            h.clone(),
            sh.clone(),
            sent.clone(),
            secs,
            offset,
        ));
    }
    sent
}

/// Starts one [`reader`] per tenant over its resident instances.
pub fn spawn_readers(
    loops: &mut JoinSet<()>,
    api: &Api,
    setup: &Setup,
    resident: &[(usize, InstanceId)],
    end: Instant,
) {
    for (i, t) in setup.tenants.iter().enumerate() {
        let mine = resident.iter().filter(|r| r.0 == i).map(|r| r.1).collect();
        let pause = Duration::from_millis(250);
        loops.spawn(reader(api.clone(), t.token.clone(), mine, end, pause));
    }
}

/// Whether a failed resident create was shown.
static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Creates `per_host` CPU instances per host (spread placement, the
/// tenants' tokens in turn) and waits until all run. Returns (tenant
/// index, instance) pairs.
pub async fn residents(
    api: &Api,
    setup: &Setup,
    hosts: &[Arc<Host>],
    per_host: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<(usize, InstanceId)>> {
    let n = hosts.len() * per_host;
    let t0 = Instant::now();
    let made: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let tenant = i % setup.tenants.len();
            let token = setup.tenants[tenant].token.clone();
            let body = json!({
                "name": format!("resident-{i}"), "flavor": setup.cpu_flavor.id,
                "image": setup.image, "placement": "spread",
            });
            async move {
                let r: Result<serde_json::Value, _> = api
                    .call(
                        "tenant: create (resident)",
                        Method::POST,
                        "/v1/instances",
                        &token,
                        Some(&body),
                        Duration::from_secs(60),
                    )
                    .await;
                let v = match r {
                    Ok(v) => v,
                    Err(e) => {
                        if !REPORTED.swap(true, Ordering::Relaxed) {
                            eprintln!("a resident create failed (the first; others counted): {e}");
                        }
                        return None;
                    }
                };
                let id = v.get("id")?.as_str()?.parse().ok()?;
                Some((tenant, id))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let made: Vec<(usize, InstanceId)> = made.into_iter().flatten().collect();
    if made.len() < n {
        // The refusals are in the error table; go on with the rest.
        eprintln!("only {} of {n} resident instances were created", made.len());
    }
    let n = made.len();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let running: usize = hosts.iter().map(|h| h.running()).sum();
        if running >= n {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("{running} of {n} resident instances running after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let per: Vec<usize> = hosts.iter().map(|h| h.running()).collect();
    eprintln!(
        "{n} resident instances running in {:.1} s ({} to {} per host)",
        t0.elapsed().as_secs_f64(),
        per.iter().min().unwrap_or(&0),
        per.iter().max().unwrap_or(&0)
    );
    Ok(made)
}

/// One tenant's reader: the Monitor view (last 15 minutes) and the
/// instance of a random resident of its own, back to back with a pause,
/// until `end`.
pub async fn reader(api: Api, token: String, ids: Vec<InstanceId>, end: Instant, pause: Duration) {
    if ids.is_empty() {
        return;
    }
    while Instant::now() < end {
        let id = ids[rand::random_range(0..ids.len())];
        let _: Result<serde_json::Value, _> = api
            .call(
                VIEW,
                Method::GET,
                &format!("/v1/instances/{id}/monitor?since=15m"),
                &token,
                NO_BODY,
                Duration::from_secs(30),
            )
            .await;
        let _: Result<serde_json::Value, _> = api
            .call(
                "tenant: get instance",
                Method::GET,
                &format!("/v1/instances/{id}"),
                &token,
                NO_BODY,
                Duration::from_secs(30),
            )
            .await;
        tokio::time::sleep(pause).await;
    }
}

/// Reads the Monitor view of a tenant's instance every 2 s while it
/// lives (until `until`).
pub async fn watch(api: &Api, token: &str, id: InstanceId, until: Instant) {
    while Instant::now() + Duration::from_secs(2) < until {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _: Result<serde_json::Value, _> = api
            .call(
                VIEW,
                Method::GET,
                &format!("/v1/instances/{id}/monitor?since=5m"),
                token,
                NO_BODY,
                Duration::from_secs(30),
            )
            .await;
    }
}

/// Where the database's size is read.
pub enum DbSize {
    /// The SQLite file (and its WAL) in the controller's state dir.
    Sqlite(PathBuf),
    /// `pg_database_size` through `psql`.
    Postgres(String),
    None,
}

impl DbSize {
    /// The size in bytes, if it can be read.
    pub fn read(&self) -> Option<u64> {
        match self {
            DbSize::Sqlite(p) => {
                let mut total = 0;
                for suffix in ["", "-wal"] {
                    let mut f = p.clone().into_os_string();
                    f.push(suffix);
                    total += std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
                }
                (total > 0).then_some(total)
            }
            DbSize::Postgres(url) => {
                let out = std::process::Command::new("psql")
                    .arg(url)
                    .args(["-tAc", "SELECT pg_database_size(current_database())"])
                    .output()
                    .ok()?;
                String::from_utf8_lossy(&out.stdout).trim().parse().ok()
            }
            DbSize::None => None,
        }
    }
}
