//! Prometheus metrics of the agent, served on `/metrics` (no token, like
//! every Prometheus exporter; it holds counts, never names or secrets).
//!
//! - `gantry_agent_instances{state}`: instances by state, read at scrape.
//! - `gantry_agent_operations_total{kind,outcome}`: finished operations.
//! - `gantry_agent_operation_seconds{kind}`: how long operations took.

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
        Self {
            registry,
            ops,
            op_seconds,
            instances,
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

    /// Renders the text exposition, with instance counts given by the caller.
    pub fn render(&self, instances_by_state: &[(&'static str, i64)]) -> String {
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
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_operations_and_instances() {
        let m = Metrics::default();
        m.operation_done("stop", true, Duration::from_millis(1500));
        m.operation_done("stop", false, Duration::from_millis(20));
        let text = m.render(&[("Running", 2), ("Stopped", 1)]);
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
    }
}
