//! The monitor's part of the agent's `/metrics` (Prometheus text format
//! 0.0.4), in the names dashboards already use (docs/monitoring.md):
//!
//! - `gantry_instance_info{instance_id,domain} 1` for every instance;
//! - the libvirt exporter's `libvirt_up` and `libvirt_domain_*` (label
//!   `domain`; `target_device` is the disk, `vda`…, or the NIC, `access`
//!   or `group`);
//! - dcgm-exporter's `DCGM_FI_DEV_*` with `gpu`, `UUID`, `pci_bus_id`,
//!   `device`, `modelName`, `Hostname`, for host-visible GPUs and, with
//!   `gantry_instance`, for the GPUs the guest exporter reports;
//! - `gantry_host_*` and the sender's `gantry_agent_metrics_batches_total`.
//!
//! Everything comes from the latest collection ([`Snapshot`]); a scrape
//! costs no libvirt or NVML call. Label values are escaped.

use super::{nic_name, BatchCounts, Snapshot};
use gantry_proto::metrics::GpuSample;
use std::fmt::Write;
use std::sync::atomic::Ordering;

/// Escapes a Prometheus label value (`\`, `"`, newline).
pub fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn line(out: &mut String, name: &str, labels: &[(&str, &str)], v: f64) {
    let v = if v.is_finite() { v } else { 0.0 };
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, val)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", esc(val));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {v}");
}

/// The whole monitor exposition.
pub fn render(out: &mut String, s: &Snapshot, hostname: &str, counts: &BatchCounts) {
    render_instances(out, s);
    render_domains(out, s);
    render_gpus(out, s, hostname);
    render_host(out, s);
    head(
        out,
        "gantry_agent_metrics_batches_total",
        "counter",
        "Metrics batches sent to the controller, or dropped (never retried).",
    );
    for (outcome, c) in [("sent", &counts.sent), ("dropped", &counts.dropped)] {
        let n = c.load(Ordering::Relaxed) as f64;
        line(
            out,
            "gantry_agent_metrics_batches_total",
            &[("outcome", outcome)],
            n,
        );
    }
}

fn render_instances(out: &mut String, s: &Snapshot) {
    head(
        out,
        "gantry_instance_info",
        "gauge",
        "An instance of this host and its libvirt domain (value 1).",
    );
    for i in &s.instances {
        let id = i.id.to_string();
        line(
            out,
            "gantry_instance_info",
            &[("instance_id", &id), ("domain", &i.domain)],
            1.0,
        );
    }
}

type DomainFigure = (
    &'static str,
    &'static str,
    &'static str,
    fn(&super::DomainCounters) -> Option<f64>,
);

const DOMAIN_FIGURES: [DomainFigure; 5] = [
    (
        "libvirt_domain_info_cpu_time_seconds_total",
        "counter",
        "CPU time the domain used, seconds.",
        |d| d.cpu_time_ns.map(|n| n as f64 / 1e9),
    ),
    (
        "libvirt_domain_info_virtual_cpus",
        "gauge",
        "Virtual CPUs of the domain.",
        |d| d.vcpus.map(f64::from),
    ),
    (
        "libvirt_domain_info_memory_usage_bytes",
        "gauge",
        "Memory the domain uses, bytes.",
        |d| Some(d.mem_used_bytes() as f64),
    ),
    (
        "libvirt_domain_info_maximum_memory_bytes",
        "gauge",
        "The domain's memory size, bytes.",
        |d| Some(d.mem_total_bytes() as f64),
    ),
    (
        "libvirt_domain_info_state",
        "gauge",
        "libvirt's domain state (1 running, 3 paused).",
        |d| Some(f64::from(d.state)),
    ),
];

type DiskFigure = (
    &'static str,
    &'static str,
    fn(&super::domains::DiskCounters) -> u64,
);

const DISK_FIGURES: [DiskFigure; 4] = [
    (
        "libvirt_domain_block_stats_read_bytes_total",
        "Bytes read from the disk.",
        |d| d.rd_bytes,
    ),
    (
        "libvirt_domain_block_stats_write_bytes_total",
        "Bytes written to the disk.",
        |d| d.wr_bytes,
    ),
    (
        "libvirt_domain_block_stats_read_requests_total",
        "Read requests of the disk.",
        |d| d.rd_reqs,
    ),
    (
        "libvirt_domain_block_stats_write_requests_total",
        "Write requests of the disk.",
        |d| d.wr_reqs,
    ),
];

type NicFigure = (
    &'static str,
    &'static str,
    fn(&super::domains::NicCounters) -> u64,
);

fn render_domains(out: &mut String, s: &Snapshot) {
    head(
        out,
        "libvirt_up",
        "gauge",
        "Whether the last libvirt statistics call succeeded.",
    );
    line(out, "libvirt_up", &[], if s.libvirt_up { 1.0 } else { 0.0 });
    for (name, kind, help, get) in DOMAIN_FIGURES {
        head(out, name, kind, help);
        for (_, d) in &s.domains {
            if let Some(v) = get(d) {
                line(out, name, &[("domain", &d.name)], v);
            }
        }
    }
    for (name, help, get) in DISK_FIGURES {
        head(out, name, "counter", help);
        for (_, d) in &s.domains {
            for disk in &d.disks {
                line(
                    out,
                    name,
                    &[("domain", &d.name), ("target_device", &disk.name)],
                    get(disk) as f64,
                );
            }
        }
    }
    let nics: [NicFigure; 2] = [
        (
            "libvirt_domain_interface_stats_receive_bytes_total",
            "Bytes the domain received on the NIC.",
            |n| n.rx_bytes,
        ),
        (
            "libvirt_domain_interface_stats_transmit_bytes_total",
            "Bytes the domain sent on the NIC.",
            |n| n.tx_bytes,
        ),
    ];
    for (name, help, get) in nics {
        head(out, name, "counter", help);
        for (_, d) in &s.domains {
            let mut by_nic: Vec<(&str, u64)> = Vec::new();
            for n in &d.nics {
                let Some(nic) = nic_name(&n.tap) else {
                    continue;
                };
                match by_nic.iter_mut().find(|(k, _)| *k == nic) {
                    Some((_, v)) => *v = v.saturating_add(get(n)),
                    None => by_nic.push((nic, get(n))),
                }
            }
            for (nic, v) in by_nic {
                line(
                    out,
                    name,
                    &[("domain", &d.name), ("target_device", nic)],
                    v as f64,
                );
            }
        }
    }
}

type GpuFigure = (
    &'static str,
    &'static str,
    &'static str,
    fn(&GpuSample) -> Option<f64>,
);

const MIB: f64 = 1024.0 * 1024.0;

/// dcgm-exporter's fields and units.
const GPU_FIGURES: [GpuFigure; 8] = [
    (
        "DCGM_FI_DEV_GPU_UTIL",
        "gauge",
        "GPU utilization (in %).",
        |g| g.util_pct,
    ),
    (
        "DCGM_FI_DEV_FB_USED",
        "gauge",
        "Framebuffer memory used (in MiB).",
        |g| g.mem_used_bytes.map(|b| (b as f64 / MIB).round()),
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "gauge",
        "Framebuffer memory free (in MiB).",
        |g| {
            let (t, u) = (g.mem_total_bytes?, g.mem_used_bytes?);
            Some((t.saturating_sub(u) as f64 / MIB).round())
        },
    ),
    (
        "DCGM_FI_DEV_GPU_TEMP",
        "gauge",
        "GPU temperature (in C).",
        |g| g.temperature_c,
    ),
    (
        "DCGM_FI_DEV_POWER_USAGE",
        "gauge",
        "Power draw (in W).",
        |g| g.power_w,
    ),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        |g| g.energy_j.map(|j| (j * 1000.0).round()),
    ),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "gauge",
        "Value of the last XID error encountered.",
        |g| g.last_xid.map(|x| x as f64),
    ),
    (
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "counter",
        "Total number of double-bit volatile ECC errors.",
        |g| g.ecc_uncorrected.map(|x| x as f64),
    ),
];

fn render_gpus(out: &mut String, s: &Snapshot, hostname: &str) {
    let host = s.host_gpus.iter().map(|g| (None, g));
    let guests = s
        .guest_gpus
        .iter()
        .flat_map(|(id, gs)| gs.iter().map(move |g| (Some(id.to_string()), g)));
    let all: Vec<(Option<String>, &GpuSample)> = host.chain(guests).collect();
    for (name, kind, help, get) in GPU_FIGURES {
        head(out, name, kind, help);
        for (instance, g) in &all {
            let Some(v) = get(g) else { continue };
            let gpu = g.index.to_string();
            let device = format!("nvidia{}", g.index);
            let mut labels = vec![
                ("gpu", gpu.as_str()),
                ("UUID", g.uuid.as_str()),
                ("pci_bus_id", g.pci_bus_id.as_str()),
                ("device", device.as_str()),
                ("modelName", g.model.as_str()),
                ("Hostname", hostname),
            ];
            if let Some(i) = instance {
                labels.push(("gantry_instance", i.as_str()));
            }
            line(out, name, &labels, v);
        }
    }
}

fn render_host(out: &mut String, s: &Snapshot) {
    let h = &s.host;
    let figures: [(&str, &str, &str, f64); 9] = [
        (
            "gantry_host_cpu_utilization_ratio",
            "gauge",
            "Busy share of all cores over the last interval (0-1).",
            s.host_cpu_ratio,
        ),
        (
            "gantry_host_memory_used_bytes",
            "gauge",
            "Host memory in use (total less available).",
            h.mem_used_bytes as f64,
        ),
        (
            "gantry_host_memory_total_bytes",
            "gauge",
            "Host memory.",
            h.mem_total_bytes as f64,
        ),
        (
            "gantry_host_disk_used_bytes",
            "gauge",
            "Used bytes of the state directory's filesystem.",
            h.fs_used_bytes as f64,
        ),
        (
            "gantry_host_disk_total_bytes",
            "gauge",
            "Size of the state directory's filesystem.",
            h.fs_total_bytes as f64,
        ),
        (
            "gantry_host_disk_read_bytes_total",
            "counter",
            "Bytes read from the host's physical disks.",
            h.disk_read_bytes as f64,
        ),
        (
            "gantry_host_disk_written_bytes_total",
            "counter",
            "Bytes written to the host's physical disks.",
            h.disk_written_bytes as f64,
        ),
        (
            "gantry_host_network_receive_bytes_total",
            "counter",
            "Bytes received on the host's physical NICs.",
            h.net_rx_bytes as f64,
        ),
        (
            "gantry_host_network_transmit_bytes_total",
            "counter",
            "Bytes sent on the host's physical NICs.",
            h.net_tx_bytes as f64,
        ),
    ];
    for (name, kind, help, v) in figures {
        head(out, name, kind, help);
        line(out, name, &[], v);
    }
}
