//! The host's GPUs: discovery, leases and health, persisted in
//! `<state_dir>/gpus.json`.
//!
//! Every health change goes through [`GpuHealth::apply`]. A lease is
//! written to disk before the domain that uses it is defined, is never
//! given twice, survives agent restarts and ends when the instance lets go
//! of the GPU; the GPU then goes through the health gate
//! ([`super::gate`]) before anyone leases it again.
//!
//! ## `gpus.json` (magic `gantry-gpus`, version 1)
//! `{"magic":"gantry-gpus","version":1,"gpus":{"<pci>":{"health":{...},
//! "instance":"<id>"|null,"aer":{...},"faults":["XID 79 (...)"]}}}`:
//! `aer` is the AER baseline the gate compares against; `faults` are
//! reasons seen while the GPU was leased, which fail its next gate;
//! `identity` is what NVML last said of it (model, UUID, memory, ...).

use super::nvml::{GpuSample, Nvml, NvmlDevice};
use super::sysfs::{AerTotals, PciFunction, Sysfs};
use super::{GpuConfig, GpuError};
use gantry_proto::gpu::{GpuEvent, GpuHealth};
use gantry_proto::validate::PciAddress;
use gantry_proto::InstanceId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

pub const POOL_MAGIC: &str = "gantry-gpus";
pub const POOL_VERSION: u32 = 1;

/// What the agent keeps about one GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuRecord {
    pub health: GpuHealth,
    pub instance: Option<InstanceId>,
    /// AER totals when the GPU was last leased or passed the gate.
    #[serde(default)]
    pub aer: AerTotals,
    /// Reasons to quarantine seen while it was leased.
    #[serde(default)]
    pub faults: Vec<String>,
    /// Why the next gate must reset it, if it must.
    #[serde(default)]
    pub needs_reset: Option<String>,
    /// What NVML last said about it: a GPU on vfio-pci (passed through,
    /// or bound there at boot) is invisible to NVML but keeps its model and
    /// UUID, across agent restarts too.
    #[serde(default)]
    pub identity: Option<NvmlDevice>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PoolFile {
    gpus: BTreeMap<PciAddress, GpuRecord>,
}

/// A GPU as the agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuStatus {
    pub pci: PciAddress,
    pub model: String,
    pub uuid: Option<String>,
    pub memory_bytes: Option<u64>,
    pub numa_node: Option<u32>,
    pub iommu_group: Option<u32>,
    pub driver: Option<String>,
    /// The NVIDIA driver's version, VBIOS and MIG mode (NVML).
    pub driver_version: Option<String>,
    pub vbios: Option<String>,
    pub mig_mode: Option<u32>,
    pub cpu_affinity: Option<String>,
    /// Every function passed through with it (its IOMMU group, bridges
    /// left out).
    pub functions: Vec<PciAddress>,
    pub health: GpuHealth,
    pub instance: Option<InstanceId>,
}

/// A host-visible GPU's identity with its latest NVML sample
/// ([`GpuPool::host_samples`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HostGpuSample {
    pub device: NvmlDevice,
    pub sample: GpuSample,
    /// The last critical XID seen (0: none).
    pub last_xid: u64,
}

/// What discovery found for one GPU.
#[derive(Debug, Clone)]
pub(crate) struct Known {
    pub func: PciFunction,
    pub nvml: Option<NvmlDevice>,
    pub functions: Vec<PciAddress>,
}

#[derive(Default)]
pub(crate) struct State {
    pub known: BTreeMap<PciAddress, Known>,
    pub records: BTreeMap<PciAddress, GpuRecord>,
    pub samples: BTreeMap<PciAddress, GpuSample>,
    /// Critical XIDs seen, per GPU and XID.
    pub xids: BTreeMap<(PciAddress, u64), u64>,
    /// The last critical XID of each GPU (999: the driver did not say).
    pub last_xid: BTreeMap<PciAddress, u64>,
    pub gates_passed: u64,
    pub gates_failed: u64,
    /// How long the last gate took.
    pub last_gate: Option<Duration>,
    pub driver_version: Option<String>,
}

pub struct GpuPool {
    pub(crate) cfg: GpuConfig,
    pub(crate) sysfs: Sysfs,
    pub(crate) nvml: Box<dyn Nvml>,
    path: Option<PathBuf>,
    pub(crate) state: Mutex<State>,
    wake: (Mutex<bool>, Condvar),
}

impl GpuPool {
    /// A pool with no GPUs.
    pub fn empty() -> Arc<Self> {
        Arc::new(Self {
            cfg: GpuConfig::default(),
            sysfs: Sysfs::new("/nonexistent"),
            nvml: Box::new(super::nvml::NoNvml),
            path: None,
            state: Mutex::new(State::default()),
            wake: (Mutex::new(false), Condvar::new()),
        })
    }

    /// Discovers the host's GPUs through `sysfs` and `nvml` and loads the
    /// leases and health kept in `path`.
    pub fn open(
        cfg: GpuConfig,
        sysfs: Sysfs,
        nvml: Box<dyn Nvml>,
        path: PathBuf,
    ) -> Result<Arc<Self>, GpuError> {
        let file: PoolFile = match crate::fsutil::read_state(&path, POOL_MAGIC, POOL_VERSION) {
            Ok(f) => f,
            Err(crate::fsutil::FsError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                PoolFile::default()
            }
            Err(e) => return Err(e.into()),
        };
        let pool = Arc::new(Self {
            cfg,
            sysfs,
            nvml,
            path: Some(path),
            state: Mutex::new(State {
                records: file.gpus,
                ..Default::default()
            }),
            wake: (Mutex::new(false), Condvar::new()),
        });
        pool.discover()?;
        Ok(pool)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `nvml` or `none`.
    pub fn source(&self) -> &'static str {
        self.nvml.source()
    }

    pub fn config(&self) -> &GpuConfig {
        &self.cfg
    }

    pub fn sysfs(&self) -> &Sysfs {
        &self.sysfs
    }

    /// Finds GPUs (sysfs for presence and PCI facts, NVML for the rest);
    /// a GPU with a record that is no longer enumerated is lost, one that
    /// comes back is found.
    pub fn discover(&self) -> Result<(), GpuError> {
        if self.nvml.source() == "none" {
            return Ok(());
        }
        let funcs = self.sysfs.gpus()?;
        let by_pci: BTreeMap<PciAddress, NvmlDevice> = self
            .nvml
            .devices()
            .into_iter()
            .map(|d| (d.pci, d))
            .collect();
        let mut known = BTreeMap::new();
        for f in funcs {
            let functions = match f.iommu_group {
                Some(g) => self
                    .sysfs
                    .group(g)?
                    .into_iter()
                    .filter(|x| !x.is_bridge())
                    .map(|x| x.address)
                    .collect(),
                None => vec![f.address],
            };
            known.insert(
                f.address,
                Known {
                    // Else the record's identity (below).
                    nvml: by_pci.get(&f.address).cloned(),
                    func: f,
                    functions,
                },
            );
        }
        let driver_version = self.nvml.driver_version();
        let mut st = self.lock();
        st.driver_version = driver_version;
        let mut changed = false;
        for (pci, k) in known.iter_mut() {
            let gone = k.func.vendor == super::sysfs::GONE_VENDOR;
            let rec = st.records.entry(*pci).or_default();
            match &k.nvml {
                Some(n) if rec.identity.as_ref() != Some(n) => {
                    rec.identity = Some(n.clone());
                    changed = true;
                }
                Some(_) => {}
                None => k.nvml = rec.identity.clone(),
            }
            let event = match (&rec.health, gone) {
                (GpuHealth::Lost, false) => Some(GpuEvent::Found),
                (GpuHealth::Lost, true) => None,
                (_, true) => Some(GpuEvent::Lost),
                _ => None,
            };
            if let Some(e) = event {
                changed |= apply(pci, rec, e);
            }
        }
        for (pci, rec) in st.records.iter_mut() {
            if !known.contains_key(pci) && rec.health != GpuHealth::Lost {
                changed |= apply(pci, rec, GpuEvent::Lost);
            }
        }
        st.known = known;
        if changed {
            self.save(&st)?;
        }
        Ok(())
    }

    /// The GPUs the host itself sees now (not leased, known to NVML) with
    /// their latest sample and last XID, for the monitor; read-only.
    pub fn host_samples(&self) -> Vec<HostGpuSample> {
        let st = self.lock();
        st.records
            .iter()
            .filter(|(_, rec)| rec.instance.is_none())
            .filter_map(|(pci, _)| {
                let device = st.known.get(pci)?.nvml.clone()?;
                Some(HostGpuSample {
                    sample: st.samples.get(pci).cloned().unwrap_or_default(),
                    last_xid: st.last_xid.get(pci).copied().unwrap_or(0),
                    device,
                })
            })
            .collect()
    }

    /// Every GPU the host has or had (lost ones too).
    pub fn list(&self) -> Vec<GpuStatus> {
        let st = self.lock();
        st.records
            .iter()
            .map(|(pci, rec)| {
                let k = st.known.get(pci);
                let n = k.and_then(|k| k.nvml.as_ref());
                GpuStatus {
                    pci: *pci,
                    model: n.map_or_else(
                        || k.map_or_else(|| "unknown GPU".into(), |k| pci_model(&k.func)),
                        |n| n.name.clone(),
                    ),
                    uuid: n.map(|n| n.uuid.clone()),
                    memory_bytes: n.map(|n| n.memory_bytes),
                    numa_node: k
                        .and_then(|k| k.func.numa_node)
                        .or(n.and_then(|n| n.numa_node)),
                    iommu_group: k.and_then(|k| k.func.iommu_group),
                    driver: k.and_then(|k| k.func.driver.clone()),
                    driver_version: st.driver_version.clone(),
                    vbios: n.and_then(|n| n.vbios.clone()),
                    mig_mode: n.and_then(|n| n.mig_mode),
                    cpu_affinity: n.and_then(|n| n.cpu_affinity.clone()),
                    functions: k.map_or_else(|| vec![*pci], |k| k.functions.clone()),
                    health: rec.health.clone(),
                    instance: rec.instance,
                }
            })
            .collect()
    }

    /// Leases `gpus` to `instance` (persisted before it returns). A GPU
    /// already leased to the same instance is kept; any other state is a
    /// conflict naming it.
    pub fn lease(&self, instance: InstanceId, gpus: &[PciAddress]) -> Result<(), GpuError> {
        let mut st = self.lock();
        for g in gpus {
            if !st.known.contains_key(g) {
                return Err(GpuError::Unknown(*g));
            }
            let rec = st.records.get(g).cloned().unwrap_or_default();
            match (&rec.health, rec.instance) {
                (GpuHealth::Leased, Some(i)) if i == instance => {}
                (GpuHealth::Leased, Some(i)) => {
                    return Err(GpuError::Busy(*g, format!("leased to instance {i}")))
                }
                (h, _) if !h.is_leasable() => return Err(GpuError::Busy(*g, h.to_string())),
                _ => {}
            }
        }
        for g in gpus {
            let aer = self.sysfs.aer(g);
            let rec = st.records.entry(*g).or_default();
            if rec.instance == Some(instance) {
                continue;
            }
            apply(g, rec, GpuEvent::Lease);
            rec.instance = Some(instance);
            rec.aer = aer;
            rec.faults.clear();
        }
        self.save(&st)
    }

    /// Ends `instance`'s lease on the GPUs it holds except `keep`; they
    /// go through the gate. Returns the GPUs let go of.
    pub fn release(&self, instance: InstanceId, keep: &[PciAddress]) -> Vec<PciAddress> {
        let mut st = self.lock();
        let mut out = Vec::new();
        for (pci, rec) in st.records.iter_mut() {
            if rec.instance == Some(instance) && !keep.contains(pci) {
                rec.instance = None;
                if rec.health == GpuHealth::Leased {
                    apply(pci, rec, GpuEvent::Return);
                }
                out.push(*pci);
            }
        }
        if !out.is_empty() {
            if let Err(e) = self.save(&st) {
                tracing::error!(error = %e, "cannot persist GPU leases");
            }
            drop(st);
            self.wake();
        }
        out
    }

    /// Makes the leases match the instances the host has: GPUs of an
    /// instance are leased to it, leases of instances gone are ended.
    pub fn reconcile(&self, holders: &[(InstanceId, Vec<PciAddress>)]) {
        let orphans: Vec<InstanceId> = {
            let st = self.lock();
            st.records
                .values()
                .filter_map(|r| r.instance)
                .filter(|i| !holders.iter().any(|(h, _)| h == i))
                .collect()
        };
        for i in orphans {
            let gone = self.release(i, &[]);
            tracing::info!(instance = %i, gpus = ?gone, "ended the GPU lease of an instance that is gone");
        }
        for (i, gpus) in holders {
            if let Err(e) = self.lease(*i, gpus) {
                tracing::warn!(instance = %i, error = %e, "an instance's GPUs cannot be leased to it");
            }
        }
    }

    /// An admin cleared a quarantined or lost GPU: it goes through the
    /// gate again.
    pub fn clear(&self, pci: &PciAddress) -> Result<(), GpuError> {
        let mut st = self.lock();
        let rec = st.records.get_mut(pci).ok_or(GpuError::Unknown(*pci))?;
        rec.health = rec.health.apply(GpuEvent::Clear)?;
        rec.faults.clear();
        tracing::info!(%pci, "GPU cleared by an admin; it goes through the health gate");
        self.save(&st)?;
        drop(st);
        self.wake();
        Ok(())
    }

    pub(crate) fn save(&self, st: &State) -> Result<(), GpuError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = PoolFile {
            gpus: st.records.clone(),
        };
        crate::fsutil::write_state(path, POOL_MAGIC, POOL_VERSION, &file)?;
        Ok(())
    }

    /// Wakes the poller (a GPU waits for the gate).
    pub fn wake(&self) {
        let (m, c) = &self.wake;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        c.notify_all();
    }

    /// Waits for [`GpuPool::wake`] or `timeout`.
    pub(crate) fn sleep(&self, timeout: Duration) {
        let (m, c) = &self.wake;
        let g = m.lock().unwrap_or_else(|p| p.into_inner());
        let (mut g, _) = c
            .wait_timeout_while(g, timeout, |woken| !*woken)
            .unwrap_or_else(|p| p.into_inner());
        *g = false;
    }
}

/// Applies one event, logging the change; false when it does not apply.
pub(crate) fn apply(pci: &PciAddress, rec: &mut GpuRecord, e: GpuEvent) -> bool {
    let name = e.name();
    match rec.health.apply(e) {
        Ok(next) if next != rec.health => {
            tracing::info!(%pci, from = %rec.health, to = %next, event = name, "GPU health");
            rec.health = next;
            true
        }
        Ok(_) => false,
        Err(err) => {
            tracing::debug!(%pci, error = %err, "GPU event does not apply");
            false
        }
    }
}

/// A model name from PCI ids when NVML cannot say.
fn pci_model(f: &PciFunction) -> String {
    format!("NVIDIA {:04x}:{:04x}", f.vendor, f.device)
}

#[cfg(test)]
mod tests {
    use super::super::nvml::{GpuSample, HealthReading, XidEvent};
    use super::*;

    /// NVML that sees a fixed set of GPUs (a GPU on vfio-pci is invisible).
    struct Sees(Vec<NvmlDevice>);

    impl Nvml for Sees {
        fn source(&self) -> &'static str {
            "nvml"
        }
        fn driver_version(&self) -> Option<String> {
            None
        }
        fn devices(&self) -> Vec<NvmlDevice> {
            self.0.clone()
        }
        fn health(&self, _: &PciAddress) -> Option<HealthReading> {
            None
        }
        fn sample(&self, _: &PciAddress) -> Option<GpuSample> {
            None
        }
        fn next_event(&self, _: Duration) -> Option<XidEvent> {
            None
        }
    }

    #[test]
    fn a_gpu_nvml_no_longer_sees_keeps_its_identity_across_restarts() {
        let sim = tempfile::tempdir().unwrap();
        gantry_nvml_sim::control::init(sim.path(), "h100x8").unwrap();
        let sysfs = Sysfs::new(sim.path().join("sys"));
        let state = tempfile::tempdir().unwrap();
        let pci = PciAddress::parse("0000:1a:00.0").unwrap();
        let dev = NvmlDevice {
            index: 0,
            pci,
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: "GPU-00000000-0000-0000-0000-000000000001".into(),
            serial: None,
            memory_bytes: 85_520_809_984,
            vbios: None,
            mig_mode: None,
            numa_node: Some(0),
            cpu_affinity: None,
        };
        let open = |seen: Vec<NvmlDevice>| {
            GpuPool::open(
                GpuConfig::default(),
                sysfs.clone(),
                Box::new(Sees(seen)),
                state.path().join("gpus.json"),
            )
            .unwrap()
        };
        drop(open(vec![dev.clone()]));
        // Restarted while the GPU sits on vfio-pci: NVML sees nothing.
        let list = open(vec![]).list();
        assert_eq!(list[0].model, dev.name);
        assert_eq!(list[0].uuid.as_deref(), Some(dev.uuid.as_str()));
        assert_eq!(list[0].memory_bytes, Some(dev.memory_bytes));
        assert_eq!(list[1].model, "NVIDIA 10de:2330", "never seen by NVML");
        assert_eq!(list[1].uuid, None);
    }
}
