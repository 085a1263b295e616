//! The reconcile loop, started by [`crate::serve`]: every `reconcile_secs`
//! it marks silent hosts down, times out operations (`crate::operations`),
//! stops the Running instances of accounts out of credit for longer than
//! `credit_grace_secs`, and runs the snapshot storage meter
//! (`crate::meter`) and the volume meter (`crate::volume_meter`); the last
//! three on the billing clock (`crate::clock`). Each step is idempotent (conditional
//! updates), so replicas sharing a database and restarts are harmless. A
//! database error is logged and the loop backs off exponentially (up to
//! 60 s).

use crate::db::{now_ms, rows, DbError};
use crate::AppState;
use std::time::Duration;

const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Runs forever (the caller aborts it).
pub async fn run(st: AppState) {
    let every = Duration::from_secs(st.cfg.reconcile_secs.max(1));
    let mut delay = every;
    loop {
        tokio::time::sleep(delay).await;
        match once(&st).await {
            Ok(()) => delay = every,
            Err(e) => {
                delay = (delay * 2).min(MAX_BACKOFF).max(every);
                tracing::error!(error = %e, retry_in_s = delay.as_secs(), "reconcile failed");
            }
        }
    }
}

/// One pass of every step.
pub async fn once(st: &AppState) -> Result<(), DbError> {
    mark_down(st).await?;
    crate::operations::time_out(st).await?;
    grace_stops(st).await?;
    crate::meter::tick(st).await?;
    crate::volume_meter::tick(st).await?;
    crate::api::accounts::tick(st).await?;
    if let Err(e) = crate::monitor::tick(st).await {
        // Samples are lossy by design: a failed rollup is retried next pass.
        tracing::warn!(error = %e, "monitoring rollup failed");
    }
    Ok(())
}

/// Hosts not heard from within `heartbeat_timeout_secs` are down (and
/// unhealthy) since their last heartbeat: their instances show as
/// `HostDown`, and nothing is placed on them. A heartbeat brings a host
/// back (`api::agent`).
async fn mark_down(st: &AppState) -> Result<(), DbError> {
    let cutoff = now_ms() - st.cfg.heartbeat_timeout_secs as i64 * 1000;
    let done = sqlx::query(
        "UPDATE hosts SET health = 'unhealthy', down_since_ms = last_heartbeat_ms \
         WHERE down_since_ms IS NULL AND last_heartbeat_ms < $1",
    )
    .bind(cutoff)
    .execute(&st.db.pool)
    .await?;
    if done.rows_affected() > 0 {
        tracing::warn!(
            hosts = done.rows_affected(),
            "hosts missed their heartbeats; marked down"
        );
    }
    Ok(())
}

/// Notes when credit ran out (or came back), then stops the Running
/// instances of accounts out of credit for longer than the grace time.
async fn grace_stops(st: &AppState) -> Result<(), DbError> {
    let now = st.clock.now_ms();
    sqlx::query(
        "UPDATE accounts SET credit_exhausted_ms = $1 WHERE credit_micros <= 0 \
         AND credit_exhausted_ms IS NULL",
    )
    .bind(now)
    .execute(&st.db.pool)
    .await?;
    sqlx::query(
        "UPDATE accounts SET credit_exhausted_ms = NULL WHERE credit_micros > 0 \
         AND credit_exhausted_ms IS NOT NULL",
    )
    .execute(&st.db.pool)
    .await?;
    let cutoff = now - st.cfg.credit_grace_secs as i64 * 1000;
    let sql = format!(
        "{} JOIN accounts a ON a.id = i.account_id WHERE a.credit_micros <= 0 AND \
         a.credit_exhausted_ms IS NOT NULL AND a.credit_exhausted_ms <= $1 AND \
         i.observed_state = 'Running' AND i.pending_op IS NULL",
        rows::INSTANCE_SELECT
    );
    let found = sqlx::query(&sql)
        .bind(cutoff)
        .fetch_all(&st.db.pool)
        .await?;
    for r in &found {
        let rec = rows::instance(r)?;
        crate::operations::stop_for_policy(st, &rec, "out of credit").await?;
    }
    Ok(())
}
