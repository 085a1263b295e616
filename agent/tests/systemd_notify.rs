//! `gantry-agent serve` under systemd's `Type=notify` and `WatchdogSec=`,
//! with this test playing the service manager: it owns the notify socket
//! and sets `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` as systemd
//! does (a shell exports its own pid and `exec`s the agent).
//!
//! The agent opens libvirt to start, so these need it.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What arrived on the notify socket, and when.
struct Manager {
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Manager {
    fn listen(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let got: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let g = got.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while Arc::strong_count(&g) > 1 {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    for line in text.lines() {
                        g.lock().unwrap().push((Instant::now(), line.to_string()));
                    }
                }
            }
        });
        Self { got }
    }

    fn wait_for(&self, msg: &str, limit: Duration) -> Option<Instant> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some((t, _)) = self.got.lock().unwrap().iter().find(|(_, m)| m == msg) {
                return Some(*t);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    fn pings(&self, from: Instant, to: Instant) -> Vec<Instant> {
        let g = self.got.lock().unwrap();
        g.iter()
            .filter(|(t, m)| m == "WATCHDOG=1" && *t >= from && *t < to)
            .map(|(t, _)| *t)
            .collect()
    }
}

struct Agent {
    child: Child,
    state: PathBuf,
    _sock_dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_file(self.state.with_extension("toml"));
        let _ = std::fs::remove_file(self.state.with_extension("log"));
    }
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(self.state.with_extension("log")).unwrap_or_default()
    }
}

fn libvirt_uri() -> String {
    std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| {
        panic!("LIBVIRT_DEFAULT_URI is not set: these tests start a real agent, which opens libvirt (source .cache/env/*.env)")
    })
}

/// Starts `gantry-agent serve` as systemd would with `WatchdogSec=1s`.
fn start(env: &[(&str, &str)]) -> (Agent, Manager) {
    let uri = libvirt_uri();
    let sock_dir = tempfile::tempdir().unwrap();
    let sd = Manager::listen(&sock_dir.path().join("notify"));
    // Not a 0700 tempdir, like the real-guest fixture's.
    let state = PathBuf::from(format!(
        "/var/tmp/gantry-notify-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&state).unwrap();
    let config = state.with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nlibvirt_uri = {uri:?}\ndomain_type = \"qemu\"\n\
             listen = \"127.0.0.1:0\"\ngpu.source = \"none\"\n",
            state.display().to_string()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(state.with_extension("log")).unwrap();
    let child = Command::new("sh")
        .args(["-c", "export WATCHDOG_PID=$$; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_gantry-agent"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("NOTIFY_SOCKET", sock_dir.path().join("notify"))
        .env("WATCHDOG_USEC", "1000000")
        .env("GANTRY_LOG", "info")
        .envs(env.iter().copied())
        .stderr(log.try_clone().unwrap())
        .stdout(log)
        .spawn()
        .unwrap();
    let agent = Agent {
        child,
        state,
        _sock_dir: sock_dir,
    };
    (agent, sd)
}

fn healthz(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
#[ignore = "needs libvirt (LIBVIRT_DEFAULT_URI): ./scripts/test runs it"]
fn agent_ready_comes_when_its_api_answers_then_watchdog_pings_and_stopping_on_sigterm() {
    let (mut a, sd) = start(&[]);
    let ready = sd.wait_for("READY=1", Duration::from_secs(30));
    let ready = ready.unwrap_or_else(|| panic!("no READY=1 in 30 s; log:\n{}", a.log()));
    let addr = std::fs::read_to_string(a.state.join("listen-addr"))
        .expect("listen-addr is written before READY=1");
    let t = Instant::now();
    assert_eq!(healthz(addr.trim()), "HTTP/1.1 200 OK");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    std::thread::sleep(Duration::from_secs(3));
    let pings = sd.pings(ready, ready + Duration::from_secs(3));
    assert!(pings.len() >= 8, "{} pings in 3 s: {pings:?}", pings.len());
    let gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(gap < Duration::from_millis(600), "largest gap {gap:?}");
    // An idle connection does not hold up shutdown.
    let _idle = std::net::TcpStream::connect(addr.trim()).unwrap();
    let t = Instant::now();
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(a.child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    assert!(
        sd.wait_for("STOPPING=1", Duration::from_secs(5)).is_some(),
        "no STOPPING=1; log:\n{}",
        a.log()
    );
    let status = loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(25),
            "no exit; log:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}; log:\n{}", a.log());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        t.elapsed()
    );
}

#[test]
#[ignore = "needs libvirt (LIBVIRT_DEFAULT_URI): ./scripts/test runs it"]
#[allow(clippy::assertions_on_constants)]
fn agent_watchdog_pings_stop_once_its_accept_loop_hangs() {
    assert!(
        cfg!(debug_assertions),
        "needs a debug build: GANTRY_TEST_HANG_AFTER_MS is read only there"
    );
    let (a, sd) = start(&[("GANTRY_TEST_HANG_AFTER_MS", "2000")]);
    let ready = sd.wait_for("READY=1", Duration::from_secs(30));
    let ready = ready.unwrap_or_else(|| panic!("no READY=1 in 30 s; log:\n{}", a.log()));
    std::thread::sleep(Duration::from_millis(5500));
    let before = sd.pings(ready, ready + Duration::from_millis(1500));
    let after = sd.pings(ready + Duration::from_millis(3000), Instant::now());
    assert!(before.len() >= 4, "pings before the hang: {before:?}");
    assert!(
        after.is_empty(),
        "{} pings after the accept loop hung; log:\n{}",
        after.len(),
        a.log()
    );
}
