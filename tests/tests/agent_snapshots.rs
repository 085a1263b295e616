//! Take Snapshot on a real guest through the agent: the guest's root disk
//! switches to a fresh overlay (the guest runs on), the frozen layer (never
//! the data volume) goes into the host's store, or the guest is released;
//! a new instance boots from an image restored from the snapshot.

use gantry_proto::api::local::{
    ImageFromSnapshot, ImageInfo, OperationInfo, OperationState, TakeSnapshot,
};
use gantry_proto::spec::VolumeSpec;
use gantry_proto::{InstanceId, InstanceState, SnapshotId, VolumeId};
use gantry_tests::fixture::{require_rig, virsh, TestAgent, TestVm, VmOptions};

const GIB: u64 = 1024 * 1024 * 1024;

fn take(agent: &TestAgent, id: InstanceId, req: &TakeSnapshot) -> anyhow::Result<OperationInfo> {
    let op: OperationInfo = agent.post(&format!("/v1/instances/{id}/snapshot"), req)?;
    agent.wait_op(op)
}

/// Waits (up to a minute) for the agent's background compaction to report
/// the bytes it saved on `/metrics`.
fn compacted_bytes(agent: &TestAgent) -> anyhow::Result<u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let m = agent.get_text("/metrics")?;
        let saved = m
            .lines()
            .find_map(|l| l.strip_prefix("gantry_agent_store_compacted_bytes_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        if saved > 0 || std::time::Instant::now() > deadline {
            return Ok(saved);
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

fn snap(name: &str, auto_release: bool) -> TakeSnapshot {
    TakeSnapshot {
        name: name.into(),
        owner: Some("acct-alpha".into()),
        auto_release,
    }
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn snapshot_then_boot_a_new_instance_from_it() -> anyhow::Result<()> {
    require_rig("snapshot_then_boot_a_new_instance_from_it");
    // Published fast, so the background compaction has work to show.
    let agent = TestAgent::start_with("store_publish_level = -10")?;
    let image = agent.import_guest_image()?;
    let volume = VolumeSpec {
        id: VolumeId::new(),
        size_gib: 1,
    };
    let vm = TestVm::boot(
        &agent,
        image.id,
        &VmOptions {
            volume: Some(volume),
            ..VmOptions::default()
        },
    )?;
    let domain = vm.info()?.domain;
    vm.sh("echo snap-me > /root-file && echo canary > /datadrive/canary && sync")?;

    // Refusals first: a bad name, and a stopped... (running is fine here).
    let bad = agent
        .post::<_, OperationInfo>(
            &format!("/v1/instances/{}/snapshot", vm.id),
            &snap("no;semicolons", false),
        )
        .unwrap_err();
    assert_eq!((bad.status, bad.field.as_deref()), (422, Some("name")));

    let done = take(&agent, vm.id, &snap("first one", false))?;
    assert_eq!(done.state, OperationState::Succeeded, "{:?}", done.error);
    let result = done.snapshot.expect("a snapshot result");
    assert_eq!(
        result.logical_size, GIB,
        "the root disk, not the 1 GiB + data volume"
    );
    assert!(
        result.stored_bytes > 0 && result.stored_bytes < 64 * 1024 * 1024,
        "{result:?}"
    );
    assert_eq!(vm.info()?.state, InstanceState::Running);
    assert_eq!(
        vm.sh("cat /root-file")?,
        "snap-me",
        "the guest runs on after the snapshot"
    );
    // The guest writes on a fresh overlay now, live and after a restart.
    let blk = virsh(&["domblklist", &domain])?;
    assert!(blk.contains("top-1.qcow2"), "{blk}");
    let inactive = virsh(&["dumpxml", "--inactive", &domain])?;
    assert!(
        inactive.contains("top-1.qcow2"),
        "the persistent definition is not on the active layer: {inactive}"
    );
    vm.sh("echo later > /after-file && sync")?;
    // The snapshot was published at the fast zstd level; the agent then
    // recompresses it in the background and says how much that saved.
    let saved = compacted_bytes(&agent)?;
    assert!(saved > 0, "background compaction saved nothing");

    // An image restored from the snapshot boots a second instance that has
    // the file written before the snapshot, not the one after, and none of
    // the data volume's content.
    let restored: ImageInfo = agent.post(
        "/v1/images/from-snapshot",
        &ImageFromSnapshot {
            id: None,
            name: "from-first".into(),
            snapshot: result.id,
            boot_like: Some(image.id),
        },
    )?;
    assert_eq!(restored.virtual_size, GIB);
    let vm2 = TestVm::boot(
        &agent,
        restored.id,
        &VmOptions {
            name: "restored".into(),
            ..VmOptions::default()
        },
    )?;
    assert_eq!(vm2.sh("cat /root-file")?, "snap-me");
    assert_ne!(vm2.exec("cat /after-file")?.status, 0);
    assert_ne!(
        vm2.exec("cat /datadrive/canary")?.status,
        0,
        "the data volume leaked into the snapshot"
    );
    drop(vm2);

    let unknown = agent
        .post::<_, ImageInfo>(
            "/v1/images/from-snapshot",
            &ImageFromSnapshot {
                id: None,
                name: "nope".into(),
                snapshot: SnapshotId::new(),
                boot_like: None,
            },
        )
        .unwrap_err();
    assert_eq!(unknown.status, 404, "{unknown}");

    // Auto-release: the instance ends Released, its data volume kept.
    let done = take(&agent, vm.id, &snap("last", true))?;
    assert_eq!(done.state, OperationState::Succeeded, "{:?}", done.error);
    assert_eq!(vm.info()?.state, InstanceState::Released);
    assert!(virsh(&["dominfo", &domain]).is_err());
    assert!(agent
        .state_dir
        .join("volumes")
        .join(format!("{}.qcow2", volume.id))
        .exists());
    Ok(())
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn a_failed_snapshot_puts_the_instance_back_to_running() -> anyhow::Result<()> {
    require_rig("a_failed_snapshot_puts_the_instance_back_to_running");
    // A store that cannot be created: every snapshot fails while saving.
    let agent = TestAgent::start_with("snapshot_store = \"/proc/gantry-no-such-store\"")?;
    let image = agent.import_guest_image()?;
    let vm = TestVm::boot(&agent, image.id, &VmOptions::default())?;
    let domain = vm.info()?.domain;
    let done = take(&agent, vm.id, &snap("doomed", false))?;
    assert_eq!(done.state, OperationState::Failed);
    assert!(
        done.error
            .as_deref()
            .unwrap_or("")
            .contains("snapshot store"),
        "{:?}",
        done.error
    );
    assert_eq!(vm.info()?.state, InstanceState::Running);
    assert_eq!(virsh(&["domstate", &domain])?.trim(), "running");
    assert!(virsh(&["domblklist", &domain])?.contains("root.qcow2"));
    assert_eq!(vm.sh("echo still-here")?, "still-here");
    Ok(())
}
