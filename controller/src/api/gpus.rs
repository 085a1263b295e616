//! Admin GPU calls: clearing a quarantined or lost GPU (a host operation
//! carrying `AgentCommand::ClearGpu`; the host runs its health gate again
//! and reports the outcome as the GPU's health) and the GPU alias table.
//! The controller's `/metrics` is [`crate::metrics`].

use super::{accepted, path_id, Caller, OptionalBody};
use crate::audit::AuditNote;
use crate::db::{col, rows, Tx};
use crate::error::{ApiError, ApiResult};
use crate::operations::{NewOp, OpDetail};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use gantry_proto::api::v1::{ClearGpu, GpuAlias, SetGpuAlias};
use gantry_proto::gpu::{GpuHealth, GpuHealthKind};
use gantry_proto::ids::{HostId, OperationId};
use gantry_proto::validate::{self, PciAddress};
use std::collections::BTreeMap;

/// An alias lists at most this many models.
pub const MAX_ALIAS_MODELS: usize = 64;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/hosts/{id}/gpus/{pci}/clear", post(clear))
        .route("/admin/gpu-aliases", get(list_aliases))
        .route(
            "/admin/gpu-aliases/{alias}",
            put(set_alias).delete(delete_alias),
        )
}

/// `POST /v1/admin/hosts/{id}/gpus/{pci}/clear`: `202` with the operation.
async fn clear(
    State(st): State<AppState>,
    who: Caller,
    Path((id, pci)): Path<(String, String)>,
    OptionalBody(req): OptionalBody<ClearGpu>,
) -> ApiResult<Response> {
    who.require_admin()?;
    let host: HostId = path_id(&id, "host")?;
    let no_gpu = || ApiError::NotFound(format!("host {host} has no GPU {pci}"));
    let addr = PciAddress::parse(&pci).ok_or_else(no_gpu)?;
    if let Some(n) = &req.note {
        validate::free_text("note", n, 500)?;
    }
    let mut tx = st.db.begin_write().await?;
    // The host row first, as every write of the agent protocol locks it.
    let found = sqlx::query("UPDATE hosts SET cordoned = cordoned WHERE id = $1")
        .bind(host.to_string())
        .execute(&mut *tx)
        .await?;
    if found.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!("no host {host}")));
    }
    let row =
        sqlx::query("SELECT health, health_reason FROM host_gpus WHERE host_id = $1 AND pci = $2")
            .bind(host.to_string())
            .bind(addr.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(no_gpu)?;
    let kind: String = col(&row, "health")?;
    let health = GpuHealth::from_parts(
        GpuHealthKind::parse(&kind).unwrap_or(GpuHealthKind::Healthy),
        col(&row, "health_reason")?,
    );
    if !health.is_clearable() {
        return Err(ApiError::Conflict(format!(
            "GPU {addr} on host {host} is {}; only a quarantined or lost GPU can be cleared",
            health.kind()
        )));
    }
    let op = insert_clear(&mut tx, &host, addr).await?;
    tx.commit().await?;
    st.wake.wake(&host);
    tracing::info!(%host, pci = %addr, %op, "GPU clear requested");
    let info = sqlx::query(&format!(
        "SELECT {} FROM operations WHERE id = $1",
        rows::OPERATION_COLS
    ))
    .bind(op.to_string())
    .fetch_one(&st.db.pool)
    .await?;
    let mut resp = accepted(rows::operation(&info)?);
    let note = match &req.note {
        Some(n) => format!("clear GPU {addr} ({health}): {n}"),
        None => format!("clear GPU {addr} ({health})"),
    };
    resp.extensions_mut().insert(AuditNote(note));
    Ok(resp)
}

/// Records the host operation (no account, no instance), unless a clear
/// of the same GPU is still under way.
async fn insert_clear(tx: &mut Tx, host: &HostId, pci: PciAddress) -> ApiResult<OperationId> {
    let busy = sqlx::query(
        "SELECT id FROM operations WHERE host_id = $1 AND kind = 'clear-gpu' AND \
         detail IN ($2, $3) AND state IN ('pending', 'running')",
    )
    .bind(host.to_string())
    .bind(OpDetail::ClearGpu { pci }.store())
    // Recorded before schema version 7.
    .bind(pci.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(r) = busy {
        return Err(ApiError::Conflict(format!(
            "a clear of GPU {pci} on host {host} is already under way (operation {})",
            col::<String>(&r, "id")?
        )));
    }
    let op = NewOp {
        id: OperationId::new(),
        account: None,
        host: Some(*host),
        instance: None,
        kind: gantry_proto::OperationKind::ClearGpu,
        detail: OpDetail::ClearGpu { pci },
    };
    crate::operations::create(tx, &op).await?;
    Ok(op.id)
}

async fn aliases(st: &AppState, alias: Option<&str>) -> ApiResult<Vec<GpuAlias>> {
    let found = sqlx::query(
        "SELECT alias, model FROM gpu_aliases WHERE $1 = '' OR alias = $1 ORDER BY alias, model",
    )
    .bind(alias.unwrap_or_default())
    .fetch_all(&st.db.pool)
    .await?;
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &found {
        by.entry(col(r, "alias")?)
            .or_default()
            .push(col(r, "model")?);
    }
    Ok(by
        .into_iter()
        .map(|(alias, models)| GpuAlias { alias, models })
        .collect())
}

/// `GET /v1/admin/gpu-aliases`.
async fn list_aliases(State(st): State<AppState>, who: Caller) -> ApiResult<Json<Vec<GpuAlias>>> {
    who.require_admin()?;
    Ok(Json(aliases(&st, None).await?))
}

fn check_alias(alias: &str, req: &SetGpuAlias) -> ApiResult<()> {
    validate::object_name("alias", alias)?;
    if req.models.is_empty() || req.models.len() > MAX_ALIAS_MODELS {
        return Err(ApiError::invalid(
            "models",
            format!("must list 1 to {MAX_ALIAS_MODELS} models"),
        ));
    }
    for (i, m) in req.models.iter().enumerate() {
        let field = format!("models[{i}]");
        crate::gpus::check_model(&field, m)?;
        if req.models[..i].contains(m) {
            return Err(ApiError::invalid(field, format!("{m:?} is listed twice")));
        }
    }
    Ok(())
}

/// `PUT /v1/admin/gpu-aliases/{alias}`: the alias's models become exactly
/// `models`.
async fn set_alias(
    State(st): State<AppState>,
    who: Caller,
    Path(alias): Path<String>,
    super::Body(req): super::Body<SetGpuAlias>,
) -> ApiResult<Response> {
    who.require_admin()?;
    check_alias(&alias, &req)?;
    let mut tx = st.db.begin_write().await?;
    sqlx::query("DELETE FROM gpu_aliases WHERE alias = $1")
        .bind(&alias)
        .execute(&mut *tx)
        .await?;
    for m in &req.models {
        sqlx::query("INSERT INTO gpu_aliases (alias, model) VALUES ($1, $2)")
            .bind(&alias)
            .bind(m)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let body = GpuAlias {
        alias: alias.clone(),
        models: aliases(&st, Some(&alias))
            .await?
            .pop()
            .map(|a| a.models)
            .unwrap_or_default(),
    };
    let mut resp = Json(body).into_response();
    resp.extensions_mut().insert(AuditNote(format!(
        "GPU alias {alias} = {}",
        req.models.join(" | ")
    )));
    Ok(resp)
}

/// `DELETE /v1/admin/gpu-aliases/{alias}`: `204`, or `404` when absent.
async fn delete_alias(
    State(st): State<AppState>,
    who: Caller,
    Path(alias): Path<String>,
) -> ApiResult<Response> {
    who.require_admin()?;
    let done = sqlx::query("DELETE FROM gpu_aliases WHERE alias = $1")
        .bind(&alias)
        .execute(&st.db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!("no GPU alias {alias:?}")));
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.extensions_mut()
        .insert(AuditNote(format!("GPU alias {alias} deleted")));
    Ok(resp)
}
