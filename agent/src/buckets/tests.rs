//! [`Buckets`] over the fake mounter: mounts follow the state, failures
//! are reported with their reason, the key pair is only in a 0600 file,
//! restarts adopt what is mounted, released instances lose their share.

use super::mounter::FakeMounter;
use super::*;
use gantry_proto::net::Secret;
use std::os::unix::fs::PermissionsExt;

struct Rig {
    dir: tempfile::TempDir,
    fake: Arc<FakeMounter>,
    b: Buckets,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeMounter::default());
    let b = Buckets::open(dir.path(), fake.clone(), Some("/bin/true".into())).unwrap();
    Rig { dir, fake, b }
}

fn mount(i: InstanceId, c: StorageConnectionId, path: &str) -> BucketMount {
    BucketMount {
        instance: i,
        connection: c,
        endpoint: "http://127.0.0.1:9".into(),
        region: "us-east-1".into(),
        bucket: "data-set".into(),
        access_key_id: "AKID".into(),
        secret_access_key: Secret::new("s3cr3t-value"),
        mount_path: path.into(),
        read_only: false,
    }
}

fn state(rev: u64, mounts: Vec<BucketMount>) -> HostBuckets {
    HostBuckets { rev, mounts }
}

#[test]
fn mounts_follow_the_state_and_the_manifest_lists_them() {
    let r = rig();
    let (i, c) = (InstanceId::new(), StorageConnectionId::new());
    let share = r.b.share_dir(i).unwrap().unwrap();
    r.b.set(state(7, vec![mount(i, c, "/mnt/data")]), &[i])
        .unwrap();
    assert_eq!(r.b.rev(), Some(7));
    assert_eq!(
        r.fake.mounted(),
        vec![(share.join(c.to_string()), "data-set".into())]
    );
    let manifest = std::fs::read_to_string(share.join(MANIFEST)).unwrap();
    assert_eq!(manifest, format!("{c} /mnt/data rw\n"));
    let reports = r.b.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].health, BucketHealth::Mounted);
    // The key pair: only in the 0600 password file, outside the share.
    let passwd = r.dir.path().join(format!("buckets/{i}/{c}.passwd"));
    let mode = std::fs::metadata(&passwd).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        std::fs::read_to_string(&passwd).unwrap(),
        "data-set:AKID:s3cr3t-value\n"
    );
    let state_mode = std::fs::metadata(r.dir.path().join("buckets.json")).unwrap();
    assert_eq!(state_mode.permissions().mode() & 0o777, 0o600);

    // Detach: unmounted, its password file gone, the manifest empty, the
    // share kept (the domain points there).
    r.b.set(state(8, vec![]), &[i]).unwrap();
    assert!(r.fake.mounted().is_empty());
    assert!(!passwd.exists());
    assert_eq!(std::fs::read_to_string(share.join(MANIFEST)).unwrap(), "");
    assert!(share.is_dir());
    assert!(r.b.reports().is_empty());
}

#[test]
fn a_failed_mount_is_reported_with_its_reason_and_retried() {
    let r = rig();
    let (i, c) = (InstanceId::new(), StorageConnectionId::new());
    let share = r.b.share_dir(i).unwrap().unwrap();
    r.fake.set_fail_mount(Some("s3fs: could not connect"));
    r.b.set(state(1, vec![mount(i, c, "/mnt/data")]), &[i])
        .unwrap();
    let rep = r.b.reports();
    assert_eq!(rep[0].health, BucketHealth::Failed);
    assert!(
        rep[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("could not connect"),
        "{rep:?}"
    );
    assert!(!format!("{rep:?}").contains("s3cr3t"));
    assert_eq!(std::fs::read_to_string(share.join(MANIFEST)).unwrap(), "");
    // The endpoint is back: the periodic pass mounts it.
    r.fake.set_fail_mount(None);
    r.b.apply(&[i]);
    assert_eq!(r.b.reports()[0].health, BucketHealth::Mounted);
    assert_eq!(r.fake.mounted().len(), 1);
}

#[test]
fn a_mount_that_stops_answering_stays_listed_and_reports_failed() {
    let r = rig();
    let (i, c) = (InstanceId::new(), StorageConnectionId::new());
    let share = r.b.share_dir(i).unwrap().unwrap();
    r.b.set(state(1, vec![mount(i, c, "/mnt/data")]), &[i])
        .unwrap();
    r.fake.break_mount(&share.join(c.to_string()));
    r.b.apply(&[i]);
    let rep = r.b.reports();
    assert_eq!(rep[0].health, BucketHealth::Failed);
    assert!(rep[0]
        .detail
        .as_deref()
        .unwrap()
        .contains("Input/output error"));
    // Not unmounted: the guest gets I/O errors, not an empty directory.
    assert_eq!(r.fake.mounted().len(), 1);
    assert!(std::fs::read_to_string(share.join(MANIFEST))
        .unwrap()
        .contains("/mnt/data"));
}

#[test]
fn a_failed_unmount_is_retried_and_the_share_of_a_released_instance_goes() {
    let r = rig();
    let (i, c) = (InstanceId::new(), StorageConnectionId::new());
    r.b.share_dir(i).unwrap().unwrap();
    r.b.set(state(1, vec![mount(i, c, "/mnt/data")]), &[i])
        .unwrap();
    r.fake.set_fail_unmount(Some("target is busy"));
    // Released: no longer live, and gone from the state.
    r.b.set(state(2, vec![]), &[]).unwrap();
    assert_eq!(
        r.fake.mounted().len(),
        1,
        "still mounted while unmount fails"
    );
    assert!(r.dir.path().join(format!("buckets/{i}")).exists());
    r.fake.set_fail_unmount(None);
    r.b.apply(&[]);
    assert!(r.fake.mounted().is_empty());
    assert!(!r.dir.path().join(format!("buckets/{i}")).exists());
}

#[test]
fn a_restart_adopts_what_is_mounted_and_rebuilds_what_is_not() {
    let r = rig();
    let (i, c1, c2) = (
        InstanceId::new(),
        StorageConnectionId::new(),
        StorageConnectionId::new(),
    );
    r.b.share_dir(i).unwrap().unwrap();
    r.b.set(
        state(3, vec![mount(i, c1, "/mnt/a"), mount(i, c2, "/mnt/b")]),
        &[i],
    )
    .unwrap();
    // A host reboot lost one mount; the agent starts again from buckets.json.
    let share = r.dir.path().join(format!("buckets/{i}/share"));
    r.fake.unmount(&share.join(c2.to_string())).unwrap();
    let again = Buckets::open(r.dir.path(), r.fake.clone(), Some("/bin/true".into())).unwrap();
    assert_eq!(again.rev(), Some(3));
    let before = r.fake.calls().len();
    again.apply(&[i]);
    let calls = r.fake.calls()[before..].to_vec();
    assert_eq!(
        calls,
        vec![format!(
            "mount data-set {}",
            share.join(c2.to_string()).display()
        )]
    );
    assert!(again
        .reports()
        .iter()
        .all(|x| x.health == BucketHealth::Mounted));
}

#[test]
fn a_changed_attachment_is_remounted_and_a_bad_state_refused() {
    let r = rig();
    let (i, c) = (InstanceId::new(), StorageConnectionId::new());
    r.b.share_dir(i).unwrap().unwrap();
    r.b.set(state(1, vec![mount(i, c, "/mnt/a")]), &[i])
        .unwrap();
    let mut ro = mount(i, c, "/mnt/a");
    ro.read_only = true;
    let before = r.fake.calls().len();
    r.b.set(state(2, vec![ro]), &[i]).unwrap();
    let calls = r.fake.calls()[before..].to_vec();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].starts_with("unmount") && calls[1].starts_with("mount"));
    let bad = state(3, vec![mount(i, c, "/etc/evil")]);
    let e = r.b.set(bad, &[i]).unwrap_err().to_string();
    assert!(e.contains("mounts[0].mount_path"), "{e}");
    assert_eq!(
        r.b.rev(),
        Some(3),
        "seen, so the controller is not asked again"
    );
}

#[test]
fn no_share_without_virtiofsd() {
    let dir = tempfile::tempdir().unwrap();
    let b = Buckets::open(dir.path(), Arc::new(FakeMounter::default()), None).unwrap();
    assert!(b.share_dir(InstanceId::new()).unwrap().is_none());
}

#[test]
fn the_background_pass_mounts_and_runs_once_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeMounter::default());
    let b = Arc::new(Buckets::open(dir.path(), fake.clone(), Some("/bin/true".into())).unwrap());
    let (i, c) = (InstanceId::new(), StorageConnectionId::new());
    b.share_dir(i).unwrap().unwrap();
    // The state arrives while a pass holds the lock: set() waits for it.
    let held = b.applying.lock().unwrap();
    b.lock().desired = state(4, vec![mount(i, c, "/mnt/data")]);
    b.apply_in_background(vec![i]);
    b.apply_in_background(vec![i]); // a no-op: one pass runs
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(fake.mounted().is_empty(), "the pass waits for the lock");
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fake.mounted().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never mounted");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mounts = fake
        .calls()
        .iter()
        .filter(|c| c.starts_with("mount"))
        .count();
    assert_eq!(mounts, 1);
}
