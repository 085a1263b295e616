//! `gantry-agent gpu-probe`: everything the agent's GPU code reads, as
//! JSON, for a run on a real GPU host (scripts/gpu-probe) whose output
//! becomes a simulated-library profile and golden tests.

use super::nvml::{Nvml, RealNvml};
use super::sysfs::Sysfs;
use super::GpuConfig;
use serde_json::{json, Value};

fn r<T: std::fmt::Debug, E: std::fmt::Display>(x: Result<T, E>) -> Value {
    match x {
        Ok(v) => json!({ "ok": format!("{v:?}") }),
        Err(e) => json!({ "err": e.to_string() }),
    }
}

/// Reads every GPU through the agent's own code paths (sysfs, NVML
/// inventory, health, samples), plus raw NVML values the agent may use
/// later, into one JSON document.
pub fn probe(cfg: &GpuConfig) -> Value {
    let sysfs = Sysfs::new(&cfg.sysfs_root);
    let mut out = json!({ "library": cfg.nvml_library, "sysfs_root": cfg.sysfs_root });
    let mut pci = Vec::new();
    for f in sysfs.gpus().unwrap_or_default() {
        let a = f.address;
        pci.push(json!({
            "address": a.to_string(),
            "function": format!("{f:?}"),
            "group": f.iommu_group.map(|g| sysfs.group(g).map(|v| v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>()).unwrap_or_default()),
            "bars": r(sysfs.bar_sizes(&a)),
            "link": r(sysfs.link(&a)),
            "aer": format!("{:?}", sysfs.aer(&a)),
        }));
    }
    out["sysfs"] = json!({ "gpus": pci, "numa_nodes": sysfs.numa_nodes() });
    let nvml = match RealNvml::open(&cfg.nvml_library) {
        Ok(n) => n,
        Err(e) => {
            out["nvml_error"] = json!(e.to_string());
            return out;
        }
    };
    out["driver_version"] = json!(nvml.driver_version());
    let mut devs = Vec::new();
    for d in nvml.devices() {
        devs.push(json!({
            "device": d,
            "health": nvml.health(&d.pci),
            "verdict": nvml.health(&d.pci).map(|h| format!("{:?}", super::health::assess(&h))),
            "sample": nvml.sample(&d.pci),
            "raw": raw(&cfg.nvml_library, d.index),
        }));
    }
    out["nvml"] = json!(devs);
    out
}

/// Values read straight through nvml-wrapper (each `ok` or `err`).
fn raw(lib: &str, index: u32) -> Value {
    use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError};
    use nvml_wrapper::structs::device::FieldId;
    let Ok(n) = nvml_wrapper::Nvml::builder()
        .lib_path(std::ffi::OsStr::new(lib))
        .init()
    else {
        return Value::Null;
    };
    let Ok(d) = n.device_by_index(index) else {
        return Value::Null;
    };
    let fields = d.field_values_for(&[142, 143, 144, 145, 230].map(FieldId));
    json!({
        "nvml_version": r(n.sys_nvml_version()),
        "cuda_driver_version": r(n.sys_cuda_driver_version()),
        "pci_info": r(d.pci_info()),
        "supported_event_types": r(d.supported_event_types()),
        "field_values": r(fields.map(|v| v.into_iter().map(|x| format!("{x:?}")).collect::<Vec<_>>())),
        "bar1": r(d.bar1_memory_info()),
        "max_pcie_link_gen": r(d.max_pcie_link_gen()),
        "max_pcie_link_width": r(d.max_pcie_link_width()),
        "ecc_mode": r(d.is_ecc_enabled()),
        "ecc_uncorrected_aggregate": r(d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate)),
        "pages_pending": r(d.are_pages_pending_retired()),
        "architecture": r(d.architecture()),
        "cuda_compute_capability": r(d.cuda_compute_capability()),
        "brand": r(d.brand()),
        "persistence_mode": r(d.is_in_persistent_mode()),
        "performance_state": r(d.performance_state()),
        "enforced_power_limit_mw": r(d.enforced_power_limit()),
        "sm_clock_mhz": r(d.clock_info(Clock::SM)),
        "memory_clock_mhz": r(d.clock_info(Clock::Memory)),
        "throttle_reasons": r(d.current_throttle_reasons()),
        "pcie_replay_counter": r(d.pcie_replay_counter()),
        "board_part_number": r(d.board_part_number()),
        "inforom_image_version": r(d.info_rom_image_version()),
        "minor_number": r(d.minor_number()),
        "virtualization_mode": r(d.virtualization_mode()),
        "gsp_firmware_version": r(d.gsp_firmware_version()),
    })
}
