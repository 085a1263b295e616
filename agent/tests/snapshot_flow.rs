//! Take Snapshot over the fake hypervisor (domains in memory, QEMU's disk
//! work done with qemu-img), a real store and real qcow2 chains: every
//! snapshot is incremental (bytes read), the chain stays bounded, the
//! content restores exactly, and a failure at each phase -- switch, save,
//! merge, and the undo itself -- or an agent restart mid-snapshot leaves
//! the instance Running on a consistent chain, the snapshot published or
//! not, no orphan overlay, and the next snapshot right.

use gantry_agent::config::{AgentConfig, DomainType};
use gantry_agent::hypervisor_fake::FakeHypervisor;
use gantry_agent::manager::Manager;
use gantry_proto::api::local::{ImportImage, OperationState, SnapshotResult, TakeSnapshot};
use gantry_proto::spec::InstanceSpec;
use gantry_proto::{ImageId, InstanceId, InstanceState, OperationId, SnapshotId};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

struct Rig {
    dir: tempfile::TempDir,
    hv: Arc<FakeHypervisor>,
    m: Arc<Manager>,
    image: ImageId,
}

fn qemu_io(img: &Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn config(dir: &Path, store: Option<PathBuf>) -> AgentConfig {
    AgentConfig {
        state_dir: dir.join("state"),
        domain_type: DomainType::Qemu,
        gpu: Default::default(),
        reserved_memory_mib: 0,
        snapshot_store: store.map(|s| s.display().to_string()),
        ..AgentConfig::default()
    }
}

fn open(dir: &Path, hv: &Arc<FakeHypervisor>, store: Option<PathBuf>) -> Arc<Manager> {
    let gpus = gantry_agent::gpu::GpuPool::empty();
    Manager::open_with(config(dir, store), gpus, hv.clone()).unwrap()
}

impl Rig {
    /// A manager on the fake, an image with 8 MiB of data, one instance.
    fn new() -> (Rig, InstanceId) {
        let dir = tempfile::tempdir().unwrap();
        let hv = Arc::new(FakeHypervisor::new());
        let m = open(dir.path(), &hv, None);
        let base = dir.path().join("base.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M")
            .status()
            .unwrap();
        assert!(st.success());
        qemu_io(&base, "write -P 1 0 8M");
        let image = ImageId::new();
        gantry_agent::images::import(
            m.layout(),
            &ImportImage {
                id: Some(image),
                name: "base".into(),
                disk: base.display().to_string(),
                kernel: None,
                initrd: None,
                cmdline: None,
            },
        )
        .unwrap();
        let rig = Rig { dir, hv, m, image };
        let id = rig.create();
        (rig, id)
    }

    fn create(&self) -> InstanceId {
        let id = InstanceId::new();
        let op = self
            .m
            .create(InstanceSpec {
                id,
                name: "vm".into(),
                vcpus: 1,
                memory_mib: 64,
                root_disk_gib: 1,
                image: self.image,
                data_volume: None,
                gpus: vec![],
                nic: None,
                guest: None,
            })
            .unwrap();
        wait(&self.m, op.id).unwrap();
        assert_eq!(self.m.record(id).unwrap().state, InstanceState::Running);
        id
    }

    fn active(&self, id: InstanceId) -> PathBuf {
        self.m.layout().active_disk(&self.m.record(id).unwrap())
    }

    /// "The guest writes": `len` bytes of `pattern` at `offset`.
    fn write(&self, id: InstanceId, offset: u64, len: u64, pattern: u8) {
        qemu_io(
            &self.active(id),
            &format!("write -P {pattern} {offset} {len}"),
        );
    }

    fn snapshot(&self, id: InstanceId) -> Result<SnapshotResult, String> {
        let sid = SnapshotId::new();
        let req = TakeSnapshot {
            name: "s".into(),
            owner: Some("acct-00000000000000000000000000000001".into()),
            auto_release: false,
        };
        let op = self
            .m
            .snapshot_as(id, req, Some(sid))
            .map_err(|e| e.to_string())?;
        let info = wait(&self.m, op.id)?;
        Ok(info.snapshot.expect("a snapshot result"))
    }

    /// The layer files in the instance's directory.
    fn layers(&self, id: InstanceId) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.m.layout().instance_dir(id))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".qcow2"))
            .collect();
        v.sort();
        v
    }

    /// The snapshot restored to raw bytes.
    fn restored(&self, s: SnapshotId) -> Vec<u8> {
        let store = self.m.open_store().unwrap();
        let out = self.dir.path().join(format!("{s}.raw"));
        store
            .restore(&s.to_string(), &out, gantry_store::RestoreFormat::Raw, None)
            .unwrap();
        std::fs::read(&out).unwrap()
    }

    /// The guest's view of the disk now (the active chain as raw).
    fn current(&self, id: InstanceId) -> Vec<u8> {
        let out = self.dir.path().join("current.raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(self.active(id))
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(&out).unwrap()
    }
}

fn wait(m: &Manager, op: OperationId) -> Result<gantry_proto::api::local::OperationInfo, String> {
    let start = Instant::now();
    loop {
        let info = m.operation(op).map_err(|e| e.to_string())?;
        match info.state {
            OperationState::Running if start.elapsed() < Duration::from_secs(120) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            OperationState::Succeeded => return Ok(info),
            _ => return Err(info.error.unwrap_or_else(|| "timed out".into())),
        }
    }
}

#[test]
fn every_snapshot_is_incremental_and_the_chain_stays_bounded() {
    let (r, id) = Rig::new();
    r.write(id, 20 * MIB, MIB, 2);
    let first = r.snapshot(id).unwrap();
    // Only the chunk that changed on top of the image's manifest was read.
    assert!(first.read_bytes <= 4 * MIB, "{first:?}");
    assert!(first.read_bytes >= MIB, "{first:?}");
    assert_eq!(r.layers(id), ["root.qcow2", "top-1.qcow2"]);
    let mut expected = r.current(id);
    let mut ids = vec![(first.id, expected.clone())];
    for (i, off) in [(3u8, 40 * MIB), (4, 9 * MIB), (5, 21 * MIB), (6, 0)].into_iter() {
        r.write(id, off, 2 * MIB, i);
        let s = r.snapshot(id).unwrap();
        assert!(
            s.read_bytes <= 8 * MIB,
            "snapshot {i} read {} bytes",
            s.read_bytes
        );
        // Three layers at most: the image, root.qcow2, the active one.
        let layers = r.layers(id);
        assert_eq!(layers.len(), 2, "{layers:?}");
        expected = r.current(id);
        ids.push((s.id, expected.clone()));
    }
    for (s, want) in &ids {
        assert!(r.restored(*s) == *want, "snapshot {s} restores other bytes");
    }
    assert_eq!(r.m.record(id).unwrap().state, InstanceState::Running);
}

#[test]
fn a_failed_switch_changes_nothing() {
    let (r, id) = Rig::new();
    r.write(id, 20 * MIB, MIB, 2);
    let before = r.current(id);
    r.hv.fail("disk_snapshot", 0);
    let e = r.snapshot(id).unwrap_err();
    assert!(e.contains("injected"), "{e}");
    assert_eq!(r.m.record(id).unwrap().state, InstanceState::Running);
    assert_eq!(r.layers(id), ["root.qcow2"]);
    assert!(r.m.record(id).unwrap().chain.pending.is_none());
    assert!(r.current(id) == before);
    // A retry works.
    r.snapshot(id).unwrap();
}

#[test]
fn a_failed_save_folds_the_overlay_back_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The store's path is a file: opening it fails once saving starts.
    let bad = dir.path().join("not-a-store");
    std::fs::write(&bad, b"x").unwrap();
    let (r, id) = Rig::new();
    r.write(id, 20 * MIB, MIB, 2);
    r.snapshot(id).unwrap();
    r.write(id, 30 * MIB, MIB, 3);
    let before = r.current(id);
    let good = r.m.config().snapshot_store_url();
    drop(r.m);
    let m = open(r.dir.path(), &r.hv, Some(bad));
    let r = Rig { m, ..r };
    let e = r.snapshot(id).unwrap_err();
    assert!(!e.is_empty());
    assert_eq!(r.m.record(id).unwrap().state, InstanceState::Running);
    assert_eq!(
        r.layers(id),
        ["root.qcow2", "top-1.qcow2"],
        "the fresh overlay is gone"
    );
    assert!(r.current(id) == before, "the guest's view changed");
    // With the store back, the next snapshot holds both writes.
    drop(r.m);
    let m = open(r.dir.path(), &r.hv, Some(PathBuf::from(good)));
    let r = Rig { m, ..r };
    let s = r.snapshot(id).unwrap();
    assert!(r.restored(s.id) == before);
}

#[test]
fn a_failed_merge_leaves_a_longer_chain_the_next_snapshot_merges() {
    let (r, id) = Rig::new();
    r.write(id, 20 * MIB, MIB, 2);
    r.snapshot(id).unwrap();
    r.write(id, 30 * MIB, MIB, 3);
    r.hv.fail("block_commit", 0);
    let s2 = r.snapshot(id).unwrap();
    assert_eq!(r.layers(id), ["root.qcow2", "top-1.qcow2", "top-2.qcow2"]);
    assert!(r.restored(s2.id) == r.current(id));
    r.write(id, 40 * MIB, MIB, 4);
    let s3 = r.snapshot(id).unwrap();
    assert!(s3.read_bytes <= 4 * MIB, "{s3:?}");
    assert_eq!(r.layers(id), ["root.qcow2", "top-3.qcow2"]);
    assert!(r.restored(s3.id) == r.current(id));
}

#[test]
fn a_failed_undo_reads_the_whole_disk_next_time() {
    let (r, id) = Rig::new();
    r.write(id, 20 * MIB, MIB, 2);
    let bad = r.dir.path().join("not-a-store");
    std::fs::write(&bad, b"x").unwrap();
    let good = r.m.config().snapshot_store_url();
    drop(r.m);
    let r = Rig {
        m: open(r.dir.path(), &r.hv, Some(bad)),
        ..r
    };
    r.hv.fail("block_commit", 0);
    assert!(r.snapshot(id).is_err());
    assert_eq!(r.m.record(id).unwrap().state, InstanceState::Running);
    drop(r.m);
    let r = Rig {
        m: open(r.dir.path(), &r.hv, Some(PathBuf::from(good))),
        ..r
    };
    let s = r.snapshot(id).unwrap();
    assert!(
        s.read_bytes >= 8 * MIB,
        "a full read after an unclear chain: {s:?}"
    );
    assert!(r.restored(s.id) == r.current(id));
}

#[test]
fn a_restart_mid_snapshot_undoes_or_finishes_it() {
    use gantry_agent::hypervisor::Hypervisor;
    let (r, id) = Rig::new();
    r.write(id, 20 * MIB, MIB, 2);
    r.snapshot(id).unwrap();
    r.write(id, 30 * MIB, MIB, 3);
    let view = r.current(id);
    // Crash in Saving: switched, not published.
    let name = format!("gantry-{id}");
    let fresh = r.m.layout().layer(id, "top-9.qcow2");
    r.hv.disk_snapshot(&name, "vda", &fresh).unwrap();
    let journal = format!(
        r#"{{"snapshot":"{}","phase":"Saving","frozen":"top-1.qcow2","active":"top-9.qcow2"}}"#,
        SnapshotId::new()
    );
    edit_record(&r, id, |rec| {
        rec["chain"]["pending"] = serde_json::from_str(&journal).unwrap();
        rec["chain"]["active"] = "top-9.qcow2".into();
        rec["state"] = "Snapshotting".into();
    });
    drop(r.m);
    let r = Rig {
        m: open(r.dir.path(), &r.hv, None),
        ..r
    };
    let rec = r.m.record(id).unwrap();
    assert!(rec.chain.pending.is_none());
    assert_eq!(rec.chain.active.as_deref(), Some("top-1.qcow2"));
    assert_eq!(rec.state, InstanceState::Running);
    assert_eq!(
        r.layers(id),
        ["root.qcow2", "top-1.qcow2"],
        "no orphan overlay"
    );
    assert!(r.current(id) == view);
    // An orphan overlay made just before a crash is removed at start.
    std::fs::write(r.m.layout().layer(id, "top-7.qcow2"), b"junk").unwrap();
    drop(r.m);
    let r = Rig {
        m: open(r.dir.path(), &r.hv, None),
        ..r
    };
    assert_eq!(r.layers(id), ["root.qcow2", "top-1.qcow2"]);
    let s = r.snapshot(id).unwrap();
    assert!(s.read_bytes <= 4 * MIB, "still incremental: {s:?}");
    assert!(r.restored(s.id) == r.current(id));
}

/// Rewrites the instance record on disk (as a crash would have left it).
fn edit_record(r: &Rig, id: InstanceId, f: impl FnOnce(&mut serde_json::Value)) {
    let p = r.m.layout().instance_record(id);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn stopped_instances_are_saved_as_they_are_and_stay_incremental() {
    let (r, id) = Rig::new();
    r.write(id, 20 * MIB, MIB, 2);
    let op =
        r.m.action(
            id,
            gantry_proto::api::local::ActionRequest::Stop {
                timeout_secs: Some(1),
            },
        )
        .unwrap();
    wait(&r.m, op.id).unwrap();
    let s1 = r.snapshot(id).unwrap();
    assert_eq!(s1.pause_ms, None);
    assert!(r.restored(s1.id) == r.current(id));
    r.write(id, 30 * MIB, MIB, 3);
    let s2 = r.snapshot(id).unwrap();
    assert!(s2.read_bytes <= 4 * MIB, "{s2:?}");
    assert!(r.restored(s2.id) == r.current(id));
    assert_eq!(r.layers(id).len(), 2, "{:?}", r.layers(id));
    assert_eq!(r.m.record(id).unwrap().state, InstanceState::Stopped);
}

#[test]
fn garbage_collection_after_a_delete_frees_the_bytes() {
    let (r, id) = Rig::new();
    r.write(id, 20 * MIB, MIB, 2);
    let keep = r.snapshot(id).unwrap();
    let kept = r.current(id);
    r.write(id, 30 * MIB, 3 * MIB, 3);
    let gone = r.snapshot(id).unwrap();
    assert!(gone.new_bytes > 0);
    assert_eq!(r.m.gc_store(), 0, "nothing is garbage while both exist");
    r.m.delete_snapshot(gone.id).unwrap();
    let freed = r.m.gc_store();
    assert!(
        freed > 0 && freed >= gone.new_bytes / 2,
        "freed {freed} of {}",
        gone.new_bytes
    );
    assert!(r.m.render_metrics().contains(&format!(
        "gantry_agent_store_gc_reclaimed_bytes_total {freed}"
    )));
    assert!(
        r.restored(keep.id) == kept,
        "the kept snapshot still restores"
    );
}

#[test]
fn filesystems_are_frozen_around_the_switch_when_the_guest_has_an_agent() {
    let (r, id) = Rig::new();
    // No guest agent: crash-consistent, and the result says so.
    r.write(id, 20 * MIB, MIB, 2);
    let plain = r.snapshot(id).unwrap();
    assert!(!plain.frozen, "{plain:?}");

    // With one: freeze, switch, thaw, in that order; the result says frozen.
    r.hv.with_guest_agent(true);
    r.write(id, 30 * MIB, MIB, 3);
    let before = r.hv.calls().len();
    let s = r.snapshot(id).unwrap();
    assert!(s.frozen, "{s:?}");
    let calls = r.hv.calls()[before..].to_vec();
    let at = |what: &str| {
        calls
            .iter()
            .position(|c| c.starts_with(what))
            .unwrap_or_else(|| panic!("no {what} in {calls:?}"))
    };
    assert!(
        at("guest_agent:Freeze") < at("disk_snapshot")
            && at("disk_snapshot") < at("guest_agent:Thaw"),
        "{calls:?}"
    );
    assert!(r.restored(s.id) == r.current(id));

    // A freeze that fails does not fail the snapshot: crash-consistent.
    r.hv.fail("guest_agent:Freeze", 0);
    r.write(id, 40 * MIB, MIB, 4);
    let c = r.snapshot(id).unwrap();
    assert!(!c.frozen, "{c:?}");
    assert!(r.restored(c.id) == r.current(id));
    assert_eq!(r.m.record(id).unwrap().state, InstanceState::Running);
}
