//! The crash campaign (issue 14): a real controller, a real agent and real
//! TCG guests; the controller and the agent are each killed -9 at every
//! named crash point (`gantry-crashpoint`, its docs list them) in the flow
//! that reaches it — create, live and offline snapshots, snapshot with
//! auto-release, stop, start, release, heartbeats, instance billing and the
//! storage meter — at least 50 times each, Nth-hit variants included.
//!
//! Each kill: the daemon is restarted with `GANTRY_CRASH_AT=<point>#<n>`,
//! the flow is driven until the process dies (by SIGKILL, at that point: it
//! says so on stderr; a point never reached fails the test, naming it), it
//! is restarted plainly, the cloud settles, and then:
//! - the libvirt domains of the agent (asked of libvirt, by the agent's
//!   domain prefix) are exactly the controller's live instances: no VM lost
//!   or duplicated;
//! - every snapshot the controller shows is Success and in the host's store,
//!   or Failed and not in it, and the store holds no snapshot of the account
//!   the controller does not show as Success: none half visible;
//! - credit is the initial credit less the sum of the ledger, exactly; each
//!   instance's ledger adds up to the cost the controller shows for it (no
//!   window charged twice) and to no more than it really ran.
//!
//! At the end every instance is released and, once billing has settled,
//! each one's billed time equals the time libvirt had it running (from
//! libvirt's own lifecycle events, independently of the agent): never more
//! than one heartbeat over (plus whole-second billing), and at most two
//! heartbeats under (each agent kill between a power change and its record
//! is settled at the agent's last heartbeat, in the tenant's favour), plus
//! 200 ms for each run libvirt saw (the agent counts a start or resume from
//! when it sees it, later than libvirt's event on a loaded host).
//!
//! `GANTRY_CRASH_ONLY=<text>` runs only the kills whose `<point>#<n>`
//! contains the text (e.g. `agent.snapshot`), for one point by hand.

use anyhow::{bail, ensure, Context};
use gantry_tests::cloud::{Cloud, FleetOpts, HEARTBEAT_SECS, PRICE_MICROS_PER_HOUR};
use gantry_tests::controller::Database;
use gantry_tests::domain_clock::{domains, DomainClock};
use gantry_tests::fixture::TestVm;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

#[path = "crash_campaign/plan.rs"]
mod plan;

use plan::{plan, Daemon, Flow, Kill};

/// The agent's libvirt domain prefix: only this run's domains carry it.
/// It names the test process, so that a second campaign on the same
/// libvirtd (another checkout's, or a killed run's leftover domains)
/// is never counted as this one's VMs.
fn prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| format!("gantry-crash{:x}-", std::process::id() & 0xf_ffff))
}
/// The credit the cloud gives the account at the start.
const INITIAL_CREDIT: i64 = 1_000_000_000_000;
/// How long a flow may take to reach its crash point.
const REACH: Duration = Duration::from_secs(60);
/// How long the cloud may take to settle after a restart.
const SETTLE: Duration = Duration::from_secs(120);

/// The campaign's state: the cloud, the steady instance (created once,
/// snapshotted, stopped and started) and the spare (created and released).
struct Campaign {
    cloud: Cloud,
    clock: DomainClock,
    steady: String,
    /// Instances ever seen (for the final billing check).
    seen: BTreeSet<String>,
    names: usize,
}

/// One kill's row in the table.
struct Row {
    target: String,
    daemon: Daemon,
    flow: Flow,
    secs: f64,
    problem: Option<String>,
}

impl Campaign {
    fn instances(&self) -> anyhow::Result<Vec<Value>> {
        let v = self.cloud.admin.get(&format!(
            "/v1/instances?account={}&limit=1000",
            self.cloud.account
        ))?;
        Ok(v.as_array().context("instance list")?.clone())
    }

    fn state_of(&self, id: &str) -> anyhow::Result<String> {
        Ok(self
            .instances()?
            .iter()
            .find(|i| i["id"] == id)
            .and_then(|i| i["state"].as_str())
            .unwrap_or("")
            .to_string())
    }

    /// The live instance other than the steady one, if any.
    fn spare(&self) -> anyhow::Result<Option<String>> {
        let list = self.instances()?;
        let mut live = list.iter().filter(|i| {
            i["id"] != self.steady.as_str()
                && !matches!(i["state"].as_str(), Some("Released" | "Failed"))
        });
        let first = live
            .next()
            .and_then(|i| i["id"].as_str())
            .map(str::to_string);
        ensure!(live.next().is_none(), "two spare instances: {list:?}");
        Ok(first)
    }

    fn name(&mut self, what: &str) -> String {
        self.names += 1;
        format!("{what}{}", self.names)
    }

    fn create_plain(&mut self) -> anyhow::Result<String> {
        let name = self.name("spare");
        let c = &self.cloud;
        let id = c.create(json!({"name": name, "flavor": c.flavor, "image": c.image}))?;
        c.wait_state(&id, "Running")?;
        self.seen.insert(id.clone());
        Ok(id)
    }

    /// Waits until the guest of `id` answers on its exec channel: booted,
    /// so that it honours an ACPI shutdown.
    fn booted(&self, id: &str) -> anyhow::Result<()> {
        let vm = TestVm::observe(&self.cloud.agent, id.parse()?)?;
        vm.sh("true").map(|_| ())
    }

    /// Puts the steady instance in `want` (Running, booted, or Stopped).
    fn steady_in(&mut self, want: &str) -> anyhow::Result<()> {
        let now = self.state_of(&self.steady)?;
        match (now.as_str(), want) {
            (a, b) if a == b => {}
            ("Running", "Stopped") => {
                self.booted(&self.steady)?;
                self.cloud.act(&self.steady, "stop")?;
            }
            ("Stopped", "Running") => self.cloud.act(&self.steady, "start")?,
            _ => bail!("the steady instance {} is {now}, not {want}", self.steady),
        }
        self.cloud.wait_state(&self.steady, want)?;
        if want == "Running" {
            self.booted(&self.steady)?;
        }
        Ok(())
    }

    /// Puts the cloud in the state `flow` starts from.
    fn prepare(&mut self, flow: Flow) -> anyhow::Result<()> {
        let spare = self.spare()?;
        match flow {
            Flow::Create => {
                if let Some(s) = spare {
                    self.cloud.act(&s, "release")?;
                }
                self.steady_in("Running")
            }
            Flow::Release | Flow::AutoRelease => {
                let spare = match spare {
                    Some(s) => s,
                    None => self.create_plain()?,
                };
                if flow == Flow::AutoRelease {
                    self.booted(&spare)?;
                }
                self.steady_in("Running")
            }
            Flow::LiveSnapshot | Flow::Stop | Flow::Idle => self.steady_in("Running"),
            Flow::OfflineSnapshot | Flow::Start => self.steady_in("Stopped"),
        }
    }

    /// Starts `flow`; the API may fail (the controller dying under it).
    /// Returns the operation, when the answer named one.
    fn drive(&mut self, flow: Flow) -> anyhow::Result<Option<String>> {
        let spare = self.spare()?;
        let name = self.name("x");
        let c = &self.cloud;
        let (path, body) = match flow {
            Flow::Create => (
                "/v1/instances".to_string(),
                json!({"name": name, "flavor": c.flavor, "image": c.image}),
            ),
            Flow::Release => (
                format!("/v1/instances/{}/actions", spare.context("no spare")?),
                json!({"action": "release"}),
            ),
            Flow::AutoRelease => (
                format!("/v1/instances/{}/snapshots", spare.context("no spare")?),
                json!({"name": name, "auto_release": true}),
            ),
            Flow::LiveSnapshot | Flow::OfflineSnapshot => (
                format!("/v1/instances/{}/snapshots", self.steady),
                json!({"name": name}),
            ),
            Flow::Stop | Flow::Start => (
                format!("/v1/instances/{}/actions", self.steady),
                json!({"action": if flow == Flow::Stop { "stop" } else { "start" }}),
            ),
            Flow::Idle => return Ok(None),
        };
        Ok(match c.tenant.post(&path, &body) {
            Ok(v) => {
                if let Some(id) = v["id"].as_str().filter(|_| flow == Flow::Create) {
                    self.seen.insert(id.to_string());
                }
                v["operation"].as_str().map(str::to_string)
            }
            Err(e) if e.status == 0 => None,
            Err(e) => bail!("{flow:?}: {e}"),
        })
    }
}

fn log_path(c: &Cloud, d: Daemon) -> std::path::PathBuf {
    match d {
        Daemon::Controller => c.ctl.state_dir.with_extension("log"),
        Daemon::Agent => c.agent.state_dir.with_extension("log"),
    }
}

fn log_len(c: &Cloud, d: Daemon) -> u64 {
    std::fs::metadata(log_path(c, d)).map_or(0, |m| m.len())
}

fn log_since(c: &Cloud, d: Daemon, from: u64) -> String {
    let text = std::fs::read(log_path(c, d)).unwrap_or_default();
    String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned()
}

/// Restarts `d`, with `GANTRY_CRASH_AT=target` when given.
fn restart(c: &mut Cloud, d: Daemon, target: Option<&str>) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = target
        .map(|t| vec![(gantry_crashpoint::ENV.to_string(), t.to_string())])
        .unwrap_or_default();
    match d {
        Daemon::Controller => {
            c.ctl.kill9();
            c.ctl.env = env;
            c.ctl.spawn()
        }
        Daemon::Agent => {
            c.agent.kill9();
            c.agent.env = env;
            c.agent.spawn()
        }
    }
}

/// Waits for `d` to die; checks it died by SIGKILL at `target`.
fn wait_death(c: &mut Cloud, d: Daemon, target: &str, from: u64) -> anyhow::Result<()> {
    let status = match d {
        Daemon::Controller => c.ctl.wait_exit(REACH),
        Daemon::Agent => c.agent.wait_exit(REACH),
    };
    let log = log_since(c, d, from);
    let Some(status) = status else {
        // What the daemon did instead, for the table and the CI log.
        let tail: Vec<&str> = log.lines().rev().take(6).collect();
        bail!(
            "crash point {target} was never reached within {REACH:?}; the {d:?}'s last lines: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    };
    ensure!(
        status.signal() == Some(libc_sigkill()),
        "{d:?} exited with {status}, not by SIGKILL at {target}"
    );
    ensure!(
        log.contains(&format!("crash point {target}: SIGKILL")),
        "{d:?} was SIGKILLed, but not at {target}: {}",
        log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
    );
    Ok(())
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

impl Campaign {
    /// Waits until the host is healthy, no instance has an operation in
    /// flight, no snapshot is Creating, and `op` (when known) has ended.
    fn settle(&self, op: Option<&str>) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < SETTLE {
            match self.settled(op) {
                Ok(None) => return Ok(()),
                Ok(Some(why)) => last = why,
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("the cloud did not settle within {SETTLE:?}: {last}")
    }

    /// `None` when settled, else what is still moving.
    fn settled(&self, op: Option<&str>) -> anyhow::Result<Option<String>> {
        let c = &self.cloud;
        let hosts = c.admin.get("/v1/admin/hosts")?;
        let healthy = hosts.as_array().is_some_and(|a| {
            a.iter()
                .any(|h| h["id"] == c.host.as_str() && h["health"] == "healthy")
        });
        if !healthy {
            return Ok(Some(format!("host not healthy: {hosts}")));
        }
        for i in self.instances()? {
            let fin = matches!(i["state"].as_str(), Some("Released" | "Failed"));
            if !fin && i["allowed_actions"].as_array().is_none_or(|a| a.is_empty()) {
                return Ok(Some(format!("instance busy: {i}")));
            }
        }
        let snaps = c.tenant.get("/v1/snapshots")?;
        if let Some(s) = snaps
            .as_array()
            .and_then(|a| a.iter().find(|s| s["status"] == "Creating"))
        {
            return Ok(Some(format!("snapshot creating: {s}")));
        }
        if let Some(op) = op {
            let o = c.admin.get(&format!("/v1/operations/{op}"))?;
            if !matches!(o["state"].as_str(), Some("succeeded" | "failed")) {
                return Ok(Some(format!("operation in flight: {o}")));
            }
        }
        Ok(None)
    }
}

/// What the controller's ledger says of one instance.
#[derive(Default, Debug)]
struct Billed {
    ms: i64,
    micros: i64,
}

impl Campaign {
    /// Every invariant, after the cloud settled; the first broken one.
    fn check(&self) -> anyhow::Result<()> {
        self.check_domains()?;
        self.check_snapshots()?;
        self.check_ledger(false)
    }

    /// The agent's domains are the controller's live instances.
    fn check_domains(&self) -> anyhow::Result<()> {
        let domains = domains(prefix());
        let live: BTreeSet<String> = self
            .instances()?
            .iter()
            .filter(|i| i["host"] == self.cloud.host.as_str())
            .filter(|i| !matches!(i["state"].as_str(), Some("Released" | "Failed")))
            .filter_map(|i| i["id"].as_str())
            .map(|id| format!("{}{id}", prefix()))
            .collect();
        ensure!(
            domains == live,
            "VM lost or duplicated: libvirt has {domains:?}, the controller's live instances are {live:?}"
        );
        Ok(())
    }

    /// Snapshots of the account in the host's store (id -> owner).
    fn stored_snapshots(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let state = &self.cloud.agent.state_dir;
        let out = std::process::Command::new(gantry_tests::fixture::workspace_bin("gantry-agent"))
            .args(["snapshot", "list", "--json", "--store"])
            .arg(state.join("snapshots"))
            .arg("--keyring")
            .arg(state.join("store-keys.json"))
            .output()?;
        if !out.status.success() && !state.join("snapshots").exists() {
            return Ok(BTreeMap::new());
        }
        ensure!(
            out.status.success(),
            "snapshot list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: Value = serde_json::from_slice(&out.stdout)?;
        Ok(list
            .as_array()
            .context("snapshot list")?
            .iter()
            .filter(|s| s["owner"] == self.cloud.account.as_str())
            .filter_map(|s| Some((s["id"].as_str()?.to_string(), s["owner"].to_string())))
            .collect())
    }

    /// Success and stored, or Failed and not stored; nothing stored that
    /// the controller does not show as Success.
    fn check_snapshots(&self) -> anyhow::Result<()> {
        let stored = self.stored_snapshots()?;
        let shown = self.cloud.tenant.get("/v1/snapshots")?;
        let mut success = BTreeSet::new();
        for s in shown.as_array().context("snapshots")? {
            let id = s["id"].as_str().unwrap_or_default().to_string();
            match s["status"].as_str() {
                Some("Success") => {
                    ensure!(stored.contains_key(&id), "snapshot {id} is Success but not in the store: {s}");
                    success.insert(id);
                }
                Some("Failed") => ensure!(
                    !stored.contains_key(&id),
                    "half-visible snapshot {id}: Failed in the controller, published in the store: {s}"
                ),
                _ => bail!("snapshot {id} is neither Success nor Failed once settled: {s}"),
            }
        }
        for id in stored.keys() {
            ensure!(
                success.contains(id),
                "half-visible snapshot {id}: in the store (billed as storage) but not Success in the controller"
            );
        }
        Ok(())
    }

    /// The ledger per instance.
    fn ledger(&self) -> anyhow::Result<(i64, BTreeMap<String, Billed>)> {
        let recs = self.cloud.admin.get(&format!(
            "/v1/usage?account={}&limit=10000",
            self.cloud.account
        ))?;
        let recs = recs.as_array().context("usage records")?;
        ensure!(recs.len() < 10_000, "the ledger outgrew one page");
        let mut total = 0;
        let mut per = BTreeMap::<String, Billed>::new();
        for r in recs {
            let amount = r["amount_micros"].as_i64().context("amount")?;
            total += amount;
            if r["kind"] == "instance" {
                let b = per
                    .entry(r["instance"].as_str().unwrap_or_default().to_string())
                    .or_default();
                b.ms += r["quantity"].as_i64().context("quantity")?;
                b.micros += amount;
            }
        }
        Ok((total, per))
    }

    /// The credit, the ledger (total, per instance) and each instance's
    /// cost as of one moment: read between two equal readings of the
    /// credit, which every non-zero charge moves (heartbeats keep charging
    /// while the test reads).
    #[allow(clippy::type_complexity)]
    fn consistent_ledger(
        &self,
    ) -> anyhow::Result<(i64, i64, BTreeMap<String, Billed>, HashMap<String, i64>)> {
        let credit = || -> anyhow::Result<i64> {
            let path = format!("/v1/admin/accounts/{}", self.cloud.account);
            self.cloud.admin.get(&path)?["credit_micros"]
                .as_i64()
                .context("credit")
        };
        for _ in 0..20 {
            let before = credit()?;
            let (total, per) = self.ledger()?;
            let costs: HashMap<String, i64> = self
                .instances()?
                .iter()
                .filter_map(|i| Some((i["id"].as_str()?.to_string(), i["cost_micros"].as_i64()?)))
                .collect();
            if credit()? == before {
                return Ok((before, total, per, costs));
            }
        }
        bail!("the credit kept moving while the ledger was read")
    }

    /// Credit is the initial credit less the ledger; each instance's
    /// ledger is its cost, charged once per second it was billed (the
    /// per-second amounts telescope), and no more than libvirt saw it run
    /// (`settled`: and no less than two heartbeats under).
    fn check_ledger(&self, settled: bool) -> anyhow::Result<()> {
        let (credit, total, per, costs) = self.consistent_ledger()?;
        ensure!(
            credit == INITIAL_CREDIT - total,
            "credit {credit} is not the initial {INITIAL_CREDIT} less the ledger's {total}"
        );
        let heartbeat = HEARTBEAT_SECS as i64 * 1000;
        for (id, b) in &per {
            let at = |s: i64| (s as i128 * PRICE_MICROS_PER_HOUR as i128 / 3600) as i64;
            ensure!(
                b.micros == at(b.ms / 1000),
                "instance {id}: the ledger charged {} micros for {} ms (a window charged twice?)",
                b.micros,
                b.ms
            );
            ensure!(
                costs.get(id) == Some(&b.micros),
                "instance {id}: the ledger says {} micros, the instance's cost {:?}",
                b.micros,
                costs.get(id)
            );
            let ran = self.clock.ran_ms(id) as i64;
            if settled {
                eprintln!(
                    "instance {id}: billed {} ms, libvirt had it running {ran} ms in {} runs",
                    b.ms,
                    self.clock.runs(id)
                );
            }
            // Never over-billed by more than one heartbeat (and
            // whole-second billing): the agent counts a start from the
            // guest's power-on. Under-billing is bounded by two: each agent
            // kill between a power change and its record (a start, a stop,
            // a snapshot's switch) is settled at the last heartbeat, up to
            // one heartbeat in the tenant's favour, and the steady instance
            // meets several of them. And each run libvirt saw (a start, a
            // resume) is counted from when the agent sees it, on a loaded
            // host up to a few hundred ms after libvirt's own event.
            let slack = heartbeat + 1000;
            let under = 2 * heartbeat + 1000 + 200 * i64::from(self.clock.runs(id));
            ensure!(
                b.ms <= ran + slack,
                "instance {id}: billed {} ms but libvirt saw it run {ran} ms",
                b.ms
            );
            ensure!(
                !settled || b.ms >= ran - under,
                "instance {id}: billed {} ms but libvirt saw it run {ran} ms",
                b.ms
            );
        }
        if settled {
            for id in &self.seen {
                let ran = self.clock.ran_ms(id) as i64;
                ensure!(
                    per.contains_key(id) || ran <= heartbeat + 1000,
                    "instance {id} ran {ran} ms and was never billed"
                );
            }
        }
        Ok(())
    }

    /// Waits until no instance's billed time changes over two heartbeats.
    fn settle_billing(&self) -> anyhow::Result<()> {
        let billed = || -> anyhow::Result<BTreeMap<String, i64>> {
            Ok(self
                .ledger()?
                .1
                .into_iter()
                .map(|(k, b)| (k, b.ms))
                .collect())
        };
        let start = Instant::now();
        let mut last = billed()?;
        loop {
            std::thread::sleep(Duration::from_secs(2 * HEARTBEAT_SECS + 1));
            let now = billed()?;
            if now == last {
                return Ok(());
            }
            ensure!(start.elapsed() < SETTLE, "billing did not settle: {now:?}");
            last = now;
        }
    }

    /// One planned kill: restart with the target, drive, die, restart,
    /// settle, check. `Err` only when the campaign cannot go on.
    fn kill(&mut self, k: &Kill) -> anyhow::Result<Option<String>> {
        let d = k.daemon();
        let target = k.target();
        self.prepare(k.flow)
            .with_context(|| format!("preparing {:?} for {target}", k.flow))?;
        self.settle(None)?;
        let from = log_len(&self.cloud, d);
        // A point on the daemon's way up (a heartbeat that comes in before
        // the test sees it listen) kills it while it is being started.
        let (op, died) = match restart(&mut self.cloud, d, Some(&target)) {
            Ok(()) => {
                let op = self.drive(k.flow);
                (op, wait_death(&mut self.cloud, d, &target, from))
            }
            Err(_)
                if log_since(&self.cloud, d, from)
                    .contains(&format!("crash point {target}: SIGKILL")) =>
            {
                eprintln!("{target}: reached while the daemon was starting");
                (Ok(None), Ok(()))
            }
            Err(e) => return Err(e),
        };
        restart(&mut self.cloud, d, None)?;
        let op = op?;
        if let Err(e) = died {
            return Ok(Some(e.to_string()));
        }
        if let Err(e) = self.settle(op.as_deref()) {
            return Ok(Some(e.to_string()));
        }
        Ok(self.check().err().map(|e| format!("{e:#}")))
    }
}

fn print_table(rows: &[Row]) {
    eprintln!(
        "\n{:<44} {:<10} {:<15} {:>6}  invariants",
        "point", "daemon", "flow", "secs"
    );
    for r in rows {
        eprintln!(
            "{:<44} {:<10} {:<15} {:>6.1}  {}",
            r.target,
            format!("{:?}", r.daemon),
            format!("{:?}", r.flow),
            r.secs,
            r.problem.as_deref().unwrap_or("OK")
        );
    }
    for d in [Daemon::Controller, Daemon::Agent] {
        let all: Vec<_> = rows.iter().filter(|r| r.daemon == d).collect();
        let ok = all.iter().filter(|r| r.problem.is_none()).count();
        let points: BTreeSet<_> = all.iter().map(|r| r.target.split('#').next()).collect();
        eprintln!(
            "{d:?}: {} kills at {} points, {ok} survived with every invariant",
            all.len(),
            points.len()
        );
    }
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn kill_9_at_every_crash_point_loses_no_vm_snapshot_or_money() -> anyhow::Result<()> {
    for v in ["LIBVIRT_DEFAULT_URI", "GANTRY_GUEST_DIR"] {
        ensure!(
            std::env::var_os(v).is_some(),
            "the crash campaign needs the real-VM rig ({v} is unset): run scripts/setup-host and \
             scripts/build-guest, then source .cache/env/*.env"
        );
    }
    let started = Instant::now();
    let opts = FleetOpts {
        heartbeat_timeout_secs: 60,
        controller_toml: "snapshot_meter_secs = 2\n\
                          snapshot_price_micros_per_tb_hour = 36000000000000\n"
            .into(),
        agent_top: format!("domain_prefix = {:?}\n", prefix()),
        ..FleetOpts::default()
    };
    let cloud = Cloud::start_fleet(&Database::Sqlite, &opts, "")?;
    let clock = DomainClock::start(prefix())?;
    let steady =
        cloud.create(json!({"name": "steady", "flavor": cloud.flavor, "image": cloud.image}))?;
    cloud.wait_state(&steady, "Running")?;
    let mut c = Campaign {
        cloud,
        clock,
        seen: BTreeSet::from([steady.clone()]),
        steady,
        names: 0,
    };
    let only = std::env::var("GANTRY_CRASH_ONLY").ok();
    let mut rows = Vec::new();
    for k in plan() {
        if only.as_deref().is_some_and(|o| !k.target().contains(o)) {
            continue;
        }
        let t = Instant::now();
        let problem = c
            .kill(&k)
            .with_context(|| format!("the campaign stopped at {}", k.target()))?;
        eprintln!(
            "{} ({:?}, {:?}): {} in {:.1}s",
            k.target(),
            k.daemon(),
            k.flow,
            problem.as_deref().unwrap_or("OK"),
            t.elapsed().as_secs_f64()
        );
        rows.push(Row {
            target: k.target(),
            daemon: k.daemon(),
            flow: k.flow,
            secs: t.elapsed().as_secs_f64(),
            problem,
        });
    }
    // Everything released; billing settles; billed equals ran.
    for i in c.instances()? {
        if !matches!(i["state"].as_str(), Some("Released" | "Failed")) {
            c.cloud.act(i["id"].as_str().context("id")?, "release")?;
        }
    }
    c.settle(None)?;
    c.settle_billing()?;
    let final_check = c.check().and_then(|()| c.check_ledger(true));
    print_table(&rows);
    match &final_check {
        Ok(()) => eprintln!("after releasing everything: every invariant holds"),
        Err(e) => eprintln!("after releasing everything: {e:#}"),
    }
    eprintln!("campaign: {:.0} s", started.elapsed().as_secs_f64());
    let failed: Vec<_> = rows.iter().filter(|r| r.problem.is_some()).collect();
    ensure!(
        failed.is_empty(),
        "{} of {} kills broke an invariant or missed their point (first: {} {})",
        failed.len(),
        rows.len(),
        failed[0].target,
        failed[0].problem.as_deref().unwrap_or("")
    );
    final_check.context("after releasing everything")
}
