//! My Instances: the list with state tabs, its live rows (an HTML fragment
//! the script polls), one action on a row, batch actions on checked rows,
//! and the Create instance form. The actions offered are the API's
//! `allowed_actions` (the state machine's), never worked out here.

use super::layout::{self, esc, Nav, Tab};
use super::session::Session;
use super::{id_segment, query_string, ConsoleError, ConsoleResult, BASE};
use crate::AppState;
use axum::extract::{Path, Query};
use axum::http::Method;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use gantry_proto::api::v1::InstanceSummary;
use gantry_proto::Action;
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{BASE}/instances"), get(list))
        .route(&format!("{BASE}/instances/rows"), get(rows))
        .route(&format!("{BASE}/instances/batch"), post(batch))
        .route(&format!("{BASE}/instances/new"), get(new_form).post(create))
        .route(&format!("{BASE}/instances/{{id}}/action"), post(act))
}

/// The state tabs: label and the API's `status` filter (`None`: all).
const TABS: [(&str, Option<&str>); 7] = [
    ("All", None),
    ("Running", Some("Running")),
    ("Snapshotting", Some("Snapshotting")),
    ("Stopped", Some("Stopped")),
    ("Suspended", Some("Suspended")),
    ("Released", Some("Released")),
    ("Failed", Some("Failed")),
];

/// Actions that take no parameters, as people read them.
pub fn action_label(a: Action) -> &'static str {
    match a {
        Action::Start => "Start",
        Action::Stop => "Stop",
        Action::Reboot => "Reboot",
        Action::ForceReboot => "Force reboot",
        Action::Suspend => "Suspend",
        Action::Resume => "Resume",
        Action::ChangeType => "Change type",
        Action::GrowDisk => "Grow disk",
        Action::Snapshot => "Take Snapshot",
        Action::Release => "Release",
    }
}

/// The parameterless actions that go through `POST .../actions` (the
/// others have forms or dialogs of their own).
fn plain(a: Action) -> bool {
    !matches!(
        a,
        Action::ChangeType | Action::GrowDisk | Action::Snapshot | Action::Release
    )
}

fn status_filter(q: &HashMap<String, String>) -> ConsoleResult<Option<&'static str>> {
    match q.get("status").map(String::as_str) {
        None | Some("") | Some("All") => Ok(None),
        Some(want) => TABS
            .iter()
            .find_map(|(_, s)| s.filter(|s| *s == want))
            .map(Some)
            .ok_or_else(|| ConsoleError::field("status", format!("unknown tab {want:?}"))),
    }
}

async fn summaries(s: &Session, status: Option<&str>) -> ConsoleResult<Vec<InstanceSummary>> {
    let path = match status {
        Some(st) => format!("/v1/instances?{}", query_string(&[("status", st)])),
        None => "/v1/instances".to_string(),
    };
    let v = s.api.get(&path).await?;
    serde_json::from_value(v).map_err(|e| ConsoleError::Api {
        status: axum::http::StatusCode::BAD_GATEWAY,
        message: format!("unexpected instance list: {e}"),
    })
}

/// One row's action buttons (each its own small form).
fn row_actions(s: &Session, i: &InstanceSummary, back: &str) -> String {
    let mut out = String::new();
    let id = esc(&i.id.to_string());
    for a in &i.allowed_actions {
        let label = action_label(*a);
        if plain(*a) {
            out.push_str(&format!(
                "<form method=\"post\" action=\"{BASE}/instances/{id}/action\" class=\"inline\">{}\
                 <input type=\"hidden\" name=\"action\" value=\"{}\">\
                 <input type=\"hidden\" name=\"back\" value=\"{}\">\
                 <button type=\"submit\" data-action=\"{}\">{label}</button></form>",
                s.csrf_field(),
                a.name(),
                esc(back),
                a.name()
            ));
        } else if matches!(a, Action::Snapshot | Action::Release) {
            out.push_str(&format!(
                "<a class=\"button\" data-action=\"{}\" href=\"{BASE}/instances/{id}?dialog={}\">{label}</a>",
                a.name(),
                a.name()
            ));
        }
    }
    out
}

/// The table body: one row per instance.
fn tbody(s: &Session, list: &[InstanceSummary], back: &str) -> String {
    if list.is_empty() {
        return "<tr><td colspan=\"6\" class=\"muted\">No instances here.</td></tr>".into();
    }
    list.iter()
        .map(|i| {
            let id = esc(&i.id.to_string());
            format!(
                "<tr data-id=\"{id}\"><td><input type=\"checkbox\" name=\"id\" value=\"{id}\" \
                 form=\"batch\" aria-label=\"select {name}\"></td>\
                 <td><a href=\"{BASE}/instances/{id}\"><code>{id}</code></a></td><td>{name}</td>\
                 <td class=\"status\" data-status=\"{st}\"><span class=\"badge {st}\">{st}{pct}</span></td>\
                 <td class=\"cost\">{cost}</td><td class=\"actions\">{acts}</td></tr>",
                name = esc(&i.name),
                st = esc(&i.status),
                pct = i
                    .progress_percent
                    .map(|p| format!(" <span class=\"percent\">{p}%</span>"))
                    .unwrap_or_default(),
                cost = layout::money(i.cost_micros),
                acts = row_actions(s, i, back),
            )
        })
        .collect()
}

/// `GET /console/instances?status=`: My Instances.
async fn list(s: Session, Query(q): Query<HashMap<String, String>>) -> ConsoleResult<Response> {
    let status = status_filter(&q)?;
    let items = summaries(&s, status).await?;
    let tabs: Vec<Tab> = TABS
        .iter()
        .map(|(label, f)| Tab {
            label,
            href: match f {
                Some(f) => format!("{BASE}/instances?status={f}"),
                None => format!("{BASE}/instances"),
            },
            current: *f == status,
            enabled: true,
        })
        .collect();
    let back = match status {
        Some(f) => format!("{BASE}/instances?status={f}"),
        None => format!("{BASE}/instances"),
    };
    let rows_url = match status {
        Some(f) => format!("{BASE}/instances/rows?status={f}"),
        None => format!("{BASE}/instances/rows"),
    };
    let batch_opts: String = [
        Action::Start,
        Action::Stop,
        Action::Reboot,
        Action::ForceReboot,
        Action::Suspend,
        Action::Resume,
        Action::Release,
    ]
    .iter()
    .map(|a| {
        format!(
            "<option value=\"{}\">{}</option>",
            a.name(),
            action_label(*a)
        )
    })
    .collect();
    let body = format!(
        "<p><a class=\"button primary\" href=\"{BASE}/instances/new\" id=\"create-instance\">Create instance</a></p>\
         {tabs}\
         <form method=\"post\" action=\"{BASE}/instances/batch\" id=\"batch\" class=\"batch\">{csrf}\
         <label for=\"batch-action\">With the checked rows:</label>\
         <select id=\"batch-action\" name=\"action\">{batch_opts}</select>\
         <button type=\"submit\" id=\"batch-go\">Apply</button></form>\
         <div class=\"scroll\"><table class=\"list\" id=\"instances\"><thead><tr><th scope=\"col\">\
         <span class=\"sr\">Select</span></th><th scope=\"col\">ID</th><th scope=\"col\">Name</th>\
         <th scope=\"col\">Status</th><th scope=\"col\">Cost</th><th scope=\"col\">Actions</th></tr></thead>\
         <tbody data-refresh=\"{rows}\">{tb}</tbody></table></div>",
        tabs = layout::tabs("Instance states", &tabs),
        csrf = s.csrf_field(),
        rows = esc(&rows_url),
        tb = tbody(&s, &items, &back),
    );
    let msg = q.get("msg").map(String::as_str);
    Ok(layout::page(&s, "My Instances", Nav::Instances, msg, &body).into_response())
}

/// `GET /console/instances/rows?status=`: the table body alone (polled).
async fn rows(s: Session, Query(q): Query<HashMap<String, String>>) -> ConsoleResult<Html<String>> {
    let status = status_filter(&q)?;
    let items = summaries(&s, status).await?;
    let back = match status {
        Some(f) => format!("{BASE}/instances?status={f}"),
        None => format!("{BASE}/instances"),
    };
    Ok(Html(tbody(&s, &items, &back)))
}

/// A parameterless action by its API name.
fn parse_action(name: &str) -> ConsoleResult<Action> {
    Action::ALL
        .into_iter()
        .find(|a| a.name() == name && (plain(*a) || *a == Action::Release))
        .ok_or_else(|| ConsoleError::field("action", format!("unknown action {name:?}")))
}

/// Where to go back to: a console path only (never another site).
pub fn back_to(back: Option<&String>, fallback: String) -> String {
    match back {
        Some(b) if b.starts_with(&format!("{BASE}/")) && !b.contains("//") && !b.contains('\\') => {
            b.clone()
        }
        _ => fallback,
    }
}

/// Adds `msg` to a console path's query.
pub fn with_msg(path: &str, msg: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}{}", query_string(&[("msg", msg)]))
}

/// `POST /console/instances/{id}/action`: one action, then back.
async fn act(
    s: Session,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    let id = id_segment(&id)?;
    let a = parse_action(f.get("action").map(String::as_str).unwrap_or_default())?;
    let back = back_to(f.get("back"), format!("{BASE}/instances/{id}"));
    let (status, v) = s
        .api
        .call(
            Method::POST,
            &format!("/v1/instances/{id}/actions"),
            Some(&json!({"action": a.name()})),
        )
        .await?;
    let msg = if status.is_success() {
        format!("{} requested for {id}", action_label(a))
    } else if status.as_u16() == 404 || status.as_u16() == 401 {
        return Err(ConsoleError::Api {
            status,
            message: v["error"].as_str().unwrap_or("not found").to_string(),
        });
    } else {
        format!(
            "{} refused: {}",
            action_label(a),
            v["error"].as_str().unwrap_or("refused")
        )
    };
    Ok(Redirect::to(&with_msg(&back, &msg)).into_response())
}

/// `POST /console/instances/batch`: one action on the checked rows, each
/// row's outcome shown.
async fn batch(s: Session, Form(f): Form<Vec<(String, String)>>) -> ConsoleResult<Response> {
    let map: HashMap<String, String> = f.iter().cloned().collect();
    s.check_csrf(&map)?;
    let a = parse_action(map.get("action").map(String::as_str).unwrap_or_default())?;
    let ids: Vec<&str> = f
        .iter()
        .filter(|(k, _)| k == "id")
        .map(|(_, v)| v.as_str())
        .collect();
    if ids.is_empty() {
        let back = with_msg(
            &format!("{BASE}/instances"),
            "Check at least one row first.",
        );
        return Ok(Redirect::to(&back).into_response());
    }
    let body = json!({"instances": ids, "request": {"action": a.name()}});
    let results = s
        .api
        .send(Method::POST, "/v1/instances/batch", Some(&body))
        .await?;
    let rows: String = results
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(batch_row)
        .collect();
    let html = format!(
        "<p>{} on {} instance(s):</p><div class=\"scroll\"><table class=\"list\" id=\"batch-results\">\
         <thead><tr><th scope=\"col\">Instance</th><th scope=\"col\">Result</th><th scope=\"col\">Detail</th>\
         </tr></thead><tbody>{rows}</tbody></table></div>\
         <p><a href=\"{BASE}/instances\">Back to My Instances</a></p>",
        action_label(a),
        ids.len()
    );
    Ok(layout::page(&s, "Batch results", Nav::Instances, None, &html).into_response())
}

fn batch_row(r: &Value) -> String {
    let ok = r["status"]
        .as_u64()
        .is_some_and(|c| (200..300).contains(&c));
    let detail = match (r["operation"].as_str(), r["error"].as_str()) {
        (Some(op), _) => format!("operation <code>{}</code>", esc(op)),
        (_, Some(e)) => esc(e),
        _ => String::new(),
    };
    format!(
        "<tr class=\"{cls}\"><td><code>{}</code></td><td>{}</td><td>{detail}</td></tr>",
        layout::s(r, "instance"),
        if ok {
            "Accepted".to_string()
        } else {
            format!("Refused ({})", r["status"])
        },
        cls = if ok { "ok" } else { "failed" },
    )
}

fn options(list: &Value, label: impl Fn(&Value) -> String, prefix: &str) -> String {
    list.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|v| {
            format!(
                "<option value=\"{prefix}{}\">{}</option>",
                layout::s(v, "id"),
                label(v)
            )
        })
        .collect()
}

/// `GET /console/instances/new`: the Create instance form.
async fn new_form(s: Session, Query(q): Query<HashMap<String, String>>) -> ConsoleResult<Response> {
    let flavors = s.api.get("/v1/flavors").await?;
    let images = s.api.get("/v1/images").await?;
    let snaps = s.api.get("/v1/snapshots?status=Success").await?;
    let groups = s.api.get("/v1/network-groups").await?;
    let volumes = s.api.get("/v1/volumes").await?;
    let pre = q.get("source").cloned().unwrap_or_default();
    let mut sources = options(
        &images,
        |v| format!("Image: {}", layout::s(v, "name")),
        "image:",
    );
    sources += &options(
        &snaps,
        |v| format!("Snapshot: {}", layout::s(v, "name")),
        "snapshot:",
    );
    let pre_attr = format!("value=\"{}\"", esc(&pre));
    let sources = sources.replace(&pre_attr, &format!("{pre_attr} selected"));
    let flavor_opts = options(
        &flavors,
        |v| {
            format!(
                "{} ({} vCPU, {} MiB, {} GPU, {}/h)",
                layout::s(v, "name"),
                v["vcpus"],
                v["memory_mib"],
                v["gpu_count"],
                layout::money(v["price_micros_per_hour"].as_i64().unwrap_or(0))
            )
        },
        "",
    );
    let group_opts = options(&groups, |v| layout::s(v, "name"), "");
    let vol_opts = options(&volumes, |v| layout::s(v, "name"), "");
    let account = if s.admin {
        "<label for=\"account\">Account (id)</label><input id=\"account\" name=\"account\" required>"
    } else {
        ""
    };
    let body = format!(
        "<form method=\"post\" action=\"{BASE}/instances/new\" class=\"card\" id=\"create-form\">{csrf}\
         <label for=\"name\">Name</label><input id=\"name\" name=\"name\" required maxlength=\"63\">\
         <label for=\"source\">Image or snapshot</label><select id=\"source\" name=\"source\" required>{sources}</select>\
         <label for=\"flavor\">Flavor</label><select id=\"flavor\" name=\"flavor\" required>{flavor_opts}</select>\
         <label for=\"region\">Region (optional)</label><input id=\"region\" name=\"region\">\
         <label for=\"network_group\">Network group</label><select id=\"network_group\" name=\"network_group\">\
         <option value=\"\">none</option>{group_opts}</select>\
         <label for=\"data_volume\">Data volume</label><select id=\"data_volume\" name=\"data_volume\">\
         <option value=\"\">none</option>{vol_opts}</select>{account}\
         <button type=\"submit\" class=\"primary\" id=\"create\">Create</button></form>",
        csrf = s.csrf_field(),
    );
    let msg = q.get("msg").map(String::as_str);
    Ok(layout::page(&s, "Create instance", Nav::Instances, msg, &body).into_response())
}

/// The API's create body from the form.
fn create_body(f: &HashMap<String, String>) -> ConsoleResult<Value> {
    let get = |k: &str| f.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let mut body = json!({
        "name": get("name").ok_or_else(|| ConsoleError::field("name", "is required"))?,
        "flavor": get("flavor").ok_or_else(|| ConsoleError::field("flavor", "is required"))?,
    });
    match get("source").and_then(|s| s.split_once(':')) {
        Some(("image", id)) => body["image"] = json!(id),
        Some(("snapshot", id)) => body["snapshot"] = json!(id),
        _ => {
            return Err(ConsoleError::field(
                "source",
                "choose an image or a snapshot",
            ))
        }
    }
    for k in ["region", "network_group", "data_volume", "account"] {
        if let Some(v) = get(k) {
            body[k] = json!(v);
        }
    }
    Ok(body)
}

/// `POST /console/instances/new`: creates, then shows the instance.
async fn create(s: Session, Form(f): Form<HashMap<String, String>>) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    let body = create_body(&f)?;
    let (status, v) = s
        .api
        .call(Method::POST, "/v1/instances", Some(&body))
        .await?;
    if !status.is_success() {
        let msg = format!(
            "Not created: {}",
            v["error"].as_str().unwrap_or("the API refused it")
        );
        return Ok(Redirect::to(&with_msg(&format!("{BASE}/instances/new"), &msg)).into_response());
    }
    let id = v["id"].as_str().unwrap_or_default();
    let to = with_msg(&format!("{BASE}/instances/{}", esc(id)), "Instance created");
    Ok(Redirect::to(&to).into_response())
}
