//! Monitoring: the collector (host, instances, GPUs) sampled every
//! `monitor.interval_secs`, the Prometheus exposition in dcgm-exporter's
//! and the libvirt exporter's names, the lossy sender to the controller,
//! and the guest exporter's channel ([`guest`]). See docs/monitoring.md.
//!
//! - [`Monitor::collect`] reads the host ([`host`]), every active domain
//!   in one libvirt call ([`domains`]), the host-visible GPUs' latest NVML
//!   samples (the GPU pool) and the guests' GPU reports ([`guest`]), and
//!   turns counter differences into rates. A counter that went backwards
//!   (a guest rebooted, a disk was detached) gives 0 for that interval,
//!   never a negative rate; an instance seen for the first time waits for
//!   its second sample.
//! - The latest collection is kept for `/metrics` ([`prom`]); the batch is
//!   published on a watch channel that holds only the newest, which the
//!   sender ([`send`]) posts once and drops on failure.

pub mod domains;
pub mod guest;
pub mod host;
pub mod prom;
pub mod send;

use crate::gpu::pool::HostGpuSample;
use domains::{DomainCounters, DomainStats};
use gantry_proto::metrics::{GpuSample, HostSample, InstanceSample, MetricsBatch, NicSample};
use gantry_proto::metrics::{MAX_BATCH_INSTANCES, MAX_GPUS, MAX_NICS};
use gantry_proto::InstanceId;
use host::{HostCounters, HostReader};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An instance as the monitor sees it ([`crate::manager::Manager::monitored`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRef {
    pub id: InstanceId,
    /// Its libvirt domain name.
    pub domain: String,
    /// Whether its guest runs (Running or Snapshotting).
    pub running: bool,
    /// The guest exporter's channel (a UNIX socket QEMU listens on).
    pub metrics_socket: PathBuf,
}

/// Where the collector finds instances and host GPUs.
pub trait Sources: Send + Sync {
    fn instances(&self) -> Vec<InstanceRef>;
    fn host_gpus(&self) -> Vec<HostGpuSample>;
}

impl Sources for crate::manager::Manager {
    fn instances(&self) -> Vec<InstanceRef> {
        self.monitored()
    }
    fn host_gpus(&self) -> Vec<HostGpuSample> {
        self.gpus().host_samples()
    }
}

/// The sender's counts (`gantry_agent_metrics_batches_total{outcome}`).
#[derive(Debug, Default)]
pub struct BatchCounts {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
}

impl BatchCounts {
    pub fn count(&self, sent: bool) {
        let c = if sent { &self.sent } else { &self.dropped };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The latest collection, as `/metrics` shows it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub host: HostCounters,
    pub host_cpu_ratio: f64,
    /// Whether the last all-domain stats call succeeded.
    pub libvirt_up: bool,
    pub instances: Vec<InstanceRef>,
    /// Raw counters of this agent's running instances' domains.
    pub domains: Vec<(InstanceId, DomainCounters)>,
    pub host_gpus: Vec<GpuSample>,
    pub guest_gpus: Vec<(InstanceId, Vec<GpuSample>)>,
}

/// The previous reading, for rates.
#[derive(Default)]
struct Prev {
    host: Option<(Instant, HostCounters)>,
    domains: HashMap<String, (Instant, DomainCounters)>,
}

/// The collector: see the module docs.
pub struct Monitor {
    interval: Duration,
    hostname: String,
    host: HostReader,
    domains: Box<dyn DomainStats>,
    guests: guest::GuestChannels,
    prev: Mutex<Prev>,
    last: Mutex<Arc<Snapshot>>,
    batches: tokio::sync::watch::Sender<Option<Arc<MetricsBatch>>>,
    counts: Arc<BatchCounts>,
}

/// `new - old` per second over `secs`; 0 when the counter went backwards.
fn rate(new: u64, old: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    new.saturating_sub(old) as f64 / secs
}

/// The contract's NIC name of a tap: `access` (`gt-…`) or `group` (`gg-…`).
pub fn nic_name(tap: &str) -> Option<&'static str> {
    if tap.starts_with(crate::net::nft::TAP_PREFIX) {
        Some("access")
    } else if tap.starts_with(crate::domain_xml::GROUP_TAP_PREFIX) {
        Some("group")
    } else {
        None
    }
}

/// A host-visible GPU's sample in the contract's units.
pub fn host_gpu_sample(g: &HostGpuSample) -> GpuSample {
    let s = &g.sample;
    GpuSample {
        index: g.device.index,
        uuid: g.device.uuid.clone(),
        pci_bus_id: g.device.pci.to_string(),
        model: g.device.name.clone(),
        util_pct: s.utilization_pct.map(|v| f64::from(v.min(100))),
        mem_used_bytes: s.memory_used_bytes,
        mem_total_bytes: Some(g.device.memory_bytes),
        temperature_c: s.temperature_c.map(f64::from),
        power_w: s.power_mw.map(|v| f64::from(v) / 1000.0),
        energy_j: s.energy_mj.map(|v| v as f64 / 1000.0),
        ecc_uncorrected: s.ecc_uncorrected_volatile,
        last_xid: Some(g.last_xid),
    }
}

/// GPUs that pass the contract's checks (a guest's report is untrusted).
fn checked(gpus: Vec<GpuSample>) -> Vec<GpuSample> {
    gpus.into_iter()
        .filter(|g| g.check("gpu").is_ok())
        .take(MAX_GPUS)
        .collect()
}

impl Monitor {
    pub fn new(
        interval: Duration,
        hostname: String,
        host: HostReader,
        domains: Box<dyn DomainStats>,
    ) -> Arc<Self> {
        Arc::new(Self {
            interval,
            hostname,
            host,
            domains,
            guests: guest::GuestChannels::new(),
            prev: Mutex::default(),
            last: Mutex::default(),
            batches: tokio::sync::watch::channel(None).0,
            counts: Arc::default(),
        })
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The newest batch (the watch channel holds only one).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<Arc<MetricsBatch>>> {
        self.batches.subscribe()
    }

    pub fn counts(&self) -> Arc<BatchCounts> {
        self.counts.clone()
    }

    /// The latest collection.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The host's rates since the previous reading; `None` the first time.
    fn host_sample(
        &self,
        now: Instant,
        c: &HostCounters,
        prev: &mut Prev,
    ) -> Option<(HostSample, f64)> {
        let before = prev.host.replace((now, c.clone()));
        let (then, old) = before?;
        let secs = now.duration_since(then).as_secs_f64();
        let total = c.cpu_total.saturating_sub(old.cpu_total);
        let ratio = if total == 0 {
            0.0
        } else {
            (c.cpu_busy.saturating_sub(old.cpu_busy) as f64 / total as f64).min(1.0)
        };
        Some((
            HostSample {
                cpu_pct: ratio * 100.0,
                cpu_cores: c.cpu_cores,
                mem_used_bytes: c.mem_used_bytes,
                mem_total_bytes: c.mem_total_bytes,
                disk_used_bytes: c.fs_used_bytes,
                disk_total_bytes: c.fs_total_bytes,
                disk_read_bps: rate(c.disk_read_bytes, old.disk_read_bytes, secs),
                disk_write_bps: rate(c.disk_written_bytes, old.disk_written_bytes, secs),
                net_rx_bps: rate(c.net_rx_bytes, old.net_rx_bytes, secs),
                net_tx_bps: rate(c.net_tx_bytes, old.net_tx_bytes, secs),
                gpus: Vec::new(),
            },
            ratio,
        ))
    }

    /// One instance's rates against its domain's previous counters.
    fn instance_sample(
        &self,
        id: InstanceId,
        now: &DomainCounters,
        then: &DomainCounters,
        secs: f64,
    ) -> InstanceSample {
        let vcpus = now.vcpus.unwrap_or(1).max(1);
        let cpu_ns = match (now.cpu_time_ns, then.cpu_time_ns) {
            (Some(a), Some(b)) => a.saturating_sub(b),
            _ => 0,
        };
        let cpu_pct = if secs > 0.0 {
            (cpu_ns as f64 / (secs * 1e9 * f64::from(vcpus)) * 100.0).min(100.0)
        } else {
            0.0
        };
        let sum = |c: &DomainCounters, f: fn(&domains::DiskCounters) -> u64| {
            c.disks.iter().map(f).fold(0u64, u64::saturating_add)
        };
        let disk = |f: fn(&domains::DiskCounters) -> u64| rate(sum(now, f), sum(then, f), secs);
        let mut nics: Vec<NicSample> = Vec::new();
        for n in &now.nics {
            let Some(name) = nic_name(&n.tap) else {
                continue;
            };
            let old = then.nics.iter().find(|o| o.tap == n.tap);
            let (rx, tx) = old.map_or((0.0, 0.0), |o| {
                (
                    rate(n.rx_bytes, o.rx_bytes, secs),
                    rate(n.tx_bytes, o.tx_bytes, secs),
                )
            });
            match nics.iter_mut().find(|x| x.name == name) {
                Some(x) => {
                    x.rx_bps += rx;
                    x.tx_bps += tx;
                }
                None => nics.push(NicSample {
                    name: name.into(),
                    rx_bps: rx,
                    tx_bps: tx,
                }),
            }
        }
        nics.truncate(MAX_NICS);
        let gpus = self
            .guests
            .latest(&id, self.interval * 3)
            .map(checked)
            .unwrap_or_default();
        InstanceSample {
            instance: id,
            cpu_pct,
            vcpus,
            mem_used_bytes: now.mem_used_bytes(),
            mem_total_bytes: now.mem_total_bytes(),
            disk_read_bps: disk(|d| d.rd_bytes),
            disk_write_bps: disk(|d| d.wr_bytes),
            disk_read_iops: disk(|d| d.rd_reqs),
            disk_write_iops: disk(|d| d.wr_reqs),
            nics,
            gpus,
        }
    }

    /// One collection at `now` (`wall_ms`: the batch's time). Keeps the
    /// snapshot for `/metrics`; returns the batch, or `None` on the first
    /// call (rates need two readings).
    pub fn collect(&self, src: &dyn Sources, now: Instant, wall_ms: i64) -> Option<MetricsBatch> {
        let instances = src.instances();
        let running: Vec<(InstanceId, PathBuf)> = instances
            .iter()
            .filter(|i| i.running)
            .map(|i| (i.id, i.metrics_socket.clone()))
            .collect();
        self.guests.sync(&running);
        let by_domain: HashMap<&str, InstanceId> = instances
            .iter()
            .filter(|i| i.running)
            .map(|i| (i.domain.as_str(), i.id))
            .collect();
        let (libvirt_up, all) = match self.domains.all() {
            Ok(v) => (true, v),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read instances' statistics");
                (false, Vec::new())
            }
        };
        let domains: Vec<(InstanceId, DomainCounters)> = all
            .into_iter()
            .filter_map(|d| Some((*by_domain.get(d.name.as_str())?, d)))
            .collect();
        let counters = self.host.read_counters();
        let host_gpus: Vec<GpuSample> =
            checked(src.host_gpus().iter().map(host_gpu_sample).collect());

        let mut prev = self.prev.lock().unwrap_or_else(|p| p.into_inner());
        let host = self.host_sample(now, &counters, &mut prev);
        let mut samples = Vec::new();
        let mut guest_gpus = Vec::new();
        for (id, d) in &domains {
            if let Some((then, old)) = prev.domains.get(&d.name) {
                let secs = now.duration_since(*then).as_secs_f64();
                let s = self.instance_sample(*id, d, old, secs);
                if !s.gpus.is_empty() {
                    guest_gpus.push((*id, s.gpus.clone()));
                }
                samples.push(s);
            }
        }
        samples.truncate(MAX_BATCH_INSTANCES);
        // Domains that vanished are forgotten; libvirt's failure keeps the
        // old readings so the next success still has a baseline.
        if libvirt_up {
            prev.domains = domains
                .iter()
                .map(|(_, d)| (d.name.clone(), (now, d.clone())))
                .collect();
        }
        drop(prev);
        let host_cpu_ratio = host.as_ref().map_or(0.0, |(_, r)| *r);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(Snapshot {
            host: counters,
            host_cpu_ratio,
            libvirt_up,
            instances,
            domains,
            host_gpus: host_gpus.clone(),
            guest_gpus,
        });
        let (mut host, _) = host?;
        host.gpus = host_gpus;
        Some(MetricsBatch {
            sent_at_ms: wall_ms,
            interval_secs: self.interval.as_secs().clamp(1, 3600) as u32,
            host,
            instances: samples,
        })
    }

    /// Collects now and publishes the batch for the sender.
    pub fn tick(&self, src: &dyn Sources) {
        let wall_ms = chrono::Utc::now().timestamp_millis();
        if let Some(b) = self.collect(src, Instant::now(), wall_ms) {
            self.batches.send_replace(Some(Arc::new(b)));
        }
    }

    /// Starts the collection thread: a reading at once (the baseline),
    /// then one every interval.
    pub fn spawn(self: &Arc<Self>, src: Arc<dyn Sources>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || {
                let mut next = Instant::now();
                loop {
                    me.tick(src.as_ref());
                    next += me.interval;
                    let now = Instant::now();
                    if next < now {
                        next = now + me.interval;
                    }
                    std::thread::sleep(next - now);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the monitor thread; no metrics are collected");
        }
    }

    /// The monitor's part of `/metrics` (see [`prom`]).
    pub fn render(&self, out: &mut String) {
        prom::render(out, &self.snapshot(), &self.hostname, &self.counts);
    }
}

/// Starts the monitor of an agent (`monitor.enabled`): libvirt at
/// `libvirt_uri`, the state directory's filesystem, the manager's
/// instances and GPUs.
pub fn start(
    cfg: &crate::config::AgentConfig,
    manager: Arc<crate::manager::Manager>,
) -> Arc<Monitor> {
    let hostname = cfg
        .controller
        .as_ref()
        .map(|c| c.resolved_host_name())
        .or_else(sysinfo::System::host_name)
        .unwrap_or_else(|| "localhost".into());
    let m = Monitor::new(
        Duration::from_secs(cfg.monitor.interval_secs),
        hostname,
        HostReader::new(&cfg.state_dir),
        Box::new(domains::LibvirtStats::new(cfg.libvirt_uri.clone())),
    );
    m.spawn(manager);
    m
}

#[cfg(test)]
mod tests;
