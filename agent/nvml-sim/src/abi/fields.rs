//! `nvmlDeviceGetFieldValues`: the field ids the health checks read (row
//! remapping, recovery action, ECC totals, retired-page pending, PCIe
//! replays, energy). Any other id gets `NOT_SUPPORTED` in that entry's
//! `nvmlReturn` while the call itself succeeds, as with the real library.

use super::{guard, with_gpu, INVALID_ARGUMENT, NOT_SUPPORTED, SUCCESS};
use crate::state::Gpu;
use nvml_wrapper_sys::bindings::field_id::*;
use nvml_wrapper_sys::bindings::*;
use std::ffi::c_int;

/// A field's value, or `None` when the field is not simulated.
fn value(g: &Gpu, field: u32) -> Option<(nvmlValueType_t, nvmlValue_t)> {
    let uint = |v: u32| {
        Some((
            nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT,
            nvmlValue_t { uiVal: v },
        ))
    };
    let ull = |v: u64| {
        Some((
            nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
            nvmlValue_t { ullVal: v },
        ))
    };
    let ecc = |v: u64| if g.ecc.enabled { ull(v) } else { None };
    match field {
        NVML_FI_DEV_REMAPPED_COR => uint(g.remap.corr),
        NVML_FI_DEV_REMAPPED_UNC => uint(g.remap.unc),
        NVML_FI_DEV_REMAPPED_PENDING => uint(u32::from(g.remap.pending)),
        NVML_FI_DEV_REMAPPED_FAILURE => uint(u32::from(g.remap.failure)),
        NVML_FI_DEV_GET_GPU_RECOVERY_ACTION => uint(g.recovery_action),
        NVML_FI_DEV_ECC_CURRENT => uint(u32::from(g.ecc.enabled)),
        NVML_FI_DEV_ECC_SBE_VOL_TOTAL => ecc(g.ecc.corrected_volatile),
        NVML_FI_DEV_ECC_DBE_VOL_TOTAL => ecc(g.ecc.uncorrected_volatile),
        NVML_FI_DEV_ECC_SBE_AGG_TOTAL => ecc(g.ecc.corrected_aggregate),
        NVML_FI_DEV_ECC_DBE_AGG_TOTAL => ecc(g.ecc.uncorrected_aggregate),
        NVML_FI_DEV_RETIRED_SBE | NVML_FI_DEV_RETIRED_DBE => ull(0),
        NVML_FI_DEV_RETIRED_PENDING => ull(u64::from(g.pages_pending)),
        NVML_FI_DEV_PCIE_REPLAY_COUNTER => ull(u64::from(g.pcie_replay_count)),
        NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION => ull(g.energy_mj),
        _ => None,
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// `nvmlDeviceGetFieldValues`: fills `count` entries in place, each with its
/// own `nvmlReturn`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    count: c_int,
    values: *mut nvmlFieldValue_t,
) -> nvmlReturn_t {
    guard(|| {
        if values.is_null() || count < 0 {
            return INVALID_ARGUMENT;
        }
        with_gpu(device, false, |_, g| {
            let ts = now_us();
            for i in 0..count as usize {
                // SAFETY: `values` holds `count` initialised entries (NVML's
                // contract: the caller sets each `fieldId`).
                let v = unsafe { &mut *values.add(i) };
                v.timestamp = ts;
                v.latencyUsec = 0;
                match value(g, v.fieldId) {
                    Some((ty, val)) => {
                        v.valueType = ty;
                        v.value = val;
                        v.nvmlReturn = SUCCESS;
                    }
                    None => v.nvmlReturn = NOT_SUPPORTED,
                }
            }
            SUCCESS
        })
    })
}
