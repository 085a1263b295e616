//! `gantry-nvml-sim`: create a simulated GPU host in a state directory and
//! inject faults into it, for the simulated `libnvidia-ml.so` that the agent
//! loads with `GANTRY_NVML_SIM_DIR` pointing at that directory.
//!
//! Errors are one sentence on stderr; the exit status is 2 for usage errors
//! and 1 for everything else.

use clap::{Parser, Subcommand};
use gantry_nvml_sim::{control, profiles, GpuRef};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "gantry-nvml-sim",
    version,
    about = "Drive a simulated NVML host (state directory + fake sysfs)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a fresh simulated host from a built-in profile.
    Init {
        #[arg(long, default_value = profiles::DEFAULT_PROFILE)]
        profile: String,
        dir: PathBuf,
    },
    /// Raise an XID event on a GPU.
    Xid {
        dir: PathBuf,
        #[arg(long, value_parser = parse_gpu)]
        gpu: GpuRef,
        xid: u64,
    },
    /// Set the volatile ECC counters (the aggregate ones grow too).
    Ecc {
        dir: PathBuf,
        #[arg(long, value_parser = parse_gpu)]
        gpu: GpuRef,
        #[arg(long, default_value_t = 0)]
        corrected: u64,
        #[arg(long, default_value_t = 0)]
        uncorrected: u64,
    },
    /// Set row remapping; with --pending the rows wait for a GPU reset.
    Remap {
        dir: PathBuf,
        #[arg(long, value_parser = parse_gpu)]
        gpu: GpuRef,
        #[arg(long, default_value_t = 0)]
        corr: u32,
        #[arg(long, default_value_t = 0)]
        unc: u32,
        #[arg(long)]
        pending: bool,
        #[arg(long)]
        failure: bool,
    },
    /// Set whether pages are pending retirement.
    PagesPending {
        dir: PathBuf,
        #[arg(long, value_parser = parse_gpu)]
        gpu: GpuRef,
        #[arg(action = clap::ArgAction::Set)]
        pending: bool,
    },
    /// Set the GPU recovery action field (0 none, 1 reset, 2 reboot, 3 drain P2P, 4 drain and reset).
    RecoveryAction {
        dir: PathBuf,
        #[arg(long, value_parser = parse_gpu)]
        gpu: GpuRef,
        action: u32,
    },
    /// Make a GPU fall off the bus (XID 79, GPU_IS_LOST, sysfs reads 0xffff).
    Lose {
        dir: PathBuf,
        #[arg(long, value_parser = parse_gpu)]
        gpu: GpuRef,
    },
    /// Clear every fault of a GPU.
    Restore {
        dir: PathBuf,
        #[arg(long, value_parser = parse_gpu)]
        gpu: GpuRef,
    },
    /// Set the current PCIe link speed and width.
    Link {
        dir: PathBuf,
        #[arg(long, value_parser = parse_gpu)]
        gpu: GpuRef,
        #[arg(long)]
        speed: String,
        #[arg(long)]
        width: u32,
    },
    /// Add to the AER error totals.
    Aer {
        dir: PathBuf,
        #[arg(long, value_parser = parse_gpu)]
        gpu: GpuRef,
        #[arg(long, default_value_t = 0)]
        fatal: u64,
        #[arg(long, default_value_t = 0)]
        nonfatal: u64,
        #[arg(long, default_value_t = 0)]
        correctable: u64,
    },
    /// Print the state as NVML currently sees it (simulated resets applied).
    Show { dir: PathBuf },
    /// List the built-in profiles.
    Profiles,
}

/// A strict parser (the `From<&str>` conversion accepts anything).
fn parse_gpu(s: &str) -> Result<GpuRef, control::ControlError> {
    s.parse()
}

fn run(cmd: Cmd) -> Result<(), control::ControlError> {
    match cmd {
        Cmd::Init { profile, dir } => {
            let s = control::init(&dir, &profile)?;
            println!("{}: {} ({} GPUs)", dir.display(), s.profile, s.gpus.len());
        }
        Cmd::Xid { dir, gpu, xid } => {
            let seq = control::inject_xid(&dir, gpu, xid)?;
            println!("event {seq}");
        }
        Cmd::Ecc {
            dir,
            gpu,
            corrected,
            uncorrected,
        } => control::set_ecc(&dir, gpu, corrected, uncorrected)?,
        Cmd::Remap {
            dir,
            gpu,
            corr,
            unc,
            pending,
            failure,
        } => control::set_remap(&dir, gpu, corr, unc, pending, failure)?,
        Cmd::PagesPending { dir, gpu, pending } => control::set_pages_pending(&dir, gpu, pending)?,
        Cmd::RecoveryAction { dir, gpu, action } => {
            control::set_recovery_action(&dir, gpu, action)?
        }
        Cmd::Lose { dir, gpu } => control::lose(&dir, gpu)?,
        Cmd::Restore { dir, gpu } => control::restore(&dir, gpu)?,
        Cmd::Link {
            dir,
            gpu,
            speed,
            width,
        } => control::set_link(&dir, gpu, &speed, width)?,
        Cmd::Aer {
            dir,
            gpu,
            fatal,
            nonfatal,
            correctable,
        } => control::add_aer(&dir, gpu, fatal, nonfatal, correctable)?,
        Cmd::Show { dir } => {
            let s = control::load(&dir)?;
            let text = serde_json::to_string_pretty(&s).map_err(|e| control::ControlError::Io {
                path: dir,
                source: e.into(),
            })?;
            println!("{text}");
        }
        Cmd::Profiles => {
            for (name, about) in profiles::PROFILES {
                println!("{name}\t{about}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help / --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid usage");
            eprintln!("gantry-nvml-sim: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gantry-nvml-sim: {e}");
            ExitCode::FAILURE
        }
    }
}
