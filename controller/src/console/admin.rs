//! The Admin page (admin sessions; the API refuses account tokens with
//! 403): hosts with health, capacity and each GPU's health (cordon,
//! uncordon, drain, clear quarantine), accounts and credit, the audit log
//! and the failed operations with their reasons.

use super::instances::with_msg;
use super::layout::{self, esc, Nav};
use super::session::Session;
use super::{id_segment, ConsoleError, ConsoleResult, BASE};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{BASE}/admin"), get(page))
        .route(
            &format!("{BASE}/admin/hosts/{{id}}/{{verb}}"),
            post(host_verb),
        )
        .route(
            &format!("{BASE}/admin/hosts/{{id}}/gpus/{{pci}}/clear"),
            post(gpu_clear),
        )
        .route(
            &format!("{BASE}/admin/accounts/{{id}}/credits"),
            post(credit),
        )
}

fn post_button(s: &Session, action: &str, label: &str, cls: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{}\" class=\"inline\">{}<button type=\"submit\" class=\"{cls}\">{label}</button></form>",
        esc(action),
        s.csrf_field()
    )
}

fn gpu_list(s: &Session, host: &str, gpus: &[Value]) -> String {
    if gpus.is_empty() {
        return "<span class=\"muted\">no GPUs</span>".into();
    }
    let items: String = gpus
        .iter()
        .map(|g| {
            let pci = g["pci"].as_str().unwrap_or_default();
            // `{"state": "quarantined", "reason": "..."}` (proto::gpu::GpuHealth).
            let state = g["health"]["state"].as_str().unwrap_or("unknown");
            let health = match g["health"]["reason"].as_str() {
                Some(r) => format!("{state}: {r}"),
                None => state.to_string(),
            };
            let clear = if state == "quarantined" {
                post_button(
                    s,
                    &format!("{BASE}/admin/hosts/{host}/gpus/{pci}/clear"),
                    "Clear quarantine",
                    "",
                )
            } else {
                String::new()
            };
            format!(
                "<li><code>{}</code> {} — <span class=\"badge\">{}</span>{} {clear}</li>",
                esc(pci),
                layout::s(g, "model"),
                esc(&health),
                g["instance"]
                    .as_str()
                    .map(|i| format!(" (instance <code>{}</code>)", esc(i)))
                    .unwrap_or_default(),
            )
        })
        .collect();
    format!("<ul class=\"gpus\">{items}</ul>")
}

fn hosts_table(s: &Session, hosts: &Value) -> String {
    let rows: String = hosts
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|h| {
            let id = layout::s(h, "id");
            let cordon = if h["cordoned"].as_bool() == Some(true) {
                post_button(s, &format!("{BASE}/admin/hosts/{id}/uncordon"), "Uncordon", "")
            } else {
                post_button(s, &format!("{BASE}/admin/hosts/{id}/cordon"), "Cordon", "")
            };
            let drain = post_button(s, &format!("{BASE}/admin/hosts/{id}/drain"), "Drain", "danger");
            let problems: Vec<String> = h["problems"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter_map(|p| p.as_str().map(esc))
                .collect();
            format!(
                "<tr data-id=\"{id}\"><td>{name}<br><code>{id}</code></td><td><span class=\"badge\">{health}</span> {flags}<br>{probs}</td>\
                 <td>{uc}/{c} vCPU<br>{um}/{m} MiB<br>{ud}/{d} GiB</td><td>{gpus}</td><td>{cordon} {drain}</td></tr>",
                name = layout::s(h, "name"),
                health = layout::s(h, "health"),
                flags = [("cordoned", "cordoned"), ("draining", "draining")]
                    .iter()
                    .filter(|(k, _)| h[*k].as_bool() == Some(true))
                    .map(|(_, l)| *l)
                    .collect::<Vec<_>>()
                    .join(", "),
                probs = problems.join("<br>"),
                uc = h["used_vcpus"],
                c = h["vcpus"],
                um = h["used_memory_mib"],
                m = h["memory_mib"],
                ud = h["used_disk_gib"],
                d = h["disk_gib"],
                gpus = gpu_list(s, &id, h["gpus"].as_array().map(Vec::as_slice).unwrap_or_default()),
            )
        })
        .collect();
    format!(
        "<div class=\"scroll\"><table class=\"list\" id=\"hosts\"><thead><tr><th scope=\"col\">Host</th>\
         <th scope=\"col\">Health</th><th scope=\"col\">Capacity (used/total)</th><th scope=\"col\">GPUs</th>\
         <th scope=\"col\">Manage</th></tr></thead><tbody>{rows}</tbody></table></div>"
    )
}

fn accounts_table(s: &Session, accounts: &Value) -> String {
    let rows: String = accounts
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let id = layout::s(a, "id");
            format!(
                "<tr><td>{name}<br><code>{id}</code></td><td>{status}</td><td>{credit}</td><td>\
                 <form method=\"post\" action=\"{BASE}/admin/accounts/{id}/credits\" class=\"inline\">{csrf}\
                 <label for=\"cr-{id}\" class=\"sr\">Credit to add</label>\
                 <input id=\"cr-{id}\" name=\"amount\" inputmode=\"decimal\" placeholder=\"10.00\" size=\"8\" required>\
                 <button type=\"submit\">Add credit</button></form></td></tr>",
                name = layout::s(a, "name"),
                status = layout::s(a, "status"),
                credit = layout::money(a["credit_micros"].as_i64().unwrap_or(0)),
                csrf = s.csrf_field(),
            )
        })
        .collect();
    format!(
        "<div class=\"scroll\"><table class=\"list\" id=\"accounts\"><thead><tr><th scope=\"col\">Account</th>\
         <th scope=\"col\">Status</th><th scope=\"col\">Credit</th><th scope=\"col\">Add credit</th></tr></thead>\
         <tbody>{rows}</tbody></table></div>"
    )
}

fn audit_table(audit: &Value) -> String {
    let rows: String = audit
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e| {
            format!(
                "<tr><td>{}</td><td><code>{}</code></td><td>{} <code>{}</code></td><td>{}</td><td>{}</td></tr>",
                layout::time(&e["at"]),
                layout::s(e, "actor"),
                layout::s(e, "method"),
                layout::s(e, "path"),
                e["status"],
                layout::s(e, "note"),
            )
        })
        .collect();
    format!(
        "<div class=\"scroll\"><table class=\"list\" id=\"audit\"><thead><tr><th scope=\"col\">At</th>\
         <th scope=\"col\">Actor</th><th scope=\"col\">Call</th><th scope=\"col\">Status</th><th scope=\"col\">Note</th>\
         </tr></thead><tbody>{rows}</tbody></table></div>"
    )
}

/// The failed and timed-out operations, newest first (admins only: the
/// page is reached only after the API accepted the admin calls above).
async fn failed_ops(st: &AppState) -> ConsoleResult<String> {
    let found = sqlx::query(
        "SELECT id, kind, instance_id, state, error, updated_ms FROM operations \
         WHERE state IN ('Failed', 'TimedOut') ORDER BY updated_ms DESC LIMIT 50",
    )
    .fetch_all(&st.db.pool)
    .await?;
    let mut rows = String::new();
    for r in &found {
        let id: String = crate::db::col(r, "id")?;
        let kind: String = crate::db::col(r, "kind")?;
        let inst: Option<String> = crate::db::col(r, "instance_id")?;
        let state: String = crate::db::col(r, "state")?;
        let error: Option<String> = crate::db::col(r, "error")?;
        let at: i64 = crate::db::col(r, "updated_ms")?;
        rows.push_str(&format!(
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            crate::db::to_time(at).format("%Y-%m-%d %H:%M:%S UTC"),
            esc(&id),
            esc(&kind),
            esc(inst.as_deref().unwrap_or("")),
            esc(&state),
            esc(error.as_deref().unwrap_or("")),
        ));
    }
    Ok(format!(
        "<div class=\"scroll\"><table class=\"list\" id=\"failed-ops\"><thead><tr><th scope=\"col\">At</th>\
         <th scope=\"col\">Operation</th><th scope=\"col\">Kind</th><th scope=\"col\">Instance</th>\
         <th scope=\"col\">State</th><th scope=\"col\">Reason</th></tr></thead><tbody>{rows}</tbody></table></div>"
    ))
}

/// `GET /console/admin`.
async fn page(
    s: Session,
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    // The API's admin rule first: an account session gets its 403.
    let hosts = s.api.get("/v1/admin/hosts").await?;
    let accounts = s.api.get("/v1/admin/accounts").await?;
    let audit = s.api.get("/v1/admin/audit?limit=50").await?;
    let body = format!(
        "<h2 id=\"hosts-h\">Hosts</h2>{}<h2>Accounts</h2>{}<h2>Failed operations</h2>{}<h2>Audit log (latest 50)</h2>{}",
        hosts_table(&s, &hosts),
        accounts_table(&s, &accounts),
        failed_ops(&st).await?,
        audit_table(&audit),
    );
    let msg = q.get("msg").map(String::as_str);
    Ok(layout::page(&s, "Admin", Nav::Admin, msg, &body).into_response())
}

async fn done(
    s: &Session,
    method: Method,
    path: &str,
    body: Option<&Value>,
    ok: &str,
) -> ConsoleResult<Response> {
    let (status, v) = s.api.call(method, path, body).await?;
    if matches!(status.as_u16(), 401 | 403 | 404) {
        return Err(ConsoleError::Api {
            status,
            message: v["error"].as_str().unwrap_or("refused").to_string(),
        });
    }
    let msg = if status.is_success() {
        ok.to_string()
    } else {
        format!("Refused: {}", v["error"].as_str().unwrap_or("refused"))
    };
    Ok(Redirect::to(&with_msg(&format!("{BASE}/admin"), &msg)).into_response())
}

/// `POST /console/admin/hosts/{id}/{cordon|uncordon|drain}`.
async fn host_verb(
    s: Session,
    Path((id, verb)): Path<(String, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    let id = id_segment(&id)?;
    if !matches!(verb.as_str(), "cordon" | "uncordon" | "drain") {
        return Err(ConsoleError::Api {
            status: StatusCode::NOT_FOUND,
            message: format!("no host action {verb:?}"),
        });
    }
    let path = format!("/v1/admin/hosts/{id}/{verb}");
    done(
        &s,
        Method::POST,
        &path,
        None,
        &format!("Host {id}: {verb} done"),
    )
    .await
}

/// `POST /console/admin/hosts/{id}/gpus/{pci}/clear`.
async fn gpu_clear(
    s: Session,
    Path((id, pci)): Path<(String, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    let id = id_segment(&id)?;
    if pci.is_empty()
        || pci.len() > 20
        || !pci
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    {
        return Err(ConsoleError::field("pci", "not a PCI address"));
    }
    let path = format!("/v1/admin/hosts/{id}/gpus/{pci}/clear");
    done(&s, Method::POST, &path, None, &format!("GPU {pci} cleared")).await
}

/// A decimal amount of the currency unit as micros (`10.5` → 10500000).
fn to_micros(s: &str) -> Option<i64> {
    let s = s.trim();
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() && frac.is_empty()
        || frac.len() > 6
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let w: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let f: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    w.checked_mul(1_000_000)?
        .checked_add(if w < 0 { -f } else { f })
}

/// `POST /console/admin/accounts/{id}/credits`.
async fn credit(
    s: Session,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    let id = id_segment(&id)?;
    let micros = to_micros(f.get("amount").map(String::as_str).unwrap_or_default())
        .ok_or_else(|| ConsoleError::field("amount", "must be an amount like 10.50"))?;
    let body = json!({"amount_micros": micros, "note": "console"});
    let path = format!("/v1/admin/accounts/{id}/credits");
    done(
        &s,
        Method::POST,
        &path,
        Some(&body),
        &format!("Credit added to {id}"),
    )
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn amounts_to_micros() {
        assert_eq!(super::to_micros("10.5"), Some(10_500_000));
        assert_eq!(super::to_micros("0.000001"), Some(1));
        assert_eq!(super::to_micros("3"), Some(3_000_000));
        assert_eq!(super::to_micros("1.0000001"), None);
        assert_eq!(super::to_micros("x"), None);
        assert_eq!(super::to_micros(""), None);
    }
}
