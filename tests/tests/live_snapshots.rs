//! Live, incremental snapshots on a real TCG guest through the agent. The
//! guest ticks on its serial console every 5 ms and rewrites a counter on
//! its root disk in a loop throughout; markers on `/` and a canary on
//! `/datadrive`; snapshot; more writes; snapshot again. Asserted: the guest
//! was paused only briefly (the largest gap between ticks as the host
//! receives them), the second snapshot read only what was written since
//! the first, instances from each snapshot hold exactly the markers written
//! before it (and none of the data volume), the canary is in no restored
//! image; an agent killed -9 while saving or while merging leaves, once
//! restarted, the guest running on a consistent chain, and the next
//! snapshot works.

use gantry_proto::api::local::{
    ImageFromSnapshot, ImageInfo, OperationInfo, OperationState, SnapshotResult, TakeSnapshot,
};
use gantry_proto::spec::VolumeSpec;
use gantry_proto::{InstanceId, InstanceState, SnapshotId, VolumeId};
use gantry_tests::fixture::{require_rig, workspace_bin, TestAgent, TestVm, VmOptions};
use gantry_tests::ticks::Ticks;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The target for the guest-visible pause.
const PAUSE_TARGET: Duration = Duration::from_millis(100);
/// What the test tolerates on a loaded 2-core CI machine under TCG; the
/// benchmark measures the p99 against the target.
const PAUSE_LIMIT: Duration = Duration::from_millis(500);
const CANARY: &str = "datadrive-canary-3f9b2c7e1d4a8f6b0c5e9a2d7f1b4e8c";

fn snapshot(agent: &TestAgent, id: InstanceId, name: &str) -> anyhow::Result<SnapshotResult> {
    let op: OperationInfo = agent.post(
        &format!("/v1/instances/{id}/snapshot"),
        &TakeSnapshot {
            name: name.into(),
            owner: Some("acct-live".into()),
            auto_release: false,
        },
    )?;
    let done = agent.wait_op(op)?;
    anyhow::ensure!(done.state == OperationState::Succeeded, "{:?}", done.error);
    done.snapshot
        .ok_or_else(|| anyhow::anyhow!("no snapshot result"))
}

fn boot_from<'a>(
    agent: &'a TestAgent,
    s: SnapshotId,
    like: gantry_proto::ImageId,
    name: &str,
) -> anyhow::Result<TestVm<'a>> {
    let img: ImageInfo = agent.post(
        "/v1/images/from-snapshot",
        &ImageFromSnapshot {
            id: None,
            name: name.into(),
            snapshot: s,
            boot_like: Some(like),
        },
    )?;
    TestVm::boot(
        agent,
        img.id,
        &VmOptions {
            name: name.into(),
            volume: Some(VolumeSpec {
                id: VolumeId::new(),
                size_gib: 1,
            }),
            ..VmOptions::default()
        },
    )
}

/// Restores `s` to raw with the agent's CLI and says whether `needle` is
/// anywhere in it.
fn restored_contains(agent: &TestAgent, s: SnapshotId, needle: &[u8]) -> anyhow::Result<bool> {
    let out = agent.state_dir.join(format!("{s}.raw"));
    let st = std::process::Command::new(workspace_bin("gantry-agent"))
        .args(["snapshot", "restore", "--format", "raw", "--store"])
        .arg(agent.state_dir.join("snapshots"))
        .arg("--keyring")
        .arg(agent.state_dir.join("store-keys.json"))
        .arg("--id")
        .arg(s.to_string())
        .arg("--out")
        .arg(&out)
        .output()?;
    anyhow::ensure!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let data = std::fs::read(&out)?;
    let _ = std::fs::remove_file(&out);
    Ok(data.windows(needle.len()).any(|w| w == needle))
}

/// Starts the tick and counter loops in the guest.
fn start_loops(vm: &TestVm) -> anyhow::Result<()> {
    vm.sh("setsid gantry-guest-web tick /dev/ttyS0 5 </dev/null >/dev/null 2>&1 &")?;
    vm.sh(
        "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /root/counter.new && \
         mv /root/counter.new /root/counter; usleep 20000; done' </dev/null >/dev/null 2>&1 &",
    )?;
    Ok(())
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn live_snapshots_on_a_real_guest() -> anyhow::Result<()> {
    require_rig("live_snapshots_on_a_real_guest");
    let mut agent = TestAgent::start()?;
    let image = agent.import_guest_image()?;
    let vm = TestVm::boot(
        &agent,
        image.id,
        &VmOptions {
            volume: Some(VolumeSpec {
                id: VolumeId::new(),
                size_gib: 1,
            }),
            ..VmOptions::default()
        },
    )?;
    let id = vm.id;
    let ticks = Ticks::listen(std::path::Path::new(&vm.info()?.console_socket))?;
    start_loops(&vm)?;
    ticks.wait_flowing(Duration::from_secs(30))?;

    // 16 MiB of new data and a marker before the first snapshot.
    vm.sh(&format!(
        "head -c 16777216 /dev/urandom > /root/blob1 && echo m1 > /root/marker1 && \
         for i in $(seq 64); do echo {CANARY}; done > /datadrive/canary && sync"
    ))?;
    let t0 = Instant::now();
    let s1 = snapshot(&agent, id, "first")?;
    let gap1 = ticks.max_gap(t0, Instant::now()).unwrap_or_default();
    // 1 MiB and a second marker before the second.
    vm.sh("head -c 1048576 /dev/urandom > /root/blob2 && echo m2 > /root/marker2 && sync")?;
    let t1 = Instant::now();
    let s2 = snapshot(&agent, id, "second")?;
    let gap2 = ticks.max_gap(t1, Instant::now()).unwrap_or_default();
    eprintln!(
        "first: {s1:?}, largest tick gap {gap1:?}\nsecond: {s2:?}, largest tick gap {gap2:?}"
    );

    // Incremental: the first read its 16 MiB (on top of the image), the
    // second only what changed since.
    assert!(s1.read_bytes >= 16 * MIB, "{s1:?}");
    assert!(
        s2.read_bytes < s1.read_bytes,
        "second read {} of {}",
        s2.read_bytes,
        s1.read_bytes
    );
    // Paused briefly: the switch, not the save.
    for (s, gap) in [(&s1, gap1), (&s2, gap2)] {
        let pause = Duration::from_millis(s.pause_ms.unwrap_or(u64::MAX));
        assert!(
            pause <= PAUSE_LIMIT,
            "the agent paused the guest for {pause:?}"
        );
        assert!(gap <= PAUSE_LIMIT, "the guest's ticks stopped for {gap:?}");
        if gap > PAUSE_TARGET {
            eprintln!("note: a tick gap of {gap:?} is above the {PAUSE_TARGET:?} target");
        }
    }
    assert_eq!(vm.info()?.state, InstanceState::Running);
    // Only the root disk switched layers: the data volume is its own file.
    let blk = gantry_tests::fixture::virsh(&["domblklist", &vm.info()?.domain])?;
    let vdb = blk
        .lines()
        .find(|l| l.trim_start().starts_with("vdb"))
        .unwrap_or("");
    assert!(
        vdb.trim_end().ends_with(".qcow2"),
        "the data volume was switched: {blk}"
    );
    let counter: u64 = vm.sh("cat /root/counter")?.trim().parse()?;
    assert!(counter > 10, "the guest's loop stalled: {counter}");

    // Each snapshot holds exactly what was written before it.
    for (s, want_m2) in [(s1.id, false), (s2.id, true)] {
        let clone = boot_from(&agent, s, image.id, "clone")?;
        assert_eq!(clone.sh("cat /root/marker1")?, "m1");
        assert_eq!(clone.exec("cat /root/marker2")?.status == 0, want_m2, "{s}");
        assert!(clone.sh("cat /root/counter")?.trim().parse::<u64>().is_ok());
        assert_ne!(
            clone
                .exec("grep -q datadrive-canary /datadrive/canary")?
                .status,
            0
        );
    }
    // The data volume's canary is in no restored image.
    for s in [s1.id, s2.id] {
        assert!(
            !restored_contains(&agent, s, CANARY.as_bytes())?,
            "canary in {s}"
        );
    }

    // Killed while saving: undone at restart (nothing published).
    vm.sh("head -c 8388608 /dev/urandom > /root/blob3 && sync")?;
    std::mem::forget(vm); // the handle borrows the agent we are about to kill
    kill_in_phase(&mut agent, id, "Saving")?;
    let vm = TestVm::attach(&agent, id)?;
    assert_eq!(vm.info()?.state, InstanceState::Running);
    assert_eq!(vm.sh("echo alive")?, "alive");
    let s3 = snapshot(&agent, id, "after-restart")?;
    assert!(
        s3.read_bytes >= 8 * MIB,
        "the undone snapshot's data is in the next one: {s3:?}"
    );

    // Killed while merging: the snapshot was published and stays.
    vm.sh("echo m4 > /root/marker4 && sync")?;
    std::mem::forget(vm);
    let published = kill_in_phase(&mut agent, id, "Merging")?;
    let vm = TestVm::attach(&agent, id)?;
    assert_eq!(vm.sh("echo alive")?, "alive");
    let layers = std::fs::read_dir(agent.state_dir.join("instances").join(id.to_string()))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
        .count();
    assert_eq!(
        layers, 2,
        "root.qcow2 and the active layer, nothing orphaned"
    );
    let s5 = snapshot(&agent, id, "after-merge-restart")?;
    assert!(s5.read_bytes <= 8 * MIB, "still incremental: {s5:?}");
    let clone = boot_from(&agent, published, image.id, "merged")?;
    assert_eq!(clone.sh("cat /root/marker4")?, "m4");
    drop(clone);
    drop(vm);
    Ok(())
}

/// Starts a snapshot with the agent told to wait in `phase`, kills it -9
/// there, and restarts it. Returns the snapshot's id.
fn kill_in_phase(agent: &mut TestAgent, id: InstanceId, phase: &str) -> anyhow::Result<SnapshotId> {
    agent.kill9();
    agent.env = vec![("GANTRY_FAILPOINT_SNAPSHOT".into(), format!("{phase}:60000"))];
    agent.spawn()?;
    let sid = SnapshotId::new();
    let op: OperationInfo = agent.post(
        &format!("/v1/instances/{id}/snapshot"),
        &TakeSnapshot {
            name: format!("killed-in-{phase}"),
            owner: Some("acct-live".into()),
            auto_release: false,
        },
    )?;
    let record = agent
        .state_dir
        .join("instances")
        .join(id.to_string())
        .join("instance.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&record)?;
        if text.contains(&format!("\"phase\": \"{phase}\"")) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the snapshot never reached {phase} ({op:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&record)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let snap: SnapshotId = v["chain"]["pending"]["snapshot"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .unwrap_or(sid);
    agent.kill9();
    agent.env.clear();
    agent.spawn()?;
    Ok(snap)
}
