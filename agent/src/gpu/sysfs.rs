//! The PCI side of GPUs, read from sysfs under a root path (`/sys` on a
//! host; a fake tree such as the one `gantry-nvml-sim init` writes in
//! tests).
//!
//! It finds GPUs whatever driver owns them (so a GPU already bound to
//! vfio-pci is known), their IOMMU group and every function in it, BAR
//! sizes, NUMA node, PCIe link and AER counters; it resets a function and
//! moves it between drivers.

use gantry_proto::validate::PciAddress;
use std::fs;
use std::path::{Path, PathBuf};

/// NVIDIA's PCI vendor id.
pub const NVIDIA_VENDOR: u32 = 0x10de;
/// Config space of a device gone from the bus reads all ones.
pub const GONE_VENDOR: u32 = 0xffff;

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: unexpected content {content:?}")]
    Parse { path: PathBuf, content: String },
}

/// One PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    pub address: PciAddress,
    pub vendor: u32,
    pub device: u32,
    /// The 24-bit class code (`0x030200` for a 3D controller).
    pub class: u32,
    /// The bound driver (`nvidia`, `vfio-pci`), if any.
    pub driver: Option<String>,
    pub numa_node: Option<u32>,
    pub iommu_group: Option<u32>,
}

impl PciFunction {
    /// A display or 3D controller (class 0x03xxxx).
    pub fn is_gpu(&self) -> bool {
        self.class >> 16 == 0x03
    }
    /// A PCI-to-PCI bridge: never passed through with its group.
    pub fn is_bridge(&self) -> bool {
        self.class >> 8 == 0x0604
    }
}

/// PCIe link state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Link {
    pub speed: String,
    pub width: u32,
    pub max_speed: String,
    pub max_width: u32,
}

impl Link {
    /// Whether the link trained at its full speed and width.
    pub fn is_full(&self) -> bool {
        self.speed == self.max_speed && self.width == self.max_width
    }
}

/// AER error totals of a function (`TOTAL_ERR_*` lines).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AerTotals {
    pub correctable: u64,
    pub nonfatal: u64,
    pub fatal: u64,
}

/// sysfs below a root.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

fn read(path: &Path) -> Result<String, SysfsError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| SysfsError::Io {
            path: path.into(),
            source,
        })
}

fn hex(path: &Path) -> Result<u32, SysfsError> {
    let s = read(path)?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|_| SysfsError::Parse {
        path: path.into(),
        content: s,
    })
}

fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn write(path: &Path, value: &str) -> Result<(), SysfsError> {
    fs::write(path, value).map_err(|source| SysfsError::Io {
        path: path.into(),
        source,
    })
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dev(&self, a: &PciAddress) -> PathBuf {
        self.root.join("bus/pci/devices").join(a.to_string())
    }

    /// Whether the function is still enumerated.
    pub fn exists(&self, a: &PciAddress) -> bool {
        self.dev(a).exists()
    }

    /// Reads one function.
    pub fn function(&self, a: &PciAddress) -> Result<PciFunction, SysfsError> {
        let d = self.dev(a);
        let numa = read(&d.join("numa_node"))
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .and_then(|n| u32::try_from(n).ok());
        Ok(PciFunction {
            address: *a,
            vendor: hex(&d.join("vendor"))?,
            device: hex(&d.join("device"))?,
            class: hex(&d.join("class"))?,
            driver: link_name(&d.join("driver")),
            numa_node: numa,
            iommu_group: link_name(&d.join("iommu_group")).and_then(|g| g.parse().ok()),
        })
    }

    /// Every NVIDIA display or 3D controller, sorted by address.
    pub fn gpus(&self) -> Result<Vec<PciFunction>, SysfsError> {
        let dir = self.root.join("bus/pci/devices");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(SysfsError::Io { path: dir, source }),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let Some(a) = PciAddress::parse(&e.file_name().to_string_lossy()) else {
                continue;
            };
            let Ok(f) = self.function(&a) else { continue };
            if f.vendor == NVIDIA_VENDOR && f.is_gpu() {
                out.push(f);
            }
        }
        out.sort_by_key(|f| f.address);
        Ok(out)
    }

    /// Every function in an IOMMU group, sorted by address.
    pub fn group(&self, group: u32) -> Result<Vec<PciFunction>, SysfsError> {
        let dir = self
            .root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let entries = fs::read_dir(&dir).map_err(|source| SysfsError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for e in entries.flatten() {
            if let Some(a) = PciAddress::parse(&e.file_name().to_string_lossy()) {
                out.push(self.function(&a)?);
            }
        }
        out.sort_by_key(|f| f.address);
        Ok(out)
    }

    /// Sizes of the function's memory BARs, bytes (zero-sized ones left
    /// out), from `resource`: `start end flags` per line.
    pub fn bar_sizes(&self, a: &PciAddress) -> Result<Vec<u64>, SysfsError> {
        let path = self.dev(a).join("resource");
        let text = read(&path)?;
        let mut out = Vec::new();
        // Lines 0-5 are the BARs; 6 is the expansion ROM.
        for line in text.lines().take(6) {
            let v: Vec<u64> = line
                .split_whitespace()
                .filter_map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok())
                .collect();
            if v.len() != 3 {
                return Err(SysfsError::Parse {
                    path,
                    content: line.into(),
                });
            }
            // IORESOURCE_MEM = 0x200.
            if v[1] > v[0] && v[2] & 0x200 != 0 {
                out.push(v[1] - v[0] + 1);
            }
        }
        Ok(out)
    }

    pub fn link(&self, a: &PciAddress) -> Result<Link, SysfsError> {
        let d = self.dev(a);
        let num = |f: &str| -> Result<u32, SysfsError> {
            let p = d.join(f);
            let s = read(&p)?;
            s.parse().map_err(|_| SysfsError::Parse {
                path: p,
                content: s,
            })
        };
        Ok(Link {
            speed: read(&d.join("current_link_speed"))?,
            width: num("current_link_width")?,
            max_speed: read(&d.join("max_link_speed"))?,
            max_width: num("max_link_width")?,
        })
    }

    /// AER totals; zeros where the kernel exposes no AER files.
    pub fn aer(&self, a: &PciAddress) -> AerTotals {
        let d = self.dev(a);
        let total = |file: &str, key: &str| -> u64 {
            read(&d.join(file))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .filter_map(|l| l.split_once(' '))
                        .find(|(k, _)| *k == key)
                        .and_then(|(_, v)| v.trim().parse().ok())
                })
                .unwrap_or(0)
        };
        AerTotals {
            correctable: total("aer_dev_correctable", "TOTAL_ERR_COR"),
            nonfatal: total("aer_dev_nonfatal", "TOTAL_ERR_NONFATAL"),
            fatal: total("aer_dev_fatal", "TOTAL_ERR_FATAL"),
        }
    }

    /// Resets the function (`reset`: FLR or whatever `reset_method` allows).
    pub fn reset(&self, a: &PciAddress) -> Result<(), SysfsError> {
        write(&self.dev(a).join("reset"), "1")
    }

    /// Binds the function to `driver` (unbinding it from its current one),
    /// through `driver_override` so no other driver grabs it.
    pub fn rebind(&self, a: &PciAddress, driver: &str) -> Result<(), SysfsError> {
        let d = self.dev(a);
        let name = a.to_string();
        write(&d.join("driver_override"), driver)?;
        if d.join("driver").exists() {
            write(&d.join("driver/unbind"), &name)?;
        }
        write(
            &self.root.join("bus/pci/drivers").join(driver).join("bind"),
            &name,
        )
    }

    /// The host's NUMA nodes and their CPU lists (`0-15,32-47`).
    pub fn numa_nodes(&self) -> Vec<(u32, String)> {
        let dir = self.root.join("devices/system/node");
        let mut out: Vec<(u32, String)> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e
                    .file_name()
                    .to_string_lossy()
                    .strip_prefix("node")?
                    .parse()
                    .ok()?;
                let cpus = read(&e.path().join("cpulist")).ok()?;
                Some((n, cpus))
            })
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Sysfs) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        let root = root.as_path();
        let dev = root.join("bus/pci/devices/0000:1a:00.0");
        fs::create_dir_all(&dev).unwrap();
        fs::create_dir_all(root.join("bus/pci/drivers/vfio-pci")).unwrap();
        fs::create_dir_all(root.join("kernel/iommu_groups/7/devices")).unwrap();
        for (f, v) in [
            ("vendor", "0x10de"),
            ("device", "0x2330"),
            ("class", "0x030200"),
            ("numa_node", "-1"),
            ("current_link_speed", "32.0 GT/s PCIe"),
            ("max_link_speed", "32.0 GT/s PCIe"),
            ("current_link_width", "8"),
            ("max_link_width", "16"),
            ("aer_dev_fatal", "Undefined 0\nTOTAL_ERR_FATAL 3"),
            (
                "resource",
                "0x00000000e2000000 0x00000000e2ffffff 0x0000000000040200\n\
                 0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                 0x0000220000000000 0x0000221fffffffff 0x000000000014220c\n",
            ),
        ] {
            fs::write(dev.join(f), v).unwrap();
        }
        std::os::unix::fs::symlink("../../../bus/pci/drivers/vfio-pci", dev.join("driver"))
            .unwrap();
        std::os::unix::fs::symlink("../../../kernel/iommu_groups/7", dev.join("iommu_group"))
            .unwrap();
        std::os::unix::fs::symlink(
            "../../../../bus/pci/devices/0000:1a:00.0",
            root.join("kernel/iommu_groups/7/devices/0000:1a:00.0"),
        )
        .unwrap();
        let s = Sysfs::new(root);
        (t, s)
    }

    #[test]
    fn reads_a_vfio_bound_gpu_its_group_bars_link_and_aer() {
        let (_t, s) = tree();
        let gpus = s.gpus().unwrap();
        assert_eq!(gpus.len(), 1);
        let g = &gpus[0];
        assert_eq!(g.driver.as_deref(), Some("vfio-pci"));
        assert_eq!((g.iommu_group, g.numa_node), (Some(7), None));
        assert_eq!(s.group(7).unwrap().len(), 1);
        assert_eq!(
            s.bar_sizes(&g.address).unwrap(),
            vec![16 << 20, 128 << 30],
            "BAR0 16 MiB and BAR2 128 GiB; the empty BAR is skipped"
        );
        let l = s.link(&g.address).unwrap();
        assert!(!l.is_full(), "x8 of x16 is degraded");
        assert_eq!(s.aer(&g.address).fatal, 3);
        assert_eq!(s.aer(&g.address).nonfatal, 0, "missing file reads zero");
    }

    #[test]
    fn a_missing_tree_has_no_gpus() {
        assert!(Sysfs::new("/nonexistent/sys").gpus().unwrap().is_empty());
    }
}
