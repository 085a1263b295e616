//! The real bucket mounter (`s3fs`) against the suite's S3 server (moto on
//! loopback), reached through a TCP relay this test can cut: a mount
//! reads and writes the bucket; a missing bucket fails the mount with
//! s3fs's reason; when the endpoint goes away mid-use, reads end in an
//! I/O error within s3fs's timeouts (no hang) and health says so; the
//! mount is removed cleanly. Needs root, FUSE and s3fs.

use gantry_agent::buckets::mounter::{BucketMounter, Health, S3fs, IO_ERROR_WITHIN_SECS};
use gantry_proto::buckets::BucketMount;
use gantry_proto::net::Secret;
use gantry_proto::{InstanceId, StorageConnectionId};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: source .cache/env/s3.env (scripts/setup-s3 writes it)")
    })
}

/// A loopback TCP relay to `to` that refuses and drops every connection
/// once `cut` is set.
fn relay(to: String, cut: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            if cut.load(Ordering::SeqCst) {
                continue; // dropped: closed at once
            }
            let Ok(up) = TcpStream::connect(&to) else {
                continue;
            };
            let pipe = |mut a: TcpStream, mut b: TcpStream, cut: Arc<AtomicBool>| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 << 10];
                    let _ = a.set_read_timeout(Some(Duration::from_millis(200)));
                    loop {
                        if cut.load(Ordering::SeqCst) {
                            let _ = a.shutdown(std::net::Shutdown::Both);
                            let _ = b.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        match a.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => {
                                if b.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(e)
                                if e.kind() == std::io::ErrorKind::WouldBlock
                                    || e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => return,
                        }
                    }
                });
            };
            pipe(c.try_clone().unwrap(), up.try_clone().unwrap(), cut.clone());
            pipe(up, c, cut.clone());
        }
    });
    port
}

fn mount_of(endpoint: &str, bucket: &str) -> BucketMount {
    BucketMount {
        instance: InstanceId::new(),
        connection: StorageConnectionId::new(),
        endpoint: endpoint.into(),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        access_key_id: env("AWS_ACCESS_KEY_ID"),
        secret_access_key: Secret::new(env("AWS_SECRET_ACCESS_KEY")),
        mount_path: "/mnt/x".into(),
        read_only: false,
    }
}

fn passwd(dir: &Path, m: &BucketMount) -> std::path::PathBuf {
    let p = dir.join("c.passwd");
    let line = format!(
        "{}:{}:{}\n",
        m.bucket,
        m.access_key_id,
        m.secret_access_key.expose()
    );
    std::fs::write(&p, line).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
#[ignore = "needs root, FUSE, s3fs and the S3 server: ./scripts/test runs it"]
fn s3fs_mounts_fails_clearly_and_turns_a_dead_endpoint_into_io_errors() {
    let moto = env("AWS_ENDPOINT_URL");
    let to = moto.trim_start_matches("http://").to_string();
    let cut = Arc::new(AtomicBool::new(false));
    let endpoint = format!("http://127.0.0.1:{}", relay(to, cut.clone()));
    let dir = tempfile::tempdir().unwrap();
    let s3fs = S3fs::default();

    // A missing bucket: refused with s3fs's reason, nothing left mounted.
    let at = dir.path().join("missing");
    std::fs::create_dir(&at).unwrap();
    let m = mount_of(&endpoint, "no-such-bucket-gantry");
    let e = s3fs
        .mount(&m, &passwd(dir.path(), &m), &at)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-such-bucket-gantry"), "{e}");
    assert_eq!(s3fs.health(&at), Health::NotMounted);
    assert!(!e.contains(&env("AWS_SECRET_ACCESS_KEY")), "{e}");

    // The suite's bucket: read and write.
    let at = dir.path().join("mnt");
    std::fs::create_dir(&at).unwrap();
    let m = mount_of(&endpoint, "gantry-test");
    s3fs.mount(&m, &passwd(dir.path(), &m), &at)
        .expect("mounted");
    let _unmount = Unmount(at.clone());
    assert_eq!(s3fs.health(&at), Health::Ok);
    let name = format!("mounter-{:x}.txt", rand_u64());
    std::fs::write(at.join(&name), "through s3fs").unwrap();
    assert_eq!(
        std::fs::read_to_string(at.join(&name)).unwrap(),
        "through s3fs"
    );

    // The endpoint goes away: an I/O error, not a hang.
    cut.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(3)); // past the stat cache
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let p = at.join(&name);
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read_to_string(p).map_err(|e| e.to_string()));
    });
    let bound = Duration::from_secs(u64::from(IO_ERROR_WITHIN_SECS));
    let r = rx.recv_timeout(bound).expect("the read ended (no hang)");
    assert!(r.is_err(), "read a dead endpoint: {r:?}");
    eprintln!("dead endpoint: {r:?} after {:?}", start.elapsed());
    assert!(matches!(s3fs.health(&at), Health::Bad(_)));

    // Back: it answers again; unmounted cleanly.
    cut.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while s3fs.health(&at) != Health::Ok {
        assert!(Instant::now() < deadline, "never answered again");
        std::thread::sleep(Duration::from_secs(1));
    }
    std::fs::remove_file(at.join(&name)).unwrap();
    s3fs.unmount(&at).unwrap();
    assert_eq!(s3fs.health(&at), Health::NotMounted);
}

/// Unmounts lazily on the way out, also when an assertion failed.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn rand_u64() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.as_nanos() as u64 ^ u64::from(std::process::id())
}
