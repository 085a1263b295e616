//! The tiers over time: rolling complete buckets up (raw → one-minute
//! means → hourly means), pruning past retention, and reading a subject's
//! rows back as per-step means.

use super::query::Range;
use super::{insert, row_values, to_series, Means, MonitorError, Tier};
use crate::db::{col, Db};
use crate::AppState;
use gantry_proto::metrics::Series;
use std::collections::BTreeMap;

/// How long after a minute ends its raw samples are rolled up (batches
/// arrive a little after their `sent_at_ms`).
pub const ROLLUP_LAG_MS: i64 = 15_000;
/// Most buckets one pass rolls up per tier (a long outage catches up over
/// several passes).
const MAX_BUCKETS: usize = 120;
/// Rows read at a time while rolling a bucket up.
const PAGE: i64 = 5_000;

/// One reconcile step: rolls complete buckets up, then prunes, on the
/// controller's clock. Idempotent.
pub async fn tick(st: &AppState) -> Result<(), MonitorError> {
    if st.cfg.metrics.prometheus_url.is_some() {
        return Ok(());
    }
    let now = st.clock.now_ms();
    let db = &st.db;
    let minute_to = (now - ROLLUP_LAG_MS).div_euclid(60_000) * 60_000;
    rollup(db, Tier::Raw, Tier::Minute, minute_to).await?;
    let minutes_done = done(db, Tier::Minute).await?;
    if let Some(m) = minutes_done {
        rollup(
            db,
            Tier::Minute,
            Tier::Hour,
            m.div_euclid(3_600_000) * 3_600_000,
        )
        .await?;
    }
    let hours_done = done(db, Tier::Hour).await?;
    let m = &st.cfg.metrics;
    let cut = |secs: u64| now - secs as i64 * 1000;
    // Never a row a coarser tier has not taken in yet.
    prune(
        db,
        Tier::Raw,
        cut(m.raw_retention_secs).min(minutes_done.unwrap_or(i64::MIN)),
    )
    .await?;
    prune(
        db,
        Tier::Minute,
        cut(m.minute_retention_secs).min(hours_done.unwrap_or(i64::MIN)),
    )
    .await?;
    prune(db, Tier::Hour, cut(m.hour_retention_secs)).await?;
    Ok(())
}

/// Where `tier`'s rollup stands: every bucket before it is written.
async fn done(db: &Db, tier: Tier) -> Result<Option<i64>, MonitorError> {
    Ok(
        sqlx::query_scalar("SELECT done_ms FROM metric_rollups WHERE tier = $1")
            .bind(tier.code())
            .fetch_optional(&db.pool)
            .await?,
    )
}

/// The earliest `from` row at or after `at` and before `to`.
async fn next_row(db: &Db, from: Tier, at: i64, to: i64) -> Result<Option<i64>, MonitorError> {
    let t: Option<i64> = sqlx::query_scalar(
        "SELECT MIN(t_ms) FROM metric_samples WHERE tier = $1 AND t_ms >= $2 AND t_ms < $3",
    )
    .bind(from.code())
    .bind(at)
    .bind(to)
    .fetch_one(&db.pool)
    .await?;
    Ok(t)
}

/// Rolls `from`'s rows up into `into`'s buckets that start before `to`.
async fn rollup(db: &Db, from: Tier, into: Tier, to: i64) -> Result<(), MonitorError> {
    let len = into.code() * 1000;
    let mut at = match done(db, into).await? {
        Some(d) => d,
        None => {
            // The first pass starts at the oldest row there is.
            let first = next_row(db, from, i64::MIN, to).await?;
            let start = first.map_or(to, |t| t.div_euclid(len) * len);
            sqlx::query(
                "INSERT INTO metric_rollups (tier, done_ms) VALUES ($1, $2) \
                 ON CONFLICT (tier) DO NOTHING",
            )
            .bind(into.code())
            .bind(start)
            .execute(&db.pool)
            .await?;
            match done(db, into).await? {
                Some(d) => d,
                None => return Ok(()),
            }
        }
    };
    for _ in 0..MAX_BUCKETS {
        if at >= to {
            break;
        }
        let bucket = match next_row(db, from, at, to).await? {
            Some(t) => t.div_euclid(len) * len,
            None => to,
        };
        let rows = if bucket < to {
            bucket_means(db, from, bucket, bucket + len).await?
        } else {
            Vec::new()
        };
        let next = if bucket < to { bucket + len } else { to };
        let mut tx = db.begin_write().await?;
        for chunk in rows.chunks(super::INSERT_CHUNK) {
            for (n, group) in group_by_n(chunk) {
                insert(&mut *tx, into, bucket, n, &group).await?;
            }
        }
        let moved =
            sqlx::query("UPDATE metric_rollups SET done_ms = $1 WHERE tier = $2 AND done_ms = $3")
                .bind(next)
                .bind(into.code())
                .bind(at)
                .execute(&mut *tx)
                .await?;
        if moved.rows_affected() != 1 {
            // Another replica got there first.
            tx.rollback().await?;
            return Ok(());
        }
        tx.commit().await?;
        at = next;
    }
    Ok(())
}

/// Rows with the same `n` (one INSERT binds one `n`).
fn group_by_n(rows: &[(String, i64, String)]) -> BTreeMap<i64, Vec<(String, String)>> {
    let mut out: BTreeMap<i64, Vec<(String, String)>> = BTreeMap::new();
    for (s, n, v) in rows {
        out.entry(*n).or_default().push((s.clone(), v.clone()));
    }
    out
}

/// The means of every subject's `from` rows in `[start, end)`: subject,
/// raw samples, values. Read a page at a time, in subject order.
async fn bucket_means(
    db: &Db,
    from: Tier,
    start: i64,
    end: i64,
) -> Result<Vec<(String, i64, String)>, MonitorError> {
    let mut out = Vec::new();
    let mut cur: Option<(String, i64, Means)> = None;
    let (mut after_s, mut after_t) = (String::new(), i64::MIN);
    loop {
        let page = sqlx::query(
            "SELECT subject, t_ms, n, v FROM metric_samples WHERE tier = $1 AND t_ms >= $2 \
             AND t_ms < $3 AND (subject > $4 OR (subject = $4 AND t_ms > $5)) \
             ORDER BY subject, t_ms LIMIT $6",
        )
        .bind(from.code())
        .bind(start)
        .bind(end)
        .bind(&after_s)
        .bind(after_t)
        .bind(PAGE)
        .fetch_all(&db.pool)
        .await?;
        for r in &page {
            let subject: String = col(r, "subject")?;
            let (n, values) = row_values(r, &subject)?;
            if cur.as_ref().is_some_and(|c| c.0 != subject) {
                if let Some((s, total, m)) = cur.take() {
                    out.push((s, total, m.encode()));
                }
            }
            let c = cur.get_or_insert_with(|| (subject.clone(), 0, Means::default()));
            c.1 += n as i64;
            c.2.add(&values, n);
            after_t = col(r, "t_ms")?;
            after_s = subject;
        }
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    if let Some((s, total, m)) = cur {
        out.push((s, total, m.encode()));
    }
    Ok(out)
}

/// Deletes `tier`'s rows older than `before`.
async fn prune(db: &Db, tier: Tier, before: i64) -> Result<(), MonitorError> {
    let mut w = db.writer().await?;
    let gone = sqlx::query("DELETE FROM metric_samples WHERE tier = $1 AND t_ms < $2")
        .bind(tier.code())
        .bind(before)
        .execute(&mut *w)
        .await?;
    if gone.rows_affected() > 0 {
        tracing::debug!(
            tier = tier.code(),
            rows = gone.rows_affected(),
            "pruned metric samples"
        );
    }
    Ok(())
}

/// A subject's series over `range` from its tier, averaged per step
/// (steps start at multiples of the step), and the latest row's time.
pub async fn view_db(
    db: &Db,
    subject: &str,
    range: &Range,
) -> Result<(Vec<Series>, Option<i64>), MonitorError> {
    let rows = sqlx::query(
        "SELECT t_ms, n, v FROM metric_samples WHERE subject = $1 AND tier = $2 AND t_ms >= $3 \
         AND t_ms <= $4 ORDER BY t_ms",
    )
    .bind(subject)
    .bind(range.tier.code())
    .bind(range.since_ms)
    .bind(range.until_ms)
    .fetch_all(&db.pool)
    .await?;
    let step = range.step_secs.max(1) as i64 * 1000;
    let mut steps: BTreeMap<i64, Means> = BTreeMap::new();
    let mut latest = None;
    for r in &rows {
        let t: i64 = col(r, "t_ms")?;
        let (n, values) = row_values(r, subject)?;
        steps
            .entry(t.div_euclid(step) * step)
            .or_default()
            .add(&values, n);
        latest = Some(t);
    }
    Ok((to_series(&steps), latest))
}
