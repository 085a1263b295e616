//! Write transactions, and the turn a SQLite writer takes before it holds a
//! connection.
//!
//! SQLite has one writer at a time. Without a turn, every writer takes a
//! pooled connection and then waits inside `BEGIN IMMEDIATE` for the write
//! lock, in SQLite's busy handler, which polls with growing sleeps (up to
//! 100 ms between looks) and serves nobody in order. Under a steady stream
//! of writes (heartbeats, reports, batches) some writers lose many rounds,
//! and the sleeping writers hold pooled connections that readers then wait
//! for. So on SQLite a writer first waits for its turn, a fair async
//! semaphore of one permit, and only then takes a connection: the lock is
//! free when it asks, writers go first come first served, and at most one
//! pooled connection is held by a writer. The busy handler still covers
//! writers outside this process (a second controller on the same file).
//! PostgreSQL has row locks and takes no turn.

use super::DbError;
use sqlx::AnyConnection;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a writer waits for its turn before it fails (retryably), as
/// long as SQLite's own `busy_timeout`.
pub const TURN_WAIT: Duration = Duration::from_secs(10);

/// The writers' turn: `None` where the backend needs none.
#[derive(Clone, Debug, Default)]
pub struct Turns(Option<Arc<Semaphore>>);

/// A writer's turn, held until it is dropped.
pub type Turn = Option<OwnedSemaphorePermit>;

impl Turns {
    /// One writer at a time (SQLite).
    pub fn one_at_a_time() -> Self {
        Self(Some(Arc::new(Semaphore::new(1))))
    }

    /// Waits for this writer's turn (at once where there are no turns).
    pub async fn take(&self) -> Result<Turn, DbError> {
        self.take_within(TURN_WAIT).await
    }

    async fn take_within(&self, wait: Duration) -> Result<Turn, DbError> {
        let Some(s) = &self.0 else { return Ok(None) };
        let started = std::time::Instant::now();
        let turn = tokio::time::timeout(wait, s.clone().acquire_owned())
            .await
            .map_err(|_| DbError::NoTurn(wait))?
            .map_err(|_| DbError::NoTurn(Duration::ZERO))?;
        crate::metrics::db_writer_wait(started.elapsed());
        Ok(Some(turn))
    }
}

/// A write transaction: derefs to its connection (`&mut **tx` is the
/// executor, as with `sqlx::Transaction`), and holds the writer's turn
/// until it is committed, rolled back or dropped.
pub struct Tx {
    inner: sqlx::Transaction<'static, sqlx::Any>,
    _turn: Turn,
}

impl Tx {
    pub(super) fn new(inner: sqlx::Transaction<'static, sqlx::Any>, turn: Turn) -> Self {
        Self { inner, _turn: turn }
    }

    /// Commits; the turn is given back once the commit is durable.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.inner.commit().await
    }

    /// Rolls back; the turn is given back after.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.inner.rollback().await
    }
}

impl std::ops::Deref for Tx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.inner
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.inner
    }
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("turn", &self._turn.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{is_retryable, Db};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_writer_without_a_turn_fails_retryably_and_postgres_takes_none() {
        let turns = Turns::one_at_a_time();
        let held = turns.take().await.unwrap();
        assert!(held.is_some());
        let e = turns
            .take_within(Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, DbError::NoTurn(_)), "{e}");
        assert!(is_retryable(&e));
        assert!(e.to_string().contains("busy"), "{e}");
        drop(held);
        assert!(turns.take().await.unwrap().is_some());
        assert!(Turns::default().take().await.unwrap().is_none());
    }

    /// Sixteen writers each read a counter, hold their transaction a
    /// while, and write it back, on a pool of two connections: none is
    /// lost or refused, and a reader gets a connection while they queue
    /// (without turns, writers sleeping in SQLite's busy handler held both).
    #[tokio::test]
    async fn writers_queue_for_their_turn_and_readers_are_not_starved() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let db = Db::connect(&url, 2).await.unwrap();
        sqlx::query("CREATE TABLE c (n BIGINT NOT NULL)")
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO c (n) VALUES (0)")
            .execute(&db.pool)
            .await
            .unwrap();
        let committed = std::sync::Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::new();
        for _ in 0..16 {
            let (db, committed) = (db.clone(), committed.clone());
            writers.push(tokio::spawn(async move {
                let mut tx = db.begin_write().await.unwrap();
                let n: i64 = sqlx::query_scalar("SELECT n FROM c")
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                sqlx::query("UPDATE c SET n = $1")
                    .bind(n + 1)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                committed.fetch_add(1, Ordering::SeqCst);
            }));
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        let seen: i64 = sqlx::query_scalar("SELECT n FROM c")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let done_when_read = committed.load(Ordering::SeqCst);
        for w in writers {
            w.await.unwrap();
        }
        // With turns the reader has the second connection at once (one or
        // two writers have committed); without, it queued behind the
        // writers sleeping in SQLite's busy handler (15 had committed).
        assert!(
            done_when_read <= 8,
            "the reader waited behind the writers ({done_when_read} of 16 had committed)"
        );
        assert!(seen as usize <= done_when_read + 1);
        let n: i64 = sqlx::query_scalar("SELECT n FROM c")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 16, "every writer's increment is kept");
    }
}
