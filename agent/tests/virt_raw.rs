//! The raw libvirt wrappers against a real guest: the building blocks of a
//! live snapshot (disk-only external overlay, active block commit, pivot)
//! and guest-agent freeze, whose absence must be reported clearly.

use gantry_agent::virt_raw::{self, RawError};
use gantry_tests::fixture::{require_rig, virsh, TestAgent, TestVm, VmOptions};
use std::time::{Duration, Instant};

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn overlay_commit_and_pivot_on_a_running_guest() -> anyhow::Result<()> {
    require_rig("overlay_commit_and_pivot_on_a_running_guest");
    let agent = TestAgent::start()?;
    let image = agent.import_guest_image()?;
    let vm = TestVm::boot(&agent, image.id, &VmOptions::default())?;
    let info = vm.info()?;
    let root = agent
        .state_dir
        .join("instances")
        .join(vm.id.to_string())
        .join("root.qcow2");
    let overlay = root.with_file_name("root.live.qcow2");

    let conn = virt::connect::Connect::open(Some(&std::env::var("LIBVIRT_DEFAULT_URI")?))?;
    let dom = conn.lookup_domain_by_name(&info.domain)?;

    // 1. An external disk-only overlay on vda: the guest now writes there.
    let xml = format!(
        "<domainsnapshot><disks><disk name='vda' snapshot='external'><source file='{}'/></disk></disks></domainsnapshot>",
        overlay.display()
    );
    let flags = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
    let t = Instant::now();
    dom.create_snapshot_xml(&xml, flags)?;
    eprintln!("external overlay: {:?}", t.elapsed());
    assert!(virsh(&["domblklist", &info.domain])?.contains("root.live.qcow2"));
    vm.sh("echo while-overlaid > /live-file && sync")?;

    // 2. Commit the overlay back into root.qcow2 while the guest runs.
    assert_eq!(virt_raw::block_job(&dom, "vda")?, None);
    let t = Instant::now();
    virt_raw::block_commit_active(&dom, "vda")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = virt_raw::block_job(&dom, "vda")?.expect("the commit job is running");
        if job.ready() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "commit never became ready: {job:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    virt_raw::pivot_when_ready(&dom, "vda", deadline)?;
    eprintln!("active commit + pivot: {:?}", t.elapsed());
    while virt_raw::block_job(&dom, "vda")?.is_some() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let blk = virsh(&["domblklist", &info.domain])?;
    assert!(
        blk.contains("root.qcow2") && !blk.contains("root.live.qcow2"),
        "{blk}"
    );
    assert_eq!(vm.sh("cat /live-file")?, "while-overlaid");

    // 3. Errors: no guest agent in the test guest, and bad disk names.
    match virt_raw::fs_freeze(&dom) {
        Err(RawError::Libvirt(e)) => assert!(e.message().contains("agent"), "{}", e.message()),
        other => panic!("freeze without a guest agent: {other:?}"),
    }
    assert!(matches!(
        virt_raw::block_job(&dom, "vd\0a"),
        Err(RawError::Nul(_))
    ));
    assert!(matches!(
        virt_raw::block_job(&dom, "vdz"),
        Err(RawError::Libvirt(_))
    ));
    Ok(())
}
