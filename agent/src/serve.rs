//! The daemon: opens the manager (re-attaching to running VMs), makes or
//! loads the local API token, binds the API, tells systemd it is ready,
//! pings the watchdog, starts the controller link when configured, and
//! stops cleanly on SIGTERM or SIGINT.

use crate::api::{self, AppState};
use crate::config::AgentConfig;
use crate::fsutil;
use crate::manager::Manager;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Manager(#[from] crate::manager::ManagerError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error(transparent)]
    Fs(#[from] fsutil::FsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Server(std::io::Error),
}

/// Reads the local API token, or makes one (32 random bytes, hex) in a 0600
/// file. The token itself is never logged.
pub fn load_or_create_token(path: &Path) -> Result<String, fsutil::FsError> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let bytes: [u8; 32] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    fsutil::write_atomic(path, format!("{token}\n").as_bytes(), 0o600)?;
    tracing::info!(path = %path.display(), "created the local API token file");
    Ok(token)
}

pub async fn run(cfg: AgentConfig) -> Result<(), ServeError> {
    let gpus = crate::gpu::open(&cfg.gpu, &cfg.state_dir)?;
    let listen = cfg.listen;
    let open_cfg = cfg.clone();
    let manager = tokio::task::spawn_blocking(move || Manager::open(open_cfg, gpus))
        .await
        .expect("manager open task")?;
    manager.spawn_watcher(Duration::from_secs(2));
    manager.spawn_network_reconciler(Duration::from_secs(cfg.network.drift_check_secs));
    if cfg.store_gc_secs > 0 {
        manager.spawn_store_gc(Duration::from_secs(cfg.store_gc_secs));
    }
    if cfg.controller.is_none() {
        // Queues left by a restart; with a controller, the link compacts
        // once the interrupted operations are reported.
        manager.compact_store_soon();
    }
    let token = load_or_create_token(&manager.layout().token_file())?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(ServeError::Server)?;
    fsutil::write_atomic(
        &manager.layout().root().join("listen-addr"),
        format!("{bound}\n").as_bytes(),
        0o644,
    )?;
    tracing::info!(
        addr = %bound,
        instances = manager.list().len(),
        domain_type = manager.domain_type,
        libvirt = manager.libvirt().uri(),
        "gantry-agent ready"
    );
    notify_ready();
    if let Some(c) = cfg.controller.clone() {
        tracing::info!(
            controller = c.urls_text(),
            "joining the controller in the background"
        );
        crate::link::spawn(manager.clone(), c);
    }
    let app = api::router(AppState {
        manager: manager.clone(),
        token: Arc::new(token),
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(ServeError::Server)?;
    tracing::info!("gantry-agent stopped; instances keep running");
    Ok(())
}

/// READY=1 to systemd (when run under it), and watchdog pings at half the
/// interval systemd asks for.
fn notify_ready() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let period = Duration::from_micros(usec / 2);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}
