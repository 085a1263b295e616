//! `gantry-guest-web`: the test guest's services (see the library docs):
//! a JupyterLab stand-in on 8888, TCP echo on 7000, UDP echo on 7001.
//! Started by the guest's `rcS` once the NoCloud seed was applied.

use gantry_guest_web::{start, Config};
use std::process::ExitCode;

const USAGE: &str = "usage: gantry-guest-web [--token-file PATH] [--hostname NAME] [--bind IP]
                        [--http-port N] [--tcp-echo-port N] [--udp-echo-port N]
       gantry-guest-web tick DEVICE MILLIS
       gantry-guest-web fill DEVICE OFFSET_MIB COUNT_MIB SEED
defaults: --token-file /run/gantry/jupyter-token --bind 0.0.0.0 --http-port 8888
          --tcp-echo-port 7000 --udp-echo-port 7001, hostname from the kernel
tick: writes `T<n>` lines to DEVICE (a serial port) every MILLIS ms, forever: the host
      timestamps them as they arrive, and the largest gap is how long the guest stopped
fill: writes COUNT_MIB MiB of incompressible pseudo-random bytes (from SEED) to DEVICE at
      OFFSET_MIB MiB, then syncs: disk changes of a known size for benchmarks";

/// `fill DEVICE OFFSET_MIB COUNT_MIB SEED` (see [`USAGE`]).
fn fill(args: &[String]) -> ExitCode {
    let nums: Vec<u64> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (Some(dev), [offset, count, seed]) = (args.first(), nums.as_slice()) else {
        eprintln!("gantry-guest-web: fill needs DEVICE OFFSET_MIB COUNT_MIB SEED\n{USAGE}");
        return ExitCode::from(2);
    };
    match gantry_guest_web::fill(std::path::Path::new(dev), *offset, *count, *seed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gantry-guest-web: fill {dev}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tick DEVICE MILLIS` (see [`USAGE`]).
fn tick(args: &[String]) -> ExitCode {
    let (Some(dev), Some(ms)) = (
        args.first(),
        args.get(1).and_then(|m| m.parse::<u64>().ok()),
    ) else {
        eprintln!("gantry-guest-web: tick needs DEVICE and MILLIS\n{USAGE}");
        return ExitCode::from(2);
    };
    match gantry_guest_web::tick(
        std::path::Path::new(dev),
        std::time::Duration::from_millis(ms),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gantry-guest-web: tick {dev}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut cfg = Config::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?
            .clone();
        let port = |v: &str| v.parse::<u16>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--token-file" => cfg.token_file = value.into(),
            "--hostname" => cfg.hostname = Some(value),
            "--bind" => cfg.bind = value.parse().map_err(|e| format!("--bind {value}: {e}"))?,
            "--http-port" => cfg.http_port = port(&value)?,
            "--tcp-echo-port" => cfg.tcp_echo_port = port(&value)?,
            "--udp-echo-port" => cfg.udp_echo_port = port(&value)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("tick") => return tick(&args[1..]),
        Some("fill") => return fill(&args[1..]),
        _ => {}
    }
    let cfg = match parse_args(&args) {
        Ok(c) => c,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("gantry-guest-web: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match start(&cfg) {
        Ok(running) => {
            eprintln!(
                "gantry-guest-web: http on {}, tcp echo on {}, udp echo on {}",
                running.http, running.tcp_echo, running.udp_echo
            );
            running.wait();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gantry-guest-web: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_parse() {
        let c = parse_args(&args(
            "--token-file /t --bind 127.0.0.1 --http-port 0 --hostname h",
        ))
        .unwrap();
        assert_eq!(c.token_file, std::path::PathBuf::from("/t"));
        assert_eq!(
            (c.bind.to_string(), c.http_port, c.tcp_echo_port),
            ("127.0.0.1".into(), 0, 7000)
        );
        assert_eq!(c.hostname.as_deref(), Some("h"));
        assert!(parse_args(&args("--http-port 70000")).is_err());
        assert!(parse_args(&args("--bogus 1")).is_err());
        assert!(parse_args(&args("--token-file")).is_err());
        assert_eq!(parse_args(&args("--help")).unwrap_err(), "");
    }
}
