//! The fake sysfs tree under `$DIR/sys`, laid out like the parts of `/sys`
//! that the agent reads: `bus/pci/devices/<bdf>/…`, `bus/pci/drivers/…`,
//! `kernel/iommu_groups/<n>/devices/…` and `devices/system/node/…`.
//!
//! File contents follow the kernel's formats (`resource` lines are
//! `0x%016llx 0x%016llx 0x%016llx`, AER files end in `TOTAL_ERR_*`).

use crate::state::{Aer, Companion, Gpu, State};
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;

/// Drivers that get a `bus/pci/drivers/<name>` directory.
const DRIVERS: &[&str] = &["nvidia", "vfio-pci", "snd_hda_intel"];

/// `IORESOURCE_MEM | IORESOURCE_SIZEALIGN`: a 32-bit non-prefetchable BAR.
const FLAGS_MEM32: u64 = 0x0004_0200;
/// `IORESOURCE_MEM | PREFETCH | MEM_64 | SIZEALIGN | …`: a 64-bit prefetchable BAR.
const FLAGS_MEM64_PREF: u64 = 0x0014_220c;

const AER_CORRECTABLE: &[&str] = &[
    "RxErr",
    "BadTLP",
    "BadDLLP",
    "Rollover",
    "Timeout",
    "NonFatalErr",
    "CorrIntErr",
    "HeaderOF",
];
const AER_UNCORRECTABLE: &[&str] = &[
    "Undefined",
    "DLP",
    "SDES",
    "TLP",
    "FCP",
    "CmpltTO",
    "CmpltAbrt",
    "UnxCmplt",
    "RxOF",
    "MalfTLP",
    "ECRC",
    "UnsupReq",
    "ACSViol",
    "UncorrIntErr",
    "BlockedTLP",
    "AtomicOpBlocked",
    "TLPBlockedErr",
    "PoisonTLPBlocked",
];

fn write(path: &Path, text: &str) -> io::Result<()> {
    fs::write(path, text).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Writes `text` through a temporary file and a rename, so readers never
/// see a half-written file.
fn replace(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("sim-tmp");
    write(&tmp, text)?;
    fs::rename(&tmp, path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn link(target: &str, at: &Path) -> io::Result<()> {
    symlink(target, at).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", at.display())))
}

/// Creates the whole tree for `state` under `sys` (which must not exist).
pub fn create(sys: &Path, state: &State) -> io::Result<()> {
    fs::create_dir_all(sys.join("bus/pci/devices"))?;
    for d in DRIVERS {
        let dir = sys.join("bus/pci/drivers").join(d);
        fs::create_dir_all(&dir)?;
        for f in ["bind", "unbind", "new_id"] {
            write(&dir.join(f), "")?;
        }
    }
    for n in &state.numa_nodes {
        let dir = sys.join(format!("devices/system/node/node{}", n.id));
        fs::create_dir_all(&dir)?;
        write(&dir.join("cpulist"), &format!("{}\n", n.cpulist))?;
    }
    for g in &state.gpus {
        let dev = function_dir(sys, &g.sysfs_bdf, g.iommu_group, "nvidia")?;
        let sub_vendor = g.pci_subsystem_id & 0xffff;
        let sub_device = g.pci_subsystem_id >> 16;
        write(&dev.join("class"), &format!("0x{:06x}\n", g.pci_class))?;
        write(
            &dev.join("subsystem_vendor"),
            &format!("0x{sub_vendor:04x}\n"),
        )?;
        write(
            &dev.join("subsystem_device"),
            &format!("0x{sub_device:04x}\n"),
        )?;
        write(&dev.join("numa_node"), &format!("{}\n", g.numa_node))?;
        write(&dev.join("local_cpulist"), &format!("{}\n", g.cpu_affinity))?;
        write(&dev.join("resource"), &resource(g))?;
        update_gpu(sys, g)?;
    }
    for c in &state.companions {
        companion(sys, c)?;
    }
    Ok(())
}

/// A function's directory with the files every function has, its driver and
/// IOMMU group links, and its entry in the group.
fn function_dir(sys: &Path, bdf: &str, group: u32, driver: &str) -> io::Result<std::path::PathBuf> {
    let dev = sys.join("bus/pci/devices").join(bdf);
    fs::create_dir_all(&dev)?;
    write(&dev.join("reset"), "")?;
    write(&dev.join("reset_method"), "flr bus\n")?;
    write(&dev.join("driver_override"), "(null)\n")?;
    link(
        &format!("../../../../bus/pci/drivers/{driver}"),
        &dev.join("driver"),
    )?;
    link(
        &format!("../../../../kernel/iommu_groups/{group}"),
        &dev.join("iommu_group"),
    )?;
    let members = sys.join(format!("kernel/iommu_groups/{group}/devices"));
    fs::create_dir_all(&members)?;
    link(
        &format!("../../../../bus/pci/devices/{bdf}"),
        &members.join(bdf),
    )?;
    Ok(dev)
}

fn companion(sys: &Path, c: &Companion) -> io::Result<()> {
    let dev = function_dir(sys, &c.sysfs_bdf, c.iommu_group, &c.driver)?;
    write(&dev.join("vendor"), &format!("0x{:04x}\n", c.vendor))?;
    write(&dev.join("device"), &format!("0x{:04x}\n", c.device))?;
    write(&dev.join("class"), &format!("0x{:06x}\n", c.class))?;
    write(
        &dev.join("subsystem_vendor"),
        &format!("0x{:04x}\n", c.vendor),
    )?;
    write(&dev.join("numa_node"), &format!("{}\n", c.numa_node))?;
    let bus = u64::from_str_radix(c.sysfs_bdf.get(5..7).unwrap_or("0"), 16).unwrap_or(0);
    let start = 0x0800_0000 + bus * 0x4000;
    let mut res = format!(
        "0x{start:016x} 0x{:016x} 0x{FLAGS_MEM32:016x}\n",
        start + 0x3fff
    );
    for _ in 1..13 {
        res.push_str(&format!("0x{0:016x} 0x{0:016x} 0x{0:016x}\n", 0));
    }
    write(&dev.join("resource"), &res)
}

/// The `resource` file: BAR0 (32-bit), BAR1 (64-bit, so line 2 is empty),
/// BAR3 (64-bit), then zeros up to the 13 lines the kernel prints.
fn resource(g: &Gpu) -> String {
    // Place BARs in distinct per-GPU windows, as firmware would.
    let bus = u64::from_str_radix(g.sysfs_bdf.get(5..7).unwrap_or("0"), 16).unwrap_or(0);
    let bar0 = 0x1000_0000 + bus * 0x0100_0000;
    let bar1 = 0x2000_0000_0000 + bus * 0x0080_0000_0000;
    let bar3 = bar1 + g.bar1_bytes;
    let mut lines = vec![
        (bar0, bar0 + g.bar0_bytes - 1, FLAGS_MEM32),
        (bar1, bar1 + g.bar1_bytes - 1, FLAGS_MEM64_PREF),
        (0, 0, 0),
        (bar3, bar3 + g.bar3_bytes - 1, FLAGS_MEM64_PREF),
    ];
    lines.resize(13, (0, 0, 0));
    lines
        .into_iter()
        .map(|(s, e, f)| format!("0x{s:016x} 0x{e:016x} 0x{f:016x}\n"))
        .collect()
}

/// Rewrites the files that faults change: `vendor`/`device` (`0xffff` when
/// lost), the link files and the AER files.
pub fn update_gpu(sys: &Path, g: &Gpu) -> io::Result<()> {
    let dev = sys.join("bus/pci/devices").join(&g.sysfs_bdf);
    let (vendor, device) = if g.lost {
        (0xffff, 0xffff)
    } else {
        (g.pci_device_id & 0xffff, g.pci_device_id >> 16)
    };
    replace(&dev.join("vendor"), &format!("0x{vendor:04x}\n"))?;
    replace(&dev.join("device"), &format!("0x{device:04x}\n"))?;
    replace(
        &dev.join("current_link_speed"),
        &format!("{}\n", g.link.current_speed),
    )?;
    replace(
        &dev.join("max_link_speed"),
        &format!("{}\n", g.link.max_speed),
    )?;
    replace(
        &dev.join("current_link_width"),
        &format!("{}\n", g.link.current_width),
    )?;
    replace(
        &dev.join("max_link_width"),
        &format!("{}\n", g.link.max_width),
    )?;
    write_aer(&dev, &g.aer)
}

fn write_aer(dev: &Path, aer: &Aer) -> io::Result<()> {
    // Each total is attributed to one representative counter so that the
    // per-cause lines add up to the TOTAL line, as in the kernel's files.
    let file = |names: &[&str], hit: &str, n: u64, total: &str| -> String {
        let mut s: String = names
            .iter()
            .map(|k| format!("{k} {}\n", if *k == hit { n } else { 0 }))
            .collect();
        s.push_str(&format!("{total} {n}\n"));
        s
    };
    replace(
        &dev.join("aer_dev_correctable"),
        &file(AER_CORRECTABLE, "RxErr", aer.correctable, "TOTAL_ERR_COR"),
    )?;
    replace(
        &dev.join("aer_dev_nonfatal"),
        &file(
            AER_UNCORRECTABLE,
            "CmpltTO",
            aer.nonfatal,
            "TOTAL_ERR_NONFATAL",
        ),
    )?;
    replace(
        &dev.join("aer_dev_fatal"),
        &file(AER_UNCORRECTABLE, "DLP", aer.fatal, "TOTAL_ERR_FATAL"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_lines_have_the_kernel_format_and_bar_sizes() {
        let s = crate::profiles::build("h100x8").unwrap();
        let text = resource(&s.gpus[0]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 13);
        let size = |l: &str| {
            let v: Vec<u64> = l
                .split(' ')
                .map(|x| u64::from_str_radix(x.strip_prefix("0x").unwrap(), 16).unwrap())
                .collect();
            assert_eq!(l.len(), 3 * 18 + 2, "{l}");
            if v[1] > v[0] {
                v[1] - v[0] + 1
            } else {
                0
            }
        };
        assert_eq!(size(lines[0]), 16 << 20);
        assert_eq!(size(lines[1]), s.gpus[0].bar1_bytes);
        assert_eq!(size(lines[2]), 0);
        assert_eq!(size(lines[3]), 32 << 20);
    }
}
