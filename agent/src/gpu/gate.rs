//! The health gate between leases: a GPU that comes back from a VM (or
//! that an admin cleared, or that showed a fault a reset clears) is checked
//! and reset before it returns to the pool, or quarantined.
//!
//! In order: faults recorded during the lease; the device still
//! enumerated (config space not all ones); its PCIe link at full speed and
//! width; no new fatal or non-fatal AER errors; optionally a brief rebind
//! to the host driver; NVML's fault state (lost, uncorrected ECC, row
//! remapping, pages pending retirement, the recovery action); optionally
//! an operator's diagnostic command; a reset; after the reset, config
//! space and (when a fault asked for the reset) NVML again.

use super::health::{assess, Verdict};
use super::pool::GpuPool;
use gantry_proto::gpu::{GpuEvent, GpuHealth};
use gantry_proto::validate::PciAddress;
use std::process::Command;
use std::time::{Duration, Instant};

/// Why a GPU did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateFail {
    Lost,
    Failed(String),
}

impl GpuPool {
    /// Runs the gate on every GPU that waits for it.
    pub fn run_gates(&self) {
        let waiting: Vec<PciAddress> = self
            .lock()
            .records
            .iter()
            .filter(|(_, r)| r.health == GpuHealth::Checking)
            .map(|(p, _)| *p)
            .collect();
        for pci in waiting {
            self.gate_one(&pci);
        }
    }

    /// Gates one GPU and applies the outcome.
    pub fn gate_one(&self, pci: &PciAddress) {
        let started = Instant::now();
        let outcome = self.check(pci);
        let aer = self.sysfs.aer(pci);
        let mut st = self.lock();
        let Some(rec) = st.records.get_mut(pci) else {
            return;
        };
        if rec.health != GpuHealth::Checking {
            return;
        }
        let event = match &outcome {
            Ok(()) => GpuEvent::Passed,
            Err(GateFail::Lost) => GpuEvent::Lost,
            Err(GateFail::Failed(reason)) => GpuEvent::Failed {
                reason: reason.clone(),
            },
        };
        super::pool::apply(pci, rec, event);
        rec.aer = aer;
        rec.faults.clear();
        rec.needs_reset = None;
        match outcome {
            Ok(()) => st.gates_passed += 1,
            Err(_) => st.gates_failed += 1,
        }
        st.last_gate = Some(started.elapsed());
        if let Err(e) = self.save(&st) {
            tracing::error!(error = %e, "cannot persist GPU health");
        }
    }

    fn check(&self, pci: &PciAddress) -> Result<(), GateFail> {
        let rec = self.lock().records.get(pci).cloned().unwrap_or_default();
        if !rec.faults.is_empty() {
            return Err(GateFail::Failed(rec.faults.join("; ")));
        }
        self.check_pci(pci, &rec.aer)?;
        let host_driver = self.cfg.host_driver.clone();
        let func = self.sysfs.function(pci).map_err(|_| GateFail::Lost)?;
        let rebound = self.cfg.gate_rebind && func.driver.as_deref() != Some(host_driver.as_str());
        let back = func.driver.clone();
        if rebound {
            self.sysfs
                .rebind(pci, &host_driver)
                .map_err(|e| GateFail::Failed(format!("cannot bind it to {host_driver}: {e}")))?;
            // NVML sees a device only once it is bound to the host driver.
            self.nvml.devices();
        }
        let result = self.check_driver_side(pci, rec.needs_reset.clone());
        if rebound {
            if let Some(d) = back {
                if let Err(e) = self.sysfs.rebind(pci, &d) {
                    tracing::warn!(%pci, error = %e, "cannot give the GPU back to {d}");
                }
            }
        }
        result
    }

    /// Presence, link and AER.
    fn check_pci(
        &self,
        pci: &PciAddress,
        baseline: &super::sysfs::AerTotals,
    ) -> Result<(), GateFail> {
        let f = self.sysfs.function(pci).map_err(|_| GateFail::Lost)?;
        if f.vendor == super::sysfs::GONE_VENDOR {
            return Err(GateFail::Lost);
        }
        if let Ok(l) = self.sysfs.link(pci) {
            if !l.is_full() {
                return Err(GateFail::Failed(format!(
                    "PCIe link at {} x{}, expected {} x{}",
                    l.speed, l.width, l.max_speed, l.max_width
                )));
            }
        }
        let aer = self.sysfs.aer(pci);
        let fatal = aer.fatal.saturating_sub(baseline.fatal);
        let nonfatal = aer.nonfatal.saturating_sub(baseline.nonfatal);
        if fatal + nonfatal > 0 {
            return Err(GateFail::Failed(format!(
                "{fatal} new fatal and {nonfatal} new non-fatal PCIe AER errors"
            )));
        }
        Ok(())
    }

    /// NVML, the diagnostic command and the reset.
    fn check_driver_side(
        &self,
        pci: &PciAddress,
        mut needs_reset: Option<String>,
    ) -> Result<(), GateFail> {
        if let Some(r) = self.nvml.health(pci) {
            match assess(&r) {
                Verdict::Sound => {}
                Verdict::Lost => return Err(GateFail::Lost),
                Verdict::Quarantine(why) => return Err(GateFail::Failed(why)),
                Verdict::NeedsReset(why) => needs_reset = Some(why),
            }
        }
        if !self.cfg.gate_command.is_empty() {
            self.run_diag(pci)?;
        }
        if self.cfg.gate_reset || needs_reset.is_some() {
            if let Err(e) = self.sysfs.reset(pci) {
                if let Some(why) = &needs_reset {
                    return Err(GateFail::Failed(format!("{why}, and a reset failed: {e}")));
                }
                tracing::warn!(%pci, error = %e, "cannot reset the GPU");
            }
            let f = self.sysfs.function(pci).map_err(|_| GateFail::Lost)?;
            if f.vendor == super::sysfs::GONE_VENDOR {
                return Err(GateFail::Failed(
                    "config space reads all ones after a reset".into(),
                ));
            }
        }
        if let Some(why) = needs_reset {
            if let Some(r) = self.nvml.health(pci) {
                if assess(&r) != Verdict::Sound {
                    return Err(GateFail::Failed(format!("{why}, still after a reset")));
                }
            }
        }
        Ok(())
    }

    /// Runs the operator's diagnostic (`{pci}`, `{uuid}` and `{index}` in
    /// its arguments are replaced); a non-zero exit or a timeout fails.
    fn run_diag(&self, pci: &PciAddress) -> Result<(), GateFail> {
        let (uuid, index) = {
            let st = self.lock();
            let n = st.known.get(pci).and_then(|k| k.nvml.clone());
            (
                n.as_ref().map(|n| n.uuid.clone()).unwrap_or_default(),
                n.map(|n| n.index.to_string()).unwrap_or_default(),
            )
        };
        let args: Vec<String> = self
            .cfg
            .gate_command
            .iter()
            .map(|a| {
                a.replace("{pci}", &pci.to_string())
                    .replace("{uuid}", &uuid)
                    .replace("{index}", &index)
            })
            .collect();
        let shown = args.join(" ");
        let mut child = Command::new(&args[0])
            .args(&args[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| GateFail::Failed(format!("cannot run `{shown}`: {e}")))?;
        let limit = Duration::from_secs(self.cfg.gate_command_timeout_secs);
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    let last = err.lines().last().unwrap_or("").trim().to_string();
                    return Err(GateFail::Failed(format!(
                        "`{shown}` failed ({status}): {last}"
                    )));
                }
                Ok(None) if start.elapsed() > limit => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(GateFail::Failed(format!(
                        "`{shown}` ran longer than {}s",
                        limit.as_secs()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(GateFail::Failed(format!("waiting for `{shown}`: {e}"))),
            }
        }
    }
}
