//! `gantry-controller`: the central HTTP API (admins and tenants), the
//! fleet's records and the GPU-aware scheduler.
//!
//! [`serve`] is the whole service; `main.rs` adds flags, logging and
//! systemd readiness; tests start it in-process on an ephemeral port.

pub mod api;
pub mod audit;
pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod openapi;
pub mod scheduler;

use std::path::PathBuf;
use std::sync::Arc;

pub use config::Config;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub db: db::Db,
    pub cfg: Config,
    pub verifier: auth::Verifier,
    pub limiter: auth::Limiter,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Opens (and migrates) the database and builds the shared state. The
/// admin token comes from `admin_token`, the config, or the state dir.
pub async fn open(
    cfg: Config,
    state_dir: &std::path::Path,
    admin_token: Option<String>,
) -> Result<AppState, StartError> {
    std::fs::create_dir_all(state_dir).map_err(|source| StartError::StateDir {
        path: state_dir.to_owned(),
        source,
    })?;
    let url = cfg.database_url(state_dir);
    let db = db::Db::connect(&url, cfg.max_db_connections).await?;
    let (token, file) = auth::bootstrap_token(admin_token.or(cfg.admin_token.clone()), state_dir)?;
    if let Some(f) = file {
        tracing::info!(path = %f.display(), "admin token is in this file");
    }
    let limiter = auth::Limiter::new(cfg.rate_limit_per_second, cfg.rate_limit_burst);
    Ok(AppState(Arc::new(Inner {
        db,
        verifier: auth::Verifier::new(&token),
        limiter,
        cfg,
    })))
}

/// Binds the listener (the caller reports readiness after this).
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

/// Serves until `shutdown` completes, then finishes in-flight requests.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = api::router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
