//! How gantryctl writes: request bodies without nulls, and answers as
//! tables.

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use serde_json::Value;

pub fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.iter().any(Value::is_object) => {
            a.iter().map(cell).collect::<Vec<_>>().join("\n")
        }
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(_) => gpu(v).unwrap_or_else(|| v.to_string()),
        other => other.to_string(),
    }
}

/// A GPU (`GpuInfo`) on one line: address, model, health (and why), and
/// the instance holding it.
fn gpu(v: &Value) -> Option<String> {
    let pci = v.get("pci")?.as_str()?;
    let state = v.get("health")?.get("state")?.as_str()?;
    let mut s = format!("{pci} {} {state}", v["model"].as_str().unwrap_or("?"));
    if let Some(r) = v["health"]["reason"].as_str() {
        s.push_str(&format!(" ({r})"));
    }
    if let Some(i) = v["instance"].as_str() {
        s.push_str(&format!(" [{i}]"));
    }
    Some(s)
}

pub fn render(v: &Value, columns: &[&str]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    match v {
        Value::Array(rows) => {
            t.set_header(columns.iter().map(|c| c.to_uppercase()));
            for r in rows {
                t.add_row(columns.iter().map(|c| cell(&r[*c])));
            }
        }
        Value::Object(m) => {
            for (k, v) in m {
                t.add_row(vec![k.clone(), cell(v)]);
            }
        }
        other => return cell(other),
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_show_chosen_columns_and_nulls_are_dropped() {
        let rows = json!([{"id": "ins-1", "name": "web", "status": "Running", "host": null,
            "cost_micros": 5, "allowed_actions": ["stop", "reboot"]}]);
        let out = render(&rows, &["id", "name", "host", "allowed_actions"]);
        assert!(
            out.contains("ALLOWED_ACTIONS") && out.contains("stop,reboot") && out.contains(" - "),
            "{out}"
        );
        assert_eq!(strip_nulls(json!({"a": null, "b": 1})), json!({"b": 1}));
        let gpus = json!([
            {"pci": "0000:10:00.0", "model": "H100", "instance": null,
                "health": {"state": "quarantined", "reason": "XID 79"}},
            {"pci": "0000:11:00.0", "model": "H100", "instance": "ins-1",
                "health": {"state": "leased"}}
        ]);
        assert_eq!(
            cell(&gpus),
            "0000:10:00.0 H100 quarantined (XID 79)\n0000:11:00.0 H100 leased [ins-1]"
        );
    }
}
