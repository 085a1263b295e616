//! The lossy sender: each interval's batch goes to the controller's
//! [`AGENT_METRICS_PATH`] in ONE `POST` with the host credential and a
//! short timeout ([`SEND_TIMEOUT`]); on any failure it is dropped, never
//! queued or retried, and counted (`gantry_agent_metrics_batches_total
//! {outcome="sent|dropped"}`). It has its own HTTP client and shares no
//! lock, retry loop or connection with the heartbeat, whose usage
//! counters billing depends on.
//!
//! Batches arrive on the monitor's watch channel, which holds only the
//! newest: a send slower than the interval skips batches instead of
//! queueing them.

use super::BatchCounts;
use crate::link::client::{ClientError, ControllerClient};
use gantry_proto::metrics::{MetricsBatch, AGENT_METRICS_PATH};
use std::sync::Arc;
use std::time::Duration;

/// How long one send may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the batch is invalid: {0}")]
    Invalid(gantry_proto::ValidationError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Sends batches once each.
pub struct Sender {
    /// One client per controller URL; a batch goes to `clients[at]` only.
    clients: Vec<ControllerClient>,
    /// Moves to the next controller after a connection failure or 5xx,
    /// for the next batch (replicas).
    at: std::sync::atomic::AtomicUsize,
    credential: String,
    counts: Arc<BatchCounts>,
    timeout: Duration,
}

impl Sender {
    /// A sender with its own clients of `urls`: a batch goes to one of
    /// them; a controller that failed is left for the next one.
    pub fn new(
        urls: &[String],
        credential: String,
        counts: Arc<BatchCounts>,
    ) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::NoUrl);
        }
        Ok(Self {
            clients: urls
                .iter()
                .map(|u| ControllerClient::new(u))
                .collect::<Result<_, _>>()?,
            at: Default::default(),
            credential,
            counts,
            timeout: SEND_TIMEOUT,
        })
    }

    /// Checks and sends one batch, once; counts the outcome.
    pub async fn send(&self, batch: &MetricsBatch) -> Result<(), SendError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let res = match batch.check(now_ms) {
            Err(e) => Err(SendError::Invalid(e)),
            Ok(()) => {
                use std::sync::atomic::Ordering::Relaxed;
                let i = self.at.load(Relaxed) % self.clients.len();
                let r = self.clients[i]
                    .post_metrics_once(&self.credential, batch, self.timeout)
                    .await;
                if matches!(&r, Err(e) if e.fails_over()) {
                    self.at.store((i + 1) % self.clients.len(), Relaxed);
                }
                r.map_err(SendError::from)
            }
        };
        self.counts.count(res.is_ok());
        res
    }

    /// Sends every batch the monitor publishes until the monitor is gone.
    pub async fn run(self, mut batches: tokio::sync::watch::Receiver<Option<Arc<MetricsBatch>>>) {
        let mut failing = false;
        while batches.changed().await.is_ok() {
            let Some(batch) = batches.borrow_and_update().clone() else {
                continue;
            };
            match self.send(&batch).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("metrics batches reach the controller again");
                }
                Ok(()) => {}
                // One line when sending starts failing, not one per batch.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, path = AGENT_METRICS_PATH,
                        "metrics batch dropped (batches are never retried)");
                }
                Err(e) => tracing::debug!(error = %e, "metrics batch dropped"),
            }
        }
    }
}

/// Starts the sender of a joined link: its own client of the link's
/// controllers, the link's credential.
pub fn spawn(link: &crate::link::Link, monitor: &super::Monitor) {
    let sender = match Sender::new(
        link.client.bases(),
        link.credential().to_string(),
        monitor.counts(),
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "metrics sender not started");
            return;
        }
    };
    tokio::spawn(sender.run(monitor.subscribe()));
}
