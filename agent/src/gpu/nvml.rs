//! NVML, the NVIDIA driver's management library, behind a narrow trait.
//!
//! [`RealNvml`] loads `libnvidia-ml.so.1` (or the path the config names:
//! the workspace's simulated library in tests and demos) through
//! nvml-wrapper and reads what the agent needs: identity, memory, VBIOS,
//! MIG mode, NUMA node and CPU affinity; the health inputs (volatile ECC,
//! row remapping, pages pending retirement, the recovery action, a GPU
//! fallen off the bus); samples for `/metrics`; and critical XID events,
//! on a thread of their own. [`NoNvml`] stands in on hosts without the
//! library. NVML sees only GPUs bound to the host driver: one passed
//! through to a VM is invisible to it until it comes back.

use gantry_proto::validate::PciAddress;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::FieldValueSample;
use nvml_wrapper::structs::device::FieldId;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// NVML field ids (nvml.h) the health check reads.
const FI_REMAPPED_COR: u32 = 142;
const FI_REMAPPED_UNC: u32 = 143;
const FI_REMAPPED_PENDING: u32 = 144;
const FI_REMAPPED_FAILURE: u32 = 145;
const FI_RECOVERY_ACTION: u32 = 230;

/// What NVML says about a GPU that does not change while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct NvmlDevice {
    pub index: u32,
    pub pci: PciAddress,
    pub name: String,
    pub uuid: String,
    pub serial: Option<String>,
    pub memory_bytes: u64,
    pub vbios: Option<String>,
    /// Current MIG mode (0 off, 1 on); `None`: no MIG on this GPU.
    pub mig_mode: Option<u32>,
    pub numa_node: Option<u32>,
    /// The CPUs closest to the GPU, as a cpulist (`0-47,96-143`).
    pub cpu_affinity: Option<String>,
}

/// Row remapping (Ampere and later).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Remap {
    pub correctable: u64,
    pub uncorrectable: u64,
    /// Rows wait for the next GPU reset to be remapped.
    pub pending: bool,
    /// A remap failed: the GPU needs service.
    pub failure: bool,
}

/// The health inputs NVML gives; `None` where the GPU or driver does not
/// support the query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HealthReading {
    /// NVML says the GPU has fallen off the bus.
    pub lost: bool,
    pub ecc_uncorrected_volatile: Option<u64>,
    pub ecc_corrected_volatile: Option<u64>,
    pub remap: Option<Remap>,
    pub pages_pending_retirement: Option<bool>,
    /// `NVML_GPU_RECOVERY_ACTION_*`: 0 none, 1 GPU reset, 2 node reboot,
    /// 3 drain P2P, 4 drain and reset.
    pub recovery_action: Option<u32>,
}

/// One sample for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GpuSample {
    pub utilization_pct: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_mw: Option<u32>,
    pub energy_mj: Option<u64>,
    pub pcie_link_gen: Option<u32>,
    pub pcie_link_width: Option<u32>,
    /// Volatile uncorrected ECC errors (`DCGM_FI_DEV_ECC_DBE_VOL_TOTAL`).
    pub ecc_uncorrected_volatile: Option<u64>,
}

/// A critical XID event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidEvent {
    pub pci: PciAddress,
    /// `None`: the driver did not say which (NVML's 999).
    pub xid: Option<u64>,
}

/// The NVML calls the agent makes.
pub trait Nvml: Send + Sync {
    /// `nvml` or `none`.
    fn source(&self) -> &'static str;
    fn driver_version(&self) -> Option<String>;
    /// Every GPU NVML sees (those bound to the host driver).
    fn devices(&self) -> Vec<NvmlDevice>;
    /// Health inputs of one GPU; `None` when NVML does not see it.
    fn health(&self, pci: &PciAddress) -> Option<HealthReading>;
    fn sample(&self, pci: &PciAddress) -> Option<GpuSample>;
    /// The next critical XID, waiting up to `timeout`.
    fn next_event(&self, timeout: Duration) -> Option<XidEvent>;
}

/// No NVML on this host.
pub struct NoNvml;

impl Nvml for NoNvml {
    fn source(&self) -> &'static str {
        "none"
    }
    fn driver_version(&self) -> Option<String> {
        None
    }
    fn devices(&self) -> Vec<NvmlDevice> {
        Vec::new()
    }
    fn health(&self, _: &PciAddress) -> Option<HealthReading> {
        None
    }
    fn sample(&self, _: &PciAddress) -> Option<GpuSample> {
        None
    }
    fn next_event(&self, timeout: Duration) -> Option<XidEvent> {
        std::thread::sleep(timeout);
        None
    }
}

/// NVML through nvml-wrapper.
pub struct RealNvml {
    nvml: Arc<nvml_wrapper::Nvml>,
    /// PCI address -> NVML index, refreshed by [`Nvml::devices`].
    index: Mutex<HashMap<PciAddress, u32>>,
    events: Mutex<Receiver<XidEvent>>,
}

/// `Ok(None)` for queries the GPU or library does not support.
fn opt<T>(r: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::GpuLost) => Err(NvmlError::GpuLost),
        Err(_) => Ok(None),
    }
}

impl RealNvml {
    /// Loads the library at `path` (a bare name goes through the dynamic
    /// loader's search path) and starts the XID event thread.
    pub fn open(path: &str) -> Result<Self, NvmlError> {
        let nvml = Arc::new(
            nvml_wrapper::Nvml::builder()
                .lib_path(std::ffi::OsStr::new(path))
                .init()?,
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let me = Self {
            nvml: nvml.clone(),
            index: Mutex::new(HashMap::new()),
            events: Mutex::new(rx),
        };
        let devices = me.devices();
        let at: HashMap<u32, PciAddress> = devices.iter().map(|d| (d.index, d.pci)).collect();
        std::thread::Builder::new()
            .name("gpu-events".into())
            .spawn(move || watch_events(&nvml, at, tx))
            .map_err(|_| NvmlError::Unknown)?;
        Ok(me)
    }

    fn device(&self, pci: &PciAddress) -> Option<nvml_wrapper::Device<'_>> {
        let i = *self.index.lock().ok()?.get(pci)?;
        self.nvml.device_by_index(i).ok()
    }

    fn read_device(&self, i: u32) -> Result<NvmlDevice, NvmlError> {
        let d = self.nvml.device_by_index(i)?;
        let bus = d.pci_info()?.bus_id;
        let pci = PciAddress::parse(&bus).ok_or(NvmlError::Unknown)?;
        let affinity = opt(d.cpu_affinity(64))?.map(|words| cpulist(&words));
        Ok(NvmlDevice {
            index: i,
            pci,
            name: d.name()?,
            uuid: d.uuid()?,
            serial: opt(d.serial())?,
            memory_bytes: d.memory_info()?.total,
            vbios: opt(d.vbios_version())?,
            mig_mode: opt(d.mig_mode())?.map(|m| m.current),
            numa_node: opt(d.numa_node_id())?,
            cpu_affinity: affinity.filter(|s| !s.is_empty()),
        })
    }
}

/// `[0b1011]` -> `0-1,3`.
pub fn cpulist(words: &[std::os::raw::c_ulong]) -> String {
    let bits = std::os::raw::c_ulong::BITS as usize;
    let cpus: Vec<usize> = words
        .iter()
        .enumerate()
        .flat_map(|(w, &v)| {
            (0..bits)
                .filter(move |b| v >> b & 1 == 1)
                .map(move |b| w * bits + b)
        })
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", cpus[i])
        });
        i += 1;
    }
    out.join(",")
}

fn field_u64(s: &Result<FieldValueSample, NvmlError>) -> Option<u64> {
    use nvml_wrapper::enums::device::SampleValue as V;
    match s.as_ref().ok()?.value.as_ref().ok()? {
        V::U32(v) => Some(u64::from(*v)),
        V::U64(v) => Some(*v),
        V::I64(v) => u64::try_from(*v).ok(),
        V::F64(v) => Some(*v as u64),
    }
}

fn read_health(d: &nvml_wrapper::Device<'_>) -> Result<HealthReading, NvmlError> {
    let ids = [
        FI_REMAPPED_COR,
        FI_REMAPPED_UNC,
        FI_REMAPPED_PENDING,
        FI_REMAPPED_FAILURE,
        FI_RECOVERY_ACTION,
    ]
    .map(FieldId);
    let fields = opt(d.field_values_for(&ids))?.unwrap_or_default();
    let f = |i: usize| fields.get(i).and_then(field_u64);
    let remap = match (f(0), f(1), f(2), f(3)) {
        (Some(c), Some(u), Some(p), Some(x)) => Some(Remap {
            correctable: c,
            uncorrectable: u,
            pending: p != 0,
            failure: x != 0,
        }),
        _ => None,
    };
    Ok(HealthReading {
        lost: false,
        ecc_uncorrected_volatile: opt(
            d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
        )?,
        ecc_corrected_volatile: opt(
            d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
        )?,
        remap,
        pages_pending_retirement: opt(d.are_pages_pending_retired())?,
        recovery_action: f(4).map(|v| v as u32),
    })
}

impl Nvml for RealNvml {
    fn source(&self) -> &'static str {
        "nvml"
    }

    fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }

    fn devices(&self) -> Vec<NvmlDevice> {
        let n = self.nvml.device_count().unwrap_or(0);
        let mut out = Vec::new();
        for i in 0..n {
            match self.read_device(i) {
                Ok(d) => out.push(d),
                Err(e) => tracing::warn!(index = i, error = %e, "NVML cannot read a GPU"),
            }
        }
        if let Ok(mut idx) = self.index.lock() {
            *idx = out.iter().map(|d| (d.pci, d.index)).collect();
        }
        out
    }

    fn health(&self, pci: &PciAddress) -> Option<HealthReading> {
        let d = self.device(pci)?;
        match read_health(&d) {
            Ok(h) => Some(h),
            Err(NvmlError::GpuLost) => Some(HealthReading {
                lost: true,
                ..Default::default()
            }),
            Err(e) => {
                tracing::warn!(%pci, error = %e, "NVML health read failed");
                None
            }
        }
    }

    fn sample(&self, pci: &PciAddress) -> Option<GpuSample> {
        let d = self.device(pci)?;
        Some(GpuSample {
            utilization_pct: d.utilization_rates().ok().map(|u| u.gpu),
            memory_used_bytes: d.memory_info().ok().map(|m| m.used),
            temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
            power_mw: d.power_usage().ok(),
            energy_mj: d.total_energy_consumption().ok(),
            pcie_link_gen: d.current_pcie_link_gen().ok(),
            pcie_link_width: d.current_pcie_link_width().ok(),
            ecc_uncorrected_volatile: d
                .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                .ok(),
        })
    }

    fn next_event(&self, timeout: Duration) -> Option<XidEvent> {
        let rx = self.events.lock().ok()?;
        match rx.recv_timeout(timeout) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                drop(rx);
                std::thread::sleep(timeout);
                None
            }
        }
    }
}

/// Waits for critical XIDs on every GPU NVML saw at start and forwards
/// them; ends when the receiver is gone or events are not supported.
fn watch_events(nvml: &nvml_wrapper::Nvml, at: HashMap<u32, PciAddress>, tx: Sender<XidEvent>) {
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;
    let Ok(mut set) = nvml.create_event_set() else {
        tracing::info!("NVML has no event sets: XIDs are not watched");
        return;
    };
    let mut watched = 0;
    for i in at.keys() {
        let Ok(d) = nvml.device_by_index(*i) else {
            continue;
        };
        let supported = d.supported_event_types().unwrap_or(EventTypes::empty());
        if !supported.contains(EventTypes::CRITICAL_XID_ERROR) {
            continue;
        }
        match d.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                watched += 1;
            }
            Err(e) => {
                // NVML frees the set on a failed registration.
                tracing::warn!(index = i, error = %e.error, "cannot watch GPUs' XIDs");
                return;
            }
        }
    }
    if watched == 0 {
        return;
    }
    loop {
        match set.wait(1000) {
            Ok(ev) => {
                let Some(pci) = ev.device.index().ok().and_then(|i| at.get(&i)) else {
                    continue;
                };
                let xid = match ev.event_data {
                    Some(XidError::Value(v)) => Some(v),
                    _ => None,
                };
                if tx.send(XidEvent { pci: *pci, xid }).is_err() {
                    return;
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::warn!(error = %e, "waiting for NVML events failed; XIDs are not watched");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_affinity_words_become_a_cpulist() {
        assert_eq!(cpulist(&[0b1011]), "0-1,3");
        assert_eq!(cpulist(&[0, 1]), "64");
        assert_eq!(cpulist(&[u64::MAX as _]), "0-63");
        assert_eq!(cpulist(&[]), "");
    }
}
