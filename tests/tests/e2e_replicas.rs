//! Controller replicas end to end: two real controllers on one
//! PostgreSQL database, a real agent given both URLs, a real guest.
//!
//! The instance is created through controller A, which leads and which
//! the agent talks to. A is killed (SIGKILL): B takes over the lease
//! within one lease, the agent fails over to B (heartbeats keep the host
//! up, the work long-poll brings B's stop to the VM), and the instance is
//! billed for the time it really ran, nothing twice.

use anyhow::{bail, Context};
use gantry_proto::InstanceId;
use gantry_tests::cloud::{Cloud, FleetOpts, RunClock, HEARTBEAT_SECS};
use gantry_tests::controller::{Database, TestController};
use gantry_tests::fixture::TestVm;
use serde_json::json;
use std::time::{Duration, Instant};

/// The controllers' leader lease, seconds.
const LEASE_SECS: u64 = 2;

/// Waits until `ctl` says it leads.
fn wait_leads(ctl: &TestController, within: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if ctl.leads() == Some(true) {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{} did not lead within {within:?}:\n{}",
        ctl.url,
        ctl.log_tail()
    )
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn agent_with_two_controller_urls_survives_the_leaders_death() -> anyhow::Result<()> {
    let db = Database::postgres("e2e_replicas").expect("PostgreSQL");
    let opts = FleetOpts {
        heartbeat_timeout_secs: 20,
        controller_toml: format!("leader_lease_secs = {LEASE_SECS}\n"),
        ..FleetOpts::default()
    };
    let mut cloud = Cloud::start_fleet(&db, &opts, "")?;
    wait_leads(&cloud.ctl, Duration::from_secs(10))?;
    let b = cloud.ctl.replica()?;
    std::thread::sleep(Duration::from_millis(500));
    anyhow::ensure!(b.leads() == Some(false), "B leads beside A");

    // The agent is given both controllers (A first) and restarted.
    let text = std::fs::read_to_string(&cloud.agent.config)?;
    let one = format!("url = {:?}", cloud.ctl.url);
    anyhow::ensure!(text.contains(&one), "agent config: {text}");
    let both = format!("urls = [{:?}, {:?}]", cloud.ctl.url, b.url);
    std::fs::write(&cloud.agent.config, text.replace(&one, &both))?;
    cloud.agent.kill9();
    cloud.agent.spawn()?;

    let mut clock = RunClock::default();
    let asked = Instant::now();
    let id = cloud.create(json!({"name": "ha", "flavor": cloud.flavor, "image": cloud.image}))?;
    cloud.wait_state(&id, "Running")?;
    clock.started(asked, Instant::now());
    let iid: InstanceId = id.parse()?;
    TestVm::observe(&cloud.agent, iid)?.wait_first_boot()?;
    std::thread::sleep(Duration::from_secs(2 * HEARTBEAT_SECS));

    // The leader, and the agent's controller, dies.
    cloud.ctl.kill9();
    let took = wait_leads(&b, Duration::from_secs(LEASE_SECS * 3))?;
    eprintln!("B leads {} ms after A's death", took.as_millis());
    anyhow::ensure!(
        took <= Duration::from_millis(LEASE_SECS * 1000 + 1000),
        "B took {took:?} to take over; the lease is {LEASE_SECS} s"
    );
    // From here on, everything through B.
    cloud.admin = b.admin();
    cloud.tenant = b.with_token(&cloud.tenant_token);
    std::thread::sleep(Duration::from_secs(3 * HEARTBEAT_SECS));
    let host = cloud
        .admin
        .get(&format!("/v1/admin/hosts/{}", cloud.host))?;
    anyhow::ensure!(
        host["health"] == "healthy",
        "the host's heartbeats did not reach B: {host}"
    );
    {
        let vm = TestVm::observe(&cloud.agent, iid)?;
        anyhow::ensure!(vm.sh("echo alive")? == "alive", "the VM died with A");
    }
    let asked = Instant::now();
    cloud.act(&id, "stop").context("stop through B")?;
    cloud.wait_state(&id, "Stopped")?;
    clock.stopped(asked, Instant::now());
    let billed = cloud.settled_billed_ms(&id)?;
    clock.check(billed)?;
    cloud.act(&id, "release")?;
    let log = std::fs::read_to_string(cloud.agent.state_dir.with_extension("log"))?;
    anyhow::ensure!(
        log.contains("now using this controller"),
        "the agent never failed over:\n{}",
        cloud.agent.log_tail()
    );
    Ok(())
}
