//! NVML inside the guest, loaded at run time (`dlopen` of
//! `libnvidia-ml.so.1`, or the path `--nvml` names): each GPU's figures
//! every interval, and the critical XIDs it raised in between (an event
//! set, drained without waiting before each reading).

use crate::report::RawGpu;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{EventSet, Nvml};
use std::collections::BTreeMap;
use std::ffi::OsStr;

/// Loads and initialises NVML from `lib`.
pub fn open(lib: &OsStr) -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(lib).init()
}

/// The GPUs of one NVML session and the XIDs seen so far.
pub struct Gpus<'n> {
    nvml: &'n Nvml,
    events: Option<EventSet<'n>>,
    /// Last XID per GPU index, for the GPUs whose XIDs are watched.
    last_xid: BTreeMap<u32, u64>,
}

impl<'n> Gpus<'n> {
    /// Registers every GPU that supports it for critical XID events.
    pub fn new(nvml: &'n Nvml) -> Self {
        let mut me = Self {
            nvml,
            events: None,
            last_xid: BTreeMap::new(),
        };
        let Ok(mut set) = nvml.create_event_set() else {
            return me;
        };
        for i in 0..nvml.device_count().unwrap_or(0) {
            let Ok(d) = nvml.device_by_index(i) else {
                continue;
            };
            let supported = d.supported_event_types().unwrap_or(EventTypes::empty());
            if !supported.contains(EventTypes::CRITICAL_XID_ERROR) {
                continue;
            }
            match d.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(s) => {
                    set = s;
                    me.last_xid.insert(i, 0);
                }
                // NVML frees the set on a failed registration.
                Err(_) => {
                    me.last_xid.clear();
                    return me;
                }
            }
        }
        if !me.last_xid.is_empty() {
            me.events = Some(set);
        }
        me
    }

    /// Takes the XIDs raised since the last call, without waiting.
    fn drain_events(&mut self) {
        let Some(set) = &self.events else {
            return;
        };
        // Bounded: a storm of events must not hold up the report.
        for _ in 0..1024 {
            match set.wait(0) {
                Ok(ev) => {
                    if let (Ok(i), Some(XidError::Value(x))) = (ev.device.index(), ev.event_data) {
                        self.last_xid.insert(i, x);
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Every GPU's figures. Err: NVML itself failed (the session should
    /// be opened again); a GPU that cannot be read is left out.
    pub fn read(&mut self) -> Result<Vec<RawGpu>, NvmlError> {
        self.drain_events();
        let n = self.nvml.device_count()?;
        let mut out = Vec::new();
        for i in 0..n {
            let Ok(d) = self.nvml.device_by_index(i) else {
                continue;
            };
            let Ok(uuid) = d.uuid() else {
                continue;
            };
            let mem = d.memory_info().ok();
            out.push(RawGpu {
                index: i,
                uuid,
                pci_bus_id: d.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                name: d.name().unwrap_or_default(),
                util_pct: d.utilization_rates().ok().map(|u| u.gpu),
                mem_used_bytes: mem.as_ref().map(|m| m.used),
                mem_total_bytes: mem.as_ref().map(|m| m.total),
                temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
                power_mw: d.power_usage().ok(),
                energy_mj: d.total_energy_consumption().ok(),
                ecc_uncorrected: d
                    .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                    .ok(),
                last_xid: self.last_xid.get(&i).copied(),
            });
        }
        Ok(out)
    }
}
