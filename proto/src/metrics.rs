//! Monitoring: what an agent samples every interval and sends on its own
//! lossy channel ([`AGENT_METRICS_PATH`], apart from the heartbeat whose
//! counters billing depends on), what the guest exporter reports over its
//! virtio-serial channel ([`GuestReport`]), and the Monitor view's series
//! ([`MonitorView`]).
//!
//! Rates (`*_bps`, `*_iops`, `cpu_pct`) are computed by the agent over the
//! interval, so averages of samples are averages of rates and downsampling
//! is a plain mean. Series names are the constants in [`series`]; both the
//! controller's own storage and its Prometheus reader answer with them.

use crate::validate::ValidationError;
use crate::InstanceId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `POST` path of a metrics batch (Bearer: the host credential).
pub const AGENT_METRICS_PATH: &str = "/v1/agent/metrics";
/// Default collection interval, seconds.
pub const DEFAULT_INTERVAL_SECS: u64 = 10;
/// Most instances in one batch.
pub const MAX_BATCH_INSTANCES: usize = 512;
/// Most GPUs in one sample (host or instance).
pub const MAX_GPUS: usize = 64;
/// Most NICs of one instance.
pub const MAX_NICS: usize = 16;
/// Longest text field (GPU UUID, model, PCI bus id, NIC name).
pub const MAX_TEXT: usize = 128;

/// The guest exporter's virtio-serial port name (the guest finds it under
/// `/sys/class/virtio-ports/*/name`).
pub const GUEST_CHANNEL_NAME: &str = "org.gantry.metrics.0";
/// Version of the guest exporter's line format ([`GuestReport::v`]).
pub const GUEST_REPORT_VERSION: u32 = 1;
/// Longest line the host reads from the guest channel (bytes); longer
/// lines are dropped whole.
pub const GUEST_LINE_MAX: usize = 64 * 1024;

/// One interval's samples of a host and its instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MetricsBatch {
    /// When the agent took the samples (Unix ms).
    pub sent_at_ms: i64,
    /// The interval the rates are over, seconds.
    pub interval_secs: u32,
    pub host: HostSample,
    /// Running instances (others have nothing to sample).
    pub instances: Vec<InstanceSample>,
}

/// The host's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostSample {
    /// Busy share of all cores, 0–100.
    pub cpu_pct: f64,
    pub cpu_cores: u32,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    /// The filesystem of the agent's state directory.
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_read_bps: f64,
    pub disk_write_bps: f64,
    pub net_rx_bps: f64,
    pub net_tx_bps: f64,
    /// GPUs the host sees (those not passed through to a guest).
    #[serde(default)]
    pub gpus: Vec<GpuSample>,
}

/// One Running instance's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InstanceSample {
    pub instance: InstanceId,
    /// Busy share of its vCPUs, 0–100.
    pub cpu_pct: f64,
    pub vcpus: u32,
    /// Memory the guest uses (its RSS on the host when the guest does not
    /// report more precisely).
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    /// Block I/O over all its disks.
    pub disk_read_bps: f64,
    pub disk_write_bps: f64,
    pub disk_read_iops: f64,
    pub disk_write_iops: f64,
    /// Per NIC (`access`, `group`).
    #[serde(default)]
    pub nics: Vec<NicSample>,
    /// Its passed-through GPUs, as the guest exporter reported them
    /// (empty when the guest runs no exporter).
    #[serde(default)]
    pub gpus: Vec<GpuSample>,
}

/// One NIC's traffic, seen from the guest (rx: into the guest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NicSample {
    pub name: String,
    pub rx_bps: f64,
    pub tx_bps: f64,
}

/// One GPU's figures (NVML's, named as dcgm-exporter names them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GpuSample {
    /// NVML's index (inside the guest for an instance's GPUs).
    pub index: u32,
    pub uuid: String,
    /// `0000:17:00.0` (as NVML reports it).
    pub pci_bus_id: String,
    pub model: String,
    #[serde(default)]
    pub util_pct: Option<f64>,
    #[serde(default)]
    pub mem_used_bytes: Option<u64>,
    #[serde(default)]
    pub mem_total_bytes: Option<u64>,
    #[serde(default)]
    pub temperature_c: Option<f64>,
    #[serde(default)]
    pub power_w: Option<f64>,
    /// Energy since the driver loaded, joules.
    #[serde(default)]
    pub energy_j: Option<f64>,
    /// Volatile uncorrected ECC errors.
    #[serde(default)]
    pub ecc_uncorrected: Option<u64>,
    /// The last XID seen (0: none), as `DCGM_FI_DEV_XID_ERRORS`.
    #[serde(default)]
    pub last_xid: Option<u64>,
}

/// One line (JSON) the guest exporter writes to its channel every
/// interval. The host stamps it on receipt; the guest's clock is not
/// trusted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestReport {
    /// [`GUEST_REPORT_VERSION`].
    pub v: u32,
    pub gpus: Vec<GpuSample>,
}

/// Where a Monitor view's points came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MonitorSource {
    /// The controller's own database.
    Database,
    /// The Prometheus server named by `metrics.prometheus_url`.
    Prometheus,
}

/// `GET /v1/instances/{id}/monitor?since=&until=&step=` (and, for admins,
/// `GET /v1/admin/hosts/{id}/monitor`). `since`/`until`: RFC 3339, or a
/// duration ago (`90s`, `15m`, `1h`, `7d`); defaults: the last hour, until
/// now. `step`: seconds or a duration; default: the finest the kept
/// samples allow, at most 360 points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MonitorView {
    /// The instance or host id.
    pub subject: String,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub step_secs: u64,
    pub source: MonitorSource,
    /// The latest sample's time, if any arrived in the range.
    #[serde(default)]
    pub latest: Option<DateTime<Utc>>,
    pub series: Vec<Series>,
    /// Instances: the state the Monitor tab showed before it had series.
    #[serde(default)]
    pub state: Option<crate::InstanceState>,
    #[serde(default)]
    pub desired_state: Option<crate::InstanceState>,
    #[serde(default)]
    pub state_since: Option<DateTime<Utc>>,
    #[serde(default)]
    pub pending_operation: Option<crate::ids::OperationId>,
    /// The instance's host (or the host itself): health, last heartbeat.
    #[serde(default)]
    pub host_health: Option<crate::api::v1::HostHealth>,
    #[serde(default)]
    pub host_last_heartbeat: Option<DateTime<Utc>>,
}

/// One series: a name from [`series`], its unit, labels (`gpu` index,
/// `nic` name) and points in time order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Series {
    pub name: String,
    pub unit: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub points: Vec<Point>,
}

/// A point: the start of its step and the mean over it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Point {
    pub t: DateTime<Utc>,
    pub v: f64,
}

/// Series names and units of the Monitor view.
pub mod series {
    pub const CPU_PCT: &str = "cpu_pct";
    pub const MEM_USED_BYTES: &str = "mem_used_bytes";
    pub const MEM_TOTAL_BYTES: &str = "mem_total_bytes";
    pub const DISK_READ_BPS: &str = "disk_read_bps";
    pub const DISK_WRITE_BPS: &str = "disk_write_bps";
    pub const DISK_READ_IOPS: &str = "disk_read_iops";
    pub const DISK_WRITE_IOPS: &str = "disk_write_iops";
    pub const DISK_USED_BYTES: &str = "disk_used_bytes";
    /// Labelled `nic` for instances.
    pub const NET_RX_BPS: &str = "net_rx_bps";
    pub const NET_TX_BPS: &str = "net_tx_bps";
    /// Labelled `gpu` (index) and `uuid`.
    pub const GPU_UTIL_PCT: &str = "gpu_util_pct";
    pub const GPU_MEM_USED_BYTES: &str = "gpu_mem_used_bytes";
    pub const GPU_TEMPERATURE_C: &str = "gpu_temperature_c";
    pub const GPU_POWER_W: &str = "gpu_power_w";

    /// The unit shown beside a series.
    pub fn unit(name: &str) -> &'static str {
        match name {
            CPU_PCT | GPU_UTIL_PCT => "percent",
            DISK_READ_BPS | DISK_WRITE_BPS | NET_RX_BPS | NET_TX_BPS => "bytes/s",
            DISK_READ_IOPS | DISK_WRITE_IOPS => "ops/s",
            GPU_TEMPERATURE_C => "celsius",
            GPU_POWER_W => "watts",
            _ => "bytes",
        }
    }
}

/// One value of a sample, keyed by series name and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub v: f64,
}

fn v(name: &'static str, x: f64) -> Value {
    Value {
        name,
        labels: Vec::new(),
        v: x,
    }
}

fn gpu_values(gpus: &[GpuSample], out: &mut Vec<Value>) {
    for g in gpus {
        let labels = vec![("gpu", g.index.to_string()), ("uuid", g.uuid.clone())];
        let figures = [
            (series::GPU_UTIL_PCT, g.util_pct),
            (
                series::GPU_MEM_USED_BYTES,
                g.mem_used_bytes.map(|b| b as f64),
            ),
            (series::GPU_TEMPERATURE_C, g.temperature_c),
            (series::GPU_POWER_W, g.power_w),
        ];
        for (name, x) in figures {
            if let Some(x) = x {
                out.push(Value {
                    name,
                    labels: labels.clone(),
                    v: x,
                });
            }
        }
    }
}

impl InstanceSample {
    /// The sample as Monitor series values (network summed over NICs and
    /// per NIC, labelled `nic`).
    pub fn values(&self) -> Vec<Value> {
        let mut out = vec![
            v(series::CPU_PCT, self.cpu_pct),
            v(series::MEM_USED_BYTES, self.mem_used_bytes as f64),
            v(series::MEM_TOTAL_BYTES, self.mem_total_bytes as f64),
            v(series::DISK_READ_BPS, self.disk_read_bps),
            v(series::DISK_WRITE_BPS, self.disk_write_bps),
            v(series::DISK_READ_IOPS, self.disk_read_iops),
            v(series::DISK_WRITE_IOPS, self.disk_write_iops),
        ];
        for n in &self.nics {
            for (name, x) in [
                (series::NET_RX_BPS, n.rx_bps),
                (series::NET_TX_BPS, n.tx_bps),
            ] {
                out.push(Value {
                    name,
                    labels: vec![("nic", n.name.clone())],
                    v: x,
                });
            }
        }
        gpu_values(&self.gpus, &mut out);
        out
    }
}

impl HostSample {
    /// The sample as Monitor series values.
    pub fn values(&self) -> Vec<Value> {
        let mut out = vec![
            v(series::CPU_PCT, self.cpu_pct),
            v(series::MEM_USED_BYTES, self.mem_used_bytes as f64),
            v(series::MEM_TOTAL_BYTES, self.mem_total_bytes as f64),
            v(series::DISK_USED_BYTES, self.disk_used_bytes as f64),
            v(series::DISK_READ_BPS, self.disk_read_bps),
            v(series::DISK_WRITE_BPS, self.disk_write_bps),
            v(series::NET_RX_BPS, self.net_rx_bps),
            v(series::NET_TX_BPS, self.net_tx_bps),
        ];
        gpu_values(&self.gpus, &mut out);
        out
    }
}

fn rate(field: &str, x: f64) -> Result<(), ValidationError> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("must be a finite number, not negative, got {x}"),
        ))
    }
}

fn pct(field: &str, x: f64) -> Result<(), ValidationError> {
    rate(field, x)?;
    if x > 100.0 {
        return Err(ValidationError::new(
            field,
            format!("is a percentage: at most 100, got {x}"),
        ));
    }
    Ok(())
}

fn text(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.len() > MAX_TEXT || s.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_TEXT} bytes without control characters"),
        ));
    }
    Ok(())
}

fn count(field: &str, n: usize, max: usize) -> Result<(), ValidationError> {
    if n > max {
        return Err(ValidationError::new(
            field,
            format!("at most {max} entries, got {n}"),
        ));
    }
    Ok(())
}

impl GpuSample {
    /// Checks the figures; the error names `<field>.<figure>`.
    pub fn check(&self, field: &str) -> Result<(), ValidationError> {
        text(&format!("{field}.uuid"), &self.uuid)?;
        text(&format!("{field}.pci_bus_id"), &self.pci_bus_id)?;
        text(&format!("{field}.model"), &self.model)?;
        if let Some(x) = self.util_pct {
            pct(&format!("{field}.util_pct"), x)?;
        }
        for (name, x) in [
            ("temperature_c", self.temperature_c),
            ("power_w", self.power_w),
            ("energy_j", self.energy_j),
        ] {
            if let Some(x) = x {
                rate(&format!("{field}.{name}"), x)?;
            }
        }
        Ok(())
    }
}

fn check_gpus(field: &str, gpus: &[GpuSample]) -> Result<(), ValidationError> {
    count(field, gpus.len(), MAX_GPUS)?;
    for (i, g) in gpus.iter().enumerate() {
        g.check(&format!("{field}[{i}]"))?;
    }
    Ok(())
}

impl GuestReport {
    /// Checks the version and every figure.
    pub fn check(&self) -> Result<(), ValidationError> {
        if self.v != GUEST_REPORT_VERSION {
            return Err(ValidationError::new(
                "v",
                format!(
                    "unsupported version {} (want {GUEST_REPORT_VERSION})",
                    self.v
                ),
            ));
        }
        check_gpus("gpus", &self.gpus)
    }
}

impl MetricsBatch {
    /// Checks every figure (finite, not negative, percentages at most 100,
    /// bounded lists and text) and `sent_at_ms` against `now_ms` (at most
    /// the heartbeat's clock skew ahead). The error names the field.
    pub fn check(&self, now_ms: i64) -> Result<(), ValidationError> {
        let skew = crate::api::agent::MAX_CLOCK_SKEW_MS;
        if self.sent_at_ms < 0 || self.sent_at_ms > now_ms.saturating_add(skew) {
            return Err(ValidationError::new(
                "sent_at_ms",
                format!("must not be negative nor more than {skew} ms ahead of the controller's clock; check the host's clock"),
            ));
        }
        if self.interval_secs == 0 || self.interval_secs > 3600 {
            return Err(ValidationError::new("interval_secs", "must be 1 to 3600"));
        }
        let h = &self.host;
        pct("host.cpu_pct", h.cpu_pct)?;
        for (f, x) in [
            ("host.disk_read_bps", h.disk_read_bps),
            ("host.disk_write_bps", h.disk_write_bps),
            ("host.net_rx_bps", h.net_rx_bps),
            ("host.net_tx_bps", h.net_tx_bps),
        ] {
            rate(f, x)?;
        }
        check_gpus("host.gpus", &h.gpus)?;
        count("instances", self.instances.len(), MAX_BATCH_INSTANCES)?;
        for (i, s) in self.instances.iter().enumerate() {
            let f = format!("instances[{i}]");
            pct(&format!("{f}.cpu_pct"), s.cpu_pct)?;
            for (name, x) in [
                ("disk_read_bps", s.disk_read_bps),
                ("disk_write_bps", s.disk_write_bps),
                ("disk_read_iops", s.disk_read_iops),
                ("disk_write_iops", s.disk_write_iops),
            ] {
                rate(&format!("{f}.{name}"), x)?;
            }
            count(&format!("{f}.nics"), s.nics.len(), MAX_NICS)?;
            for (j, n) in s.nics.iter().enumerate() {
                let nf = format!("{f}.nics[{j}]");
                text(&format!("{nf}.name"), &n.name)?;
                rate(&format!("{nf}.rx_bps"), n.rx_bps)?;
                rate(&format!("{nf}.tx_bps"), n.tx_bps)?;
            }
            check_gpus(&format!("{f}.gpus"), &s.gpus)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> MetricsBatch {
        MetricsBatch {
            sent_at_ms: 1_000,
            interval_secs: 10,
            host: HostSample {
                cpu_pct: 12.5,
                cpu_cores: 2,
                ..Default::default()
            },
            instances: vec![InstanceSample {
                instance: InstanceId::new(),
                cpu_pct: 50.0,
                vcpus: 1,
                mem_used_bytes: 1 << 20,
                mem_total_bytes: 1 << 30,
                disk_read_bps: 0.0,
                disk_write_bps: 4096.0,
                disk_read_iops: 0.0,
                disk_write_iops: 1.0,
                nics: vec![NicSample {
                    name: "access".into(),
                    rx_bps: 10.0,
                    tx_bps: 20.0,
                }],
                gpus: vec![GpuSample {
                    index: 0,
                    uuid: "GPU-1".into(),
                    pci_bus_id: "0000:17:00.0".into(),
                    model: "NVIDIA H100".into(),
                    util_pct: Some(99.0),
                    power_w: Some(300.0),
                    ..Default::default()
                }],
            }],
        }
    }

    #[test]
    fn a_good_batch_passes_and_bad_figures_are_named() {
        let b = batch();
        b.check(2_000).unwrap();
        let mut bad = b.clone();
        bad.instances[0].cpu_pct = f64::NAN;
        assert_eq!(bad.check(2_000).unwrap_err().field, "instances[0].cpu_pct");
        let mut bad = b.clone();
        bad.instances[0].gpus[0].util_pct = Some(101.0);
        assert_eq!(
            bad.check(2_000).unwrap_err().field,
            "instances[0].gpus[0].util_pct"
        );
        let mut bad = b.clone();
        bad.instances[0].nics[0].tx_bps = -1.0;
        assert_eq!(
            bad.check(2_000).unwrap_err().field,
            "instances[0].nics[0].tx_bps"
        );
        let mut bad = b;
        bad.sent_at_ms = i64::MAX;
        assert_eq!(bad.check(2_000).unwrap_err().field, "sent_at_ms");
    }

    #[test]
    fn values_name_the_series_and_label_gpus_and_nics() {
        let vals = batch().instances[0].values();
        let gpu = vals
            .iter()
            .find(|x| x.name == series::GPU_POWER_W)
            .expect("power");
        assert_eq!(gpu.v, 300.0);
        assert!(gpu.labels.contains(&("gpu", "0".to_string())));
        assert!(vals
            .iter()
            .any(|x| x.name == series::NET_TX_BPS && x.labels == vec![("nic", "access".into())]));
        assert!(!vals.iter().any(|x| x.name == series::GPU_TEMPERATURE_C));
        assert_eq!(series::unit(series::DISK_WRITE_BPS), "bytes/s");
    }

    #[test]
    fn guest_reports_are_versioned_and_strict() {
        let line = r#"{"v":1,"gpus":[{"index":0,"uuid":"GPU-x","pci_bus_id":"0000:01:00.0","model":"H100","util_pct":42.0}]}"#;
        let r: GuestReport = serde_json::from_str(line).unwrap();
        r.check().unwrap();
        let old = GuestReport { v: 9, gpus: vec![] };
        assert_eq!(old.check().unwrap_err().field, "v");
        assert!(serde_json::from_str::<GuestReport>(r#"{"v":1,"gpus":[],"x":1}"#).is_err());
    }
}
