//! What the simulator measures: latency samples per call kind, errors by
//! kind, counts; percentiles and the summary table.

use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Latencies, errors and counts, shared by every task.
#[derive(Default)]
pub struct Stats {
    lat: Mutex<BTreeMap<&'static str, Vec<Duration>>>,
    errors: Mutex<BTreeMap<String, u64>>,
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

/// p50 / p99 / max of one kind, in ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

impl Stats {
    pub fn sample(&self, kind: &'static str, d: Duration) {
        let mut m = self.lat.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(kind).or_default().push(d);
    }

    /// Counts one error; `kind` reads like `heartbeat: HTTP 500`.
    pub fn error(&self, kind: String) {
        let mut m = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(kind).or_default() += 1;
    }

    pub fn count(&self, what: &'static str) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(what).or_default() += 1;
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn error_total(&self) -> u64 {
        self.errors().values().sum()
    }

    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn summary(&self, kind: &'static str) -> Summary {
        self.summary_since(kind, 0)
    }

    /// The summary of the samples of `kind` after the first `from`.
    pub fn summary_since(&self, kind: &'static str, from: usize) -> Summary {
        let mut d: Vec<Duration> = self
            .lat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(kind)
            .map(|v| v.get(from..).unwrap_or_default().to_vec())
            .unwrap_or_default();
        d.sort();
        Summary {
            n: d.len(),
            p50: pct(&d, 0.50),
            p99: pct(&d, 0.99),
            max: pct(&d, 1.0),
        }
    }

    /// The summary of every sample of the kinds `pick` selects, together.
    pub fn summary_of(&self, pick: impl Fn(&str) -> bool) -> Summary {
        let mut d: Vec<Duration> = {
            let m = self.lat.lock().unwrap_or_else(|e| e.into_inner());
            m.iter()
                .filter(|(k, _)| pick(k))
                .flat_map(|(_, v)| v.iter().copied())
                .collect()
        };
        d.sort();
        Summary {
            n: d.len(),
            p50: pct(&d, 0.50),
            p99: pct(&d, 0.99),
            max: pct(&d, 1.0),
        }
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        let m = self.lat.lock().unwrap_or_else(|e| e.into_inner());
        m.keys().copied().collect()
    }

    /// The summary table, one line per call kind, then errors and counts.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<28} {:>8} {:>10} {:>10} {:>10}\n",
            "call", "n", "p50 ms", "p99 ms", "max ms"
        );
        for k in self.kinds() {
            let s = self.summary(k);
            out.push_str(&format!(
                "{:<28} {:>8} {:>10.2} {:>10.2} {:>10.2}\n",
                k, s.n, s.p50, s.p99, s.max
            ));
        }
        let errors = self.errors();
        if errors.is_empty() {
            out.push_str("errors: none\n");
        }
        for (k, n) in errors {
            out.push_str(&format!("error  {k}: {n}\n"));
        }
        for (k, n) in self.counts() {
            out.push_str(&format!("count  {k}: {n}\n"));
        }
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        let lat: serde_json::Map<String, serde_json::Value> = self
            .kinds()
            .into_iter()
            .map(|k| {
                let s = self.summary(k);
                (
                    k.to_string(),
                    json!({"n": s.n, "p50_ms": s.p50, "p99_ms": s.p99, "max_ms": s.max}),
                )
            })
            .collect();
        json!({
            "latency": lat,
            "errors": self.errors(),
            "counts": self.counts(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Stats::default();
        for ms in 1..=200u64 {
            s.sample("x", Duration::from_millis(ms));
        }
        let m = s.summary("x");
        assert_eq!((m.n, m.p50, m.p99, m.max), (200, 100.0, 198.0, 200.0));
        let later = s.summary_since("x", 150);
        assert_eq!((later.n, later.p50), (50, 175.0));
        assert_eq!(s.summary("none").n, 0);
    }
}
