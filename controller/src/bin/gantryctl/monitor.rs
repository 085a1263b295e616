//! `gantryctl instance get ID --view monitor [--since 1h]`: the Monitor
//! view as text, one line per series: its name and labels, the current
//! (last) value in human units, and a sparkline of the range.

use crate::client::{ApiPath, CliResult, Client, Fail};
use gantry_proto::ids::InstanceId;
use gantry_proto::metrics::{MonitorView, Series};

/// Widest sparkline, characters.
const WIDTH: usize = 40;
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The path of an instance's Monitor view over `since`.
pub fn path(id: InstanceId, since: Option<String>) -> ApiPath {
    v1!("instances", id, "monitor").query(&[("since", since)])
}

/// Fetches and prints the view.
pub async fn print_monitor(
    client: &Client,
    id: InstanceId,
    since: Option<String>,
) -> CliResult<()> {
    let v = client.get(&path(id, since)).await?;
    let view: MonitorView = serde_json::from_value(v).map_err(|e| {
        Fail::Local(format!(
            "the controller's Monitor view is not understood: {e}"
        ))
    })?;
    print!("{}", render(&view));
    Ok(())
}

/// The view as text.
pub fn render(v: &MonitorView) -> String {
    let mut out = format!(
        "{} from {} to {}, step {} s ({})\n",
        v.subject,
        v.since.format("%Y-%m-%d %H:%M:%S"),
        v.until.format("%H:%M:%S"),
        v.step_secs,
        serde_json::to_value(v.source)
            .ok()
            .and_then(|s| s.as_str().map(str::to_owned))
            .unwrap_or_default(),
    );
    if let Some(s) = v.state {
        out.push_str(&format!("state: {s:?}\n"));
    }
    if v.series.is_empty() {
        out.push_str("no samples in this range\n");
        return out;
    }
    let rows: Vec<(String, String, String)> = v
        .series
        .iter()
        .map(|s| {
            let last = s
                .points
                .last()
                .map_or_else(|| "-".into(), |p| human(p.v, &s.unit));
            (
                title(s),
                last,
                sparkline(&s.points.iter().map(|p| p.v).collect::<Vec<_>>()),
            )
        })
        .collect();
    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    for (name, last, line) in rows {
        out.push_str(&format!("{name:<w0$}  {last:>w1$}  {line}\n"));
    }
    out
}

/// `gpu_util_pct{gpu=0,uuid=GPU-…}`.
fn title(s: &Series) -> String {
    if s.labels.is_empty() {
        return s.name.clone();
    }
    let l: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{}{{{}}}", s.name, l.join(","))
}

/// A value in its unit, for people.
pub fn human(v: f64, unit: &str) -> String {
    let bytes = |v: f64| {
        let mut x = v;
        let mut i = 0;
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        while x.abs() >= 1024.0 && i + 1 < units.len() {
            x /= 1024.0;
            i += 1;
        }
        if i == 0 {
            format!("{x:.0} B")
        } else {
            format!("{x:.1} {}", units[i])
        }
    };
    match unit {
        "percent" => format!("{v:.1}%"),
        "bytes" => bytes(v),
        "bytes/s" => format!("{}/s", bytes(v)),
        "ops/s" => format!("{v:.1} ops/s"),
        "celsius" => format!("{v:.0} °C"),
        "watts" => format!("{v:.0} W"),
        other => format!("{v} {other}"),
    }
}

/// Bars from low to high over the values' own range (averaged down to
/// [`WIDTH`] characters).
pub fn sparkline(values: &[f64]) -> String {
    if values.is_empty() {
        return String::new();
    }
    let per = values.len().div_ceil(WIDTH);
    let cols: Vec<f64> = values
        .chunks(per)
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect();
    let lo = cols.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = cols.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    cols.iter()
        .map(|v| {
            if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
                return if hi == 0.0 { BARS[0] } else { BARS[3] };
            }
            let i = ((v - lo) / (hi - lo) * 7.0).round() as usize;
            BARS[i.min(7)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::metrics::{MonitorSource, Point};

    #[test]
    fn sparklines_and_units() {
        assert_eq!(sparkline(&[0.0, 50.0, 100.0]), "▁▅█");
        assert_eq!(sparkline(&[0.0, 0.0]), "▁▁");
        assert_eq!(sparkline(&[3.0, 3.0]), "▄▄");
        assert_eq!(sparkline(&vec![1.0; 100]).chars().count(), 34);
        assert_eq!(human(1536.0, "bytes"), "1.5 KiB");
        assert_eq!(human(3.0 * 1048576.0, "bytes/s"), "3.0 MiB/s");
        assert_eq!(human(42.25, "percent"), "42.2%");
        assert_eq!(human(300.0, "watts"), "300 W");
    }

    #[test]
    fn renders_one_line_per_series() {
        let t = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let v = MonitorView {
            subject: "ins-x".into(),
            since: t,
            until: t,
            step_secs: 10,
            source: MonitorSource::Database,
            latest: Some(t),
            series: vec![Series {
                name: "gpu_util_pct".into(),
                unit: "percent".into(),
                labels: [("gpu".to_string(), "0".to_string())].into(),
                points: vec![Point { t, v: 10.0 }, Point { t, v: 90.0 }],
            }],
            state: None,
            desired_state: None,
            state_since: None,
            pending_operation: None,
            host_health: None,
            host_last_heartbeat: None,
        };
        let text = render(&v);
        assert!(text.contains("gpu_util_pct{gpu=0}  90.0%  ▁█"), "{text}");
        assert!(text.contains("(database)"), "{text}");
    }
}
