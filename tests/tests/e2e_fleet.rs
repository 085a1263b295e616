//! A fleet end to end: one real controller, two real agents on this
//! machine as two hosts (own state directories, API ports and data-plane
//! namespaces) sharing one S3 snapshot store (the moto server the suite
//! starts), real guests.
//!
//! A snapshot taken on host A creates an instance on host B that boots
//! with A's files (the account's chunk key comes from the controller, not
//! from either host). Then agent B is killed: its instance shows as
//! HostDown, the tenant releases it anyway, billing stays where B's last
//! heartbeat left it, and when agent B comes back it carries out the
//! release: no second VM anywhere, no extra billed second.

use anyhow::Context;
use gantry_proto::InstanceId;
use gantry_tests::cloud::{Cloud, ExtraHost, FleetOpts};
use gantry_tests::controller::Database;
use gantry_tests::fixture::{workspace_bin, TestAgent, TestVm, OP_TIMEOUT};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// A host silent this long is down.
const DOWN_AFTER_SECS: u64 = 6;

fn vm<'a>(agent: &'a TestAgent, id: &str) -> anyhow::Result<TestVm<'a>> {
    let id: InstanceId = id.parse()?;
    TestVm::observe(agent, id)
}

fn host_of(cloud: &Cloud, id: &str) -> anyhow::Result<String> {
    let hw = cloud.tenant.get(&format!("/v1/instances/{id}/hardware"))?;
    hw["host"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no host in {hw}"))
}

/// libvirt domains (any state) whose name mentions `id`.
fn domains_of(id: &str) -> anyhow::Result<usize> {
    let out = Command::new("virsh")
        .args(["list", "--all", "--name"])
        .output()?;
    anyhow::ensure!(out.status.success(), "virsh list failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(id.trim_start_matches("ins-")))
        .count())
}

/// Runs `gantryctl` as the tenant; its stdout, or an error with stderr.
fn gantryctl(cloud: &Cloud, args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new(workspace_bin("gantryctl"))
        .arg("--json")
        .args(args)
        .env("GANTRY_URL", &cloud.ctl.url)
        .env("GANTRY_TOKEN", &cloud.tenant_token)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "gantryctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// An instance action through `gantryctl`, waited for.
fn ctl_act(cloud: &Cloud, id: &str, args: &[&str], to: &str) -> anyhow::Result<()> {
    let mut all = vec!["instance", "action", id];
    all.extend_from_slice(args);
    let r = gantryctl(cloud, &all)?;
    let op = r["operation"]
        .as_str()
        .with_context(|| format!("no operation in {r}"))?;
    cloud.tenant.wait_op(op, OP_TIMEOUT)?;
    cloud.wait_state(id, to)
}

fn status_of(cloud: &Cloud, id: &str) -> anyhow::Result<Value> {
    Ok(cloud.tenant.get(&format!("/v1/instances/{id}"))?)
}

/// Stop, change-type to a flavor with 2 vCPUs, start (all through
/// gantryctl); the guest sees the new vCPUs and memory and keeps its files.
fn change_type(cloud: &Cloud, id: &str, g: &mut TestVm) -> anyhow::Result<()> {
    let bigger = cloud.admin.post(
        "/v1/admin/flavors",
        &json!({"name": "tiny-x2", "vcpus": 2, "memory_mib": 384, "root_disk_gib": 1,
                "price_micros_per_hour": 1_000_000}),
    )?["id"]
        .as_str()
        .context("flavor id")?
        .to_string();
    ctl_act(cloud, id, &["stop"], "Stopped")?;
    ctl_act(cloud, id, &["change-type", "--flavor", &bigger], "Stopped")?;
    ctl_act(cloud, id, &["start"], "Running")?;
    g.wait_next_boot().context("boot after change-type")?;
    assert_eq!(g.sh("nproc")?, "2");
    let mem_kib: u64 = g.sh("awk '/MemTotal/ {print $2}' /proc/meminfo")?.parse()?;
    assert!(
        mem_kib > 300 * 1024,
        "MemTotal {mem_kib} KiB after change-type"
    );
    assert_eq!(g.sh("cat /root/file")?, "written-on-a");
    Ok(())
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn two_hosts_share_snapshots_and_a_dead_host_releases_without_extra_billing() -> anyhow::Result<()>
{
    let s3 = std::env::var("GANTRY_TEST_S3_URL").context(
        "GANTRY_TEST_S3_URL is unset: run scripts/setup-s3 and source .cache/env/s3.env",
    )?;
    let store = format!(
        "{}/fleet-{}-{}",
        s3.trim_end_matches('/'),
        std::process::id(),
        rand::random::<u32>()
    );
    let opts = FleetOpts {
        heartbeat_timeout_secs: DOWN_AFTER_SECS,
        controller_toml: "snapshot_store_shared = true\nmin_volume_gib = 1\n".into(),
        agent_top: format!("snapshot_store = {store:?}\n"),
        ..FleetOpts::default()
    };
    let cloud = Cloud::start_fleet(&Database::Sqlite, &opts, "")?;
    let mut b = cloud.add_host("e2e-b", 1, "")?;
    let a = cloud.host.clone();

    // On host A (B cordoned): a file, then a snapshot into the shared store.
    cloud
        .admin
        .post(&format!("/v1/admin/hosts/{}/cordon", b.id), &json!({}))?;
    let on_a =
        cloud.create(json!({"name": "on-a", "flavor": cloud.flavor, "image": cloud.image}))?;
    assert_eq!(host_of(&cloud, &on_a)?, a);
    {
        let mut g = vm(&cloud.agent, &on_a)?;
        g.wait_first_boot().context("first boot on A")?;
        g.sh("echo written-on-a > /root/file && sync")?;
        // Suspend and resume through gantryctl: the same boot goes on.
        let boot = g.sh("cat /proc/sys/kernel/random/boot_id")?;
        ctl_act(&cloud, &on_a, &["suspend"], "Suspended")?;
        ctl_act(&cloud, &on_a, &["resume"], "Running")?;
        assert_eq!(g.sh("cat /proc/sys/kernel/random/boot_id")?, boot);
        change_type(&cloud, &on_a, &mut g)?;
    }
    let (sid, _) = cloud.snapshot(&on_a, "from-a")?;

    // From the snapshot on host B (A cordoned): it boots with A's file.
    cloud
        .admin
        .post(&format!("/v1/admin/hosts/{}/uncordon", b.id), &json!({}))?;
    cloud
        .admin
        .post(&format!("/v1/admin/hosts/{a}/cordon"), &json!({}))?;
    let on_b = cloud.create(json!({"name": "on-b", "flavor": cloud.flavor, "snapshot": sid}))?;
    assert_eq!(host_of(&cloud, &on_b)?, b.id, "placed on the other host");
    {
        let mut g = vm(&b.agent, &on_b)?;
        g.wait_first_boot().context("first boot on B")?;
        assert_eq!(g.sh("cat /root/file")?, "written-on-a");
    }

    // Agent B dies; its VM runs on. The controller shows it down.
    b.agent.kill9();
    let down = cloud.tenant.wait_for(
        &format!("/v1/instances/{on_b}"),
        Duration::from_secs(DOWN_AFTER_SECS + 30),
        "the instance to show its host down",
        |v| v["status"] == "HostDown",
    )?;
    assert_eq!(down["allowed_actions"], json!(["release"]), "{down}");
    let billed_at_down = cloud.billed_ms(&on_b)?;
    assert!(billed_at_down > 0, "it was billed while B was up");
    assert_eq!(domains_of(&on_b)?, 1, "its VM still runs on B");

    // The tenant releases it while B is down; the release waits for B.
    let r = cloud.tenant.post(
        &format!("/v1/instances/{on_b}/actions"),
        &json!({"action": "release"}),
    )?;
    let op = r["operation"]
        .as_str()
        .context("release operation")?
        .to_string();
    std::thread::sleep(Duration::from_secs(5));
    let pending = cloud.tenant.get(&format!("/v1/operations/{op}"))?;
    assert_eq!(pending["state"], "pending", "{pending}");
    assert_eq!(cloud.billed_ms(&on_b)?, billed_at_down);

    // B comes back: it carries out the release; nothing is billed for the
    // time it was away, and no VM was made twice.
    b.agent.spawn()?;
    cloud.tenant.wait_op(&op, OP_TIMEOUT)?;
    cloud.wait_state(&on_b, "Released")?;
    assert_eq!(domains_of(&on_b)?, 0, "the VM is gone from B");
    let settled = cloud.settled_billed_ms(&on_b)?;
    assert_eq!(settled, billed_at_down, "no extra billed second");
    let host = cloud.admin.get(&format!("/v1/admin/hosts/{}", b.id))?;
    assert_eq!(host["health"], "healthy", "{host}");
    assert_eq!(status_of(&cloud, &on_a)?["host"], a);

    // Host A has two vCPUs: make room for the next part.
    cloud.act(&on_a, "release")?;
    cloud.wait_state(&on_a, "Released")?;
    volumes_and_drain(&cloud, &b)?;
    revoked_host_is_refused(&cloud, &b)
}

/// An admin revokes host B's credential: its agent is refused at once and
/// says what to do; the host is down; nothing is placed there.
fn revoked_host_is_refused(cloud: &Cloud, b: &ExtraHost) -> anyhow::Result<()> {
    admin_post(
        cloud,
        &format!("/v1/admin/hosts/{}/revoke", b.id),
        json!({}),
    )?;
    let host = cloud.admin.get(&format!("/v1/admin/hosts/{}", b.id))?;
    assert!(host["revoked_at"].is_string(), "{host}");
    assert_eq!(host["health"], "unhealthy", "{host}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !b.agent.log_tail().contains("revoked") {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "agent B never said its credential was revoked:\n{}",
            b.agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let a = cloud.host.clone();
    admin_post(cloud, &format!("/v1/admin/hosts/{a}/cordon"), json!({}))?;
    let r = cloud.tenant.post(
        "/v1/instances",
        &json!({"name": "nowhere", "flavor": cloud.flavor, "image": cloud.image}),
    );
    assert!(r.is_err(), "placed on a revoked or cordoned host: {r:?}");
    Ok(())
}

fn admin_post(cloud: &Cloud, path: &str, body: Value) -> anyhow::Result<Value> {
    Ok(cloud.admin.post(path, &body)?)
}

/// Waits until `id` is on `host` with no operation under way.
fn wait_moved(cloud: &Cloud, id: &str, host: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + OP_TIMEOUT;
    loop {
        let v = status_of(cloud, id)?;
        let idle = v["allowed_actions"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        if v["host"] == host && idle {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{id} never moved: {v}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A data volume on host A, grown through the controller while its
/// instance runs; a drain of A moves the Stopped instance with its volume
/// to B (the running one stays, reported); it starts on B with its files;
/// released, its volume brings the next instance to B.
fn volumes_and_drain(cloud: &Cloud, b: &ExtraHost) -> anyhow::Result<()> {
    let a = cloud.host.clone();
    admin_post(cloud, &format!("/v1/admin/hosts/{a}/uncordon"), json!({}))?;
    admin_post(
        cloud,
        &format!("/v1/admin/hosts/{}/cordon", b.id),
        json!({}),
    )?;
    let running =
        cloud.create(json!({"name": "runner", "flavor": cloud.flavor, "image": cloud.image}))?;
    let running = running.as_str();
    let vol = cloud
        .tenant
        .post("/v1/volumes", &json!({"name": "data", "size_gib": 1}))?;
    let vid = vol["id"].as_str().context("volume id")?.to_string();
    let id = cloud.create(json!({"name": "with-data", "flavor": cloud.flavor,
        "image": cloud.image, "data_volume": vid}))?;
    assert_eq!(host_of(cloud, &id)?, a);
    {
        let mut g = vm(&cloud.agent, &id)?;
        g.wait_first_boot()?;
        g.sh("echo on-root > /root/file && echo on-data > /datadrive/keep && sync")?;
        // Grow the volume through the controller: the guest sees it live.
        let r = cloud
            .tenant
            .post(&format!("/v1/volumes/{vid}/grow"), &json!({"size_gib": 2}))?;
        let op = r["operation"]
            .as_str()
            .with_context(|| format!("no operation: {r}"))?;
        cloud.tenant.wait_op(op, OP_TIMEOUT)?;
        assert_eq!(
            g.sh("cat /sys/block/vdb/size")?,
            (2u64 << 30 >> 9).to_string()
        );
    }
    cloud.act(&id, "stop")?;
    cloud.wait_state(&id, "Stopped")?;

    // Drain A: the Stopped instance moves to B, the running one is listed.
    admin_post(
        cloud,
        &format!("/v1/admin/hosts/{}/uncordon", b.id),
        json!({}),
    )?;
    let report = admin_post(cloud, &format!("/v1/admin/hosts/{a}/drain"), json!({}))?;
    assert_eq!(report["moving"][0]["instance"], id.as_str(), "{report}");
    let first = report["moving"][0]["operation"]
        .as_str()
        .context("move op")?;
    let out = cloud.admin.wait_for(
        &format!("/v1/operations/{first}"),
        OP_TIMEOUT,
        "the move-out",
        |v| v["state"] != "pending" && v["state"] != "running",
    )?;
    assert_eq!(out["state"], "succeeded", "{out}");
    let stays = report["not_moved"].to_string();
    assert!(stays.contains(running), "{report}");
    wait_moved(cloud, &id, &b.id)?;
    let v = cloud.tenant.get(&format!("/v1/volumes/{vid}"))?;
    assert_eq!(v["host"], b.id.as_str(), "{v}");
    cloud.act(&id, "start")?;
    cloud.wait_state(&id, "Running")?;
    {
        let mut g = vm(&b.agent, &id)?;
        g.wait_first_boot().context("boot on B after the move")?;
        assert_eq!(g.sh("cat /root/file")?, "on-root");
        assert_eq!(g.sh("cat /datadrive/keep")?, "on-data");
        assert_eq!(
            g.sh("cat /sys/block/vdb/size")?,
            (2u64 << 30 >> 9).to_string()
        );
    }
    assert_eq!(domains_of(&id)?, 1, "only B runs it");

    // Released, its volume stays on B and takes the next instance there.
    cloud.act(&id, "release")?;
    cloud.wait_state(&id, "Released")?;
    admin_post(cloud, &format!("/v1/admin/hosts/{a}/uncordon"), json!({}))?;
    let again = cloud.create(json!({"name": "reuse", "flavor": cloud.flavor,
        "image": cloud.image, "data_volume": vid}))?;
    assert_eq!(host_of(cloud, &again)?, b.id, "placed on the volume's host");
    {
        let mut g = vm(&b.agent, &again)?;
        g.wait_first_boot()?;
        assert_eq!(g.sh("cat /datadrive/keep")?, "on-data");
    }
    for i in [again.as_str(), running] {
        cloud.act(i, "release")?;
        cloud.wait_state(i, "Released")?;
    }
    Ok(())
}
