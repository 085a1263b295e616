//! Data volumes as the controller manages them (`GrowVolume`,
//! `DeleteVolume`), over the fake hypervisor with real qcow2 files: a
//! detached volume is grown with qemu-img (and one placed here but never
//! written is created at its grown size), an attached one through its
//! running instance's live `block_resize` (volume record and instance spec
//! updated), never shrunk; a volume in use is not deleted, a detached one
//! is (again: already gone).

use gantry_agent::config::{AgentConfig, DomainType};
use gantry_agent::disks::{self, Format, GIB};
use gantry_agent::hypervisor_fake::FakeHypervisor;
use gantry_agent::manager::{Manager, ManagerError};
use gantry_agent::volumes::VolumeGrowth;
use gantry_proto::api::local::{ActionRequest, DiskKind, ImportImage, OperationState};
use gantry_proto::spec::{InstanceSpec, VolumeSpec};
use gantry_proto::{ImageId, InstanceId, InstanceState, OperationId, VolumeId};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn manager(dir: &Path, hv: &Arc<FakeHypervisor>) -> Arc<Manager> {
    let cfg = AgentConfig {
        state_dir: dir.join("state"),
        domain_type: DomainType::Qemu,
        gpu: Default::default(),
        reserved_memory_mib: 0,
        ..AgentConfig::default()
    };
    Manager::open_with(cfg, gantry_agent::gpu::GpuPool::empty(), hv.clone()).unwrap()
}

fn image(m: &Manager, dir: &Path) -> ImageId {
    let base = dir.join("base.qcow2");
    disks::create_blank(&base, 64 << 20).unwrap();
    let id = ImageId::new();
    gantry_agent::images::import(
        m.layout(),
        &ImportImage {
            id: Some(id),
            name: "base".into(),
            disk: base.display().to_string(),
            kernel: None,
            initrd: None,
            cmdline: None,
        },
    )
    .unwrap();
    id
}

fn wait(m: &Manager, op: OperationId) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let info = m.operation(op).map_err(|e| e.to_string())?;
        match info.state {
            OperationState::Running if start.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            OperationState::Succeeded => return Ok(()),
            _ => return Err(info.error.unwrap_or_else(|| "timed out".into())),
        }
    }
}

fn size_of(m: &Manager, v: VolumeId) -> u64 {
    disks::info(&m.layout().volume_disk(v), Some(Format::Qcow2))
        .unwrap()
        .virtual_size
}

fn resizes(hv: &FakeHypervisor) -> usize {
    hv.calls()
        .iter()
        .filter(|c| c.starts_with("block_resize"))
        .count()
}

#[test]
fn volumes_grow_detached_and_attached_and_delete() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        panic!("qemu-img is required for this test");
    }
    let dir = tempfile::tempdir().unwrap();
    let hv = Arc::new(FakeHypervisor::new());
    let m = manager(dir.path(), &hv);
    let img = image(&m, dir.path());

    // An instance with a 1 GiB data volume, running.
    let (id, attached) = (InstanceId::new(), VolumeId::new());
    let op = m
        .create(InstanceSpec {
            id,
            name: "vm".into(),
            vcpus: 1,
            memory_mib: 64,
            root_disk_gib: 1,
            image: img,
            data_volume: Some(VolumeSpec {
                id: attached,
                size_gib: 1,
            }),
            gpus: vec![],
            nic: None,
            guest: None,
        })
        .unwrap();
    wait(&m, op.id).unwrap();
    assert_eq!(m.record(id).unwrap().state, InstanceState::Running);
    assert_eq!(size_of(&m, attached), GIB);

    // Detached, never written here: the grow creates it at the new size;
    // grown again with qemu-img; never shrunk; a repeat is harmless.
    let detached = VolumeId::new();
    assert!(matches!(
        m.grow_volume(detached, 2).unwrap(),
        VolumeGrowth::Done(_)
    ));
    assert_eq!(size_of(&m, detached), 2 * GIB);
    assert!(matches!(
        m.grow_volume(detached, 3).unwrap(),
        VolumeGrowth::Done(_)
    ));
    assert_eq!(size_of(&m, detached), 3 * GIB);
    let rec = m.layout().load_volume(detached).unwrap().unwrap();
    assert_eq!((rec.size_bytes, rec.attached_to), (3 * GIB, None));
    m.grow_volume(detached, 3).unwrap();
    let e = m.grow_volume(detached, 1).unwrap_err();
    assert!(e.to_string().contains("size_gib"), "{e}");
    assert_eq!(size_of(&m, detached), 3 * GIB);
    assert_eq!(resizes(&hv), 0, "detached volumes are grown offline");

    // Attached: through the running instance's grow-disk, live.
    let how = m.grow_volume(attached, 2).unwrap();
    assert_eq!(how, VolumeGrowth::Through(id));
    let op = m
        .action(
            id,
            ActionRequest::GrowDisk {
                disk: DiskKind::Data,
                size_gib: 2,
            },
        )
        .unwrap();
    wait(&m, op.id).unwrap();
    assert_eq!(resizes(&hv), 1, "{:?}", hv.calls());
    assert_eq!(size_of(&m, attached), 2 * GIB);
    let rec = m.layout().load_volume(attached).unwrap().unwrap();
    assert_eq!((rec.size_bytes, rec.attached_to), (2 * GIB, Some(id)));
    let spec = m.record(id).unwrap().spec;
    assert_eq!(spec.data_volume.unwrap().size_gib, 2);

    // Delete: refused while the instance uses it; a detached one goes,
    // and deleting it again finds nothing to do.
    match m.delete_volume(attached) {
        Err(ManagerError::Conflict(why)) => assert!(why.contains("in use"), "{why}"),
        other => panic!("deleted a volume in use: {other:?}"),
    }
    assert!(m.layout().volume_disk(attached).exists());
    assert!(m.delete_volume(detached).unwrap());
    assert!(!m.layout().volume_disk(detached).exists());
    assert!(m.layout().load_volume(detached).unwrap().is_none());
    assert!(!m.delete_volume(detached).unwrap());

    // Released (the volume kept, detached): now it can be deleted.
    let op = m
        .action(
            id,
            ActionRequest::Release {
                delete_data_volume: false,
            },
        )
        .unwrap();
    wait(&m, op.id).unwrap();
    assert!(m.layout().volume_disk(attached).exists());
    assert!(m.delete_volume(attached).unwrap());
    assert!(!m.layout().volume_disk(attached).exists());
}
