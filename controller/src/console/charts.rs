//! The Monitor tab's charts: one inline SVG line chart per series of the
//! API's Monitor view, drawn here (no script, no chart library).

use super::layout::{bytes, esc};
use serde_json::Value;

const W: f64 = 600.0;
const H: f64 = 160.0;

/// A series' title: its name and labels (`gpu_util_pct gpu=0`).
fn title(series: &Value) -> String {
    let mut t = series["name"].as_str().unwrap_or("series").to_string();
    if let Some(l) = series["labels"].as_object() {
        for (k, v) in l {
            if k != "uuid" {
                t.push_str(&format!(" {k}={}", v.as_str().unwrap_or_default()));
            }
        }
    }
    t
}

/// A value in the series' unit, for the axis labels.
fn fmt(v: f64, unit: &str) -> String {
    match unit {
        "bytes" => bytes(v.max(0.0) as u64),
        "bytes/s" | "bytes_per_second" => format!("{}/s", bytes(v.max(0.0) as u64)),
        "percent" | "%" => format!("{v:.1} %"),
        u => format!("{v:.2} {u}"),
    }
}

/// One chart: a polyline of the points (x by time, y from 0 to the max).
pub fn chart(series: &Value) -> String {
    let unit = series["unit"].as_str().unwrap_or_default();
    let pts: Vec<(i64, f64)> = series["points"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let t = chrono::DateTime::parse_from_rfc3339(p["t"].as_str()?).ok()?;
            Some((t.timestamp_millis(), p["v"].as_f64()?))
        })
        .collect();
    let name = esc(&title(series));
    if pts.is_empty() {
        return format!(
            "<figure class=\"chart\"><figcaption>{name}</figcaption><p class=\"muted\">no data in this range</p></figure>"
        );
    }
    let (t0, t1) = (pts[0].0, pts[pts.len() - 1].0.max(pts[0].0 + 1));
    let max = pts.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max } else { 1.0 };
    let coords: Vec<String> = pts
        .iter()
        .map(|(t, v)| {
            let x = (t - t0) as f64 / (t1 - t0) as f64 * W;
            let y = H - (v / top).clamp(0.0, 1.0) * H;
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let last = pts[pts.len() - 1].1;
    format!(
        "<figure class=\"chart\" data-points=\"{n}\"><figcaption>{name} <span class=\"muted\">now {now}, \
         max {mx}</span></figcaption><svg viewBox=\"-2 -2 {w} {h}\" role=\"img\" \
         aria-label=\"{name}: {n} points\" preserveAspectRatio=\"none\">\
         <line x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\" class=\"axis\"/>\
         <polyline points=\"{c}\"/></svg></figure>",
        n = pts.len(),
        now = esc(&fmt(last, unit)),
        mx = esc(&fmt(max, unit)),
        w = W + 4.0,
        h = H + 4.0,
        c = coords.join(" "),
    )
}

/// Every series of a Monitor view, as charts.
pub fn charts(view: &Value) -> String {
    let series = view["series"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if series.is_empty() {
        return "<p class=\"muted\" id=\"no-series\">No samples in this range yet.</p>".into();
    }
    format!(
        "<div class=\"charts\">{}</div>",
        series.iter().map(chart).collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_polyline_per_series() {
        let v = serde_json::json!({"name": "cpu_pct", "unit": "percent", "labels": {"x": "<y>"},
            "points": [{"t": "2026-12-01T00:00:00Z", "v": 10.0}, {"t": "2026-12-01T00:01:00Z", "v": 20.0}]});
        let svg = chart(&v);
        assert!(
            svg.contains("<polyline points=\"0.0,80.0 600.0,0.0\"/>"),
            "{svg}"
        );
        assert!(svg.contains("x=&lt;y&gt;"));
        assert!(svg.contains("data-points=\"2\""));
    }
}
