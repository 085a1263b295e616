//! `gantry-controller`: the central HTTP API (admins and tenants), the
//! fleet's records and the GPU-aware scheduler.
//!
//! [`serve`] is the whole service; `main.rs` adds flags, logging and
//! systemd readiness; tests start it in-process on an ephemeral port.

pub mod access;
pub mod api;
pub mod audit;
pub mod auth;
pub mod billing;
pub mod buckets;
pub mod clock;
pub mod config;
pub mod console;
pub mod credentials;
pub mod db;
pub mod error;
pub mod fanout;
pub mod gpus;
pub mod groups;
pub mod http;
pub mod leader;
pub mod meter;
pub mod metrics;
pub mod monitor;
pub mod moves;
pub mod openapi;
pub mod operations;
pub mod pki;
pub mod reconcile;
pub mod regions;
pub mod scheduler;
pub mod secrets;
pub mod snapshots;
pub mod store_keys;
pub mod volume_meter;

use gantry_proto::ids::HostId;
use std::path::PathBuf;
use std::sync::Arc;

pub use config::Config;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// A reference to the state that does not keep it alive: for tasks the
/// state itself owns (a cycle otherwise).
#[derive(Clone)]
pub struct WeakState(std::sync::Weak<Inner>);

impl AppState {
    pub fn downgrade(&self) -> WeakState {
        WeakState(Arc::downgrade(&self.0))
    }
}

impl WeakState {
    /// The state, while the service holds it.
    pub fn upgrade(&self) -> Option<AppState> {
        self.0.upgrade().map(AppState)
    }
}

pub struct Inner {
    pub db: db::Db,
    pub cfg: Config,
    pub verifier: auth::Verifier,
    pub limiter: auth::Limiter,
    /// Wakes a host's pending work long-poll.
    pub wake: Wakers,
    /// Seals secrets at rest (passwords, tokens, host TLS keys).
    pub sealer: secrets::Sealer,
    /// The CA that signs the hosts' HTTPS certificates.
    pub ca: pki::Ca,
    /// The billing clock (see [`clock`]).
    pub clock: Arc<dyn clock::Clock>,
    /// Whether this replica runs the background work (see [`leader`]).
    pub leader: leader::Leadership,
    /// Monitoring: the Prometheus reader's client, ingest counters.
    pub monitor: monitor::Monitor,
    /// The API latency histogram (see [`metrics`]).
    pub metrics: metrics::ControllerMetrics,
    /// Group commit of heartbeats on SQLite (see [`api::heartbeats`]).
    pub heartbeats: api::heartbeats::Heartbeats,
}

/// One [`tokio::sync::Notify`] per host with a work long-poll, and whether
/// the service is shutting down (then polls answer at once). With
/// replicas, wakes are also published to the others ([`fanout`]).
#[derive(Default)]
pub struct Wakers {
    hosts: std::sync::Mutex<std::collections::HashMap<HostId, Arc<tokio::sync::Notify>>>,
    closed: std::sync::atomic::AtomicBool,
    /// Where wakes go to be published to other replicas, once enabled.
    publish: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<HostId>>,
}

impl Wakers {
    /// The host's notifier (created on first use).
    pub fn get(&self, host: &HostId) -> Arc<tokio::sync::Notify> {
        let mut m = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(*host).or_default().clone()
    }

    /// Whether [`Wakers::close`] was called.
    pub fn closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Shutting down: wakes every poll and makes new ones answer at once.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let m = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        for n in m.values() {
            n.notify_waiters();
        }
    }

    /// Wakes every poll of `host` that is waiting now, on this replica
    /// and (when publishing) on the others.
    pub fn wake(&self, host: &HostId) {
        self.wake_local(host);
        if let Some(tx) = self.publish.get() {
            let _ = tx.send(*host);
        }
    }

    /// Wakes the polls of `host` waiting on this replica.
    pub fn wake_local(&self, host: &HostId) {
        let m = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get(host) {
            n.notify_waiters();
        }
    }

    /// Wakes every poll waiting on this replica (they look again).
    pub fn wake_all_local(&self) {
        let m = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        for n in m.values() {
            n.notify_waiters();
        }
    }

    /// Starts publishing wakes: the receiving end, the first time only.
    pub fn publish_to(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<HostId>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.publish.set(tx).ok().map(|()| rx)
    }
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
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error("the controller CA: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Opens (and migrates) the database and builds the shared state. The
/// admin token comes from `admin_token`, the config, or the state dir; the
/// secret key and the CA are loaded from (or created in) the state dir.
pub async fn open(
    cfg: Config,
    state_dir: &std::path::Path,
    admin_token: Option<String>,
) -> Result<AppState, StartError> {
    open_with_clock(cfg, state_dir, admin_token, Arc::new(clock::SystemClock)).await
}

/// [`open`] with another billing clock (tests drive a [`clock::FakeClock`]).
pub async fn open_with_clock(
    cfg: Config,
    state_dir: &std::path::Path,
    admin_token: Option<String>,
    clock: Arc<dyn clock::Clock>,
) -> Result<AppState, StartError> {
    db::private_dir(state_dir).map_err(|source| StartError::StateDir {
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
    let sealer = secrets::Sealer::load_or_create(&cfg.secret_key_path(state_dir))?;
    let ca = pki::Ca::load_or_create(state_dir)?;
    Ok(AppState(Arc::new(Inner {
        db,
        verifier: auth::Verifier::new(&token, clock.clone()),
        limiter,
        cfg,
        wake: Wakers::default(),
        sealer,
        ca,
        clock,
        leader: leader::Leadership::default(),
        monitor: monitor::Monitor::default(),
        metrics: metrics::ControllerMetrics::default(),
        heartbeats: Default::default(),
    })))
}

/// Binds the listener (the caller reports readiness after this).
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

/// Serves until `shutdown` completes, then finishes in-flight requests
/// within the config's `shutdown_timeout_ms` ([`http`] has the limits
/// every connection is held to). The background work ([`background`])
/// runs meanwhile whenever this replica leads ([`leader`]); at shutdown it
/// stops and the lease is handed back.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let holder = leader::holder_name(listener.local_addr().ok());
    // Replicas share work long-polls' wakes through PostgreSQL.
    let fan = match (&state.db.backend, &state.cfg.database_url) {
        (db::Backend::Postgres, Some(url)) => state
            .wake
            .publish_to()
            .map(|rx| tokio::spawn(fanout::run(state.clone(), url.clone(), rx))),
        _ => None,
    };
    let (resign, resigned) = tokio::sync::oneshot::channel::<()>();
    let mut leading = tokio::spawn(leader::run(state.clone(), holder, background, async {
        let _ = resigned.await;
    }));
    let st = state.clone();
    // Work long-polls answer at once, so shutdown does not wait for them.
    let shutdown = async move {
        shutdown.await;
        st.wake.close();
    };
    let limits = http::Limits::from_config(&state.cfg);
    let app = api::router(state);
    let dropped = http::run(listener, app, limits, shutdown).await;
    if dropped > 0 {
        tracing::warn!(
            connections = dropped,
            "dropped unfinished at the shutdown deadline"
        );
    }
    if let Some(f) = fan {
        f.abort();
    }
    let _ = resign.send(());
    if tokio::time::timeout(RESIGN_TIMEOUT, &mut leading)
        .await
        .is_err()
    {
        tracing::warn!("the background work did not stop in time; abandoning it");
        leading.abort();
    }
    Ok(())
}

/// How long shutdown waits for the background work to stop and the
/// leader lease to be handed back.
const RESIGN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Everything periodic, run by the leading replica only: the reconcile
/// loop (silent hosts, operation timeouts, credit grace stops, the
/// snapshot storage meter). Aborted the moment leadership is lost.
pub async fn background(st: AppState) {
    reconcile::run(st).await
}
