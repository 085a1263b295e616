//! The access data plane's benchmark (`scripts/bench-access`), with
//! network namespaces standing in for the host, a guest and a client (a
//! TCG guest would measure the emulator, not the network):
//!
//! 1. throughput through a port forward (kernel DNAT) against the same
//!    transfer straight to the guest's address (medians of 7 alternating
//!    rounds each), and the latency a forward adds to 1-byte
//!    request/response round trips;
//! 2. applying N forwards (default 1000) on one host, re-applying after
//!    one change, and that connections open through forwards survive the
//!    re-apply.
//!
//! Prints one JSON object. Usage: `bench_access [forwards] [seconds]`.

use anyhow::{ensure, Context};
use gantry_agent::config::NetworkConfig;
use gantry_agent::net::{plan::tap_name, Network};
use gantry_proto::net::{ForwardSpec, HostAccess, MacAddr, NicSpec, Protocol};
use gantry_proto::{ForwardId, InstanceId};
use gantry_tests::netns::{veth, Netns};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const UPLINK: &str = "10.78.0.1";
const CLIENT: &str = "10.78.0.2";
const GUEST: &str = "10.200.0.2";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n_forwards: u16 = args.get(1).map_or(Ok(1000), |a| a.parse())?;
    let secs: u64 = args.get(2).map_or(Ok(5), |a| a.parse())?;
    let rig = Rig::new()?;
    let (direct, forwarded) = throughput(&rig, Duration::from_secs(secs))?;
    let (rr_direct, rr_fwd) = round_trips(&rig, 20_000)?;
    let apply = apply_many(&rig, n_forwards)?;
    let out = serde_json::json!({
        "throughput_direct_gbit_s": direct,
        "throughput_forward_gbit_s": forwarded,
        "throughput_ratio": forwarded / direct,
        "rr_direct_us": rr_direct,
        "rr_forward_us": rr_fwd,
        "forwards": n_forwards,
        "apply_ms": apply.0,
        "reapply_ms": apply.1,
        "connections_kept": apply.2,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

struct Rig {
    host: Netns,
    client: Netns,
    guest: Netns,
    id: InstanceId,
    net: Network,
    _state: tempfile::TempDir,
}

impl Rig {
    fn new() -> anyhow::Result<Rig> {
        let host = Netns::new("bh")?;
        let client = Netns::new("bc")?;
        let guest = Netns::new("bg")?;
        veth(
            &host,
            "up0",
            &format!("{UPLINK}/24"),
            &client,
            "cl0",
            &format!("{CLIENT}/24"),
        )?;
        // The client may also route straight to the guest network (the
        // "direct" path of the comparison).
        client.run(&["ip", "route", "add", "10.200.0.0/24", "via", UPLINK])?;
        let id = InstanceId::new();
        let tap = tap_name(id);
        host.run(&[
            "ip",
            "link",
            "add",
            &tap,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &guest.name,
        ])?;
        let ip: Ipv4Addr = GUEST.parse()?;
        guest.run(&[
            "ip",
            "link",
            "set",
            "eth0",
            "address",
            &MacAddr::for_ip(ip).to_string(),
        ])?;
        guest.run(&["ip", "addr", "add", &format!("{GUEST}/24"), "dev", "eth0"])?;
        guest.run(&["ip", "link", "set", "eth0", "up"])?;
        guest.run(&["ip", "route", "add", "default", "via", "10.200.0.1"])?;
        let state = tempfile::tempdir()?;
        let cfg = NetworkConfig {
            netns: Some(host.name.clone()),
            https_listen: String::new(),
            ..NetworkConfig::default()
        };
        let net = Network::open_real(&cfg, state.path(), vec![])?;
        let rig = Rig {
            host,
            client,
            guest,
            id,
            net,
            _state: state,
        };
        rig.set(1, &[(20000, 5001)])?;
        // The "direct" path must not be dropped by the forward filter: let
        // the client's flows to the guest in, for the comparison only.
        rig.host.run(&[
            "nft", "insert", "rule", "inet", "gantry", "forward", "ip", "saddr", CLIENT, "accept",
        ])?;
        serve(&rig.guest)?;
        Ok(rig)
    }

    fn nics(&self) -> Vec<(InstanceId, NicSpec)> {
        let ip: Ipv4Addr = GUEST.parse().expect("address");
        vec![(
            self.id,
            NicSpec {
                mac: MacAddr::for_ip(ip),
                ip,
                subnet: "10.200.0.0/24".parse().expect("net"),
                gateway: "10.200.0.1".parse().expect("gw"),
            },
        )]
    }

    fn set(&self, rev: u64, ports: &[(u16, u16)]) -> anyhow::Result<()> {
        let forwards = ports
            .iter()
            .map(|&(host_port, guest_port)| ForwardSpec {
                id: ForwardId::new(),
                instance: self.id,
                protocol: Protocol::Tcp,
                host_port,
                guest_port,
                https: false,
            })
            .collect();
        let access = HostAccess {
            rev,
            subnet: "10.200.0.0/24".parse().map_err(anyhow::Error::msg)?,
            gateway: "10.200.0.1".parse()?,
            domain: None,
            forwards,
        };
        self.net.set_access(access, &self.nics())?;
        self.net.adopt_taps(&[self.id])?;
        Ok(())
    }
}

/// The guest's server on 5001: a first byte `s` starts a sink (reads until
/// EOF), `r` an echo of 1-byte requests.
fn serve(guest: &Netns) -> anyhow::Result<()> {
    guest.spawn(|| {
        let l = TcpListener::bind("0.0.0.0:5001").expect("bind 5001");
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_nodelay(true);
                let mut kind = [0u8; 1];
                if s.read_exact(&mut kind).is_err() {
                    return;
                }
                let mut buf = vec![0u8; 256 * 1024];
                match kind[0] {
                    b's' => while s.read(&mut buf).is_ok_and(|n| n > 0) {},
                    _ => {
                        let mut b = [0u8; 1];
                        while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
                    }
                }
            });
        }
    })?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn stream(client: &Netns, to: SocketAddr, d: Duration) -> anyhow::Result<f64> {
    client.enter(move || -> anyhow::Result<f64> {
        let mut s = TcpStream::connect(to)?;
        s.write_all(b"s")?;
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

/// Alternates direct and forwarded streams, `ROUNDS` each, so both see
/// the same machine; returns the medians.
fn throughput(rig: &Rig, d: Duration) -> anyhow::Result<(f64, f64)> {
    const ROUNDS: usize = 7;
    let direct: SocketAddr = format!("{GUEST}:5001").parse()?;
    let fwd: SocketAddr = format!("{UPLINK}:20000").parse()?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS {
        // Which goes first alternates too.
        if i % 2 == 0 {
            a.push(stream(&rig.client, direct, d)?);
            b.push(stream(&rig.client, fwd, d)?);
        } else {
            b.push(stream(&rig.client, fwd, d)?);
            a.push(stream(&rig.client, direct, d)?);
        }
    }
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    eprintln!("direct Gbit/s {a:.2?}\nforward Gbit/s {b:.2?}");
    Ok((a[ROUNDS / 2], b[ROUNDS / 2]))
}

fn rr(client: &Netns, to: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    client.enter(move || -> anyhow::Result<Vec<f64>> {
        let mut s = TcpStream::connect(to)?;
        s.set_nodelay(true)?;
        s.write_all(b"r")?;
        let mut lat = Vec::with_capacity(n);
        let mut b = [0u8; 1];
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        lat.sort_by(f64::total_cmp);
        Ok(lat)
    })?
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn round_trips(rig: &Rig, n: usize) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
    let direct = rr(&rig.client, format!("{GUEST}:5001").parse()?, n)?;
    let fwd = rr(&rig.client, format!("{UPLINK}:20000").parse()?, n)?;
    let show = |v: &[f64]| serde_json::json!({"p50": pct(v, 0.5), "p99": pct(v, 0.99)});
    Ok((show(&direct), show(&fwd)))
}

/// Applies `n` forwards, opens connections through some, re-applies after
/// one change and checks those connections still echo.
fn apply_many(rig: &Rig, n: u16) -> anyhow::Result<(f64, f64, usize)> {
    let mut ports: Vec<(u16, u16)> = (0..n).map(|i| (21000 + i, 5001)).collect();
    let t = Instant::now();
    rig.set(10, &ports)?;
    let apply = t.elapsed().as_secs_f64() * 1e3;
    // Connections opened through forwards before the re-apply, kept on
    // one thread, must still echo after it.
    let opened: Vec<SocketAddr> = (0..50u16.min(n))
        .map(|i| format!("{UPLINK}:{}", 21000 + i).parse().expect("addr"))
        .collect();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (res_tx, res_rx) = std::sync::mpsc::channel::<anyhow::Result<usize>>();
    rig.client.spawn(move || {
        let r = (|| -> anyhow::Result<usize> {
            let mut conns = Vec::new();
            for a in &opened {
                let mut s = TcpStream::connect_timeout(a, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"r")?;
                conns.push(s);
            }
            res_tx.send(Ok(conns.len())).ok();
            go_rx.recv()?;
            let mut alive = 0;
            for s in &mut conns {
                let mut b = [0u8; 1];
                if s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() {
                    alive += 1;
                }
            }
            Ok(alive)
        })();
        res_tx.send(r).ok();
    })?;
    let opened_n = res_rx.recv().context("connections")??;
    ports.push((21000 + n, 5001));
    let t = Instant::now();
    rig.set(11, &ports)?;
    let reapply = t.elapsed().as_secs_f64() * 1e3;
    go_tx.send(())?;
    let alive = res_rx.recv().context("connections after the re-apply")??;
    ensure!(
        alive == opened_n,
        "{alive} of {opened_n} connections survived the re-apply"
    );
    Ok((apply, reapply, alive))
}
