//! The host's own figures, read straight from `/proc` and `/sys` (a few
//! small files per interval, cheaper than a full system scan): CPU from
//! `/proc/stat`, memory from `/proc/meminfo`, the state directory's
//! filesystem from `statvfs`, disk I/O from `/proc/diskstats` (whole
//! physical disks: those with a `/sys/block/<dev>/device`, so partitions,
//! device-mapper and loop devices are not counted twice) and network I/O
//! from `/proc/net/dev` (physical NICs: those with a
//! `/sys/class/net/<if>/device`; guests' taps, bridges and VXLAN devices
//! carry the guests' own traffic, counted per instance).

use std::path::{Path, PathBuf};

/// The host's counters and gauges at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostCounters {
    /// `/proc/stat` jiffies: busy (all but idle and iowait) and total.
    pub cpu_busy: u64,
    pub cpu_total: u64,
    pub cpu_cores: u32,
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    pub fs_total_bytes: u64,
    pub fs_used_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_written_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// Reads the host's counters under `proc` and `sys` (`/proc`, `/sys`;
/// other roots in tests).
pub struct HostReader {
    proc_root: PathBuf,
    sys_root: PathBuf,
    state_dir: PathBuf,
}

impl HostReader {
    pub fn new(state_dir: &Path) -> Self {
        Self::with_roots("/proc", "/sys", state_dir)
    }

    pub fn with_roots(
        proc_root: impl Into<PathBuf>,
        sys_root: impl Into<PathBuf>,
        state_dir: &Path,
    ) -> Self {
        Self {
            proc_root: proc_root.into(),
            sys_root: sys_root.into(),
            state_dir: state_dir.to_path_buf(),
        }
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.proc_root.join(rel)).unwrap_or_default()
    }

    /// One reading; a file that cannot be read counts as zeros.
    pub fn read_counters(&self) -> HostCounters {
        let (cpu_busy, cpu_total, cpu_cores) = parse_stat(&self.read("stat"));
        let (mem_total_bytes, mem_used_bytes) = parse_meminfo(&self.read("meminfo"));
        let (fs_total_bytes, fs_used_bytes) = fs_usage(&self.state_dir);
        let block = self.sys_root.join("block");
        let (disk_read_bytes, disk_written_bytes) = parse_diskstats(&self.read("diskstats"), |d| {
            block.join(d).join("device").exists()
        });
        let net = self.sys_root.join("class/net");
        let (net_rx_bytes, net_tx_bytes) = parse_netdev(&self.read("net/dev"), |i| {
            net.join(i).join("device").exists()
        });
        HostCounters {
            cpu_busy,
            cpu_total,
            cpu_cores,
            mem_total_bytes,
            mem_used_bytes,
            fs_total_bytes,
            fs_used_bytes,
            disk_read_bytes,
            disk_written_bytes,
            net_rx_bytes,
            net_tx_bytes,
        }
    }
}

/// `/proc/stat`: (busy jiffies, total jiffies, cores).
pub fn parse_stat(text: &str) -> (u64, u64, u32) {
    let mut busy = 0;
    let mut total = 0;
    let mut cores = 0;
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        match f.next() {
            Some("cpu") => {
                let v: Vec<u64> = f.take(8).filter_map(|x| x.parse().ok()).collect();
                total = v.iter().sum();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                busy = total.saturating_sub(idle);
            }
            Some(c) if c.starts_with("cpu") => cores += 1,
            _ => {}
        }
    }
    (busy, total, cores)
}

/// `/proc/meminfo`: (total, used = total − available), bytes.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let total = kib("MemTotal:") * 1024;
    let available = kib("MemAvailable:") * 1024;
    (total, total.saturating_sub(available))
}

/// `/proc/diskstats` over the devices `whole` accepts: (read, written)
/// bytes (sectors of 512 bytes).
pub fn parse_diskstats(text: &str, whole: impl Fn(&str) -> bool) -> (u64, u64) {
    let mut read = 0u64;
    let mut written = 0u64;
    for line in text.lines() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.len() < 10 || !whole(f[2]) {
            continue;
        }
        let n = |i: usize| f[i].parse::<u64>().unwrap_or(0);
        read = read.saturating_add(n(5).saturating_mul(512));
        written = written.saturating_add(n(9).saturating_mul(512));
    }
    (read, written)
}

/// `/proc/net/dev` over the interfaces `physical` accepts: (rx, tx) bytes.
pub fn parse_netdev(text: &str, physical: impl Fn(&str) -> bool) -> (u64, u64) {
    let mut rx = 0u64;
    let mut tx = 0u64;
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name == "lo" || !physical(name) {
            continue;
        }
        let f: Vec<u64> = rest
            .split_ascii_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if f.len() >= 9 {
            rx = rx.saturating_add(f[0]);
            tx = tx.saturating_add(f[8]);
        }
    }
    (rx, tx)
}

/// The filesystem holding `dir`: (total, used) bytes; zeros when it
/// cannot be read.
fn fs_usage(dir: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => {
            let frag = s.fragment_size();
            let total = s.blocks().saturating_mul(frag);
            let free = s.blocks_free().saturating_mul(frag);
            (total, total.saturating_sub(free))
        }
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_counts_busy_jiffies_and_cores() {
        let t = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nintr 1\n";
        assert_eq!(parse_stat(t), (150, 1000, 2));
    }

    #[test]
    fn meminfo_used_is_total_less_available() {
        let t = "MemTotal:       2000 kB\nMemFree:         100 kB\nMemAvailable:    500 kB\n";
        assert_eq!(parse_meminfo(t), (2000 * 1024, 1500 * 1024));
    }

    #[test]
    fn only_whole_physical_disks_and_nics_count() {
        let d = "   8       0 sda 10 0 8 0 20 0 16 0 0 0 0\n   8       1 sda1 10 0 8 0 20 0 16 0 0 0 0\n 253 0 dm-0 1 0 99 0 1 0 99 0 0 0 0\n";
        assert_eq!(parse_diskstats(d, |n| n == "sda"), (8 * 512, 16 * 512));
        let n = "Inter-|   Receive\n face |bytes\n    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n  eth0: 100 1 0 0 0 0 0 0 200 2 0 0 0 0 0 0\ngt-abc: 7 1 0 0 0 0 0 0 9 1 0 0 0 0 0 0\n";
        assert_eq!(parse_netdev(n, |i| i == "eth0" || i == "lo"), (100, 200));
    }

    #[test]
    fn this_host_reads_something() {
        let dir = tempfile::tempdir().unwrap();
        let c = HostReader::new(dir.path()).read_counters();
        assert!(c.cpu_total > 0 && c.cpu_cores > 0, "{c:?}");
        assert!(c.mem_total_bytes > c.mem_used_bytes, "{c:?}");
        assert!(c.fs_total_bytes > 0, "{c:?}");
    }
}
