//! The agent driving real libvirt/QEMU guests through their whole life, as
//! an operator and a guest user would see it. Needs the rig (scripts/test
//! provides it); ignored by a plain `cargo test`; `./scripts/test` runs it.

use gantry_proto::api::local::{ActionRequest, DiskKind, OperationInfo, OperationState};
use gantry_proto::spec::VolumeSpec;
use gantry_proto::{InstanceState, VolumeId};
use gantry_tests::fixture::{require_rig, virsh, TestAgent, TestVm, VmOptions};
use std::time::{Duration, Instant};

const GIB: u64 = 1024 * 1024 * 1024;

fn domstate(domain: &str) -> String {
    virsh(&["domstate", domain])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| e.to_string())
}

/// Polls `f` until it returns true or `timeout` passes.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn instance_lifecycle_on_a_real_guest() -> anyhow::Result<()> {
    require_rig("instance_lifecycle_on_a_real_guest");
    let agent = TestAgent::start()?;
    let image = agent.import_guest_image()?;
    let volume = VolumeSpec {
        id: VolumeId::new(),
        size_gib: 1,
    };
    let opts = VmOptions {
        volume: Some(volume),
        ..VmOptions::default()
    };
    let mut vm = TestVm::boot(&agent, image.id, &opts)?;
    let domain = vm.info()?.domain;
    assert_eq!(vm.info()?.state, InstanceState::Running);
    assert_eq!(domstate(&domain), "running");

    // A command in the guest, its output and exit status.
    assert_eq!(vm.sh("echo hello; uname -s")?, "hello\nLinux");
    assert_eq!(vm.exec("echo oops >&2; exit 7")?.status, 7);

    // Files on / and on /datadrive (the data volume, vdb).
    assert!(vm
        .sh("grep ' /datadrive ' /proc/mounts")?
        .starts_with("/dev/vdb"));
    vm.sh("echo on-root > /root-file && echo on-data > /datadrive/data-file && sync")?;

    // Stop (ACPI) and start: both files survive.
    let info = vm.act(ActionRequest::Stop { timeout_secs: None })?;
    assert_eq!(info.state, InstanceState::Stopped);
    assert_eq!(domstate(&domain), "shut off");
    let refused = agent
        .post::<_, OperationInfo>(
            &format!("/v1/instances/{}/actions", vm.id),
            &ActionRequest::Reboot,
        )
        .unwrap_err();
    assert_eq!(refused.status, 409);
    assert_eq!(refused.error, "cannot reboot an instance that is Stopped");
    vm.act(ActionRequest::Start)?;
    vm.wait_next_boot()?;
    assert_eq!(
        vm.sh("cat /root-file /datadrive/data-file")?,
        "on-root\non-data"
    );

    // Graceful reboot, then a hard reset: each is a new boot.
    let boot1 = vm.sh("cat /proc/sys/kernel/random/boot_id")?;
    vm.act(ActionRequest::Reboot)?;
    vm.wait_next_boot()?;
    let boot2 = vm.sh("cat /proc/sys/kernel/random/boot_id")?;
    assert_ne!(boot1, boot2);
    vm.act(ActionRequest::ForceReboot)?;
    vm.wait_next_boot()?;
    let boot3 = vm.sh("cat /proc/sys/kernel/random/boot_id")?;
    assert_ne!(boot2, boot3);
    assert_eq!(vm.info()?.state, InstanceState::Running);

    // Suspend and resume: paused in libvirt, then answering again.
    assert_eq!(
        vm.act(ActionRequest::Suspend)?.state,
        InstanceState::Suspended
    );
    assert_eq!(domstate(&domain), "paused");
    assert_eq!(vm.act(ActionRequest::Resume)?.state, InstanceState::Running);
    assert_eq!(vm.sh("echo awake")?, "awake");

    // Grow the root disk live: the guest sees the new size.
    assert_eq!(vm.sh("cat /sys/block/vda/size")?, (GIB / 512).to_string());
    vm.act(ActionRequest::GrowDisk {
        disk: DiskKind::Root,
        size_gib: 2,
    })?;
    assert!(eventually(Duration::from_secs(30), || {
        vm.sh("cat /sys/block/vda/size").ok() == Some((2 * GIB / 512).to_string())
    }));
    assert_eq!(vm.info()?.root_disk_bytes, 2 * GIB);
    vm.act(ActionRequest::GrowDisk {
        disk: DiskKind::Data,
        size_gib: 2,
    })?;
    assert!(eventually(Duration::from_secs(30), || {
        vm.sh("cat /sys/block/vdb/size").ok() == Some((2 * GIB / 512).to_string())
    }));
    assert_eq!(vm.info()?.data_volume.map(|v| v.size_bytes), Some(2 * GIB));
    let shrink = agent
        .post::<_, OperationInfo>(
            &format!("/v1/instances/{}/actions", vm.id),
            &ActionRequest::GrowDisk {
                disk: DiskKind::Root,
                size_gib: 1,
            },
        )
        .unwrap_err();
    assert_eq!(
        (shrink.status, shrink.field.as_deref()),
        (422, Some("size_gib"))
    );

    // Change type only while stopped; the guest then sees it.
    let running = agent
        .post::<_, OperationInfo>(
            &format!("/v1/instances/{}/actions", vm.id),
            &ActionRequest::ChangeType {
                vcpus: 2,
                memory_mib: 384,
                gpus: None,
                root_disk_gib: None,
            },
        )
        .unwrap_err();
    assert_eq!(
        running.error,
        "cannot change-type an instance that is Running"
    );
    vm.act(ActionRequest::Stop { timeout_secs: None })?;
    vm.act(ActionRequest::ChangeType {
        vcpus: 2,
        memory_mib: 384,
        gpus: None,
        root_disk_gib: None,
    })?;
    vm.act(ActionRequest::Start)?;
    vm.wait_next_boot()?;
    assert_eq!(vm.sh("nproc")?, "2");
    let mem_kib: u64 = vm
        .sh("awk '/MemTotal/ {print $2}' /proc/meminfo")?
        .parse()?;
    assert!(
        (300 * 1024..=384 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} kB"
    );
    assert_eq!(vm.sh("cat /datadrive/data-file")?, "on-data");

    // Release: domain and root disk gone, the data volume kept, detached.
    let instance_dir = agent.state_dir.join("instances").join(vm.id.to_string());
    assert!(instance_dir.join("root.qcow2").exists());
    let info = vm.act(ActionRequest::Release {
        delete_data_volume: false,
    })?;
    assert_eq!(info.state, InstanceState::Released);
    assert!(!instance_dir.exists(), "instance directory left behind");
    assert!(virsh(&["dominfo", &domain]).is_err(), "domain left behind");
    let vol_file = agent
        .state_dir
        .join("volumes")
        .join(format!("{}.qcow2", volume.id));
    assert!(vol_file.exists(), "data volume was deleted");
    let vols: serde_json::Value = agent.get("/v1/volumes")?;
    assert_eq!(vols[0]["id"], volume.id.to_string());
    assert!(vols[0]["attached_to"].is_null());
    let left: Vec<String> = std::fs::read_dir(agent.state_dir.join("instances"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert!(left.is_empty(), "left in instances/: {left:?}");

    // The kept volume attaches to a new instance with its data.
    let vm2 = TestVm::boot(
        &agent,
        image.id,
        &VmOptions {
            name: "second".into(),
            ..opts
        },
    )?;
    assert_eq!(vm2.sh("cat /datadrive/data-file")?, "on-data");
    assert!(
        vm2.exec("cat /root-file")?.status != 0,
        "root disk should be fresh"
    );
    Ok(())
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn agent_killed_and_restarted_reattaches_to_its_vm() -> anyhow::Result<()> {
    require_rig("agent_killed_and_restarted_reattaches_to_its_vm");
    let mut agent = TestAgent::start()?;
    let image = agent.import_guest_image()?;
    let vm = TestVm::boot(&agent, image.id, &VmOptions::default())?;
    let id = vm.id;
    let domain = vm.info()?.domain;
    vm.sh("echo before-crash > /marker && sync")?;
    std::mem::forget(vm); // the handle borrows the agent we are about to kill

    agent.kill9();
    assert_eq!(
        domstate(&domain),
        "running",
        "the VM must outlive the agent"
    );
    agent.spawn()?;

    let mut vm = TestVm::attach(&agent, id)?;
    assert_eq!(vm.info()?.state, InstanceState::Running);
    let all = virsh(&["list", "--all", "--name"])?;
    assert_eq!(
        all.lines().filter(|l| l.trim() == domain).count(),
        1,
        "domain duplicated or lost"
    );
    assert_eq!(vm.sh("cat /marker")?, "before-crash");
    vm.act(ActionRequest::Stop { timeout_secs: None })?;
    vm.act(ActionRequest::Start)?;
    vm.wait_next_boot()?;
    assert_eq!(vm.sh("cat /marker")?, "before-crash");
    Ok(())
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn failed_creates_roll_back_and_bad_input_is_refused() -> anyhow::Result<()> {
    require_rig("failed_creates_roll_back_and_bad_input_is_refused");
    let agent = TestAgent::start()?;
    let image = agent.import_guest_image()?;

    // Authentication.
    assert_eq!(agent.get_with_token("/v1/instances", "wrong"), 401);

    // Bad input names the field; nothing is created.
    let mut spec = TestVm::spec(image.id, &VmOptions::default());
    spec.name = "bad name!".into();
    let e = agent
        .post::<_, OperationInfo>("/v1/instances", &spec)
        .unwrap_err();
    assert_eq!((e.status, e.field.as_deref()), (422, Some("name")));
    let mut spec = TestVm::spec(image.id, &VmOptions::default());
    spec.memory_mib = 4 * 1024 * 1024;
    let e = agent
        .post::<_, OperationInfo>("/v1/instances", &spec)
        .unwrap_err();
    assert!(e.error.starts_with("not enough host memory"), "{e}");
    let mut bad = serde_json::to_value(TestVm::spec(image.id, &VmOptions::default()))?;
    bad["colour"] = "red".into();
    let e = agent
        .post::<_, OperationInfo>("/v1/instances", &bad)
        .unwrap_err();
    assert_eq!(e.status, 422);
    assert!(e.error.contains("colour"), "{e}");

    // A failure midway (the kernel vanished: libvirt cannot start the
    // domain) rolls everything back: no domain, no disk, no new volume.
    let kernel = agent
        .state_dir
        .join("images")
        .join(image.id.to_string())
        .join("vmlinuz");
    let saved = std::fs::read(&kernel)?;
    std::fs::remove_file(&kernel)?;
    let volume = VolumeSpec {
        id: VolumeId::new(),
        size_gib: 1,
    };
    let spec = TestVm::spec(
        image.id,
        &VmOptions {
            volume: Some(volume),
            ..VmOptions::default()
        },
    );
    let op: OperationInfo = agent.post("/v1/instances", &spec)?;
    let done = agent.wait_op(op)?;
    assert_eq!(done.state, OperationState::Failed);
    assert!(
        done.error.as_deref().unwrap_or("").contains("libvirt"),
        "{:?}",
        done.error
    );
    assert_eq!(agent.instance(spec.id)?.state, InstanceState::Failed);
    assert!(
        virsh(&["dominfo", &format!("gantry-{}", spec.id)]).is_err(),
        "domain left behind"
    );
    assert!(!agent
        .state_dir
        .join("instances")
        .join(spec.id.to_string())
        .exists());
    assert!(!agent
        .state_dir
        .join("volumes")
        .join(format!("{}.qcow2", volume.id))
        .exists());

    let metrics = agent.get_text("/metrics")?;
    assert!(
        metrics.contains("gantry_agent_operations_total{kind=\"create\",outcome=\"failed\"} 1"),
        "{metrics}"
    );

    // With the image whole again, the same request works.
    std::fs::write(&kernel, saved)?;
    let vm = TestVm::boot(&agent, image.id, &VmOptions::default())?;
    assert_eq!(vm.sh("echo ok")?, "ok");
    Ok(())
}
