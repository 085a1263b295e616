//! The simulated host as data: the versioned `state.json` document, its
//! atomic writer and reader, and the "effective" view that folds simulated
//! GPU resets (the sysfs `reset` file's mtime) into the stored faults.
//!
//! The library only ever reads this document; the control functions (see
//! [`crate::control`]) are its only writers.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The `format` field of every state document.
pub const FORMAT: &str = "gantry-nvml-sim";
/// The `version` field this build reads and writes.
pub const VERSION: u32 = 1;
/// The state document's file name inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// The fake sysfs root's name inside the state directory.
pub const SYS_DIR: &str = "sys";

/// NVML's `nvmlEventTypeXidCriticalError`.
pub const EVENT_XID: u64 = nvml_wrapper_sys::bindings::nvmlEventTypeXidCriticalError as u64;
/// NVML's `nvmlEventTypeSingleBitEccError`.
pub const EVENT_SBE: u64 = nvml_wrapper_sys::bindings::nvmlEventTypeSingleBitEccError as u64;
/// NVML's `nvmlEventTypeDoubleBitEccError`.
pub const EVENT_DBE: u64 = nvml_wrapper_sys::bindings::nvmlEventTypeDoubleBitEccError as u64;

fn event_xid() -> u64 {
    EVENT_XID
}

/// The whole simulated host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// The built-in profile this host was made from.
    pub profile: String,
    /// `nvmlSystemGetDriverVersion`, e.g. `550.127.05`.
    pub driver_version: String,
    /// `nvmlSystemGetNVMLVersion`, e.g. `12.550.127.05`.
    pub nvml_version: String,
    /// `nvmlSystemGetCudaDriverVersion_v2`, e.g. `12040` for 12.4.
    pub cuda_driver_version: i32,
    /// The host's NUMA nodes (`devices/system/node/node<id>/cpulist`).
    pub numa_nodes: Vec<NumaNode>,
    /// The GPUs, in NVML index order.
    pub gpus: Vec<Gpu>,
    /// Non-GPU PCI functions sharing a GPU's IOMMU group (HDMI audio).
    #[serde(default)]
    pub companions: Vec<Companion>,
    /// Events in `seq` order.
    #[serde(default)]
    pub events: Vec<Event>,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    pub id: u32,
    /// Linux cpulist syntax, e.g. `0-55,112-167`.
    pub cpulist: String,
}

/// One simulated GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub serial: String,
    pub minor_number: u32,
    /// NVML form, `00000000:1A:00.0`.
    pub pci_bus_id: String,
    /// sysfs form, `0000:1a:00.0`.
    pub sysfs_bdf: String,
    /// NVML `pciDeviceId`: device id << 16 | vendor id (`0x233010DE`).
    pub pci_device_id: u32,
    /// NVML `pciSubSystemId`: subsystem device << 16 | subsystem vendor.
    pub pci_subsystem_id: u32,
    /// 24-bit PCI class code (`0x030200`: 3D controller).
    pub pci_class: u32,
    pub iommu_group: u32,
    pub memory_total_bytes: u64,
    pub memory_reserved_bytes: u64,
    pub memory_used_bytes: u64,
    pub bar0_bytes: u64,
    pub bar1_bytes: u64,
    pub bar3_bytes: u64,
    pub vbios_version: String,
    pub numa_node: u32,
    /// The CPUs close to this GPU, cpulist syntax.
    pub cpu_affinity: String,
    /// `None`: the GPU does not support MIG (`NOT_SUPPORTED`).
    pub mig: Option<MigMode>,
    pub link: Link,
    pub temperature_c: u32,
    pub power_mw: u32,
    pub power_limit_mw: u32,
    pub energy_mj: u64,
    pub utilization_gpu: u32,
    pub utilization_memory: u32,
    pub clocks: Clocks,
    pub ecc: Ecc,
    pub remap: Remap,
    pub pages_pending: bool,
    pub pages_pending_since_ms: Option<u64>,
    /// `NVML_FI_DEV_GET_GPU_RECOVERY_ACTION`; 0 = none.
    pub recovery_action: u32,
    pub pcie_replay_count: u32,
    pub aer: Aer,
    /// Fallen off the bus: per-device queries return `GPU_IS_LOST`.
    pub lost: bool,
}

/// MIG mode, current and pending (0 disabled, 1 enabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigMode {
    pub current: u32,
    pub pending: u32,
}

/// PCIe link, as NVML and sysfs see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub current_gen: u32,
    pub current_width: u32,
    pub max_gen: u32,
    pub max_width: u32,
    /// sysfs `current_link_speed`, e.g. `32.0 GT/s PCIe`.
    pub current_speed: String,
    pub max_speed: String,
}

/// Current clocks, MHz.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clocks {
    pub graphics: u32,
    pub sm: u32,
    pub mem: u32,
    pub video: u32,
}

/// ECC mode and counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ecc {
    /// When false, ECC counter queries return `NOT_SUPPORTED`.
    pub enabled: bool,
    pub corrected_volatile: u64,
    pub uncorrected_volatile: u64,
    pub corrected_aggregate: u64,
    pub uncorrected_aggregate: u64,
    /// When the volatile counters were last set (filesystem clock, ms).
    pub volatile_since_ms: Option<u64>,
}

/// Row remapping (`nvmlDeviceGetRemappedRows`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remap {
    /// Rows remapped (applied) for correctable errors.
    pub corr: u32,
    /// Rows remapped (applied) for uncorrectable errors.
    pub unc: u32,
    /// Rows waiting for the next GPU reset.
    pub pending_corr: u32,
    pub pending_unc: u32,
    /// The pending flag; true while pending rows wait for a reset.
    pub pending: bool,
    pub failure: bool,
    /// When `pending` was set (filesystem clock, ms).
    pub pending_since_ms: Option<u64>,
}

/// AER totals written to the sysfs `aer_dev_*` files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aer {
    pub fatal: u64,
    pub nonfatal: u64,
    pub correctable: u64,
}

/// A non-GPU function in a GPU's IOMMU group (an HDMI audio function).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Companion {
    pub sysfs_bdf: String,
    pub vendor: u32,
    pub device: u32,
    pub class: u32,
    pub iommu_group: u32,
    pub numa_node: u32,
    pub driver: String,
}

/// One event for `nvmlEventSetWait_v2`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Strictly increasing.
    pub seq: u64,
    /// GPU index.
    pub gpu: u32,
    /// The XID (0 for ECC events).
    pub xid: u64,
    /// NVML event type bit; XID critical error when absent.
    #[serde(default = "event_xid")]
    pub event_type: u64,
}

/// Errors reading or writing the state document.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a gantry-nvml-sim state document: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl State {
    /// The highest event sequence number (0 when there are none).
    pub fn max_seq(&self) -> u64 {
        self.events.last().map_or(0, |e| e.seq)
    }

    /// Parses and checks a state document.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<State, StateError> {
        let invalid = |reason: String| StateError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(invalid(format!("\"format\" is not {FORMAT:?}")));
        }
        let version = v.get("version").and_then(|f| f.as_u64());
        if version != Some(u64::from(VERSION)) {
            return Err(invalid(format!(
                "version {version:?} is not {VERSION}, the one this build reads"
            )));
        }
        serde_json::from_value(v).map_err(|e| invalid(e.to_string()))
    }

    /// Reads `dir/state.json` as stored (no reset derivation).
    pub fn read(dir: &Path) -> Result<State, StateError> {
        let path = dir.join(STATE_FILE);
        let bytes = fs::read(&path).map_err(io(&path))?;
        State::parse(&path, &bytes)
    }

    /// Writes `dir/state.json` atomically: a temporary file, fsync, rename,
    /// fsync of the directory.
    pub fn write(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp.{}", std::process::id()));
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| StateError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        if let Ok(d) = fs::File::open(dir) {
            // Best effort: some filesystems refuse to fsync a directory.
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The state as NVML shows it: faults that a simulated GPU reset
    /// (see [`reset_mtime_ms`]) has cleared since they were set are
    /// folded in. `sys` is the fake sysfs root; `None` (in-memory mode)
    /// returns the state unchanged.
    pub fn effective(&self, sys: Option<&Path>) -> State {
        let mut s = self.clone();
        let Some(sys) = sys else { return s };
        for g in &mut s.gpus {
            let Some(reset) = reset_mtime_ms(sys, &g.sysfs_bdf) else {
                continue;
            };
            let after = |since: Option<u64>| since.is_some_and(|t| reset > t);
            if g.remap.pending && after(g.remap.pending_since_ms) {
                g.remap.corr += g.remap.pending_corr;
                g.remap.unc += g.remap.pending_unc;
                g.remap.pending_corr = 0;
                g.remap.pending_unc = 0;
                g.remap.pending = false;
                g.remap.pending_since_ms = None;
            }
            if g.pages_pending && after(g.pages_pending_since_ms) {
                g.pages_pending = false;
                g.pages_pending_since_ms = None;
            }
            if after(g.ecc.volatile_since_ms) {
                g.ecc.corrected_volatile = 0;
                g.ecc.uncorrected_volatile = 0;
                g.ecc.volatile_since_ms = None;
            }
        }
        s
    }
}

fn mtime_ms(meta: &fs::Metadata) -> Option<u64> {
    let t = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(t.as_millis()).ok()
}

/// The mtime (ms since the epoch) of `sys/bus/pci/devices/<bdf>/reset`:
/// the last simulated GPU reset.
pub fn reset_mtime_ms(sys: &Path, bdf: &str) -> Option<u64> {
    let meta = fs::metadata(sys.join("bus/pci/devices").join(bdf).join("reset")).ok()?;
    mtime_ms(&meta)
}

/// "Now" on the state directory's filesystem clock, ms since the epoch.
///
/// Fault timestamps are compared with the `reset` file's mtime, which the
/// kernel takes from its coarse clock; reading the time back from a file
/// just written keeps both sides on the same clock.
pub fn fs_now_ms(dir: &Path) -> Result<u64, StateError> {
    let path = dir.join(".clock");
    fs::write(&path, b"").map_err(io(&path))?;
    let meta = fs::metadata(&path).map_err(io(&path))?;
    Ok(mtime_ms(&meta).unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }))
}

/// Parses a PCI address in NVML (`00000000:1A:00.0`), sysfs
/// (`0000:1a:00.0`) or short (`1a:00.0`) form into (domain, bus, device,
/// function).
pub fn parse_bdf(s: &str) -> Option<(u32, u32, u32, u32)> {
    let s = s.trim();
    let (rest, func) = s.rsplit_once('.')?;
    let mut parts: Vec<&str> = rest.split(':').collect();
    if parts.len() == 2 {
        parts.insert(0, "0");
    }
    let [d, b, dev] = parts.as_slice() else {
        return None;
    };
    let hex = |x: &str| u32::from_str_radix(x, 16).ok();
    let (d, b, dev, f) = (hex(d)?, hex(b)?, hex(dev)?, hex(func)?);
    (b <= 0xff && dev <= 0x1f && f <= 7).then_some((d, b, dev, f))
}

/// Parses Linux cpulist syntax (`0-3,8,10-11`) into CPU numbers.
pub fn parse_cpulist(list: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

/// The PCIe generation for a sysfs link speed (`32.0 GT/s PCIe` → 5).
pub fn link_gen(speed: &str) -> Option<u32> {
    let gts = speed.split_whitespace().next()?;
    Some(match gts {
        "2.5" => 1,
        "5.0" | "5" => 2,
        "8.0" | "8" => 3,
        "16.0" | "16" => 4,
        "32.0" | "32" => 5,
        "64.0" | "64" => 6,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists_parse_ranges_and_singles() {
        assert_eq!(parse_cpulist("0-2,8,10-11"), Some(vec![0, 1, 2, 8, 10, 11]));
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("x"), None);
    }

    #[test]
    fn pci_addresses_parse_in_every_form() {
        let want = Some((0, 0x1a, 0, 0));
        assert_eq!(parse_bdf("00000000:1A:00.0"), want);
        assert_eq!(parse_bdf("0000:1a:00.0"), want);
        assert_eq!(parse_bdf("1a:00.0"), want);
        assert_eq!(parse_bdf("0000:1a:00"), None);
        assert_eq!(parse_bdf("0000:1a:20.0"), None);
    }

    #[test]
    fn link_speeds_map_to_generations() {
        assert_eq!(link_gen("32.0 GT/s PCIe"), Some(5));
        assert_eq!(link_gen("2.5 GT/s PCIe"), Some(1));
        assert_eq!(link_gen("7 GT/s"), None);
    }

    #[test]
    fn documents_of_another_format_or_version_are_refused() {
        let p = Path::new("state.json");
        let e = State::parse(p, br#"{"format":"other","version":1}"#).unwrap_err();
        assert!(e.to_string().contains("format"), "{e}");
        let e = State::parse(p, br#"{"format":"gantry-nvml-sim","version":2}"#).unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
    }
}
