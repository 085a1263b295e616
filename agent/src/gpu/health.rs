//! What a GPU's health inputs mean: the XID-to-action table (from NVIDIA's
//! XID catalog, docs/gpus.md) and the verdict on an NVML reading.

use super::nvml::HealthReading;

/// What an XID asks of the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XidAction {
    /// The application's own error (a bad kernel, a page fault): the GPU
    /// is fine; the XID is only counted.
    Application,
    /// The GPU needs a reset before its next lease (the health gate runs).
    Reset,
    /// Take the GPU out of service until an admin clears it.
    Quarantine,
}

/// `(xid, mnemonic, action)`, from NVIDIA's XID catalog (its immediate and
/// investigatory resolutions; "drain" there is quarantine here).
pub const XID_TABLE: &[(u64, &str, XidAction)] = &[
    (13, "graphics engine exception", XidAction::Application),
    (31, "GPU memory page fault", XidAction::Application),
    (43, "GPU stopped processing", XidAction::Application),
    (
        45,
        "preemptive cleanup after previous errors",
        XidAction::Application,
    ),
    (46, "GPU stopped processing (timeout)", XidAction::Reset),
    (48, "double bit ECC error", XidAction::Quarantine),
    (62, "internal micro-controller halt", XidAction::Quarantine),
    (
        63,
        "row remapping / page retirement recorded",
        XidAction::Reset,
    ),
    (
        64,
        "row remapping / page retirement failure",
        XidAction::Quarantine,
    ),
    (68, "NVDEC0 exception", XidAction::Application),
    (69, "graphics engine class error", XidAction::Application),
    (74, "NVLink error", XidAction::Quarantine),
    (79, "GPU has fallen off the bus", XidAction::Quarantine),
    (92, "high single-bit ECC error rate", XidAction::Reset),
    (93, "InfoROM erase limit exceeded", XidAction::Application),
    (94, "contained memory error", XidAction::Reset),
    (95, "uncontained memory error", XidAction::Quarantine),
    (109, "context switch timeout", XidAction::Reset),
    (110, "security fault", XidAction::Quarantine),
    (119, "GSP RPC timeout", XidAction::Quarantine),
    (120, "GSP error", XidAction::Quarantine),
    (121, "C2C link error", XidAction::Quarantine),
    (136, "NVLink link training failed", XidAction::Quarantine),
    (140, "ECC unrecovered error escape", XidAction::Quarantine),
    (143, "GPU initialization error", XidAction::Quarantine),
    (144, "NVLink5 SAW error", XidAction::Quarantine),
    (145, "NVLink5 RLW error", XidAction::Quarantine),
    (146, "NVLink5 TLW error", XidAction::Quarantine),
    (147, "NVLink5 TREX error", XidAction::Quarantine),
    (148, "NVLink5 NVLPW control error", XidAction::Quarantine),
    (149, "NVLink5 NETIR error", XidAction::Quarantine),
    (150, "NVLink5 MSE error", XidAction::Quarantine),
    (154, "GPU recovery action changed", XidAction::Reset),
    (155, "NVLink software-defined error", XidAction::Reset),
    (156, "resource retirement event", XidAction::Reset),
    (157, "resource retirement failure", XidAction::Quarantine),
    (158, "GPU fatal timeout", XidAction::Quarantine),
];

/// The action and a sentence for an XID. XIDs the table does not know
/// (and NVML's "unknown") get a reset: the health gate then reads the
/// GPU's own fault state and quarantines it if anything is wrong.
pub fn xid_action(xid: Option<u64>) -> (XidAction, String) {
    match xid.and_then(|x| XID_TABLE.iter().find(|(n, _, _)| *n == x)) {
        Some((n, name, a)) => (*a, format!("XID {n} ({name})")),
        None => match xid {
            Some(n) => (XidAction::Reset, format!("XID {n} (not in the catalog)")),
            None => (XidAction::Reset, "an unidentified critical XID".into()),
        },
    }
}

/// What an NVML reading says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Sound,
    /// A reset clears it (pending remaps, pending page retirement, the
    /// driver asking for a GPU reset).
    NeedsReset(String),
    Quarantine(String),
    Lost,
}

/// Judges one reading.
pub fn assess(r: &HealthReading) -> Verdict {
    if r.lost {
        return Verdict::Lost;
    }
    let remap = r.remap.unwrap_or_default();
    if remap.failure {
        return Verdict::Quarantine("row remapping failed".into());
    }
    match r.recovery_action {
        Some(2) => return Verdict::Quarantine("the driver asks for a node reboot".into()),
        Some(3) => return Verdict::Quarantine("the driver asks to drain peer-to-peer".into()),
        Some(4) => return Verdict::Quarantine("the driver asks to drain and reset".into()),
        _ => {}
    }
    let uncorrected = r.ecc_uncorrected_volatile.unwrap_or(0);
    if uncorrected > 0 && !remap.pending {
        return Verdict::Quarantine(format!("{uncorrected} uncorrected ECC errors"));
    }
    if remap.pending {
        return Verdict::NeedsReset("row remapping pending".into());
    }
    if r.pages_pending_retirement == Some(true) {
        return Verdict::NeedsReset("pages pending retirement".into());
    }
    if r.recovery_action == Some(1) {
        return Verdict::NeedsReset("the driver asks for a GPU reset".into());
    }
    Verdict::Sound
}

#[cfg(test)]
mod tests {
    use super::super::nvml::Remap;
    use super::*;

    #[test]
    fn xid_79_quarantines_13_is_the_application_and_unknown_resets() {
        assert_eq!(xid_action(Some(79)).0, XidAction::Quarantine);
        assert!(xid_action(Some(79)).1.contains("fallen off the bus"));
        assert_eq!(xid_action(Some(13)).0, XidAction::Application);
        assert_eq!(xid_action(Some(63)).0, XidAction::Reset);
        assert_eq!(xid_action(Some(4242)).0, XidAction::Reset);
        assert_eq!(xid_action(None).0, XidAction::Reset);
        let mut seen = std::collections::HashSet::new();
        assert!(
            XID_TABLE.iter().all(|(n, _, _)| seen.insert(*n)),
            "no XID twice"
        );
    }

    #[test]
    fn verdicts() {
        let ok = HealthReading::default();
        assert_eq!(assess(&ok), Verdict::Sound);
        let pending = HealthReading {
            remap: Some(Remap {
                pending: true,
                ..Default::default()
            }),
            ecc_uncorrected_volatile: Some(1),
            ..Default::default()
        };
        assert!(matches!(assess(&pending), Verdict::NeedsReset(_)));
        let failed = HealthReading {
            remap: Some(Remap {
                failure: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(assess(&failed), Verdict::Quarantine(_)));
        let dbe = HealthReading {
            ecc_uncorrected_volatile: Some(2),
            ..Default::default()
        };
        assert_eq!(
            assess(&dbe),
            Verdict::Quarantine("2 uncorrected ECC errors".into())
        );
        let reboot = HealthReading {
            recovery_action: Some(2),
            ..Default::default()
        };
        assert!(matches!(assess(&reboot), Verdict::Quarantine(_)));
        let lost = HealthReading {
            lost: true,
            ..Default::default()
        };
        assert_eq!(assess(&lost), Verdict::Lost);
    }
}
