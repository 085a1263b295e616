//! Shared by the integration tests: builds the simulated library once,
//! and serialises the tests of one binary, because NVML's state (and the
//! `GANTRY_NVML_SIM_*` variables read at init) are per process.

#![allow(dead_code)]

use gantry_nvml_sim::{built_library, ENV_DIR, ENV_PROFILE};
use nvml_wrapper::Nvml;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the per-binary lock for the duration of a test.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The built cdylib (cargo runs once per process).
pub fn library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| built_library().unwrap_or_else(|e| panic!("{e}")))
}

/// Initialises NVML from the simulated library serving the state in `dir`.
/// The caller holds [`serial`].
pub fn nvml_for_dir(dir: &Path) -> Nvml {
    // Only one test runs at a time (the caller holds `serial()`).
    std::env::set_var(ENV_DIR, dir);
    std::env::remove_var(ENV_PROFILE);
    Nvml::builder()
        .lib_path(library().as_os_str())
        .init()
        .expect("NVML init through the simulated library")
}

/// Initialises NVML with no state directory, serving built-in `profile`.
pub fn nvml_for_profile(profile: &str) -> Result<Nvml, nvml_wrapper::error::NvmlError> {
    std::env::remove_var(ENV_DIR);
    std::env::set_var(ENV_PROFILE, profile);
    Nvml::builder().lib_path(library().as_os_str()).init()
}
