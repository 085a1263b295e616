//! `gantry-controller --listen ADDR --state-dir DIR [--config FILE]`.
//!
//! Opens and migrates the database, binds the listener, writes the bound
//! address to `<state-dir>/listen-addr`, then tells systemd it is ready
//! (`Type=notify`). Under a systemd watchdog (`WatchdogSec=`) it pings only
//! while its own `/healthz` answers through the accept loop
//! (`gantry_controller::http::probe`), so a hung server is restarted.
//! SIGTERM or Ctrl-C: `STOPPING=1`, in-flight requests finish, and it
//! exits 0 within the config's `shutdown_timeout_ms`.
//!
//! At start the soft open-file limit is raised to the hard one: every
//! connection is a descriptor.

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
    raise_nofile_limit();
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
    let watchdog = spawn_watchdog(local);
    gantry_controller::serve(state, listener, shutdown()).await?;
    if let Some(w) = watchdog {
        w.abort();
    }
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
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Raises the soft open-file limit to the hard one (each connection is a
/// descriptor; the server also copes when they run out).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return;
    }
    let soft = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                soft,
                "cannot raise the open-file limit"
            );
            return;
        }
    }
    tracing::info!(open_files = lim.rlim_cur, was = soft, "open-file limit");
}

/// Under a systemd watchdog: every quarter of its interval, asks our own
/// `/healthz` (a fresh connection through the accept loop and the router)
/// and pings `WATCHDOG=1` only when it answers; a hung runtime, accept
/// loop or request path stops the pings and systemd restarts us.
fn spawn_watchdog(addr: std::net::SocketAddr) -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let period = std::time::Duration::from_micros(usec / 4);
    tracing::info!(interval = ?std::time::Duration::from_micros(usec), "systemd watchdog on");
    Some(tokio::spawn(async move {
        let mut failing = false;
        loop {
            match gantry_controller::http::probe(addr, period).await {
                Ok(()) => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    failing = false;
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "health probe failed; not pinging the watchdog");
                }
                Err(_) => {}
            }
            tokio::time::sleep(period).await;
        }
    }))
}
