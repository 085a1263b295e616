//! The controller under systemd's `Type=notify` and `WatchdogSec=`, with
//! this test playing the service manager: it owns the notify socket and
//! sets `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` as systemd does
//! (`WATCHDOG_PID` is the main process: a shell exports its own pid and
//! `exec`s the binary).
//!
//! The agent's side is in `agent/tests/systemd_notify.rs`.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
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
            // Ends when the test (and its Arc) is gone.
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

    /// When `msg` first arrived, waiting up to `limit` for it.
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

    /// The times `WATCHDOG=1` arrived within `[from, to)`.
    fn pings(&self, from: Instant, to: Instant) -> Vec<Instant> {
        let g = self.got.lock().unwrap();
        g.iter()
            .filter(|(t, m)| m == "WATCHDOG=1" && *t >= from && *t < to)
            .map(|(t, _)| *t)
            .collect()
    }
}

struct Controller {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Controller {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

/// Starts the binary as systemd would with `WatchdogSec=1s`.
fn start(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Controller {
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let child = Command::new("sh")
        .args(["-c", "export WATCHDOG_PID=$$; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_gantry-controller"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path())
        .env("NOTIFY_SOCKET", dir.path().join("notify"))
        .env("WATCHDOG_USEC", "1000000")
        .env("GANTRY_ADMIN_TOKEN", "test-admin-token-0123456789")
        .env("RUST_LOG", "info,sqlx=warn")
        .envs(env.iter().copied())
        .stderr(log.try_clone().unwrap())
        .stdout(log)
        .spawn()
        .unwrap();
    Controller { child, dir }
}

/// `GET /healthz` over a plain socket: the status line.
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
fn ready_comes_when_the_api_answers_then_watchdog_pings_each_quarter_interval_and_stopping_on_sigterm(
) {
    let dir = tempfile::tempdir().unwrap();
    let sd = Manager::listen(&dir.path().join("notify"));
    let mut c = start(dir, &[]);
    let ready = sd.wait_for("READY=1", Duration::from_secs(20));
    let ready = ready.unwrap_or_else(|| panic!("no READY=1 in 20 s; log:\n{}", c.log()));
    // Ready means a request made now is answered.
    let addr = std::fs::read_to_string(c.dir.path().join("listen-addr"))
        .expect("listen-addr is written before READY=1");
    let t = Instant::now();
    assert_eq!(healthz(addr.trim()), "HTTP/1.1 200 OK");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // WatchdogSec=1s: a ping about every 250 ms, never a gap near 1 s.
    std::thread::sleep(Duration::from_secs(3));
    let pings = sd.pings(ready, ready + Duration::from_secs(3));
    assert!(pings.len() >= 8, "{} pings in 3 s: {pings:?}", pings.len());
    assert!(pings[0] - ready < Duration::from_millis(500));
    let gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(gap < Duration::from_millis(600), "largest gap {gap:?}");
    // SIGTERM: STOPPING=1 at once, exit 0.
    let t = Instant::now();
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(c.child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let stopping = sd.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(stopping.is_some(), "no STOPPING=1; log:\n{}", c.log());
    let status = loop {
        if let Some(s) = c.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(25),
            "no exit; log:\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}; log:\n{}", c.log());
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "needs a debug build: GANTRY_TEST_HANG_AFTER_MS is read only there"
)]
fn watchdog_pings_stop_once_the_accept_loop_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let sd = Manager::listen(&dir.path().join("notify"));
    // The test hook: the accept loop stops 2 s after it starts.
    let c = start(dir, &[("GANTRY_TEST_HANG_AFTER_MS", "2000")]);
    let ready = sd.wait_for("READY=1", Duration::from_secs(20));
    let ready = ready.unwrap_or_else(|| panic!("no READY=1 in 20 s; log:\n{}", c.log()));
    std::thread::sleep(Duration::from_millis(5500));
    let before = sd.pings(ready, ready + Duration::from_millis(1500));
    let after = sd.pings(ready + Duration::from_millis(3000), Instant::now());
    assert!(before.len() >= 4, "pings before the hang: {before:?}");
    assert!(
        after.is_empty(),
        "{} pings after the accept loop hung; log:\n{}",
        after.len(),
        c.log()
    );
    assert!(c.log().contains("health probe failed"), "{}", c.log());
}

/// `key=value` lines of a unit file (the last one wins, as in systemd).
fn unit(name: &str) -> std::collections::HashMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Seconds of a systemd time span like `30`, `30s` or `2min`.
fn secs(v: &str) -> u64 {
    if let Some(m) = v.strip_suffix("min") {
        return m.parse::<u64>().unwrap() * 60;
    }
    v.trim_end_matches('s').parse().unwrap()
}

#[test]
fn the_units_set_open_files_restart_watchdog_and_a_stop_timeout_above_the_deadline() {
    let shutdown = gantry_controller::Config::default().shutdown_timeout_ms / 1000;
    // The controller: its shutdown deadline plus 5 s for the background work.
    // The agent: its API's 20 s deadline.
    for (name, stop_needs) in [
        ("gantry-controller.service", shutdown + 5),
        ("gantry-agent.service", 20),
    ] {
        let u = unit(name);
        let nofile: u64 = u["LimitNOFILE"].parse().unwrap();
        assert!(nofile >= 65536, "{name}: LimitNOFILE={nofile}");
        assert!(
            matches!(u["Restart"].as_str(), "on-failure" | "always"),
            "{name}: Restart={}",
            u["Restart"]
        );
        let watchdog = secs(&u["WatchdogSec"]);
        assert!(
            (10..=120).contains(&watchdog),
            "{name}: WatchdogSec={watchdog}"
        );
        let stop = secs(&u["TimeoutStopSec"]);
        assert!(
            stop > stop_needs,
            "{name}: TimeoutStopSec={stop} is not above the {stop_needs} s shutdown takes at most"
        );
        assert_eq!(u["Type"], "notify", "{name}");
    }
}
