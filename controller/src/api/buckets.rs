//! Buckets as directories (docs/buckets.md): an account's storage
//! connections (`/v1/storage-connections`: create, optionally creating the
//! bucket; list; get; delete when attached nowhere) and their attachments
//! to instances (`/v1/instances/{id}/buckets`: attach, list, detach).
//!
//! A connection is checked with a signed request before it is stored and
//! again before each attach, so an unreachable endpoint, a missing bucket
//! or a wrong key is refused with a 422 that names the field and says
//! which. The secret key is sealed at rest and never answered. An attach
//! or detach wakes the instance's host, whose next work answer carries the
//! new bucket state ([`crate::buckets::host_buckets`]).

use super::instances::{gate, load_in};
use super::{created, path_id, query, Body, Caller};
use crate::buckets::{self as b, AttachmentRow, BucketError, ConnectionRow, Target};
use crate::db::{col, is_unique_violation, now_ms, to_time};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use gantry_proto::buckets::{
    mount_path, AttachBucket, BucketAttachmentInfo, CreateStorageConnection, StorageConnectionInfo,
    MAX_ATTACHMENTS_PER_INSTANCE, MAX_CONNECTIONS_PER_ACCOUNT,
};
use gantry_proto::ids::{AccountId, InstanceId, StorageConnectionId};
use gantry_proto::net::Secret;
use gantry_proto::InstanceState;
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/storage-connections", post(create).get(list))
        .route("/storage-connections/{id}", get(get_one).delete(remove))
        .route("/instances/{id}/buckets", post(attach).get(list_attached))
        .route("/instances/{id}/buckets/{connection}", delete(detach))
}

/// A failed check as a 422 naming `field` (or 500 for the database).
fn refused(field: &str, e: BucketError) -> ApiError {
    match e {
        BucketError::Db(e) => ApiError::Db(e),
        BucketError::Secret(e) => {
            tracing::error!(error = %e, "cannot open a storage connection's secret");
            ApiError::Unavailable("the connection's secret cannot be opened".into())
        }
        e => ApiError::invalid(field, e.to_string()),
    }
}

/// The field a failed check of a new connection is blamed on.
fn field_of(e: &BucketError) -> &'static str {
    match e {
        BucketError::Unreachable { .. } | BucketError::Other { .. } => "endpoint",
        BucketError::NoSuchBucket { .. } | BucketError::Taken { .. } => "bucket",
        BucketError::WrongRegion { .. } => "region",
        _ => "secret_access_key",
    }
}

fn info(c: &ConnectionRow, attached_to: Vec<InstanceId>) -> StorageConnectionInfo {
    StorageConnectionInfo {
        id: c.id,
        name: c.name.clone(),
        endpoint: c.endpoint.clone(),
        region: c.region.clone(),
        bucket: c.bucket.clone(),
        access_key_id: c.access_key_id.clone(),
        attached_to,
        created_at: to_time(c.created_ms),
    }
}

pub fn attachment_info(a: &AttachmentRow) -> BucketAttachmentInfo {
    BucketAttachmentInfo {
        connection: a.connection.id,
        connection_name: a.connection.name.clone(),
        endpoint: a.connection.endpoint.clone(),
        bucket: a.connection.bucket.clone(),
        mount_path: a.mount_path.clone(),
        read_only: a.read_only,
        health: a.health,
        detail: a.detail.clone(),
    }
}

/// The buckets attached to `instance` (for its Config view too).
pub async fn attachments(
    st: &AppState,
    instance: InstanceId,
) -> ApiResult<Vec<BucketAttachmentInfo>> {
    let found = b::attachments_of(&st.db.pool, instance).await?;
    Ok(found.iter().map(attachment_info).collect())
}

/// The caller's connection `id` (others' answer 404).
async fn load(st: &AppState, who: &Caller, id: StorageConnectionId) -> ApiResult<ConnectionRow> {
    let not_found = || ApiError::NotFound(format!("no storage connection {id}"));
    let row = sqlx::query(&format!(
        "SELECT {} FROM storage_connections WHERE id = $1",
        b::CONNECTION_COLS
    ))
    .bind(id.to_string())
    .fetch_optional(&st.db.pool)
    .await?
    .ok_or_else(not_found)?;
    let c = b::connection_row(&row)?;
    if !who.can_see(&c.account) {
        return Err(not_found());
    }
    Ok(c)
}

/// `POST /v1/storage-connections`: checks the request, creates the bucket
/// when asked, checks that the key reaches it, stores it sealed.
async fn create(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<CreateStorageConnection>,
) -> ApiResult<Response> {
    let account = super::owner_for(&who, req.account)?;
    req.validate()?;
    super::accounts::require_active(&st, &account).await?;
    check_room(&st, &account, &req.name).await?;
    let t = Target {
        endpoint: &req.endpoint,
        region: req.region(),
        bucket: &req.bucket,
        key_id: &req.access_key_id,
        secret: &req.secret_access_key,
    };
    let checked = if req.create_bucket {
        b::create_bucket(&t).await
    } else {
        b::probe(&t).await
    };
    checked.map_err(|e| refused(field_of(&e), e))?;
    let id = StorageConnectionId::new();
    let row = ConnectionRow {
        id,
        account,
        name: req.name.clone(),
        endpoint: req.endpoint.trim_end_matches('/').to_string(),
        region: req.region().to_string(),
        bucket: req.bucket.clone(),
        access_key_id: req.access_key_id.clone(),
        secret_sealed: st
            .sealer
            .seal(&b::secret_context(id), req.secret_access_key.expose()),
        created_ms: now_ms(),
    };
    let mut tx = st.db.begin_write().await?;
    match b::insert_connection(&mut tx, &row).await {
        Err(crate::db::DbError::Sqlx(e)) if is_unique_violation(&e) => {
            return Err(ApiError::Conflict(format!(
                "a storage connection named {:?} already exists in this account",
                req.name
            )))
        }
        r => r?,
    }
    tx.commit().await?;
    tracing::info!(connection = %id, %account, endpoint = %row.endpoint, bucket = %row.bucket,
        created_bucket = req.create_bucket, "storage connection created");
    Ok(created(info(&row, Vec::new())))
}

/// Refuses a repeated name or one connection too many.
async fn check_room(st: &AppState, account: &AccountId, name: &str) -> ApiResult<()> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n, SUM(CASE WHEN name = $2 THEN 1 ELSE 0 END) AS same FROM \
         storage_connections WHERE account_id = $1",
    )
    .bind(account.to_string())
    .bind(name)
    .fetch_one(&st.db.pool)
    .await?;
    if col::<Option<i64>>(&row, "same")?.unwrap_or(0) > 0 {
        return Err(ApiError::Conflict(format!(
            "a storage connection named {name:?} already exists in this account"
        )));
    }
    if col::<i64>(&row, "n")? >= MAX_CONNECTIONS_PER_ACCOUNT as i64 {
        return Err(ApiError::invalid(
            "name",
            format!("an account has at most {MAX_CONNECTIONS_PER_ACCOUNT} storage connections"),
        ));
    }
    Ok(())
}

/// `GET /v1/storage-connections`: the caller's (admins: all, or `?account=`).
async fn list(
    State(st): State<AppState>,
    who: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<StorageConnectionInfo>>> {
    query(&q, &["account"])?;
    let account = super::list_account(&who, &q)?;
    let found = sqlx::query(&format!(
        "SELECT {} FROM storage_connections WHERE $1 = '' OR account_id = $1 ORDER BY \
         created_ms, id",
        b::CONNECTION_COLS
    ))
    .bind(account)
    .fetch_all(&st.db.pool)
    .await?;
    let mut out = Vec::with_capacity(found.len());
    for r in &found {
        let c = b::connection_row(r)?;
        let on = b::attached_to(&st.db.pool, c.id).await?;
        out.push(info(&c, on));
    }
    Ok(Json(out))
}

/// `GET /v1/storage-connections/{id}`.
async fn get_one(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<StorageConnectionInfo>> {
    let c = load(&st, &who, path_id(&id, "storage connection")?).await?;
    let on = b::attached_to(&st.db.pool, c.id).await?;
    Ok(Json(info(&c, on)))
}

/// `DELETE /v1/storage-connections/{id}`: refused while attached to an
/// instance; the bucket and its objects are left as they are.
async fn remove(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let c = load(&st, &who, path_id(&id, "storage connection")?).await?;
    let mut tx = st.db.begin_write().await?;
    b::forget_released(&mut tx).await?;
    let on = b::attached_to(&mut *tx, c.id).await?;
    if let Some(first) = on.first() {
        return Err(ApiError::Conflict(format!(
            "storage connection {} is attached to instance {first}; detach it first",
            c.id
        )));
    }
    sqlx::query("DELETE FROM storage_connections WHERE id = $1")
        .bind(c.id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(connection = %c.id, "storage connection deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Attachments may change while the instance is neither Snapshotting nor
/// final, and has a host.
fn changeable(rec: &crate::db::rows::InstanceRec) -> ApiResult<gantry_proto::HostId> {
    gate(rec)?;
    if rec.observed == InstanceState::Failed {
        return Err(ApiError::Conflict(format!("instance {} is Failed", rec.id)));
    }
    rec.host
        .ok_or_else(|| ApiError::Conflict(format!("instance {} has no host", rec.id)))
}

/// `POST /v1/instances/{id}/buckets`.
async fn attach(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<AttachBucket>,
) -> ApiResult<Response> {
    let id: InstanceId = path_id(&id, "instance")?;
    let rec = load_in(&st.db.pool, &who, id).await?;
    changeable(&rec)?;
    let c = load(&st, &who, req.connection).await?;
    if c.account != rec.account {
        return Err(ApiError::NotFound(format!(
            "no storage connection {}",
            req.connection
        )));
    }
    let path = req.mount_path_for(&c.bucket);
    mount_path("mount_path", &path)?;
    check_free(&st, id, &c, &path).await?;
    let secret: Secret = c
        .open_secret(&st.sealer)
        .map_err(|e| refused("connection", e.into()))?;
    let t = Target {
        endpoint: &c.endpoint,
        region: &c.region,
        bucket: &c.bucket,
        key_id: &c.access_key_id,
        secret: &secret,
    };
    b::probe(&t).await.map_err(|e| refused("connection", e))?;
    let mut tx = st.db.begin_write().await?;
    let rec = load_in(&mut *tx, &who, id).await?;
    let host = changeable(&rec)?;
    let res = sqlx::query(
        "INSERT INTO bucket_attachments (instance_id, connection_id, mount_path, read_only, \
         health, created_ms) VALUES ($1, $2, $3, $4, 'pending', $5)",
    )
    .bind(id.to_string())
    .bind(c.id.to_string())
    .bind(&path)
    .bind(i64::from(req.read_only))
    .bind(now_ms())
    .execute(&mut *tx)
    .await;
    match res {
        // Another request attached it, or took the path, meanwhile.
        Err(e) if is_unique_violation(&e) => {
            return Err(ApiError::Conflict(format!(
                "instance {id} already has storage connection {} or a bucket at {path}",
                c.id
            )))
        }
        r => r?,
    };
    tx.commit().await?;
    st.wake.wake(&host);
    tracing::info!(instance = %id, connection = %c.id, mount_path = %path,
        read_only = req.read_only, "bucket attached");
    let a = AttachmentRow {
        instance: id,
        connection: c,
        mount_path: path,
        read_only: req.read_only,
        health: gantry_proto::buckets::BucketHealth::Pending,
        detail: None,
    };
    Ok(created(attachment_info(&a)))
}

/// Refuses a second attachment of the connection, a taken mount path, or
/// one attachment too many.
async fn check_free(st: &AppState, id: InstanceId, c: &ConnectionRow, path: &str) -> ApiResult<()> {
    let now = b::attachments_of(&st.db.pool, id).await?;
    if now.iter().any(|a| a.connection.id == c.id) {
        return Err(ApiError::Conflict(format!(
            "storage connection {} is already attached to instance {id}",
            c.id
        )));
    }
    if let Some(a) = now.iter().find(|a| a.mount_path == path) {
        return Err(ApiError::Conflict(format!(
            "instance {id} already has bucket {:?} at {path}; give another mount_path",
            a.connection.bucket
        )));
    }
    if now.len() >= MAX_ATTACHMENTS_PER_INSTANCE {
        return Err(ApiError::invalid(
            "connection",
            format!("an instance has at most {MAX_ATTACHMENTS_PER_INSTANCE} buckets attached"),
        ));
    }
    Ok(())
}

/// `GET /v1/instances/{id}/buckets`.
async fn list_attached(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<BucketAttachmentInfo>>> {
    let rec = load_in(&st.db.pool, &who, path_id(&id, "instance")?).await?;
    gate(&rec)?;
    Ok(Json(attachments(&st, rec.id).await?))
}

/// `DELETE /v1/instances/{id}/buckets/{connection}`: the host unmounts it;
/// the bucket keeps everything written to it.
async fn detach(
    State(st): State<AppState>,
    who: Caller,
    Path((id, conn)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let id: InstanceId = path_id(&id, "instance")?;
    let conn: StorageConnectionId = path_id(&conn, "storage connection")?;
    let rec = load_in(&st.db.pool, &who, id).await?;
    let host = changeable(&rec)?;
    let gone =
        sqlx::query("DELETE FROM bucket_attachments WHERE instance_id = $1 AND connection_id = $2")
            .bind(id.to_string())
            .bind(conn.to_string())
            .execute(&st.db.pool)
            .await?
            .rows_affected();
    if gone == 0 {
        return Err(ApiError::NotFound(format!(
            "storage connection {conn} is not attached to instance {id}"
        )));
    }
    st.wake.wake(&host);
    tracing::info!(instance = %id, connection = %conn, "bucket detached");
    Ok(StatusCode::NO_CONTENT)
}
