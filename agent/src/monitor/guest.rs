//! The guest exporter's virtio-serial channel (`org.gantry.metrics.0`):
//! one reader thread per running instance, keeping the latest
//! [`GuestReport`]'s GPUs with the time it arrived.
//!
//! QEMU listens on the channel's unix socket
//! ([`crate::layout::Layout::metrics_socket`], `<source mode='bind'>`) and
//! takes one client at a time; the reader connects, reads lines of at
//! most [`GUEST_LINE_MAX`] bytes (a longer line is dropped whole, never
//! buffered), parses and `check()`s each (the guest is untrusted: a bad
//! line is counted and skipped, and its content never logged), and
//! reconnects with a backoff after EOF (QEMU stopped) or an error. It
//! reads at most [`BYTES_PER_SEC`] (a guest that floods its channel is
//! slowed down by QEMU's flow control, not parsed faster). The host's
//! receipt time stamps a report; the guest's clock is not trusted.
//!
//! The collector calls [`GuestChannels::sync`] and
//! [`GuestChannels::latest`] every interval; neither blocks (a lock and,
//! for a new instance, a thread spawn).

use gantry_proto::metrics::{GpuSample, GuestReport, GUEST_LINE_MAX};
use gantry_proto::InstanceId;
use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most bytes read from one guest per second (a 64-GPU report is ~25 KB
/// per interval).
pub const BYTES_PER_SEC: usize = 4 * GUEST_LINE_MAX;

/// How often readers look at their stop flag, and their reconnect
/// backoff.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub poll: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(500),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Counters of one instance's channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    pub connected: bool,
    pub connects: u64,
    /// Reports accepted.
    pub reports: u64,
    /// Lines that did not parse or did not pass `check()`.
    pub bad_lines: u64,
    /// Lines over `GUEST_LINE_MAX`, dropped whole.
    pub long_lines: u64,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    connected: AtomicBool,
    connects: AtomicU64,
    reports: AtomicU64,
    bad_lines: AtomicU64,
    long_lines: AtomicU64,
    latest: Mutex<Option<(Instant, Vec<GpuSample>)>>,
}

struct Reader {
    path: PathBuf,
    shared: Arc<Shared>,
}

impl Reader {
    fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Readers of every running instance's channel.
#[derive(Default)]
pub struct GuestChannels {
    readers: Mutex<HashMap<InstanceId, Reader>>,
    timing: Timing,
}

impl GuestChannels {
    pub fn new() -> Self {
        Self::default()
    }

    #[cfg(test)]
    pub(crate) fn with_timing(timing: Timing) -> Self {
        Self {
            readers: Mutex::default(),
            timing,
        }
    }

    /// Starts a reader for each `(instance, socket)` not yet read and stops
    /// those of instances no longer listed. Called by the collector every
    /// interval with the running instances.
    pub fn sync(&self, running: &[(InstanceId, PathBuf)]) {
        let Ok(mut readers) = self.readers.lock() else {
            return;
        };
        readers.retain(|id, r| {
            let keep = running.iter().any(|(i, p)| i == id && *p == r.path);
            if !keep {
                r.stop();
            }
            keep
        });
        for (id, path) in running {
            if readers.contains_key(id) {
                continue;
            }
            let shared = Arc::new(Shared::default());
            let (p, s, t) = (path.clone(), shared.clone(), self.timing);
            let spawned = std::thread::Builder::new()
                .name("guest-metrics".into())
                .spawn(move || read_loop(&p, &s, t));
            match spawned {
                Ok(_) => {
                    readers.insert(
                        *id,
                        Reader {
                            path: path.clone(),
                            shared,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "cannot start the guest metrics reader")
                }
            }
        }
    }

    /// The instance's GPUs from its latest report, if one arrived within
    /// `max_age`.
    pub fn latest(&self, instance: &InstanceId, max_age: Duration) -> Option<Vec<GpuSample>> {
        let readers = self.readers.lock().ok()?;
        let latest = readers.get(instance)?.shared.latest.lock().ok()?;
        let (at, gpus) = latest.as_ref()?;
        (at.elapsed() <= max_age).then(|| gpus.clone())
    }

    /// The counters of the instance's channel, while it is read.
    pub fn stats(&self, instance: &InstanceId) -> Option<ChannelStats> {
        let readers = self.readers.lock().ok()?;
        let s = &readers.get(instance)?.shared;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Some(ChannelStats {
            connected: s.connected.load(Ordering::Relaxed),
            connects: n(&s.connects),
            reports: n(&s.reports),
            bad_lines: n(&s.bad_lines),
            long_lines: n(&s.long_lines),
        })
    }
}

impl Drop for GuestChannels {
    fn drop(&mut self) {
        if let Ok(readers) = self.readers.lock() {
            readers.values().for_each(Reader::stop);
        }
    }
}

/// A piece of the byte stream, cut at newlines.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line<'a> {
    Complete(&'a [u8]),
    /// A line over the limit (reported once, when it passes the limit).
    TooLong,
}

/// Splits a byte stream into lines of at most `max` bytes without
/// holding more than `max` bytes.
pub(crate) struct Lines {
    buf: Vec<u8>,
    max: usize,
    /// Inside a line already reported too long: skip to its end.
    skipping: bool,
}

impl Lines {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            skipping: false,
        }
    }

    pub fn feed(&mut self, mut data: &[u8], mut on: impl FnMut(Line<'_>)) {
        while !data.is_empty() {
            let (seg, ended) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            data = &data[(seg.len() + usize::from(ended))..];
            if self.skipping {
                self.skipping = !ended;
                continue;
            }
            if self.buf.len() + seg.len() > self.max {
                self.buf.clear();
                self.skipping = !ended;
                on(Line::TooLong);
                continue;
            }
            if !ended {
                self.buf.extend_from_slice(seg);
            } else if self.buf.is_empty() {
                on(Line::Complete(seg));
            } else {
                self.buf.extend_from_slice(seg);
                on(Line::Complete(&self.buf));
                self.buf.clear();
            }
        }
    }
}

/// A report the host accepts: parsed, known version, figures in range.
pub(crate) fn parse_report(line: &[u8]) -> Result<GuestReport, String> {
    let r: GuestReport =
        serde_json::from_slice(line).map_err(|e| format!("not a report ({:?})", e.classify()))?;
    r.check()
        .map_err(|e| format!("field {} out of range", e.field))?;
    Ok(r)
}

/// Sleeps `d` in steps of `poll`; false when asked to stop.
fn nap(shared: &Shared, d: Duration, poll: Duration) -> bool {
    let until = Instant::now() + d;
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(poll));
    }
    false
}

/// Connects, reads, reconnects, until stopped.
fn read_loop(path: &std::path::Path, shared: &Shared, t: Timing) {
    let mut backoff = t.backoff_min;
    let mut last_err: Option<ErrorKind> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        match UnixStream::connect(path) {
            Ok(s) => {
                last_err = None;
                shared.connects.fetch_add(1, Ordering::Relaxed);
                shared.connected.store(true, Ordering::Relaxed);
                if read_conn(s, shared, t) {
                    backoff = t.backoff_min;
                }
                shared.connected.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                // Missing or refused: the domain is not (yet) running.
                let normal = matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused);
                if !normal && last_err != Some(e.kind()) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot connect to the guest metrics channel");
                }
                last_err = Some(e.kind());
            }
        }
        if !nap(shared, backoff, t.poll) {
            break;
        }
        backoff = (backoff * 2).min(t.backoff_max);
    }
}

/// Reads one connection until EOF, an error or stop; true if it brought
/// a good report.
fn read_conn(mut s: UnixStream, shared: &Shared, t: Timing) -> bool {
    if s.set_read_timeout(Some(t.poll)).is_err() {
        return false;
    }
    let mut lines = Lines::new(GUEST_LINE_MAX);
    let mut chunk = vec![0u8; 16 * 1024];
    let (mut window, mut read_in_window) = (Instant::now(), 0usize);
    let mut good = false;
    let mut warned = false;
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match s.read(&mut chunk) {
            Ok(0) => return good,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return good,
        };
        lines.feed(&chunk[..n], |l| match l {
            Line::Complete(b) if b.iter().all(u8::is_ascii_whitespace) => {}
            Line::Complete(b) => match parse_report(b) {
                Ok(r) => {
                    if let Ok(mut latest) = shared.latest.lock() {
                        *latest = Some((Instant::now(), r.gpus));
                    }
                    shared.reports.fetch_add(1, Ordering::Relaxed);
                    good = true;
                }
                Err(why) => {
                    shared.bad_lines.fetch_add(1, Ordering::Relaxed);
                    if !warned {
                        tracing::warn!(%why, "bad line from a guest's metrics channel (skipped; later ones on this connection not logged)");
                        warned = true;
                    }
                }
            },
            Line::TooLong => {
                shared.long_lines.fetch_add(1, Ordering::Relaxed);
            }
        });
        read_in_window += n;
        if read_in_window >= BYTES_PER_SEC {
            let rest = Duration::from_secs(1).saturating_sub(window.elapsed());
            if !nap(shared, rest, t.poll) {
                break;
            }
            (window, read_in_window) = (Instant::now(), 0);
        } else if window.elapsed() >= Duration::from_secs(1) {
            (window, read_in_window) = (Instant::now(), 0);
        }
    }
    good
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    fn collect(l: &mut Lines, data: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut out = Vec::new();
        l.feed(data, |x| {
            out.push(match x {
                Line::Complete(b) => Some(b.to_vec()),
                Line::TooLong => None,
            })
        });
        out
    }

    #[test]
    fn lines_are_cut_at_newlines_and_long_ones_dropped_whole() {
        let mut l = Lines::new(8);
        assert_eq!(collect(&mut l, b"ab"), vec![]);
        assert_eq!(
            collect(&mut l, b"c\nd\n12345678\n"),
            vec![
                Some(b"abc".to_vec()),
                Some(b"d".to_vec()),
                Some(b"12345678".to_vec())
            ]
        );
        // Over the limit across reads: reported once, its tail skipped,
        // never buffered past the limit.
        assert_eq!(collect(&mut l, b"123456"), vec![]);
        assert_eq!(collect(&mut l, b"789"), vec![None]);
        assert!(l.buf.is_empty());
        assert_eq!(collect(&mut l, b"more tail"), vec![]);
        assert_eq!(collect(&mut l, b"end\nok\n"), vec![Some(b"ok".to_vec())]);
        assert_eq!(
            collect(&mut l, b"123456789\nx\n"),
            vec![None, Some(b"x".to_vec())]
        );
    }

    fn report(uuid: &str) -> String {
        format!(
            "{{\"v\":1,\"gpus\":[{{\"index\":0,\"uuid\":\"{uuid}\",\"pci_bus_id\":\"0000:17:00.0\",\"model\":\"NVIDIA RTX A6000\",\"util_pct\":12.0,\"power_w\":22.0}}]}}\n"
        )
    }

    fn fast() -> GuestChannels {
        GuestChannels::with_timing(Timing {
            poll: Duration::from_millis(20),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
        })
    }

    fn wait(what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn uuid_of(ch: &GuestChannels, id: &InstanceId) -> Option<String> {
        ch.latest(id, Duration::from_secs(60))
            .and_then(|g| g.first().map(|g| g.uuid.clone()))
    }

    #[test]
    fn reports_are_read_bad_and_long_lines_skipped_and_eof_reconnects() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("metrics.sock");
        let id = InstanceId::new();
        let ch = fast();
        // QEMU is not listening yet: the reader retries.
        ch.sync(&[(id, sock.clone())]);
        assert_eq!(ch.latest(&id, Duration::from_secs(60)), None);
        let qemu = UnixListener::bind(&sock).unwrap();
        let (mut conn, _) = qemu.accept().unwrap();
        conn.write_all(report("GPU-a").as_bytes()).unwrap();
        wait("the first report", || {
            uuid_of(&ch, &id).as_deref() == Some("GPU-a")
        });
        let g = &ch.latest(&id, Duration::from_secs(60)).unwrap()[0];
        assert_eq!((g.util_pct, g.power_w), (Some(12.0), Some(22.0)));

        // Garbage, a report out of range, an unknown field, a valid report
        // padded past the limit: all skipped; the line after them is read.
        let padded = format!(
            "{}{}\n",
            report("GPU-long").trim_end(),
            " ".repeat(GUEST_LINE_MAX)
        );
        let bad_range = report("GPU-bad").replace("12.0", "300.0");
        let unknown = "{\"v\":1,\"gpus\":[],\"x\":1}\n";
        for l in [
            "garbage{\n",
            &bad_range,
            unknown,
            &padded,
            "\n",
            &report("GPU-b"),
        ] {
            conn.write_all(l.as_bytes()).unwrap();
        }
        wait("the report after the bad lines", || {
            uuid_of(&ch, &id).as_deref() == Some("GPU-b")
        });
        let st = ch.stats(&id).unwrap();
        assert_eq!(
            (st.bad_lines, st.long_lines, st.reports),
            (3, 1, 2),
            "{st:?}"
        );
        assert!(st.connected);

        // EOF (QEMU stopped): reconnect, read the new boot's reports.
        drop(conn);
        let (mut conn, _) = qemu.accept().unwrap();
        conn.write_all(report("GPU-c").as_bytes()).unwrap();
        wait("a report after reconnecting", || {
            uuid_of(&ch, &id).as_deref() == Some("GPU-c")
        });
        assert_eq!(ch.stats(&id).unwrap().connects, 2);

        // Left the list: the reader hangs up and its figures are gone.
        ch.sync(&[]);
        assert_eq!(ch.latest(&id, Duration::from_secs(60)), None);
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(conn.read(&mut b).unwrap(), 0, "the reader should hang up");
    }

    #[test]
    fn a_report_older_than_max_age_is_not_given() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("metrics.sock");
        let qemu = UnixListener::bind(&sock).unwrap();
        let (id, other) = (InstanceId::new(), InstanceId::new());
        let ch = fast();
        ch.sync(&[(id, sock.clone())]);
        let (mut conn, _) = qemu.accept().unwrap();
        conn.write_all(report("GPU-a").as_bytes()).unwrap();
        wait("the report", || {
            ch.latest(&id, Duration::from_secs(60)).is_some()
        });
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(ch.latest(&id, Duration::from_millis(100)), None);
        assert!(ch.latest(&id, Duration::from_secs(60)).is_some());
        assert_eq!(ch.latest(&other, Duration::from_secs(60)), None);
        // A new report is fresh again; sync with the same list keeps the
        // reader (one connection).
        ch.sync(&[(id, sock.clone())]);
        conn.write_all(report("GPU-a").as_bytes()).unwrap();
        wait("the fresh report", || {
            ch.latest(&id, Duration::from_millis(100)).is_some()
        });
        assert_eq!(ch.stats(&id).unwrap().connects, 1);
    }

    #[test]
    fn a_flooding_guest_is_read_at_a_bounded_rate() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("metrics.sock");
        let qemu = UnixListener::bind(&sock).unwrap();
        let id = InstanceId::new();
        let ch = fast();
        ch.sync(&[(id, sock)]);
        let (mut conn, _) = qemu.accept().unwrap();
        let line = report("GPU-f");
        let n = 3 * BYTES_PER_SEC / line.len();
        let t = Instant::now();
        let writer = std::thread::spawn(move || {
            for _ in 0..n {
                conn.write_all(line.as_bytes()).unwrap();
            }
            conn
        });
        let _conn = writer.join().unwrap();
        wait("every flooded line", || {
            ch.stats(&id).is_some_and(|s| s.reports == n as u64)
        });
        // Three budgets' worth take at least two full seconds.
        assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    }
}
