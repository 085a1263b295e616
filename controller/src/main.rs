//! `gantry-controller --listen ADDR --state-dir DIR [--config FILE]`.
//!
//! Opens and migrates the database, binds the listener, writes the bound
//! address to `<state-dir>/listen-addr`, then tells systemd it is ready (`Type=notify`); SIGTERM or Ctrl-C finish in-flight requests
//! and exit 0.

use anyhow::Context;
use clap::Parser;
use gantry_controller::Config;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Gantry controller: admin and tenant HTTP API and scheduler"
)]
struct Args {
    /// Address to listen on [default: the config's `listen`, 127.0.0.1:8787].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Directory for the SQLite database and the generated admin token.
    #[arg(long, default_value = "/var/lib/gantry-controller")]
    state_dir: PathBuf,
    /// TOML config file (see docs/controller.md).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    if let Err(e) = run().await {
        eprintln!("gantry-controller: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    let env_token = std::env::var("GANTRY_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let addr = cfg.listen;
    let state = gantry_controller::open(cfg, &args.state_dir, env_token)
        .await
        .context("cannot start")?;
    let listener = gantry_controller::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "listening");
    // Where we listen (for `--listen 127.0.0.1:0`); read by tests and scripts.
    let addr_file = args.state_dir.join("listen-addr");
    write_atomic(&addr_file, &format!("{local}\n"))
        .with_context(|| format!("cannot write {}", addr_file.display()))?;
    // Readiness: the database is migrated and the listener is bound.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    gantry_controller::serve(state, listener, shutdown()).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopped");
    Ok(())
}

/// Temp file, fsync, rename, fsync dir.
fn write_atomic(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(".listen-addr.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
