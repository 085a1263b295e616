//! Network-group throughput with namespaces standing in for hosts and
//! guests (a TCG guest would measure the emulator): one TCP stream between
//! two members on one host (through the group bridge), across two "hosts"
//! (through VXLAN over an underlay veth), over the kernel's bare VXLAN
//! between two namespaces (no bridge, no guest veth, no rules: what the
//! overlay itself costs here), and over a plain veth between two
//! namespaces at MTU 1500 and 1450 — interleaved, `DEFAULT_ROUNDS` (or the second argument) each, medians.
//! With `pin` as the third argument the sender runs on CPU 0 and the sink
//! on CPU 1, so the scheduler's placement (both on one core, or swapping)
//! is taken out of the spread; the packet path's softirq work then runs
//! on the sender's core, both "hosts'" share of it included (RPS to the
//! sink's core was tried: the cross-core hand-off cost more than it took
//! off the sender's core).
//! Besides each path's median it prints the median of its per-round ratio
//! to that round's plain veth (paired, so the machine's drift cancels).
//! Usage: bench_groups [seconds per stream] [rounds] [pin] (run by scripts/bench-groups).

use gantry_agent::config::NetworkConfig;
use gantry_agent::net::groups::{group_tap_name, Groups};
use gantry_agent::net::netns::Netns as DataPlane;
use gantry_proto::groups::{group_mac, GroupMember, GroupSpec, HostGroups, Vtep, VXLAN_PORT};
use gantry_proto::{InstanceId, NetworkGroupId};
use gantry_tests::netns::{veth, Netns};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// Rounds when the second argument gives none.
const DEFAULT_ROUNDS: usize = 3;
const UNDERLAY: [&str; 2] = ["10.78.0.1", "10.78.0.2"];

struct Guest {
    id: InstanceId,
    ns: Netns,
    ip: Ipv4Addr,
    host: usize,
}

fn guest(ip: &str, host: usize) -> anyhow::Result<Guest> {
    let id = InstanceId::new();
    let ns = Netns::new("g")?;
    let tap = group_tap_name(id);
    let st = Command::new("ip")
        .args(["link", "add", &tap, "type", "veth", "peer", "name", "eth1"])
        .args(["netns", &ns.name])
        .status()?;
    anyhow::ensure!(st.success(), "cannot create {tap}");
    let ip: Ipv4Addr = ip.parse()?;
    ns.sh(&format!(
        "ip link set eth1 address {} mtu 1450 up && ip addr add {ip}/24 dev eth1",
        group_mac(ip)
    ))?;
    sink(&ns)?;
    Ok(Guest { id, ns, ip, host })
}

/// Whether the sender is pinned to CPU 0 and the sink to CPU 1.
static PIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Pins the calling thread to `cpu` when `pin` was asked for.
fn pin_to(cpu: usize) {
    if !PIN.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("cpu index");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// A TCP sink on 5001.
fn sink(ns: &Netns) -> anyhow::Result<()> {
    ns.spawn(|| {
        let l = TcpListener::bind("0.0.0.0:5001").expect("bind 5001");
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                pin_to(1);
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                while s.read(&mut buf).is_ok_and(|n| n > 0) {}
            });
        }
    })?;
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// The kernel's own VXLAN between two namespaces over an underlay veth,
/// with no bridge, guest veth or rules: the ceiling of any overlay built
/// of kernel VXLAN on this machine.
fn bare_vxlan() -> anyhow::Result<(Netns, Netns)> {
    let (a, b) = (Netns::new("x")?, Netns::new("x")?);
    veth(&a, "ul0", "10.92.0.1/24", &b, "ul0", "10.92.0.2/24")?;
    for (ns, local, remote, ip) in [
        (&a, "10.92.0.1", "10.92.0.2", "10.93.0.1/24"),
        (&b, "10.92.0.2", "10.92.0.1", "10.93.0.2/24"),
    ] {
        ns.sh(&format!(
            "ip link add vx0 type vxlan id 77 local {local} remote {remote} dstport 4789 dev ul0 \
             && ip addr add {ip} dev vx0 && ip link set vx0 up"
        ))?;
    }
    sink(&b)?;
    Ok((a, b))
}

fn stream(from: &Netns, to: Ipv4Addr, d: Duration) -> anyhow::Result<f64> {
    let to = SocketAddr::from((to, 5001));
    from.enter(move || -> anyhow::Result<f64> {
        pin_to(0);
        let mut s = TcpStream::connect(to)?;
        let buf = vec![7u8; 256 * 1024];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < d {
            s.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let _ = s.read(&mut [0u8; 1]);
        Ok(sent as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
    })?
}

fn state(guests: &[Guest], h: usize) -> HostGroups {
    let members = guests
        .iter()
        .map(|g| GroupMember {
            instance: g.id,
            mac: group_mac(g.ip),
            ip: g.ip,
            local: g.host == h,
            vtep: (g.host != h).then(|| Vtep {
                address: UNDERLAY[g.host].parse().expect("constant"),
                port: VXLAN_PORT,
            }),
        })
        .collect();
    HostGroups {
        rev: 1,
        groups: vec![GroupSpec {
            id: NetworkGroupId::from_uuid(uuid::Uuid::from_u128(5000)),
            vni: 5000,
            cidr: "172.16.0.0/24".parse().expect("constant"),
            mtu: 1450,
            members,
        }],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::args().nth(1).map_or(Ok(5), |s| s.parse())?;
    let rounds: usize = std::env::args()
        .nth(2)
        .map_or(Ok(DEFAULT_ROUNDS), |s| s.parse())?;
    let pin = std::env::args().nth(3).is_some_and(|a| a == "pin");
    PIN.store(pin, std::sync::atomic::Ordering::Relaxed);
    let d = Duration::from_secs(secs);
    let hosts = [Netns::new("ha")?, Netns::new("hb")?];
    veth(
        &hosts[0],
        "ul0",
        "10.78.0.1/24",
        &hosts[1],
        "ul0",
        "10.78.0.2/24",
    )?;
    let guests = vec![
        guest("172.16.0.2", 0)?,
        guest("172.16.0.3", 0)?,
        guest("172.16.0.4", 1)?,
    ];
    let mut keep = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let dir = tempfile::tempdir()?;
        let cfg = NetworkConfig {
            netns: Some(h.name.clone()),
            underlay_address: Some(UNDERLAY[i].parse()?),
            ..NetworkConfig::default()
        };
        let g = Groups::open_real(&cfg, DataPlane::named(&h.name)?, dir.path())?;
        let running: Vec<InstanceId> = guests
            .iter()
            .filter(|g| g.host == i)
            .map(|g| g.id)
            .collect();
        g.set(state(&guests, i), &running)?;
        keep.push((g, dir));
    }
    // Plain veth pairs between two namespaces: the reference.
    let (p1, p2) = (Netns::new("p")?, Netns::new("p")?);
    veth(&p1, "v0", "10.90.0.1/24", &p2, "v0", "10.90.0.2/24")?;
    veth(&p1, "v1", "10.91.0.1/24", &p2, "v1", "10.91.0.2/24")?;
    p1.run(&["ip", "link", "set", "v1", "mtu", "1450"])?;
    p2.run(&["ip", "link", "set", "v1", "mtu", "1450"])?;
    sink(&p2)?;
    let (x1, _x2) = bare_vxlan()?;
    let paths: Vec<(&str, &Netns, Ipv4Addr)> = vec![
        ("plain veth, MTU 1500", &p1, "10.90.0.2".parse()?),
        ("plain veth, MTU 1450", &p1, "10.91.0.2".parse()?),
        (
            "group, one host (bridge), MTU 1450",
            &guests[0].ns,
            guests[1].ip,
        ),
        (
            "group, two hosts (VXLAN), MTU 1450",
            &guests[0].ns,
            guests[2].ip,
        ),
        (
            "bare kernel VXLAN (no bridge, no rules), MTU 1450",
            &x1,
            "10.93.0.2".parse()?,
        ),
    ];
    // Warm-up (ARP, first connections).
    for (_, from, to) in &paths {
        stream(from, *to, Duration::from_millis(300))?;
    }
    let mut got: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for round in 0..rounds {
        for k in 0..paths.len() {
            // The order rotates so no path always runs first.
            let i = (k + round) % paths.len();
            let (_, from, to) = paths[i];
            got[i].push(stream(from, to, d)?);
        }
    }
    let base = median(got[0].clone());
    let pinned = if pin {
        ", sender on CPU 0, sink on CPU 1"
    } else {
        ""
    };
    println!(
        "| path | Gbit/s (median of {rounds} x {secs} s{pinned}) | runs | vs plain veth 1500 (medians) | vs plain veth 1500 (median of per-round ratios) |"
    );
    println!("|---|---|---|---|---|");
    for (i, (name, _, _)) in paths.iter().enumerate() {
        let m = median(got[i].clone());
        let runs: Vec<String> = got[i].iter().map(|x| format!("{x:.2}")).collect();
        let paired = median(got[i].iter().zip(&got[0]).map(|(x, b)| x / b).collect());
        println!(
            "| {name} | {m:.2} | {} | {:.0}% | {:.0}% |",
            runs.join(", "),
            m / base * 100.0,
            paired * 100.0
        );
    }
    Ok(())
}
