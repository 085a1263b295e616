//! `gantry-guest-exporter`: runs inside a Gantry instance with GPUs. Every
//! interval it reads each GPU through NVML and writes one
//! `gantry_proto::metrics::GuestReport` JSON line to the virtio-serial
//! port `org.gantry.metrics.0`, which the host agent reads (see
//! docs/monitoring.md).
//!
//! ```text
//! gantry-guest-exporter [--interval SECS] [--port PATH|-] [--nvml LIB] [--once]
//! ```
//!
//! Without NVML (no NVIDIA driver in the guest, or it is not loaded yet)
//! it says so once on stderr and keeps writing `{"v":1,"gpus":[]}`,
//! trying to load NVML again every interval: the host then tells "the
//! exporter runs but the guest sees no GPU" (a driver problem) from "no
//! exporter", and a driver installed or loaded after boot is picked up
//! without a restart.

mod gpus;
mod port;
mod report;

use gantry_proto::metrics::{DEFAULT_INTERVAL_SECS, GUEST_CHANNEL_NAME};
use port::{Port, Target};
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: gantry-guest-exporter [--interval SECS] [--port PATH|-] [--nvml LIB] [--once]
  --interval SECS  seconds between reports (default 10, 1 to 3600)
  --port PATH      write to this device or file instead of the virtio-serial port
                   named org.gantry.metrics.0; `-` writes to stdout
  --nvml LIB       the NVML library to load (default libnvidia-ml.so.1)
  --once           write one report and exit";

/// The command line.
struct Opts {
    interval: Duration,
    target: Target,
    nvml: OsString,
    once: bool,
}

enum Usage {
    Help,
    Bad(String),
}

fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Opts, Usage> {
    let mut o = Opts {
        interval: Duration::from_secs(DEFAULT_INTERVAL_SECS),
        target: Target::Named(GUEST_CHANNEL_NAME.to_string()),
        nvml: OsString::from("libnvidia-ml.so.1"),
        once: false,
    };
    while let Some(a) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .ok_or_else(|| Usage::Bad(format!("{flag} needs a value")))
        };
        match a.to_str() {
            Some("--interval") => {
                let v = value("--interval")?;
                let secs = v
                    .to_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|s| (1..=3600).contains(s))
                    .ok_or_else(|| {
                        Usage::Bad(format!("--interval must be 1 to 3600 seconds, got {v:?}"))
                    })?;
                o.interval = Duration::from_secs(secs);
            }
            Some("--port") => {
                let v = value("--port")?;
                o.target = if v == "-" {
                    Target::Stdout
                } else {
                    Target::Path(v.into())
                };
            }
            Some("--nvml") => o.nvml = value("--nvml")?,
            Some("--once") => o.once = true,
            Some("--help" | "-h") => return Err(Usage::Help),
            _ => return Err(Usage::Bad(format!("unknown argument {a:?}"))),
        }
    }
    Ok(o)
}

/// Writes to stderr only what differs from the last thing said, so a
/// lasting condition is reported once.
#[derive(Default)]
struct Say {
    nvml: String,
    port: String,
}

fn say_once(last: &mut String, msg: String) {
    if *last != msg {
        eprintln!("gantry-guest-exporter: {msg}");
        *last = msg;
    }
}

/// Sends one report; says what went wrong with the port, once.
fn send(port: &mut Port, say: &mut Say, gpus: &[report::RawGpu]) {
    let line = report::line(&report::report(gpus));
    match port.send(&line) {
        Ok(_) => say_once(&mut say.port, "writing reports".into()),
        Err(e) => say_once(&mut say.port, e.to_string()),
    }
}

/// Sleeps until the next tick of a fixed-rate schedule.
struct Ticker {
    next: Instant,
    every: Duration,
}

impl Ticker {
    fn wait(&mut self) {
        self.next += self.every;
        let now = Instant::now();
        if self.next <= now {
            self.next = now; // fell behind (suspended guest): no burst
        } else {
            std::thread::sleep(self.next - now);
        }
    }
}

fn run(o: Opts) {
    let mut port = Port::new(o.target);
    let mut say = Say::default();
    let mut tick = Ticker {
        next: Instant::now(),
        every: o.interval,
    };
    loop {
        match gpus::open(&o.nvml) {
            Ok(nvml) => {
                let mut gpus = gpus::Gpus::new(&nvml);
                loop {
                    match gpus.read() {
                        Ok(raw) => {
                            say_once(&mut say.nvml, format!("NVML sees {} GPU(s)", raw.len()));
                            send(&mut port, &mut say, &raw);
                        }
                        Err(e) => {
                            say_once(
                                &mut say.nvml,
                                format!("NVML failed ({e}); loading it again"),
                            );
                            send(&mut port, &mut say, &[]);
                        }
                    }
                    if o.once {
                        return;
                    }
                    tick.wait();
                }
            }
            Err(e) => {
                say_once(
                    &mut say.nvml,
                    format!(
                        "cannot load NVML from {:?} ({e}): no NVIDIA driver in this guest? Reporting no GPUs and trying again every interval",
                        o.nvml
                    ),
                );
                send(&mut port, &mut say, &[]);
                if o.once {
                    return;
                }
                tick.wait();
            }
        }
    }
}

fn main() -> ExitCode {
    match parse(std::env::args_os().skip(1)) {
        Ok(o) => {
            run(o);
            ExitCode::SUCCESS
        }
        Err(Usage::Help) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(Usage::Bad(msg)) => {
            eprintln!("gantry-guest-exporter: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Opts, Usage> {
        parse(a.iter().map(OsString::from))
    }

    #[test]
    fn flags_parse_and_bad_ones_are_refused() {
        let o = args(&[]).ok().unwrap();
        assert_eq!(o.interval, Duration::from_secs(10));
        assert!(matches!(o.target, Target::Named(ref n) if n == "org.gantry.metrics.0"));
        let o = args(&[
            "--interval",
            "2",
            "--port",
            "-",
            "--nvml",
            "/x.so",
            "--once",
        ])
        .ok()
        .unwrap();
        assert_eq!(o.interval, Duration::from_secs(2));
        assert!(matches!(o.target, Target::Stdout));
        assert_eq!(o.nvml, "/x.so");
        assert!(o.once);
        for bad in [
            &["--interval", "0"][..],
            &["--interval"],
            &["--bogus"],
            &["--interval", "x"],
        ] {
            assert!(matches!(args(bad), Err(Usage::Bad(_))), "{bad:?}");
        }
        assert!(matches!(args(&["--help"]), Err(Usage::Help)));
    }
}
