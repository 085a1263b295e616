//! The controller's own `/metrics`, on SQLite and on PostgreSQL: the API
//! latency histogram is labelled by route template (never by an id), the
//! fleet gauges match what the API shows, only admins may read it, and the
//! whole text passes `promtool check metrics`. Also checks the Grafana
//! dashboard (`docs/grafana/gantry.json`): valid JSON whose queries use
//! only documented metric names.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use serde_json::{json, Value};
use std::collections::BTreeSet;

on_both!(histogram_labels_routes_not_ids);
on_both!(gauges_match_the_api);
on_both!(only_admins_read_metrics);

/// The controller's metric names (the doc's list; `docs/monitoring.md`).
const CONTROLLER_NAMES: &[&str] = &[
    "gantry_controller_http_request_duration_seconds",
    "gantry_controller_hosts",
    "gantry_controller_instances",
    "gantry_controller_operations",
    "gantry_controller_billed_seconds_total",
    "gantry_controller_metrics_batches_total",
    "gantry_controller_leader",
    "gantry_controller_leader_term",
    "gantry_host_gpus",
    "gantry_api_refused_total",
];

/// The agent's names the dashboard may use (the shared names contract:
/// `docs/monitoring.md`).
const AGENT_NAMES: &[&str] = &[
    "gantry_instance_info",
    "libvirt_up",
    "libvirt_domain_info_cpu_time_seconds_total",
    "libvirt_domain_info_virtual_cpus",
    "libvirt_domain_info_memory_usage_bytes",
    "libvirt_domain_info_maximum_memory_bytes",
    "libvirt_domain_info_state",
    "libvirt_domain_block_stats_read_bytes_total",
    "libvirt_domain_block_stats_write_bytes_total",
    "libvirt_domain_block_stats_read_requests_total",
    "libvirt_domain_block_stats_write_requests_total",
    "libvirt_domain_interface_stats_receive_bytes_total",
    "libvirt_domain_interface_stats_transmit_bytes_total",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    "gantry_host_cpu_utilization_ratio",
    "gantry_host_memory_used_bytes",
    "gantry_host_memory_total_bytes",
    "gantry_host_disk_used_bytes",
    "gantry_host_disk_total_bytes",
    "gantry_host_disk_read_bytes_total",
    "gantry_host_disk_written_bytes_total",
    "gantry_host_network_receive_bytes_total",
    "gantry_host_network_transmit_bytes_total",
    "gantry_agent_metrics_batches_total",
];

/// Label names that look like metric names in a query.
const LABEL_NAMES: &[&str] = &["gantry_instance"];

/// The value of the sample line `series` (name and labels exactly).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn metrics_text(s: &Server) -> String {
    let (status, ct, body) = s.text("/metrics", ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    body
}

/// A tenant with one instance on one host; returns (token, instance).
async fn one_instance(s: &Server) -> (String, String) {
    let (_, t) = s.account("acme").await;
    s.host("h1", "H100", 0).await;
    let f = s.flavor("small", None, 0).await;
    let img = s.image("ubuntu").await;
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "w", "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    (t, r.id())
}

async fn histogram_labels_routes_not_ids(s: Server) {
    let (t, id) = one_instance(&s).await;
    assert_eq!(s.get(&format!("/v1/instances/{id}"), &t).await.status, 200);
    let missing = "ins-00000000000000000000000000";
    let gone = s.get(&format!("/v1/instances/{missing}"), &t).await;
    assert_eq!(gone.status, 404, "{}", gone.body);
    assert_eq!(s.get("/v1/no/such/path-xyz", &t).await.status, 404);
    let text = metrics_text(&s).await;
    let name = "gantry_controller_http_request_duration_seconds";
    let ok = format!(
        "{name}_count{{method=\"GET\",route=\"/v1/instances/{{id}}\",status_class=\"2xx\"}}"
    );
    assert!(sample(&text, &ok).unwrap_or(0.0) >= 1.0, "{ok} in\n{text}");
    let not_found = format!(
        "{name}_count{{method=\"GET\",route=\"/v1/instances/{{id}}\",status_class=\"4xx\"}}"
    );
    assert!(sample(&text, &not_found).unwrap_or(0.0) >= 1.0, "{text}");
    let create = format!(
        "{name}_bucket{{method=\"POST\",route=\"/v1/instances\",status_class=\"2xx\",le=\"+Inf\"}}"
    );
    assert_eq!(sample(&text, &create), Some(1.0), "{text}");
    let unmatched =
        format!("{name}_count{{method=\"GET\",route=\"unmatched\",status_class=\"4xx\"}}");
    assert!(sample(&text, &unmatched).unwrap_or(0.0) >= 1.0, "{text}");
    for never in [id.as_str(), missing, "path-xyz"] {
        assert!(
            !text.contains(never),
            "{never} became a label value:\n{text}"
        );
    }
}

async fn gauges_match_the_api(s: Server) {
    let (t, id) = one_instance(&s).await;
    let img = s.image("debian").await;
    let f = s.flavor("tiny", None, 0).await;
    let other = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "w2", "flavor": f, "image": img}),
        )
        .await
        .id();
    s.observe(&id, "Running").await;
    s.observe(&other, "Running").await;
    let host = s.host_of(&id).await;
    let usage = json!({"usage": [{"instance": id, "seq": 1, "running_ms": 10_500}]});
    assert_eq!(s.heartbeat(&host, usage).await.status, 200);
    let rel = s
        .post(
            &format!("/v1/instances/{other}/actions"),
            &t,
            json!({"action": "release"}),
        )
        .await;
    assert_eq!(rel.status, 202, "{}", rel.body);
    s.observe(&other, "Released").await;
    let sick = s.host("h2", "H100", 0).await;
    let r = s
        .heartbeat(&sick, json!({"health": "unhealthy", "problems": ["disk"]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let text = metrics_text(&s).await;
    // Instances by state, against the admin's list.
    for state in ["Creating", "Running", "Released", "Stopped"] {
        let listed = s.get(&format!("/v1/instances?status={state}"), ADMIN).await;
        let n = listed.body.as_array().expect("a list").len() as f64;
        let line = format!("gantry_controller_instances{{state=\"{state}\"}}");
        assert_eq!(sample(&text, &line), Some(n), "{line} in\n{text}");
    }
    assert_eq!(
        sample(&text, "gantry_controller_instances{state=\"Running\"}"),
        Some(1.0)
    );
    // Hosts by health, against the admin's host list.
    let hosts = s.get("/v1/admin/hosts", ADMIN).await.body;
    for health in ["healthy", "unhealthy"] {
        let n = hosts
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["health"] == health)
            .count() as f64;
        let line = format!("gantry_controller_hosts{{health=\"{health}\"}}");
        assert_eq!(sample(&text, &line), Some(n), "{line} in\n{text}");
        assert_eq!(n, 1.0, "{hosts}");
    }
    // Billed seconds, against the usage list.
    let recs = s.get("/v1/usage", ADMIN).await.body;
    let ms: i64 = recs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "instance")
        .map(|r| r["quantity"].as_i64().unwrap())
        .sum();
    assert!(ms > 0, "{recs}");
    assert_eq!(
        sample(&text, "gantry_controller_billed_seconds_total"),
        Some(ms as f64 / 1000.0),
        "{recs}\n{text}"
    );
    // Operations: two creates and a release succeeded.
    for (kind, n) in [("create", 2.0), ("release", 1.0)] {
        let line = format!("gantry_controller_operations{{kind=\"{kind}\",state=\"succeeded\"}}");
        assert_eq!(sample(&text, &line), Some(n), "{line} in\n{text}");
    }
    // What /metrics carried before stays.
    for name in CONTROLLER_NAMES {
        let batches = *name == "gantry_controller_metrics_batches_total";
        assert!(
            text.contains(&format!("# TYPE {name} ")) || (batches && text.contains(name)),
            "{name} missing from\n{text}"
        );
    }
}

async fn only_admins_read_metrics(s: Server) {
    let (_, t) = s.account("acme").await;
    assert_eq!(s.text("/metrics", &t).await.0, 403);
    assert_eq!(s.text("/metrics", "not-a-token").await.0, 401);
    let r = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs promtool: ./scripts/test runs it"]
async fn output_passes_promtool() {
    let promtool = std::path::Path::new("/usr/bin/promtool");
    assert!(
        promtool.exists(),
        "/usr/bin/promtool is missing: install Debian's prometheus package \
         (apt-get install prometheus) or run ./scripts/test"
    );
    let s = Server::start(common::Backend::Sqlite)
        .await
        .expect("SQLite server");
    let (t, id) = one_instance(&s).await;
    s.observe(&id, "Running").await;
    s.get(&format!("/v1/instances/{id}"), &t).await;
    s.get("/v1/nowhere", &t).await;
    gantry_controller::metrics::metrics_batch("stored");
    let text = metrics_text(&s).await;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{text}"
    );
}

/// Every `expr` of the dashboard (panels and templating queries).
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    ("query", Value::String(e)) => out.push(e.clone()),
                    ("query", Value::Object(q)) => {
                        if let Some(Value::String(e)) = q.get("query") {
                            out.push(e.clone());
                        }
                    }
                    _ => exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

/// The metric-like names in a PromQL expression (identifiers starting
/// `gantry_`, `libvirt_` or `DCGM_`, histogram suffixes removed).
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = &expr[start..i];
            let var = start > 0 && bytes[start - 1] == b'$';
            let ours = ["gantry_", "libvirt_", "DCGM_"]
                .iter()
                .any(|p| word.starts_with(p));
            if ours && !var && !LABEL_NAMES.contains(&word) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .filter(|b| CONTROLLER_NAMES.contains(b))
                    .unwrap_or(word);
                out.insert(base.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn dashboard_uses_only_documented_names() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/gantry.json");
    let text = std::fs::read_to_string(&path).expect("docs/grafana/gantry.json");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"),
        "the datasource is the DS_PROMETHEUS input"
    );
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 10, "{all:?}");
    let mut used = BTreeSet::new();
    for e in &all {
        for n in names_in(e) {
            assert!(
                CONTROLLER_NAMES.contains(&n.as_str()) || AGENT_NAMES.contains(&n.as_str()),
                "the dashboard's query {e:?} uses {n}, which is not a documented name"
            );
            used.insert(n);
        }
    }
    for must in [
        "gantry_instance_info",
        "libvirt_domain_info_cpu_time_seconds_total",
        "DCGM_FI_DEV_GPU_UTIL",
        "gantry_host_cpu_utilization_ratio",
        "gantry_controller_http_request_duration_seconds",
        "gantry_controller_hosts",
        "gantry_controller_instances",
        "gantry_controller_metrics_batches_total",
    ] {
        assert!(used.contains(must), "the dashboard has no panel on {must}");
    }
}

#[test]
fn names_are_found_in_queries() {
    let n = names_in(
        "histogram_quantile(0.99, sum by (le, route) (rate(gantry_controller_http_request_duration_seconds_bucket{route!=\"$x\"}[5m]))) + DCGM_FI_DEV_GPU_UTIL{gantry_instance=~\"$gantry_instance\"}",
    );
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        [
            "DCGM_FI_DEV_GPU_UTIL",
            "gantry_controller_http_request_duration_seconds"
        ]
    );
}
