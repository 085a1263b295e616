//! The Monitor view from Prometheus (`metrics.prometheus_url`): one
//! `/api/v1/query_range` call per series, in PromQL over the agent's
//! names (the libvirt exporter's `libvirt_domain_*`, dcgm-exporter's
//! `DCGM_FI_DEV_*`, the agent's `gantry_host_*`), joined to an instance by
//! `gantry_instance_info{instance_id="…"}` on `domain`, and to a host by
//! the scrape target (`instance` label) being the host's address. Rates
//! are `rate()` and gauges `avg_over_time()` over a window of the step (at
//! least `metrics.prometheus_min_window_secs`), so points are means over
//! their step like the database's.

use super::query::Range;
use gantry_proto::metrics::{series, Point, Series};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long one Prometheus call may take.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("Prometheus at {url}: {message}")]
    Call { url: String, message: String },
}

/// Whose series a view shows.
pub enum Subject<'a> {
    /// An instance (its id, validated).
    Instance(&'a str),
    /// A host, by the address its agent is scraped at.
    Host(&'a str),
}

/// A PromQL string literal's contents: `\`, `"` and newlines escaped.
pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A regular expression matching `s` exactly (RE2 metacharacters escaped).
fn regex_quote(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if !c.is_ascii_alphanumeric() && c != '-' && c != '_' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One query: the series it answers and the PromQL.
pub struct Query {
    pub name: &'static str,
    pub promql: String,
}

fn q(name: &'static str, promql: String) -> Query {
    Query { name, promql }
}

/// The queries of an instance's view over windows of `w` (e.g. `60s`).
pub fn instance_queries(id: &str, w: &str) -> Vec<Query> {
    let join = format!(
        " * on(domain) group_left() gantry_instance_info{{instance_id=\"{}\"}}",
        escape(id)
    );
    let gpu = format!("{{gantry_instance=\"{}\"}}", escape(id));
    let rate_sum = |m: &str| format!("sum by (domain) (rate({m}[{w}])){join}");
    let gauge = |m: &str| format!("avg_over_time({m}[{w}]){join}");
    let gpu_avg = |m: &str| format!("avg_over_time({m}{gpu}[{w}])");
    vec![
        q(
            series::CPU_PCT,
            format!(
                "100 * rate(libvirt_domain_info_cpu_time_seconds_total[{w}]) / \
                 libvirt_domain_info_virtual_cpus{join}"
            ),
        ),
        q(
            series::MEM_USED_BYTES,
            gauge("libvirt_domain_info_memory_usage_bytes"),
        ),
        q(
            series::MEM_TOTAL_BYTES,
            gauge("libvirt_domain_info_maximum_memory_bytes"),
        ),
        q(
            series::DISK_READ_BPS,
            rate_sum("libvirt_domain_block_stats_read_bytes_total"),
        ),
        q(
            series::DISK_WRITE_BPS,
            rate_sum("libvirt_domain_block_stats_write_bytes_total"),
        ),
        q(
            series::DISK_READ_IOPS,
            rate_sum("libvirt_domain_block_stats_read_requests_total"),
        ),
        q(
            series::DISK_WRITE_IOPS,
            rate_sum("libvirt_domain_block_stats_write_requests_total"),
        ),
        q(
            series::NET_RX_BPS,
            format!("rate(libvirt_domain_interface_stats_receive_bytes_total[{w}]){join}"),
        ),
        q(
            series::NET_TX_BPS,
            format!("rate(libvirt_domain_interface_stats_transmit_bytes_total[{w}]){join}"),
        ),
        q(series::GPU_UTIL_PCT, gpu_avg("DCGM_FI_DEV_GPU_UTIL")),
        q(
            series::GPU_MEM_USED_BYTES,
            format!("1048576 * {}", gpu_avg("DCGM_FI_DEV_FB_USED")),
        ),
        q(series::GPU_TEMPERATURE_C, gpu_avg("DCGM_FI_DEV_GPU_TEMP")),
        q(series::GPU_POWER_W, gpu_avg("DCGM_FI_DEV_POWER_USAGE")),
    ]
}

/// The queries of a host's view: its agent's `gantry_host_*` and the GPUs
/// it sees itself (not in an instance), scraped at `address` (any port).
pub fn host_queries(address: &str, w: &str) -> Vec<Query> {
    let sel = format!("instance=~\"{}(:[0-9]+)?\"", escape(&regex_quote(address)));
    let gauge = |m: &str| format!("avg_over_time({m}{{{sel}}}[{w}])");
    let rate = |m: &str| format!("sum(rate({m}{{{sel}}}[{w}]))");
    let gpu = |m: &str| format!("avg_over_time({m}{{{sel},gantry_instance=\"\"}}[{w}])");
    vec![
        q(
            series::CPU_PCT,
            format!("100 * {}", gauge("gantry_host_cpu_utilization_ratio")),
        ),
        q(
            series::MEM_USED_BYTES,
            gauge("gantry_host_memory_used_bytes"),
        ),
        q(
            series::MEM_TOTAL_BYTES,
            gauge("gantry_host_memory_total_bytes"),
        ),
        q(
            series::DISK_USED_BYTES,
            gauge("gantry_host_disk_used_bytes"),
        ),
        q(
            series::DISK_READ_BPS,
            rate("gantry_host_disk_read_bytes_total"),
        ),
        q(
            series::DISK_WRITE_BPS,
            rate("gantry_host_disk_written_bytes_total"),
        ),
        q(
            series::NET_RX_BPS,
            rate("gantry_host_network_receive_bytes_total"),
        ),
        q(
            series::NET_TX_BPS,
            rate("gantry_host_network_transmit_bytes_total"),
        ),
        q(series::GPU_UTIL_PCT, gpu("DCGM_FI_DEV_GPU_UTIL")),
        q(
            series::GPU_MEM_USED_BYTES,
            format!("1048576 * {}", gpu("DCGM_FI_DEV_FB_USED")),
        ),
        q(series::GPU_TEMPERATURE_C, gpu("DCGM_FI_DEV_GPU_TEMP")),
        q(series::GPU_POWER_W, gpu("DCGM_FI_DEV_POWER_USAGE")),
    ]
}

/// The Monitor view's labels from a Prometheus series' labels.
fn labels(metric: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (from, to) in [("gpu", "gpu"), ("UUID", "uuid"), ("target_device", "nic")] {
        if let Some(v) = metric.get(from) {
            out.insert(to.to_string(), v.clone());
        }
    }
    out
}

#[derive(serde::Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(serde::Deserialize)]
struct Data {
    result: Vec<Matrix>,
}

#[derive(serde::Deserialize)]
struct Matrix {
    metric: BTreeMap<String, String>,
    values: Vec<(f64, String)>,
}

/// Runs every query of `subject` over `range` against `base` (at once),
/// answering the series that have points, sorted by name and labels.
pub async fn view(
    http: &reqwest::Client,
    base: &url::Url,
    subject: Subject<'_>,
    range: &Range,
    min_window_secs: u64,
) -> Result<Vec<Series>, PromError> {
    let w = format!("{}s", range.step_secs.max(min_window_secs));
    let queries = match subject {
        Subject::Instance(id) => instance_queries(id, &w),
        Subject::Host(addr) => host_queries(addr, &w),
    };
    let endpoint = base
        .join("api/v1/query_range")
        .map_err(|e| call_err(base, e))?;
    let mut set = tokio::task::JoinSet::new();
    for query in queries {
        let (http, endpoint, range) = (http.clone(), endpoint.clone(), *range);
        set.spawn(async move {
            (
                query.name,
                one(&http, &endpoint, &query.promql, &range).await,
            )
        });
    }
    let mut out = Vec::new();
    while let Some(done) = set.join_next().await {
        let (name, got) = done.map_err(|e| call_err(base, e))?;
        for m in got? {
            let points: Vec<Point> = m
                .values
                .iter()
                .filter_map(|(t, v)| {
                    let v: f64 = v.parse().ok().filter(|v: &f64| v.is_finite())?;
                    let t = chrono::DateTime::from_timestamp_millis((t * 1000.0).round() as i64)?;
                    Some(Point { t, v })
                })
                .collect();
            if !points.is_empty() {
                out.push(Series {
                    name: name.to_string(),
                    unit: series::unit(name).to_string(),
                    labels: labels(&m.metric),
                    points,
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
    Ok(out)
}

fn call_err(base: &url::Url, e: impl std::fmt::Display) -> PromError {
    PromError::Call {
        url: crate::db::redact(base.as_str()),
        message: e.to_string(),
    }
}

async fn one(
    http: &reqwest::Client,
    endpoint: &url::Url,
    promql: &str,
    r: &Range,
) -> Result<Vec<Matrix>, PromError> {
    let secs = |ms: i64| format!("{:.3}", ms as f64 / 1000.0);
    let step = r.step_secs.to_string();
    let resp = http
        .get(endpoint.clone())
        .query(&[
            ("query", promql),
            ("start", &secs(r.since_ms)),
            ("end", &secs(r.until_ms)),
            ("step", &step),
        ])
        .timeout(TIMEOUT)
        .send()
        .await
        .map_err(|e| call_err(endpoint, e.without_url()))?;
    let status = resp.status();
    let a: Answer = resp
        .json()
        .await
        .map_err(|e| call_err(endpoint, format!("{status}: {}", e.without_url())))?;
    if a.status != "success" {
        return Err(call_err(
            endpoint,
            format!("{status}: {}", a.error.unwrap_or_default()),
        ));
    }
    Ok(a.data.map(|d| d.result).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_addresses_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let qs = instance_queries("ins-\"x", "60s");
        assert!(
            qs[0].promql.contains("instance_id=\"ins-\\\"x\""),
            "{}",
            qs[0].promql
        );
        let qs = host_queries("h1.example", "60s");
        assert!(
            qs[1]
                .promql
                .contains("instance=~\"h1\\\\.example(:[0-9]+)?\""),
            "{}",
            qs[1].promql
        );
    }

    #[test]
    fn labels_map_to_the_views_names() {
        let m = BTreeMap::from([
            ("gpu".to_string(), "0".to_string()),
            ("UUID".to_string(), "GPU-1".to_string()),
            ("target_device".to_string(), "access".to_string()),
            ("domain".to_string(), "d".to_string()),
        ]);
        let l = labels(&m);
        assert_eq!(l.len(), 3);
        assert_eq!(
            (l["gpu"].as_str(), l["uuid"].as_str(), l["nic"].as_str()),
            ("0", "GPU-1", "access")
        );
    }
}
