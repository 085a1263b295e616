//! The C ABI: the `nvml*` symbols that make the cdylib a stand-in for
//! `libnvidia-ml.so`, and the per-process runtime behind them.
//!
//! The runtime holds the init reference count and where the simulated host
//! comes from: a state directory (`GANTRY_NVML_SIM_DIR`, re-read whenever
//! `state.json` changes) or a built-in profile kept in memory
//! (`GANTRY_NVML_SIM_PROFILE`, default `h100x8`). Both variables are read by
//! `nvmlInit*` when the count goes from 0 to 1, so a process may shut NVML
//! down, change them and init again.
//!
//! Conventions shared by every export: the body runs under
//! [`std::panic::catch_unwind`] (a panic returns `NVML_ERROR_UNKNOWN`); null
//! output pointers return `NVML_ERROR_INVALID_ARGUMENT`; calls before init
//! return `NVML_ERROR_UNINITIALIZED`; a device handle is its index + 1 cast
//! to a pointer.

// Every export is an `unsafe extern "C" fn` whose contract is NVML's own
// documentation (valid, writable pointers or null); repeating that in a
// `# Safety` section on each would add nothing.
#![allow(clippy::missing_safety_doc)]
// NVML's constants keep their C names (`nvmlReturn_enum_NVML_SUCCESS`).
#![allow(non_upper_case_globals)]

mod device;
mod events;
mod fields;
mod system;

use crate::profiles;
use crate::state::{Gpu, State, STATE_FILE, SYS_DIR};
use nvml_wrapper_sys::bindings::*;
use std::ffi::c_char;
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

pub(crate) const SUCCESS: nvmlReturn_t = nvmlReturn_enum_NVML_SUCCESS;
pub(crate) const UNINITIALIZED: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
pub(crate) const INVALID_ARGUMENT: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
pub(crate) const NOT_SUPPORTED: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
pub(crate) const NOT_FOUND: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
pub(crate) const INSUFFICIENT_SIZE: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
pub(crate) const DRIVER_NOT_LOADED: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED;
pub(crate) const TIMEOUT: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_TIMEOUT;
pub(crate) const GPU_IS_LOST: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;
pub(crate) const UNKNOWN: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_UNKNOWN;

/// Names the state directory.
pub const ENV_DIR: &str = "GANTRY_NVML_SIM_DIR";
/// Names the built-in profile served when there is no state directory.
pub const ENV_PROFILE: &str = "GANTRY_NVML_SIM_PROFILE";

enum Source {
    Dir { dir: PathBuf, sys: PathBuf },
    Memory(Arc<State>),
}

/// Identity of the `state.json` last parsed: the atomic rename gives every
/// write a new inode, so (inode, mtime, length) changes on every write.
type FileKey = (u64, i64, i64, u64);

struct Runtime {
    refs: u32,
    source: Option<Source>,
    cache: Option<(FileKey, State)>,
}

static RUNTIME: Mutex<Runtime> = Mutex::new(Runtime {
    refs: 0,
    source: None,
    cache: None,
});

fn runtime() -> MutexGuard<'static, Runtime> {
    // A panic while holding the lock leaves the data consistent (every
    // update is a single assignment), so poisoning is ignored.
    RUNTIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs an export's body, turning a panic into `NVML_ERROR_UNKNOWN`.
pub(crate) fn guard(body: impl FnOnce() -> nvmlReturn_t) -> nvmlReturn_t {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(UNKNOWN)
}

/// `nvmlInit*`: counts up; the first call picks the source.
pub(crate) fn init() -> nvmlReturn_t {
    let mut rt = runtime();
    if rt.refs > 0 {
        rt.refs += 1;
        return SUCCESS;
    }
    let source = match std::env::var_os(ENV_DIR).filter(|d| !d.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if let Err(e) = State::read(&dir) {
                eprintln!("gantry-nvml-sim: {ENV_DIR}: {e}");
                return DRIVER_NOT_LOADED;
            }
            Source::Dir {
                sys: dir.join(SYS_DIR),
                dir,
            }
        }
        None => {
            let name =
                std::env::var(ENV_PROFILE).unwrap_or_else(|_| profiles::DEFAULT_PROFILE.into());
            match profiles::build(&name) {
                Some(s) => Source::Memory(Arc::new(s)),
                None => {
                    eprintln!(
                        "gantry-nvml-sim: {ENV_PROFILE}={name:?} is not one of {}",
                        profiles::names().join(", ")
                    );
                    return DRIVER_NOT_LOADED;
                }
            }
        }
    };
    rt.source = Some(source);
    rt.cache = None;
    rt.refs = 1;
    SUCCESS
}

/// `nvmlShutdown`: counts down; the last call forgets the source.
pub(crate) fn shutdown() -> nvmlReturn_t {
    let mut rt = runtime();
    if rt.refs == 0 {
        return UNINITIALIZED;
    }
    rt.refs -= 1;
    if rt.refs == 0 {
        rt.source = None;
        rt.cache = None;
    }
    SUCCESS
}

/// Whether NVML is initialised in this process.
pub(crate) fn initialized() -> bool {
    runtime().refs > 0
}

/// The simulated host as NVML shows it now.
pub(crate) fn snapshot() -> Result<Arc<State>, nvmlReturn_t> {
    let mut rt = runtime();
    let rt = &mut *rt;
    if rt.refs == 0 {
        return Err(UNINITIALIZED);
    }
    let (dir, sys) = match rt.source.as_ref() {
        Some(Source::Memory(s)) => return Ok(Arc::clone(s)),
        Some(Source::Dir { dir, sys }) => (dir, sys),
        None => return Err(UNINITIALIZED),
    };
    let path = dir.join(STATE_FILE);
    let key = std::fs::metadata(&path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.len()));
    let fresh = matches!((&rt.cache, key), (Some((k, _)), Some(key)) if *k == key);
    if !fresh {
        match (key, std::fs::read(&path)) {
            (Some(key), Ok(bytes)) => match State::parse(&path, &bytes) {
                Ok(s) => rt.cache = Some((key, s)),
                Err(e) if rt.cache.is_none() => {
                    eprintln!("gantry-nvml-sim: {e}");
                    return Err(UNKNOWN);
                }
                Err(_) => {}
            },
            // The directory went away: keep serving the last good state.
            _ if rt.cache.is_some() => {}
            _ => return Err(UNKNOWN),
        }
    }
    let raw = &rt.cache.as_ref().ok_or(UNKNOWN)?.1;
    Ok(Arc::new(raw.effective(Some(sys))))
}

/// The handle of the GPU at `index`.
pub(crate) fn handle(index: usize) -> nvmlDevice_t {
    (index + 1) as nvmlDevice_t
}

/// The position in `state.gpus` a handle stands for.
pub(crate) fn position(state: &State, device: nvmlDevice_t) -> Option<usize> {
    (device as usize)
        .checked_sub(1)
        .filter(|i| *i < state.gpus.len())
}

/// Looks up `device` and runs `f` on it. `lost_ok`: the query still
/// answers for a GPU that fell off the bus (handles, index, PCI info).
pub(crate) fn with_gpu(
    device: nvmlDevice_t,
    lost_ok: bool,
    f: impl FnOnce(&State, &Gpu) -> nvmlReturn_t,
) -> nvmlReturn_t {
    let state = match snapshot() {
        Ok(s) => s,
        Err(e) => return e,
    };
    let Some(i) = position(&state, device) else {
        return INVALID_ARGUMENT;
    };
    let gpu = &state.gpus[i];
    if gpu.lost && !lost_ok {
        return GPU_IS_LOST;
    }
    f(&state, gpu)
}

/// Answers a single-value device query: `value` computes it, and it is
/// stored through `out`.
///
/// # Safety
/// `out` is null or valid for a write of `T`.
pub(crate) unsafe fn device_value<T>(
    device: nvmlDevice_t,
    out: *mut T,
    lost_ok: bool,
    value: impl FnOnce(&Gpu) -> Result<T, nvmlReturn_t>,
) -> nvmlReturn_t {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    with_gpu(device, lost_ok, |_, g| match value(g) {
        Ok(v) => {
            // SAFETY: `out` is non-null and, per this function's contract,
            // valid for a write of `T`.
            unsafe { out.write(v) };
            SUCCESS
        }
        Err(e) => e,
    })
}

/// Copies `s` and a NUL into a caller's buffer of `len` bytes.
///
/// # Safety
/// `buf` is null or valid for writes of `len` bytes.
pub(crate) unsafe fn write_str(buf: *mut c_char, len: u32, s: &str) -> nvmlReturn_t {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: `buf` has room for `len` >= bytes.len() + 1 bytes, and a
    // Rust string cannot overlap a caller's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    SUCCESS
}

/// Copies a string into a fixed-size C array inside a struct, NUL-terminated
/// (truncating if it ever had to).
pub(crate) fn fill_array(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len().saturating_sub(1));
    for (d, b) in dst.iter_mut().zip(s.as_bytes()[..n].iter()) {
        *d = *b as c_char;
    }
    if let Some(end) = dst.get_mut(n) {
        *end = 0;
    }
}
