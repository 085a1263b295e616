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
//!
//! PostgreSQL has row locks and writes in parallel; there the same queue
//! admits at most half the pool's connections as writers at once
//! ([`Turns::writers_at_once`]), tenants' writes first by the same
//! deadlines. On a host short of CPU a fleet's heartbeats and batches
//! otherwise run as many transactions at once as there are connections,
//! and the tenants' reads and writes wait behind them for the CPU
//! (docs/benchmarks.md, "Controller ingest").

use super::{Backend, DbError};
use sqlx::AnyConnection;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long a writer waits for its turn before it fails (retryably), as
/// long as SQLite's own `busy_timeout`.
pub const TURN_WAIT: Duration = Duration::from_secs(10);

/// How much longer than an interactive writer a background writer may be
/// made to wait: hosts heartbeat every 10 s and time out after more.
pub const BACKGROUND_SLACK: Duration = Duration::from_secs(2);

/// Whose write it is, and so where it queues. A person is waiting on an
/// interactive write (a tenant's or an admin's call); a background write
/// is the hosts' steady traffic (heartbeats, op reports, metrics batches)
/// and the controller's own loops, which have seconds to spare. The turn
/// goes to the writer with the earliest deadline: an interactive writer's
/// is when it asked, a background writer's [`BACKGROUND_SLACK`] later. So
/// an interactive writer passes background writers that have waited less
/// than that, and none waits for ever behind a stream of the other class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Interactive,
    Background,
}

tokio::task_local! {
    static CLASS: Class;
}

impl Class {
    /// The class of the writes of the running task: [`Class::Background`]
    /// unless it runs inside [`interactive`].
    pub fn current() -> Self {
        CLASS.try_with(|c| *c).unwrap_or(Class::Background)
    }

    fn index(self) -> usize {
        match self {
            Class::Interactive => 0,
            Class::Background => 1,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Background => "background",
        }
    }
}

/// Runs `f` with its writes queued as [`Class::Interactive`] (tasks it
/// spawns are background again).
pub async fn interactive<F: std::future::Future>(f: F) -> F::Output {
    CLASS.scope(Class::Interactive, f).await
}

/// The writers' turn: `None` where the backend needs none.
#[derive(Clone, Debug, Default)]
pub struct Turns(Option<Arc<Queue>>);

/// The turns (one on SQLite), and who waits for one, by class.
#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    /// How many writers may hold a turn at once.
    permits: usize,
    /// [`BACKGROUND_SLACK`], shorter in tests.
    slack: Duration,
}

#[derive(Debug, Default)]
struct QueueState {
    /// Turns held now.
    held: usize,
    /// By class, each in the order they asked, with when they asked.
    waiting: [VecDeque<(Instant, oneshot::Sender<Held>)>; 2],
}

impl QueueState {
    /// The waiter with the earliest deadline (see [`Class`]).
    fn next(&mut self, slack: Duration) -> Option<oneshot::Sender<Held>> {
        let [interactive, background] = &mut self.waiting;
        let first = match (interactive.front(), background.front()) {
            (Some((i, _)), Some((b, _))) if *b + slack < *i => background,
            (Some(_), _) => interactive,
            (None, _) => background,
        };
        first.pop_front().map(|(_, w)| w)
    }
}

/// The turn itself, and since when it is held: handed on to the next
/// writer when dropped.
#[derive(Debug)]
pub struct Held(Option<Arc<Queue>>, Instant);

impl Held {
    fn new(q: &Arc<Queue>) -> Self {
        Self(Some(q.clone()), Instant::now())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(q) = self.0.take() {
            crate::metrics::db_writer_hold(self.1.elapsed());
            q.hand_on();
        }
    }
}

impl Queue {
    /// Gives the turn to the waiter with the earliest deadline that still
    /// waits, or frees it. The lock is not held while sending: a turn
    /// sent to a waiter that has just given up is dropped on its side,
    /// and that drop hands it on again.
    fn hand_on(self: &Arc<Self>) {
        loop {
            let next = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                match s.next(self.slack) {
                    Some(w) => w,
                    None => {
                        s.held -= 1;
                        return;
                    }
                }
            };
            match next.send(Held::new(self)) {
                Ok(()) => return,
                // That waiter gave up: disarm the turn, try the next.
                Err(mut h) => drop(h.0.take()),
            }
        }
    }
}

/// A writer's turn, held until it is dropped.
pub type Turn = Option<Held>;

impl Turns {
    /// One writer at a time (SQLite).
    pub fn one_at_a_time() -> Self {
        Self::at_once(1, BACKGROUND_SLACK)
    }

    /// At most `permits` writers at a time (PostgreSQL: admission, not
    /// exclusion), served by the same deadlines.
    pub fn writers_at_once(permits: usize) -> Self {
        Self::at_once(permits, BACKGROUND_SLACK)
    }

    #[cfg(test)]
    fn with_slack(slack: Duration) -> Self {
        Self::at_once(1, slack)
    }

    fn at_once(permits: usize, slack: Duration) -> Self {
        Self(Some(Arc::new(Queue {
            state: Mutex::default(),
            permits: permits.max(1),
            slack,
        })))
    }

    /// Waits for this writer's turn (at once where there are no turns),
    /// queued by the running task's [`Class`].
    pub async fn take(&self) -> Result<Turn, DbError> {
        self.take_asked_at(Instant::now()).await
    }

    /// As [`Turns::take`], for a writer that acts for callers who asked
    /// at `asked` (a group of heartbeats: its oldest): its deadline counts
    /// from then.
    pub async fn take_asked_at(&self, asked: Instant) -> Result<Turn, DbError> {
        self.take_within(Class::current(), asked, TURN_WAIT).await
    }

    async fn take_within(
        &self,
        class: Class,
        asked: Instant,
        wait: Duration,
    ) -> Result<Turn, DbError> {
        let Some(q) = &self.0 else { return Ok(None) };
        let started = Instant::now();
        let rx = {
            let mut s = q.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.held < q.permits {
                s.held += 1;
                drop(s);
                crate::metrics::db_writer_wait(class, started.elapsed());
                return Ok(Some(Held::new(q)));
            }
            let (tx, rx) = oneshot::channel();
            // In the order they asked (a group may have asked earlier).
            let waiting = &mut s.waiting[class.index()];
            let at = waiting
                .iter()
                .rposition(|(t, _)| *t <= asked)
                .map_or(0, |i| i + 1);
            waiting.insert(at, (asked, tx));
            rx
        };
        let turn = tokio::time::timeout(wait, rx)
            .await
            .map_err(|_| DbError::NoTurn(wait))?
            .map_err(|_| DbError::NoTurn(Duration::ZERO))?;
        crate::metrics::db_writer_wait(class, started.elapsed());
        Ok(Some(turn))
    }
}

/// A write transaction: derefs to its connection (`&mut **tx` is the
/// executor, as with `sqlx::Transaction`), and holds the writer's turn
/// until it is committed, rolled back or dropped.
pub struct Tx {
    inner: sqlx::Transaction<'static, sqlx::Any>,
    _turn: Turn,
    backend: Backend,
}

impl Tx {
    pub(super) fn new(
        inner: sqlx::Transaction<'static, sqlx::Any>,
        turn: Turn,
        backend: Backend,
    ) -> Self {
        Self {
            inner,
            _turn: turn,
            backend,
        }
    }

    /// The backend the transaction runs on.
    pub fn backend(&self) -> Backend {
        self.backend
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

/// A single-statement write's turn and connection: derefs to the
/// connection (`execute(&mut *w)`).
pub struct Writer {
    conn: sqlx::pool::PoolConnection<sqlx::Any>,
    _turn: Turn,
}

impl Writer {
    pub(super) fn new(conn: sqlx::pool::PoolConnection<sqlx::Any>, turn: Turn) -> Self {
        Self { conn, _turn: turn }
    }
}

impl std::ops::Deref for Writer {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Writer {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
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

    /// With N turns, N writers hold one at once; the next waits for one
    /// to be given back, and a turn given back with nobody waiting frees
    /// its permit.
    #[tokio::test]
    async fn n_writers_at_once_and_the_next_waits() {
        let turns = Turns::writers_at_once(2);
        let a = turns.take().await.unwrap();
        let b = turns.take().await.unwrap();
        assert!(a.is_some() && b.is_some());
        let short = Duration::from_millis(50);
        let third = turns.take_within(Class::Background, Instant::now(), short);
        assert!(matches!(third.await, Err(DbError::NoTurn(_))));
        let waiting = {
            let turns = turns.clone();
            tokio::spawn(async move { turns.take().await.unwrap().is_some() })
        };
        tokio::time::sleep(short).await;
        assert!(
            !waiting.is_finished(),
            "a third writer got a turn while two were held"
        );
        drop(a);
        assert!(
            waiting.await.unwrap(),
            "the freed turn went to the waiting writer"
        );
        drop(b);
        // Both permits free again.
        let (c, d) = (turns.take().await.unwrap(), turns.take().await.unwrap());
        assert!(c.is_some() && d.is_some());
    }

    #[tokio::test]
    async fn a_writer_without_a_turn_fails_retryably_and_postgres_takes_none() {
        let turns = Turns::one_at_a_time();
        let held = turns.take().await.unwrap();
        assert!(held.is_some());
        let e = turns
            .take_within(Class::Background, Instant::now(), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, DbError::NoTurn(_)), "{e}");
        assert!(is_retryable(&e));
        assert!(e.to_string().contains("busy"), "{e}");
        drop(held);
        assert!(turns.take().await.unwrap().is_some());
        assert!(Turns::default().take().await.unwrap().is_none());
    }

    /// The order in which writers queued behind a held turn get it: each
    /// `(name, class, ms)` asks, then the next asks `ms` later. One more
    /// background waiter gives up before the turn is handed on (it is
    /// skipped), and the turn is free again after.
    async fn order(turns: Turns, queue: &[(&'static str, Class, u64)]) -> Vec<&'static str> {
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = turns.take().await.unwrap();
        let mut tasks = Vec::new();
        for &(name, class, ms) in queue {
            let (turns, order) = (turns.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let turn = turns
                    .take_within(class, Instant::now(), TURN_WAIT)
                    .await
                    .unwrap();
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(turn);
            }));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let e = turns
            .take_within(Class::Background, Instant::now(), Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(matches!(e, DbError::NoTurn(_)), "{e}");
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let t = tokio::time::timeout(Duration::from_millis(100), turns.take()).await;
        assert!(t.unwrap().unwrap().is_some(), "the turn is free again");
        let order = order.lock().unwrap().clone();
        order
    }

    /// Interactive writers pass background writers that have waited less
    /// than the slack longer, each class in its order; a background writer
    /// that has waited longer goes first.
    #[tokio::test]
    async fn interactive_writers_go_first_and_background_writers_are_not_starved() {
        use Class::{Background as B, Interactive as I};
        let queue = [
            ("host-1", B, 10),
            ("host-2", B, 150),
            ("tenant-1", I, 10),
            ("host-3", B, 10),
            ("tenant-2", I, 10),
        ];
        assert_eq!(
            order(Turns::one_at_a_time(), &queue).await,
            ["tenant-1", "tenant-2", "host-1", "host-2", "host-3"]
        );
        // With 100 ms of slack, hosts 1 and 2 had waited too long.
        assert_eq!(
            order(Turns::with_slack(Duration::from_millis(100)), &queue).await,
            ["host-1", "host-2", "tenant-1", "tenant-2", "host-3"]
        );
    }

    /// A writer acting for callers who asked earlier (a group of
    /// heartbeats) queues by when they asked: past the slack, it goes
    /// before a newer interactive writer and the background writer that
    /// asked before it.
    #[tokio::test]
    async fn a_group_queues_by_when_its_oldest_caller_asked() {
        let turns = Turns::one_at_a_time();
        let held = turns.take().await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let now = Instant::now();
        let mut tasks = Vec::new();
        for (name, class, asked) in [
            ("host", Class::Background, now),
            ("tenant", Class::Interactive, now),
            ("group", Class::Background, now - Duration::from_secs(3)),
        ] {
            let (turns, order) = (turns.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let turn = turns.take_within(class, asked, TURN_WAIT).await.unwrap();
                order.lock().unwrap().push(name);
                drop(turn);
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["group", "tenant", "host"]);
    }

    /// A write run inside [`interactive`] is interactive; outside it, and
    /// in tasks it spawns, background.
    #[tokio::test]
    async fn the_class_follows_the_task() {
        assert_eq!(Class::current(), Class::Background);
        let (inside, spawned) = interactive(async {
            let spawned = tokio::spawn(async { Class::current() }).await.unwrap();
            (Class::current(), spawned)
        })
        .await;
        assert_eq!(inside, Class::Interactive);
        assert_eq!(spawned, Class::Background);
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
