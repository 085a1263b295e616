//! End to end across processes: a real controller and a real agent (which
//! joins with a join token), libvirtd and the test guest. An admin sets the
//! cloud up, a tenant runs an instance through its whole life, snapshots
//! it, starts a second instance from the snapshot and releases the first
//! with auto-release; billed seconds match the time the VM really ran; the
//! audit log shows every call. On SQLite, then on PostgreSQL. A second test
//! kills the controller, then the agent, mid-run.

use anyhow::Context;
use gantry_proto::InstanceId;
use gantry_tests::cloud::{Cloud, RunClock};
use gantry_tests::controller::Database;
use gantry_tests::fixture::{require_rig, workspace_bin, TestVm, OP_TIMEOUT};
use serde_json::json;
use std::time::{Duration, Instant};

#[path = "e2e_cloud/monitor.rs"]
mod monitor;

fn attach<'a>(cloud: &'a Cloud, id: &str) -> anyhow::Result<TestVm<'a>> {
    let id: InstanceId = id.parse()?;
    TestVm::observe(&cloud.agent, id)
}

/// Runs an action and records its effect on the run clock.
fn act_timed(
    cloud: &Cloud,
    clock: &mut RunClock,
    id: &str,
    action: &str,
    to: &str,
) -> anyhow::Result<()> {
    let asked = Instant::now();
    cloud.act(id, action)?;
    cloud.wait_state(id, to)?;
    let seen = Instant::now();
    match to {
        "Running" => clock.started(asked, seen),
        _ => clock.stopped(asked, seen),
    }
    Ok(())
}

/// The snapshot's size in the agent's store once no compaction is pending
/// (read with `gantry-agent snapshot list`).
fn compacted_size(cloud: &Cloud, sid: &str) -> anyhow::Result<u64> {
    let state = &cloud.agent.state_dir;
    let deadline = Instant::now() + OP_TIMEOUT;
    let pending = || {
        std::fs::read_dir(state.join("snapshots/compact"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    while pending() {
        anyhow::ensure!(Instant::now() < deadline, "the store was never compacted");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = std::process::Command::new(workspace_bin("gantry-agent"))
        .args(["snapshot", "list", "--json", "--store"])
        .arg(state.join("snapshots"))
        .arg("--keyring")
        .arg(state.join("store-keys.json"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    list.as_array()
        .and_then(|l| l.iter().find(|i| i["id"] == sid))
        .and_then(|i| i["stored_bytes"].as_u64())
        .with_context(|| format!("snapshot {sid} is not in the host's store: {list}"))
}

fn whole_life(db: Database) -> anyhow::Result<()> {
    let cloud = Cloud::start(&db)?;
    let vol = cloud
        .tenant
        .post("/v1/volumes", &json!({"name": "data", "size_gib": 1}))?;
    let mut clock = RunClock::default();
    let asked = Instant::now();
    let id = cloud.create(json!({
        "name": "web", "flavor": cloud.flavor, "image": cloud.image,
        "data_volume": vol["id"],
    }))?;
    cloud.wait_state(&id, "Running")?;
    clock.started(asked, Instant::now());
    let mut vm = attach(&cloud, &id)?;
    vm.wait_first_boot().context("first boot marker")?;

    act_timed(&cloud, &mut clock, &id, "stop", "Stopped")?;
    act_timed(&cloud, &mut clock, &id, "start", "Running")?;
    vm.wait_next_boot().context("boot after start")?;
    for action in ["reboot", "force-reboot"] {
        let before = vm.sh("cat /proc/sys/kernel/random/boot_id")?;
        cloud.act(&id, action)?;
        vm.wait_next_boot()
            .with_context(|| format!("boot after {action}"))?;
        let after = vm.sh("cat /proc/sys/kernel/random/boot_id")?;
        assert_ne!(before, after, "{action} did not reboot the guest");
    }
    // Suspend and resume through the controller: the guest pauses (not
    // billed meanwhile) and carries on without a reboot.
    let boot = vm.sh("cat /proc/sys/kernel/random/boot_id")?;
    act_timed(&cloud, &mut clock, &id, "suspend", "Suspended")?;
    std::thread::sleep(Duration::from_secs(2));
    act_timed(&cloud, &mut clock, &id, "resume", "Running")?;
    assert_eq!(
        vm.sh("cat /proc/sys/kernel/random/boot_id")?,
        boot,
        "resume is not a reboot"
    );
    vm.sh("echo kept-by-snapshot > /root/file && echo canary > /datadrive/canary && sync")?;

    // A snapshot, and a second instance from it.
    let (sid, done) = cloud.snapshot(&id, "before-upgrade")?;
    assert_eq!(done["progress_percent"], 100, "{done}");
    // The test guest runs no qemu-guest-agent: the snapshot says it is
    // crash-consistent, not frozen.
    assert_eq!(done["frozen"], false, "{done}");
    assert!(done["compressed_bytes"].as_u64().unwrap_or(0) > 0, "{done}");
    assert!(
        done["logical_bytes"].as_u64().unwrap_or(0) >= 1 << 30,
        "{done}"
    );
    cloud.wait_state(&id, "Running")?;
    assert_eq!(vm.sh("cat /root/file")?, "kept-by-snapshot");

    let id2 = cloud.create(json!({"name": "clone", "flavor": cloud.flavor, "snapshot": sid}))?;
    cloud.wait_state(&id2, "Running")?;
    {
        let mut vm2 = attach(&cloud, &id2)?;
        vm2.wait_first_boot().context("clone's first boot")?;
        assert_eq!(vm2.sh("cat /root/file")?, "kept-by-snapshot");
        let canary = vm2.exec("cat /datadrive/canary")?;
        assert_ne!(
            canary.status, 0,
            "the data disk leaked into the snapshot: {canary:?}"
        );
    }
    cloud.act(&id2, "release")?;
    cloud.wait_state(&id2, "Released")?;
    // The controller shows the size the host's store really holds for the
    // snapshot (after any compaction the agent runs; by default it writes
    // at the level at rest and has none to run).
    let at_rest = compacted_size(&cloud, &sid)?;
    assert!(at_rest > 0);
    cloud.tenant.wait_for(
        &format!("/v1/snapshots/{sid}"),
        OP_TIMEOUT,
        "the compacted snapshot size",
        |v| v["compressed_bytes"].as_u64() == Some(at_rest),
    )?;

    // Snapshot with auto-release: the first instance ends Released.
    let asked = Instant::now();
    let snap2 = cloud.tenant.post(
        &format!("/v1/instances/{id}/snapshots"),
        &json!({"name": "final", "auto_release": true, "as_image": true}),
    )?;
    let sid2 = snap2["id"].as_str().context("snapshot id")?.to_string();
    cloud.wait_state(&id, "Released")?;
    clock.stopped(asked, Instant::now());
    // The instance may read Released (a heartbeat) a moment before the
    // operation's report settles the snapshot.
    let s2 = cloud.tenant.wait_for(
        &format!("/v1/snapshots/{sid2}"),
        OP_TIMEOUT,
        "the auto-release snapshot",
        |v| v["status"] != "Creating",
    )?;
    assert_eq!(s2["status"], "Success", "{s2}");
    let images = cloud.tenant.get("/v1/images")?;
    assert!(
        images
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["source_snapshot"] == sid2.as_str())),
        "the as-image snapshot is not listed as an image: {images}"
    );
    drop(vm);

    // Billed seconds match the time the VM really ran.
    let billed = cloud.settled_billed_ms(&id)?;
    clock.check(billed)?;
    let acct = cloud
        .admin
        .get(&format!("/v1/admin/accounts/{}", cloud.account))?;
    assert!(
        acct["credit_micros"].as_i64().unwrap_or(0) < 1_000_000_000_000,
        "{acct}"
    );

    // The audit log shows every call that changed something.
    let audit = cloud.admin.get("/v1/admin/audit?limit=1000")?;
    let paths: Vec<String> = audit
        .as_array()
        .context("audit entries")?
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["method"].as_str().unwrap_or(""),
                e["path"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        "POST /v1/admin/join-tokens".to_string(),
        "POST /v1/agent/join".into(),
        "POST /v1/admin/flavors".into(),
        "POST /v1/admin/images".into(),
        "POST /v1/instances".into(),
        format!("POST /v1/instances/{id}/actions"),
        format!("POST /v1/instances/{id}/snapshots"),
        format!("POST /v1/instances/{id2}/actions"),
    ] {
        assert!(paths.contains(&want), "audit log lacks {want}: {paths:?}");
    }
    Ok(())
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn whole_life_through_controller_and_agent_on_sqlite() -> anyhow::Result<()> {
    require_rig("whole_life_on_sqlite");
    whole_life(Database::Sqlite)
}

#[test]
#[ignore = "needs the VM rig and PostgreSQL: ./scripts/test runs it"]
fn whole_life_through_controller_and_agent_on_postgres() -> anyhow::Result<()> {
    require_rig("whole_life_on_postgres");
    let db = Database::postgres("whole_life_on_postgres").expect("PostgreSQL");
    whole_life(db)
}

/// The Monitor view's sampling interval in these tests, seconds.
const MONITOR_SECS: u64 = 2;

/// The controller dies, then the agent: the VM keeps running throughout,
/// and billing catches up with every second it ran, while the Monitor
/// view loses the samples of the time the controller was down (they are
/// dropped, never queued) and resumes after. Before that, the guest's
/// burnt CPU and written disk show in the Monitor view within two
/// intervals, its GPUs (the simulated NVML library inside the guest,
/// reported over the virtio-serial channel) show labelled with the
/// instance, and both daemons' `/metrics` pass `promtool check metrics`;
/// and, restarted with `metrics.prometheus_url`, the controller answers
/// the view from a real Prometheus scraping the agent.
#[test]
#[ignore = "needs the VM rig and Prometheus: ./scripts/test runs it"]
fn controller_and_agent_crashes_lose_no_billed_time() -> anyhow::Result<()> {
    require_rig("crashes_lose_no_billed_time");
    let mut cloud = Cloud::start_with(
        &Database::Sqlite,
        &format!("[monitor]\ninterval_secs = {MONITOR_SECS}\n"),
    )?;
    let r = crashes(&mut cloud);
    if r.is_err() {
        eprintln!("--- agent log ---\n{}", cloud.agent.log_tail());
        eprintln!("--- controller log ---\n{}", cloud.ctl.log_tail());
    }
    r
}

fn crashes(cloud: &mut Cloud) -> anyhow::Result<()> {
    let mut clock = RunClock::default();
    let asked = Instant::now();
    let id =
        cloud.create(json!({"name": "steady", "flavor": cloud.flavor, "image": cloud.image}))?;
    cloud.wait_state(&id, "Running")?;
    clock.started(asked, Instant::now());
    attach(cloud, &id)?.wait_first_boot()?;
    monitor::instance_moves_in_the_view(cloud, &attach(cloud, &id)?, MONITOR_SECS)?;

    // Kill each side at a random moment of the run.
    let pause = || Duration::from_millis(rand::random_range(1_000..6_000));
    std::thread::sleep(pause());
    let down_at = chrono::Utc::now();
    cloud.ctl.kill9();
    std::thread::sleep(pause() + Duration::from_secs(3));
    {
        let vm = attach(cloud, &id)?;
        assert_eq!(
            vm.sh("echo alive")?,
            "alive",
            "the VM stopped with the controller"
        );
    }
    let up_at = chrono::Utc::now();
    cloud.ctl.spawn()?;
    monitor::gap_while_down(cloud, &id, down_at, up_at, MONITOR_SECS)?;
    monitor::view_from_prometheus(cloud, &id, MONITOR_SECS)?;

    std::thread::sleep(pause());
    cloud.agent.kill9();
    std::thread::sleep(pause());
    cloud.agent.spawn()?;
    {
        let vm = attach(cloud, &id)?;
        assert_eq!(
            vm.sh("echo alive")?,
            "alive",
            "the VM stopped with the agent"
        );
    }
    std::thread::sleep(pause());
    let asked = Instant::now();
    cloud.act(&id, "stop")?;
    cloud.wait_state(&id, "Stopped")?;
    clock.stopped(asked, Instant::now());
    let billed = cloud.settled_billed_ms(&id)?;
    clock.check(billed)?;
    cloud.act(&id, "release")?;
    cloud.wait_state(&id, "Released")?;
    Ok(())
}
