//! GPU inventory and health, behind a narrow trait: NVML on real hosts, a
//! simulated inventory for tests and demos on machines without NVIDIA GPUs,
//! and none at all.

use gantry_proto::validate::PciAddress;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML: {0}")]
    Nvml(String),
    #[error("NVML reported an unparsable PCI address {0:?}")]
    BadPci(String),
}

/// One whole GPU on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuInfo {
    pub pci: PciAddress,
    pub model: String,
    pub uuid: String,
    pub memory_total_bytes: u64,
    /// False when the GPU reports pending retired pages or an XID-class
    /// failure; such a GPU is not leased.
    pub healthy: bool,
}

/// What the agent needs to know about GPUs.
pub trait GpuInventory: Send + Sync {
    /// Where this inventory comes from (`nvml`, `simulated`, `none`).
    fn source(&self) -> &'static str;
    /// Every GPU on the host, with its health.
    fn list(&self) -> Result<Vec<GpuInfo>, GpuError>;
}

/// No GPUs.
pub struct NoGpus;

impl GpuInventory for NoGpus {
    fn source(&self) -> &'static str {
        "none"
    }
    fn list(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(Vec::new())
    }
}

/// A fixed, simulated inventory.
pub struct SimulatedGpus(pub Vec<GpuInfo>);

impl SimulatedGpus {
    /// Two 80 GB H100s at made-up addresses.
    pub fn two_h100() -> Self {
        let gpu = |pci: &str, n: u8| GpuInfo {
            pci: PciAddress::parse(pci).expect("valid address"),
            model: "NVIDIA H100 80GB HBM3".into(),
            uuid: format!("GPU-00000000-0000-0000-0000-00000000000{n}"),
            memory_total_bytes: 80 * 1024 * 1024 * 1024,
            healthy: true,
        };
        Self(vec![gpu("0000:65:00.0", 1), gpu("0000:b3:00.0", 2)])
    }
}

impl GpuInventory for SimulatedGpus {
    fn source(&self) -> &'static str {
        "simulated"
    }
    fn list(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.0.clone())
    }
}

/// NVML, the NVIDIA driver's management library.
pub struct NvmlGpus {
    nvml: nvml_wrapper::Nvml,
}

impl NvmlGpus {
    /// Loads libnvidia-ml; fails on hosts without the NVIDIA driver.
    pub fn new() -> Result<Self, GpuError> {
        nvml_wrapper::Nvml::init()
            .map(|nvml| Self { nvml })
            .map_err(|e| GpuError::Nvml(e.to_string()))
    }
}

fn nvml_err(e: nvml_wrapper::error::NvmlError) -> GpuError {
    GpuError::Nvml(e.to_string())
}

impl GpuInventory for NvmlGpus {
    fn source(&self) -> &'static str {
        "nvml"
    }

    fn list(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let n = self.nvml.device_count().map_err(nvml_err)?;
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let d = self.nvml.device_by_index(i).map_err(nvml_err)?;
            let bus_id = d.pci_info().map_err(nvml_err)?.bus_id;
            let pci = PciAddress::parse(&bus_id).ok_or(GpuError::BadPci(bus_id))?;
            // Pending page retirement means the GPU needs a reset before the
            // next lease; an unsupported query (older boards) counts as fine.
            let healthy = !matches!(d.are_pages_pending_retired(), Ok(true));
            out.push(GpuInfo {
                pci,
                model: d.name().map_err(nvml_err)?,
                uuid: d.uuid().map_err(nvml_err)?,
                memory_total_bytes: d.memory_info().map_err(nvml_err)?.total,
                healthy,
            });
        }
        Ok(out)
    }
}

/// Builds the inventory the config asks for.
pub fn from_config(source: crate::config::GpuSource) -> Result<Box<dyn GpuInventory>, GpuError> {
    use crate::config::GpuSource;
    Ok(match source {
        GpuSource::None => Box::new(NoGpus),
        GpuSource::Simulated => Box::new(SimulatedGpus::two_h100()),
        GpuSource::Nvml => Box::new(NvmlGpus::new()?),
        GpuSource::Auto => match NvmlGpus::new() {
            Ok(g) => Box::new(g),
            Err(e) => {
                tracing::info!(reason = %e, "no NVML; this host offers no GPUs");
                Box::new(NoGpus)
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_inventory_lists_two_healthy_h100s() {
        let g = SimulatedGpus::two_h100();
        let l = g.list().unwrap();
        assert_eq!(l.len(), 2);
        assert!(l.iter().all(|g| g.healthy && g.model.contains("H100")));
        assert_eq!(l[1].pci.to_string(), "0000:b3:00.0");
    }

    #[test]
    fn auto_falls_back_to_none_without_a_driver() {
        // On a host with the NVIDIA driver this lists real GPUs instead.
        let inv = from_config(crate::config::GpuSource::Auto).unwrap();
        let gpus = inv.list().unwrap();
        assert_eq!(
            inv.source() == "none",
            gpus.is_empty() && NvmlGpus::new().is_err()
        );
    }
}
