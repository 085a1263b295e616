//! `gantry-guest-web`: the network services of Gantry's busybox test guest
//! (scripts/build-guest copies the binary into the guest; its `rcS` starts it
//! once the NoCloud seed was applied, see docs/rig.md).
//!
//! - [`http`]: TCP 8888, a JupyterLab stand-in over plain HTTP/1.1 with
//!   Jupyter-style token auth, a header echo (`/api/headers`) and a WebSocket
//!   echo (`/api/echo`, [`ws`]).
//! - [`echo`]: TCP 7000 (`peer <ip>:<port>\n`, then every byte back) and
//!   UDP 7001 (`peer <ip>:<port> <payload>` per datagram).
//!
//! std only, no external crates: SHA-1 and base64 for the WebSocket
//! handshake are in [`sha1`]. One thread per connection.

pub mod echo;
pub mod http;
pub mod sha1;
pub mod ws;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

/// What to serve and where; [`Config::default`] is the guest's setup.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address every service binds (the guest: 0.0.0.0; tests: 127.0.0.1).
    pub bind: IpAddr,
    /// The JupyterLab stand-in (0 = any free port).
    pub http_port: u16,
    /// TCP echo (0 = any free port).
    pub tcp_echo_port: u16,
    /// UDP echo (0 = any free port).
    pub udp_echo_port: u16,
    /// One line: the token HTTP clients must present.
    pub token_file: PathBuf,
    /// Shown on `/lab`; `None` = the kernel's hostname.
    pub hostname: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            http_port: 8888,
            tcp_echo_port: 7000,
            udp_echo_port: 7001,
            token_file: PathBuf::from("/run/gantry/jupyter-token"),
            hostname: None,
        }
    }
}

/// The running services: the addresses they bound and their accept threads.
pub struct Running {
    pub http: SocketAddr,
    pub tcp_echo: SocketAddr,
    pub udp_echo: SocketAddr,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    /// Blocks for as long as the services run (forever, in practice).
    pub fn wait(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Reads the token, binds every port (so a bind error is returned here, not
/// lost in a thread) and starts the accept loops.
pub fn start(cfg: &Config) -> io::Result<Running> {
    let token = std::fs::read_to_string(&cfg.token_file)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", cfg.token_file.display())))?
        .trim()
        .to_string();
    let hostname = cfg.hostname.clone().unwrap_or_else(kernel_hostname);
    let site = Arc::new(http::Site { token, hostname });

    let http_l = TcpListener::bind((cfg.bind, cfg.http_port))?;
    let tcp_l = TcpListener::bind((cfg.bind, cfg.tcp_echo_port))?;
    let udp = UdpSocket::bind((cfg.bind, cfg.udp_echo_port))?;
    let running_addrs = (http_l.local_addr()?, tcp_l.local_addr()?, udp.local_addr()?);
    let threads = vec![
        std::thread::spawn(move || http::accept_loop(http_l, site)),
        std::thread::spawn(move || echo::tcp_accept_loop(tcp_l)),
        std::thread::spawn(move || echo::udp_loop(udp)),
    ];
    Ok(Running {
        http: running_addrs.0,
        tcp_echo: running_addrs.1,
        udp_echo: running_addrs.2,
        threads,
    })
}

/// Writes `T<n>\n` to `device` every `every`, forever (the host measures
/// how long the guest stopped by the gaps between arrivals).
pub fn tick(device: &std::path::Path, every: std::time::Duration) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(device)?;
    let mut n: u64 = 0;
    loop {
        n += 1;
        f.write_all(format!("T{n}\n").as_bytes())?;
        std::thread::sleep(every);
    }
}

/// Writes `count_mib` MiB of xorshift pseudo-random bytes (incompressible,
/// different for every `seed`) at `offset_mib` MiB of `device`, then syncs.
pub fn fill(
    device: &std::path::Path,
    offset_mib: u64,
    count_mib: u64,
    seed: u64,
) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(device)?;
    f.seek(SeekFrom::Start(offset_mib << 20))?;
    // splitmix64 of the seed: distinct seeds give distinct streams
    // (xorshift needs a non-zero state).
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x = (x ^ (x >> 31)).max(1);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..count_mib {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.sync_all()
}

/// `<ip>:<port>` with IPv4-mapped IPv6 addresses shown as IPv4 (what the
/// services report as `peer`).
pub fn peer_string(addr: SocketAddr) -> String {
    format!("{}:{}", addr.ip().to_canonical(), addr.port())
}

fn kernel_hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_printed_plainly() {
        let v4: SocketAddr = "10.200.0.1:40000".parse().unwrap();
        assert_eq!(peer_string(v4), "10.200.0.1:40000");
        let mapped: SocketAddr = "[::ffff:10.200.0.1]:5".parse().unwrap();
        assert_eq!(peer_string(mapped), "10.200.0.1:5");
        let v6: SocketAddr = "[::1]:7".parse().unwrap();
        assert_eq!(peer_string(v6), "::1:7");
    }

    #[test]
    fn fill_gives_every_seed_its_own_bytes() {
        let dir = std::env::temp_dir().join(format!("gantry-fill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut seen = Vec::new();
        // Neighbouring seeds (100 and 101 once gave the same stream).
        for seed in [0, 1, 100, 101] {
            let f = dir.join(seed.to_string());
            std::fs::write(&f, b"").unwrap();
            fill(&f, 0, 1, seed).unwrap();
            let bytes = std::fs::read(&f).unwrap();
            assert_eq!(bytes.len(), 1 << 20);
            assert!(
                !seen.contains(&bytes),
                "seed {seed} repeats another's bytes"
            );
            seen.push(bytes);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
