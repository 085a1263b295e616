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
use crate::db::group::{oldest, GroupQueue, Queued};
use crate::db::Backend;
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use gantry_proto::api::agent::{AgentHeartbeat, UsageAck};
use gantry_proto::ids::HostId;
use std::time::Instant;
use tokio::sync::oneshot;

/// Heartbeats one transaction applies at most: a group holds the writer's
/// turn, which a tenant's write may be waiting for, about 2-3 ms each.
const GROUP: usize = 8;

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

impl Queued for Pending {
    fn asked(&self) -> Instant {
        self.asked
    }
}

/// The group queue, its task started on first use. The task holds the
/// service's state weakly: the state holds the queue.
pub struct Heartbeats(GroupQueue<Pending>);

impl Default for Heartbeats {
    fn default() -> Self {
        Self(GroupQueue::new(GROUP))
    }
}

impl Heartbeats {
    /// Applies a checked heartbeat: in a group on SQLite, alone elsewhere.
    pub async fn apply(
        &self,
        st: &AppState,
        host: HostId,
        hb: AgentHeartbeat,
    ) -> ApiResult<Applied> {
        let asked = Instant::now();
        if st.db.backend != Backend::Sqlite {
            return heartbeat_alone(st, &host, &hb, asked).await;
        }
        let (done, answer) = oneshot::channel();
        let gone = || ApiError::Unavailable("the heartbeat writer stopped; retry".into());
        let item = Pending {
            asked,
            host,
            hb,
            done,
        };
        self.0
            .push(item, || {
                let weak = st.downgrade();
                move |group| {
                    let st = weak.upgrade();
                    async move {
                        // Without the state the service is gone: the
                        // dropped answers tell the callers.
                        if let Some(st) = st {
                            apply_group(&st, group).await;
                        }
                    }
                }
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
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
        let _ = p
            .done
            .send(heartbeat_alone(st, &p.host, &p.hb, p.asked).await);
    }
}

/// One transaction for the whole group, or none of it.
async fn write_group(st: &AppState, group: &[Pending]) -> ApiResult<Vec<Applied>> {
    let mut tx = st.db.begin_write_asked_at(oldest(group)).await?;
    let mut applied = Vec::with_capacity(group.len());
    for p in group {
        applied.push(heartbeat_in(st, &mut tx, &p.host, &p.hb).await?);
    }
    gantry_crashpoint::hit("controller.heartbeat.before_commit");
    tx.commit().await.map_err(crate::db::DbError::from)?;
    gantry_crashpoint::hit("controller.heartbeat.after_commit");
    Ok(applied)
}
