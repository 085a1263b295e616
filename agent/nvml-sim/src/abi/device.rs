//! Per-device queries: identity, PCI, memory, topology, telemetry, ECC,
//! page retirement, row remapping and PCIe link.
//!
//! A GPU marked lost answers `NVML_ERROR_GPU_IS_LOST` to everything here
//! except `nvmlDeviceGetIndex` and `nvmlDeviceGetPciInfo_v3`.

use super::{
    device_value, fill_array, guard, with_gpu, write_str, INVALID_ARGUMENT, NOT_SUPPORTED, SUCCESS,
};
use crate::state::{parse_bdf, parse_cpulist, Gpu};
use nvml_wrapper_sys::bindings::*;
use std::ffi::{c_char, c_uint, c_ulong, c_ulonglong};

/// BAR1 in use: what the driver maps for itself on an idle GPU.
const BAR1_USED: u64 = 2 << 20;

/// Writes a string property of a (non-lost) GPU into a caller's buffer.
unsafe fn device_string(
    device: nvmlDevice_t,
    buf: *mut c_char,
    len: c_uint,
    pick: fn(&Gpu) -> &str,
) -> nvmlReturn_t {
    guard(|| {
        if buf.is_null() {
            return INVALID_ARGUMENT;
        }
        // SAFETY: `buf` holds `len` writable bytes (NVML's contract).
        with_gpu(device, false, |_, g| unsafe {
            write_str(buf, len, pick(g))
        })
    })
}

/// `nvmlDeviceGetName`, e.g. `NVIDIA H100 80GB HBM3`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { device_string(device, name, length, |g| &g.name) }
}

/// `nvmlDeviceGetUUID`, `GPU-xxxxxxxx-…`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { device_string(device, uuid, length, |g| &g.uuid) }
}

/// `nvmlDeviceGetSerial`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSerial(
    device: nvmlDevice_t,
    serial: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { device_string(device, serial, length, |g| &g.serial) }
}

/// `nvmlDeviceGetVbiosVersion`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetVbiosVersion(
    device: nvmlDevice_t,
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { device_string(device, version, length, |g| &g.vbios_version) }
}

/// Defines an export answering one `c_uint`/`c_ulonglong` from a GPU.
macro_rules! value_export {
    ($(#[$doc:meta])* $name:ident, $ty:ty, lost_ok = $lost:expr, |$g:ident| $value:expr) => {
        $(#[$doc])*
        #[no_mangle]
        pub unsafe extern "C" fn $name(device: nvmlDevice_t, out: *mut $ty) -> nvmlReturn_t {
            // SAFETY: `out` is null or writable (NVML's contract).
            guard(|| unsafe { device_value(device, out, $lost, |$g: &Gpu| Ok($value)) })
        }
    };
}

value_export!(
    /// `nvmlDeviceGetIndex`: answers for a lost GPU too.
    nvmlDeviceGetIndex, c_uint, lost_ok = true, |g| g.index
);
value_export!(
    /// `nvmlDeviceGetMinorNumber` (`/dev/nvidia<minor>`).
    nvmlDeviceGetMinorNumber, c_uint, lost_ok = false, |g| g.minor_number
);
value_export!(
    /// `nvmlDeviceGetNumaNodeId`.
    nvmlDeviceGetNumaNodeId, c_uint, lost_ok = false, |g| g.numa_node
);
value_export!(
    /// `nvmlDeviceGetPowerUsage`, mW.
    nvmlDeviceGetPowerUsage, c_uint, lost_ok = false, |g| g.power_mw
);
value_export!(
    /// `nvmlDeviceGetEnforcedPowerLimit`, mW.
    nvmlDeviceGetEnforcedPowerLimit, c_uint, lost_ok = false, |g| g.power_limit_mw
);
value_export!(
    /// `nvmlDeviceGetTotalEnergyConsumption`, mJ since the driver loaded.
    nvmlDeviceGetTotalEnergyConsumption, c_ulonglong, lost_ok = false, |g| g.energy_mj
);
value_export!(
    /// `nvmlDeviceGetPcieReplayCounter`.
    nvmlDeviceGetPcieReplayCounter, c_uint, lost_ok = false, |g| g.pcie_replay_count
);
value_export!(
    /// `nvmlDeviceGetCurrPcieLinkGeneration`.
    nvmlDeviceGetCurrPcieLinkGeneration, c_uint, lost_ok = false, |g| g.link.current_gen
);
value_export!(
    /// `nvmlDeviceGetCurrPcieLinkWidth`.
    nvmlDeviceGetCurrPcieLinkWidth, c_uint, lost_ok = false, |g| g.link.current_width
);
value_export!(
    /// `nvmlDeviceGetMaxPcieLinkGeneration`.
    nvmlDeviceGetMaxPcieLinkGeneration, c_uint, lost_ok = false, |g| g.link.max_gen
);
value_export!(
    /// `nvmlDeviceGetMaxPcieLinkWidth`.
    nvmlDeviceGetMaxPcieLinkWidth, c_uint, lost_ok = false, |g| g.link.max_width
);
value_export!(
    /// `nvmlDeviceGetCurrentClocksThrottleReasons`: "GPU idle" while
    /// utilisation is 0, none otherwise.
    nvmlDeviceGetCurrentClocksThrottleReasons, c_ulonglong, lost_ok = false,
    |g| if g.utilization_gpu == 0 { c_ulonglong::from(nvmlClocksThrottleReasonGpuIdle) } else { 0 }
);
value_export!(
    /// `nvmlDeviceGetSupportedEventTypes`: critical XIDs, plus single- and
    /// double-bit ECC errors where ECC is enabled.
    nvmlDeviceGetSupportedEventTypes, c_ulonglong, lost_ok = false,
    |g| crate::state::EVENT_XID
        | if g.ecc.enabled { crate::state::EVENT_SBE | crate::state::EVENT_DBE } else { 0 }
);

/// `nvmlDeviceGetTemperature`: only the GPU sensor exists.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: nvmlTemperatureSensors_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: `temp` is null or writable (NVML's contract).
        unsafe {
            device_value(device, temp, false, |g| {
                if sensor == nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU {
                    Ok(g.temperature_c)
                } else {
                    Err(INVALID_ARGUMENT)
                }
            })
        }
    })
}

/// `nvmlDeviceGetClockInfo`: graphics, SM, memory or video clock, MHz.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock_type: nvmlClockType_t,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: `clock` is null or writable (NVML's contract).
        unsafe {
            device_value(device, clock, false, |g| match clock_type {
                nvmlClockType_enum_NVML_CLOCK_GRAPHICS => Ok(g.clocks.graphics),
                nvmlClockType_enum_NVML_CLOCK_SM => Ok(g.clocks.sm),
                nvmlClockType_enum_NVML_CLOCK_MEM => Ok(g.clocks.mem),
                nvmlClockType_enum_NVML_CLOCK_VIDEO => Ok(g.clocks.video),
                _ => Err(INVALID_ARGUMENT),
            })
        }
    })
}

/// `nvmlDeviceGetPciInfo_v3`: answers for a lost GPU too (the driver keeps
/// the address it probed).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: `pci` is null or writable (NVML's contract).
        unsafe {
            device_value(device, pci, true, |g| {
                let (domain, bus, dev, _) = parse_bdf(&g.sysfs_bdf).ok_or(INVALID_ARGUMENT)?;
                // SAFETY (inside the block above): nvmlPciInfo_t is plain
                // integers and char arrays, for which all-zero bytes are valid.
                let mut info: nvmlPciInfo_t = std::mem::zeroed();
                fill_array(
                    &mut info.busIdLegacy,
                    &format!("{domain:04X}:{bus:02X}:{dev:02X}.0"),
                );
                fill_array(&mut info.busId, &g.pci_bus_id);
                info.domain = domain;
                info.bus = bus;
                info.device = dev;
                info.pciDeviceId = g.pci_device_id;
                info.pciSubSystemId = g.pci_subsystem_id;
                Ok(info)
            })
        }
    })
}

/// `nvmlDeviceGetMemoryInfo_v2`: checks the struct version as NVML does.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    guard(|| {
        if memory.is_null() {
            return INVALID_ARGUMENT;
        }
        let want = (std::mem::size_of::<nvmlMemory_v2_t>() as c_uint) | (2 << 24);
        // SAFETY: non-null and valid for reads (NVML's contract).
        if unsafe { (*memory).version } != want {
            return nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
        }
        // SAFETY: as above, valid for writes.
        unsafe {
            device_value(device, memory, false, |g| {
                let used = g.memory_used_bytes;
                let reserved = g.memory_reserved_bytes;
                Ok(nvmlMemory_v2_t {
                    version: want,
                    total: g.memory_total_bytes,
                    reserved,
                    free: g.memory_total_bytes.saturating_sub(used + reserved),
                    used,
                })
            })
        }
    })
}

/// `nvmlDeviceGetMemoryInfo` (v1): reserved memory counts as used.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: `memory` is null or writable (NVML's contract).
        unsafe {
            device_value(device, memory, false, |g| {
                let used = g.memory_used_bytes + g.memory_reserved_bytes;
                Ok(nvmlMemory_t {
                    total: g.memory_total_bytes,
                    free: g.memory_total_bytes.saturating_sub(used),
                    used,
                })
            })
        }
    })
}

/// `nvmlDeviceGetBAR1MemoryInfo`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetBAR1MemoryInfo(
    device: nvmlDevice_t,
    bar1: *mut nvmlBAR1Memory_t,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: `bar1` is null or writable (NVML's contract).
        unsafe {
            device_value(device, bar1, false, |g| {
                Ok(nvmlBAR1Memory_t {
                    bar1Total: g.bar1_bytes,
                    bar1Free: g.bar1_bytes.saturating_sub(BAR1_USED),
                    bar1Used: BAR1_USED,
                })
            })
        }
    })
}

/// `nvmlDeviceGetUtilizationRates`, percent.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: `utilization` is null or writable (NVML's contract).
        unsafe {
            device_value(device, utilization, false, |g| {
                Ok(nvmlUtilization_t {
                    gpu: g.utilization_gpu,
                    memory: g.utilization_memory,
                })
            })
        }
    })
}

/// Answers a query with several outputs: all must be non-null, then `f`
/// fills them.
unsafe fn device_outputs(
    device: nvmlDevice_t,
    outputs_present: bool,
    f: impl FnOnce(&Gpu) -> nvmlReturn_t,
) -> nvmlReturn_t {
    guard(|| {
        if !outputs_present {
            return INVALID_ARGUMENT;
        }
        with_gpu(device, false, |_, g| f(g))
    })
}

/// `nvmlDeviceGetMigMode`: `NOT_SUPPORTED` on GPUs without MIG.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: both pointers were checked non-null; writable per NVML's contract.
    unsafe {
        device_outputs(
            device,
            !current.is_null() && !pending.is_null(),
            |g| match g.mig {
                Some(m) => {
                    current.write(m.current);
                    pending.write(m.pending);
                    SUCCESS
                }
                None => NOT_SUPPORTED,
            },
        )
    }
}

/// `nvmlDeviceGetEccMode`: current and pending are the same.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEccMode(
    device: nvmlDevice_t,
    current: *mut nvmlEnableState_t,
    pending: *mut nvmlEnableState_t,
) -> nvmlReturn_t {
    // SAFETY: both pointers were checked non-null; writable per NVML's contract.
    unsafe {
        device_outputs(device, !current.is_null() && !pending.is_null(), |g| {
            let mode = if g.ecc.enabled {
                nvmlEnableState_enum_NVML_FEATURE_ENABLED
            } else {
                nvmlEnableState_enum_NVML_FEATURE_DISABLED
            };
            current.write(mode);
            pending.write(mode);
            SUCCESS
        })
    }
}

/// `nvmlDeviceGetRemappedRows`: applied corrected/uncorrected rows, the
/// pending flag and the failure flag.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: nvmlDevice_t,
    corr: *mut c_uint,
    unc: *mut c_uint,
    pending: *mut c_uint,
    failure: *mut c_uint,
) -> nvmlReturn_t {
    let present = !corr.is_null() && !unc.is_null() && !pending.is_null() && !failure.is_null();
    // SAFETY: all four pointers were checked non-null; writable per NVML's contract.
    unsafe {
        device_outputs(device, present, |g| {
            corr.write(g.remap.corr);
            unc.write(g.remap.unc);
            pending.write(u32::from(g.remap.pending));
            failure.write(u32::from(g.remap.failure));
            SUCCESS
        })
    }
}

/// `nvmlDeviceGetTotalEccErrors`: `NOT_SUPPORTED` with ECC disabled.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: nvmlMemoryErrorType_t,
    counter_type: nvmlEccCounterType_t,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: `count` is null or writable (NVML's contract).
        unsafe {
            device_value(device, count, false, |g| {
                if !g.ecc.enabled {
                    return Err(NOT_SUPPORTED);
                }
                let e = &g.ecc;
                match (error_type, counter_type) {
                    (0, 0) => Ok(e.corrected_volatile),
                    (1, 0) => Ok(e.uncorrected_volatile),
                    (0, 1) => Ok(e.corrected_aggregate),
                    (1, 1) => Ok(e.uncorrected_aggregate),
                    _ => Err(INVALID_ARGUMENT),
                }
            })
        }
    })
}

/// Shared by both retired-pages calls: the simulation retires no pages.
unsafe fn retired_pages(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    guard(|| {
        if cause >= nvmlPageRetirementCause_enum_NVML_PAGE_RETIREMENT_CAUSE_COUNT {
            return INVALID_ARGUMENT;
        }
        // SAFETY: `count` is null or writable (NVML's contract); with zero
        // pages nothing is written to the address arrays.
        unsafe { device_value(device, count, false, |_| Ok(0)) }
    })
}

/// `nvmlDeviceGetRetiredPages`: always zero pages.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    page_count: *mut c_uint,
    _addresses: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { retired_pages(device, cause, page_count) }
}

/// `nvmlDeviceGetRetiredPages_v2`: always zero pages.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    page_count: *mut c_uint,
    _addresses: *mut c_ulonglong,
    _timestamps: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { retired_pages(device, cause, page_count) }
}

/// `nvmlDeviceGetRetiredPagesPendingStatus`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(
    device: nvmlDevice_t,
    is_pending: *mut nvmlEnableState_t,
) -> nvmlReturn_t {
    guard(|| {
        // SAFETY: `is_pending` is null or writable (NVML's contract).
        unsafe {
            device_value(device, is_pending, false, |g| {
                Ok(if g.pages_pending {
                    nvmlEnableState_enum_NVML_FEATURE_ENABLED
                } else {
                    nvmlEnableState_enum_NVML_FEATURE_DISABLED
                })
            })
        }
    })
}

/// `nvmlDeviceGetCpuAffinity`: a bitmask of the GPU's CPUs in `size` words.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCpuAffinity(
    device: nvmlDevice_t,
    size: c_uint,
    set: *mut c_ulong,
) -> nvmlReturn_t {
    guard(|| {
        if set.is_null() || size == 0 {
            return INVALID_ARGUMENT;
        }
        with_gpu(device, false, |_, g| {
            let Some(cpus) = parse_cpulist(&g.cpu_affinity) else {
                return super::UNKNOWN;
            };
            let bits = c_ulong::BITS;
            for word in 0..size {
                let mut mask: c_ulong = 0;
                for &c in cpus.iter().filter(|c| **c / bits == word) {
                    mask |= 1 << (c % bits);
                }
                // SAFETY: `set` holds `size` words (NVML's contract).
                unsafe { set.add(word as usize).write(mask) };
            }
            SUCCESS
        })
    })
}
