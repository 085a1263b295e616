//! The control API: create a simulated host in a state directory and inject
//! faults into it. Tests call these functions directly; the
//! `gantry-nvml-sim` CLI wraps them.
//!
//! Every mutation reads the *effective* state (simulated resets folded in,
//! see [`State::effective`]), changes it, writes `state.json` atomically and
//! rewrites the affected sysfs files. One writer at a time is assumed.

use crate::profiles;
use crate::state::{
    fs_now_ms, link_gen, parse_bdf, Aer, Ecc, Event, Remap, State, StateError, EVENT_DBE,
    EVENT_SBE, EVENT_XID, STATE_FILE, SYS_DIR,
};
use crate::sysfs;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The XID that NVML reports for a GPU that fell off the bus.
pub const XID_GPU_LOST: u64 = 79;

/// Addresses one GPU: by NVML index or by PCI address (any form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRef {
    Index(u32),
    Bdf(String),
}

impl fmt::Display for GpuRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRef::Index(i) => write!(f, "GPU {i}"),
            GpuRef::Bdf(b) => write!(f, "GPU {b}"),
        }
    }
}

impl FromStr for GpuRef {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, ControlError> {
        if let Ok(i) = s.parse::<u32>() {
            return Ok(GpuRef::Index(i));
        }
        if parse_bdf(s).is_some() {
            return Ok(GpuRef::Bdf(s.to_string()));
        }
        Err(ControlError::InvalidGpu(s.to_string()))
    }
}

impl From<u32> for GpuRef {
    fn from(i: u32) -> Self {
        GpuRef::Index(i)
    }
}

impl From<&str> for GpuRef {
    /// A number is an index; anything else is taken as a PCI address.
    fn from(s: &str) -> Self {
        s.parse().unwrap_or_else(|_| GpuRef::Bdf(s.to_string()))
    }
}

/// Everything the control API can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0} is not empty and holds no gantry-nvml-sim state; refusing to overwrite it")]
    NotEmpty(PathBuf),
    #[error("there is no profile {name:?}; the profiles are {known}")]
    UnknownProfile { name: String, known: String },
    #[error("{0:?} is neither a GPU index nor a PCI address")]
    InvalidGpu(String),
    #[error("the simulated host has no {gpu} (it has {count} GPUs)")]
    NoSuchGpu { gpu: GpuRef, count: usize },
    #[error("{0:?} is not a PCIe link speed such as \"32.0 GT/s PCIe\"")]
    InvalidLinkSpeed(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ControlError + '_ {
    move |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates a fresh simulated host from `profile` in `dir`: `state.json` and
/// the `sys/` tree. `dir` may be missing, empty, or hold an earlier
/// simulated host (which is replaced); anything else is refused.
pub fn init(dir: &Path, profile: &str) -> Result<State, ControlError> {
    let state = profiles::build(profile).ok_or_else(|| ControlError::UnknownProfile {
        name: profile.to_string(),
        known: profiles::names().join(", "),
    })?;
    if dir.exists() {
        let mut entries = fs::read_dir(dir).map_err(io_err(dir))?;
        if entries.next().is_some() {
            if State::read(dir).is_err() {
                return Err(ControlError::NotEmpty(dir.to_path_buf()));
            }
            let sys = dir.join(SYS_DIR);
            if sys.exists() {
                fs::remove_dir_all(&sys).map_err(io_err(&sys))?;
            }
            let file = dir.join(STATE_FILE);
            fs::remove_file(&file).map_err(io_err(&file))?;
        }
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let sys = dir.join(SYS_DIR);
    sysfs::create(&sys, &state).map_err(io_err(&sys))?;
    state.write(dir)?;
    Ok(state)
}

/// The simulated host as NVML currently shows it (resets folded in).
pub fn load(dir: &Path) -> Result<State, ControlError> {
    Ok(State::read(dir)?.effective(Some(&dir.join(SYS_DIR))))
}

fn resolve(state: &State, gpu: &GpuRef) -> Result<usize, ControlError> {
    let found = match gpu {
        GpuRef::Index(i) => state.gpus.iter().position(|g| g.index == *i),
        GpuRef::Bdf(b) => {
            let want = parse_bdf(b).ok_or_else(|| ControlError::InvalidGpu(b.clone()))?;
            state
                .gpus
                .iter()
                .position(|g| parse_bdf(&g.sysfs_bdf) == Some(want))
        }
    };
    found.ok_or_else(|| ControlError::NoSuchGpu {
        gpu: gpu.clone(),
        count: state.gpus.len(),
    })
}

/// Loads, lets `f` change GPU `gpu` (given its position and "now" on the
/// filesystem clock), saves, and rewrites that GPU's sysfs files.
fn mutate<T>(
    dir: &Path,
    gpu: impl Into<GpuRef>,
    f: impl FnOnce(&mut State, usize, u64) -> T,
) -> Result<T, ControlError> {
    let mut state = load(dir)?;
    let i = resolve(&state, &gpu.into())?;
    let now = fs_now_ms(dir)?;
    let out = f(&mut state, i, now);
    state.write(dir)?;
    let sys = dir.join(SYS_DIR);
    sysfs::update_gpu(&sys, &state.gpus[i]).map_err(io_err(&sys))?;
    Ok(out)
}

fn push_event(state: &mut State, i: usize, xid: u64, event_type: u64) -> u64 {
    let seq = state.max_seq() + 1;
    let gpu = state.gpus[i].index;
    state.events.push(Event {
        seq,
        gpu,
        xid,
        event_type,
    });
    seq
}

/// Appends an XID event for `gpu`; returns its sequence number.
pub fn inject_xid(dir: &Path, gpu: impl Into<GpuRef>, xid: u64) -> Result<u64, ControlError> {
    mutate(dir, gpu, |s, i, _| push_event(s, i, xid, EVENT_XID))
}

/// Sets the volatile ECC counters; the aggregate counters grow by the
/// increase. A rise raises a single-bit (corrected) or double-bit
/// (uncorrected) ECC event. A later GPU reset zeroes the volatile counters.
pub fn set_ecc(
    dir: &Path,
    gpu: impl Into<GpuRef>,
    corrected_volatile: u64,
    uncorrected_volatile: u64,
) -> Result<(), ControlError> {
    mutate(dir, gpu, |s, i, now| {
        let e = &mut s.gpus[i].ecc;
        let (old_c, old_u) = (e.corrected_volatile, e.uncorrected_volatile);
        e.corrected_aggregate += corrected_volatile.saturating_sub(old_c);
        e.uncorrected_aggregate += uncorrected_volatile.saturating_sub(old_u);
        e.corrected_volatile = corrected_volatile;
        e.uncorrected_volatile = uncorrected_volatile;
        e.volatile_since_ms = Some(now);
        if corrected_volatile > old_c {
            push_event(s, i, 0, EVENT_SBE);
        }
        if uncorrected_volatile > old_u {
            push_event(s, i, 0, EVENT_DBE);
        }
    })
}

/// Sets row remapping. With `pending`, `corr`/`unc` are rows waiting for the
/// next GPU reset (NVML shows them as pending; the reset moves them into
/// the remapped counts). Without it, they are the remapped counts.
pub fn set_remap(
    dir: &Path,
    gpu: impl Into<GpuRef>,
    corr: u32,
    unc: u32,
    pending: bool,
    failure: bool,
) -> Result<(), ControlError> {
    mutate(dir, gpu, |s, i, now| {
        let r = &mut s.gpus[i].remap;
        if pending {
            r.pending_corr = corr;
            r.pending_unc = unc;
            r.pending_since_ms = Some(now);
        } else {
            r.corr = corr;
            r.unc = unc;
            r.pending_corr = 0;
            r.pending_unc = 0;
            r.pending_since_ms = None;
        }
        r.pending = pending;
        r.failure = failure;
    })
}

/// Sets whether pages are pending retirement (cleared by a GPU reset).
pub fn set_pages_pending(
    dir: &Path,
    gpu: impl Into<GpuRef>,
    pending: bool,
) -> Result<(), ControlError> {
    mutate(dir, gpu, |s, i, now| {
        let g = &mut s.gpus[i];
        g.pages_pending = pending;
        g.pages_pending_since_ms = pending.then_some(now);
    })
}

/// Sets the `GPU_RECOVERY_ACTION` field (0 none, 1 GPU reset, 2 node
/// reboot, 3 drain P2P, 4 drain and reset).
pub fn set_recovery_action(
    dir: &Path,
    gpu: impl Into<GpuRef>,
    action: u32,
) -> Result<(), ControlError> {
    mutate(dir, gpu, |s, i, _| s.gpus[i].recovery_action = action)
}

/// The GPU falls off the bus: NVML answers `GPU_IS_LOST`, an XID 79 event
/// is raised and sysfs `vendor`/`device` read `0xffff`.
pub fn lose(dir: &Path, gpu: impl Into<GpuRef>) -> Result<(), ControlError> {
    mutate(dir, gpu, |s, i, _| {
        s.gpus[i].lost = true;
        push_event(s, i, XID_GPU_LOST, EVENT_XID);
    })
}

/// Clears every fault of the GPU: lost, ECC counters, remapping, pending
/// pages, recovery action, PCIe replays, AER totals and link degradation.
pub fn restore(dir: &Path, gpu: impl Into<GpuRef>) -> Result<(), ControlError> {
    mutate(dir, gpu, |s, i, _| {
        let g = &mut s.gpus[i];
        g.lost = false;
        g.ecc = Ecc {
            enabled: g.ecc.enabled,
            corrected_volatile: 0,
            uncorrected_volatile: 0,
            corrected_aggregate: 0,
            uncorrected_aggregate: 0,
            volatile_since_ms: None,
        };
        g.remap = Remap {
            corr: 0,
            unc: 0,
            pending_corr: 0,
            pending_unc: 0,
            pending: false,
            failure: false,
            pending_since_ms: None,
        };
        g.pages_pending = false;
        g.pages_pending_since_ms = None;
        g.recovery_action = 0;
        g.pcie_replay_count = 0;
        g.aer = Aer::default();
        g.link.current_gen = g.link.max_gen;
        g.link.current_width = g.link.max_width;
        g.link.current_speed = g.link.max_speed.clone();
    })
}

/// Sets the current PCIe link (sysfs `current_link_*` and NVML's current
/// generation and width), e.g. `("16.0 GT/s PCIe", 8)` for a degraded link.
pub fn set_link(
    dir: &Path,
    gpu: impl Into<GpuRef>,
    speed: &str,
    width: u32,
) -> Result<(), ControlError> {
    let gen = link_gen(speed).ok_or_else(|| ControlError::InvalidLinkSpeed(speed.to_string()))?;
    mutate(dir, gpu, |s, i, _| {
        let l = &mut s.gpus[i].link;
        l.current_speed = speed.to_string();
        l.current_gen = gen;
        l.current_width = width;
    })
}

/// Adds to the AER totals (`TOTAL_ERR_FATAL`, `TOTAL_ERR_NONFATAL`,
/// `TOTAL_ERR_COR`) in sysfs.
pub fn add_aer(
    dir: &Path,
    gpu: impl Into<GpuRef>,
    fatal: u64,
    nonfatal: u64,
    correctable: u64,
) -> Result<(), ControlError> {
    mutate(dir, gpu, |s, i, _| {
        let a = &mut s.gpus[i].aer;
        a.fatal += fatal;
        a.nonfatal += nonfatal;
        a.correctable += correctable;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_refs_parse_indices_and_addresses() {
        assert_eq!("3".parse::<GpuRef>().unwrap(), GpuRef::Index(3));
        assert_eq!(
            "0000:1a:00.0".parse::<GpuRef>().unwrap(),
            GpuRef::Bdf("0000:1a:00.0".into())
        );
        assert!("gpu3".parse::<GpuRef>().is_err());
    }

    #[test]
    fn init_refuses_a_foreign_directory_but_replaces_a_sim() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("precious"), "x").unwrap();
        assert!(matches!(
            init(t.path(), "h100x8"),
            Err(ControlError::NotEmpty(_))
        ));

        let d = t.path().join("sim");
        init(&d, "h100x8").unwrap();
        inject_xid(&d, 0, 48).unwrap();
        let s = init(&d, "a6000x2").unwrap();
        assert_eq!(s.gpus.len(), 2);
        assert!(load(&d).unwrap().events.is_empty());
        assert!(!d.join("sys/bus/pci/devices/0000:1a:00.0").exists());
        assert!(matches!(
            init(&d, "nope"),
            Err(ControlError::UnknownProfile { .. })
        ));
    }

    #[test]
    fn faults_accumulate_and_restore_clears_them() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        init(d, "h100x8").unwrap();
        assert_eq!(inject_xid(d, "0000:40:00.0", 48).unwrap(), 1);
        set_ecc(d, 1, 2, 1).unwrap();
        set_ecc(d, 1, 3, 1).unwrap();
        let g = &load(d).unwrap().gpus[1];
        assert_eq!(
            (g.ecc.corrected_aggregate, g.ecc.uncorrected_aggregate),
            (3, 1)
        );
        let types: Vec<u64> = load(d)
            .unwrap()
            .events
            .iter()
            .map(|e| e.event_type)
            .collect();
        assert_eq!(types, vec![EVENT_XID, EVENT_SBE, EVENT_DBE, EVENT_SBE]);

        lose(d, 1).unwrap();
        add_aer(d, 1, 1, 2, 3).unwrap();
        set_link(d, 1, "16.0 GT/s PCIe", 8).unwrap();
        let dev = d.join("sys/bus/pci/devices/0000:40:00.0");
        let read = |f: &str| fs::read_to_string(dev.join(f)).unwrap();
        assert_eq!(read("vendor"), "0xffff\n");
        assert!(read("aer_dev_correctable").ends_with("TOTAL_ERR_COR 3\n"));
        assert_eq!(read("current_link_width"), "8\n");

        restore(d, 1).unwrap();
        let g = &load(d).unwrap().gpus[1];
        assert!(!g.lost && g.ecc.corrected_aggregate == 0 && g.link.current_gen == 5);
        assert_eq!(read("vendor"), "0x10de\n");
        assert!(read("aer_dev_fatal").ends_with("TOTAL_ERR_FATAL 0\n"));
        assert!(matches!(
            set_link(d, 1, "fast", 16),
            Err(ControlError::InvalidLinkSpeed(_))
        ));
        assert!(matches!(lose(d, 8), Err(ControlError::NoSuchGpu { .. })));
    }
}
