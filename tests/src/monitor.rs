//! Monitoring checks the end-to-end suites share: the Monitor view of an
//! instance read through the controller, waiting for a series to move, and
//! a `/metrics` text checked with `promtool check metrics` (Debian's
//! `prometheus` package, set up by `scripts/setup-prometheus`).

use crate::controller::Api;
use anyhow::{bail, Context};
use gantry_proto::metrics::{MonitorView, Series};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `GET /v1/instances/{id}/monitor?<query>` as the given caller.
pub fn view(api: &Api, id: &str, query: &str) -> anyhow::Result<MonitorView> {
    let v = api.get(&format!("/v1/instances/{id}/monitor?{query}"))?;
    serde_json::from_value(v.clone()).with_context(|| format!("not a Monitor view: {v}"))
}

/// The series `name` whose labels include every pair of `labels`.
pub fn series<'a>(
    view: &'a MonitorView,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a Series> {
    view.series.iter().find(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

/// The last point's value of a series.
pub fn last(s: &Series) -> Option<f64> {
    s.points.last().map(|p| p.v)
}

/// Polls the Monitor view until `done` holds of it; returns it and how
/// long that took. The error shows the last view.
pub fn wait_view(
    api: &Api,
    id: &str,
    query: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&MonitorView) -> bool,
) -> anyhow::Result<(MonitorView, Duration)> {
    let start = Instant::now();
    loop {
        let v = view(api, id, query)?;
        if done(&v) {
            return Ok((v, start.elapsed()));
        }
        if start.elapsed() > timeout {
            let brief: Vec<String> = v
                .series
                .iter()
                .map(|s| {
                    format!(
                        "{}{:?}: {:?}",
                        s.name,
                        s.labels,
                        s.points
                            .iter()
                            .rev()
                            .take(4)
                            .map(|p| p.v)
                            .collect::<Vec<_>>()
                    )
                })
                .collect();
            bail!(
                "{what} did not happen within {timeout:?}; last view ({} to {}, step {} s, \
                 latest {:?}, source {:?}): {brief:#?}",
                v.since,
                v.until,
                v.step_secs,
                v.latest,
                v.source
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The `promtool` binary: `GANTRY_TEST_PROMTOOL`, else `/usr/bin/promtool`.
pub fn promtool() -> anyhow::Result<String> {
    let p = std::env::var("GANTRY_TEST_PROMTOOL").unwrap_or_else(|_| "/usr/bin/promtool".into());
    if !std::path::Path::new(&p).exists() {
        bail!("promtool ({p}) is missing: run scripts/setup-prometheus (./scripts/test does)");
    }
    Ok(p)
}

/// Runs `promtool check metrics` on an exposition: it must parse, and
/// lint clean but for the findings dcgm-exporter's own names bring
/// (camelCase labels, counters without `_total`), which Gantry keeps so
/// GPU dashboards work unchanged. Fails with promtool's output.
pub fn check_metrics(what: &str, text: &str) -> anyhow::Result<()> {
    let mut child = Command::new(promtool()?)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // 0: clean; 3: parsed, with lint findings; else (1) a parse error.
    if !matches!(out.status.code(), Some(0) | Some(3)) {
        bail!("promtool cannot parse the {what}'s /metrics: {said}");
    }
    for l in said.lines().filter(|l| !l.trim().is_empty()) {
        let dcgm = l.starts_with("DCGM_FI_DEV_")
            && (l.contains("label names should be written in 'snake_case'")
                || l.contains("counter metrics should have \"_total\" suffix"));
        if !dcgm {
            bail!("promtool finds fault with the {what}'s /metrics: {l}\n{said}");
        }
    }
    Ok(())
}

/// A real Prometheus server (Debian's package: `GANTRY_TEST_PROMETHEUS`,
/// else `/usr/bin/prometheus`) on a free loopback port, scraping one
/// target every second; killed on drop.
pub struct Prometheus {
    pub url: String,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts it scraping `target` (`host:port`) and waits until it is
    /// ready.
    pub fn start(target: &str) -> anyhow::Result<Self> {
        let bin = std::env::var("GANTRY_TEST_PROMETHEUS")
            .unwrap_or_else(|_| "/usr/bin/prometheus".into());
        if !std::path::Path::new(&bin).exists() {
            bail!(
                "Prometheus ({bin}) is missing: run scripts/setup-prometheus (./scripts/test does)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
                 - job_name: gantry-agent\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )?;
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log"))?)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let p = Prometheus {
            url: format!("http://127.0.0.1:{port}/"),
            child,
            dir,
        };
        let http = reqwest::blocking::Client::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if http
                .get(format!("{}-/ready", p.url))
                .send()
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(p);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("Prometheus did not get ready in 30 s: {}", p.log())
    }

    /// Its log (for failures).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
