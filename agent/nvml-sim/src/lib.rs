//! `gantry-nvml-sim`: a simulated `libnvidia-ml.so` for tests and demos on
//! hosts without NVIDIA GPUs.
//!
//! Built as a cdylib, this crate exports the NVML symbols the agent uses
//! (see [`abi`]), so the agent loads it with
//! `Nvml::builder().lib_path(path).init()` and runs exactly the NVML code it
//! runs on a GPU host. The simulated host lives in a state directory named
//! by `GANTRY_NVML_SIM_DIR` (`state.json` plus a fake sysfs tree under
//! `sys/`), which tests and the `gantry-nvml-sim` CLI change through
//! [`control`]. Without that variable the library serves a built-in
//! [`profiles`] entry from memory.
//!
//! See `docs/nvml-sim.md` for the state format, the CLI and the simulated
//! GPU reset.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod abi;
pub mod control;
pub mod profiles;
pub mod state;
pub mod sysfs;

pub use abi::{ENV_DIR, ENV_PROFILE};
pub use control::{ControlError, GpuRef};
pub use state::State;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why [`built_library`] could not produce the library.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("could not run {cargo:?} to build the simulated NVML library: {source}")]
    Spawn {
        cargo: String,
        source: std::io::Error,
    },
    #[error("`cargo build -p gantry-nvml-sim --lib` failed ({status}):\n{stderr}")]
    Failed { status: String, stderr: String },
    #[error("the simulated NVML library {0} does not exist")]
    Missing(PathBuf),
}

/// Names a built `libgantry_nvml_sim.so` for [`built_library`] to answer
/// as is.
pub const ENV_LIB: &str = "GANTRY_NVML_SIM_LIB";

/// The workspace root: two levels above this crate's manifest.
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// Builds the cdylib (`cargo build -p gantry-nvml-sim --lib`, quiet; cargo
/// from `$CARGO`, else `cargo`) and returns the path of
/// `<target dir>/debug/libgantry_nvml_sim.so`, the target dir being
/// `$CARGO_TARGET_DIR` or the workspace's `target/`.
///
/// Tests in any crate call this before loading the library; cargo does not
/// build another package's cdylib for them. It runs cargo once per process,
/// unless [`ENV_LIB`] names a library already built: `scripts/test` builds
/// every target of the workspace once and sets it, so that tests running in
/// parallel neither wait on cargo's lock nor rebuild the library with this
/// package's features alone.
pub fn built_library() -> Result<PathBuf, BuildError> {
    if let Some(lib) = std::env::var_os(ENV_LIB) {
        let lib = PathBuf::from(lib);
        return match lib.exists() {
            true => Ok(lib),
            false => Err(BuildError::Missing(lib)),
        };
    }
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let root = workspace_root();
    let outcome = BUILT.get_or_init(|| build(&root).map_err(|e| e.to_string()));
    match outcome {
        Ok(p) => Ok(p.clone()),
        // The first caller got the detailed error; later ones get its text.
        Err(text) => Err(BuildError::Failed {
            status: "earlier attempt".into(),
            stderr: text.clone(),
        }),
    }
}

fn build(root: &Path) -> Result<PathBuf, BuildError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "--quiet", "-p", "gantry-nvml-sim", "--lib"])
        .current_dir(root)
        .output()
        .map_err(|source| BuildError::Spawn {
            cargo: cargo.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(BuildError::Failed {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => root.join(t),
        None => root.join("target"),
    };
    let lib = target.join("debug").join("libgantry_nvml_sim.so");
    if lib.exists() {
        Ok(lib)
    } else {
        Err(BuildError::Missing(lib))
    }
}
