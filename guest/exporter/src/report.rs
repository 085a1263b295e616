//! Building the report: NVML's raw figures (units as NVML gives them) to
//! the [`GpuSample`]s of one [`GuestReport`] line, in the units the host
//! expects, cleaned so that the host's `check()` accepts them (the host
//! drops a whole line it cannot accept).

use gantry_proto::metrics::{
    GpuSample, GuestReport, GUEST_LINE_MAX, GUEST_REPORT_VERSION, MAX_GPUS, MAX_TEXT,
};
use gantry_proto::validate::PciAddress;

/// One GPU as NVML reported it; `None` where the query failed or is not
/// supported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawGpu {
    pub index: u32,
    pub uuid: String,
    /// NVML's form, `00000000:1A:00.0`.
    pub pci_bus_id: String,
    pub name: String,
    /// Percent.
    pub util_pct: Option<u32>,
    pub mem_used_bytes: Option<u64>,
    pub mem_total_bytes: Option<u64>,
    /// Celsius.
    pub temperature_c: Option<u32>,
    /// Milliwatts.
    pub power_mw: Option<u32>,
    /// Millijoules since the driver loaded.
    pub energy_mj: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    /// The last critical XID seen (0: none); `None`: XIDs not watched.
    pub last_xid: Option<u64>,
}

/// Text the host accepts: no control characters, at most `MAX_TEXT`
/// bytes (cut on a character boundary).
fn clean(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_TEXT {
            break;
        }
        out.push(c);
    }
    out
}

/// `00000000:1A:00.0` -> `0000:1a:00.0` (the host's form); anything
/// unparsable is passed on cleaned.
fn pci(s: &str) -> String {
    PciAddress::parse(s)
        .map(|p| p.to_string())
        .unwrap_or_else(|| clean(s))
}

impl RawGpu {
    /// The sample in the report's units (W, J, bytes, percent 0–100).
    pub fn sample(&self) -> GpuSample {
        GpuSample {
            index: self.index,
            uuid: clean(&self.uuid),
            pci_bus_id: pci(&self.pci_bus_id),
            model: clean(&self.name),
            util_pct: self.util_pct.map(|u| f64::from(u.min(100))),
            mem_used_bytes: self.mem_used_bytes,
            mem_total_bytes: self.mem_total_bytes,
            temperature_c: self.temperature_c.map(f64::from),
            power_w: self.power_mw.map(|mw| f64::from(mw) / 1000.0),
            energy_j: self.energy_mj.map(|mj| mj as f64 / 1000.0),
            ecc_uncorrected: self.ecc_uncorrected,
            last_xid: self.last_xid,
        }
    }
}

/// The report of these GPUs (at most `MAX_GPUS`, the rest left out).
pub fn report(gpus: &[RawGpu]) -> GuestReport {
    GuestReport {
        v: GUEST_REPORT_VERSION,
        gpus: gpus.iter().take(MAX_GPUS).map(RawGpu::sample).collect(),
    }
}

/// The report as one line, `\n` included. Never longer than
/// `GUEST_LINE_MAX` (a report that would be is sent without its GPUs:
/// the host would drop it whole anyway).
pub fn line(r: &GuestReport) -> Vec<u8> {
    let mut out = serde_json::to_vec(r).expect("a report serialises");
    if out.len() >= GUEST_LINE_MAX {
        out = serde_json::to_vec(&GuestReport {
            v: r.v,
            gpus: Vec::new(),
        })
        .expect("a report serialises");
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(i: u32) -> RawGpu {
        RawGpu {
            index: i,
            uuid: format!("GPU-{i}"),
            pci_bus_id: "00000000:1A:00.0".into(),
            name: "NVIDIA RTX A6000".into(),
            util_pct: Some(42),
            mem_used_bytes: Some(1 << 30),
            mem_total_bytes: Some(48 << 30),
            temperature_c: Some(30),
            power_mw: Some(22_500),
            energy_mj: Some(1_000_000_123),
            ecc_uncorrected: None,
            last_xid: Some(79),
        }
    }

    #[test]
    fn units_are_converted_and_the_bus_id_normalised() {
        let s = raw(1).sample();
        assert_eq!(s.index, 1);
        assert_eq!(s.pci_bus_id, "0000:1a:00.0");
        assert_eq!(s.power_w, Some(22.5));
        assert_eq!(s.energy_j, Some(1_000_000.123));
        assert_eq!(s.util_pct, Some(42.0));
        assert_eq!(s.temperature_c, Some(30.0));
        assert_eq!(s.last_xid, Some(79));
        assert_eq!(s.ecc_uncorrected, None);
    }

    #[test]
    fn reports_pass_the_hosts_check_whatever_nvml_said() {
        let mut g = raw(0);
        g.name = format!("evil\n{}", "x".repeat(500));
        g.uuid = "GPU-\u{7}bell".into();
        g.pci_bus_id = "not a bus id".into();
        g.util_pct = Some(250);
        let r = report(&[g, raw(1)]);
        r.check().unwrap();
        assert_eq!(r.gpus[0].model.len(), MAX_TEXT);
        assert!(r.gpus[0].model.starts_with("evilxxx"));
        assert_eq!(r.gpus[0].uuid, "GPU-bell");
        assert_eq!(r.gpus[0].util_pct, Some(100.0));
        let many: Vec<RawGpu> = (0..100).map(raw).collect();
        assert_eq!(report(&many).gpus.len(), MAX_GPUS);
        report(&many).check().unwrap();
    }

    #[test]
    fn a_line_is_one_json_object_the_host_reads_back() {
        let r = report(&[raw(0), raw(1)]);
        let l = line(&r);
        assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(l.last(), Some(&b'\n'));
        let back: GuestReport = serde_json::from_slice(&l).unwrap();
        assert_eq!(back, r);
        assert_eq!(line(&report(&[])), b"{\"v\":1,\"gpus\":[]}\n");
        // Even the largest report fits the host's line limit.
        let mut g = raw(0);
        g.name = "n".repeat(MAX_TEXT);
        g.uuid = "u".repeat(MAX_TEXT);
        let big = report(&vec![g; MAX_GPUS]);
        let l = line(&big);
        assert!(l.len() <= GUEST_LINE_MAX, "{}", l.len());
        assert_eq!(
            serde_json::from_slice::<GuestReport>(&l)
                .unwrap()
                .gpus
                .len(),
            MAX_GPUS
        );
    }
}
