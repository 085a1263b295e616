//! Network groups for real, without VMs: two "hosts" (network namespaces
//! joined by an underlay veth), one [`Groups`] each (real rtnetlink, real
//! nftables), "guests" that are namespaces on veth pairs whose host ends
//! are named like group taps and created in the root namespace (as libvirt
//! does), so `apply` must move them in. Asserts what members see: same-host
//! and cross-host (VXLAN) ping and TCP; another group reaches nothing; the
//! hosts are out of reach; spoofed addresses are dropped; a removed member
//! is cut off at once; a restart and a "reboot" (links deleted by hand,
//! rules flushed, taps back in the root namespace) converge again; VXLAN
//! from a non-peer is dropped (while the same packet from the peer passes).

use gantry_agent::config::NetworkConfig;
use gantry_agent::net::groups::{group_tap_name, Groups};
use gantry_agent::net::netns::Netns as DataPlane;
use gantry_proto::groups::{group_mac, GroupMember, GroupSpec, HostGroups, Vtep, VXLAN_PORT};
use gantry_proto::{InstanceId, NetworkGroupId};
use gantry_tests::netns::{veth, Netns};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

const UNDERLAY: [&str; 2] = ["10.78.0.1", "10.78.0.2"];
const ROGUE: &str = "10.79.0.2";
const T: Duration = Duration::from_secs(2);

struct Guest {
    id: InstanceId,
    ns: Netns,
    ip: Ipv4Addr,
    /// 0 or 1: the host it runs on.
    host: usize,
    vni: u32,
}

struct Host {
    ns: Netns,
    groups: Groups,
    state: tempfile::TempDir,
}

struct Rig {
    hosts: Vec<Host>,
    guests: Vec<Guest>,
    rogue: Netns,
    /// Members taken out of the state.
    removed: Vec<InstanceId>,
}

fn needs_root() {
    assert!(
        gantry_tests::netns::available(),
        "this test needs root and network namespaces: run it with ./scripts/test"
    );
}

/// A guest namespace with `eth1` at `ip`; the host end (the group tap) is
/// left in the root namespace, down, as libvirt leaves a tap.
fn guest(ip: &str, host: usize, vni: u32) -> Guest {
    let id = InstanceId::new();
    let ns = Netns::new("g").unwrap();
    let ip: Ipv4Addr = ip.parse().unwrap();
    let tap = group_tap_name(id);
    let out = std::process::Command::new("ip")
        .args(["link", "add", &tap, "type", "veth", "peer", "name", "eth1"])
        .args(["netns", &ns.name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mac = group_mac(ip).to_string();
    ns.sh(&format!(
        "ip link set eth1 address {mac} mtu 1450 up && ip addr add {ip}/24 dev eth1"
    ))
    .unwrap();
    serve_echo(&ns);
    Guest {
        id,
        ns,
        ip,
        host,
        vni,
    }
}

/// TCP 7000 echo in `ns`.
fn serve_echo(ns: &Netns) {
    ns.spawn(|| {
        let l = TcpListener::bind("0.0.0.0:7000").unwrap();
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    })
    .unwrap();
}

fn ping(from: &Netns, to: Ipv4Addr) -> bool {
    from.run(&["ping", "-c1", "-W1", &to.to_string()]).is_ok()
}

/// Pings up to three times (the first may wait for ARP).
fn reaches(from: &Netns, to: Ipv4Addr) -> bool {
    (0..3).any(|_| ping(from, to))
}

/// A TCP round trip of 64 KiB from `from` to `to:7000`.
fn tcp(from: &Netns, to: Ipv4Addr) -> bool {
    let to = SocketAddr::from((to, 7000));
    from.enter(move || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&to, T)?;
        s.set_read_timeout(Some(T))?;
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        s.write_all(&data)?;
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back)?;
        Ok(back == data)
    })
    .unwrap()
    .unwrap_or(false)
}

fn cfg(host: &Netns, i: usize) -> NetworkConfig {
    NetworkConfig {
        netns: Some(host.name.clone()),
        https_listen: String::new(),
        underlay_address: Some(UNDERLAY[i].parse().unwrap()),
        vxlan_port: VXLAN_PORT,
        ..NetworkConfig::default()
    }
}

fn open(host: &Netns, i: usize, state: &std::path::Path) -> Groups {
    let dp = DataPlane::named(&host.name).unwrap();
    Groups::open_real(&cfg(host, i), dp, state).unwrap()
}

impl Rig {
    fn new() -> Rig {
        let a = Netns::new("ha").unwrap();
        let b = Netns::new("hb").unwrap();
        let rogue = Netns::new("r").unwrap();
        veth(&a, "ul0", "10.78.0.1/24", &b, "ul0", "10.78.0.2/24").unwrap();
        veth(
            &a,
            "ul1",
            "10.79.0.1/24",
            &rogue,
            "r0",
            &format!("{ROGUE}/24"),
        )
        .unwrap();
        rogue
            .run(&["ip", "route", "add", "10.78.0.0/24", "via", "10.79.0.1"])
            .unwrap();
        // Host A routes: a guest reaching through it would get anywhere.
        a.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
        let guests = vec![
            guest("172.16.0.2", 0, 5000), // a1
            guest("172.16.0.3", 0, 5000), // a2
            guest("172.16.0.4", 1, 5000), // b1
            guest("172.16.0.5", 0, 5001), // x: another group, same addresses
            guest("172.16.0.6", 1, 5001), // y
        ];
        let hosts = [a, b]
            .into_iter()
            .enumerate()
            .map(|(i, ns)| {
                let state = tempfile::tempdir().unwrap();
                let groups = open(&ns, i, state.path());
                Host { ns, groups, state }
            })
            .collect();
        let r = Rig {
            hosts,
            guests,
            rogue,
            removed: vec![],
        };
        r.set_all(1);
        r
    }

    /// Host `h`'s view of the groups.
    fn state(&self, h: usize, rev: u64) -> HostGroups {
        let mut groups = Vec::new();
        for vni in [5000, 5001] {
            let members: Vec<GroupMember> = self
                .guests
                .iter()
                .filter(|g| g.vni == vni && !self.removed.contains(&g.id))
                .map(|g| GroupMember {
                    instance: g.id,
                    mac: group_mac(g.ip),
                    ip: g.ip,
                    local: g.host == h,
                    vtep: (g.host != h).then(|| Vtep {
                        address: UNDERLAY[g.host].parse().unwrap(),
                        port: VXLAN_PORT,
                    }),
                })
                .collect();
            if members.iter().any(|m| m.local) {
                groups.push(GroupSpec {
                    id: NetworkGroupId::from_uuid(uuid::Uuid::from_u128(vni.into())),
                    vni,
                    cidr: "172.16.0.0/24".parse().unwrap(),
                    mtu: 1450,
                    members,
                });
            }
        }
        HostGroups { rev, groups }
    }

    fn running(&self, h: usize) -> Vec<InstanceId> {
        self.guests
            .iter()
            .filter(|g| g.host == h)
            .map(|g| g.id)
            .collect()
    }

    fn set_all(&self, rev: u64) {
        for (i, h) in self.hosts.iter().enumerate() {
            h.groups.set(self.state(i, rev), &self.running(i)).unwrap();
            assert!(h.groups.problems().is_empty(), "{:?}", h.groups.problems());
        }
    }

    fn g(&self, i: usize) -> &Guest {
        &self.guests[i]
    }
}

/// The packets counted by the rule of `chain` in `family gantry_groups`
/// whose text contains `needle`, on host `h`.
fn counter(h: &Netns, family: &str, chain: &str, needle: &str) -> u64 {
    let out = h
        .run(&["nft", "list", "chain", family, "gantry_groups", chain])
        .unwrap();
    let line = out
        .lines()
        .find(|l| l.contains(needle) && l.contains("counter"))
        .unwrap_or_else(|| panic!("no counted rule with {needle:?} in:\n{out}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    let i = w.iter().position(|x| *x == "packets").unwrap();
    w[i + 1].parse().unwrap()
}

/// A VXLAN packet for VNI `vni` carrying UDP `payload` from `src` to
/// `dst:port` inside the group.
fn vxlan_packet(
    vni: u32,
    src: (Ipv4Addr, [u8; 6]),
    dst: (Ipv4Addr, [u8; 6]),
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&dst.1);
    p.extend_from_slice(&src.1);
    p.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.0.octets());
    ip.extend_from_slice(&dst.0.octets());
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// Sends `packet` from `from` (bound to `src`) to host A's VXLAN port and
/// says whether guest `to` got the inner UDP payload on port 7777.
fn inject(from: &Netns, src: &str, to: &Netns, packet: Vec<u8>) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    to.spawn(move || {
        let u = UdpSocket::bind("0.0.0.0:7777").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 64];
        let got = u.recv(&mut buf).ok().map(|n| buf[..n].to_vec());
        // Closed before answering, so the next call can bind the port.
        drop(u);
        let _ = tx.send(got);
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let src = format!("{src}:0");
    from.enter(move || {
        let u = UdpSocket::bind(src).unwrap();
        u.send_to(&packet, (UNDERLAY[0], VXLAN_PORT)).unwrap();
    })
    .unwrap();
    rx.recv().unwrap().is_some_and(|b| b == b"crafted")
}

#[test]
#[ignore = "needs root and network namespaces: ./scripts/test runs it"]
fn groups_connect_members_and_nothing_else() {
    needs_root();
    let r = Rig::new();
    let (a1, a2, b1, x, y) = (r.g(0), r.g(1), r.g(2), r.g(3), r.g(4));
    // Taps were moved out of the root namespace and onto their bridges.
    let tap = group_tap_name(a1.id);
    assert!(std::process::Command::new("ip")
        .args(["link", "show", &tap])
        .output()
        .map(|o| !o.status.success())
        .unwrap());
    let link = r.hosts[0]
        .ns
        .run(&["ip", "-o", "link", "show", &tap])
        .unwrap();
    assert!(
        link.contains("master gn-001388") && link.contains("mtu 1450"),
        "{link}"
    );

    assert!(reaches(&a1.ns, a2.ip), "same host");
    assert!(tcp(&a1.ns, a2.ip), "same host TCP");
    assert!(reaches(&a1.ns, b1.ip), "across hosts (VXLAN)");
    assert!(tcp(&b1.ns, a1.ip), "across hosts TCP");
    assert!(reaches(&x.ns, y.ip), "the other group works too");
    for (from, to) in [(x, a1), (x, a2), (x, b1), (y, a1), (a1, x), (b1, y)] {
        assert!(
            !ping(&from.ns, to.ip),
            "{} reached {} in another group",
            from.ip,
            to.ip
        );
        assert!(!tcp(&from.ns, to.ip));
    }
}

#[test]
#[ignore = "needs root and network namespaces: ./scripts/test runs it"]
fn members_cannot_reach_hosts_or_spoof() {
    needs_root();
    let r = Rig::new();
    let (a1, a2) = (r.g(0), r.g(1));
    assert!(reaches(&a1.ns, a2.ip));
    // Route through host A via its bridge's MAC, as a guest would try.
    let mac = r.hosts[0]
        .ns
        .run(&["cat", "/sys/class/net/gn-001388/address"])
        .unwrap();
    a1.ns
        .sh(&format!(
            "ip neigh add 172.16.0.1 lladdr {} dev eth1 nud permanent && \
             ip route add default via 172.16.0.1",
            mac.trim()
        ))
        .unwrap();
    let before = counter(&r.hosts[0].ns, "bridge", "to_host", "gg-");
    for to in [UNDERLAY[0], UNDERLAY[1], "10.79.0.1", ROGUE] {
        assert!(!ping(&a1.ns, to.parse().unwrap()), "a member reached {to}");
    }
    let after = counter(&r.hosts[0].ns, "bridge", "to_host", "gg-");
    assert!(
        after >= before + 4,
        "dropped by the groups' rule: {before} -> {after}"
    );

    // A spoofed source address, then a spoofed MAC: nothing passes.
    a1.ns
        .run(&["ip", "addr", "add", "172.16.0.9/32", "dev", "eth1"])
        .unwrap();
    assert!(a1
        .ns
        .run(&["ping", "-c1", "-W1", "-I", "172.16.0.9", "172.16.0.3"])
        .is_err());
    a1.ns
        .run(&["ip", "addr", "del", "172.16.0.9/32", "dev", "eth1"])
        .unwrap();
    a1.ns
        .run(&["ip", "link", "set", "eth1", "address", "52:54:01:00:00:99"])
        .unwrap();
    a2.ns.run(&["ip", "neigh", "flush", "all"]).unwrap();
    assert!(!ping(&a1.ns, a2.ip), "a spoofed MAC passed");
    let own = group_mac(a1.ip).to_string();
    a1.ns
        .run(&["ip", "link", "set", "eth1", "address", &own])
        .unwrap();
    assert!(
        reaches(&a1.ns, a2.ip),
        "the member's own addresses pass again"
    );
}

#[test]
#[ignore = "needs root and network namespaces: ./scripts/test runs it"]
fn removal_restart_and_reboot_converge() {
    needs_root();
    let mut r = Rig::new();
    let (a1, a2, b1) = (r.g(0).id, r.g(1).id, r.g(2).id);
    assert!(reaches(&r.g(0).ns, r.g(1).ip) && reaches(&r.g(0).ns, r.g(2).ip));
    // a2 and b1 leave the group: cut off at once.
    r.removed = vec![a2, b1];
    r.set_all(2);
    assert!(
        !ping(&r.g(0).ns, r.g(1).ip),
        "a removed local member still answers"
    );
    assert!(
        !ping(&r.g(0).ns, r.g(2).ip),
        "a removed remote member still answers"
    );
    let links = r.hosts[1].ns.run(&["ip", "-o", "link"]).unwrap();
    assert!(
        !links.contains("gn-001388"),
        "host B keeps a group it has no member of"
    );
    r.removed.clear();
    r.set_all(3);
    assert!(reaches(&r.g(0).ns, r.g(1).ip) && reaches(&r.g(0).ns, r.g(2).ip));

    // Agent restart: a fresh Groups re-applies from groups.json.
    let Host { ns, state, groups } = r.hosts.remove(0);
    drop(groups);
    ns.run(&["nft", "delete", "table", "inet", "gantry_groups"])
        .unwrap();
    let groups = open(&ns, 0, state.path());
    assert_eq!(groups.rev(), Some(3));
    groups.apply(&r.running(0)).unwrap();
    let rules = ns
        .run(&["nft", "list", "table", "inet", "gantry_groups"])
        .unwrap();
    assert!(rules.contains("@th,96,24 0x1388"), "{rules}");
    r.hosts.insert(0, Host { ns, state, groups });
    assert!(reaches(&r.g(0).ns, r.g(2).ip), "after a restart");

    // "Reboot": links and rules gone, taps back in the root namespace.
    let h = &r.hosts[0].ns;
    h.sh(
        "ip link del gx-001388; ip link del gn-001388; ip link del gx-001389; \
          ip link del gn-001389; nft flush ruleset",
    )
    .unwrap();
    for id in [a1, a2] {
        h.run(&["ip", "link", "set", &group_tap_name(id), "netns", "1"])
            .unwrap();
    }
    assert!(!ping(&r.g(0).ns, r.g(2).ip));
    r.hosts[0].groups.apply(&r.running(0)).unwrap();
    assert!(
        r.hosts[0].groups.problems().is_empty(),
        "{:?}",
        r.hosts[0].groups.problems()
    );
    assert!(reaches(&r.g(0).ns, r.g(1).ip), "same host after a reboot");
    assert!(
        reaches(&r.g(0).ns, r.g(2).ip),
        "across hosts after a reboot"
    );
}

#[test]
#[ignore = "needs root and network namespaces: ./scripts/test runs it"]
fn vxlan_from_a_non_peer_is_dropped() {
    needs_root();
    let r = Rig::new();
    let (a1, b1) = (r.g(0), r.g(2));
    assert!(reaches(&b1.ns, a1.ip));
    let packet = |vni| {
        vxlan_packet(
            vni,
            (b1.ip, group_mac(b1.ip).0),
            (a1.ip, group_mac(a1.ip).0),
            7777,
            b"crafted",
        )
    };
    // The peer's packet passes (the crafted packet is good)...
    assert!(inject(&r.hosts[1].ns, UNDERLAY[1], &a1.ns, packet(5000)));
    // ... the same from a non-peer does not, nor the peer's on a VNI it
    // shares no group on with this host... (5001 is shared: use 5002).
    let before = counter(&r.hosts[0].ns, "inet", "input", "udp dport");
    assert!(!inject(&r.rogue, ROGUE, &a1.ns, packet(5000)));
    assert!(!inject(&r.hosts[1].ns, UNDERLAY[1], &a1.ns, packet(5002)));
    let after = counter(&r.hosts[0].ns, "inet", "input", "udp dport");
    assert_eq!(after, before + 2, "both dropped by the VXLAN rule");
}
