//! Network groups end to end (issue 15, docs/network-groups.md): a real
//! controller, two agents standing for two hosts (each with its data plane
//! in its own namespace, joined by an underlay veth), and real TCG guests.
//!
//! One cloud, five guests, every assertion of the issue: members on one host
//! and across the two hosts reach each other (ping, TCP, a 1 MiB stream
//! through the overlay's MTU); another group of the same account, a group of
//! another account with the very same CIDR, and the hosts get nothing;
//! spoofing on the group NIC is dropped; leaving a running instance cuts it
//! off and joining again hot-plugs it back; deleting a non-empty group and an
//! overlapping CIDR are refused with a clear message; an agent killed while
//! its tunnel was torn down restores it when it comes back.

use anyhow::{ensure, Context};
use gantry_proto::InstanceId;
use gantry_tests::cloud::{Cloud, ExtraHost, FleetOpts};
use gantry_tests::controller::{Api, Database};
use gantry_tests::fixture::{require_rig, TestAgent, TestVm, OP_TIMEOUT};
use gantry_tests::netns::veth;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The two hosts' underlay addresses (on a veth between their namespaces).
const UNDERLAY_A: &str = "10.78.0.1";
const UNDERLAY_B: &str = "10.78.0.2";

struct World<'a> {
    cloud: &'a Cloud,
    b: &'a ExtraHost,
}

impl World<'_> {
    fn agent_of(&self, id: &str) -> anyhow::Result<&TestAgent> {
        let hw = self
            .cloud
            .admin
            .get(&format!("/v1/instances/{id}/hardware"))?;
        let host = hw["host"]
            .as_str()
            .with_context(|| format!("no host in {hw}"))?;
        Ok(if host == self.cloud.host {
            &self.cloud.agent
        } else {
            &self.b.agent
        })
    }

    fn host_of(&self, id: &str) -> anyhow::Result<String> {
        let hw = self
            .cloud
            .admin
            .get(&format!("/v1/instances/{id}/hardware"))?;
        Ok(hw["host"].as_str().context("host")?.to_string())
    }

    fn vm(&self, id: &str) -> anyhow::Result<TestVm<'_>> {
        TestVm::observe(self.agent_of(id)?, id.parse::<InstanceId>()?)
    }

    /// The instance's address on its group (from its Network Group view).
    fn group_ip(&self, api: &Api, id: &str) -> anyhow::Result<String> {
        let v = api.get(&format!("/v1/instances/{id}/network-group"))?;
        Ok(v["private_ip"]
            .as_str()
            .with_context(|| format!("no private_ip in {v}"))?
            .to_string())
    }

    /// Whether `from` gets an answer to a ping of `ip`.
    fn pings(&self, from: &str, ip: &str) -> anyhow::Result<bool> {
        Ok(self
            .vm(from)?
            .exec(&format!("ping -c1 -W2 {ip} >/dev/null 2>&1"))?
            .status
            == 0)
    }
}

fn wait_until(
    what: &str,
    secs: u64,
    mut ok: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if ok()? {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn id_of(v: &Value) -> anyhow::Result<String> {
    Ok(v["id"]
        .as_str()
        .with_context(|| format!("no id in {v}"))?
        .to_string())
}

/// Creates an instance in `group` as `api`'s account and waits until it runs.
fn create_in(cloud: &Cloud, api: &Api, name: &str, group: &str) -> anyhow::Result<String> {
    let v = api.post(
        "/v1/instances",
        &json!({"name": name, "flavor": cloud.flavor, "image": cloud.image,
                "network_group": group}),
    )?;
    api.wait_op(v["operation"].as_str().context("operation")?, OP_TIMEOUT)?;
    id_of(&v)
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn network_groups_on_one_host_and_across_two() -> anyhow::Result<()> {
    require_rig("network_groups");
    let opts = FleetOpts {
        network_toml: format!("underlay_address = {UNDERLAY_A:?}\n"),
        ..FleetOpts::default()
    };
    let cloud = Cloud::start_fleet(&Database::Sqlite, &opts, "")?;
    // The second host takes VXLAN on another port: the port is configurable.
    let mut b = cloud.add_host_with(
        "e2e-b",
        1,
        &format!("underlay_address = {UNDERLAY_B:?}\nvxlan_port = 4790\n"),
        "",
    )?;
    veth(
        &cloud.host_ns,
        "ul0",
        &format!("{UNDERLAY_A}/24"),
        &b.ns,
        "ul0",
        &format!("{UNDERLAY_B}/24"),
    )?;
    let r = whole(&cloud, &mut b);
    if r.is_err() {
        eprintln!("--- agent A log ---\n{}", cloud.agent.log_tail());
        eprintln!("--- agent B log ---\n{}", b.agent.log_tail());
        eprintln!("--- controller log ---\n{}", cloud.ctl.log_tail());
    }
    r
}

fn whole(cloud: &Cloud, b: &mut ExtraHost) -> anyhow::Result<()> {
    let t = &cloud.tenant;
    let train = id_of(&t.post(
        "/v1/network-groups",
        &json!({"name": "train", "placement": "spread"}),
    )?)?;
    let infer = id_of(&t.post("/v1/network-groups", &json!({"name": "infer"}))?)?;
    let g = t.get(&format!("/v1/network-groups/{train}"))?;
    let cidr = g["cidr"].as_str().context("cidr")?.to_string();
    // A CIDR overlapping one of the account's groups is refused, naming it.
    let bad = t
        .post(
            "/v1/network-groups",
            &json!({"name": "wide", "cidr": "172.16.0.0/12"}),
        )
        .expect_err("an overlapping CIDR was accepted");
    ensure!(
        (400..500).contains(&bad.status) && bad.field.as_deref() == Some("cidr"),
        "overlap answered {bad} (field {:?})",
        bad.field
    );

    // Spread: the two members of "train" land on different hosts. The
    // machine has room for four guests (2 vCPUs per "host").
    let t1 = create_in(cloud, t, "t1", &train)?;
    let t2 = create_in(cloud, t, "t2", &train)?;
    let i1 = create_in(cloud, t, "i1", &infer)?;
    // Another account's group with the very same CIDR as "train".
    let rival = rival_api(cloud)?;
    let other = id_of(&rival.post(
        "/v1/network-groups",
        &json!({"name": "train", "cidr": cidr}),
    )?)?;
    let r1 = create_in(cloud, &rival, "r1", &other)?;
    let w = World { cloud, b };
    ensure!(
        w.host_of(&t1)? != w.host_of(&t2)?,
        "spread placed both members of a group on one host"
    );
    for id in [&t1, &t2, &i1, &r1] {
        w.vm(id)?
            .wait_first_boot()
            .with_context(|| format!("{id}'s first boot"))?;
    }
    let ip = |api: &Api, id: &str| w.group_ip(api, id);
    let (t1_ip, t2_ip, i1_ip) = (ip(t, &t1)?, ip(t, &t2)?, ip(t, &i1)?);
    let r1_ip = ip(&rival, &r1)?;
    view_shows_the_group(t, &t1, &t1_ip, &t2_ip)?;

    // Isolation: another group of the account, another account (same
    // CIDR), in both directions.
    for (from, targets) in [
        (&i1, vec![&t1_ip, &t2_ip]),
        (&r1, vec![&t1_ip, &t2_ip, &i1_ip]),
        (&t1, vec![&i1_ip, &r1_ip]),
    ] {
        let vm = w.vm(from)?;
        vm.exec("ip route add 172.16.0.0/12 dev eth1 2>/dev/null")?;
        for ip in targets
            .into_iter()
            .filter(|ip| **ip != w.group_ip_any(from))
        {
            ensure!(!w.pings(from, ip)?, "{from} reached {ip} outside its group");
        }
    }

    // Across the two hosts.
    reach(&w, t, &t1, &t2, &t2_ip)?;
    // Leave one group and join another while running (hot-plug): i1 shares
    // a host with one member of "train", so that pair is on one host.
    t.delete(&format!("/v1/network-groups/{infer}/members/{i1}"))?;
    t.post(
        &format!("/v1/network-groups/{train}/members"),
        &json!({"instance": i1}),
    )?;
    let i1_ip = ip(t, &i1)?;
    let local = if w.host_of(&i1)? == w.host_of(&t1)? {
        &t1
    } else {
        &t2
    };
    wait_until("i1 to be in its new group", 60, || {
        w.pings(&i1, &ip(t, local)?)
    })?;
    reach(&w, t, local, &i1, &i1_ip)?;
    // The empty group can go now.
    t.delete(&format!("/v1/network-groups/{infer}"))
        .context("deleting the emptied group")?;

    // The hosts get nothing over the group NIC.
    w.vm(&t1)?
        .exec("ip route add 10.78.0.0/24 dev eth1 2>/dev/null")?;
    for host in [UNDERLAY_A, UNDERLAY_B] {
        ensure!(
            !w.pings(&t1, host)?,
            "a guest reached host {host} over its group NIC"
        );
    }
    spoofing_is_dropped(&w, &t1, &t2_ip)?;

    // A non-empty group cannot be deleted.
    let refused = t
        .delete(&format!("/v1/network-groups/{train}"))
        .expect_err("a group with members was deleted");
    ensure!(
        refused.status == 409 && refused.error.contains("member"),
        "deleting a non-empty group answered {refused}"
    );

    // Leave while running: cut off at once; join again: hot-plugged back.
    t.delete(&format!("/v1/network-groups/{train}/members/{t2}"))?;
    wait_until("t2 to be cut off", 30, || Ok(!w.pings(&t1, &t2_ip)?))?;
    t.post(
        &format!("/v1/network-groups/{train}/members"),
        &json!({"instance": t2}),
    )?;
    let t2_ip = ip(t, &t2)?;
    wait_until("t2 to be back in the group", 60, || w.pings(&t1, &t2_ip))?;

    // The restart test pings from the member on the first host (a guest's
    // handle goes through its agent, and the second one is down a while).
    let (pinger, target) = if w.host_of(&t1)? == cloud.host {
        (t1.clone(), t2_ip.clone())
    } else {
        (t2.clone(), t1_ip.clone())
    };
    agent_restart_restores_the_tunnel(cloud, b, &pinger, &target)?;

    // Release everything; the empty groups can go.
    for (api, id) in [(t, &t1), (t, &t2), (t, &i1), (&rival, &r1)] {
        let v = api.post(
            &format!("/v1/instances/{id}/actions"),
            &json!({"action": "release"}),
        )?;
        api.wait_op(v["operation"].as_str().context("operation")?, OP_TIMEOUT)?;
    }
    for (api, g) in [(t, &train), (&rival, &other)] {
        let gone = g.clone();
        wait_until(&format!("group {gone} to be deletable"), 30, || {
            Ok(api.delete(&format!("/v1/network-groups/{gone}")).is_ok())
        })?;
    }
    Ok(())
}

/// `from` reaches `to` at `to_ip` over the group: MTU, ping, a TCP echo
/// that sees `from`'s group address, and a 1 MiB stream.
fn reach(w: &World, t: &Api, from: &str, to: &str, to_ip: &str) -> anyhow::Result<()> {
    let from_ip = w.group_ip(t, from)?;
    let vm = w.vm(from)?;
    ensure!(
        vm.sh("cat /sys/class/net/eth1/mtu")? == "1450",
        "the group NIC's MTU is not 1450"
    );
    wait_until(&format!("{from} to ping {to}"), 30, || w.pings(from, to_ip))?;
    let echo = vm.sh(&format!("echo hi | nc -w 3 {to_ip} 7000"))?;
    ensure!(
        echo.contains(&format!("peer {from_ip}")),
        "TCP echo across the group answered {echo:?}"
    );
    stream(w, from, to, to_ip)
}

impl World<'_> {
    /// The group address of `id` whichever account owns it (admin view).
    fn group_ip_any(&self, id: &str) -> String {
        self.group_ip(&self.cloud.admin, id).unwrap_or_default()
    }
}

/// A second account with credit and a token.
fn rival_api(cloud: &Cloud) -> anyhow::Result<Api> {
    let acct = id_of(&cloud.admin.post(
        "/v1/admin/accounts",
        &json!({"name": "rival", "billing_profile_complete": true}),
    )?)?;
    cloud.admin.post(
        &format!("/v1/admin/accounts/{acct}/credits"),
        &json!({"amount_micros": 1_000_000_000_000i64, "note": "e2e"}),
    )?;
    let tok = cloud.admin.post(
        "/v1/admin/tokens",
        &json!({"name": "rival-e2e", "account": acct}),
    )?;
    Ok(cloud
        .ctl
        .with_token(tok["token"].as_str().context("token")?))
}

fn view_shows_the_group(t: &Api, id: &str, own: &str, peer: &str) -> anyhow::Result<()> {
    let v = t.get(&format!("/v1/instances/{id}/network-group"))?;
    ensure!(v["interface"] == "eth1", "interface in {v}");
    let members = v["group"]["members"].as_array().context("members")?;
    let ips: Vec<&str> = members.iter().filter_map(|m| m["ip"].as_str()).collect();
    ensure!(
        members.len() == 2 && ips.contains(&own) && ips.contains(&peer),
        "the Network Group view lists {v}"
    );
    ensure!(
        members.iter().all(|m| m["state"] == "Running"),
        "members' states in {v}"
    );
    Ok(())
}

/// 1 MiB of random bytes from `from` to `to` over TCP arrives intact (full
/// size segments through the overlay's MTU).
fn stream(w: &World, from: &str, to: &str, to_ip: &str) -> anyhow::Result<()> {
    let rx = w.vm(to)?;
    rx.sh(
        "rm -f /tmp/rx; setsid sh -c 'sleep 60 | nc -l -p 9000 > /tmp/rx' </dev/null >/dev/null 2>&1 & \
         sleep 0.5",
    )?;
    let tx = w.vm(from)?;
    let sent = tx.sh(&format!(
        "dd if=/dev/urandom of=/tmp/tx bs=64k count=16 2>/dev/null; \
         nc -w 3 {to_ip} 9000 < /tmp/tx; md5sum < /tmp/tx"
    ))?;
    let want = sent.lines().last().unwrap_or_default().to_string();
    let r = wait_until("the stream to arrive", 20, || {
        Ok(rx.sh("md5sum < /tmp/rx")? == want)
    });
    if r.is_err() {
        let got = rx.sh("ls -l /tmp/rx; md5sum < /tmp/rx")?;
        let big = tx.exec(&format!("ping -c1 -W2 -s 1400 {to_ip}"))?;
        let mid = tx.exec(&format!("ping -c1 -W2 -s 1000 {to_ip}"))?;
        let links_a = w.cloud.host_ns.run(&["ip", "-o", "link"])?;
        let links_b = w.b.ns.run(&["ip", "-o", "link"])?;
        let guest = tx.sh("ip -o link; ip -o addr")?;
        anyhow::bail!(
            "{from} -> {to}: sent 1048576 bytes ({want}), received: {got}\n\
             ping -s 1400: {big:?}\nping -s 1000: {mid:?}\nhost A:\n{links_a}\nhost B:\n{links_b}\nguest:\n{guest}"
        );
    }
    Ok(())
}

/// A source address or MAC other than the member's own is dropped.
fn spoofing_is_dropped(w: &World, from: &str, peer_ip: &str) -> anyhow::Result<()> {
    let vm = w.vm(from)?;
    let own = w.group_ip_any(from);
    let spoof = own
        .rsplit_once('.')
        .map(|(n, _)| format!("{n}.250"))
        .context("spoof address")?;
    vm.sh(&format!("ip addr add {spoof}/32 dev eth1"))?;
    let spoofed = vm.exec(&format!("ping -c1 -W2 -I {spoof} {peer_ip} >/dev/null"))?;
    vm.sh(&format!("ip addr del {spoof}/32 dev eth1"))?;
    ensure!(spoofed.status != 0, "a spoofed source address got through");
    let mac = vm.sh("cat /sys/class/net/eth1/address")?;
    vm.sh(
        "ip link set eth1 down; ip link set eth1 address 52:54:01:de:ad:01; ip link set eth1 up",
    )?;
    let spoofed_mac = vm.exec(&format!("ping -c1 -W2 {peer_ip} >/dev/null"))?;
    vm.sh(&format!(
        "ip link set eth1 down; ip link set eth1 address {mac}; ip link set eth1 up; \
         ip addr add {own}/24 dev eth1 2>/dev/null; true"
    ))?;
    ensure!(spoofed_mac.status != 0, "a spoofed MAC got through");
    wait_until("the member to be back to normal", 20, || {
        w.pings(from, peer_ip)
    })
}

/// Kill -9 the second host's agent, tear its tunnel down by hand (as a
/// reboot would), start it again: the tunnel is back.
fn agent_restart_restores_the_tunnel(
    cloud: &Cloud,
    b: &mut ExtraHost,
    pinger: &str,
    target: &str,
) -> anyhow::Result<()> {
    b.agent.kill9();
    let links = b.ns.run(&["ip", "-o", "link", "show", "type", "vxlan"])?;
    let mut removed = 0;
    for name in links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_string())
        .filter(|n| n.starts_with("gx-"))
    {
        b.ns.run(&["ip", "link", "del", &name])?;
        removed += 1;
    }
    ensure!(
        removed > 0,
        "host B had no VXLAN device to remove:\n{links}"
    );
    {
        let w = World { cloud, b: &*b };
        ensure!(
            !w.pings(pinger, target)?,
            "the tunnel worked without its VXLAN device"
        );
    }
    b.agent.spawn()?;
    let w = World { cloud, b: &*b };
    wait_until("the restarted agent to restore the tunnel", 60, || {
        w.pings(pinger, target)
    })
}
