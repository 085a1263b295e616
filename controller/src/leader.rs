//! Leadership among controller replicas: which one runs the background
//! work (the reconcile loop: silent hosts, operation timeouts, credit
//! grace stops, the snapshot storage meter).
//!
//! Every replica serves the API; exactly one at a time leads. On
//! PostgreSQL the leader holds a lease: the row `background` of
//! `controller_leases`, with an expiry in the database server's clock
//! (so the replicas' clocks do not matter), taken or renewed by one
//! conditional upsert on a connection of its own (not the pool's, so a
//! busy API cannot starve it). The holder renews every third of
//! `leader_lease_secs`; a follower looks again just after the expiry it
//! read, so it takes over within one lease of the leader's last renewal.
//!
//! The leader keeps a local deadline: the instant before it sent its
//! last successful renewal, plus the lease. That is never later than
//! the expiry the database wrote, so a leader that cannot renew (a dead
//! database link, a hung query, another holder) has stopped its work
//! before any follower may take the lease; stopping aborts the work's
//! task at once. The background steps are idempotent besides
//! (conditional updates), so a write already in flight when the work is
//! aborted cannot be applied twice by the next leader.
//!
//! On SQLite the one controller always leads (an SQLite file cannot be
//! shared by replicas). Leadership shows in `/metrics`
//! (`gantry_controller_leader`, `gantry_controller_leader_term`) and in
//! the logs (acquired, lost, resigned).

use crate::db::Backend;
use crate::AppState;
use sqlx::{Connection, Row};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The lease's row name.
const LEASE: &str = "background";
/// How long a resigning leader tries to hand the lease back.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// The database server's clock, Unix milliseconds.
const DB_NOW: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader lease: {0}")]
    Db(#[from] sqlx::Error),
    #[error("leader lease: the database did not answer in time")]
    Timeout,
    #[error("leader lease: no database URL in the config")]
    NoUrl,
}

/// Whether this controller leads now, and the lease's term while it
/// does (shared with `/metrics`).
#[derive(Debug, Default)]
pub struct Leadership {
    leading: AtomicBool,
    term: AtomicI64,
}

impl Leadership {
    /// Whether this controller runs the background work now.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// The lease's term while leading (0 otherwise; 1 on SQLite).
    pub fn term(&self) -> i64 {
        self.term.load(Ordering::SeqCst)
    }

    fn set(&self, leading: bool, term: i64) {
        self.term
            .store(if leading { term } else { 0 }, Ordering::SeqCst);
        self.leading.store(leading, Ordering::SeqCst);
    }

    /// The Prometheus lines of leadership.
    pub fn render_metrics(&self) -> String {
        format!(
            "# HELP gantry_controller_leader 1 while this controller runs the background work \
             (reconcile loop, meters), else 0.\n# TYPE gantry_controller_leader gauge\n\
             gantry_controller_leader {}\n\
             # HELP gantry_controller_leader_term The leader lease's term this controller holds \
             (0 when it does not lead).\n# TYPE gantry_controller_leader_term gauge\n\
             gantry_controller_leader_term {}\n",
            u8::from(self.is_leader()),
            self.term()
        )
    }
}

/// A name for this process in the lease row: the listen address, the
/// process id and a random suffix (two starts never share one).
pub fn holder_name(addr: Option<std::net::SocketAddr>) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    match addr {
        Some(a) => format!("{a} pid {} {}", std::process::id(), &id[..8]),
        None => format!("pid {} {}", std::process::id(), &id[..8]),
    }
}

/// Runs `work` whenever this controller leads, until `stop` completes;
/// then stops the work and hands the lease back.
pub async fn run<W, F>(st: AppState, holder: String, work: W, stop: impl Future<Output = ()>)
where
    W: Fn(AppState) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    if st.db.backend == Backend::Sqlite {
        st.leader.set(true, 1);
        tracing::info!("leading: the only controller on SQLite runs the background work");
        let task = Task(tokio::spawn(work(st.clone())));
        stop.await;
        task.stop().await;
        st.leader.set(false, 0);
        return;
    }
    let Some(url) = st.cfg.database_url.clone() else {
        tracing::error!(error = %LeaderError::NoUrl, "background work not started");
        return;
    };
    let lease = st.cfg.leader_lease_secs.max(1) * 1000;
    let mut l = Leader {
        lease: Lease {
            url,
            holder,
            lease_ms: i64::try_from(lease).unwrap_or(i64::MAX),
            conn: None,
        },
        lease_len: Duration::from_millis(lease),
        st,
        work,
        running: None,
        seen: None,
        failures: 0,
    };
    tokio::select! {
        _ = l.lead() => {}
        _ = stop => {}
    }
    l.resign().await;
}

/// The work's task, aborted when dropped.
struct Task(JoinHandle<()>);

impl Task {
    /// Aborts the task and waits until it is gone.
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The work running under one term of the lease.
struct Running {
    term: i64,
    /// Past this instant the lease may have lapsed: stop.
    deadline: Instant,
    task: Task,
}

struct Leader<W> {
    st: AppState,
    work: W,
    lease: Lease,
    lease_len: Duration,
    running: Option<Running>,
    /// The holder last seen leading while this one followed (logged once).
    seen: Option<String>,
    /// Attempts failed in a row (only the first is logged as a warning).
    failures: u32,
}

impl<W, F> Leader<W>
where
    W: Fn(AppState) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    /// How often the holder renews.
    fn period(&self) -> Duration {
        (self.lease_len / 3).max(Duration::from_millis(100))
    }

    /// Takes or renews the lease forever; the caller drops this to stop.
    async fn lead(&mut self) {
        loop {
            let wait = self.step().await;
            match self.running.as_ref().map(|r| r.deadline) {
                Some(deadline) => tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        self.lose("the lease was not renewed in time").await;
                    }
                },
                None => tokio::time::sleep(wait).await,
            }
        }
    }

    /// One attempt at taking or renewing the lease; returns how long to
    /// wait before the next.
    async fn step(&mut self) -> Duration {
        let t0 = Instant::now();
        let limit = self
            .running
            .as_ref()
            .map_or(t0 + self.period(), |r| r.deadline);
        let res = tokio::time::timeout_at(limit, self.lease.attempt())
            .await
            .unwrap_or(Err(LeaderError::Timeout));
        if res.is_ok() && self.failures > 0 {
            tracing::info!(failed = self.failures, "the leader lease answers again");
            self.failures = 0;
        }
        match res {
            Ok(Attempt::Held { term }) => {
                self.held(term, t0).await;
                self.period()
            }
            Ok(Attempt::Busy {
                holder,
                remaining_ms,
            }) => {
                if self.running.is_some() {
                    self.lose(&format!("{holder} holds the lease")).await;
                }
                if self.seen.as_deref() != Some(holder.as_str()) {
                    tracing::info!(leader = %holder, "following: another controller leads");
                    self.seen = Some(holder);
                }
                // Look again just after it expires (renewed by then, or not).
                let ms = u64::try_from(remaining_ms).unwrap_or(0) + 20;
                Duration::from_millis(ms).min(self.lease_len)
            }
            Err(e) => {
                self.lease.conn = None;
                self.failures += 1;
                if self.failures == 1 {
                    tracing::warn!(error = %e, "cannot take or renew the leader lease");
                } else {
                    tracing::debug!(error = %e, failed = self.failures, "leader lease still failing");
                }
                if self
                    .running
                    .as_ref()
                    .is_some_and(|r| Instant::now() >= r.deadline)
                {
                    self.lose("the lease was not renewed in time").await;
                }
                (self.period() / 4).max(Duration::from_millis(50))
            }
        }
    }

    /// The lease is ours (sent at `t0`): extend the deadline, or start
    /// the work under a new term.
    async fn held(&mut self, term: i64, t0: Instant) {
        let deadline = t0 + self.lease_len;
        if let Some(r) = self.running.as_mut() {
            if r.term == term && !r.task.0.is_finished() {
                r.deadline = deadline;
                return;
            }
            let why = if r.term == term {
                "the background work ended"
            } else {
                "the lease lapsed"
            };
            self.lose(why).await;
        }
        let task = Task(tokio::spawn((self.work)(self.st.clone())));
        self.running = Some(Running {
            term,
            deadline,
            task,
        });
        self.seen = None;
        self.st.leader.set(true, term);
        tracing::info!(
            term,
            holder = %self.lease.holder,
            "leading: this controller runs the background work"
        );
    }

    /// Stops the work at once (leadership lost).
    async fn lose(&mut self, why: &str) {
        if let Some(r) = self.running.take() {
            self.st.leader.set(false, 0);
            r.task.stop().await;
            tracing::warn!(
                term = r.term,
                reason = why,
                "lost the leadership; background work stopped"
            );
        }
    }

    /// Shutting down: stops the work, then hands the lease back so that
    /// a follower need not wait for it to expire.
    async fn resign(&mut self) {
        let Some(r) = self.running.take() else {
            return;
        };
        self.st.leader.set(false, 0);
        r.task.stop().await;
        // The link may have been cut mid-query by the stop: a fresh one.
        self.lease.conn = None;
        match tokio::time::timeout(RELEASE_TIMEOUT, self.lease.release()).await {
            Ok(Ok(())) => tracing::info!(term = r.term, "resigned the leadership"),
            Ok(Err(e)) => tracing::warn!(error = %e, "stopped leading; the lease will expire"),
            Err(_) => tracing::warn!("stopped leading; the lease will expire"),
        }
    }
}

/// What an attempt at the lease found.
enum Attempt {
    /// Ours, under this term (a new term after any change of holder).
    Held { term: i64 },
    /// Another's, for this long still (database clock).
    Busy { holder: String, remaining_ms: i64 },
}

/// The lease row, through a connection of its own.
struct Lease {
    url: String,
    holder: String,
    lease_ms: i64,
    conn: Option<sqlx::AnyConnection>,
}

impl Lease {
    async fn conn(&mut self) -> Result<&mut sqlx::AnyConnection, LeaderError> {
        if self.conn.is_none() {
            self.conn = Some(sqlx::AnyConnection::connect(&self.url).await?);
        }
        self.conn.as_mut().ok_or(LeaderError::Timeout)
    }

    /// Takes the lease if it is free or expired, renews it if ours.
    async fn attempt(&mut self) -> Result<Attempt, LeaderError> {
        let (holder, lease_ms) = (self.holder.clone(), self.lease_ms);
        let c = self.conn().await?;
        // Ours and live: renewed under the same term. Anything else that
        // may be taken (expired, or ours but lapsed): a new term.
        let sql = format!(
            "INSERT INTO controller_leases (name, holder, term, acquired_ms, expires_ms) \
             SELECT $1, $2, 1, n.ms, n.ms + $3 FROM (SELECT {DB_NOW} AS ms) n \
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
             term = CASE WHEN controller_leases.holder = EXCLUDED.holder AND \
               controller_leases.expires_ms > EXCLUDED.acquired_ms \
               THEN controller_leases.term ELSE controller_leases.term + 1 END, \
             acquired_ms = CASE WHEN controller_leases.holder = EXCLUDED.holder AND \
               controller_leases.expires_ms > EXCLUDED.acquired_ms \
               THEN controller_leases.acquired_ms ELSE EXCLUDED.acquired_ms END, \
             expires_ms = EXCLUDED.expires_ms \
             WHERE controller_leases.holder = EXCLUDED.holder \
               OR controller_leases.expires_ms <= EXCLUDED.acquired_ms \
             RETURNING term"
        );
        let row = sqlx::query(&sql)
            .bind(LEASE)
            .bind(&holder)
            .bind(lease_ms)
            .fetch_optional(&mut *c)
            .await?;
        if let Some(r) = row {
            return Ok(Attempt::Held {
                term: r.try_get("term")?,
            });
        }
        let sql = format!(
            "SELECT holder, expires_ms - {DB_NOW} AS remaining_ms FROM controller_leases \
             WHERE name = $1"
        );
        let row = sqlx::query(&sql)
            .bind(LEASE)
            .fetch_optional(&mut *c)
            .await?;
        Ok(match row {
            Some(r) => Attempt::Busy {
                holder: r.try_get("holder")?,
                remaining_ms: r.try_get("remaining_ms")?,
            },
            None => Attempt::Busy {
                holder: "nobody".into(),
                remaining_ms: 0,
            },
        })
    }

    /// Lets the lease expire now, if it is still ours.
    async fn release(&mut self) -> Result<(), LeaderError> {
        let holder = self.holder.clone();
        let c = self.conn().await?;
        sqlx::query("UPDATE controller_leases SET expires_ms = 0 WHERE name = $1 AND holder = $2")
            .bind(LEASE)
            .bind(holder)
            .execute(&mut *c)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_show_leadership_and_term() {
        let l = Leadership::default();
        assert!(l
            .render_metrics()
            .contains("\ngantry_controller_leader 0\n"));
        l.set(true, 7);
        let m = l.render_metrics();
        assert!(m.contains("\ngantry_controller_leader 1\n"), "{m}");
        assert!(m.contains("\ngantry_controller_leader_term 7\n"), "{m}");
        l.set(false, 7);
        assert_eq!(l.term(), 0);
    }

    #[test]
    fn holder_names_differ_between_starts() {
        let a = holder_name(Some("127.0.0.1:8787".parse().unwrap()));
        let b = holder_name(Some("127.0.0.1:8787".parse().unwrap()));
        assert!(a.starts_with("127.0.0.1:8787 pid "), "{a}");
        assert_ne!(a, b);
    }
}
