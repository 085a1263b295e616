//! Data volumes: create, list, get, grow (one or a batch), delete; where
//! a volume lives and what it books.
//!
//! A volume is placed on a host (`volumes.host_id`) when it is first
//! attached (the instance created with it is placed with room for both)
//! or at creation when the request names a host or an instance; from then
//! on its GiB count in the host's `used_disk_gib` until it is deleted,
//! attached or not, and it is billed as storage (`crate::volume_meter`).
//! An instance created with a placed volume runs on the volume's host
//! ([`plan`], [`attach`]); moving a volume is not done here.
//!
//! Grow and delete are operations for the volume's host
//! (`crate::operations`), marked on the volume (`volumes.pending_op`) so
//! that it is neither attached nor changed meanwhile: a grow books the
//! extra GiB on the host at once (a conditional update) and gives them
//! back when the host fails it ([`undo`]); a delete stops billing at once
//! and the row goes when the host reports the file gone ([`settled`]). A
//! volume that never reached a host is deleted or grown in its row alone.

use super::{accepted, created, path_id, Body, Caller};
use crate::db::{is_unique_violation, now_ms, rows, DbError, Tx};
use crate::error::{ApiError, ApiResult};
use crate::operations::{NewOp, OpDetail, OpRow};
use crate::scheduler::Need;
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_proto::api::v1::*;
use gantry_proto::ids::*;
use gantry_proto::{validate, Action, OperationKind};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/volumes", post(create_volume).get(list_volumes))
        .route("/volumes/grow", post(grow_batch))
        .route("/volumes/{id}", get(get_volume).delete(delete_volume))
        .route("/volumes/{id}/grow", post(grow))
}

/// Loads a host's placement facts: whether it exists, is down or revoked.
async fn host_state(tx: &mut Tx, host: &HostId) -> ApiResult<()> {
    let row = sqlx::query("SELECT down_since_ms, revoked_ms FROM hosts WHERE id = $1")
        .bind(host.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| ApiError::invalid("host", format!("no host {host}")))?;
    let down: Option<i64> = crate::db::col(&row, "down_since_ms")?;
    let revoked: Option<i64> = crate::db::col(&row, "revoked_ms")?;
    if down.is_some() || revoked.is_some() {
        return Err(ApiError::Conflict(format!(
            "host {host} is down; its volumes cannot change until it returns"
        )));
    }
    Ok(())
}

/// Books `gib` more GiB of disk on `host` (a conditional update).
async fn book(tx: &mut Tx, host: &HostId, gib: u64) -> ApiResult<()> {
    let done = sqlx::query(
        "UPDATE hosts SET used_disk_gib = used_disk_gib + $1 WHERE id = $2 \
         AND disk_gib - used_disk_gib >= $1",
    )
    .bind(gib as i64)
    .bind(host.to_string())
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(ApiError::Conflict(format!(
            "host {host} has less than {gib} GiB of disk free"
        )));
    }
    Ok(())
}

/// Gives `gib` GiB of disk on `host` back.
async fn unbook(tx: &mut Tx, host: &str, gib: i64) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE hosts SET used_disk_gib = CASE WHEN used_disk_gib >= $1 \
         THEN used_disk_gib - $1 ELSE 0 END WHERE id = $2",
    )
    .bind(gib)
    .bind(host)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// `POST /v1/volumes`: a volume of the account, placed at once on the
/// named host (admins) or the named instance's host, else when it is
/// first attached.
async fn create_volume(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<CreateVolume>,
) -> ApiResult<Response> {
    let account = super::owner_for(&who, req.account)?;
    validate::object_name("name", &req.name)?;
    super::accounts::require_active(&st, &account).await?;
    validate::in_range(
        "size_gib",
        req.size_gib,
        1,
        gantry_proto::spec::MAX_DISK_GIB,
    )?;
    super::admin::load_account(&st, &account)
        .await
        .map_err(|_| ApiError::invalid("account", format!("no account {account}")))?;
    let host = match (req.host, req.instance) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "host",
                "give at most one of host and instance",
            ))
        }
        (Some(_), None) if !who.is_admin() => {
            return Err(ApiError::invalid(
                "host",
                "only admins place a volume on a named host; name an instance instead",
            ))
        }
        (Some(h), None) => Some(h),
        (None, Some(i)) => {
            let rec = super::instances::load_in(&st.db.pool, &who, i).await?;
            if rec.account != account || rec.observed.is_final() || rec.host.is_none() {
                return Err(ApiError::invalid(
                    "instance",
                    format!("instance {i} of this account is not on a host"),
                ));
            }
            rec.host
        }
        (None, None) => None,
    };
    let id = VolumeId::new();
    let mut tx = st.db.begin_write().await?;
    if let Some(h) = &host {
        host_state(&mut tx, h).await?;
        book(&mut tx, h, req.size_gib).await?;
    }
    let res = sqlx::query(
        "INSERT INTO volumes (id, account_id, name, size_gib, settled_gib, host_id, created_ms) \
         VALUES ($1, $2, $3, $4, $4, $5, $6)",
    )
    .bind(id.to_string())
    .bind(account.to_string())
    .bind(&req.name)
    .bind(req.size_gib as i64)
    .bind(host.map(|h| h.to_string()))
    .bind(now_ms())
    .execute(&mut *tx)
    .await;
    match res {
        Err(e) if is_unique_violation(&e) => {
            return Err(ApiError::Conflict(format!(
                "a volume named {:?} already exists in this account",
                req.name
            )))
        }
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    if host.is_some() {
        crate::volume_meter::sync(&mut tx, &account, st.clock.now_ms()).await?;
    }
    tx.commit().await?;
    Ok(created(load_volume(&st, &who, id).await?))
}

async fn load_volume(st: &AppState, who: &Caller, id: VolumeId) -> ApiResult<VolumeInfo> {
    let not_found = || ApiError::NotFound(format!("no volume {id}"));
    let row = sqlx::query(&format!(
        "SELECT {} FROM volumes WHERE id = $1",
        rows::VOLUME_COLS
    ))
    .bind(id.to_string())
    .fetch_optional(&st.db.pool)
    .await?
    .ok_or_else(not_found)?;
    let v = rows::volume(&row)?;
    if !who.can_see(&v.account) {
        return Err(not_found());
    }
    Ok(v)
}

async fn list_volumes(State(st): State<AppState>, who: Caller) -> ApiResult<Json<Vec<VolumeInfo>>> {
    let sql = format!(
        "SELECT {} FROM volumes WHERE $1 = '' OR account_id = $1 ORDER BY created_ms, id",
        rows::VOLUME_COLS
    );
    let found = sqlx::query(&sql)
        .bind(who.account.map(|a| a.to_string()).unwrap_or_default())
        .fetch_all(&st.db.pool)
        .await?;
    Ok(Json(
        found.iter().map(rows::volume).collect::<Result<_, _>>()?,
    ))
}

async fn get_volume(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<VolumeInfo>> {
    Ok(Json(load_volume(&st, &who, path_id(&id, "volume")?).await?))
}

/// Refuses a change to a volume that waits for an operation.
fn idle(v: &VolumeInfo) -> ApiResult<()> {
    match (v.deleting, v.operation) {
        (true, _) => Err(ApiError::Conflict(format!(
            "volume {} is being deleted",
            v.id
        ))),
        (false, Some(op)) => Err(ApiError::Conflict(format!(
            "volume {} waits for operation {op}; wait for it to finish",
            v.id
        ))),
        (false, None) => Ok(()),
    }
}

/// `DELETE /v1/volumes/{id}`: a detached volume. One that never reached a
/// host goes at once (`200`); else a `delete-volume` operation for its
/// host (`202`, the volume with its operation): billing stops now and the
/// row goes when the host has deleted the file. An attached volume is
/// `409`.
async fn delete_volume(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let v = load_volume(&st, &who, path_id(&id, "volume")?).await?;
    if let Some(i) = v.instance {
        return Err(ApiError::Conflict(format!(
            "volume {} is attached to instance {i}; release the instance first",
            v.id
        )));
    }
    idle(&v)?;
    let changed = || ApiError::Conflict(format!("volume {} changed meanwhile; retry", v.id));
    let mut tx = st.db.begin_write().await?;
    let Some(host) = v.host else {
        let done = sqlx::query(
            "DELETE FROM volumes WHERE id = $1 AND instance_id IS NULL AND host_id IS NULL \
             AND pending_op IS NULL",
        )
        .bind(v.id.to_string())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(changed());
        }
        tx.commit().await?;
        return Ok(Json(v).into_response());
    };
    let op = OperationId::new();
    let done = sqlx::query(
        "UPDATE volumes SET pending_op = $1, deleting = 1 WHERE id = $2 AND instance_id IS NULL \
         AND pending_op IS NULL AND host_id = $3",
    )
    .bind(op.to_string())
    .bind(v.id.to_string())
    .bind(host.to_string())
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(changed());
    }
    let new = NewOp {
        id: op,
        account: Some(v.account),
        host: Some(host),
        instance: None,
        kind: OperationKind::DeleteVolume,
        detail: OpDetail::DeleteVolume { volume: v.id },
    };
    crate::operations::create(&mut tx, &new).await?;
    crate::volume_meter::sync(&mut tx, &v.account, st.clock.now_ms()).await?;
    tx.commit().await?;
    st.wake.wake(&host);
    Ok(accepted(load_volume(&st, &who, v.id).await?))
}

/// Checks the new size of volume `v`: larger than it is (volumes never
/// shrink), at least `min_volume_gib`, at most the largest disk.
fn check_size(st: &AppState, v: &VolumeInfo, size_gib: u64) -> ApiResult<()> {
    if size_gib <= v.size_gib {
        return Err(ApiError::invalid(
            "size_gib",
            format!(
                "must be larger than the volume's {} GiB (volumes never shrink)",
                v.size_gib
            ),
        ));
    }
    validate::in_range(
        "size_gib",
        size_gib,
        st.cfg.min_volume_gib,
        gantry_proto::spec::MAX_DISK_GIB,
    )?;
    Ok(())
}

/// Grows volume `id` to `size_gib`: the operation, or `None` when the
/// volume never reached a host (its row alone changes).
async fn do_grow(
    st: &AppState,
    who: &Caller,
    id: VolumeId,
    size_gib: u64,
) -> ApiResult<Option<OperationId>> {
    let v = load_volume(st, who, id).await?;
    idle(&v)?;
    check_size(st, &v, size_gib)?;
    let changed = || ApiError::Conflict(format!("volume {id} changed meanwhile; retry"));
    let mut tx = st.db.begin_write().await?;
    let Some(host) = v.host else {
        let done = sqlx::query(
            "UPDATE volumes SET size_gib = $1, settled_gib = $1 WHERE id = $2 AND size_gib = $3 \
             AND host_id IS NULL AND pending_op IS NULL",
        )
        .bind(size_gib as i64)
        .bind(id.to_string())
        .bind(v.size_gib as i64)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(changed());
        }
        tx.commit().await?;
        return Ok(None);
    };
    host_state(&mut tx, &host).await?;
    let op = OperationId::new();
    // An attached volume grows through its instance (live when it runs):
    // the instance is busy with the operation meanwhile.
    let rec = match v.instance {
        Some(i) => {
            let rec = super::instances::load_in(&st.db.pool, who, i).await?;
            super::actions::check(&rec, Action::GrowDisk)?;
            super::actions::claim(&mut tx, &rec, op, rec.observed).await?;
            Some(rec)
        }
        None => None,
    };
    book(&mut tx, &host, size_gib - v.size_gib).await?;
    let done = sqlx::query(
        "UPDATE volumes SET size_gib = $1, pending_op = $2 WHERE id = $3 AND size_gib = $4 \
         AND pending_op IS NULL AND host_id = $5",
    )
    .bind(size_gib as i64)
    .bind(op.to_string())
    .bind(id.to_string())
    .bind(v.size_gib as i64)
    .bind(host.to_string())
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(changed());
    }
    let new = NewOp {
        id: op,
        account: Some(v.account),
        host: Some(host),
        instance: rec.map(|r| r.id),
        kind: OperationKind::GrowVolume,
        detail: OpDetail::GrowVolume {
            volume: id,
            size_gib,
            old_size_gib: v.size_gib,
        },
    };
    crate::operations::create(&mut tx, &new).await?;
    tx.commit().await?;
    st.wake.wake(&host);
    Ok(Some(op))
}

/// `POST /v1/volumes/{id}/grow`: `202` with the volume and its
/// `grow-volume` operation (`200` for a volume on no host yet).
async fn grow(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<GrowVolume>,
) -> ApiResult<Response> {
    let id: VolumeId = path_id(&id, "volume")?;
    let op = do_grow(&st, &who, id, req.size_gib).await?;
    let v = load_volume(&st, &who, id).await?;
    Ok(match op {
        Some(_) => accepted(v),
        None => Json(v).into_response(),
    })
}

/// `POST /v1/volumes/grow`: one result per volume, in request order.
async fn grow_batch(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<BatchGrowVolumes>,
) -> ApiResult<Json<Vec<VolumeBatchResult>>> {
    if req.volumes.is_empty() || req.volumes.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "volumes",
            format!("must list 1 to {MAX_BATCH} volumes"),
        ));
    }
    for (i, id) in req.volumes.iter().enumerate() {
        if req.volumes[..i].contains(id) {
            return Err(ApiError::invalid(
                format!("volumes[{i}]"),
                format!("{id} is listed twice"),
            ));
        }
    }
    let mut out = Vec::with_capacity(req.volumes.len());
    for id in &req.volumes {
        out.push(match do_grow(&st, &who, *id, req.size_gib).await {
            Ok(op) => VolumeBatchResult {
                volume: *id,
                status: if op.is_some() { 202 } else { 200 },
                operation: op,
                error: None,
            },
            Err(ApiError::Db(e)) => return Err(e.into()),
            Err(e) => VolumeBatchResult {
                volume: *id,
                status: e.status().as_u16(),
                operation: None,
                error: Some(e.to_string()),
            },
        });
    }
    Ok(Json(out))
}

/// Where an instance created with a data volume must go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub volume: VolumeId,
    /// The volume's host; `None`: the volume is placed with the instance.
    pub host: Option<HostId>,
}

/// Reads the data volume an instance is to be created with and fits
/// `need` to it: only the volume's host when it has one (`409` when the
/// instance is pinned elsewhere), else room for the volume too.
pub(crate) async fn plan(
    st: &AppState,
    account: &AccountId,
    volume: VolumeId,
    need: &mut Need,
) -> ApiResult<Plan> {
    let row = sqlx::query(&format!(
        "SELECT {} FROM volumes WHERE id = $1 AND account_id = $2",
        rows::VOLUME_COLS
    ))
    .bind(volume.to_string())
    .bind(account.to_string())
    .fetch_optional(&st.db.pool)
    .await?
    .ok_or_else(|| ApiError::invalid("data_volume", format!("no volume {volume}")))?;
    let v = rows::volume(&row)?;
    if let Some(i) = v.instance {
        return Err(ApiError::invalid(
            "data_volume",
            format!("volume {volume} is attached to instance {i}"),
        ));
    }
    idle(&v).map_err(|e| ApiError::invalid("data_volume", e.to_string()))?;
    match (v.host, need.host) {
        (Some(h), Some(pin)) if h != pin => {
            return Err(ApiError::Conflict(format!(
                "volume {volume} is on host {h} but this instance must be created on host \
                 {pin} (where its snapshot is); moving volumes between hosts is not supported yet"
            )))
        }
        (Some(h), _) => need.host = Some(h),
        (None, _) => need.disk_gib += v.size_gib,
    }
    Ok(Plan {
        volume,
        host: v.host,
    })
}

/// The sentence for an instance that cannot go where its volume is.
pub(crate) fn cannot_place(plan: &Plan, why: &str) -> String {
    format!(
        "{why}; data volume {} lives on that host, so an instance using it must run there \
         (moving volumes between hosts is not supported yet)",
        plan.volume
    )
}

/// Attaches the planned volume to instance `id` placed on `host` (and
/// places it there if it had no host): a conditional update, so a volume
/// that changed since [`plan`] is refused. Returns whether it was newly
/// placed (its account's meter is then to be synced).
pub(crate) async fn attach(
    tx: &mut Tx,
    plan: &Plan,
    account: &AccountId,
    id: InstanceId,
    host: &HostId,
) -> ApiResult<bool> {
    let sql = match plan.host {
        Some(_) => {
            "UPDATE volumes SET instance_id = $1 WHERE id = $2 AND account_id = $3 \
             AND instance_id IS NULL AND pending_op IS NULL AND host_id = $4"
        }
        None => {
            "UPDATE volumes SET instance_id = $1, host_id = $4 WHERE id = $2 \
             AND account_id = $3 AND instance_id IS NULL AND pending_op IS NULL \
             AND host_id IS NULL"
        }
    };
    let done = sqlx::query(sql)
        .bind(id.to_string())
        .bind(plan.volume.to_string())
        .bind(account.to_string())
        .bind(host.to_string())
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() != 1 {
        return Err(ApiError::Conflict(format!(
            "volume {} was attached, placed or changed by another request meanwhile; retry",
            plan.volume
        )));
    }
    Ok(plan.host.is_none())
}

/// The volume `op` is about, with its account, host and sizes, when the
/// volume still waits for it.
async fn waiting(tx: &mut Tx, op: &OpRow, v: VolumeId) -> Result<Option<Waiting>, DbError> {
    let row = sqlx::query(
        "SELECT account_id, host_id, size_gib FROM volumes WHERE id = $1 AND pending_op = $2",
    )
    .bind(v.to_string())
    .bind(op.id.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(Waiting {
        host: crate::db::col(&r, "host_id")?,
        size_gib: crate::db::col(&r, "size_gib")?,
    }))
}

struct Waiting {
    host: Option<String>,
    size_gib: i64,
}

/// A volume operation succeeded (its host reported it, or an admin
/// settled a deletion whose host is gone): a grown volume's new size is
/// settled (billed from the next meter tick); a deleted volume's row goes
/// and its host's disk is given back. From `operations::finish`.
pub(crate) async fn settled(tx: &mut Tx, op: &OpRow) -> Result<(), DbError> {
    match &op.detail {
        OpDetail::GrowVolume { volume, .. } => {
            sqlx::query(
                "UPDATE volumes SET settled_gib = size_gib, pending_op = NULL \
                 WHERE id = $1 AND pending_op = $2",
            )
            .bind(volume.to_string())
            .bind(op.id.to_string())
            .execute(&mut **tx)
            .await?;
        }
        OpDetail::DeleteVolume { volume } => {
            let Some(w) = waiting(tx, op, *volume).await? else {
                return Ok(());
            };
            sqlx::query("DELETE FROM volumes WHERE id = $1 AND pending_op = $2")
                .bind(volume.to_string())
                .bind(op.id.to_string())
                .execute(&mut **tx)
                .await?;
            if let Some(h) = w.host {
                unbook(tx, &h, w.size_gib).await?;
            }
            tracing::info!(volume = %volume, "volume deleted on its host");
        }
        _ => {}
    }
    Ok(())
}

/// A volume operation failed or timed out: a grow gives the extra GiB
/// back and the volume its old size; a deletion leaves the volume as it
/// was (billed again from the next meter tick). From `operations::finish`.
pub(crate) async fn undo(tx: &mut Tx, op: &OpRow) -> Result<(), DbError> {
    match &op.detail {
        OpDetail::GrowVolume {
            volume,
            size_gib,
            old_size_gib,
        } => {
            let Some(w) = waiting(tx, op, *volume).await? else {
                return Ok(());
            };
            if let (Some(h), true) = (&w.host, w.size_gib == *size_gib as i64) {
                unbook(tx, h, (*size_gib - old_size_gib.min(size_gib)) as i64).await?;
            }
            sqlx::query(
                "UPDATE volumes SET size_gib = $1, settled_gib = $1, pending_op = NULL \
                 WHERE id = $2 AND pending_op = $3",
            )
            .bind(*old_size_gib as i64)
            .bind(volume.to_string())
            .bind(op.id.to_string())
            .execute(&mut **tx)
            .await?;
        }
        OpDetail::DeleteVolume { volume } => {
            sqlx::query(
                "UPDATE volumes SET pending_op = NULL, deleting = 0 WHERE id = $1 \
                 AND pending_op = $2",
            )
            .bind(volume.to_string())
            .bind(op.id.to_string())
            .execute(&mut **tx)
            .await?;
        }
        _ => {}
    }
    Ok(())
}
