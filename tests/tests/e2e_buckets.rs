//! Buckets as directories end to end (docs/buckets.md), through a real
//! controller, a real agent (s3fs on the host, virtiofs into the guest)
//! and one real TCG guest, against the suite's S3 server (moto, loopback):
//! a bucket created and attached with `gantryctl`; a file written in the
//! guest is in the bucket (read with an S3 client, boto3); an object put
//! into the bucket shows in the guest; the mount survives an agent kill -9
//! and a stop/start; detach unmounts it in the guest and on the host;
//! reattached read-only elsewhere, writes are refused; a snapshot of the
//! instance holds none of the bucket's bytes (its disk restored and
//! searched, with the root disk's own marker found as a control); an
//! attach to a bucket that is gone is refused with what is wrong; after
//! release the objects are still in the bucket and the host's mounts gone.
//! Wrong credentials against a signature-checking server:
//! `controller/tests/buckets.rs`.

use anyhow::{bail, ensure, Context};
use gantry_proto::InstanceId;
use gantry_tests::cloud::Cloud;
use gantry_tests::controller::Database;
use gantry_tests::fixture::{require_rig, workspace_bin, TestVm};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a change may take to show (the guest's loop looks every
/// second, s3fs caches stats for 2 s, TCG is slow).
const SHOW: Duration = Duration::from_secs(60);

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: source .cache/env/s3.env (scripts/setup-s3 writes it)")
    })
}

/// boto3 from the S3 server's venv: a real S3 client on the host.
fn s3(op: &str, bucket: &str, key: &str, body: &str) -> anyhow::Result<String> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/s3/venv/bin/python");
    ensure!(
        py.exists(),
        "{} is missing: run scripts/setup-s3",
        py.display()
    );
    let script = r#"
import sys, boto3
op, bucket, key, body = sys.argv[1:5]
s3 = boto3.client("s3")
if op == "get":
    sys.stdout.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode())
elif op == "put":
    s3.put_object(Bucket=bucket, Key=key, Body=body.encode())
elif op == "delete-bucket":
    for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=o["Key"])
    s3.delete_bucket(Bucket=bucket)
"#;
    let out = Command::new(py)
        .args(["-c", script, op, bucket, key, body])
        .output()?;
    ensure!(
        out.status.success(),
        "S3 {op} {bucket}/{key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn gantryctl(cloud: &Cloud, args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new(workspace_bin("gantryctl"))
        .arg("--json")
        .args(args)
        .env("GANTRY_URL", &cloud.ctl.url)
        .env("GANTRY_TOKEN", &cloud.tenant_token)
        .env("GANTRY_S3_SECRET_ACCESS_KEY", env("AWS_SECRET_ACCESS_KEY")?)
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() {
        bail!(
            "gantryctl {args:?}: {v} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(v)
}

/// Waits until `check` holds, naming `what` on a timeout.
fn eventually(what: &str, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + SHOW;
    let mut last = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e.to_string()),
        }
        if Instant::now() > deadline {
            bail!("{what} within {SHOW:?} (last error: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn mounted_in_guest(vm: &TestVm, path: &str) -> anyhow::Result<bool> {
    Ok(vm.exec(&format!("grep -q ' {path} ' /proc/mounts"))?.status == 0)
}

fn health(cloud: &Cloud, id: &str) -> anyhow::Result<Value> {
    Ok(cloud.tenant.get(&format!("/v1/instances/{id}/buckets"))?)
}

/// Whether `needle` occurs in the file (read in pieces).
fn file_contains(path: &Path, needle: &[u8]) -> anyhow::Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 8 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(needle.len()).any(|w| w == needle) {
            return Ok(true);
        }
        let keep = carry.len().saturating_sub(needle.len());
        carry.drain(..keep);
    }
}

/// Restores snapshot `sid` from the host's store to a raw file.
fn restore(cloud: &Cloud, sid: &str, out: &Path) -> anyhow::Result<()> {
    let state = &cloud.agent.state_dir;
    let o = Command::new(workspace_bin("gantry-agent"))
        .args(["snapshot", "restore", "--store"])
        .arg(state.join("snapshots"))
        .arg("--keyring")
        .arg(state.join("store-keys.json"))
        .args(["--id", sid, "--out"])
        .arg(out)
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(())
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn a_bucket_is_a_directory_in_the_guest() -> anyhow::Result<()> {
    require_rig("a_bucket_is_a_directory_in_the_guest");
    let endpoint = env("AWS_ENDPOINT_URL")?;
    let key_id = env("AWS_ACCESS_KEY_ID")?;
    let mut cloud = Cloud::start(&Database::Sqlite)?;
    let bucket = format!("e2e-{}", &uuid_tail());
    let conn = gantryctl(
        &cloud,
        &[
            "bucket",
            "connect",
            "data",
            "--endpoint",
            &endpoint,
            "--bucket",
            &bucket,
            "--access-key-id",
            &key_id,
            "--create",
        ],
    )?;
    let conn = conn["id"].as_str().context("connection id")?.to_string();
    let id =
        cloud.create(json!({"name": "trainer", "flavor": cloud.flavor, "image": cloud.image}))?;
    cloud.wait_state(&id, "Running")?;
    let ins: InstanceId = id.parse()?;
    let mut vm = TestVm::observe(&cloud.agent, ins)?;
    vm.wait_first_boot().context("first boot")?;

    // Attached at /mnt/<bucket>, read-write.
    let att = gantryctl(&cloud, &["bucket", "attach", &id, &conn])?;
    let path = format!("/mnt/{bucket}");
    assert_eq!(att["mount_path"], path.as_str(), "{att}");
    eventually("the host reports the bucket mounted", || {
        Ok(health(&cloud, &id)?[0]["health"] == "mounted")
    })?;
    eventually("the bucket mounted in the guest", || {
        mounted_in_guest(&vm, &path)
    })?;
    let cfg = cloud.tenant.get(&format!("/v1/instances/{id}/config"))?;
    assert_eq!(cfg["buckets"][0]["connection"], conn.as_str(), "{cfg}");

    // Guest -> bucket, bucket -> guest.
    let marker = format!("gantry-bucket-marker-{}", uuid_tail());
    vm.sh(&format!("echo {marker} > {path}/from-guest.txt && sync"))?;
    eventually("the guest's file in the bucket", || {
        Ok(s3("get", &bucket, "from-guest.txt", "")?.trim() == marker)
    })?;
    s3("put", &bucket, "from-host.txt", "put-by-an-s3-client")?;
    eventually("the object in the guest", || {
        Ok(vm.exec(&format!("cat {path}/from-host.txt"))?.output.trim() == "put-by-an-s3-client")
    })?;

    // The agent killed and started again: the mount is adopted; a stop
    // and start: mounted again at boot.
    drop(vm);
    cloud.agent.kill9();
    cloud.agent.spawn()?;
    let mut vm = TestVm::observe(&cloud.agent, ins)?;
    assert_eq!(vm.sh(&format!("cat {path}/from-guest.txt"))?, marker);
    cloud.act(&id, "stop")?;
    cloud.act(&id, "start")?;
    vm.wait_next_boot().context("boot after start")?;
    eventually("the bucket mounted after a restart", || {
        mounted_in_guest(&vm, &path)
    })?;
    assert_eq!(
        vm.sh(&format!("cat {path}/from-host.txt"))?,
        "put-by-an-s3-client"
    );

    // A snapshot holds the root disk's bytes, never the bucket's.
    let root_marker = format!("gantry-root-marker-{}", uuid_tail());
    vm.sh(&format!("echo {root_marker} > /root/in-root.txt && sync"))?;
    let (sid, _) = cloud.snapshot(&id, "s1")?;
    let raw = tempfile::Builder::new().suffix(".raw").tempfile()?;
    restore(&cloud, &sid, raw.path())?;
    assert!(
        file_contains(raw.path(), root_marker.as_bytes())?,
        "control: the root marker"
    );
    assert!(
        !file_contains(raw.path(), marker.as_bytes())?,
        "the bucket leaked into the snapshot"
    );
    cloud.wait_state(&id, "Running")?;

    // Detach: gone from the guest and the host; reattach read-only.
    gantryctl(&cloud, &["bucket", "detach", &id, &conn])?;
    eventually("the bucket unmounted in the guest", || {
        Ok(!mounted_in_guest(&vm, &path)?)
    })?;
    let host_mount = bucket_dir(&cloud, &id, &conn);
    eventually("the bucket unmounted on the host", || {
        Ok(!is_host_mount(&host_mount))
    })?;
    gantryctl(
        &cloud,
        &[
            "bucket",
            "attach",
            &id,
            &conn,
            "--path",
            "/data/ro",
            "--read-only",
        ],
    )?;
    eventually("the bucket mounted read-only", || {
        mounted_in_guest(&vm, "/data/ro")
    })?;
    assert_eq!(vm.sh("cat /data/ro/from-guest.txt")?, marker);
    let w = vm.exec("echo no > /data/ro/refused.txt")?;
    assert_ne!(
        w.status, 0,
        "a write to a read-only bucket succeeded: {w:?}"
    );

    // A bucket that is gone: the attach says so.
    let gone = format!("e2e-gone-{}", uuid_tail());
    let c2 = gantryctl(
        &cloud,
        &[
            "bucket",
            "connect",
            "gone",
            "--endpoint",
            &endpoint,
            "--bucket",
            &gone,
            "--access-key-id",
            &key_id,
            "--create",
        ],
    )?;
    s3("delete-bucket", &gone, "", "")?;
    let c2 = c2["id"].as_str().context("id")?;
    let r = cloud.tenant.post(
        &format!("/v1/instances/{id}/buckets"),
        &json!({"connection": c2}),
    );
    let e = r.expect_err("an attach to a deleted bucket");
    assert_eq!(
        (e.status, e.field.as_deref()),
        (422, Some("connection")),
        "{e}"
    );
    assert!(e.error.contains("does not exist"), "{e}");

    // Released: the objects stay, the host's mounts and share go.
    drop(vm);
    cloud.act(&id, "release")?;
    cloud.wait_state(&id, "Released")?;
    assert_eq!(s3("get", &bucket, "from-guest.txt", "")?.trim(), marker);
    let share = cloud.agent.state_dir.join(format!("buckets/{id}"));
    eventually("the share removed on the host", || Ok(!share.exists()))?;
    Ok(())
}

fn uuid_tail() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn bucket_dir(cloud: &Cloud, id: &str, conn: &str) -> PathBuf {
    cloud
        .agent
        .state_dir
        .join(format!("buckets/{id}/share/{conn}"))
}

fn is_host_mount(p: &Path) -> bool {
    let want = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
        })
        .unwrap_or(false)
}
