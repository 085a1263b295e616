//! Instance actions (one or a batch) and applying observed states.
//!
//! An action is checked against the instance's observed state with
//! [`InstanceState::check_action`], then recorded as the desired state plus
//! a pending operation (`202` with its id) for the instance's host, whose
//! work long-poll is woken. The agent reports the operation's outcome
//! (`api::agent`); observed states arrive through [`apply_observed`].

use super::instances::{gate, load_in};
use super::{accepted, path_id, Body, Caller};
use crate::db::{now_ms, rows::InstanceRec, Tx};
use crate::error::{ApiError, ApiResult};
use crate::operations::{NewOp, OpDetail};
use crate::scheduler;
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use gantry_proto::api::v1::*;
use gantry_proto::ids::*;
use gantry_proto::{validate, Action, InstanceState, OperationKind};

/// Refuses a call on an instance that is busy with an operation.
pub(crate) fn check_idle(rec: &InstanceRec) -> ApiResult<()> {
    gate(rec)?;
    match rec.pending_op {
        Some(op) => Err(ApiError::Conflict(format!(
            "instance {} has a pending operation {op}; wait for it to finish",
            rec.id
        ))),
        None => Ok(()),
    }
}

/// Refuses any call on an instance that is busy or in the wrong state.
pub(crate) fn check(rec: &InstanceRec, action: Action) -> ApiResult<()> {
    gate(rec)?;
    if super::instances::releasing(rec) {
        return Err(ApiError::Conflict(format!(
            "instance {} is being released (asked with its snapshot); it reads Released once              its host has released it",
            rec.id
        )));
    }
    rec.observed
        .check_action(action)
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    if super::instances::host_down(rec) && action != Action::Release {
        return Err(ApiError::Conflict(format!(
            "the host of instance {} is down (no heartbeat since {}); it can only be released \
             until the host returns",
            rec.id,
            crate::db::to_time(rec.host_down_since_ms.unwrap_or_default())
        )));
    }
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
    if matches!(action, Action::Start | Action::Resume) {
        crate::billing::require_credit(st, &rec.account, "starting instances").await?;
    }
    let desired = match action {
        Action::Start | Action::Resume | Action::Reboot | Action::ForceReboot => {
            InstanceState::Running
        }
        Action::Stop => InstanceState::Stopped,
        Action::Suspend => InstanceState::Suspended,
        Action::Release => InstanceState::Released,
        _ => rec.observed,
    };
    let op = OperationId::new();
    let mut tx = st.db.begin_write().await?;
    claim(&mut tx, &rec, op, desired).await?;
    if let (Action::Release, Some(last)) = (action, rec.host_down_since_ms) {
        // Billing stops at the last heartbeat that proved it running.
        close_billing(&mut tx, &rec, last).await?;
    }
    let detail = match req {
        // What undoing the change needs if the host fails it.
        InstanceAction::ChangeType { flavor } => {
            super::change_type::change_type(&mut tx, &rec, *flavor).await?
        }
        InstanceAction::GrowDisk { root_disk_gib } => {
            grow_disk(st, &mut tx, &rec, *root_disk_gib).await?;
            OpDetail::GrowDisk {
                root_disk_gib: *root_disk_gib,
                old_root_disk_gib: rec.root_disk_gib,
            }
        }
        _ => OpDetail::None,
    };
    let new = NewOp::on(&rec, op, OperationKind::for_action(action), detail);
    crate::operations::create(&mut tx, &new).await?;
    gantry_crashpoint::hit("controller.action.before_commit");
    tx.commit().await?;
    gantry_crashpoint::hit("controller.action.after_commit");
    if let Some(h) = &rec.host {
        st.wake.wake(h);
    }
    Ok(op)
}

/// No usage of `rec` after `at_ms` is charged (its host is down and it is
/// being released: the host may only report it when it returns).
pub(crate) async fn close_billing(tx: &mut Tx, rec: &InstanceRec, at_ms: i64) -> ApiResult<()> {
    sqlx::query(
        "UPDATE instances SET billing_closed_ms = $1 WHERE id = $2 AND billing_closed_ms IS NULL",
    )
    .bind(at_ms)
    .bind(rec.id.to_string())
    .execute(&mut **tx)
    .await?;
    tracing::info!(instance = %rec.id, "released on a down host; billing closed at its last heartbeat");
    Ok(())
}

/// Undoes the records of a `change-type` or `grow-disk` the host could not
/// carry out: the old flavor and disk size, and the host capacity they
/// hold.
pub(crate) async fn undo_resize(
    tx: &mut Tx,
    rec: &InstanceRec,
    detail: &OpDetail,
) -> ApiResult<()> {
    let Some(host) = rec.host else {
        return Ok(());
    };
    match detail {
        OpDetail::GrowDisk {
            root_disk_gib,
            old_root_disk_gib,
        } => {
            let (new, old) = (*root_disk_gib as i64, *old_root_disk_gib as i64);
            if new <= old || rec.root_disk_gib as i64 != new {
                return Ok(());
            }
            sqlx::query("UPDATE hosts SET used_disk_gib = used_disk_gib - $1 WHERE id = $2")
                .bind(new - old)
                .bind(host.to_string())
                .execute(&mut **tx)
                .await?;
            sqlx::query("UPDATE instances SET root_disk_gib = $1 WHERE id = $2")
                .bind(old)
                .bind(rec.id.to_string())
                .execute(&mut **tx)
                .await?;
        }
        OpDetail::ChangeType {
            old_flavor,
            old_root_disk_gib,
            old_gpus,
            ..
        } => super::change_type::undo(tx, rec, old_flavor, *old_root_disk_gib, old_gpus).await?,
        _ => {}
    }
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

/// The action names, as the API spells them.
const ACTIONS: &[&str] = &[
    "start",
    "stop",
    "reboot",
    "force-reboot",
    "suspend",
    "resume",
    "change-type",
    "grow-disk",
    "release",
];

/// Parses an action body (`{"action": "stop"}`), naming the field to blame
/// on every error, under `prefix` (`""`, or `"request."` in a batch): an
/// unknown or missing action names `action`, a bad value names the
/// action's own field (`flavor`, `root_disk_gib`).
fn parse_action(v: serde_json::Value, prefix: &str) -> ApiResult<InstanceAction> {
    let field = |name: &str| format!("{prefix}{name}");
    let list = ACTIONS.join(", ");
    let name = match v.get("action") {
        Some(serde_json::Value::String(a)) if ACTIONS.contains(&a.as_str()) => a.clone(),
        Some(other) => {
            let f = field("action");
            return Err(ApiError::bad(
                &f,
                format!("{f}: unknown action {other} (one of {list})"),
            ));
        }
        None => {
            let f = field("action");
            return Err(ApiError::bad(
                &f,
                format!(
                    "{f}: missing; a JSON object such as {{\"action\": \"stop\"}} (one of {list})"
                ),
            ));
        }
    };
    serde_json::from_value(v).map_err(|e| {
        let msg = e.to_string();
        let named = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|p| msg.strip_prefix(p).and_then(|r| r.split('`').next()));
        let own = match name.as_str() {
            "change-type" => "flavor",
            "grow-disk" => "root_disk_gib",
            _ => "action",
        };
        let f = field(named.unwrap_or(own));
        ApiError::bad(&f, format!("{f}: {msg}"))
    })
}

/// `POST /v1/instances/batch` as it arrives: the action is parsed by
/// [`parse_action`] so its errors name `request.<field>`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    instances: Vec<InstanceId>,
    request: serde_json::Value,
}

/// `POST /v1/instances/{id}/actions`.
pub async fn act(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(raw): Body<serde_json::Value>,
) -> ApiResult<Response> {
    let req = parse_action(raw, "")?;
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
    Body(raw): Body<RawBatch>,
) -> ApiResult<Json<Vec<BatchResult>>> {
    let req = BatchAction {
        request: parse_action(raw.request, "request.")?,
        instances: raw.instances,
    };
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

/// Applies a state the instance's host observed (heartbeat or operation
/// report) through [`InstanceState::observe`]; an impossible report (e.g.
/// Released -> Running) is logged and ignored. Reaching Released or Failed
/// gives the host resources, address, ports and volume back. Returns
/// whether the host's forwards changed (its long poll is to be woken).
pub(crate) async fn apply_observed(
    tx: &mut Tx,
    rec: &InstanceRec,
    to: InstanceState,
) -> Result<bool, crate::db::DbError> {
    if to == rec.observed {
        return Ok(false);
    }
    if let Err(e) = rec.observed.observe(to) {
        tracing::warn!(instance = %rec.id, error = %e, "ignoring an observed state");
        return Ok(false);
    }
    sqlx::query(
        "UPDATE instances SET observed_state = $1, state_since_ms = $2 WHERE id = $3 \
         AND observed_state = $4",
    )
    .bind(to.name())
    .bind(now_ms())
    .bind(rec.id.to_string())
    .bind(rec.observed.name())
    .execute(&mut **tx)
    .await?;
    if to.is_final() && !rec.observed.is_final() {
        return release_resources(tx, rec).await;
    }
    Ok(false)
}

/// Gives back what a final instance held: capacity, GPUs, address, ports,
/// network-group membership, volume. Returns whether the host's forwards changed.
pub(crate) async fn release_resources(
    tx: &mut Tx,
    rec: &InstanceRec,
) -> Result<bool, crate::db::DbError> {
    let id = rec.id.to_string();
    if let Some(h) = &rec.host {
        scheduler::free(tx, h, rec.id, rec.vcpus, rec.memory_mib, rec.root_disk_gib).await?;
    }
    let changed = crate::access::release(tx, rec.host.as_ref(), rec.id).await?;
    // Its network-group address too (the group's hosts are woken).
    crate::groups::leave(tx, rec.id).await?;
    sqlx::query("UPDATE volumes SET instance_id = NULL WHERE instance_id = $1")
        .bind(&id)
        .execute(&mut **tx)
        .await?;
    gantry_crashpoint::hit("controller.release.resources_freed");
    Ok(changed)
}
