//! The access data plane for real, without VMs: the agent's [`Network`]
//! in a "host" network namespace the test creates, "guests" that are
//! namespaces on veth pairs named like guests' taps, and a "client"
//! namespace on the host's uplink. Real nftables, real conntrack, real
//! bridge. Asserts what users see: forwards reach the guest with the
//! client's address, on loopback and by hairpin; deleted forwards refuse
//! (UDP flows included); a re-apply keeps open connections; the guard
//! drops spoofed frames and keeps guests off the host, denied networks and
//! each other; drift is repaired.

use gantry_agent::config::NetworkConfig;
use gantry_agent::net::{plan::tap_name, Applied, Network};
use gantry_proto::net::{ForwardSpec, HostAccess, MacAddr, NicSpec, Protocol};
use gantry_proto::{ForwardId, InstanceId};
use gantry_tests::netns::{veth, Netns};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

const UPLINK: &str = "10.77.0.1";
const CLIENT: &str = "10.77.0.2";
/// An address in the client namespace standing for the controller.
const DENIED: &str = "10.77.0.3";
const T: Duration = Duration::from_secs(2);

struct Guest {
    id: InstanceId,
    ns: Netns,
    ip: Ipv4Addr,
}

struct Rig {
    host: Netns,
    client: Netns,
    guests: Vec<Guest>,
    net: Network,
    _state: tempfile::TempDir,
}

fn nic(ip: Ipv4Addr) -> NicSpec {
    NicSpec {
        mac: MacAddr::for_ip(ip),
        ip,
        subnet: "10.200.0.0/24".parse().unwrap(),
        gateway: "10.200.0.1".parse().unwrap(),
    }
}

/// Serves TCP 7000 (writes `peer <ip>` then echoes) and UDP 7001 (answers
/// `peer <ip> <payload>`) inside `ns`, like the test guest does.
fn serve_echo(ns: &Netns, bind: &str) {
    let b = bind.to_string();
    ns.spawn(move || {
        let l = TcpListener::bind((b.as_str(), 7000)).unwrap();
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let peer = s
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let _ = writeln!(s, "peer {peer}");
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
    let b = bind.to_string();
    ns.spawn(move || {
        let u = UdpSocket::bind((b.as_str(), 7001)).unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = u.recv_from(&mut buf) {
            let reply = format!("peer {} {}", from.ip(), String::from_utf8_lossy(&buf[..n]));
            let _ = u.send_to(reply.as_bytes(), from);
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
}

fn fwd(g: &Guest, protocol: Protocol, host_port: u16, guest_port: u16) -> ForwardSpec {
    ForwardSpec {
        id: ForwardId::new(),
        instance: g.id,
        protocol,
        host_port,
        guest_port,
        https: false,
    }
}

fn access(rev: u64, forwards: Vec<ForwardSpec>) -> HostAccess {
    HostAccess {
        rev,
        subnet: "10.200.0.0/24".parse().unwrap(),
        gateway: "10.200.0.1".parse().unwrap(),
        domain: None,
        forwards,
    }
}

impl Rig {
    fn new(guests: usize) -> Rig {
        let host = Netns::new("h").unwrap();
        let client = Netns::new("c").unwrap();
        veth(
            &host,
            "up0",
            &format!("{UPLINK}/24"),
            &client,
            "cl0",
            &format!("{CLIENT}/24"),
        )
        .unwrap();
        client
            .run(&["ip", "addr", "add", &format!("{DENIED}/24"), "dev", "cl0"])
            .unwrap();
        host.run(&["ip", "route", "add", "default", "via", CLIENT])
            .unwrap();
        let mut gs = Vec::new();
        for i in 0..guests {
            let id = InstanceId::new();
            let ns = Netns::new("g").unwrap();
            let ip: Ipv4Addr = format!("10.200.0.{}", i + 2).parse().unwrap();
            let tap = tap_name(id);
            host.run(&[
                "ip", "link", "add", &tap, "type", "veth", "peer", "name", "eth0", "netns",
                &ns.name,
            ])
            .unwrap();
            ns.run(&[
                "ip",
                "link",
                "set",
                "eth0",
                "address",
                &MacAddr::for_ip(ip).to_string(),
            ])
            .unwrap();
            ns.run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])
                .unwrap();
            ns.run(&["ip", "link", "set", "eth0", "up"]).unwrap();
            ns.run(&["ip", "route", "add", "default", "via", "10.200.0.1"])
                .unwrap();
            serve_echo(&ns, "0.0.0.0");
            gs.push(Guest { id, ns, ip });
        }
        serve_echo(&client, CLIENT);
        let state = tempfile::tempdir().unwrap();
        let cfg = NetworkConfig {
            netns: Some(host.name.clone()),
            https_listen: String::new(),
            ..NetworkConfig::default()
        };
        let net = Network::open_real(
            &cfg,
            state.path(),
            vec![format!("{DENIED}/32").parse().unwrap()],
        )
        .unwrap();
        Rig {
            host,
            client,
            guests: gs,
            net,
            _state: state,
        }
    }

    fn nics(&self) -> Vec<(InstanceId, NicSpec)> {
        self.guests.iter().map(|g| (g.id, nic(g.ip))).collect()
    }

    fn set(&self, a: HostAccess) -> Applied {
        let r = self.net.set_access(a, &self.nics()).unwrap();
        let ids: Vec<InstanceId> = self.guests.iter().map(|g| g.id).collect();
        self.net.adopt_taps(&ids).unwrap();
        r
    }
}

/// Connects from inside `ns` to `to`, returns the greeting line.
fn tcp_hello(ns: &Netns, to: &str) -> std::io::Result<String> {
    let to: SocketAddr = to.parse().unwrap();
    ns.enter(move || {
        let s = TcpStream::connect_timeout(&to, T)?;
        s.set_read_timeout(Some(T))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim().to_string())
    })
    .unwrap()
}

fn udp_ask(ns: &Netns, to: &str, payload: &str) -> std::io::Result<String> {
    let (to, payload) = (to.to_string(), payload.to_string());
    ns.enter(move || {
        let u = UdpSocket::bind("0.0.0.0:0")?;
        u.set_read_timeout(Some(T))?;
        u.send_to(payload.as_bytes(), &to)?;
        let mut buf = [0u8; 1500];
        let n = u.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .unwrap()
}

const NEEDS: &str = "needs root, nftables and network namespaces: ./scripts/test runs it";

#[test]
#[ignore = "needs root, nftables and network namespaces: ./scripts/test runs it"]
fn forwards_reach_guests_from_clients_loopback_and_hairpin() {
    let _ = NEEDS;
    let r = Rig::new(1);
    let g = &r.guests[0];
    assert_eq!(
        r.set(access(
            1,
            vec![
                fwd(g, Protocol::Tcp, 20000, 7000),
                fwd(g, Protocol::Udp, 20001, 7001)
            ]
        )),
        Applied::Changed
    );
    // The client's own address reaches the guest: no blanket masquerade.
    assert_eq!(
        tcp_hello(&r.client, &format!("{UPLINK}:20000")).unwrap(),
        format!("peer {CLIENT}")
    );
    assert_eq!(
        udp_ask(&r.client, &format!("{UPLINK}:20001"), "hi").unwrap(),
        format!("peer {CLIENT} hi")
    );
    // Host loopback and hairpin work (masqueraded to the gateway).
    assert_eq!(
        tcp_hello(&r.host, "127.0.0.1:20000").unwrap(),
        "peer 10.200.0.1"
    );
    assert_eq!(
        tcp_hello(&g.ns, &format!("{UPLINK}:20000")).unwrap(),
        "peer 10.200.0.1"
    );
    // Guests reach the outside (masqueraded to the uplink address).
    assert_eq!(
        tcp_hello(&g.ns, &format!("{CLIENT}:7000")).unwrap(),
        format!("peer {UPLINK}")
    );
}

#[test]
#[ignore = "needs root, nftables and network namespaces: ./scripts/test runs it"]
fn deleted_forwards_refuse_and_cut_open_flows_while_others_keep_flowing() {
    let r = Rig::new(1);
    let g = &r.guests[0];
    let ssh = fwd(g, Protocol::Tcp, 20000, 7000);
    let udp = fwd(g, Protocol::Udp, 20001, 7001);
    r.set(access(1, vec![ssh, udp]));
    // An open TCP connection and a UDP flow (one socket, one 5-tuple).
    let to: SocketAddr = format!("{UPLINK}:20000").parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (back_tx, back) = std::sync::mpsc::channel::<Result<String, String>>();
    r.client
        .spawn(move || {
            let s = TcpStream::connect_timeout(&to, T).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            let mut rd = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut greet = String::new();
            rd.read_line(&mut greet).unwrap();
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            u.set_read_timeout(Some(T)).unwrap();
            u.connect(format!("{UPLINK}:20001")).unwrap();
            for msg in rx {
                let udp_reply = {
                    let _ = u.send(msg.as_bytes());
                    let mut buf = [0u8; 512];
                    u.recv(&mut buf)
                        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
                };
                let tcp_reply = {
                    let _ = writeln!(w, "{msg}");
                    let mut line = String::new();
                    rd.read_line(&mut line).map(|_| line.trim().to_string())
                };
                let _ = back_tx.send(match (tcp_reply, udp_reply) {
                    (Ok(t), Ok(u)) => Ok(format!("{t}|{u}")),
                    (t, u) => Err(format!("tcp {t:?} udp {u:?}")),
                });
            }
        })
        .unwrap();
    tx.send("one").unwrap();
    assert_eq!(
        back.recv().unwrap().unwrap(),
        format!("one|peer {CLIENT} one")
    );
    // Adding a forward re-applies the whole table: both flows carry on.
    let extra = fwd(g, Protocol::Tcp, 20002, 7000);
    assert_eq!(r.set(access(2, vec![ssh, udp, extra])), Applied::Changed);
    tx.send("two").unwrap();
    assert_eq!(
        back.recv().unwrap().unwrap(),
        format!("two|peer {CLIENT} two")
    );
    // Deleting the UDP forward cuts the open UDP flow at once.
    r.set(access(3, vec![ssh, extra]));
    tx.send("three").unwrap();
    let got = back.recv().unwrap();
    assert!(
        got.as_ref().is_err_and(|e| e.contains("udp Err")),
        "{got:?}"
    );
    // A deleted TCP forward refuses new connections.
    r.set(access(4, vec![extra]));
    assert!(tcp_hello(&r.client, &format!("{UPLINK}:20000")).is_err());
    assert!(tcp_hello(&r.client, &format!("{UPLINK}:20002")).is_ok());
}

#[test]
#[ignore = "needs root, nftables and network namespaces: ./scripts/test runs it"]
fn guests_cannot_spoof_nor_reach_the_host_denied_networks_or_each_other() {
    let r = Rig::new(2);
    let (a, b) = (&r.guests[0], &r.guests[1]);
    r.set(access(1, vec![fwd(b, Protocol::Tcp, 20000, 7000)]));
    // A service on the host (the agent's API, say) on every host address.
    r.host
        .spawn(|| {
            let l = TcpListener::bind("0.0.0.0:8788").unwrap();
            for s in l.incoming().flatten() {
                let mut s = s;
                let _ = writeln!(s, "host service");
            }
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        tcp_hello(&r.client, &format!("{UPLINK}:8788")).unwrap(),
        "host service"
    );
    for to in ["10.200.0.1:8788", &format!("{UPLINK}:8788")] {
        assert!(
            tcp_hello(&a.ns, to).is_err(),
            "a guest reached the host's {to}"
        );
    }
    // The denied address (the controller) is out of reach; its neighbour is not.
    assert!(tcp_hello(&a.ns, &format!("{DENIED}:7000")).is_err());
    assert!(tcp_hello(&a.ns, &format!("{CLIENT}:7000")).is_ok());
    // Not the other guest directly, only through its public forward.
    assert!(tcp_hello(&a.ns, &format!("{}:7000", b.ip)).is_err());
    assert_eq!(
        tcp_hello(&a.ns, &format!("{UPLINK}:20000")).unwrap(),
        "peer 10.200.0.1"
    );
    // A spoofed source address is dropped...
    a.ns.run(&["ip", "addr", "add", "10.200.0.99/24", "dev", "eth0"])
        .unwrap();
    let spoofed =
        a.ns.run(&["ping", "-c1", "-W1", "-I", "10.200.0.99", "10.200.0.1"]);
    assert!(
        spoofed.is_err(),
        "a spoofed source got through: {spoofed:?}"
    );
    a.ns.run(&["ping", "-c1", "-W1", "-I", &a.ip.to_string(), "10.200.0.1"])
        .unwrap();
    // ... and so is a spoofed MAC.
    a.ns.run(&["ip", "link", "set", "eth0", "address", "52:54:00:de:ad:01"])
        .unwrap();
    a.ns.run(&["ip", "neigh", "flush", "all"]).unwrap();
    assert!(a.ns.run(&["ping", "-c1", "-W1", "10.200.0.1"]).is_err());
}

#[test]
#[ignore = "needs root, nftables and network namespaces: ./scripts/test runs it"]
fn drift_is_repaired_and_a_restarted_agent_reapplies_what_it_had() {
    let r = Rig::new(1);
    let g = &r.guests[0];
    r.set(access(1, vec![fwd(g, Protocol::Tcp, 20000, 7000)]));
    r.host
        .run(&["nft", "delete", "table", "inet", "gantry"])
        .unwrap();
    assert!(tcp_hello(&r.client, &format!("{UPLINK}:20000")).is_err());
    assert_eq!(r.net.apply(&r.nics()).unwrap(), Applied::Repaired);
    assert!(tcp_hello(&r.client, &format!("{UPLINK}:20000")).is_ok());
    // A new agent process on the same state: the rules come back from the
    // persisted access state, before any controller answers.
    // As after a host reboot: no rules, no bridge.
    r.host.run(&["nft", "flush", "ruleset"]).unwrap();
    r.host.run(&["ip", "link", "del", "gantry0"]).unwrap();
    let cfg = NetworkConfig {
        netns: Some(r.host.name.clone()),
        https_listen: String::new(),
        ..NetworkConfig::default()
    };
    let again = Network::open_real(&cfg, r._state.path(), vec![]).unwrap();
    assert_eq!(again.access_rev(), Some(1));
    assert_eq!(again.reconcile(&r.nics()).unwrap(), Applied::Changed);
    let ids: Vec<InstanceId> = r.guests.iter().map(|g| g.id).collect();
    // The guest's veth end lost its bridge with it: adopted again.
    assert_eq!(again.adopt_taps(&ids).unwrap(), 1);
    assert!(tcp_hello(&r.client, &format!("{UPLINK}:20000")).is_ok());
}
