//! Instance actions (one or a batch) and the observed-state report.
//!
//! An action is checked against the instance's observed state with
//! [`InstanceState::check_action`], then recorded as the desired state plus
//! a pending operation (`202` with its id); the reconcile loop of the agent
//! protocol carries it to the host. A report moves the observed state
//! through [`InstanceState::transition`], keeps the billing clock, completes
//! the pending operation and frees a final instance's host resources.

use super::instances::{gate, load_in};
use super::{accepted, path_id, Body, Caller};
use crate::db::{now_ms, rows::InstanceRec, Tx};
use crate::error::{ApiError, ApiResult};
use crate::scheduler::{self, Need, PlaceError};
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use gantry_proto::api::v1::*;
use gantry_proto::ids::*;
use gantry_proto::{validate, Action, InstanceState};

/// Records an operation row.
pub(crate) async fn insert_op(
    tx: &mut Tx,
    op: OperationId,
    account: &AccountId,
    instance: Option<InstanceId>,
    kind: &str,
    detail: &str,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO operations (id, account_id, instance_id, kind, detail, state, created_ms, \
         updated_ms) VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6)",
    )
    .bind(op.to_string())
    .bind(account.to_string())
    .bind(instance.map(|i| i.to_string()))
    .bind(kind)
    .bind(detail)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Refuses any call on an instance that is busy or in the wrong state.
pub(crate) fn check(rec: &InstanceRec, action: Action) -> ApiResult<()> {
    gate(rec)?;
    rec.observed
        .check_action(action)
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    match rec.pending_op {
        Some(op) => Err(ApiError::Conflict(format!(
            "instance {} has a pending operation {op}; wait for it to finish",
            rec.id
        ))),
        None => Ok(()),
    }
}

/// Marks `rec` busy with `op` (if nobody else did meanwhile).
pub(crate) async fn claim(
    tx: &mut Tx,
    rec: &InstanceRec,
    op: OperationId,
    desired: InstanceState,
) -> ApiResult<()> {
    let done = sqlx::query(
        "UPDATE instances SET pending_op = $1, desired_state = $2 WHERE id = $3 \
         AND pending_op IS NULL AND observed_state = $4",
    )
    .bind(op.to_string())
    .bind(desired.name())
    .bind(rec.id.to_string())
    .bind(rec.observed.name())
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(ApiError::Conflict(format!(
            "instance {} changed while this call ran; try again",
            rec.id
        )));
    }
    Ok(())
}

async fn do_action(
    st: &AppState,
    who: &Caller,
    id: InstanceId,
    req: &InstanceAction,
) -> ApiResult<OperationId> {
    let action = req.action();
    let rec = load_in(&st.db.pool, who, id).await?;
    check(&rec, action)?;
    let desired = match action {
        Action::Start | Action::Reboot | Action::ForceReboot => InstanceState::Running,
        Action::Stop => InstanceState::Stopped,
        Action::Release => InstanceState::Released,
        _ => rec.observed,
    };
    let op = OperationId::new();
    let mut tx = st.db.begin_write().await?;
    claim(&mut tx, &rec, op, desired).await?;
    let detail = match req {
        InstanceAction::ChangeType { flavor } => {
            change_type(st, &mut tx, &rec, *flavor).await?;
            flavor.to_string()
        }
        InstanceAction::GrowDisk { root_disk_gib } => {
            grow_disk(st, &mut tx, &rec, *root_disk_gib).await?;
            root_disk_gib.to_string()
        }
        _ => String::new(),
    };
    insert_op(
        &mut tx,
        op,
        &rec.account,
        Some(rec.id),
        action.name(),
        &detail,
    )
    .await?;
    tx.commit().await?;
    Ok(op)
}

/// Moves the instance to another flavor on its host (it is Stopped).
async fn change_type(st: &AppState, tx: &mut Tx, rec: &InstanceRec, to: FlavorId) -> ApiResult<()> {
    let row = sqlx::query(&format!(
        "SELECT {} FROM flavors WHERE id = $1",
        crate::db::rows::FLAVOR_COLS
    ))
    .bind(to.to_string())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| ApiError::invalid("flavor", format!("no flavor {to}")))?;
    let f = crate::db::rows::flavor(&row)?;
    let host = rec
        .host
        .ok_or_else(|| ApiError::Conflict(format!("instance {} has no host", rec.id)))?;
    let disk = rec.root_disk_gib.max(f.root_disk_gib);
    scheduler::free(
        tx,
        &host,
        rec.id,
        rec.vcpus,
        rec.memory_mib,
        rec.root_disk_gib,
    )
    .await?;
    let need = Need {
        vcpus: f.vcpus,
        memory_mib: f.memory_mib,
        disk_gib: disk,
        gpu_model: f.gpu_model.clone(),
        gpu_count: f.gpu_count,
        placement: Placement::Pack,
    };
    match scheduler::reserve(tx, &host, rec.id, &need).await {
        Ok(_) => {}
        Err(PlaceError::Db(e)) => return Err(e.into()),
        Err(_) => {
            let _ = st;
            return Err(ApiError::Conflict(format!(
                "host {host} has no room for flavor {}; release and recreate the instance \
                 from a snapshot instead",
                f.name
            )));
        }
    }
    sqlx::query("UPDATE instances SET flavor_id = $1, root_disk_gib = $2 WHERE id = $3")
        .bind(to.to_string())
        .bind(disk as i64)
        .bind(rec.id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn grow_disk(st: &AppState, tx: &mut Tx, rec: &InstanceRec, gib: u64) -> ApiResult<()> {
    let lo = (rec.root_disk_gib + 1).max(st.cfg.min_root_disk_gib);
    validate::in_range("root_disk_gib", gib, lo, gantry_proto::spec::MAX_DISK_GIB)?;
    let host = rec
        .host
        .ok_or_else(|| ApiError::Conflict(format!("instance {} has no host", rec.id)))?;
    let more = (gib - rec.root_disk_gib) as i64;
    let done = sqlx::query(
        "UPDATE hosts SET used_disk_gib = used_disk_gib + $1 WHERE id = $2 \
         AND disk_gib - used_disk_gib >= $1",
    )
    .bind(more)
    .bind(host.to_string())
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(ApiError::Conflict(format!(
            "host {host} has less than {more} GiB of disk free"
        )));
    }
    sqlx::query("UPDATE instances SET root_disk_gib = $1 WHERE id = $2")
        .bind(gib as i64)
        .bind(rec.id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// `POST /v1/instances/{id}/actions`.
pub async fn act(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<InstanceAction>,
) -> ApiResult<Response> {
    let id: InstanceId = path_id(&id, "instance")?;
    let op = do_action(&st, &who, id, &req).await?;
    Ok(accepted(
        serde_json::json!({ "instance": id, "operation": op }),
    ))
}

/// `POST /v1/instances/batch`: one result per instance, in request order.
pub async fn batch(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<BatchAction>,
) -> ApiResult<Json<Vec<BatchResult>>> {
    if req.instances.is_empty() || req.instances.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "instances",
            format!("must list 1 to {MAX_BATCH} instances"),
        ));
    }
    let mut out = Vec::with_capacity(req.instances.len());
    for (i, id) in req.instances.iter().enumerate() {
        if req.instances[..i].contains(id) {
            return Err(ApiError::invalid(
                format!("instances[{i}]"),
                format!("{id} is listed twice"),
            ));
        }
    }
    for id in &req.instances {
        out.push(match do_action(&st, &who, *id, &req.request).await {
            Ok(op) => BatchResult {
                instance: *id,
                status: 202,
                operation: Some(op),
                error: None,
            },
            Err(e) => BatchResult {
                instance: *id,
                status: e.status().as_u16(),
                operation: None,
                error: Some(e.to_string()),
            },
        });
    }
    Ok(Json(out))
}

/// `POST /v1/admin/instances/{id}/observed`: the state a host reports.
pub async fn report(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<ReportState>,
) -> ApiResult<Json<InstanceSummary>> {
    who.require_admin()?;
    let id: InstanceId = path_id(&id, "instance")?;
    let mut tx = st.db.begin_write().await?;
    let rec = load_in(&mut *tx, &who, id).await?;
    let to = req.state;
    if to != rec.observed {
        rec.observed
            .transition(to)
            .map_err(|e| ApiError::Conflict(e.to_string()))?;
    }
    let now = now_ms();
    let (billed, since) = match (
        rec.observed == InstanceState::Running,
        to == InstanceState::Running,
    ) {
        (true, false) => (rec.billed_ms_at(now), None),
        (false, true) => (rec.billed_ms, Some(now)),
        _ => (rec.billed_ms, rec.running_since_ms),
    };
    // The pending operation is done once the instance stops moving.
    let settles = to.is_final()
        || matches!(
            to,
            InstanceState::Running | InstanceState::Stopped | InstanceState::Suspended
        );
    let pending = if settles { None } else { rec.pending_op };
    sqlx::query(
        "UPDATE instances SET observed_state = $1, state_since_ms = $2, billed_ms = $3, \
         running_since_ms = $4, pending_op = $5 WHERE id = $6",
    )
    .bind(to.name())
    .bind(if to != rec.observed {
        now
    } else {
        rec.state_since_ms
    })
    .bind(billed)
    .bind(since)
    .bind(pending.map(|p| p.to_string()))
    .bind(id.to_string())
    .execute(&mut *tx)
    .await?;
    if let (Some(op), true) = (rec.pending_op, settles) {
        let (state, err) = if to == InstanceState::Failed {
            ("failed", Some(format!("the instance went to {to}")))
        } else {
            ("succeeded", None)
        };
        sqlx::query("UPDATE operations SET state = $1, progress = 100, error = $2, updated_ms = $3 WHERE id = $4")
            .bind(state)
            .bind(err)
            .bind(now)
            .bind(op.to_string())
            .execute(&mut *tx)
            .await?;
    }
    if to.is_final() && !rec.observed.is_final() {
        if let Some(h) = &rec.host {
            scheduler::free(&mut tx, h, id, rec.vcpus, rec.memory_mib, rec.root_disk_gib).await?;
        }
        sqlx::query("DELETE FROM port_forwards WHERE instance_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE volumes SET instance_id = NULL WHERE instance_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let rec = load_in(&st.db.pool, &who, id).await?;
    Ok(Json(super::instances::summary(&rec, now_ms())))
}
