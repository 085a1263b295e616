//! A whole small cloud for end-to-end tests: a real controller
//! ([`TestController`]) and a real agent ([`TestAgent`]) that joined it with
//! a join token, an account with credit, a tenant token, a flavor and the
//! test guest as an image — everything set up through the public APIs, as
//! an operator and a tenant would. [`RunClock`] keeps the bounds of the time
//! an instance really ran, to check what was billed.
//!
//! The agent's data plane (access bridge, forwards, HTTPS front) lives in a
//! network namespace the cloud creates ([`Cloud::host_ns`], the host's
//! public side, address [`UPLINK`]), joined by a veth pair to a second one
//! standing for the outside world ([`Cloud::client_ns`], address
//! [`CLIENT`]); tests reach guests only from there (or the host
//! namespace's loopback).

use crate::controller::{Api, Database, TestController};
use crate::fixture::{TestAgent, OP_TIMEOUT};
use crate::guest;
use crate::netns::{veth, Netns};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Heartbeat interval the test controller asks agents for, seconds.
pub const HEARTBEAT_SECS: u64 = 2;
/// Price of the test flavor: 3.6 credits an hour = 1000 micro-units a second.
pub const PRICE_MICROS_PER_HOUR: i64 = 3_600_000_000;

/// The host's address on its uplink (in [`Cloud::host_ns`]).
pub const UPLINK: &str = "10.79.0.1";
/// A client's address on the host's uplink (in [`Cloud::client_ns`]).
pub const CLIENT: &str = "10.79.0.2";
/// An address in the client namespace standing for the controller's (the
/// agent's `network.deny`): guests must not reach it.
pub const DENIED: &str = "10.79.0.3";
/// The HTTPS domain suffix of the test controller: the host's domain is
/// `e2e-host.<suffix>`.
pub const DOMAIN_SUFFIX: &str = "gantry.test";

/// Knobs of a cloud with several hosts ([`Cloud::start_fleet`]).
#[derive(Clone, Debug)]
pub struct FleetOpts {
    /// The controller's `heartbeat_timeout_secs` (a host silent this long
    /// is down).
    pub heartbeat_timeout_secs: u64,
    /// More top-level controller config lines.
    pub controller_toml: String,
    /// Top-level agent config lines (e.g. `snapshot_store = "s3://..."`),
    /// for every host of the cloud.
    pub agent_top: String,
    /// More lines of the first host's `[network]` table (e.g. its
    /// `underlay_address`).
    pub network_toml: String,
}

impl Default for FleetOpts {
    fn default() -> Self {
        Self {
            heartbeat_timeout_secs: 30,
            controller_toml: String::new(),
            agent_top: String::new(),
            network_toml: String::new(),
        }
    }
}

pub struct Cloud {
    pub ctl: TestController,
    pub agent: TestAgent,
    pub admin: Api,
    pub tenant: Api,
    /// The tenant's token (for `gantryctl`).
    pub tenant_token: String,
    pub account: String,
    pub flavor: String,
    pub image: String,
    pub host: String,
    /// Dropped after the agent (fields drop in order), so no VM's tap
    /// outlives its namespace.
    pub host_ns: Netns,
    pub client_ns: Netns,
    /// Top-level agent config lines every host gets ([`FleetOpts`]).
    pub agent_top: String,
}

fn id_of(v: &Value) -> anyhow::Result<String> {
    v["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no id in {v}"))
}

impl Cloud {
    /// Controller, join token, agent (joined), flavor, image, account,
    /// credit and tenant token.
    pub fn start(db: &Database) -> anyhow::Result<Self> {
        Self::start_with(db, "")
    }

    /// [`Cloud::start`] with extra TOML for the agent (whole tables, such
    /// as `[gpu]`).
    pub fn start_with(db: &Database, agent_toml: &str) -> anyhow::Result<Self> {
        Self::start_fleet(db, &FleetOpts::default(), agent_toml)
    }

    /// [`Cloud::start_with`] with the fleet knobs of [`FleetOpts`].
    pub fn start_fleet(db: &Database, o: &FleetOpts, agent_toml: &str) -> anyhow::Result<Self> {
        let host_ns = Netns::new("host")?;
        let client_ns = Netns::new("cli")?;
        veth(
            &host_ns,
            "up0",
            &format!("{UPLINK}/24"),
            &client_ns,
            "cl0",
            &format!("{CLIENT}/24"),
        )?;
        client_ns.run(&["ip", "addr", "add", &format!("{DENIED}/24"), "dev", "cl0"])?;
        host_ns.run(&["ip", "route", "add", "default", "via", CLIENT])?;
        let ctl = TestController::start(
            db,
            &format!(
                "heartbeat_secs = {HEARTBEAT_SECS}\nheartbeat_timeout_secs = {}\nreconcile_secs = 1\n\
                 host_domain_suffix = {DOMAIN_SUFFIX:?}\n{}",
                o.heartbeat_timeout_secs, o.controller_toml
            ),
        )?;
        let admin = ctl.admin();
        let jt = admin.post("/v1/admin/join-tokens", &json!({}))?;
        let token = jt["token"].as_str().context("join token")?;
        let agent = TestAgent::start_with(&format!(
            "{}\n[controller]\nurl = {:?}\njoin_token = {token:?}\nhost_name = \"e2e-host\"\n\
             address = {UPLINK:?}\npoll_wait_secs = 5\n\n\
             [network]\nnetns = {:?}\nhttps_listen = \"0.0.0.0:443\"\ndeny = [\"{DENIED}/32\"]\n\
             drift_check_secs = 2\n{}\n\n{agent_toml}\n",
            o.agent_top, ctl.url, host_ns.name, o.network_toml
        ))?;
        let hosts = admin.wait_for(
            "/v1/admin/hosts",
            Duration::from_secs(60),
            "the agent to join",
            |v| {
                v.as_array().is_some_and(|a| {
                    a.iter()
                        .any(|h| h["name"] == "e2e-host" && h["health"] == "healthy")
                })
            },
        )?;
        let host = hosts
            .as_array()
            .and_then(|a| a.iter().find(|h| h["name"] == "e2e-host"))
            .map(id_of)
            .context("joined host")??;
        let g = guest::guest_image()?;
        let image = id_of(&admin.post(
            "/v1/admin/images",
            &json!({
                "name": "test-guest",
                "size_gib": 1,
                "origin": {
                    "from": "file",
                    "disk": g.disk.display().to_string(),
                    "kernel": g.kernel.display().to_string(),
                    "initrd": g.initrd.display().to_string(),
                    "cmdline": g.cmdline,
                }
            }),
        )?)?;
        let flavor = id_of(&admin.post(
            "/v1/admin/flavors",
            &json!({"name": "tiny", "vcpus": 1, "memory_mib": 256, "root_disk_gib": 1,
                    "price_micros_per_hour": PRICE_MICROS_PER_HOUR}),
        )?)?;
        let account = id_of(&admin.post(
            "/v1/admin/accounts",
            &json!({"name": "acme", "billing_profile_complete": true}),
        )?)?;
        admin.post(
            &format!("/v1/admin/accounts/{account}/credits"),
            &json!({"amount_micros": 1_000_000_000_000i64, "note": "e2e"}),
        )?;
        let t = admin.post(
            "/v1/admin/tokens",
            &json!({"name": "acme-e2e", "account": account}),
        )?;
        let tenant_token = t["token"].as_str().context("tenant token")?.to_string();
        let tenant = ctl.with_token(&tenant_token);
        Ok(Cloud {
            ctl,
            agent,
            admin,
            tenant,
            tenant_token,
            account,
            flavor,
            image,
            host,
            host_ns,
            client_ns,
            agent_top: o.agent_top.clone(),
        })
    }

    /// Creates an instance as the tenant; returns its id once the create
    /// operation has succeeded.
    pub fn create(&self, body: Value) -> anyhow::Result<String> {
        let v = self.tenant.post("/v1/instances", &body)?;
        let op = v["operation"].as_str().context("create operation")?;
        self.tenant.wait_op(op, OP_TIMEOUT)?;
        id_of(&v)
    }

    /// Runs an action as the tenant and waits for its operation.
    pub fn act(&self, id: &str, action: &str) -> anyhow::Result<()> {
        let v = self.tenant.post(
            &format!("/v1/instances/{id}/actions"),
            &json!({ "action": action }),
        )?;
        let op = v["operation"].as_str().context("action operation")?;
        self.tenant.wait_op(op, OP_TIMEOUT)?;
        Ok(())
    }

    /// Takes a snapshot of `id` named `name` as the tenant and waits until
    /// it is saved; returns its id and its final view (status `Success`).
    pub fn snapshot(&self, id: &str, name: &str) -> anyhow::Result<(String, Value)> {
        let snap = self.tenant.post(
            &format!("/v1/instances/{id}/snapshots"),
            &json!({ "name": name }),
        )?;
        let sid = snap["id"].as_str().context("snapshot id")?.to_string();
        let done = self.tenant.wait_for(
            &format!("/v1/snapshots/{sid}"),
            OP_TIMEOUT,
            &format!("snapshot {name:?} of {id}"),
            |v| v["status"] != "Creating",
        )?;
        anyhow::ensure!(
            done["status"] == "Success",
            "snapshot {name:?} of {id}: {done}"
        );
        Ok((sid, done))
    }

    /// Waits until the controller reports the instance in `state`.
    pub fn wait_state(&self, id: &str, state: &str) -> anyhow::Result<()> {
        let want = state.to_string();
        self.admin
            .wait_for(
                &format!("/v1/instances?account={}&limit=1000", self.account),
                OP_TIMEOUT,
                &format!("instance {id} to be {state}"),
                |v| {
                    v.as_array().is_some_and(|a| {
                        a.iter()
                            .any(|i| i["id"] == id && i["state"] == want.as_str())
                    })
                },
            )
            .map(|_| ())
    }

    /// The controller's billing view of an instance (admin).
    pub fn billed_ms(&self, id: &str) -> anyhow::Result<u64> {
        // Released instances answer only config/hardware views; the ledger
        // answers for every instance.
        let recs = self.admin.get(&format!(
            "/v1/usage?account={}&instance={id}&limit=10000",
            self.account
        ))?;
        let recs = recs.as_array().context("usage records")?;
        Ok(recs
            .iter()
            .filter(|r| r["kind"] == "instance")
            .map(|r| r["quantity"].as_u64().unwrap_or(0))
            .sum())
    }

    /// Waits until billing of `id` has settled (no change over two
    /// heartbeats); returns the billed milliseconds.
    pub fn settled_billed_ms(&self, id: &str) -> anyhow::Result<u64> {
        let mut last = self.billed_ms(id)?;
        let start = Instant::now();
        loop {
            std::thread::sleep(Duration::from_secs(2 * HEARTBEAT_SECS + 1));
            let now = self.billed_ms(id)?;
            if now == last {
                return Ok(now);
            }
            last = now;
            if start.elapsed() > Duration::from_secs(120) {
                bail!("billing of {id} did not settle");
            }
        }
    }
}

/// Another host of a [`Cloud`]: a second agent (own state directory,
/// API port and data-plane namespace) joined to the same controller.
pub struct ExtraHost {
    pub agent: TestAgent,
    /// The host's id in the controller.
    pub id: String,
    pub name: String,
    /// Its uplink address (in `ns`), reachable from the cloud's client
    /// namespace.
    pub uplink: String,
    /// Dropped after the agent.
    pub ns: Netns,
}

impl Cloud {
    /// Joins another host `name` (its uplink `10.79.<n>.1/24`, n >= 1,
    /// linked to the client namespace) with a fresh join token; `agent_toml`
    /// as in [`Cloud::start_with`] (whole tables). Its libvirt domains are
    /// named `gantry-h<n>-<instance>` (both agents share one libvirtd).
    pub fn add_host(&self, name: &str, n: u8, agent_toml: &str) -> anyhow::Result<ExtraHost> {
        self.add_host_with(name, n, "", agent_toml)
    }

    /// [`Cloud::add_host`] with more lines for its `[network]` table.
    pub fn add_host_with(
        &self,
        name: &str,
        n: u8,
        network_toml: &str,
        agent_toml: &str,
    ) -> anyhow::Result<ExtraHost> {
        anyhow::ensure!(n >= 1, "subnet 0 is the first host's");
        let ns = Netns::new(&format!("h{n}"))?;
        let uplink = format!("10.79.{n}.1");
        veth(
            &ns,
            "up0",
            &format!("{uplink}/24"),
            &self.client_ns,
            &format!("cl{n}"),
            &format!("10.79.{n}.2/24"),
        )?;
        ns.run(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("10.79.{n}.2"),
        ])?;
        let jt = self.admin.post("/v1/admin/join-tokens", &json!({}))?;
        let token = jt["token"].as_str().context("join token")?;
        let agent = TestAgent::start_another(
            &self.agent,
            &format!(
                "{}domain_prefix = \"gantry-h{n}-\"\n\n[controller]\nurl = {:?}\njoin_token = {token:?}\nhost_name = {name:?}\n\
                 address = {uplink:?}\npoll_wait_secs = 5\n\n\
                 [network]\nnetns = {:?}\nhttps_listen = \"0.0.0.0:443\"\ndeny = [\"{DENIED}/32\"]\n\
                 drift_check_secs = 2\n{network_toml}\n\n{agent_toml}\n",
                self.agent_top, self.ctl.url, ns.name
            ),
        )?;
        let want = name.to_string();
        let hosts = self.admin.wait_for(
            "/v1/admin/hosts",
            Duration::from_secs(60),
            &format!("host {name} to join"),
            |v| {
                v.as_array().is_some_and(|a| {
                    a.iter()
                        .any(|h| h["name"] == want.as_str() && h["health"] == "healthy")
                })
            },
        )?;
        let id = hosts
            .as_array()
            .and_then(|a| a.iter().find(|h| h["name"] == name))
            .map(id_of)
            .context("joined host")??;
        Ok(ExtraHost {
            agent,
            id,
            name: name.to_string(),
            uplink,
            ns,
        })
    }
}

/// Bounds on how long an instance really ran: each Running period starts
/// between the request and the controller reporting Running, and ends
/// between the request to stop and the report that it stopped.
#[derive(Default, Debug)]
pub struct RunClock {
    min: Duration,
    max: Duration,
    started: Option<(Instant, Instant)>,
}

impl RunClock {
    /// A Running period began somewhere in `[asked, seen]`.
    pub fn started(&mut self, asked: Instant, seen: Instant) {
        self.started = Some((asked, seen));
    }

    /// The current period ended somewhere in `[asked, seen]`.
    pub fn stopped(&mut self, asked: Instant, seen: Instant) {
        if let Some((a, s)) = self.started.take() {
            self.min += asked.saturating_duration_since(s);
            self.max += seen.saturating_duration_since(a);
        }
    }

    /// Checks `billed_ms` lies within the bounds, widened by one heartbeat
    /// interval and the billing granularity (whole seconds).
    pub fn check(&self, billed_ms: u64) -> anyhow::Result<()> {
        let slack = Duration::from_secs(HEARTBEAT_SECS + 1);
        let lo = self.min.saturating_sub(slack).as_millis() as u64;
        let hi = (self.max + slack).as_millis() as u64;
        eprintln!("billed {billed_ms} ms; the instance ran between {lo} and {hi} ms");
        if billed_ms < lo || billed_ms > hi {
            bail!(
                "billed {billed_ms} ms, but the instance ran between {lo} and {hi} ms ({self:?})"
            );
        }
        Ok(())
    }
}
