//! Group commit of heartbeats on SQLite. A fleet's hosts each heartbeat
//! every 10 s, and every heartbeat is a write transaction on SQLite's one
//! writer: its `BEGIN`, its synced `COMMIT` and the hand-over of the
//! writer's turn were paid once per heartbeat, while the writer's turn is
//! what tenants' writes queue for. Here one task applies the heartbeats
//! that arrived while the previous group was being written, up to
//! [`GROUP`] of them, in order, in one transaction, and each caller gets
//! its answer once the commit that holds its heartbeat is durable.
//!
//! A group is all or nothing, like each heartbeat: when one heartbeat of
//! it fails (a revoked host, a conflict), the group is rolled back and
//! each of its heartbeats is applied again on its own, with the retries it
//! would have had alone. PostgreSQL, which writes in parallel, applies each
//! heartbeat on its own.

use super::agent::{heartbeat_alone, heartbeat_in};
use crate::db::Backend;
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use gantry_proto::api::agent::{AgentHeartbeat, UsageAck};
use gantry_proto::ids::HostId;
use std::sync::OnceLock;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Heartbeats one transaction applies at most: a group holds the writer's
/// turn, which a tenant's write may be waiting for, about 2-3 ms each.
const GROUP: usize = 8;
/// Heartbeats waiting at most (beyond them callers wait to enqueue).
const QUEUE: usize = 4096;

/// What applying a heartbeat answers: the billed counters, and whether
/// the host's work changed.
pub type Applied = (Vec<UsageAck>, bool);

struct Pending {
    /// When its caller asked: the group's place in the writers' queue is
    /// its oldest heartbeat's.
    asked: Instant,
    host: HostId,
    hb: AgentHeartbeat,
    done: oneshot::Sender<ApiResult<Applied>>,
}

/// The group task's queue, started on first use.
#[derive(Default)]
pub struct Heartbeats {
    queue: OnceLock<mpsc::Sender<Pending>>,
}

impl Heartbeats {
    /// Applies a checked heartbeat: in a group on SQLite, alone elsewhere.
    pub async fn apply(
        &self,
        st: &AppState,
        host: HostId,
        hb: AgentHeartbeat,
    ) -> ApiResult<Applied> {
        if st.db.backend != Backend::Sqlite {
            return heartbeat_alone(st, &host, &hb).await;
        }
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(run(st.clone(), rx));
            tx
        });
        let (done, answer) = oneshot::channel();
        let gone = || ApiError::Unavailable("the heartbeat writer stopped; retry".into());
        queue
            .send(Pending {
                asked: Instant::now(),
                host,
                hb,
                done,
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(st: AppState, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        // Each group on a task of its own: a panic fails its callers
        // (their answers are dropped), not the writer.
        let st = st.clone();
        let _ = tokio::spawn(async move { apply_group(&st, group).await }).await;
    }
}

async fn apply_group(st: &AppState, group: Vec<Pending>) {
    if group.len() > 1 {
        match write_group(st, &group).await {
            Ok(applied) => {
                for (p, a) in group.into_iter().zip(applied) {
                    let _ = p.done.send(Ok(a));
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, heartbeats = group.len(),
                    "a heartbeat group failed; applying each alone");
            }
        }
    }
    for p in group {
        let _ = p.done.send(heartbeat_alone(st, &p.host, &p.hb).await);
    }
}

/// One transaction for the whole group, or none of it.
async fn write_group(st: &AppState, group: &[Pending]) -> ApiResult<Vec<Applied>> {
    let asked = group
        .iter()
        .map(|p| p.asked)
        .min()
        .unwrap_or_else(Instant::now);
    let mut tx = st.db.begin_write_asked_at(asked).await?;
    let mut applied = Vec::with_capacity(group.len());
    for p in group {
        applied.push(heartbeat_in(st, &mut tx, &p.host, &p.hb).await?);
    }
    gantry_crashpoint::hit("controller.heartbeat.before_commit");
    tx.commit().await.map_err(crate::db::DbError::from)?;
    gantry_crashpoint::hit("controller.heartbeat.after_commit");
    Ok(applied)
}
