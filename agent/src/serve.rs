//! The daemon: opens the manager (re-attaching to running VMs), makes or
//! loads the local API token, binds the API, tells systemd it is ready,
//! pings the watchdog, starts the controller link when configured, and
//! stops cleanly on SIGTERM or SIGINT.
//!
//! The local API is served by its own accept loop ([`serve_api`]): a
//! connection waiting for a request must send its whole header within
//! [`HEADER_TIMEOUT`] (keep-alive idle included), at most
//! [`MAX_CONNECTIONS`] are open (more are answered 503), and shutdown ends
//! within [`SHUTDOWN_TIMEOUT`] even if a client never finishes. The
//! watchdog pings only while the API's own `/healthz` answers.

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
    // The state directory first: the GPU pool keeps its state there too
    // (a first start on a fresh machine has none yet).
    crate::layout::Layout::new(&cfg.state_dir).create()?;
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
    notify_ready(bound);
    let monitor = cfg
        .monitor
        .enabled
        .then(|| crate::monitor::start(&cfg, manager.clone()));
    if let Some(c) = cfg.controller.clone() {
        tracing::info!(
            controller = c.urls_text(),
            "joining the controller in the background"
        );
        let mon = monitor.clone();
        drop(crate::link::spawn(manager.clone(), c, move |link| {
            if let Some(mon) = &mon {
                crate::monitor::send::spawn(link, mon);
            }
        }));
    }
    let app = api::router(AppState {
        manager: manager.clone(),
        token: Arc::new(token),
        monitor,
    });
    serve_api(listener, app, shutdown_signal()).await;
    tracing::info!("gantry-agent stopped; instances keep running");
    Ok(())
}

/// READY=1 to systemd (when run under it), and, under a watchdog, every
/// quarter of its interval a `GET /healthz` of our own API through the
/// accept loop: `WATCHDOG=1` only when it answers, so a hung runtime or
/// server stops the pings.
fn notify_ready(api: std::net::SocketAddr) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let period = Duration::from_micros(usec / 4);
        tokio::spawn(async move {
            loop {
                match probe(api, period).await {
                    Ok(()) => {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "API health probe failed; no watchdog ping")
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
    }
}

/// How long a connection waiting for a request may take to send its
/// whole header (also how long a kept-alive connection may stay idle).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most local API connections open at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long shutdown waits for requests in flight before dropping them.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
content-length: 21\r\n\r\ntoo many connections\n";

/// Serves the local API until `shutdown`, then stops accepting, lets
/// requests in flight finish and drops what is left after
/// [`SHUTDOWN_TIMEOUT`].
async fn serve_api(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let hang_at = test_hang_at();
    tokio::pin!(shutdown);
    loop {
        if hang_at.is_some_and(|t| std::time::Instant::now() >= t) {
            tracing::warn!("GANTRY_TEST_HANG_AFTER_MS: the accept loop hangs now (test only)");
            std::future::pending::<()>().await;
        }
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = tasks.join_next() => {}
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        let _ = stream.try_write(BUSY);
                        continue;
                    };
                    tasks.spawn(serve_conn(stream, app.clone(), stop_rx.clone(), slot));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; pausing briefly");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = async {
                match hang_at {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            "API connections still open at the shutdown deadline; dropping them"
        );
        tasks.abort_all();
    }
}

async fn serve_conn(
    stream: tokio::net::TcpStream,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    if !*stop.borrow() {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = stop.changed() => {}
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Debug builds only: `GANTRY_TEST_HANG_AFTER_MS=N` hangs the accept loop
/// N ms after start, so a test can prove the watchdog notices.
fn test_hang_at() -> Option<std::time::Instant> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let ms: u64 = std::env::var("GANTRY_TEST_HANG_AFTER_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Instant::now() + Duration::from_millis(ms))
}

/// `GET /healthz` of the API at `addr` over a fresh connection: Ok when it
/// answers 200 within `timeout`.
async fn probe(addr: std::net::SocketAddr, timeout: Duration) -> Result<(), std::io::Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: gantry\r\nconnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(head)
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(h)) if h.starts_with(b"HTTP/1.1 200") => Ok(()),
        Ok(Ok(h)) => Err(std::io::Error::other(format!(
            "answered {:?}",
            String::from_utf8_lossy(&h)
        ))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other(format!(
            "no answer within {timeout:?}"
        ))),
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
