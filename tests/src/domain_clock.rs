//! Running time of libvirt domains as libvirt itself reports it
//! ([`DomainClock`]), independently of the agent: what a test compares
//! billed time with.

use crate::fixture::virsh;
use chrono::{DateTime, Utc};
use std::collections::{BTreeSet, HashMap};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// The running time of every domain whose name starts with a prefix, from
/// libvirt's lifecycle events (`virsh event --loop --timestamp`): Started
/// and Resumed begin a running stretch; Suspended, Stopped, Crashed and
/// PMSuspended end it, at the event's own timestamp. Start it before any
/// such domain exists. Dropping it destroys and undefines every domain
/// with the prefix (the fixture cleans up `gantry-<id>` only).
pub struct DomainClock {
    prefix: String,
    state: Arc<Mutex<HashMap<String, Stretches>>>,
    events: Child,
}

#[derive(Default)]
struct Stretches {
    closed_ms: i64,
    since: Option<DateTime<Utc>>,
    /// Stretches begun (starts and resumes).
    runs: u32,
}

fn with_prefix(prefix: &str, args: &[&str]) -> BTreeSet<String> {
    virsh(args)
        .map(|out| {
            out.lines()
                .map(str::trim)
                .filter(|l| l.starts_with(prefix))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Every domain (any state) whose name starts with `prefix`.
pub fn domains(prefix: &str) -> BTreeSet<String> {
    with_prefix(prefix, &["list", "--all", "--name"])
}

/// `<time>: event 'lifecycle' for domain '<name>': <Event> <detail>`.
fn parse(line: &str) -> Option<(DateTime<Utc>, &str, &str)> {
    let (time, rest) = line.split_once(": event 'lifecycle' for domain '")?;
    let (name, rest) = rest.split_once("': ")?;
    let event = rest.split_whitespace().next()?;
    let at = DateTime::parse_from_str(time.trim(), "%Y-%m-%d %H:%M:%S%.3f%z")
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|_| Utc::now());
    Some((at, name, event))
}

impl DomainClock {
    pub fn start(prefix: &str) -> anyhow::Result<Self> {
        let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into());
        let mut events = Command::new("stdbuf")
            .args(["-oL", "virsh", "-c", &uri, "event", "--loop"])
            .args(["--event", "lifecycle", "--timestamp"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = events.stdout.take().expect("piped stdout");
        let state = Arc::new(Mutex::new(HashMap::<String, Stretches>::new()));
        let (s, p) = (state.clone(), prefix.to_string());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let Some((at, name, event)) = parse(&line) else {
                    continue;
                };
                if !name.starts_with(&p) {
                    continue;
                }
                let mut m = s.lock().unwrap_or_else(|e| e.into_inner());
                let st = m.entry(name.to_string()).or_default();
                match event {
                    "Started" | "Resumed" if st.since.is_none() => {
                        st.since = Some(at);
                        st.runs += 1;
                    }
                    "Suspended" | "Stopped" | "Crashed" | "PMSuspended" => {
                        if let Some(since) = st.since.take() {
                            st.closed_ms += (at - since).num_milliseconds().max(0);
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(Self {
            prefix: prefix.to_string(),
            state,
            events,
        })
    }

    /// How many times libvirt started or resumed domain `<prefix><suffix>`.
    pub fn runs(&self, suffix: &str) -> u32 {
        let m = self.state.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&format!("{}{suffix}", self.prefix))
            .map_or(0, |s| s.runs)
    }

    /// How long libvirt had domain `<prefix><suffix>` running so far.
    pub fn ran_ms(&self, suffix: &str) -> u64 {
        let m = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let name = format!("{}{suffix}", self.prefix);
        m.get(&name).map_or(0, |s| {
            let open = s
                .since
                .map_or(0, |t| (Utc::now() - t).num_milliseconds().max(0));
            (s.closed_ms + open) as u64
        })
    }
}

impl Drop for DomainClock {
    fn drop(&mut self) {
        let _ = self.events.kill();
        let _ = self.events.wait();
        for d in domains(&self.prefix) {
            let _ = virsh(&["destroy", &d]);
            let _ = virsh(&["undefine", &d]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn lifecycle_lines_parse() {
        let (at, name, event) = parse(
            "2026-12-01 06:30:00.123+0000: event 'lifecycle' for domain 'gantry-x-ins-1': Started Booted",
        )
        .expect("parsed");
        assert_eq!((name, event), ("gantry-x-ins-1", "Started"));
        assert_eq!(at.timestamp_subsec_millis(), 123);
        assert!(parse("event 'reboot' for domain 'x'").is_none());
    }
}
