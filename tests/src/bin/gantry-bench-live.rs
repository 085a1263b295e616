//! Live snapshots under TCG (scripts/bench-live-snapshot), through a real
//! agent and test guests:
//!
//! 1. the guest-visible pause over N snapshots (default 20): the largest
//!    gap between the ticks the guest writes to its serial console every
//!    5 ms, as the host receives them, and the agent's own time in
//!    Snapshotting (freeze attempt + disk switch + thaw);
//! 2. snapshot time after 100 MB and after 1 GB of changes on a 4 GiB and
//!    a 16 GiB root disk (pseudo-random data written by the guest to its
//!    root disk beyond its filesystem), with the bytes each snapshot read;
//! 3. time from "create from snapshot" (restore into the image cache) to
//!    the new guest's boot marker.
//!
//! Prints one JSON object. Usage: `gantry-bench-live [snapshots]`.

use anyhow::Context;
use gantry_proto::api::local::{
    ImageFromSnapshot, ImageInfo, OperationInfo, OperationState, SnapshotResult, TakeSnapshot,
};
use gantry_proto::{ImageId, InstanceId};
use gantry_tests::fixture::{TestAgent, TestVm, VmOptions};
use gantry_tests::ticks::Ticks;
use serde_json::json;
use std::time::{Duration, Instant};

fn snapshot(
    agent: &TestAgent,
    id: InstanceId,
    name: &str,
) -> anyhow::Result<(SnapshotResult, Duration)> {
    let t = Instant::now();
    let op: OperationInfo = agent.post(
        &format!("/v1/instances/{id}/snapshot"),
        &TakeSnapshot {
            name: name.into(),
            owner: Some("acct-bench".into()),
            auto_release: false,
        },
    )?;
    let done = agent.wait_op(op)?;
    anyhow::ensure!(done.state == OperationState::Succeeded, "{:?}", done.error);
    Ok((done.snapshot.context("no snapshot result")?, t.elapsed()))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1)]
}

fn summary(v: &mut [f64]) -> serde_json::Value {
    json!({"p50": pct(v, 0.5), "p99": pct(v, 0.99), "max": pct(v, 1.0), "all": v.to_vec()})
}

/// N snapshots of a guest that ticks and keeps writing.
fn pauses(agent: &TestAgent, image: ImageId, n: usize) -> anyhow::Result<serde_json::Value> {
    let vm = TestVm::boot(agent, image, &VmOptions::default())?;
    let ticks = Ticks::listen(std::path::Path::new(&vm.info()?.console_socket))?;
    vm.sh("setsid gantry-guest-web tick /dev/ttyS0 5 </dev/null >/dev/null 2>&1 &")?;
    vm.sh("setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /root/c; usleep 20000; done' </dev/null >/dev/null 2>&1 &")?;
    ticks.wait_flowing(Duration::from_secs(30))?;
    let (mut gaps, mut agent_ms, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        vm.sh(&format!("gantry-guest-web fill /dev/vda 512 4 {}", i + 1))?;
        let t0 = Instant::now();
        let (s, took) = snapshot(agent, vm.id, &format!("pause-{i}"))?;
        let gap = ticks.max_gap(t0, Instant::now()).context("no ticks")?;
        gaps.push(gap.as_secs_f64() * 1e3);
        agent_ms.push(s.pause_ms.unwrap_or_default() as f64);
        totals.push(took.as_secs_f64());
    }
    Ok(json!({
        "snapshots": n,
        "guest_visible_pause_ms": summary(&mut gaps),
        "agent_snapshotting_ms": summary(&mut agent_ms),
        "snapshot_total_s": summary(&mut totals),
    }))
}

/// Snapshot time after `mib` MiB of changes on a `disk_gib` root disk.
fn by_size(agent: &TestAgent, image: ImageId, disk_gib: u64) -> anyhow::Result<serde_json::Value> {
    let vm = TestVm::boot(
        agent,
        image,
        &VmOptions {
            name: format!("disk-{disk_gib}g"),
            root_disk_gib: disk_gib,
            ..VmOptions::default()
        },
    )?;
    // A first snapshot so the next ones measure only their changes.
    snapshot(agent, vm.id, "base")?;
    let mut rows = Vec::new();
    for (k, mib) in [100u64, 1000].into_iter().enumerate() {
        // Beyond the 256 MiB filesystem: raw changes to the root disk.
        vm.sh(&format!(
            "gantry-guest-web fill /dev/vda 512 {mib} {}",
            // Data no other run wrote (the store would deduplicate it).
            100 * disk_gib + k as u64
        ))?;
        let (s, took) = snapshot(agent, vm.id, &format!("after-{mib}m"))?;
        rows.push(json!({
            "changed_mib": mib,
            "seconds": took.as_secs_f64(),
            "read_mib": s.read_bytes as f64 / 1048576.0,
            "new_mib": s.new_bytes as f64 / 1048576.0,
            "pause_ms": s.pause_ms,
        }));
    }
    Ok(json!({"disk_gib": disk_gib, "runs": rows}))
}

/// From "create from snapshot" to the boot marker.
fn from_snapshot(agent: &TestAgent, image: ImageId) -> anyhow::Result<serde_json::Value> {
    let vm = TestVm::boot(agent, image, &VmOptions::default())?;
    vm.sh("gantry-guest-web fill /dev/vda 512 100 9999")?;
    let (s, _) = snapshot(agent, vm.id, "source")?;
    drop(vm);
    let t = Instant::now();
    let img: ImageInfo = agent.post(
        "/v1/images/from-snapshot",
        &ImageFromSnapshot {
            id: None,
            name: "restored".into(),
            snapshot: s.id,
            boot_like: Some(image),
        },
    )?;
    let restored = t.elapsed();
    let _vm = TestVm::boot(
        agent,
        img.id,
        &VmOptions {
            name: "clone".into(),
            ..VmOptions::default()
        },
    )?;
    Ok(json!({
        "restore_s": restored.as_secs_f64(),
        "create_from_snapshot_to_boot_marker_s": t.elapsed().as_secs_f64(),
    }))
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map_or(Ok(20), |a| a.parse())?;
    let agent = TestAgent::start()?;
    let image = agent.import_guest_image()?.id;
    let out = json!({
        "pause": pauses(&agent, image, n)?,
        "by_disk_size": [by_size(&agent, image, 4)?, by_size(&agent, image, 16)?],
        "from_snapshot": from_snapshot(&agent, image)?,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
