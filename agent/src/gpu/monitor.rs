//! Watching GPUs: the poller (rediscovery, NVML health of idle GPUs,
//! samples, AER, the gate), the XID watcher, the passthrough plan of a
//! lease, and the GPU lines of `/metrics`.

use super::health::{assess, xid_action, Verdict, XidAction};
use super::nvml::{GpuSample, XidEvent};
use super::pool::{apply, GpuPool};
use crate::domain_xml::{NumaPin, Passthrough};
use gantry_proto::gpu::{GpuEvent, GpuHealth, GpuHealthKind};
use gantry_proto::validate::PciAddress;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

/// QEMU's default 64-bit PCI hole (32 GiB), the least window asked for.
const MIN_MMIO_WINDOW_MB: u64 = 32 * 1024;

impl GpuPool {
    /// Starts the poller and the XID watcher (no-op without NVML).
    pub fn start(self: &Arc<Self>) {
        if self.nvml.source() == "none" {
            return;
        }
        let me = self.clone();
        let every = Duration::from_secs(self.cfg.poll_secs.max(1));
        let _ = std::thread::Builder::new()
            .name("gpu-poll".into())
            .spawn(move || loop {
                me.poll();
                me.sleep(every);
            });
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("gpu-xid".into())
            .spawn(move || loop {
                if let Some(ev) = me.nvml.next_event(Duration::from_secs(1)) {
                    me.on_xid(ev);
                }
            });
    }

    /// One round: rediscovery, health of idle GPUs, samples, the gate.
    pub fn poll(&self) {
        if let Err(e) = self.discover() {
            tracing::warn!(error = %e, "GPU discovery failed");
        }
        let idle: Vec<(PciAddress, GpuHealth)> = self
            .lock()
            .records
            .iter()
            .filter(|(_, r)| r.instance.is_none())
            .map(|(p, r)| (*p, r.health.clone()))
            .collect();
        for (pci, health) in idle {
            if let Some(s) = self.nvml.sample(&pci) {
                self.lock().samples.insert(pci, s);
            }
            if health != GpuHealth::Healthy {
                continue;
            }
            if let Some(event) = self.idle_fault(&pci) {
                let recheck = matches!(event.1, GpuEvent::Recheck);
                let mut st = self.lock();
                if let Some(rec) = st.records.get_mut(&pci) {
                    if recheck {
                        rec.needs_reset = Some(event.0);
                    }
                    if apply(&pci, rec, event.1) {
                        let _ = self.save(&st);
                    }
                }
            }
        }
        self.run_gates();
    }

    /// A fault on an idle healthy GPU (NVML state or new AER errors).
    fn idle_fault(&self, pci: &PciAddress) -> Option<(String, GpuEvent)> {
        let baseline = self.lock().records.get(pci)?.aer;
        let aer = self.sysfs.aer(pci);
        if aer.fatal > baseline.fatal || aer.nonfatal > baseline.nonfatal {
            let reason = format!(
                "{} new fatal and {} new non-fatal PCIe AER errors",
                aer.fatal - baseline.fatal.min(aer.fatal),
                aer.nonfatal - baseline.nonfatal.min(aer.nonfatal)
            );
            return Some((reason.clone(), GpuEvent::Fault { reason }));
        }
        match assess(&self.nvml.health(pci)?) {
            Verdict::Sound => None,
            Verdict::Lost => Some(("lost".into(), GpuEvent::Lost)),
            Verdict::Quarantine(reason) => Some((reason.clone(), GpuEvent::Fault { reason })),
            Verdict::NeedsReset(reason) => Some((reason, GpuEvent::Recheck)),
        }
    }

    /// A critical XID: counted; then, by the XID table, nothing (the
    /// application's error), a reset through the gate, or quarantine. A
    /// leased GPU keeps serving its instance; the fault fails its next gate.
    pub fn on_xid(&self, ev: XidEvent) {
        let (action, what) = xid_action(ev.xid);
        tracing::warn!(pci = %ev.pci, xid = ?ev.xid, "{what}");
        let mut st = self.lock();
        *st.xids.entry((ev.pci, ev.xid.unwrap_or(999))).or_default() += 1;
        st.last_xid.insert(ev.pci, ev.xid.unwrap_or(999));
        let Some(rec) = st.records.get_mut(&ev.pci) else {
            return;
        };
        let changed = match (action, &rec.health) {
            (XidAction::Application, _) => false,
            (XidAction::Quarantine, GpuHealth::Leased) => {
                rec.faults.push(what);
                true
            }
            (XidAction::Quarantine, _) => apply(&ev.pci, rec, GpuEvent::Fault { reason: what }),
            (XidAction::Reset, GpuHealth::Healthy) => {
                rec.needs_reset = Some(what);
                apply(&ev.pci, rec, GpuEvent::Recheck)
            }
            (XidAction::Reset, _) => {
                rec.needs_reset = Some(what);
                true
            }
        };
        if changed {
            if let Err(e) = self.save(&st) {
                tracing::error!(error = %e, "cannot persist GPU health");
            }
            drop(st);
            self.wake();
        }
    }

    /// How `gpus` are passed through: every function of their IOMMU
    /// groups, a 64-bit MMIO window that fits their BARs, and the NUMA
    /// node(s) to pin to when the host has several.
    pub fn passthrough(&self, gpus: &[PciAddress]) -> Result<Option<Passthrough>, super::GpuError> {
        if gpus.is_empty() {
            return Ok(None);
        }
        let st = self.lock();
        let mut functions = Vec::new();
        let mut nodes = Vec::new();
        for g in gpus {
            let k = st.known.get(g).ok_or(super::GpuError::Unknown(*g))?;
            functions.extend(k.functions.iter().copied());
            if let Some(n) = k
                .func
                .numa_node
                .or(k.nvml.as_ref().and_then(|n| n.numa_node))
            {
                nodes.push(n);
            }
        }
        drop(st);
        functions.sort();
        functions.dedup();
        let mut bars: u64 = 0;
        for f in &functions {
            for b in self.sysfs.bar_sizes(f)? {
                // Each BAR is aligned to its size: sum rounded up to it.
                bars = bars.div_ceil(b) * b + b;
            }
        }
        let mmio_window_mb = (bars.next_power_of_two() >> 20).max(MIN_MMIO_WINDOW_MB);
        nodes.sort();
        nodes.dedup();
        let host_nodes = self.sysfs.numa_nodes();
        let numa = (self.cfg.numa_pinning && host_nodes.len() > 1 && !nodes.is_empty())
            .then(|| NumaPin {
                cpuset: host_nodes
                    .iter()
                    .filter(|(n, _)| nodes.contains(n))
                    .map(|(_, c)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                nodes,
            })
            .filter(|p| !p.cpuset.is_empty());
        Ok(Some(Passthrough {
            functions,
            mmio_window_mb,
            numa,
        }))
    }

    /// The GPU part of `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        let list = self.list();
        render_inventory(out, &list);
        let st = self.lock();
        for (name, help, get) in SAMPLE_GAUGES {
            let _ = writeln!(
                out,
                "# HELP {name} {help} (idle GPUs; leased ones are the guest's)."
            );
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (pci, s) in &st.samples {
                if let Some(v) = get(s) {
                    let _ = writeln!(out, "{name}{{pci=\"{pci}\"}} {v}");
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP gantry_gpu_xid_errors_total Critical XIDs seen, by XID."
        );
        let _ = writeln!(out, "# TYPE gantry_gpu_xid_errors_total counter");
        for ((pci, xid), n) in &st.xids {
            let _ = writeln!(
                out,
                "gantry_gpu_xid_errors_total{{pci=\"{pci}\",xid=\"{xid}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP gantry_gpu_gates_total Health gates run, by result."
        );
        let _ = writeln!(out, "# TYPE gantry_gpu_gates_total counter");
        let _ = writeln!(
            out,
            "gantry_gpu_gates_total{{result=\"passed\"}} {}",
            st.gates_passed
        );
        let _ = writeln!(
            out,
            "gantry_gpu_gates_total{{result=\"failed\"}} {}",
            st.gates_failed
        );
        if let Some(d) = st.last_gate {
            let _ = writeln!(
                out,
                "# HELP gantry_gpu_last_gate_seconds How long the last health gate took."
            );
            let _ = writeln!(out, "# TYPE gantry_gpu_last_gate_seconds gauge");
            let _ = writeln!(out, "gantry_gpu_last_gate_seconds {}", d.as_secs_f64());
        }
    }
}

/// A gauge read from a sample: name, help, getter.
type SampleGauge = (&'static str, &'static str, fn(&GpuSample) -> Option<f64>);

const SAMPLE_GAUGES: [SampleGauge; 5] = [
    (
        "gantry_gpu_utilization_ratio",
        "GPU busy share (0-1).",
        |s| s.utilization_pct.map(|v| f64::from(v) / 100.0),
    ),
    (
        "gantry_gpu_memory_used_bytes",
        "Frame buffer in use.",
        |s| s.memory_used_bytes.map(|v| v as f64),
    ),
    ("gantry_gpu_temperature_celsius", "GPU temperature.", |s| {
        s.temperature_c.map(f64::from)
    }),
    ("gantry_gpu_power_watts", "Power draw.", |s| {
        s.power_mw.map(|v| f64::from(v) / 1000.0)
    }),
    (
        "gantry_gpu_energy_joules_total",
        "Energy since the driver loaded.",
        |s| s.energy_mj.map(|v| v as f64 / 1000.0),
    ),
];

/// `gantry_gpu_info` and `gantry_gpu_health`.
fn render_inventory(out: &mut String, list: &[super::GpuStatus]) {
    let _ = writeln!(out, "# HELP gantry_gpu_info A GPU of this host (value 1).");
    let _ = writeln!(out, "# TYPE gantry_gpu_info gauge");
    for g in list {
        let _ = writeln!(
            out,
            "gantry_gpu_info{{pci=\"{}\",uuid=\"{}\",model=\"{}\",driver=\"{}\",driver_version=\"{}\",vbios=\"{}\"}} 1",
            g.pci,
            esc(g.uuid.as_deref().unwrap_or("")),
            esc(&g.model),
            esc(g.driver.as_deref().unwrap_or("")),
            esc(g.driver_version.as_deref().unwrap_or("")),
            esc(g.vbios.as_deref().unwrap_or(""))
        );
    }
    let _ = writeln!(
        out,
        "# HELP gantry_gpu_health 1 for the GPU's health state, else 0."
    );
    let _ = writeln!(out, "# TYPE gantry_gpu_health gauge");
    for g in list {
        for k in GpuHealthKind::ALL {
            let v = u8::from(g.health.kind() == k);
            let _ = writeln!(
                out,
                "gantry_gpu_health{{pci=\"{}\",state=\"{k}\"}} {v}",
                g.pci
            );
        }
    }
}

/// Escapes a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
