//! Group commit of raw samples. Every host posts a batch each interval;
//! written one transaction each, a fleet's batches cost one synced commit
//! apiece (SQLite runs `synchronous = FULL`) on the one writer the
//! heartbeats need too. Here the batches that arrived while the previous
//! write was in flight are written in one transaction
//! ([`crate::db::group`]), queued for the writer's turn by the oldest of
//! them, and each caller waits for the commit that holds its rows (so a
//! view read after the answer sees them), at most [`ACK_WAIT`]: behind a
//! busy writer (a burst of creates, a fleet's first heartbeats) the batch
//! stays queued and is written with the next group, and its caller is
//! answered at once, well inside the agent's one-try timeout (3 s) that
//! would otherwise drop it. Queued batches are lost only if the controller
//! stops before their commit; a full queue refuses a batch (503).

use super::{insert, MonitorError, Tier, INSERT_CHUNK};
use crate::db::group::{oldest, GroupQueue, Queued};
use crate::db::Db;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long a caller waits for its batch's commit before it is answered
/// with the batch still queued.
pub const ACK_WAIT: Duration = Duration::from_secs(1);

/// Batches one transaction takes at most. A group holds the writer's turn,
/// which a tenant's write may be waiting for: a batch of a host's samples
/// is about 0.3 ms to insert.
const GROUP: usize = 64;

struct Pending {
    asked: Instant,
    t_ms: i64,
    rows: Vec<(String, String)>,
    done: oneshot::Sender<Result<(), String>>,
}

impl Queued for Pending {
    fn asked(&self) -> Instant {
        self.asked
    }
}

/// How a batch was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Committed: a view read now shows it.
    Committed,
    /// Still queued after [`ACK_WAIT`]: it is written with the next group.
    Queued,
}

/// The writer's queue, its task started on first use.
pub struct GroupWriter(GroupQueue<Pending>);

impl Default for GroupWriter {
    fn default() -> Self {
        Self(GroupQueue::new(GROUP))
    }
}

impl GroupWriter {
    /// Stores `(subject, v)` rows of raw samples taken at `t_ms`; returns
    /// once they are committed (with the other batches of their group), or
    /// after [`ACK_WAIT`] with them still queued.
    pub async fn write(
        &self,
        db: &Db,
        t_ms: i64,
        rows: Vec<(String, String)>,
    ) -> Result<Written, MonitorError> {
        let asked = Instant::now();
        let deadline = tokio::time::Instant::from_std(asked + ACK_WAIT);
        let (done, answer) = oneshot::channel();
        let gone = || MonitorError::Write("the sample writer stopped".into());
        let item = Pending {
            asked,
            t_ms,
            rows,
            done,
        };
        let push = self.0.push(item, || {
            let db = db.clone();
            move |group| write_and_answer(db.clone(), group)
        });
        match tokio::time::timeout_at(deadline, push).await {
            Err(_) => {
                return Err(MonitorError::Write(
                    "the sample writer's queue is full; the batch was dropped".into(),
                ))
            }
            Ok(Err(_)) => return Err(gone()),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => Ok(Written::Queued),
            Ok(Err(_)) => Err(gone()),
            Ok(Ok(r)) => r.map(|()| Written::Committed).map_err(MonitorError::Write),
        }
    }
}

async fn write_and_answer(db: Db, group: Vec<Pending>) {
    let res = write_group(&db, &group).await.map_err(|e| e.to_string());
    if let Err(e) = &res {
        tracing::warn!(error = %e, batches = group.len(), "cannot store metric samples");
    }
    for p in group {
        let _ = p.done.send(res.clone());
    }
}

async fn write_group(db: &Db, group: &[Pending]) -> Result<(), MonitorError> {
    let mut tx = db.begin_write_asked_at(oldest(group)).await?;
    for p in group {
        for chunk in p.rows.chunks(INSERT_CHUNK) {
            insert(&mut *tx, Tier::Raw, p.t_ms, 1, chunk).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}
