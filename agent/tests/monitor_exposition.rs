//! The agent's `/metrics` with the monitor's part, GPUs from the
//! simulated NVML library (8× H100) and instances from a scripted
//! `DomainStats`: it carries the DCGM and libvirt names, and Prometheus's
//! own checker (`promtool check metrics`, Debian's prometheus package)
//! accepts the whole text.

use gantry_agent::gpu::pool::HostGpuSample;
use gantry_agent::gpu::{self, GpuConfig, GpuSource};
use gantry_agent::monitor::domains::{DiskCounters, DomainCounters, FakeStats, NicCounters};
use gantry_agent::monitor::host::HostReader;
use gantry_agent::monitor::{InstanceRef, Monitor, Sources};
use gantry_proto::InstanceId;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Src {
    pool: Arc<gpu::GpuPool>,
    instances: Vec<InstanceRef>,
}

impl Sources for Src {
    fn instances(&self) -> Vec<InstanceRef> {
        self.instances.clone()
    }
    fn host_gpus(&self) -> Vec<HostGpuSample> {
        self.pool.host_samples()
    }
}

fn domain(name: &str, n: u64) -> DomainCounters {
    DomainCounters {
        name: name.into(),
        state: 1,
        cpu_time_ns: Some(n * 1_000_000_000),
        vcpus: Some(1),
        mem_max_kib: Some(1 << 20),
        mem_rss_kib: Some(1 << 18),
        disks: vec![DiskCounters {
            name: "vda".into(),
            rd_bytes: n << 12,
            wr_bytes: n << 13,
            rd_reqs: n,
            wr_reqs: n,
        }],
        nics: vec![NicCounters {
            tap: "gt-0123456789a".into(),
            rx_bytes: n,
            tx_bytes: n,
        }],
        ..Default::default()
    }
}

/// The exposition, made once per process (NVML is loaded once).
fn exposition() -> String {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(make_exposition).clone()
}

/// The agent's own metrics, the GPU pool's, the monitor's (as `/metrics`
/// assembles them).
fn make_exposition() -> String {
    let sim = tempfile::tempdir().unwrap();
    gantry_nvml_sim::control::init(sim.path(), "h100x8").unwrap();
    std::env::set_var(gantry_nvml_sim::ENV_DIR, sim.path());
    let lib = gantry_nvml_sim::built_library().expect("the simulated NVML library builds");
    let cfg = GpuConfig {
        source: GpuSource::Nvml,
        nvml_library: lib.to_string_lossy().into_owned(),
        sysfs_root: sim.path().join("sys"),
        poll_secs: 1,
        ..GpuConfig::default()
    };
    let state = tempfile::tempdir().unwrap();
    let pool = gpu::open(&cfg, state.path()).unwrap();
    pool.poll();
    let fake = FakeStats::new();
    fake.push(Ok(vec![domain("gantry-a", 1)]));
    fake.push(Ok(vec![domain("gantry-a", 5)]));
    let m = Monitor::new(
        Duration::from_secs(10),
        "gpu-host-1".into(),
        HostReader::new(state.path()),
        Box::new(fake),
    );
    let src = Src {
        pool: pool.clone(),
        instances: vec![InstanceRef {
            id: InstanceId::new(),
            domain: "gantry-a".into(),
            running: true,
            metrics_socket: state.path().join("none.sock"),
        }],
    };
    let t0 = Instant::now();
    m.collect(&src, t0, 1);
    let batch = m
        .collect(&src, t0 + Duration::from_secs(10), 2)
        .expect("a batch");
    batch.check(2).unwrap();
    assert_eq!(batch.host.gpus.len(), 8, "{batch:?}");
    let mut text =
        gantry_agent::metrics::Metrics::default().render(&[("Running", 1)], &Default::default());
    let mut rest = String::new();
    pool.render_metrics(&mut rest);
    m.render(&mut rest);
    match text.rfind("# EOF") {
        Some(at) => text.insert_str(at, &rest),
        None => text.push_str(&rest),
    }
    text
}

#[test]
fn the_exposition_carries_the_dcgm_and_libvirt_names() {
    let text = exposition();
    for name in [
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_DEV_XID_ERRORS",
        "libvirt_up 1",
        "libvirt_domain_info_cpu_time_seconds_total{domain=\"gantry-a\"} 5",
        "libvirt_domain_block_stats_read_bytes_total{domain=\"gantry-a\",target_device=\"vda\"}",
        "libvirt_domain_interface_stats_transmit_bytes_total{domain=\"gantry-a\",target_device=\"access\"} 5",
        "gantry_instance_info{instance_id=\"ins-",
        "gantry_host_cpu_utilization_ratio",
        "gantry_host_memory_total_bytes",
        "gantry_agent_metrics_batches_total{outcome=\"dropped\"} 0",
    ] {
        assert!(text.contains(name), "missing {name:?} in:\n{text}");
    }
    let util = text
        .lines()
        .filter(|l| l.starts_with("DCGM_FI_DEV_GPU_UTIL{"))
        .collect::<Vec<_>>();
    assert_eq!(util.len(), 8, "{util:?}");
    assert!(
        util[0].contains("gpu=\"0\"")
            && util[0].contains("UUID=\"GPU-")
            && util[0].contains("device=\"nvidia0\"")
            && util[0].contains("Hostname=\"gpu-host-1\"")
            && util[0].contains("modelName=\"NVIDIA H100"),
        "{util:?}"
    );
}

#[test]
#[ignore = "needs promtool: ./scripts/test runs it"]
fn promtool_accepts_the_exposition() {
    let text = exposition();
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            panic!("promtool is needed to check the exposition (apt-get install prometheus): {e}")
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // 0: clean; 3: parsed, with lint findings; anything else (1: a
    // parse error) fails.
    let code = out.status.code();
    assert!(
        matches!(code, Some(0) | Some(3)),
        "promtool could not parse the exposition ({code:?}): {said}\n{text}"
    );
    // Every name must lint clean, but for the findings dcgm-exporter's
    // names bring (camelCase labels, counters without `_total`): the
    // dashboards' contract.
    for l in said.lines().filter(|l| !l.trim().is_empty()) {
        let dcgm = l.starts_with("DCGM_FI_DEV_")
            && (l.contains("label names should be written in 'snake_case'")
                || l.contains("counter metrics should have \"_total\" suffix"));
        assert!(dcgm, "promtool finding beyond the DCGM names: {l}\n{said}");
    }
}
