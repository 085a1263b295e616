//! Bucket throughput (scripts/bench-buckets, docs/buckets.md): sequential
//! write and read of one file through a bucket attached to a test guest
//! (guest -> virtiofs -> the host's s3fs -> S3), against the same s3fs
//! mounted on the host and used there directly, on the suite's S3 server
//! (moto on loopback). Cold reads: the guest's and the host's page caches
//! are dropped first. `dd` with 1 MiB blocks, `conv=fsync` on writes (s3fs
//! uploads on flush), timed from the host around each command.
//!
//! Prints one JSON object. Usage: `gantry-bench-buckets [MiB]` (default
//! 64).

use anyhow::{ensure, Context};
use gantry_tests::cloud::Cloud;
use gantry_tests::controller::Database;
use gantry_tests::fixture::{require_rig, TestVm};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: source .cache/env/s3.env"))
}

fn mib_per_s(mib: u64, d: Duration) -> f64 {
    (mib as f64 / d.as_secs_f64() * 10.0).round() / 10.0
}

/// Runs `dd` in a shell (guest through `run`, or the host); its time.
fn timed(run: &dyn Fn(&str) -> anyhow::Result<()>, cmd: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    run(cmd)?;
    Ok(t.elapsed())
}

fn host_sh(cmd: &str) -> anyhow::Result<()> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    ensure!(
        out.status.success(),
        "`{cmd}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Write then cold read of `mib` MiB at `dir` through `run`.
fn rw(run: &dyn Fn(&str) -> anyhow::Result<()>, dir: &str, mib: u64) -> anyhow::Result<(f64, f64)> {
    let w = timed(
        run,
        &format!("dd if=/dev/zero of={dir}/bench.bin bs=1M count={mib} conv=fsync 2>/dev/null"),
    )?;
    run("sync; echo 3 > /proc/sys/vm/drop_caches")?;
    let r = timed(
        run,
        &format!("dd if={dir}/bench.bin of=/dev/null bs=1M 2>/dev/null"),
    )?;
    run(&format!("rm -f {dir}/bench.bin"))?;
    Ok((mib_per_s(mib, w), mib_per_s(mib, r)))
}

fn main() -> anyhow::Result<()> {
    require_rig("gantry-bench-buckets");
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(64);
    let endpoint = env("AWS_ENDPOINT_URL")?;
    let (key, secret) = (env("AWS_ACCESS_KEY_ID")?, env("AWS_SECRET_ACCESS_KEY")?);
    let cloud = Cloud::start(&Database::Sqlite)?;
    let bucket = format!("bench-{:08x}", rand::random::<u32>());
    let conn = cloud.tenant.post(
        "/v1/storage-connections",
        &json!({"name": "bench", "endpoint": endpoint, "bucket": bucket, "access_key_id": key,
            "secret_access_key": secret, "create_bucket": true}),
    )?;
    let id =
        cloud.create(json!({"name": "bench", "flavor": cloud.flavor, "image": cloud.image}))?;
    cloud.wait_state(&id, "Running")?;
    let mut vm = TestVm::observe(&cloud.agent, id.parse()?)?;
    vm.wait_first_boot()?;
    cloud.tenant.post(
        &format!("/v1/instances/{id}/buckets"),
        &json!({"connection": conn["id"]}),
    )?;
    let path = format!("/mnt/{bucket}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while vm.exec(&format!("grep -q ' {path} ' /proc/mounts"))?.status != 0 {
        ensure!(
            Instant::now() < deadline,
            "the bucket never showed in the guest"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let guest = |c: &str| vm.sh(c).map(|_| ());
    let (gw, gr) = rw(&guest, &path, mib)?;

    // The same s3fs on the host, used directly.
    let dir = tempfile::tempdir()?;
    let (mnt, pw) = (dir.path().join("mnt"), dir.path().join("pw"));
    std::fs::create_dir(&mnt)?;
    std::fs::write(&pw, format!("{bucket}:{key}:{secret}\n"))?;
    host_sh(&format!("chmod 600 {}", pw.display()))?;
    host_sh(&format!(
        "s3fs {bucket} {} -o passwd_file={},url={endpoint},use_path_request_style,endpoint=us-east-1",
        mnt.display(),
        pw.display()
    ))?;
    let host = rw(&host_sh, &mnt.display().to_string(), mib);
    host_sh(&format!("umount {}", mnt.display()))?;
    let (hw, hr) = host?;
    // Released, so the agent unmounts the bucket before the cloud goes.
    drop(vm);
    cloud.act(&id, "release")?;
    let share = cloud.agent.state_dir.join(format!("buckets/{id}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while share.exists() {
        ensure!(
            Instant::now() < deadline,
            "the bucket share was never removed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "{}",
        json!({
            "mib": mib,
            "domain_type": std::env::var("GANTRY_DOMAIN_TYPE").unwrap_or_default(),
            "guest_write_mib_s": gw, "guest_read_mib_s": gr,
            "host_s3fs_write_mib_s": hw, "host_s3fs_read_mib_s": hr,
        })
    );
    Ok(())
}
