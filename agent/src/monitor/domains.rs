//! Instances' counters from libvirt's all-domain statistics, in ONE call
//! per interval (`virConnectGetAllDomainStats` with state, cpu-total,
//! balloon, vcpu, interface and block), behind the narrow [`DomainStats`]
//! trait: [`LibvirtStats`] is the real one, [`FakeStats`] the one unit
//! tests script (vanished domains, counters reset by a guest reboot).
//!
//! The `virt` crate hands the records back as raw pointers and frees only
//! the array, so the call is made here through `virt::sys` and the list is
//! freed with `virDomainStatsRecordListFree`. Each record's typed
//! parameters are copied into plain [`Param`]s and then read by
//! [`counters_from_params`], which is pure and tested without libvirt.

use std::collections::BTreeMap;
use std::sync::Mutex;
use virt::connect::Connect;

#[derive(Debug, thiserror::Error)]
pub enum DomainsError {
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("libvirt all-domain stats: {0}")]
    Stats(String),
}

/// One disk's counters (`block.<n>.*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskCounters {
    /// The guest's target (`vda`, `vdb`).
    pub name: String,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_reqs: u64,
    pub wr_reqs: u64,
}

/// One NIC's counters (`net.<n>.*`), as libvirt reports them for the
/// guest (rx: into the guest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NicCounters {
    /// The host-side tap (`gt-…` access, `gg-…` group).
    pub tap: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// A domain's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainCounters {
    pub name: String,
    /// libvirt's `virDomainState` (1 running, 3 paused, …).
    pub state: i32,
    /// CPU time of the whole domain, nanoseconds.
    pub cpu_time_ns: Option<u64>,
    pub vcpus: Option<u32>,
    /// Balloon figures, KiB.
    pub mem_current_kib: Option<u64>,
    pub mem_max_kib: Option<u64>,
    pub mem_rss_kib: Option<u64>,
    pub mem_available_kib: Option<u64>,
    pub mem_unused_kib: Option<u64>,
    pub disks: Vec<DiskCounters>,
    pub nics: Vec<NicCounters>,
}

impl DomainCounters {
    /// Memory the guest uses, bytes: the guest's own figure (available −
    /// unused) when its balloon driver reports one, else the QEMU
    /// process's RSS (at most the guest's size: QEMU's own overhead is not
    /// the guest's), else the balloon's current size.
    pub fn mem_used_bytes(&self) -> u64 {
        let kib = match (self.mem_available_kib, self.mem_unused_kib) {
            (Some(a), Some(u)) if a >= u => a - u,
            _ => {
                let rss = self.mem_rss_kib.or(self.mem_current_kib).unwrap_or(0);
                self.mem_max_kib
                    .or(self.mem_current_kib)
                    .map_or(rss, |max| rss.min(max))
            }
        };
        kib.saturating_mul(1024)
    }

    /// The guest's memory size, bytes (balloon maximum, else current).
    pub fn mem_total_bytes(&self) -> u64 {
        self.mem_max_kib
            .or(self.mem_current_kib)
            .unwrap_or(0)
            .saturating_mul(1024)
    }
}

/// A typed parameter's value, copied out of libvirt's memory.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Int(i64),
    Uint(u64),
    Float(f64),
    Text(String),
}

impl Param {
    fn uint(&self) -> Option<u64> {
        match self {
            Self::Uint(v) => Some(*v),
            Self::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
}

/// Builds a domain's counters from its stats record's parameters.
pub fn counters_from_params(name: &str, params: &[(String, Param)]) -> DomainCounters {
    let map: BTreeMap<&str, &Param> = params.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let uint = |k: &str| map.get(k).and_then(|p| p.uint());
    let text = |k: &str| match map.get(k) {
        Some(Param::Text(s)) => Some(s.clone()),
        _ => None,
    };
    let mut disks = Vec::new();
    for i in 0..uint("block.count").unwrap_or(0).min(256) {
        let f = |x: &str| format!("block.{i}.{x}");
        let Some(name) = text(&f("name")) else {
            continue;
        };
        disks.push(DiskCounters {
            name,
            rd_bytes: uint(&f("rd.bytes")).unwrap_or(0),
            wr_bytes: uint(&f("wr.bytes")).unwrap_or(0),
            rd_reqs: uint(&f("rd.reqs")).unwrap_or(0),
            wr_reqs: uint(&f("wr.reqs")).unwrap_or(0),
        });
    }
    let mut nics = Vec::new();
    for i in 0..uint("net.count").unwrap_or(0).min(256) {
        let f = |x: &str| format!("net.{i}.{x}");
        let Some(tap) = text(&f("name")) else {
            continue;
        };
        nics.push(NicCounters {
            tap,
            rx_bytes: uint(&f("rx.bytes")).unwrap_or(0),
            tx_bytes: uint(&f("tx.bytes")).unwrap_or(0),
        });
    }
    DomainCounters {
        name: name.to_string(),
        state: match map.get("state.state") {
            Some(Param::Int(v)) => *v as i32,
            Some(p) => p.uint().unwrap_or(0) as i32,
            None => 0,
        },
        cpu_time_ns: uint("cpu.time"),
        vcpus: uint("vcpu.current").map(|v| v as u32),
        mem_current_kib: uint("balloon.current"),
        mem_max_kib: uint("balloon.maximum"),
        mem_rss_kib: uint("balloon.rss"),
        mem_available_kib: uint("balloon.available"),
        mem_unused_kib: uint("balloon.unused"),
        disks,
        nics,
    }
}

/// The counters of every active domain, in one call.
pub trait DomainStats: Send + Sync {
    fn all(&self) -> Result<Vec<DomainCounters>, DomainsError>;
}

/// The real [`DomainStats`]: one libvirt connection, kept between calls
/// and opened again after a failure (a restarted libvirtd).
pub struct LibvirtStats {
    uri: String,
    conn: Mutex<Option<Connect>>,
}

impl LibvirtStats {
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            conn: Mutex::new(None),
        }
    }
}

impl DomainStats for LibvirtStats {
    fn all(&self) -> Result<Vec<DomainCounters>, DomainsError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let c = Connect::open(Some(&self.uri)).map_err(|e| DomainsError::Connect {
                uri: self.uri.clone(),
                message: e.message().to_string(),
            })?;
            *slot = Some(c);
        }
        let conn = slot.as_ref().expect("connection just opened");
        match raw::all_domain_stats(conn) {
            Ok(records) => Ok(records
                .iter()
                .map(|(name, params)| counters_from_params(name, params))
                .collect()),
            Err(e) => {
                // Closed on drop; the next interval connects afresh.
                *slot = None;
                Err(DomainsError::Stats(e))
            }
        }
    }
}

/// A scripted [`DomainStats`] for tests: answers the queued results in
/// order, then repeats the last one.
#[derive(Default)]
pub struct FakeStats {
    answers: Mutex<std::collections::VecDeque<Result<Vec<DomainCounters>, String>>>,
    last: Mutex<Option<Result<Vec<DomainCounters>, String>>>,
}

impl FakeStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues the next answer (`Err`: libvirt fails with that sentence).
    pub fn push(&self, answer: Result<Vec<DomainCounters>, String>) {
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(answer);
    }
}

impl DomainStats for FakeStats {
    fn all(&self) -> Result<Vec<DomainCounters>, DomainsError> {
        let next = self
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = next {
            *last = Some(n);
        }
        match last.clone() {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(DomainsError::Stats(e)),
            None => Ok(Vec::new()),
        }
    }
}

/// The one raw libvirt call of the monitor.
mod raw {
    use super::Param;
    use std::ffi::CStr;
    use virt::connect::Connect;
    use virt::sys;

    const STATS: u32 = sys::VIR_DOMAIN_STATS_STATE
        | sys::VIR_DOMAIN_STATS_CPU_TOTAL
        | sys::VIR_DOMAIN_STATS_BALLOON
        | sys::VIR_DOMAIN_STATS_VCPU
        | sys::VIR_DOMAIN_STATS_INTERFACE
        | sys::VIR_DOMAIN_STATS_BLOCK;

    /// Copies one typed parameter; `None` for types the monitor ignores.
    ///
    /// # Safety
    /// `p` must point to a valid `virTypedParameter`.
    unsafe fn param(p: &sys::virTypedParameter) -> Option<(String, Param)> {
        let field = CStr::from_ptr(p.field.as_ptr())
            .to_string_lossy()
            .into_owned();
        let v = match p.type_ as u32 {
            sys::VIR_TYPED_PARAM_INT => Param::Int(i64::from(p.value.i)),
            sys::VIR_TYPED_PARAM_UINT => Param::Uint(u64::from(p.value.ui)),
            sys::VIR_TYPED_PARAM_LLONG => Param::Int(p.value.l),
            sys::VIR_TYPED_PARAM_ULLONG => Param::Uint(p.value.ul),
            sys::VIR_TYPED_PARAM_DOUBLE => Param::Float(p.value.d),
            sys::VIR_TYPED_PARAM_STRING if !p.value.s.is_null() => {
                Param::Text(CStr::from_ptr(p.value.s).to_string_lossy().into_owned())
            }
            _ => return None,
        };
        Some((field, v))
    }

    /// A domain's name and its stats parameters.
    pub type Record = (String, Vec<(String, Param)>);

    /// Every active domain's record.
    pub fn all_domain_stats(conn: &Connect) -> Result<Vec<Record>, String> {
        let mut list: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
        // SAFETY: a valid connection; libvirt allocates the NULL-terminated
        // record list into `list`, freed below.
        let n = unsafe {
            sys::virConnectGetAllDomainStats(
                conn.as_ptr(),
                STATS,
                &mut list,
                sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE,
            )
        };
        if n < 0 || list.is_null() {
            return Err(virt::error::Error::last_error().message().to_string());
        }
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            // SAFETY: `list` holds `n` valid record pointers; each record's
            // `params` holds `nparams` parameters; the domain's name is a
            // NUL-terminated string owned by the domain object. Everything
            // is copied before the list is freed.
            unsafe {
                let rec = &**list.add(i);
                let name_ptr = sys::virDomainGetName(rec.dom);
                if name_ptr.is_null() {
                    continue;
                }
                let name = CStr::from_ptr(name_ptr).to_string_lossy().into_owned();
                let params = (0..rec.nparams.max(0) as usize)
                    .filter_map(|j| param(&*rec.params.add(j)))
                    .collect();
                out.push((name, params));
            }
        }
        // SAFETY: the list libvirt returned, freed once, not used after.
        unsafe { sys::virDomainStatsRecordListFree(list) };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str, v: Param) -> (String, Param) {
        (k.to_string(), v)
    }

    #[test]
    fn params_become_counters() {
        let params = vec![
            p("state.state", Param::Int(1)),
            p("cpu.time", Param::Uint(5_000_000_000)),
            p("vcpu.current", Param::Uint(2)),
            p("balloon.current", Param::Uint(1024 * 1024)),
            p("balloon.maximum", Param::Uint(1024 * 1024)),
            p("balloon.rss", Param::Uint(300 * 1024)),
            p("block.count", Param::Uint(2)),
            p("block.0.name", Param::Text("vda".into())),
            p("block.0.rd.bytes", Param::Uint(4096)),
            p("block.0.wr.reqs", Param::Uint(3)),
            p("block.1.name", Param::Text("vdb".into())),
            p("net.count", Param::Uint(1)),
            p("net.0.name", Param::Text("gt-0123456789a".into())),
            p("net.0.rx.bytes", Param::Uint(100)),
            p("net.0.tx.bytes", Param::Uint(200)),
            p("vcpu.0.time", Param::Float(1.0)),
        ];
        let c = counters_from_params("gantry-x", &params);
        assert_eq!(c.state, 1);
        assert_eq!(c.cpu_time_ns, Some(5_000_000_000));
        assert_eq!(c.vcpus, Some(2));
        assert_eq!(
            c.mem_used_bytes(),
            300 * 1024 * 1024,
            "RSS without guest figures"
        );
        assert_eq!(c.mem_total_bytes(), 1 << 30);
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].rd_bytes, 4096);
        assert_eq!(c.disks[0].wr_reqs, 3);
        assert_eq!(c.nics[0].tap, "gt-0123456789a");
        assert_eq!(c.nics[0].tx_bytes, 200);
    }

    #[test]
    fn the_guests_own_memory_figure_wins() {
        let c = DomainCounters {
            mem_available_kib: Some(1000),
            mem_unused_kib: Some(400),
            mem_rss_kib: Some(900),
            ..Default::default()
        };
        assert_eq!(c.mem_used_bytes(), 600 * 1024);
        // Without it, QEMU's RSS counts, but never beyond the guest's size.
        let c = DomainCounters {
            mem_rss_kib: Some(278_000),
            mem_max_kib: Some(262_144),
            ..Default::default()
        };
        assert_eq!(c.mem_used_bytes(), 262_144 * 1024);
        let c = DomainCounters {
            mem_rss_kib: Some(200_000),
            mem_max_kib: Some(262_144),
            ..Default::default()
        };
        assert_eq!(c.mem_used_bytes(), 200_000 * 1024);
    }

    #[test]
    fn the_fake_replays_then_repeats() {
        let f = FakeStats::new();
        f.push(Ok(vec![DomainCounters::default()]));
        f.push(Err("libvirtd restarted".into()));
        assert_eq!(f.all().unwrap().len(), 1);
        assert!(f
            .all()
            .unwrap_err()
            .to_string()
            .contains("libvirtd restarted"));
        assert!(f.all().is_err());
    }
}
