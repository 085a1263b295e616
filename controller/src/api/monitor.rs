//! Monitoring endpoints: `POST /v1/agent/metrics` (a host's batch, host
//! credential), `GET /v1/instances/{id}/monitor` (the tenant's Monitor
//! view) and `GET /v1/admin/hosts/{id}/monitor` (admins). Storage and the
//! Prometheus reader are [`crate::monitor`].

use super::{path_id, query, Body, Caller};
use crate::error::{ApiError, ApiResult};
use crate::monitor::prom::{self, Subject};
use crate::monitor::query::{self as q, Range};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_proto::ids::HostId;
use gantry_proto::metrics::{MetricsBatch, MonitorSource, MonitorView};
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/agent/metrics", post(ingest))
        .route("/instances/{id}/monitor", get(instance_view))
        .route("/admin/hosts/{id}/monitor", get(host_view))
}

/// `POST /v1/agent/metrics`: checks the batch (422 naming the field) and
/// stores it, unless the Monitor view reads Prometheus. 204 once it is
/// committed, or once it has waited a second in the writer's queue (it is
/// written with the next group; see [`crate::monitor::writer`]).
async fn ingest(
    State(st): State<AppState>,
    who: Caller,
    Body(batch): Body<MetricsBatch>,
) -> ApiResult<StatusCode> {
    let host = who
        .host
        .ok_or_else(|| ApiError::Denied("this call needs a host credential".into()))?;
    let now = st.clock.now_ms();
    if let Err(e) = batch.check(now) {
        crate::metrics::metrics_batch("refused");
        return Err(e.into());
    }
    if st.cfg.metrics.prometheus_url.is_some() {
        crate::metrics::metrics_batch("forwarded");
        return Ok(StatusCode::NO_CONTENT);
    }
    // Older than the raw tier keeps: it would be pruned at once.
    if batch.sent_at_ms < now - st.cfg.metrics.raw_retention_secs as i64 * 1000 {
        crate::metrics::metrics_batch("too_old");
        tracing::debug!(%host, sent_at_ms = batch.sent_at_ms, "dropped a metrics batch too old to keep");
        return Ok(StatusCode::NO_CONTENT);
    }
    let got = crate::monitor::ingest(&st.db, &st.monitor, &host.to_string(), &batch)
        .await
        .map_err(|e| {
            crate::metrics::metrics_batch("error");
            monitor_err(e)
        })?;
    crate::metrics::metrics_batch(if got.queued { "queued" } else { "stored" });
    if got.foreign > 0 {
        tracing::warn!(%host, samples = got.foreign,
            "ignored metric samples of instances not placed on the sending host");
    }
    Ok(StatusCode::NO_CONTENT)
}

fn monitor_err(e: crate::monitor::MonitorError) -> ApiError {
    match e {
        crate::monitor::MonitorError::Db(d) => d.into(),
        other => ApiError::Unavailable(other.to_string()),
    }
}

/// Reads the query (400 naming a bad parameter) at the controller's clock.
fn range(st: &AppState, qs: &HashMap<String, String>) -> ApiResult<Range> {
    query(qs, &["since", "until", "step"])?;
    let get = |k: &str| qs.get(k).map(String::as_str);
    q::parse(
        get("since"),
        get("until"),
        get("step"),
        st.clock.now_ms(),
        &st.cfg.metrics,
    )
    .map_err(|e| ApiError::bad(e.param, e.to_string()))
}

/// The view's series and latest sample, from the database or Prometheus.
async fn series(
    st: &AppState,
    db_subject: &str,
    prom_subject: Subject<'_>,
    r: &Range,
) -> ApiResult<MonitorView> {
    let m = &st.cfg.metrics;
    let (series, latest, source) = match &m.prometheus_url {
        Some(base) => {
            let s = prom::view(
                &st.monitor.http,
                base,
                prom_subject,
                r,
                m.prometheus_min_window_secs,
            )
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
            let latest = s.iter().filter_map(|s| s.points.last()).map(|p| p.t).max();
            (s, latest, MonitorSource::Prometheus)
        }
        None => {
            let (s, latest) = crate::monitor::view_db(&st.db, db_subject, r)
                .await
                .map_err(monitor_err)?;
            (s, latest.map(crate::db::to_time), MonitorSource::Database)
        }
    };
    Ok(MonitorView {
        subject: db_subject.to_string(),
        since: crate::db::to_time(r.since_ms),
        until: crate::db::to_time(r.until_ms),
        step_secs: r.step_secs,
        source,
        latest,
        series,
        state: None,
        desired_state: None,
        state_since: None,
        pending_operation: None,
        host_health: None,
        host_last_heartbeat: None,
    })
}

/// `GET /v1/instances/{id}/monitor`: the instance's series and its state
/// (another account's instance is not found).
async fn instance_view(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Query(qs): Query<HashMap<String, String>>,
) -> ApiResult<Json<MonitorView>> {
    let rec = super::instances::load(&st, &who, &id).await?;
    super::instances::gate(&rec)?;
    let r = range(&st, &qs)?;
    let id = rec.id.to_string();
    let mut view = series(&st, &id, Subject::Instance(&id), &r).await?;
    view.state = Some(rec.observed);
    view.desired_state = Some(rec.desired);
    view.state_since = Some(crate::db::to_time(rec.state_since_ms));
    view.pending_operation = rec.pending_op;
    if let Some(h) = &rec.host {
        let (health, last) = super::hosts::health_of(&st, h).await?;
        view.host_health = Some(health);
        view.host_last_heartbeat = Some(last);
    }
    Ok(Json(view))
}

/// `GET /v1/admin/hosts/{id}/monitor` (admins): the host's own series.
async fn host_view(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Query(qs): Query<HashMap<String, String>>,
) -> ApiResult<Json<MonitorView>> {
    who.require_admin()?;
    let id: HostId = path_id(&id, "host")?;
    let host = super::hosts::load(&st, &id).await?;
    let r = range(&st, &qs)?;
    let mut view = series(&st, &id.to_string(), Subject::Host(&host.address), &r).await?;
    view.host_health = Some(host.health);
    view.host_last_heartbeat = Some(host.last_heartbeat);
    Ok(Json(view))
}
