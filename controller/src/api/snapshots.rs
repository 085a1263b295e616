//! Snapshots (create with every refusal named, list, get, delete). A snapshot of a Running or Stopped
//! instance starts as `Creating` with a `snapshot` operation for the
//! instance's host and a quota reservation (`crate::snapshots`); the
//! agent's reports of that operation show its progress and settle it
//! (`api::commands`). Deleting a stored snapshot asks its host to remove
//! it from its store.

use super::instances::load;
use super::{path_id, query, Body, Caller};
use crate::db::{is_unique_violation, now_ms, rows, rows::InstanceRec, Tx};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_proto::api::v1::*;
use gantry_proto::ids::*;
use gantry_proto::{validate, Action, InstanceState, SnapshotStatus};
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/instances/{id}/snapshots", post(create))
        .route("/snapshots", get(list))
        .route("/snapshots/{id}", get(get_one).delete(delete))
}

/// `POST /v1/instances/{id}/snapshots`: a Running or Stopped instance (a
/// stopped one is saved from its disk as it is and stays Stopped), a
/// complete billing profile, credit, and quota for the reservation.
async fn create(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<CreateSnapshot>,
) -> ApiResult<Response> {
    let rec = load(&st, &who, &id).await?;
    validate::snapshot_name("name", &req.name)?;
    validate::free_text("description", &req.description, 500)?;
    super::actions::check(&rec, Action::Snapshot)?;
    let acct = super::admin::load_account(&st, &rec.account).await?;
    if !acct.billing_profile_complete {
        return Err(ApiError::PaymentRequired(format!(
            "account {} has no complete billing profile; complete it before taking snapshots",
            acct.name
        )));
    }
    crate::billing::require_credit(&st, &rec.account, "taking snapshots").await?;
    let sid = SnapshotId::new();
    let op = OperationId::new();
    let need = crate::snapshots::reservation(rec.root_disk_gib);
    let mut tx = st.db.begin_write().await?;
    // A stopped instance stays stopped; auto-release ends it.
    let desired = if req.auto_release {
        InstanceState::Released
    } else {
        rec.observed
    };
    super::actions::claim(&mut tx, &rec, op, desired).await?;
    // The instance row, then the account row: see `crate::snapshots`.
    let acct = crate::snapshots::lock_account(&mut tx, &rec.account)
        .await?
        .ok_or_else(|| ApiError::invalid("account", format!("no account {}", rec.account)))?;
    crate::snapshots::check_quota(&acct, need).map_err(ApiError::Conflict)?;
    insert(&mut tx, sid, &rec, &req, op, need).await?;
    crate::store_keys::record_snapshot_store(&mut tx, sid, rec.host.as_ref()).await?;
    let new = crate::operations::NewOp::on(
        &rec,
        op,
        gantry_proto::OperationKind::Snapshot,
        crate::operations::OpDetail::Snapshot { snapshot: sid },
    );
    crate::operations::create(&mut tx, &new).await?;
    gantry_crashpoint::hit("controller.snapshot.before_commit");
    tx.commit().await?;
    gantry_crashpoint::hit("controller.snapshot.after_commit");
    if let Some(h) = &rec.host {
        st.wake.wake(h);
    }
    let snap = load_snapshot(&st, &who, sid).await?;
    Ok(super::accepted(snap))
}

/// Inserts the new snapshot, Creating, holding `reserved` bytes of quota.
async fn insert(
    tx: &mut Tx,
    sid: SnapshotId,
    rec: &InstanceRec,
    req: &CreateSnapshot,
    op: OperationId,
    reserved: u64,
) -> ApiResult<()> {
    let res = sqlx::query(
        "INSERT INTO snapshots (id, account_id, instance_id, name, description, status, \
         auto_release, as_image, operation_id, created_ms, reserved_bytes, region) VALUES ($1, \
         $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(sid.to_string())
    .bind(rec.account.to_string())
    .bind(rec.id.to_string())
    .bind(&req.name)
    .bind(&req.description)
    .bind(SnapshotStatus::Creating.name())
    .bind(req.auto_release as i64)
    .bind(req.as_image as i64)
    .bind(op.to_string())
    .bind(now_ms())
    .bind(reserved.min(i64::MAX as u64) as i64)
    .bind(&rec.region)
    .execute(&mut **tx)
    .await;
    match res {
        Err(e) if is_unique_violation(&e) => Err(ApiError::Conflict(format!(
            "a snapshot named {:?} already exists in this account",
            req.name
        ))),
        r => r.map(|_| ()).map_err(ApiError::from),
    }
}

async fn load_snapshot(st: &AppState, who: &Caller, id: SnapshotId) -> ApiResult<SnapshotInfo> {
    let not_found = || ApiError::NotFound(format!("no snapshot {id}"));
    let row = sqlx::query(&format!(
        "SELECT {}, {} FROM snapshots WHERE id = $1",
        rows::SNAPSHOT_COLS,
        crate::store_keys::SNAPSHOT_STORE_COLS
    ))
    .bind(id.to_string())
    .fetch_optional(&st.db.pool)
    .await?
    .ok_or_else(not_found)?;
    let mut s = rows::snapshot(&row)?;
    if !who.can_see(&s.account) {
        return Err(not_found());
    }
    crate::store_keys::Availability::new(st)
        .mark(&mut s, &row)
        .await?;
    Ok(s)
}

async fn list(
    State(st): State<AppState>,
    who: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<SnapshotInfo>>> {
    query(&q, &["status", "instance", "region"])?;
    let region = match q.get("region") {
        Some(r) => {
            crate::regions::problem(r).map_or(Ok(()), |p| Err(ApiError::bad("region", p)))?;
            r.clone()
        }
        None => String::new(),
    };
    let status = match q.get("status") {
        Some(s) => s
            .parse::<SnapshotStatus>()
            .map_err(|e| ApiError::bad("status", e))?
            .name()
            .to_string(),
        None => String::new(),
    };
    let instance = match q.get("instance") {
        Some(i) => i
            .parse::<InstanceId>()
            .map_err(|e| ApiError::bad("instance", e.to_string()))?
            .to_string(),
        None => String::new(),
    };
    let sql = format!(
        "SELECT {}, {} FROM snapshots WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR status = $2) \
         AND ($3 = '' OR instance_id = $3) AND ($4 = '' OR region = $4) ORDER BY created_ms, id",
        rows::SNAPSHOT_COLS,
        crate::store_keys::SNAPSHOT_STORE_COLS
    );
    let found = sqlx::query(&sql)
        .bind(who.account.map(|a| a.to_string()).unwrap_or_default())
        .bind(status)
        .bind(instance)
        .bind(region)
        .fetch_all(&st.db.pool)
        .await?;
    let mut avail = crate::store_keys::Availability::new(&st);
    let mut out = Vec::with_capacity(found.len());
    for row in &found {
        let mut snap = rows::snapshot(row)?;
        avail.mark(&mut snap, row).await?;
        out.push(snap);
    }
    Ok(Json(out))
}

async fn get_one(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotInfo>> {
    Ok(Json(
        load_snapshot(&st, &who, path_id(&id, "snapshot")?).await?,
    ))
}

async fn delete(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotInfo>> {
    let s = load_snapshot(&st, &who, path_id(&id, "snapshot")?).await?;
    if s.status == SnapshotStatus::Creating {
        return Err(ApiError::Conflict(format!(
            "snapshot {} is still being created; delete it once it is Success or Failed",
            s.id
        )));
    }
    let mut tx = st.db.begin_write().await?;
    sqlx::query("DELETE FROM images WHERE source_snapshot_id = $1")
        .bind(s.id.to_string())
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query("SELECT host_id FROM snapshots WHERE id = $1")
        .bind(s.id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
    let host: Option<HostId> = match &row {
        Some(r) => crate::db::parsed_opt(r, "host_id", "snapshots")?,
        None => None,
    };
    sqlx::query("DELETE FROM snapshots WHERE id = $1")
        .bind(s.id.to_string())
        .execute(&mut *tx)
        .await?;
    // A stored snapshot is removed from its host's store too.
    let host = host.filter(|_| s.status == SnapshotStatus::Success);
    if let Some(h) = host {
        let new = crate::operations::NewOp {
            id: OperationId::new(),
            account: Some(s.account),
            host: Some(h),
            instance: None,
            kind: gantry_proto::OperationKind::DeleteSnapshot,
            detail: crate::operations::OpDetail::DeleteSnapshot { snapshot: s.id },
        };
        crate::operations::create(&mut tx, &new).await?;
    }
    tx.commit().await?;
    if let Some(h) = &host {
        st.wake.wake(h);
    }
    Ok(Json(s))
}
