//! The controller's own Prometheus metrics, served at `GET /metrics` (an
//! admin token is required: the lines name hosts).
//!
//! - API latency: [`track`] (a middleware on the whole router) times every
//!   request into `gantry_controller_http_request_duration_seconds`,
//!   labelled by method, the route *template* axum matched
//!   (`/v1/instances/{id}`; ids never become label values) and the status
//!   class; a path no route matched is `route="unmatched"`.
//! - Fleet gauges, computed at scrape with a few aggregate queries: hosts
//!   by health, instances by observed state, operations by kind and state,
//!   and the Running seconds billed (the instance rows of the usage
//!   ledger, `usage_records`).
//! - Metrics batches the ingest endpoint took or refused, counted through
//!   [`metrics_batch`].
//! - Writes run again after losing a race ([`ControllerMetrics::retried`]).
//! - How long SQLite writers waited for their turn
//!   (`gantry_controller_db_writer_wait_seconds`, [`db_writer_wait`]).
//! - What `/metrics` carried before: GPUs by host and health
//!   ([`crate::gpus::render_metrics`]), leadership and refused calls.
//!
//! The text format is Prometheus 0.0.4, written by hand like the other
//! renderers of this crate; every label value is escaped.

use crate::db::{col, DbError};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use gantry_proto::operation::{OperationKind, OperationState};
use gantry_proto::InstanceState;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The route label of a request no route matched.
pub const UNMATCHED: &str = "unmatched";

/// Most distinct batch outcomes counted; others count as `other`.
const MAX_OUTCOMES: usize = 16;

/// Host health values always rendered (0 when none).
const HOST_HEALTH: [&str; 2] = ["healthy", "unhealthy"];

/// One series of the histogram: method, route template, status class.
type Key = (&'static str, String, &'static str);

/// One histogram series: counts per bucket (not cumulative), sum, count.
#[derive(Default, Clone)]
struct Hist {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Hist {
    fn observe(&mut self, secs: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i] += 1;
        }
        self.sum += secs;
        self.count += 1;
    }
}

/// The controller's in-memory metrics (the API latency histogram); part
/// of the shared state.
#[derive(Default)]
pub struct ControllerMetrics {
    http: Mutex<HashMap<Key, Hist>>,
    /// Write transactions run again after losing a race, by write.
    retries: Mutex<BTreeMap<Write, u64>>,
}

/// A write that can lose a race with another and be run again
/// (`gantry_controller_write_retries_total{write}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Write {
    /// An instance create (its placement, address or ports were taken).
    Create,
    /// A host's access state (its subnet) or certificate.
    HostAccess,
}

impl Write {
    const ALL: [Write; 2] = [Write::Create, Write::HostAccess];

    fn label(self) -> &'static str {
        match self {
            Write::Create => "create",
            Write::HostAccess => "host_access",
        }
    }
}

impl ControllerMetrics {
    /// Counts one write run again after a lost race.
    pub fn retried(&self, w: Write) {
        let mut m = self.retries.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(w).or_default() += 1;
    }

    /// The retry counters in the text format (every write, 0 when none).
    pub fn render_retries(&self) -> String {
        let name = "gantry_controller_write_retries_total";
        let mut out = format!(
            "# HELP {name} Write transactions run again after losing a race with another \
             (a placement, address, port or subnet taken first), by write.\n\
             # TYPE {name} counter\n"
        );
        let m = self.retries.lock().unwrap_or_else(|e| e.into_inner());
        for w in Write::ALL {
            let n = m.get(&w).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}{{write=\"{}\"}} {n}", w.label());
        }
        out
    }

    /// Records one answered request.
    pub fn observe(&self, method: &Method, route: &str, status: u16, secs: f64) {
        let key = (
            method_label(method),
            route.to_string(),
            status_class(status),
        );
        let mut m = self.http.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(key).or_default().observe(secs);
    }

    /// The histogram in the text format.
    pub fn render_http(&self) -> String {
        let snapshot: BTreeMap<Key, Hist> = {
            let m = self.http.lock().unwrap_or_else(|e| e.into_inner());
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let name = "gantry_controller_http_request_duration_seconds";
        let mut out = format!(
            "# HELP {name} Time from a request's arrival to its answer, by method, route \
             template and status class.\n# TYPE {name} histogram\n"
        );
        for ((method, route, class), h) in &snapshot {
            let labels = format!(
                "method=\"{method}\",route=\"{}\",status_class=\"{class}\"",
                escape(route)
            );
            h.render(&mut out, name, &labels);
        }
        out
    }
}

impl Hist {
    /// One series' lines; `labels` is empty or `k="v",...` without braces.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(self.buckets) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braced} {}", self.count);
    }
}

/// How long SQLite writers waited for their turn (see `db::tx`), by class
/// (interactive, background).
static WRITER_WAIT: Mutex<[Hist; 2]> = Mutex::new(
    [const {
        Hist {
            buckets: [0; BUCKETS.len()],
            sum: 0.0,
            count: 0,
        }
    }; 2],
);

/// Records one writer's wait for its turn.
pub fn db_writer_wait(class: crate::db::Class, waited: std::time::Duration) {
    let mut h = WRITER_WAIT.lock().unwrap_or_else(|e| e.into_inner());
    let i = usize::from(class == crate::db::Class::Background);
    h[i].observe(waited.as_secs_f64());
}

/// How long SQLite writers held their turn (see `db::tx`).
static WRITER_HOLD: Mutex<Hist> = Mutex::new(Hist {
    buckets: [0; BUCKETS.len()],
    sum: 0.0,
    count: 0,
});

/// Records how long one writer held its turn.
pub fn db_writer_hold(held: std::time::Duration) {
    let mut h = WRITER_HOLD.lock().unwrap_or_else(|e| e.into_inner());
    h.observe(held.as_secs_f64());
}

fn render_writer_wait() -> String {
    let name = "gantry_controller_db_writer_wait_seconds";
    let mut out = format!(
        "# HELP {name} Time a write transaction waited for its turn at the database (SQLite: \
         one writer at a time; interactive writers, tenants' and admins' calls, go first).\n\
         # TYPE {name} histogram\n"
    );
    let h = WRITER_WAIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (class, h) in [crate::db::Class::Interactive, crate::db::Class::Background]
        .into_iter()
        .zip(h.iter())
    {
        h.render(&mut out, name, &format!("class=\"{}\"", class.label()));
    }
    let name = "gantry_controller_db_writer_hold_seconds";
    let _ = write!(
        out,
        "# HELP {name} Time a writer held its turn at the database (SQLite), the \
         serial part of every write.\n# TYPE {name} histogram\n"
    );
    let h = WRITER_HOLD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    h.render(&mut out, name, "");
    out
}

/// Batches counted by outcome, process-wide (see [`metrics_batch`]).
static BATCHES: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Counts one metrics batch the ingest endpoint handled, by `outcome`
/// (`stored`, `refused`, ...: lowercase letters, digits and `_`, at most
/// 32; anything else, or a seventeenth distinct outcome, counts as
/// `other`). Rendered as `gantry_controller_metrics_batches_total`.
pub fn metrics_batch(outcome: &str) {
    let ok = !outcome.is_empty()
        && outcome.len() <= 32
        && outcome
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    let mut m = BATCHES.lock().unwrap_or_else(|e| e.into_inner());
    let key = if ok && (m.contains_key(outcome) || m.len() < MAX_OUTCOMES - 1) {
        outcome
    } else {
        "other"
    };
    *m.entry(key.to_string()).or_default() += 1;
}

fn render_batches() -> String {
    let name = "gantry_controller_metrics_batches_total";
    let mut out = format!(
        "# HELP {name} Metrics batches from hosts the ingest endpoint handled, by outcome.\n\
         # TYPE {name} counter\n"
    );
    let m = BATCHES.lock().unwrap_or_else(|e| e.into_inner());
    for (outcome, n) in m.iter() {
        let _ = writeln!(out, "{name}{{outcome=\"{}\"}} {n}", escape(outcome));
    }
    out
}

/// Middleware: times every request under the route axum matched (or
/// [`UNMATCHED`]).
pub async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    st.metrics.observe(
        &method,
        &route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// `GET /metrics`: every controller metric. Prometheus sends the admin
/// token as a bearer token.
pub async fn serve(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    st.verifier.verify(&st.db, token).await?.require_admin()?;
    let body = render(&st).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

/// The whole `/metrics` text.
pub async fn render(st: &AppState) -> Result<String, DbError> {
    let mut body = crate::gpus::render_metrics(&st.db.pool).await?;
    body.push_str(&st.leader.render_metrics());
    body.push_str(&st.limiter.render_metrics());
    body.push_str(&st.metrics.render_http());
    body.push_str(&st.metrics.render_retries());
    body.push_str(&render_fleet(&st.db.pool).await?);
    body.push_str(&render_batches());
    body.push_str(&render_writer_wait());
    Ok(body)
}

/// Counts of `query` (columns `k` [, `k2`], `n`) by key.
async fn counts(
    pool: &sqlx::AnyPool,
    query: &str,
    two: bool,
) -> Result<HashMap<(String, String), i64>, DbError> {
    let rows = sqlx::query(query).fetch_all(pool).await?;
    let mut by = HashMap::new();
    for r in &rows {
        let k2 = if two { col(r, "k2")? } else { String::new() };
        by.insert((col(r, "k")?, k2), col(r, "n")?);
    }
    Ok(by)
}

/// Hosts, instances, operations, billed seconds: four aggregate queries.
async fn render_fleet(pool: &sqlx::AnyPool) -> Result<String, DbError> {
    let hosts = counts(
        pool,
        "SELECT health AS k, COUNT(*) AS n FROM hosts GROUP BY health",
        false,
    )
    .await?;
    let instances = counts(
        pool,
        "SELECT observed_state AS k, COUNT(*) AS n FROM instances GROUP BY observed_state",
        false,
    )
    .await?;
    let ops = counts(
        pool,
        "SELECT kind AS k, state AS k2, COUNT(*) AS n FROM operations GROUP BY kind, state",
        true,
    )
    .await?;
    let billed_ms: i64 = col(
        &sqlx::query(
            "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) AS n FROM usage_records \
             WHERE kind = 'instance'",
        )
        .fetch_one(pool)
        .await?,
        "n",
    )?;
    let get = |m: &HashMap<(String, String), i64>, a: &str, b: &str| {
        m.get(&(a.to_string(), b.to_string())).copied().unwrap_or(0)
    };
    let mut out = String::from(
        "# HELP gantry_controller_hosts Hosts by health, as the host list shows them.\n\
         # TYPE gantry_controller_hosts gauge\n",
    );
    for h in HOST_HEALTH {
        let _ = writeln!(
            out,
            "gantry_controller_hosts{{health=\"{h}\"}} {}",
            get(&hosts, h, "")
        );
    }
    out.push_str(
        "# HELP gantry_controller_instances Instances by observed state (Released and Failed \
         ones included).\n# TYPE gantry_controller_instances gauge\n",
    );
    for s in InstanceState::ALL {
        let _ = writeln!(
            out,
            "gantry_controller_instances{{state=\"{}\"}} {}",
            s.name(),
            get(&instances, s.name(), "")
        );
    }
    out.push_str(
        "# HELP gantry_controller_operations Operations recorded, by kind and state (outcome \
         once final).\n# TYPE gantry_controller_operations gauge\n",
    );
    for k in OperationKind::ALL {
        for s in OperationState::ALL {
            let _ = writeln!(
                out,
                "gantry_controller_operations{{kind=\"{}\",state=\"{}\"}} {}",
                k.name(),
                s.name(),
                get(&ops, k.name(), s.name())
            );
        }
    }
    let _ = write!(
        out,
        "# HELP gantry_controller_billed_seconds_total Instance Running seconds charged to \
         accounts (the usage ledger).\n# TYPE gantry_controller_billed_seconds_total counter\n\
         gantry_controller_billed_seconds_total {}\n",
        billed_ms as f64 / 1000.0
    );
    Ok(out)
}

/// The method label: the standard methods by name, anything else `other`
/// (a client cannot mint label values).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A Prometheus label value, escaped (also for `crate::gpus`).
pub(crate) fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        let m = ControllerMetrics::default();
        m.observe(&Method::GET, "/v1/x/{id}", 200, 0.003);
        m.observe(&Method::GET, "/v1/x/{id}", 204, 0.2);
        m.observe(&Method::GET, "/v1/x/{id}", 204, 99.0);
        m.observe(
            &Method::from_bytes(b"BREW").unwrap(),
            "a\"b\\c\nd",
            404,
            0.0,
        );
        let t = m.render_http();
        let n = "gantry_controller_http_request_duration_seconds";
        let l = "method=\"GET\",route=\"/v1/x/{id}\",status_class=\"2xx\"";
        for line in [
            format!("{n}_bucket{{{l},le=\"0.0025\"}} 0"),
            format!("{n}_bucket{{{l},le=\"0.005\"}} 1"),
            format!("{n}_bucket{{{l},le=\"0.25\"}} 2"),
            format!("{n}_bucket{{{l},le=\"30\"}} 2"),
            format!("{n}_bucket{{{l},le=\"+Inf\"}} 3"),
            format!("{n}_count{{{l}}} 3"),
            format!("{n}_bucket{{method=\"other\",route=\"a\\\"b\\\\c\\nd\",status_class=\"4xx\",le=\"0.001\"}} 1"),
        ] {
            assert!(t.contains(&line), "{line} missing from\n{t}");
        }
    }

    #[test]
    fn batch_outcomes_are_bounded() {
        metrics_batch("stored");
        metrics_batch("Bad Outcome\"");
        for i in 0..40 {
            metrics_batch(&format!("o{i}"));
        }
        let t = render_batches();
        assert!(t.contains("outcome=\"stored\"}"), "{t}");
        assert!(t.contains("outcome=\"other\"}"), "{t}");
        assert!(!t.contains("Bad"), "{t}");
        assert!(t.lines().filter(|l| !l.starts_with('#')).count() <= MAX_OUTCOMES);
    }

    #[test]
    fn status_classes() {
        assert_eq!(
            [101, 200, 302, 404, 500, 999].map(status_class),
            ["1xx", "2xx", "3xx", "4xx", "5xx", "5xx"]
        );
    }
}
