//! Library-wide exports: init/shutdown, error strings, system versions and
//! device enumeration (count and the `GetHandleBy*` lookups).

use super::{guard, handle, snapshot, write_str, INVALID_ARGUMENT, NOT_FOUND, SUCCESS};
use crate::state::parse_bdf;
use nvml_wrapper_sys::bindings::*;
use std::ffi::{c_char, c_int, c_uint, CStr};

/// `nvmlInit_v2`: reads `GANTRY_NVML_SIM_DIR` / `GANTRY_NVML_SIM_PROFILE` on
/// the first call; later calls count references.
#[no_mangle]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    guard(super::init)
}

/// `nvmlInitWithFlags`: as `nvmlInit_v2`; the flags change nothing here.
#[no_mangle]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    guard(super::init)
}

/// `nvmlShutdown`: one init fewer; `UNINITIALIZED` when there is none.
#[no_mangle]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    guard(super::shutdown)
}

/// `nvmlErrorString`: a static description of a return code.
#[no_mangle]
pub unsafe extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text: &'static CStr = std::panic::catch_unwind(|| match result {
        nvmlReturn_enum_NVML_SUCCESS => c"Success",
        nvmlReturn_enum_NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED => c"Not Supported",
        nvmlReturn_enum_NVML_ERROR_NO_PERMISSION => c"Insufficient Permissions",
        nvmlReturn_enum_NVML_ERROR_ALREADY_INITIALIZED => c"Already Initialized",
        nvmlReturn_enum_NVML_ERROR_NOT_FOUND => c"Not Found",
        nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        nvmlReturn_enum_NVML_ERROR_TIMEOUT => c"Timeout",
        nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        _ => c"Unknown Error",
    })
    .unwrap_or(c"Unknown Error");
    text.as_ptr()
}

/// Writes one of the state's strings into a caller's buffer.
unsafe fn system_string(
    buf: *mut c_char,
    len: c_uint,
    pick: fn(&crate::state::State) -> &str,
) -> nvmlReturn_t {
    guard(|| match snapshot() {
        // SAFETY: `buf` is null or `len` writable bytes (NVML's contract).
        Ok(s) => unsafe { write_str(buf, len, pick(&s)) },
        Err(e) => e,
    })
}

/// `nvmlSystemGetDriverVersion`, e.g. `550.127.05`.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { system_string(version, length, |s| &s.driver_version) }
}

/// `nvmlSystemGetNVMLVersion`, e.g. `12.550.127.05`.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { system_string(version, length, |s| &s.nvml_version) }
}

unsafe fn cuda_version(out: *mut c_int) -> nvmlReturn_t {
    guard(|| {
        if out.is_null() {
            return INVALID_ARGUMENT;
        }
        match snapshot() {
            Ok(s) => {
                // SAFETY: non-null, and writable per the caller's contract.
                unsafe { out.write(s.cuda_driver_version) };
                SUCCESS
            }
            Err(e) => e,
        }
    })
}

/// `nvmlSystemGetCudaDriverVersion_v2`: 1000 * major + 10 * minor.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { cuda_version(version) }
}

/// `nvmlSystemGetCudaDriverVersion`: as `_v2`.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(version: *mut c_int) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe { cuda_version(version) }
}

/// `nvmlDeviceGetCount_v2`: lost GPUs still count, as with the real driver.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    guard(|| {
        if count.is_null() {
            return INVALID_ARGUMENT;
        }
        match snapshot() {
            Ok(s) => {
                // SAFETY: non-null, and writable per the caller's contract.
                unsafe { count.write(s.gpus.len() as c_uint) };
                SUCCESS
            }
            Err(e) => e,
        }
    })
}

/// Finds a GPU with `find` and stores its handle.
unsafe fn lookup(
    out: *mut nvmlDevice_t,
    miss: nvmlReturn_t,
    find: impl FnOnce(&crate::state::State) -> Option<usize>,
) -> nvmlReturn_t {
    guard(|| {
        if out.is_null() {
            return INVALID_ARGUMENT;
        }
        let s = match snapshot() {
            Ok(s) => s,
            Err(e) => return e,
        };
        match find(&s) {
            Some(i) => {
                // SAFETY: non-null, and writable per the caller's contract.
                unsafe { out.write(handle(i)) };
                SUCCESS
            }
            None => miss,
        }
    })
}

/// Reads a caller's C string; `None` for null or non-UTF-8.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn c_str<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

/// `nvmlDeviceGetHandleByIndex_v2`; an index past the count is
/// `INVALID_ARGUMENT`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        lookup(device, INVALID_ARGUMENT, |s| {
            ((index as usize) < s.gpus.len()).then_some(index as usize)
        })
    }
}

/// `nvmlDeviceGetHandleByUUID`; an unknown UUID is `NOT_FOUND`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    // SAFETY: `uuid` is null or NUL-terminated (NVML's contract).
    let Some(uuid) = (unsafe { c_str(uuid) }) else {
        return INVALID_ARGUMENT;
    };
    // SAFETY: forwarded caller contract.
    unsafe {
        lookup(device, NOT_FOUND, |s| {
            s.gpus
                .iter()
                .position(|g| g.uuid.eq_ignore_ascii_case(uuid))
        })
    }
}

/// `nvmlDeviceGetHandleByPciBusId_v2`: accepts the NVML (`00000000:1A:00.0`)
/// and sysfs (`0000:1a:00.0`) forms.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    bus_id: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    // SAFETY: `bus_id` is null or NUL-terminated (NVML's contract).
    let Some(want) = (unsafe { c_str(bus_id) }).and_then(parse_bdf) else {
        return INVALID_ARGUMENT;
    };
    // SAFETY: forwarded caller contract.
    unsafe {
        lookup(device, NOT_FOUND, |s| {
            s.gpus
                .iter()
                .position(|g| parse_bdf(&g.sysfs_bdf) == Some(want))
        })
    }
}
