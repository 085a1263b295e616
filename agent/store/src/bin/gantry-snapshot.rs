//! Stand-alone front end of `gantry_store::cli`, the same code that
//! `gantry-agent snapshot ...` runs.

use clap::Parser;

#[derive(Parser)]
#[command(name = "gantry-snapshot", about = "Gantry snapshot store")]
struct Cli {
    #[command(subcommand)]
    cmd: gantry_store::cli::SnapshotCommand,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    if let Err(e) = gantry_store::cli::run(Cli::parse().cmd) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
