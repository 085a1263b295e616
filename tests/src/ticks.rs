//! How long a guest stopped, seen from the host: the guest writes `T<n>`
//! lines to its serial console every few milliseconds
//! (`gantry-guest-web tick /dev/ttyS0 5`), and [`Ticks`] timestamps them as
//! they arrive on the console's unix socket. The guest's own clock stops
//! while it is paused, so only the host can measure a pause; the largest
//! gap between arrivals in a window is how long the guest did not run (plus
//! the tick period and scheduling noise).

use anyhow::Context;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Arrival times of ticks on a console socket.
pub struct Ticks {
    arrivals: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl Ticks {
    /// Connects to `console_socket` and records every tick line's arrival.
    pub fn listen(console_socket: &Path) -> anyhow::Result<Ticks> {
        let sock = UnixStream::connect(console_socket)
            .with_context(|| format!("cannot connect to {}", console_socket.display()))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (arrivals.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rd = BufReader::new(sock);
            let mut line = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match rd.read_until(b'\n', &mut line) {
                    Ok(0) => break,
                    Ok(_) => {
                        let now = Instant::now();
                        if line.iter().find(|b| **b != b'\r') == Some(&b'T') {
                            a.lock().unwrap_or_else(|p| p.into_inner()).push(now);
                        }
                        line.clear();
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        });
        Ok(Ticks { arrivals, stop })
    }

    /// Waits until ticks arrive (the ticker runs); fails after `timeout`.
    pub fn wait_flowing(&self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.count_since(start) >= 10 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("no ticks from the guest within {timeout:?}")
    }

    fn count_since(&self, t: Instant) -> usize {
        let a = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        a.iter().filter(|x| **x >= t).count()
    }

    /// The largest gap between consecutive arrivals in `[from, to]`
    /// (counting from the last arrival before `from`); `None` without two
    /// arrivals.
    pub fn max_gap(&self, from: Instant, to: Instant) -> Option<Duration> {
        let a = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        let start = a.iter().rposition(|x| *x < from).unwrap_or(0);
        let window: Vec<Instant> = a[start..]
            .iter()
            .copied()
            .take_while(|x| *x <= to)
            .collect();
        window.windows(2).map(|w| w[1] - w[0]).max()
    }
}

impl Drop for Ticks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
