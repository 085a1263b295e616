//! The link to a gantry-controller (the `[controller]` config section):
//! join once, then heartbeat and long-poll for work, carrying out each
//! operation exactly once (see `gantry_proto::api::agent` for the
//! protocol).
//!
//! - [`client`]: HTTP calls and the retry schedule.
//! - [`journal`]: operations accepted, and their outcomes, on disk.
//! - [`heartbeat`]: capacity, health, instances, usage; the heartbeat loop.
//! - [`work`]: the work loop and the operations themselves.
//! - [`keys`]: the snapshot store's chunk keys, from the controller.
//!
//! The credential lives in `<state_dir>/controller.json` (envelope magic
//! [`CREDENTIAL_MAGIC`], version [`CREDENTIAL_VERSION`], mode 0600) and is
//! never logged. While the controller is unreachable the agent, its local
//! API and its VMs carry on; every call retries with backoff.

pub mod client;
mod commands;
pub mod heartbeat;
pub mod journal;
pub mod keys;
pub mod work;

use crate::config::ControllerConfig;
use crate::fsutil::{self, FsError};
use crate::manager::Manager;
use client::{ClientError, ControllerClient};
use gantry_proto::api::agent::JoinRequest;
use gantry_proto::{HostId, OperationId};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Magic of the credential file.
pub const CREDENTIAL_MAGIC: &str = "gantry-controller-link";
/// Version of the credential file.
pub const CREDENTIAL_VERSION: u32 = 1;
/// How long to wait before trying a join again after a refusal.
const JOIN_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("not joined to {0} yet and no join token configured (controller.join_token_file or controller.join_token)")]
    NoJoinToken(String),
    #[error("cannot read the join token file: {0}")]
    TokenFile(std::io::Error),
}

/// What the agent keeps after joining.
#[derive(Clone, Serialize, Deserialize)]
struct Credential {
    url: String,
    host: HostId,
    credential: String,
    #[serde(default = "default_heartbeat_secs")]
    heartbeat_secs: u64,
}

fn default_heartbeat_secs() -> u64 {
    15
}

/// A joined link, shared by the loops.
pub struct Link {
    pub(crate) manager: Arc<Manager>,
    pub(crate) client: ControllerClient,
    pub(crate) cfg: ControllerConfig,
    pub(crate) host: HostId,
    credential: String,
    pub(crate) heartbeat_secs: AtomicU64,
    pub(crate) journal: journal::Journal,
    /// Operations being carried out or reported by this process.
    pub(crate) in_flight: Mutex<HashSet<OperationId>>,
    /// When store usage was last measured.
    pub(crate) store_measured: Mutex<Option<std::time::Instant>>,
    /// Image cache fills run one at a time.
    pub(crate) image_fill: tokio::sync::Mutex<()>,
    /// Instances the controller wants Released that this host holds nothing
    /// of (see [`work::handle`]): heartbeats report them Released.
    pub(crate) absent_released: Mutex<std::collections::BTreeSet<gantry_proto::InstanceId>>,
}

impl Link {
    pub(crate) fn credential(&self) -> &str {
        &self.credential
    }

    pub(crate) fn link_up(&self, up: bool) {
        self.manager.metrics().controller_link(up);
    }

    pub fn host(&self) -> HostId {
        self.host
    }

    /// The agent's manager.
    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }
}

/// Starts the link in the background: joins (if need be), then runs the
/// heartbeat and work loops for as long as the agent runs; `on_joined`
/// runs once the link is up (the monitor's sender starts there).
pub fn spawn(
    manager: Arc<Manager>,
    cfg: ControllerConfig,
    on_joined: impl FnOnce(&Arc<Link>) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let link = match connect(manager, cfg).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "controller link not started");
                return;
            }
        };
        on_joined(&link);
        run(link).await;
    })
}

/// Runs the loops of a joined link.
pub async fn run(link: Arc<Link>) {
    tokio::join!(
        heartbeat::run(link.clone()),
        work::run(link.clone()),
        keys::offer_local_keys(link.clone())
    );
}

/// Loads the credential, or joins until it has one.
pub async fn connect(manager: Arc<Manager>, cfg: ControllerConfig) -> Result<Arc<Link>, LinkError> {
    let client = ControllerClient::with_urls(&cfg.urls())?;
    let path = manager.layout().controller_file();
    let saved: Option<Credential> = if path.exists() {
        Some(fsutil::read_state(
            &path,
            CREDENTIAL_MAGIC,
            CREDENTIAL_VERSION,
        )?)
    } else {
        None
    };
    let cred = match saved {
        Some(c) if client.knows(&c.url) => c,
        Some(c) if matches!(cfg.read_join_token(), Ok(Some(_))) => {
            tracing::warn!(
                saved = c.url,
                configured = cfg.urls_text(),
                "controller URL changed; joining again"
            );
            // Join tokens are single-use: one already spent here is
            // refused, and the saved credential is still this host's.
            match join_once(&manager, &cfg, &client).await {
                Ok(fresh) => fresh,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "joining again was refused; using the saved credential at the new URL"
                    );
                    Credential {
                        url: client.base().to_string(),
                        ..c
                    }
                }
            }
        }
        Some(c) => {
            tracing::warn!(
                saved = c.url,
                configured = cfg.urls_text(),
                "controller URL changed and no join token; using the saved credential there"
            );
            c
        }
        None => join_until_done(&manager, &cfg, &client).await?,
    };
    tracing::info!(host = %cred.host, controller = client.base(), "controller link up");
    let journal = journal::Journal::open(&manager.layout().controller_ops_dir())?;
    Ok(Arc::new(Link {
        manager,
        client,
        cfg,
        host: cred.host,
        credential: cred.credential,
        heartbeat_secs: AtomicU64::new(cred.heartbeat_secs.clamp(1, 3600)),
        journal,
        in_flight: Mutex::new(HashSet::new()),
        store_measured: Mutex::new(None),
        image_fill: tokio::sync::Mutex::new(()),
        absent_released: Mutex::default(),
    }))
}

/// Joins, retrying transient failures with backoff and refusals (a bad or
/// missing token) every 30 s, since an operator may fix them meanwhile.
async fn join_until_done(
    manager: &Arc<Manager>,
    cfg: &ControllerConfig,
    client: &ControllerClient,
) -> Result<Credential, LinkError> {
    loop {
        match join_once(manager, cfg, client).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                manager.metrics().controller_link(false);
                tracing::error!(error = %e, "cannot join the controller; trying again in 30 s");
                tokio::time::sleep(JOIN_RETRY).await;
            }
        }
    }
}

async fn join_once(
    manager: &Arc<Manager>,
    cfg: &ControllerConfig,
    client: &ControllerClient,
) -> Result<Credential, LinkError> {
    let token = cfg
        .read_join_token()
        .map_err(LinkError::TokenFile)?
        .ok_or_else(|| LinkError::NoJoinToken(cfg.urls_text()))?;
    let m = manager.clone();
    let (capacity, _) = tokio::task::spawn_blocking(move || heartbeat::capacity(&m))
        .await
        .expect("capacity task");
    let req = JoinRequest {
        name: cfg.resolved_host_name(),
        address: cfg.resolved_address(),
        capacity,
    };
    let resp = client::retry(
        "join",
        || client.join(&token, &req),
        |_| manager.metrics().controller_link(false),
    )
    .await?;
    let cred = Credential {
        url: client.base().to_string(),
        host: resp.host,
        credential: resp.credential,
        heartbeat_secs: resp.heartbeat_secs,
    };
    let path = manager.layout().controller_file();
    fsutil::write_state(&path, CREDENTIAL_MAGIC, CREDENTIAL_VERSION, &cred)?;
    manager.metrics().controller_link(true);
    tracing::info!(host = %cred.host, name = req.name, "joined the controller");
    Ok(cred)
}

/// Whether the error of a failed call says an admin revoked this host's
/// credential. The first time, logs one clear error telling the operator
/// how to join again (the loops then stay quiet about it and keep trying,
/// so a controller-side undo is picked up).
pub(crate) fn revoked(link: &Link, error: &str) -> bool {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !error.contains(gantry_proto::api::agent::CREDENTIAL_REVOKED) {
        return false;
    }
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::error!(
            host = %link.host,
            credential_file = %link.manager.layout().controller_file().display(),
            "the controller revoked this host's credential: ask an admin for a new join token \
             (gantryctl join-token create), put it in controller.join_token_file (or \
             controller.join_token), remove the credential file and restart gantry-agent to \
             join again"
        );
    }
    true
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

pub(crate) fn store_heartbeat_secs(link: &Link, secs: u64) {
    link.heartbeat_secs
        .store(secs.clamp(1, 3600), Ordering::Relaxed);
}

#[cfg(test)]
mod tests;
