//! Prometheus metrics of the agent, served on `/metrics` (no token, like
//! every Prometheus exporter; it holds counts, never names or secrets).
//!
//! - `gantry_agent_instances{state}`: instances by state, read at scrape.
//! - `gantry_agent_operations_total{kind,outcome}`: finished operations.
//! - `gantry_agent_operation_seconds{kind}`: how long operations took.
//! - `gantry_agent_controller_up`: 1 while the last call to the controller
//!   succeeded, else 0.
//! - `gantry_agent_heartbeat_failures_total`: heartbeats that failed.
//! - `gantry_agent_controller_ops_total{kind,outcome}`: controller
//!   operations carried out, by outcome.
//! - `gantry_agent_store_compacted_bytes_total`: bytes the snapshot store's
//!   background compaction saved.
//! - `gantry_agent_snapshot_pause_seconds`: how long guests were paused
//!   while their root disk switched to a fresh overlay.
//! - `gantry_agent_store_gc_reclaimed_bytes_total`: bytes the scheduled
//!   garbage collection of the snapshot store freed.
//! - `gantry_agent_access_forwards{kind}`: forwards in force (`tcp`, `udp`
//!   in the kernel; `https` in the proxy).
//! - `gantry_agent_access_rule_applies_total`, `..._drift_repairs_total`:
//!   replacements of the access rules, and those that repaired drift.
//! - `gantry_agent_https_connections_total`, `_requests_total`,
//!   `_upstream_errors_total`, `_websocket_upgrades_total`, and the gauge
//!   `gantry_agent_https_open_connections`: the HTTPS front.
//! - `gantry_gpu_*`: each GPU's identity, health, samples, XIDs and the
//!   health gate, appended by [`crate::gpu::GpuPool::render_metrics`]
//!   (docs/gpus.md).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

fn op_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ])
}

pub struct Metrics {
    registry: Registry,
    ops: Family<OpLabels, Counter>,
    op_seconds: Family<KindLabel, Histogram, fn() -> Histogram>,
    instances: Family<StateLabel, Gauge>,
    controller_up: Gauge,
    heartbeat_failures: Counter,
    controller_ops: Family<OpLabels, Counter>,
    compacted: Counter,
    snapshot_pause: Histogram,
    gc_reclaimed: Counter,
    net: NetMetrics,
}

/// The data plane's metrics, mirrored from [`crate::net::NetStats`] at
/// each scrape (counters move by the difference since the last one).
#[derive(Default)]
struct NetMetrics {
    forwards: Family<KindLabel, Gauge>,
    applies: Counter,
    repairs: Counter,
    https: [Counter; 4],
    https_open: Gauge,
    last: std::sync::Mutex<[u64; 6]>,
}

impl NetMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "access_forwards",
            "Forwards in force",
            self.forwards.clone(),
        );
        r.register(
            "access_rule_applies",
            "Replacements of the access rules",
            self.applies.clone(),
        );
        r.register(
            "access_drift_repairs",
            "Rule replacements that repaired drift",
            self.repairs.clone(),
        );
        let names = [
            ("https_connections", "HTTPS connections accepted"),
            ("https_requests", "HTTPS requests"),
            (
                "https_upstream_errors",
                "HTTPS requests the guest did not answer",
            ),
            (
                "https_websocket_upgrades",
                "WebSockets opened through the proxy",
            ),
        ];
        for ((name, help), c) in names.into_iter().zip(&self.https) {
            r.register(name, help, c.clone());
        }
        r.register(
            "https_open_connections",
            "HTTPS connections open",
            self.https_open.clone(),
        );
    }

    fn update(&self, s: &crate::net::NetStats) {
        for (kind, n) in [("tcp", s.tcp), ("udp", s.udp), ("https", s.https)] {
            self.forwards
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(n as i64);
        }
        let now = [
            s.applies,
            s.repairs,
            s.proxy.connections_total,
            s.proxy.requests_total,
            s.proxy.upstream_errors_total,
            s.proxy.websocket_upgrades_total,
        ];
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let counters = [
            &self.applies,
            &self.repairs,
            &self.https[0],
            &self.https[1],
            &self.https[2],
            &self.https[3],
        ];
        for ((c, n), l) in counters.into_iter().zip(now).zip(last.iter_mut()) {
            c.inc_by(n.saturating_sub(*l));
            *l = (*l).max(n);
        }
        self.https_open.set(s.proxy.active_connections as i64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gantry_agent");
        let ops = Family::<OpLabels, Counter>::default();
        let op_seconds = Family::<KindLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            op_histogram as fn() -> Histogram,
        );
        let instances = Family::<StateLabel, Gauge>::default();
        registry.register("operations", "Finished operations", ops.clone());
        registry.register(
            "operation_seconds",
            "Duration of operations",
            op_seconds.clone(),
        );
        registry.register("instances", "Instances by state", instances.clone());
        let controller_up = Gauge::default();
        let heartbeat_failures = Counter::default();
        let controller_ops = Family::<OpLabels, Counter>::default();
        registry.register(
            "controller_up",
            "Whether the controller answered the last call",
            controller_up.clone(),
        );
        registry.register(
            "heartbeat_failures",
            "Heartbeats that failed",
            heartbeat_failures.clone(),
        );
        registry.register(
            "controller_ops",
            "Controller operations carried out",
            controller_ops.clone(),
        );
        let compacted = Counter::default();
        registry.register(
            "store_compacted_bytes",
            "Bytes the snapshot store compaction saved",
            compacted.clone(),
        );
        let net = NetMetrics::default();
        net.register(&mut registry);
        let snapshot_pause = Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
        registry.register(
            "snapshot_pause_seconds",
            "How long guests were paused for a snapshot's disk switch",
            snapshot_pause.clone(),
        );
        let gc_reclaimed = Counter::default();
        registry.register(
            "store_gc_reclaimed_bytes",
            "Bytes the scheduled store garbage collection freed",
            gc_reclaimed.clone(),
        );
        Self {
            net,
            snapshot_pause,
            gc_reclaimed,
            compacted,
            registry,
            ops,
            op_seconds,
            instances,
            controller_up,
            heartbeat_failures,
            controller_ops,
        }
    }
}

impl Metrics {
    pub fn operation_done(&self, kind: &str, ok: bool, took: Duration) {
        let outcome = if ok { "succeeded" } else { "failed" };
        self.ops
            .get_or_create(&OpLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.op_seconds
            .get_or_create(&KindLabel { kind: kind.into() })
            .observe(took.as_secs_f64());
    }

    pub fn controller_link(&self, up: bool) {
        self.controller_up.set(i64::from(up));
    }

    pub fn heartbeat_failed(&self) {
        self.heartbeat_failures.inc();
    }

    pub fn snapshot_pause(&self, took: Duration) {
        self.snapshot_pause.observe(took.as_secs_f64());
    }

    pub fn store_gc_reclaimed(&self, bytes: u64) {
        self.gc_reclaimed.inc_by(bytes);
    }

    pub fn store_compacted(&self, saved: u64) {
        self.compacted.inc_by(saved);
    }

    pub fn controller_op_done(&self, kind: &str, ok: bool) {
        let outcome = if ok { "succeeded" } else { "failed" };
        self.controller_ops
            .get_or_create(&OpLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Renders the text exposition, with instance counts and the data
    /// plane's numbers given by the caller.
    pub fn render(
        &self,
        instances_by_state: &[(&'static str, i64)],
        net: &crate::net::NetStats,
    ) -> String {
        self.net.update(net);
        self.instances.clear();
        for (state, n) in instances_by_state {
            self.instances
                .get_or_create(&StateLabel {
                    state: (*state).into(),
                })
                .set(*n);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        to_text_format(&out)
    }
}

/// prometheus-client writes OpenMetrics: a counter's `# HELP`/`# TYPE`
/// name lacks the `_total` its samples carry. `/metrics` is served as the
/// text format 0.0.4, where they must be the same name (else parsers see
/// an untyped `x_total` without help), so those two lines get `_total`.
fn to_text_format(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .filter(|n| !n.ends_with("_total"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64 * counters.len());
    for line in open_metrics.lines() {
        let fixed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(fixed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_operations_and_instances() {
        let m = Metrics::default();
        m.operation_done("stop", true, Duration::from_millis(1500));
        m.operation_done("stop", false, Duration::from_millis(20));
        let net = crate::net::NetStats {
            tcp: 3,
            applies: 2,
            ..Default::default()
        };
        let text = m.render(&[("Running", 2), ("Stopped", 1)], &net);
        assert!(
            text.contains("gantry_agent_access_forwards{kind=\"tcp\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("gantry_agent_access_rule_applies_total 2"),
            "{text}"
        );
        let again = m.render(&[("Running", 2)], &net);
        assert!(
            again.contains("gantry_agent_access_rule_applies_total 2"),
            "counted once: {again}"
        );
        assert!(
            text.contains("gantry_agent_operations_total{kind=\"stop\",outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gantry_agent_operations_total{kind=\"stop\",outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gantry_agent_instances{state=\"Running\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("gantry_agent_operation_seconds_count{kind=\"stop\"} 2"),
            "{text}"
        );
        assert!(text.contains("gantry_agent_controller_up 0"), "{text}");
        assert!(
            text.contains("# TYPE gantry_agent_operations_total counter\n"),
            "a counter's TYPE names its samples (text format 0.0.4): {text}"
        );
        assert!(
            text.contains("# HELP gantry_agent_operations_total Finished operations"),
            "{text}"
        );
        assert!(
            !text.contains("# TYPE gantry_agent_operations counter"),
            "{text}"
        );
        m.controller_link(true);
        m.heartbeat_failed();
        m.controller_op_done("start", true);
        let text = m.render(&[], &Default::default());
        assert!(text.contains("gantry_agent_controller_up 1"), "{text}");
        assert!(
            text.contains("gantry_agent_heartbeat_failures_total 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "gantry_agent_controller_ops_total{kind=\"start\",outcome=\"succeeded\"} 1"
            ),
            "{text}"
        );
    }
}
