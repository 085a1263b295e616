//! The monitor against the real libvirt and a real TCG guest: the real
//! `DomainStats` (one all-domain stats call) reads CPU time, memory and
//! block counters that move when the guest burns CPU and writes to disk,
//! and the agent's own `/metrics` shows them in the libvirt exporter's
//! names.

use gantry_agent::monitor::domains::{DomainCounters, DomainStats, LibvirtStats};
use gantry_tests::fixture::{require_rig, TestAgent, TestVm, VmOptions};
use std::time::{Duration, Instant};

fn read(stats: &LibvirtStats, domain: &str) -> DomainCounters {
    stats
        .all()
        .expect("all-domain stats")
        .into_iter()
        .find(|d| d.name == domain)
        .unwrap_or_else(|| panic!("domain {domain} is not in the stats"))
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn real_domain_stats_move_with_the_guest() -> anyhow::Result<()> {
    require_rig("real_domain_stats_move_with_the_guest");
    let agent = TestAgent::start_with("[monitor]\ninterval_secs = 1\n")?;
    let image = agent.import_guest_image()?;
    let vm = TestVm::boot(&agent, image.id, &VmOptions::default())?;
    let domain = vm.info()?.domain;
    let stats = LibvirtStats::new(std::env::var("LIBVIRT_DEFAULT_URI")?);

    let before = read(&stats, &domain);
    assert_eq!(before.state, 1, "running: {before:?}");
    assert_eq!(before.vcpus, Some(1), "{before:?}");
    assert!(before.mem_total_bytes() >= 256 << 20, "{before:?}");
    assert!(before.mem_used_bytes() > 0, "{before:?}");
    let vda = |d: &DomainCounters| {
        d.disks
            .iter()
            .find(|x| x.name == "vda")
            .cloned()
            .unwrap_or_else(|| panic!("no vda in {d:?}"))
    };
    assert!(
        vda(&before).rd_bytes > 0,
        "the guest booted from vda: {before:?}"
    );

    vm.sh(
        "t=$(($(date +%s)+2)); while [ $(date +%s) -lt $t ]; do :; done; \
         dd if=/dev/urandom of=/monitor-test bs=1M count=8 conv=fsync 2>/dev/null; sync",
    )?;
    let after = read(&stats, &domain);
    let cpu = after.cpu_time_ns.unwrap() - before.cpu_time_ns.unwrap();
    assert!(cpu >= 1_000_000_000, "2 s of busy loop, {cpu} ns of CPU");
    let written = vda(&after).wr_bytes - vda(&before).wr_bytes;
    assert!(written >= 8 << 20, "8 MiB written, {written} bytes counted");
    assert!(vda(&after).wr_reqs > vda(&before).wr_reqs);

    // The agent's own monitor shows the same domain in the exporter's names.
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = format!(
        "libvirt_domain_block_stats_write_bytes_total{{domain=\"{domain}\",target_device=\"vda\"}}"
    );
    loop {
        let text = agent.get_text("/metrics")?;
        let ok = text.contains("libvirt_up 1")
            && text.contains(&want)
            && text.contains(&format!(
                "gantry_instance_info{{instance_id=\"{}\",domain=\"{domain}\"}} 1",
                vm.id
            ))
            && text.contains(&format!(
                "libvirt_domain_info_cpu_time_seconds_total{{domain=\"{domain}\"}}"
            ));
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics never showed {domain}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}
