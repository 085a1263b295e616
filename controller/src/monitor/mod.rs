//! Monitoring samples: what hosts send on `POST /v1/agent/metrics`, kept
//! in the controller's database in three tiers and read back as the
//! Monitor view; or, with `metrics.prometheus_url`, read from Prometheus
//! instead ([`prom`]).
//!
//! Layout (table `metric_samples`, migration 0017): one row per subject
//! (instance id, or host id for the host's own figures) per sample, the
//! values as compact JSON keyed by [`key`] (`series[\t<label>=<value>]…`).
//! Tier [`Tier::Raw`] holds the agents' samples at their `sent_at_ms`;
//! [`Tier::Minute`] and [`Tier::Hour`] hold means over the bucket starting
//! at `t_ms`, with `n` the raw samples they stand for (so coarser means are
//! weighted right). The reconcile loop ([`tick`]) rolls complete buckets
//! up and prunes each tier past its retention, but never rows not yet
//! rolled up; progress lives in `metric_rollups` and moves by a
//! conditional update, so replicas and reruns are harmless. All times are
//! the controller's clock ([`crate::clock`]).

pub mod prom;
pub mod query;
mod tiers;
mod writer;

pub use tiers::{tick, view_db, ROLLUP_LAG_MS};

use crate::config::MetricsConfig;
use crate::db::{col, Db, DbError};
use gantry_proto::metrics::{series, MetricsBatch, Point, Series, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("corrupt metric sample of {subject}: {message}")]
    Corrupt { subject: String, message: String },
    /// Storing a group of batches failed (shared by every batch in it).
    #[error("storing metric samples: {0}")]
    Write(String),
}

impl From<sqlx::Error> for MonitorError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.into())
    }
}

/// A storage tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Raw,
    Minute,
    Hour,
}

impl Tier {
    /// The `tier` column (a bucket's length in seconds; 0 for raw).
    pub fn code(self) -> i64 {
        match self {
            Tier::Raw => 0,
            Tier::Minute => 60,
            Tier::Hour => 3600,
        }
    }

    /// The finest tier still holding `since`.
    pub fn for_since(since_ms: i64, now_ms: i64, cfg: &MetricsConfig) -> Tier {
        let kept = |secs: u64| since_ms >= now_ms - secs as i64 * 1000;
        if kept(cfg.raw_retention_secs) {
            Tier::Raw
        } else if kept(cfg.minute_retention_secs) {
            Tier::Minute
        } else {
            Tier::Hour
        }
    }

    /// The smallest step over this tier: its bucket, or for raw samples
    /// one second (the agent's default interval when `default`).
    pub fn min_step_secs(self, default: bool) -> i64 {
        match self {
            Tier::Raw if default => gantry_proto::metrics::DEFAULT_INTERVAL_SECS as i64,
            Tier::Raw => 1,
            t => t.code(),
        }
    }
}

/// The controller's monitoring state: the HTTP client of the Prometheus
/// reader and what ingest counted.
#[derive(Default)]
pub struct Monitor {
    pub http: reqwest::Client,
    /// Samples refused because their instance is not on the sending host.
    pub foreign_samples: AtomicU64,
    /// Samples stored.
    pub stored_samples: AtomicU64,
    /// Group commit of ingested samples.
    writer: writer::GroupWriter,
}

/// The storage key of a value: its series name, then `\t<label>=<value>`
/// per label (label values never hold control characters: `check()`).
pub fn key(v: &Value) -> String {
    let mut k = v.name.to_string();
    for (l, x) in &v.labels {
        k.push('\t');
        k.push_str(l);
        k.push('=');
        k.push_str(x);
    }
    k
}

/// A storage key's name and labels.
pub fn unkey(k: &str) -> (String, BTreeMap<String, String>) {
    let mut parts = k.split('\t');
    let name = parts.next().unwrap_or_default().to_string();
    let labels = parts
        .filter_map(|p| p.split_once('='))
        .map(|(l, x)| (l.to_string(), x.to_string()))
        .collect();
    (name, labels)
}

/// The values as the `v` column's JSON (a map of [`key`] to value).
pub fn encode(values: &[Value]) -> String {
    let m: BTreeMap<String, f64> = values.iter().map(|v| (key(v), v.v)).collect();
    serde_json::to_string(&m).unwrap_or_else(|_| "{}".into())
}

fn decode(subject: &str, v: &str) -> Result<BTreeMap<String, f64>, MonitorError> {
    serde_json::from_str(v).map_err(|e| MonitorError::Corrupt {
        subject: subject.to_string(),
        message: e.to_string(),
    })
}

/// What one batch did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ingested {
    pub stored: usize,
    /// Whether the rows were still queued for the writer when answered
    /// (see [`writer::ACK_WAIT`]).
    pub queued: bool,
    /// Instances not placed on the sending host.
    pub foreign: usize,
}

/// Rows one INSERT carries.
const INSERT_CHUNK: usize = 100;

/// Stores a checked batch of `host`: the host's sample under its id, and
/// each instance's placed on `host` (others are counted, not stored). A
/// sample already stored at the same time is kept as it is. Batches are
/// written in groups ([`writer`]); this returns once its group committed.
pub async fn ingest(
    db: &Db,
    mon: &Monitor,
    host: &str,
    batch: &MetricsBatch,
) -> Result<Ingested, MonitorError> {
    // Of the batch's instances, those placed on `host` (read by id: a
    // host's past instances are many more).
    let mut mine: HashSet<String> = HashSet::with_capacity(batch.instances.len());
    for chunk in batch.instances.chunks(crate::db::IN_LIST_MAX) {
        let sql = format!(
            "SELECT id FROM instances WHERE host_id = $1 AND id IN ({})",
            crate::db::placeholders(2, chunk.len())
        );
        let mut q = sqlx::query_scalar(&sql).bind(host);
        for s in chunk {
            q = q.bind(s.instance.to_string());
        }
        mine.extend(q.fetch_all(&db.pool).await?);
    }
    let mut rows = vec![(host.to_string(), encode(&batch.host.values()))];
    let mut out = Ingested::default();
    for s in &batch.instances {
        let id = s.instance.to_string();
        if mine.contains(&id) {
            rows.push((id, encode(&s.values())));
        } else {
            out.foreign += 1;
        }
    }
    out.stored = rows.len();
    out.queued = mon.writer.write(db, batch.sent_at_ms, rows).await? == writer::Written::Queued;
    mon.foreign_samples
        .fetch_add(out.foreign as u64, Ordering::Relaxed);
    mon.stored_samples
        .fetch_add(out.stored as u64, Ordering::Relaxed);
    Ok(out)
}

/// One INSERT of `(subject, v)` rows at `t_ms`, keeping rows already there.
async fn insert<'e, E>(
    ex: E,
    tier: Tier,
    t_ms: i64,
    n: i64,
    rows: &[(String, String)],
) -> Result<(), MonitorError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut sql = String::from("INSERT INTO metric_samples (subject, tier, t_ms, n, v) VALUES ");
    for i in 0..rows.len() {
        let b = i * 2;
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("(${}, $1, $2, $3, ${})", b + 4, b + 5));
    }
    sql.push_str(" ON CONFLICT (subject, tier, t_ms) DO NOTHING");
    let mut q = sqlx::query(&sql).bind(tier.code()).bind(t_ms).bind(n);
    for (s, v) in rows {
        q = q.bind(s.clone()).bind(v.clone());
    }
    q.execute(ex).await?;
    Ok(())
}

/// Running means of one subject's values in one bucket: per key, the
/// weighted sum and weight.
#[derive(Default)]
struct Means(BTreeMap<String, (f64, f64)>);

impl Means {
    fn add(&mut self, values: &BTreeMap<String, f64>, n: f64) {
        for (k, v) in values {
            let e = self.0.entry(k.clone()).or_default();
            e.0 += v * n;
            e.1 += n;
        }
    }

    fn mean(&self, k: &str) -> Option<f64> {
        self.0.get(k).filter(|e| e.1 > 0.0).map(|e| e.0 / e.1)
    }

    fn encode(&self) -> String {
        let m: BTreeMap<&String, f64> = self
            .0
            .iter()
            .filter(|(_, e)| e.1 > 0.0)
            .map(|(k, e)| (k, e.0 / e.1))
            .collect();
        serde_json::to_string(&m).unwrap_or_else(|_| "{}".into())
    }
}

/// Series from per-step means (`steps`: step start → means), sorted by
/// name and labels, each with its unit.
fn to_series(steps: &BTreeMap<i64, Means>) -> Vec<Series> {
    let mut by_key: BTreeMap<&str, Vec<Point>> = BTreeMap::new();
    for (t, m) in steps {
        for k in m.0.keys() {
            if let Some(v) = m.mean(k) {
                by_key.entry(k).or_default().push(Point {
                    t: crate::db::to_time(*t),
                    v,
                });
            }
        }
    }
    by_key
        .into_iter()
        .map(|(k, points)| {
            let (name, labels) = unkey(k);
            Series {
                unit: series::unit(&name).to_string(),
                name,
                labels,
                points,
            }
        })
        .collect()
}

/// Reads `n` and `v` of a sample row.
fn row_values(
    r: &sqlx::any::AnyRow,
    subject: &str,
) -> Result<(f64, BTreeMap<String, f64>), MonitorError> {
    let n: i64 = col(r, "n")?;
    let v: String = col(r, "v")?;
    Ok((n.max(1) as f64, decode(subject, &v)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_labels() {
        let v = Value {
            name: series::GPU_UTIL_PCT,
            labels: vec![("gpu", "0".into()), ("uuid", "GPU-a=b".into())],
            v: 1.0,
        };
        let (name, labels) = unkey(&key(&v));
        assert_eq!(name, "gpu_util_pct");
        assert_eq!(labels["uuid"], "GPU-a=b");
        assert_eq!(labels["gpu"], "0");
    }

    #[test]
    fn means_weigh_by_sample_count() {
        let mut m = Means::default();
        m.add(&BTreeMap::from([("cpu_pct".to_string(), 10.0)]), 1.0);
        m.add(&BTreeMap::from([("cpu_pct".to_string(), 40.0)]), 2.0);
        assert_eq!(m.mean("cpu_pct"), Some(30.0));
        assert_eq!(m.encode(), r#"{"cpu_pct":30.0}"#);
    }
}
