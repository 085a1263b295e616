//! Group commit of raw samples. Every host posts a batch each interval;
//! written one transaction each, a fleet's batches cost one synced commit
//! apiece (SQLite runs `synchronous = FULL`) on the one writer the
//! heartbeats need too. Here one task writes every batch that arrived
//! while the previous write was in flight in one transaction, and each
//! caller waits for the commit that holds its rows (so a view read after
//! the answer sees them).

use super::{insert, MonitorError, Tier, INSERT_CHUNK};
use crate::db::Db;
use std::sync::OnceLock;
use tokio::sync::{mpsc, oneshot};

/// Batches waiting at most (beyond them callers wait to enqueue).
const QUEUE: usize = 4096;
/// Batches one transaction takes at most.
const GROUP: usize = 256;

struct Pending {
    t_ms: i64,
    rows: Vec<(String, String)>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The writer task's queue, started on first use.
#[derive(Default)]
pub struct GroupWriter {
    queue: OnceLock<mpsc::Sender<Pending>>,
}

impl GroupWriter {
    /// Stores `(subject, v)` rows of raw samples taken at `t_ms`; returns
    /// once they are committed (with the other batches of their group).
    pub async fn write(
        &self,
        db: &Db,
        t_ms: i64,
        rows: Vec<(String, String)>,
    ) -> Result<(), MonitorError> {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(run(db.clone(), rx));
            tx
        });
        let (done, answer) = oneshot::channel();
        let gone = || MonitorError::Write("the sample writer stopped".into());
        queue
            .send(Pending { t_ms, rows, done })
            .await
            .map_err(|_| gone())?;
        answer
            .await
            .map_err(|_| gone())?
            .map_err(MonitorError::Write)
    }
}

async fn run(db: Db, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let res = write_group(&db, &group).await.map_err(|e| e.to_string());
        if let Err(e) = &res {
            tracing::warn!(error = %e, batches = group.len(), "cannot store metric samples");
        }
        for p in group {
            let _ = p.done.send(res.clone());
        }
    }
}

async fn write_group(db: &Db, group: &[Pending]) -> Result<(), MonitorError> {
    let mut tx = db.begin_write().await?;
    for p in group {
        for chunk in p.rows.chunks(INSERT_CHUNK) {
            insert(&mut *tx, Tier::Raw, p.t_ms, 1, chunk).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}
