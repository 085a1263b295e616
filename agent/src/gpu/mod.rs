//! The host's whole GPUs: found in sysfs ([`sysfs`]), described and
//! watched through NVML ([`nvml`]), leased to instances with a health
//! state per GPU ([`pool`]), checked and reset between leases ([`gate`]),
//! polled for faults and samples ([`monitor`]); the XID table and the
//! verdict on NVML's fault state in [`health`]; a dump of everything read,
//! for a real GPU host, in [`probe`]. docs/gpus.md tells the whole story.

pub mod gate;
pub mod health;
pub mod monitor;
pub mod nvml;
pub mod pool;
pub mod probe;
pub mod sysfs;

pub use pool::{GpuPool, GpuRecord, GpuStatus};

use gantry_proto::validate::PciAddress;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML: {0}")]
    Nvml(String),
    #[error("no GPU at {0} on this host")]
    Unknown(PciAddress),
    #[error("GPU {0} is {1}")]
    Busy(PciAddress, String),
    #[error(transparent)]
    Health(#[from] gantry_proto::gpu::GpuTransitionError),
    #[error(transparent)]
    Sysfs(#[from] sysfs::SysfsError),
    #[error(transparent)]
    Fs(#[from] crate::fsutil::FsError),
}

/// Where GPU inventory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuSource {
    /// NVML when its library loads, else no GPUs (said once in the log).
    Auto,
    /// NVML, or the agent does not start.
    Nvml,
    /// No GPUs.
    None,
}

/// The `[gpu]` section of the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    pub source: GpuSource,
    /// The NVML library (a path, or a name the dynamic loader finds). The
    /// workspace's simulated library (`libgantry_nvml_sim.so`) goes here on
    /// hosts without GPUs.
    pub nvml_library: String,
    /// Where sysfs is (a fake tree in tests).
    pub sysfs_root: PathBuf,
    /// How often idle GPUs are polled, seconds.
    pub poll_secs: u64,
    /// Pin vCPUs and memory to the GPUs' NUMA node(s) when the host has
    /// several.
    pub numa_pinning: bool,
    /// The host driver NVML works through.
    pub host_driver: String,
    /// During the gate, bind a GPU that is on another driver (vfio-pci) to
    /// the host driver briefly so NVML can read it.
    pub gate_rebind: bool,
    /// Reset every GPU in the gate (a GPU whose faults ask for a reset is
    /// reset regardless).
    pub gate_reset: bool,
    /// An operator's diagnostic run in the gate, e.g.
    /// `["dcgmi", "diag", "-r", "1", "-i", "{index}"]`; empty: none.
    pub gate_command: Vec<String>,
    pub gate_command_timeout_secs: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            source: GpuSource::Auto,
            nvml_library: "libnvidia-ml.so.1".into(),
            sysfs_root: "/sys".into(),
            poll_secs: 10,
            numa_pinning: true,
            host_driver: "nvidia".into(),
            gate_rebind: false,
            gate_reset: true,
            gate_command: Vec::new(),
            gate_command_timeout_secs: 300,
        }
    }
}

/// Opens NVML as the config says: `Ok(None)` when there is none to use.
pub fn open_nvml(cfg: &GpuConfig) -> Result<Box<dyn nvml::Nvml>, GpuError> {
    Ok(match cfg.source {
        GpuSource::None => Box::new(nvml::NoNvml),
        GpuSource::Nvml => Box::new(
            nvml::RealNvml::open(&cfg.nvml_library).map_err(|e| GpuError::Nvml(e.to_string()))?,
        ),
        GpuSource::Auto => match nvml::RealNvml::open(&cfg.nvml_library) {
            Ok(n) => Box::new(n),
            Err(e) => {
                tracing::info!(
                    library = %cfg.nvml_library,
                    reason = %e,
                    "no NVIDIA management library: this host offers no GPUs"
                );
                Box::new(nvml::NoNvml)
            }
        },
    })
}

/// The host's GPU pool, as the config says, kept in `state_dir`.
pub fn open(cfg: &GpuConfig, state_dir: &Path) -> Result<Arc<GpuPool>, GpuError> {
    let nvml = open_nvml(cfg)?;
    if nvml.source() == "none" {
        return Ok(GpuPool::empty());
    }
    let pool = GpuPool::open(
        cfg.clone(),
        sysfs::Sysfs::new(&cfg.sysfs_root),
        nvml,
        state_dir.join("gpus.json"),
    )?;
    tracing::info!(
        gpus = pool.list().len(),
        library = %cfg.nvml_library,
        "GPUs found"
    );
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_nvidia_library_the_host_offers_no_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = GpuConfig {
            nvml_library: "/nonexistent/libnvidia-ml.so.1".into(),
            ..GpuConfig::default()
        };
        let pool = open(&cfg, dir.path()).unwrap();
        assert_eq!(pool.source(), "none");
        assert!(pool.list().is_empty());
        // `nvml` insists: the agent does not start without the library.
        let strict = GpuConfig {
            source: GpuSource::Nvml,
            ..cfg
        };
        let err = open(&strict, dir.path()).err().expect("refused");
        assert!(err.to_string().starts_with("NVML:"), "{err}");
    }
}
