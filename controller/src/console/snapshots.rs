//! The Snapshots page: name, instance, status with progress, compressed
//! size, storage cost per hour, created; delete; create an instance from
//! one. The table body is polled while snapshots are in progress.

use super::instances::with_msg;
use super::layout::{self, esc, Nav};
use super::session::Session;
use super::{id_segment, ConsoleResult, BASE};
use crate::AppState;
use axum::extract::{Path, Query};
use axum::http::Method;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde_json::Value;
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(&format!("{BASE}/snapshots"), get(list))
        .route(&format!("{BASE}/snapshots/rows"), get(rows))
        .route(&format!("{BASE}/snapshots/{{id}}/delete"), post(delete))
}

/// The storage cost per hour of `bytes` at `price` micro-units per TB
/// (10^12 bytes) per hour, in units with six decimals.
fn per_hour(bytes: u64, price: i64) -> String {
    let units = bytes as f64 * price.max(0) as f64 / 1e12 / 1e6;
    format!("{}{units:.6}/h", layout::CURRENCY)
}

fn row(s: &Session, v: &Value, price_per_tb_hour: i64) -> String {
    let id = layout::s(v, "id");
    let status = layout::s(v, "status");
    let progress = v["progress_percent"].as_u64().unwrap_or(0);
    let compressed = v["compressed_bytes"].as_u64().unwrap_or(0);
    let cost = per_hour(compressed, price_per_tb_hour);
    let bar = match status.as_str() {
        "Success" | "Failed" => String::new(),
        _ => format!(
            " <progress max=\"100\" value=\"{progress}\" aria-label=\"progress\">{progress}%</progress> {progress}%"
        ),
    };
    let err = v["error"]
        .as_str()
        .map(|e| format!("<br><span class=\"error\">{}</span>", esc(e)))
        .unwrap_or_default();
    let create = if status == "Success" {
        format!(
            "<a class=\"button\" href=\"{BASE}/instances/new?source=snapshot:{id}\">Create instance</a> "
        )
    } else {
        String::new()
    };
    let inst = layout::s(v, "instance");
    format!(
        "<tr data-id=\"{id}\"><td>{name}</td><td><a href=\"{BASE}/instances/{inst}\"><code>{inst}</code></a></td>\
         <td class=\"status\" data-status=\"{status}\"><span class=\"badge {status}\">{status}</span>{bar}{err}</td>\
         <td>{size}</td><td>{cost}</td><td>{created}</td><td>{create}\
         <form method=\"post\" action=\"{BASE}/snapshots/{id}/delete\" class=\"inline\" data-confirm=\"Delete this snapshot?\">{csrf}\
         <button type=\"submit\" class=\"danger\">Delete</button></form></td></tr>",
        name = layout::s(v, "name"),
        size = layout::bytes(compressed),
        created = layout::time(&v["created_at"]),
        csrf = s.csrf_field(),
    )
}

async fn tbody(s: &Session, price: i64) -> ConsoleResult<String> {
    let list = s.api.get("/v1/snapshots").await?;
    let items = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if items.is_empty() {
        return Ok("<tr><td colspan=\"7\" class=\"muted\">No snapshots.</td></tr>".into());
    }
    Ok(items.iter().map(|v| row(s, v, price)).collect())
}

/// `GET /console/snapshots`.
async fn list(
    s: Session,
    st: axum::extract::State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    let tb = tbody(&s, st.cfg.snapshot_price_micros_per_tb_hour).await?;
    let body = format!(
        "<div class=\"scroll\"><table class=\"list\" id=\"snapshots\"><thead><tr><th scope=\"col\">Name</th>\
         <th scope=\"col\">Instance</th><th scope=\"col\">Status</th><th scope=\"col\">Compressed size</th>\
         <th scope=\"col\">Storage cost</th><th scope=\"col\">Created</th><th scope=\"col\">Actions</th></tr></thead>\
         <tbody data-refresh=\"{BASE}/snapshots/rows\">{tb}</tbody></table></div>"
    );
    let msg = q.get("msg").map(String::as_str);
    Ok(layout::page(&s, "Snapshots", Nav::Snapshots, msg, &body).into_response())
}

/// `GET /console/snapshots/rows`: the table body (polled).
async fn rows(s: Session, st: axum::extract::State<AppState>) -> ConsoleResult<Html<String>> {
    Ok(Html(
        tbody(&s, st.cfg.snapshot_price_micros_per_tb_hour).await?,
    ))
}

/// `POST /console/snapshots/{id}/delete`.
async fn delete(
    s: Session,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    let id = id_segment(&id)?;
    let (status, v) = s
        .api
        .call(Method::DELETE, &format!("/v1/snapshots/{id}"), None)
        .await?;
    if matches!(status.as_u16(), 401 | 404) {
        return Err(super::ConsoleError::Api {
            status,
            message: v["error"].as_str().unwrap_or("not found").to_string(),
        });
    }
    let msg = if status.is_success() {
        "Snapshot deleted".to_string()
    } else {
        format!("Not deleted: {}", v["error"].as_str().unwrap_or("refused"))
    };
    Ok(Redirect::to(&with_msg(&format!("{BASE}/snapshots"), &msg)).into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn storage_cost_per_hour() {
        // 1 GB at 100000 micros per TB-hour: 100 micros an hour.
        assert_eq!(super::per_hour(1_000_000_000, 100_000), "$0.000100/h");
    }
}
