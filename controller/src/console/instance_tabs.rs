//! One instance: its header (state, actions), the tabs Access, Monitor,
//! Billing, Config, Hardware and Network Group, the Take Snapshot and
//! Release dialogs, and the port forward forms. While the instance is
//! Snapshotting or Released only Config and Hardware are available (the
//! API answers the others with 409 then; the tabs are disabled).

use super::instances::{action_label, with_msg};
use super::layout::{self, esc, Nav, Tab};
use super::session::Session;
use super::{charts, id_segment, query_string, ConsoleError, ConsoleResult, BASE};
use crate::AppState;
use axum::extract::{Path, Query};
use axum::http::Method;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use gantry_proto::api::v1::InstanceSummary;
use gantry_proto::{Action, InstanceState};
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    let i = format!("{BASE}/instances/{{id}}");
    Router::new()
        .route(&i, get(show))
        .route(&format!("{i}/status"), get(status))
        .route(&format!("{i}/password"), get(password))
        .route(&format!("{i}/snapshot"), post(snapshot))
        .route(&format!("{i}/forwards"), post(forward_new))
        .route(&format!("{i}/forwards/{{fwd}}"), post(forward_edit))
        .route(
            &format!("{i}/forwards/{{fwd}}/delete"),
            post(forward_delete),
        )
}

/// The tabs: label, slug (the `tab=` value and the API view).
const TABS: [(&str, &str); 6] = [
    ("Access", "access"),
    ("Monitor", "monitor"),
    ("Billing", "billing"),
    ("Config", "config"),
    ("Hardware", "hardware"),
    ("Network Group", "network-group"),
];

/// Whether a tab is available in state `s` (the product's rule, the same
/// as the API's `instances::gate`).
pub fn tab_enabled(s: InstanceState, slug: &str) -> bool {
    let limited = s.is_snapshotting() || s == InstanceState::Released;
    !limited || matches!(slug, "config" | "hardware")
}

/// The instance's summary. `GET /v1/instances/{id}` answers 409 while it
/// is Snapshotting or Released; then it is read from the API's list of
/// instances in that state (scoped to the caller just the same).
async fn summary(s: &Session, id: &str) -> ConsoleResult<InstanceSummary> {
    let bad = |e: serde_json::Error| ConsoleError::Api {
        status: axum::http::StatusCode::BAD_GATEWAY,
        message: format!("unexpected instance: {e}"),
    };
    let (status, v) = s
        .api
        .call(Method::GET, &format!("/v1/instances/{id}"), None)
        .await?;
    if status.is_success() {
        return serde_json::from_value(v).map_err(bad);
    }
    if status != axum::http::StatusCode::CONFLICT {
        return Err(ConsoleError::Api {
            status,
            message: v["error"].as_str().unwrap_or("refused").to_string(),
        });
    }
    for state in ["Snapshotting", "Released"] {
        let list = s
            .api
            .get(&format!(
                "/v1/instances?{}",
                query_string(&[("status", state)])
            ))
            .await?;
        let list: Vec<InstanceSummary> = serde_json::from_value(list).map_err(bad)?;
        if let Some(i) = list.into_iter().find(|i| i.id.to_string() == id) {
            return Ok(i);
        }
    }
    Err(ConsoleError::Api {
        status,
        message: v["error"].as_str().unwrap_or("conflict").to_string(),
    })
}

/// `GET /console/instances/{id}/status`: state and actions (polled).
async fn status(s: Session, Path(id): Path<String>) -> ConsoleResult<Json<Value>> {
    let i = summary(&s, id_segment(&id)?).await?;
    Ok(Json(json!({
        "status": i.status,
        "cost": layout::money(i.cost_micros),
        "allowed_actions": i.allowed_actions,
    })))
}

/// `GET /console/instances/{id}/password`: the API's reveal (audited).
async fn password(s: Session, Path(id): Path<String>) -> ConsoleResult<Json<Value>> {
    let id = id_segment(&id)?;
    Ok(Json(
        s.api.get(&format!("/v1/instances/{id}/password")).await?,
    ))
}

/// The header's action buttons: plain actions post at once; Take
/// Snapshot and Release open their dialogs.
fn actions_bar(s: &Session, i: &InstanceSummary) -> String {
    let id = esc(&i.id.to_string());
    let back = format!("{BASE}/instances/{id}");
    let mut out = String::from("<div class=\"actions\" id=\"instance-actions\">");
    for a in &i.allowed_actions {
        let label = action_label(*a);
        match a {
            Action::Snapshot | Action::Release => out.push_str(&format!(
                "<button type=\"button\" data-open=\"{n}-dialog\" data-action=\"{n}\">{label}</button>",
                n = a.name()
            )),
            Action::ChangeType | Action::GrowDisk => {}
            _ => out.push_str(&format!(
                "<form method=\"post\" action=\"{BASE}/instances/{id}/action\" class=\"inline\">{}\
                 <input type=\"hidden\" name=\"action\" value=\"{n}\">\
                 <input type=\"hidden\" name=\"back\" value=\"{back}\">\
                 <button type=\"submit\" data-action=\"{n}\">{label}</button></form>",
                s.csrf_field(),
                n = a.name()
            )),
        }
    }
    out + "</div>"
}

fn dialogs(s: &Session, i: &InstanceSummary, open: Option<&str>) -> String {
    let id = esc(&i.id.to_string());
    let name = esc(&i.name);
    let can = |a: Action| i.allowed_actions.contains(&a);
    let is_open = |d: &str| {
        if open == Some(d) {
            " data-autoopen"
        } else {
            ""
        }
    };
    let mut out = String::new();
    if can(Action::Snapshot) {
        out.push_str(&format!(
            "<dialog id=\"snapshot-dialog\" aria-labelledby=\"snap-title\"{o}>\
             <form method=\"post\" action=\"{BASE}/instances/{id}/snapshot\">{csrf}\
             <h2 id=\"snap-title\">Take Snapshot of {name}</h2>\
             <label for=\"snap-name\">Name (1–50 characters)</label>\
             <input id=\"snap-name\" name=\"name\" required maxlength=\"50\" data-snapshot-name \
              aria-describedby=\"snap-name-hint\">\
             <p id=\"snap-name-hint\" class=\"hint\" aria-live=\"polite\"></p>\
             <label for=\"snap-desc\">Description</label><textarea id=\"snap-desc\" name=\"description\" maxlength=\"500\"></textarea>\
             <label class=\"check\"><input type=\"checkbox\" name=\"auto_release\" value=\"on\" id=\"snap-auto-release\"> \
             Release the instance once the snapshot succeeds</label>\
             <label class=\"check\"><input type=\"checkbox\" name=\"as_image\" value=\"on\" id=\"snap-as-image\"> \
             Also create an image from it</label>\
             <div class=\"row\"><button type=\"submit\" class=\"primary\" id=\"snap-submit\">Take Snapshot</button>\
             <button type=\"button\" data-close>Cancel</button></div></form></dialog>",
            o = is_open("snapshot"),
            csrf = s.csrf_field(),
        ));
    }
    if can(Action::Release) {
        out.push_str(&format!(
            "<dialog id=\"release-dialog\" aria-labelledby=\"rel-title\"{o}>\
             <form method=\"post\" action=\"{BASE}/instances/{id}/action\">{csrf}\
             <input type=\"hidden\" name=\"action\" value=\"release\">\
             <input type=\"hidden\" name=\"back\" value=\"{BASE}/instances/{id}\">\
             <h2 id=\"rel-title\">Release {name}?</h2>\
             <p class=\"warn\">This stops the instance and deletes its root disk. It cannot be undone; \
             take a snapshot first to keep its data.</p>\
             <div class=\"row\"><button type=\"submit\" class=\"danger\" id=\"release-confirm\">Stop &amp; Release</button>\
             <button type=\"button\" data-close>Cancel</button></div></form></dialog>",
            o = is_open("release"),
            csrf = s.csrf_field(),
        ));
    }
    out
}

/// `GET /console/instances/{id}?tab=&dialog=&range=`: the instance page.
async fn show(
    s: Session,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    let id = id_segment(&id)?;
    let i = summary(&s, id).await?;
    let state = i.state;
    let want = q.get("tab").map(String::as_str);
    let tab = match want {
        Some(t) if TABS.iter().any(|(_, s)| *s == t) && tab_enabled(state, t) => t,
        _ if tab_enabled(state, "access") => "access",
        _ => "config",
    };
    let tabs: Vec<Tab> = TABS
        .iter()
        .map(|(label, slug)| Tab {
            label,
            href: format!("{BASE}/instances/{id}?tab={slug}"),
            current: *slug == tab,
            enabled: tab_enabled(state, slug),
        })
        .collect();
    let content = match tab {
        "access" => access(&s, id).await?,
        "monitor" => monitor(&s, id, q.get("range").map(String::as_str)).await?,
        "billing" => billing(&s, id).await?,
        "network-group" => layout::json_dl(
            &s.api
                .get(&format!("/v1/instances/{id}/network-group"))
                .await?,
        ),
        view => layout::json_dl(&s.api.get(&format!("/v1/instances/{id}/{view}")).await?),
    };
    let body = format!(
        "<p class=\"meta\"><code id=\"instance-id\">{iid}</code> · <span class=\"badge {st}\" id=\"instance-status\" \
         data-poll=\"{BASE}/instances/{iid}/status\">{st}</span> · cost <span id=\"instance-cost\">{cost}</span> · \
         region {region}</p>{acts}{tabs}<section id=\"tab-{tab}-panel\" class=\"panel\">{content}</section>{dialogs}",
        iid = esc(&i.id.to_string()),
        st = esc(&i.status),
        cost = layout::money(i.cost_micros),
        region = esc(&i.region),
        acts = actions_bar(&s, &i),
        tabs = layout::tabs("Instance views", &tabs),
        dialogs = dialogs(&s, &i, q.get("dialog").map(String::as_str)),
    );
    let msg = q.get("msg").map(String::as_str);
    let title = format!("Instance {}", i.name);
    Ok(layout::page(&s, &title, Nav::Instances, msg, &body).into_response())
}

/// A value with a Copy button (the script copies `data-copy`).
fn copyable(id: &str, text: &str) -> String {
    format!(
        "<code id=\"{id}\">{t}</code> <button type=\"button\" data-copy=\"{t}\" aria-label=\"Copy {id}\">Copy</button>",
        t = esc(text)
    )
}

async fn access(s: &Session, id: &str) -> ConsoleResult<String> {
    let v = s.api.get(&format!("/v1/instances/{id}/access")).await?;
    let ssh = match v["ssh_command"].as_str() {
        Some(c) => copyable("ssh-command", c),
        None => "<span class=\"muted\">not reachable yet</span>".into(),
    };
    let pw = if v["password_set"].as_bool() == Some(true) {
        format!(
            "<code id=\"password\" data-masked>••••••••</code> \
             <button type=\"button\" id=\"reveal-password\" data-reveal=\"{BASE}/instances/{}/password\">Reveal</button>",
            esc(id)
        )
    } else {
        "<span class=\"muted\">no password set</span>".into()
    };
    let jupyter = match v["jupyter_url"].as_str() {
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => format!(
            "<a class=\"button\" id=\"jupyter-open\" href=\"{u}\" target=\"_blank\" rel=\"noopener noreferrer\">Open</a> \
             {c}",
            u = esc(u),
            c = copyable("jupyter-url", u)
        ),
        _ => "<span class=\"muted\">not available</span>".into(),
    };
    let forwards = v["forwards"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    Ok(format!(
        "<dl class=\"kv\"><dt>SSH</dt><dd>{ssh}</dd><dt>User</dt><dd>{user}</dd><dt>Password</dt><dd>{pw}</dd>\
         <dt>JupyterLab (port 8888)</dt><dd>{jupyter}</dd><dt>CA certificate</dt><dd><code>{ca}</code></dd></dl>\
         <h2>Port forwards</h2>{table}{new}",
        user = layout::s(&v, "ssh_user"),
        ca = layout::s(&v, "ca_certificate_path"),
        table = forwards_table(s, id, forwards),
        new = forward_form(s, id),
    ))
}

fn forwards_table(s: &Session, id: &str, fwds: &[Value]) -> String {
    let id = esc(id);
    let rows: String = fwds
        .iter()
        .map(|f| {
            let fid = layout::s(f, "id");
            let https = if f["https"].as_bool() == Some(true) { " checked" } else { "" };
            format!(
                "<tr data-forward=\"{fid}\"><td>{label}</td><td>{proto}</td><td>{gp}</td><td>{hp}</td>\
                 <td><a href=\"{url}\" rel=\"noopener noreferrer\">{url}</a></td>\
                 <td><details><summary>Edit</summary>\
                 <form method=\"post\" action=\"{BASE}/instances/{id}/forwards/{fid}\" class=\"stack\">{csrf}\
                 <label for=\"l-{fid}\">Label</label><input id=\"l-{fid}\" name=\"label\" value=\"{label}\" maxlength=\"64\">\
                 <label for=\"g-{fid}\">Guest port</label><input id=\"g-{fid}\" name=\"guest_port\" type=\"number\" min=\"1\" max=\"65535\" value=\"{gp}\">\
                 <label class=\"check\"><input type=\"checkbox\" name=\"https\" value=\"on\"{https}> HTTPS</label>\
                 <button type=\"submit\" data-save>Save</button></form></details>\
                 <form method=\"post\" action=\"{BASE}/instances/{id}/forwards/{fid}/delete\" class=\"inline\">{csrf}\
                 <button type=\"submit\" class=\"danger\" data-delete>Delete</button></form></td></tr>",
                label = layout::s(f, "label"),
                proto = layout::s(f, "protocol"),
                gp = f["guest_port"],
                hp = f["host_port"],
                url = layout::s(f, "url"),
                csrf = s.csrf_field(),
            )
        })
        .collect();
    format!(
        "<div class=\"scroll\"><table class=\"list\" id=\"forwards\"><thead><tr><th scope=\"col\">Label</th>\
         <th scope=\"col\">Protocol</th><th scope=\"col\">Guest port</th><th scope=\"col\">Host port</th>\
         <th scope=\"col\">Address</th><th scope=\"col\">Manage</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )
}

fn forward_form(s: &Session, id: &str) -> String {
    format!(
        "<details id=\"forward-new\"><summary>New port forward</summary>\
         <form method=\"post\" action=\"{BASE}/instances/{id}/forwards\" class=\"stack\">{csrf}\
         <label for=\"fw-port\">Guest port</label><input id=\"fw-port\" name=\"guest_port\" type=\"number\" min=\"1\" max=\"65535\" required>\
         <label for=\"fw-proto\">Protocol</label><select id=\"fw-proto\" name=\"protocol\"><option value=\"tcp\">TCP</option><option value=\"udp\">UDP</option></select>\
         <label for=\"fw-label\">Label</label><input id=\"fw-label\" name=\"label\" maxlength=\"64\">\
         <label class=\"check\"><input type=\"checkbox\" name=\"https\" value=\"on\" id=\"fw-https\"> HTTPS</label>\
         <button type=\"submit\" id=\"fw-create\">Add</button></form></details>",
        id = esc(id),
        csrf = s.csrf_field(),
    )
}

const RANGES: [(&str, &str); 5] = [
    ("15m", "15 minutes"),
    ("1h", "1 hour"),
    ("6h", "6 hours"),
    ("24h", "24 hours"),
    ("7d", "7 days"),
];

async fn monitor(s: &Session, id: &str, range: Option<&str>) -> ConsoleResult<String> {
    let range = RANGES
        .iter()
        .find(|(r, _)| Some(*r) == range)
        .map_or("1h", |(r, _)| r);
    let q = query_string(&[("since", range)]);
    let v = s
        .api
        .get(&format!("/v1/instances/{id}/monitor?{q}"))
        .await?;
    let opts: String = RANGES
        .iter()
        .map(|(r, label)| {
            let sel = if *r == range { " selected" } else { "" };
            format!("<option value=\"{r}\"{sel}>last {label}</option>")
        })
        .collect();
    Ok(format!(
        "<form method=\"get\" class=\"row\" id=\"range-form\"><input type=\"hidden\" name=\"tab\" value=\"monitor\">\
         <label for=\"range\">Range</label><select id=\"range\" name=\"range\">{opts}</select>\
         <button type=\"submit\">Show</button></form>\
         <p class=\"muted\">Source: {src}; step {step} s.</p>{charts}",
        src = layout::s(&v, "source"),
        step = v["step_secs"],
        charts = charts::charts(&v),
    ))
}

async fn billing(s: &Session, id: &str) -> ConsoleResult<String> {
    let v = s.api.get(&format!("/v1/instances/{id}/billing")).await?;
    let usage = s
        .api
        .get(&format!(
            "/v1/usage?{}",
            query_string(&[("instance", id), ("limit", "200")])
        ))
        .await?;
    let rows: String = usage
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|u| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                layout::time(&u["at"]),
                layout::s(u, "kind"),
                u["quantity"],
                layout::money(u["price_micros"].as_i64().unwrap_or(0)),
                layout::money(u["amount_micros"].as_i64().unwrap_or(0)),
            )
        })
        .collect();
    Ok(format!(
        "<dl class=\"kv\" id=\"billing\"><dt>Price</dt><dd>{price} per hour</dd><dt>Billed time</dt><dd>{secs} s</dd>\
         <dt>Cost</dt><dd>{cost}</dd><dt>Account credit</dt><dd>{credit}</dd></dl>\
         <h2>Statement</h2><div class=\"scroll\"><table class=\"list\"><thead><tr><th scope=\"col\">At</th>\
         <th scope=\"col\">Kind</th><th scope=\"col\">Quantity</th><th scope=\"col\">Price</th><th scope=\"col\">Amount</th>\
         </tr></thead><tbody>{rows}</tbody></table></div>",
        price = layout::money(v["price_micros_per_hour"].as_i64().unwrap_or(0)),
        secs = v["billed_seconds"],
        cost = layout::money(v["cost_micros"].as_i64().unwrap_or(0)),
        credit = layout::money(v["account_credit_micros"].as_i64().unwrap_or(0)),
    ))
}

fn checked(f: &HashMap<String, String>, k: &str) -> bool {
    f.get(k).is_some_and(|v| v == "on" || v == "true")
}

/// The API's refusal as a notice on the instance page (a 404 or 401 is
/// the page's own answer).
fn outcome(
    id: &str,
    tab: &str,
    status: axum::http::StatusCode,
    v: &Value,
    ok: &str,
) -> ConsoleResult<Response> {
    if matches!(status.as_u16(), 401 | 404) {
        return Err(ConsoleError::Api {
            status,
            message: v["error"].as_str().unwrap_or("not found").to_string(),
        });
    }
    let msg = if status.is_success() {
        ok.to_string()
    } else {
        format!(
            "Refused: {}",
            v["error"].as_str().unwrap_or("the API refused it")
        )
    };
    let page = format!("{BASE}/instances/{id}?tab={tab}");
    Ok(Redirect::to(&with_msg(&page, &msg)).into_response())
}

/// `POST /console/instances/{id}/snapshot`: Take Snapshot; its progress
/// is on the Snapshots page.
async fn snapshot(
    s: Session,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    let id = id_segment(&id)?;
    let name = f.get("name").cloned().unwrap_or_default();
    if let Err(e) = gantry_proto::validate::snapshot_name("name", &name) {
        return outcome(
            id,
            "config",
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"error": e.to_string()}),
            "",
        );
    }
    let body = json!({
        "name": name,
        "description": f.get("description").cloned().unwrap_or_default(),
        "auto_release": checked(&f, "auto_release"),
        "as_image": checked(&f, "as_image"),
    });
    let (status, v) = s
        .api
        .call(
            Method::POST,
            &format!("/v1/instances/{id}/snapshots"),
            Some(&body),
        )
        .await?;
    if status.is_success() {
        let to = with_msg(
            &format!("{BASE}/snapshots"),
            &format!("Snapshot {name:?} started"),
        );
        return Ok(Redirect::to(&to).into_response());
    }
    outcome(id, "config", status, &v, "")
}

fn forward_body(f: &HashMap<String, String>, new: bool) -> ConsoleResult<Value> {
    let port = f
        .get("guest_port")
        .map(|p| p.trim())
        .filter(|p| !p.is_empty());
    let mut body = json!({"https": checked(f, "https")});
    match port {
        Some(p) => {
            let p: u16 = p
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| ConsoleError::field("guest_port", "must be 1 to 65535"))?;
            body["guest_port"] = json!(p);
        }
        None if new => return Err(ConsoleError::field("guest_port", "is required")),
        None => {}
    }
    if let Some(l) = f.get("label") {
        body["label"] = json!(l.trim());
    }
    if let Some(p) = f
        .get("protocol")
        .filter(|p| matches!(p.as_str(), "tcp" | "udp"))
    {
        body["protocol"] = json!(p);
    }
    Ok(body)
}

/// `POST /console/instances/{id}/forwards`: New.
async fn forward_new(
    s: Session,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    let id = id_segment(&id)?;
    let body = forward_body(&f, true)?;
    let (status, v) = s
        .api
        .call(
            Method::POST,
            &format!("/v1/instances/{id}/forwards"),
            Some(&body),
        )
        .await?;
    outcome(id, "access", status, &v, "Port forward added")
}

/// `POST /console/instances/{id}/forwards/{fwd}`: Edit.
async fn forward_edit(
    s: Session,
    Path((id, fwd)): Path<(String, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    let (id, fwd) = (id_segment(&id)?, id_segment(&fwd)?);
    let body = forward_body(&f, false)?;
    let path = format!("/v1/instances/{id}/forwards/{fwd}");
    let (status, v) = s.api.call(Method::PATCH, &path, Some(&body)).await?;
    outcome(id, "access", status, &v, "Port forward saved")
}

/// `POST /console/instances/{id}/forwards/{fwd}/delete`: Delete.
async fn forward_delete(
    s: Session,
    Path((id, fwd)): Path<(String, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    let (id, fwd) = (id_segment(&id)?, id_segment(&fwd)?);
    let path = format!("/v1/instances/{id}/forwards/{fwd}");
    let (status, v) = s.api.call(Method::DELETE, &path, None).await?;
    outcome(id, "access", status, &v, "Port forward deleted")
}
