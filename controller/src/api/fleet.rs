//! Admin calls for a fleet's broken parts: settling an operation its host
//! will never finish, and removing a host that is gone for good.
//!
//! Both go through `crate::operations` (the one place operations end), and
//! both are audited with a note (the guard records every admin write).

use super::{path_id, Body, Caller, OptionalBody};
use crate::audit::AuditNote;
use crate::db::{now_ms, parsed, rows, Tx};
use crate::error::{ApiError, ApiResult};
use crate::operations::{self, Ending, OpRow, OP_COLS};
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use gantry_proto::api::v1::{
    MoveInstance, MoveStarted, RemovedHost, SettleOperation, SettleOutcome,
};
use gantry_proto::ids::{HostId, InstanceId, OperationId};
use gantry_proto::operation::OperationEvent;
use gantry_proto::{validate, InstanceState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/operations/{id}/settle", post(settle))
        .route("/admin/hosts/{id}/remove", post(remove_host))
        .route("/admin/instances/{id}/move", post(move_instance))
}

/// `POST /v1/admin/instances/{id}/move` (see `crate::moves`): 202 with
/// the move's first operation.
async fn move_instance(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<MoveInstance>,
) -> ApiResult<Response> {
    let id: InstanceId = path_id(&id, "instance")?;
    let rec = super::instances::load_in(&st.db.pool, &who, id).await?;
    super::actions::check_idle(&rec)?;
    let op = crate::moves::start(&st, &rec, req.host).await?;
    let mut resp = super::accepted(MoveStarted {
        instance: id,
        operation: op,
    });
    resp.extensions_mut().insert(AuditNote(format!(
        "move instance {id}{}",
        req.host
            .map(|h| format!(" to host {h}"))
            .unwrap_or_default()
    )));
    Ok(resp)
}

/// `POST /v1/admin/hosts/{id}/drain` (see `crate::moves::drain`).
pub async fn drain(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let host: HostId = path_id(&id, "host")?;
    let report = crate::moves::drain(&st, host).await?;
    let note = format!(
        "drain host {host}: {} moving, {} not moved",
        report.moving.len(),
        report.not_moved.len()
    );
    let mut resp = Json(report).into_response();
    resp.extensions_mut().insert(AuditNote(note));
    Ok(resp)
}

/// `POST /v1/admin/operations/{id}/settle`.
async fn settle(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Body(req): Body<SettleOperation>,
) -> ApiResult<Response> {
    let id: OperationId = path_id(&id, "operation")?;
    validate::free_text("reason", &req.reason, 500)?;
    if req.reason.trim().is_empty() {
        return Err(ApiError::invalid(
            "reason",
            "must say why the operation is settled",
        ));
    }
    let ok = req.outcome == SettleOutcome::Succeeded;
    let op = operations::settle(&st, id, ok, &req.reason).await?;
    tracing::warn!(op = %id, kind = %op.kind, ok, "operation settled by an admin");
    let info = sqlx::query(&format!(
        "SELECT {} FROM operations WHERE id = $1",
        rows::OPERATION_COLS
    ))
    .bind(id.to_string())
    .fetch_one(&st.db.pool)
    .await?;
    let mut resp = Json(rows::operation(&info)?).into_response();
    resp.extensions_mut().insert(AuditNote(format!(
        "settled {} {id} as {}: {}",
        op.kind,
        if ok { "succeeded" } else { "failed" },
        req.reason
    )));
    Ok(resp)
}

/// `POST /v1/admin/hosts/{id}/remove`: only a host that is down. Its
/// releases and deletions are settled as done, its other operations as
/// failed; instances being released become Released, the others Failed
/// (lost with the host); its credential stops working and nothing is
/// placed on it again.
async fn remove_host(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let host: HostId = path_id(&id, "host")?;
    let mut tx = st.db.begin_write().await?;
    let row = sqlx::query("SELECT down_since_ms, removed_ms FROM hosts WHERE id = $1")
        .bind(host.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no host {host}")))?;
    let down: Option<i64> = crate::db::col(&row, "down_since_ms")?;
    let removed: Option<i64> = crate::db::col(&row, "removed_ms")?;
    if removed.is_some() {
        return Err(ApiError::Conflict(format!(
            "host {host} is already removed"
        )));
    }
    if down.is_none() {
        return Err(ApiError::Conflict(format!(
            "host {host} is up; only a host that is down can be removed (drain it, stop its \
             agent, and wait for it to miss its heartbeats)"
        )));
    }
    // Instances first (so the lists say what became of each), then the
    // operations that were waiting for the host.
    let (released, failed) = end_instances(&mut tx, &host, down.unwrap_or_default()).await?;
    let settled = settle_host_ops(&st, &mut tx, &host).await?;
    sqlx::query(
        "UPDATE hosts SET removed_ms = $1, revoked_ms = COALESCE(revoked_ms, $1), \
         credential_hash = NULL, health = 'unhealthy', cordoned = 1 WHERE id = $2",
    )
    .bind(now_ms())
    .bind(host.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    st.wake.wake(&host);
    tracing::warn!(%host, released = released.len(), failed = failed.len(), "host removed");
    let note = format!(
        "removed host {host}: {} released, {} failed, {} operations settled",
        released.len(),
        failed.len(),
        settled.len()
    );
    let mut resp = Json(RemovedHost {
        host,
        released,
        failed,
        settled,
    })
    .into_response();
    resp.extensions_mut().insert(AuditNote(note));
    Ok(resp)
}

/// Settles every open operation of `host`.
async fn settle_host_ops(st: &AppState, tx: &mut Tx, host: &HostId) -> ApiResult<Vec<OperationId>> {
    let found = sqlx::query(&format!(
        "SELECT {OP_COLS} FROM operations WHERE host_id = $1 AND state IN ('pending', 'running') \
         ORDER BY created_ms"
    ))
    .bind(host.to_string())
    .fetch_all(&mut **tx)
    .await?;
    let ops = found
        .iter()
        .map(operations::op_row)
        .collect::<Result<Vec<OpRow>, _>>()?;
    let mut settled = Vec::new();
    for op in &ops {
        let ok = op.kind.waits_for_host();
        let why = "settled: its host was removed";
        let ended = operations::finish(
            st,
            tx,
            op,
            Ending {
                event: OperationEvent::Settled(ok),
                progress: 0,
                error: (!ok).then_some(why),
                note: ok.then_some(why),
            },
        )
        .await?;
        if ended.is_some() {
            settled.push(op.id);
        }
    }
    Ok(settled)
}

/// Ends the instances still on `host`: Released when their owner asked
/// for it, else Failed. No usage after `last_seen_ms` is charged.
async fn end_instances(
    tx: &mut Tx,
    host: &HostId,
    last_seen_ms: i64,
) -> ApiResult<(Vec<InstanceId>, Vec<InstanceId>)> {
    let found = sqlx::query(&format!(
        "{} WHERE i.host_id = $1 AND i.observed_state NOT IN ('Released', 'Failed') ORDER BY i.id",
        rows::INSTANCE_SELECT
    ))
    .bind(host.to_string())
    .fetch_all(&mut **tx)
    .await?;
    let (mut released, mut failed) = (Vec::new(), Vec::new());
    for r in &found {
        let rec = rows::instance(r)?;
        let desired: InstanceState = parsed(r, "desired_state", "instances")?;
        super::actions::close_billing(tx, &rec, last_seen_ms).await?;
        let to = if desired == InstanceState::Released {
            released.push(rec.id);
            InstanceState::Released
        } else {
            failed.push(rec.id);
            InstanceState::Failed
        };
        operations::set_final(tx, &rec, to).await?;
    }
    Ok((released, failed))
}
