//! The Monitor view and `/metrics` of a real cloud (one controller, one
//! agent, one TCG guest): what the crash test checks of monitoring.

use anyhow::Context;
use chrono::{DateTime, Utc};
use gantry_proto::metrics::series;
use gantry_tests::cloud::Cloud;
use gantry_tests::fixture::TestVm;
use gantry_tests::monitor::{check_metrics, last, series as find, view, wait_view, Prometheus};
use std::time::Duration;

/// The guest exporter inside the test guest, on the simulated NVML
/// library with two GPUs (`scripts/build-guest` puts both in the image).
const START_EXPORTER: &str = "GANTRY_NVML_SIM_PROFILE=a6000x2 setsid \
    /usr/bin/gantry-guest-exporter --interval 2 --nvml /usr/lib/gantry/libnvidia-ml-sim.so \
    </dev/null >/tmp/exporter.log 2>&1 &";

fn query(secs: u64) -> String {
    format!("since=10m&step={secs}")
}

/// Burns CPU and writes the disk in the guest and sees both in the view
/// within two intervals; starts the guest exporter and sees the guest's
/// GPUs in the view and in `/metrics`, labelled with the instance; both
/// daemons' `/metrics` pass promtool and carry the DCGM and libvirt names.
pub fn instance_moves_in_the_view(cloud: &Cloud, vm: &TestVm, secs: u64) -> anyhow::Result<()> {
    let id = vm.id.to_string();
    let q = query(secs);
    // Right after its boot marker the guest is still starting services;
    // wait until it idles (its vCPU mostly halted).
    let (idle, _) = wait_view(
        &cloud.tenant,
        &id,
        &q,
        Duration::from_secs(20 * secs + 20),
        "the guest idling (CPU under 40%) in the Monitor view",
        |v| {
            find(v, series::CPU_PCT, &[])
                .is_some_and(|s| s.points.len() >= 2 && last(s) < Some(40.0))
        },
    )?;
    let idle_cpu = find(&idle, series::CPU_PCT, &[])
        .and_then(last)
        .unwrap_or(0.0);

    let started = Utc::now();
    vm.sh(
        "(timeout 30 sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &); \
         dd if=/dev/zero of=/root/monitor.fill bs=64k count=256 conv=fsync 2>/dev/null; echo ok",
    )?;
    let moved = |v: &gantry_proto::metrics::MonitorView| {
        let cpu = find(v, series::CPU_PCT, &[]).and_then(last).unwrap_or(0.0);
        let wrote = find(v, series::DISK_WRITE_BPS, &[]).is_some_and(|s| {
            s.points
                .iter()
                .any(|p| p.t + chrono::Duration::seconds(secs as i64) >= started && p.v > 1e6)
        });
        cpu >= 40.0 && cpu >= idle_cpu + 25.0 && wrote
    };
    // Two intervals, plus the sampling and the POST (a couple of seconds
    // on this 2-core machine), counted from the end of the burst's setup.
    let (_, took) = wait_view(
        &cloud.tenant,
        &id,
        &q,
        Duration::from_secs(2 * secs + 4),
        "the CPU burn and the disk writes showing in the Monitor view",
        moved,
    )?;
    eprintln!("monitor: idle CPU {idle_cpu:.1}%, burn and writes seen after {took:?}");

    vm.sh(START_EXPORTER)?;
    wait_view(
        &cloud.tenant,
        &id,
        &q,
        Duration::from_secs(6 * secs + 10),
        "the guest's GPUs in the Monitor view",
        |v| {
            find(v, series::GPU_UTIL_PCT, &[("gpu", "0")]).is_some()
                && find(v, series::GPU_POWER_W, &[("gpu", "1")]).is_some()
        },
    )
    .with_context(|| {
        vm.sh("cat /tmp/exporter.log")
            .unwrap_or_else(|e| format!("(no exporter log: {e})"))
    })?;

    let agent = cloud.agent.get_text("/metrics")?;
    check_metrics("agent", &agent)?;
    let label = format!("gantry_instance=\"{id}\"");
    for want in [
        "libvirt_domain_info_cpu_time_seconds_total{",
        "libvirt_domain_block_stats_write_bytes_total{",
        "gantry_instance_info{",
    ] {
        anyhow::ensure!(agent.contains(want), "the agent's /metrics lacks {want}");
    }
    anyhow::ensure!(
        agent
            .lines()
            .any(|l| l.starts_with("DCGM_FI_DEV_GPU_UTIL{") && l.contains(&label)),
        "the agent's /metrics has no DCGM_FI_DEV_GPU_UTIL labelled {label}"
    );
    let ctl = cloud.admin.get_text("/metrics")?;
    check_metrics("controller", &ctl)?;
    anyhow::ensure!(
        ctl.contains("gantry_controller_http_request_duration_seconds_bucket{"),
        "the controller's /metrics lacks its API latency histogram"
    );
    anyhow::ensure!(
        !ctl.contains(&id),
        "the controller's /metrics names an instance id (labels must be bounded)"
    );
    Ok(())
}

/// After the controller came back: samples flow again, and none were
/// stored for the time it was down (they were dropped, not queued).
pub fn gap_while_down(
    cloud: &Cloud,
    id: &str,
    down_at: DateTime<Utc>,
    up_at: DateTime<Utc>,
    secs: u64,
) -> anyhow::Result<()> {
    let step = chrono::Duration::seconds(secs as i64);
    let (v, _) = wait_view(
        &cloud.tenant,
        id,
        &query(secs),
        Duration::from_secs(10 * secs + 30),
        "samples after the controller came back",
        |v| find(v, series::CPU_PCT, &[]).is_some_and(|s| s.points.iter().any(|p| p.t >= up_at)),
    )?;
    let cpu = find(&v, series::CPU_PCT, &[]).context("cpu series")?;
    anyhow::ensure!(
        cpu.points.iter().any(|p| p.t < down_at),
        "the samples from before the controller died are gone"
    );
    let second = chrono::Duration::seconds(1);
    let inside: Vec<_> = cpu
        .points
        .iter()
        .filter(|p| p.t > down_at + second && p.t < up_at - step - second)
        .collect();
    anyhow::ensure!(
        inside.is_empty(),
        "samples were stored for the time the controller was down ({down_at} to {up_at}): {inside:?}"
    );
    let again = view(&cloud.tenant, id, &query(secs))?;
    anyhow::ensure!(again.source == gantry_proto::metrics::MonitorSource::Database);
    Ok(())
}

/// A real Prometheus scraping the real agent; the controller restarted
/// (kill -9) with `metrics.prometheus_url` answers the Monitor view from
/// it: the guest's CPU (libvirt names joined to `gantry_instance_info`) and
/// its GPUs (DCGM names labelled with the instance).
pub fn view_from_prometheus(cloud: &mut Cloud, id: &str, secs: u64) -> anyhow::Result<()> {
    let target = cloud
        .agent
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let prom = Prometheus::start(&target)?;
    let mut cfg = std::fs::read_to_string(&cloud.ctl.config)?;
    cfg.push_str(&format!(
        "\n[metrics]\nprometheus_url = {:?}\nprometheus_min_window_secs = 4\n",
        prom.url
    ));
    std::fs::write(&cloud.ctl.config, cfg)?;
    cloud.ctl.kill9();
    cloud.ctl.spawn()?;
    let (v, took) = wait_view(
        &cloud.tenant,
        id,
        &format!("since=2m&step={secs}"),
        Duration::from_secs(60),
        "the Monitor view answered from Prometheus (CPU and the guest's GPUs)",
        |v| {
            v.source == gantry_proto::metrics::MonitorSource::Prometheus
                && find(v, series::CPU_PCT, &[]).and_then(last).is_some()
                && find(v, series::GPU_UTIL_PCT, &[("gpu", "0")]).is_some()
                && find(v, series::GPU_POWER_W, &[("gpu", "1")]).is_some()
        },
    )
    .with_context(|| format!("Prometheus's log: {}", prom.log()))?;
    let cpu = find(&v, series::CPU_PCT, &[])
        .and_then(last)
        .unwrap_or(-1.0);
    anyhow::ensure!(
        (0.0..=100.0).contains(&cpu),
        "CPU from Prometheus out of range: {cpu}"
    );
    eprintln!("monitor: the view from Prometheus after {took:?} (CPU {cpu:.1}%)");
    Ok(())
}
