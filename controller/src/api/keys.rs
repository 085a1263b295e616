//! SSH public keys of an account (`/v1/ssh-keys`): add, list, delete. Every
//! instance created afterwards gets the account's keys for root (they are
//! read when its create command is built).

use super::{created, path_id, query, Body, Caller};
use crate::db::{col, is_unique_violation, now_ms, parsed, to_time};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use gantry_proto::api::v1::{CreateSshKey, SshKeyInfo};
use gantry_proto::ids::SshKeyId;
use gantry_proto::net::{self, MAX_SSH_KEYS};
use gantry_proto::validate;
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ssh-keys", post(add).get(list))
        .route("/ssh-keys/{id}", delete(remove))
}

const COLS: &str = "id, account_id, name, public_key, fingerprint, created_ms";

fn key_row(r: &sqlx::any::AnyRow) -> ApiResult<SshKeyInfo> {
    Ok(SshKeyInfo {
        id: parsed(r, "id", "ssh_keys")?,
        account: parsed(r, "account_id", "ssh_keys")?,
        name: col(r, "name")?,
        public_key: col(r, "public_key")?,
        fingerprint: col(r, "fingerprint")?,
        created_at: to_time(col(r, "created_ms")?),
    })
}

async fn add(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<CreateSshKey>,
) -> ApiResult<Response> {
    let account = super::owner_for(&who, req.account)?;
    validate::object_name("name", &req.name)?;
    super::accounts::require_active(&st, &account).await?;
    net::ssh_public_key("public_key", &req.public_key)?;
    let fingerprint = crate::credentials::ssh_fingerprint(&req.public_key)
        .ok_or_else(|| ApiError::invalid("public_key", "is not an SSH public key"))?;
    super::admin::load_account(&st, &account)
        .await
        .map_err(|_| ApiError::invalid("account", format!("no account {account}")))?;
    let mut tx = st.db.begin_write().await?;
    let row = sqlx::query(
        "SELECT COUNT(*) AS n, SUM(CASE WHEN name = $2 THEN 1 ELSE 0 END) AS by_name, \
         SUM(CASE WHEN fingerprint = $3 THEN 1 ELSE 0 END) AS by_key FROM ssh_keys \
         WHERE account_id = $1",
    )
    .bind(account.to_string())
    .bind(&req.name)
    .bind(&fingerprint)
    .fetch_one(&mut *tx)
    .await?;
    let count = |c: &str| -> ApiResult<i64> { Ok(col::<Option<i64>>(&row, c)?.unwrap_or(0)) };
    if count("by_name")? > 0 {
        return Err(ApiError::Conflict(format!(
            "an SSH key named {:?} already exists in this account",
            req.name
        )));
    }
    if count("by_key")? > 0 {
        return Err(ApiError::Conflict(format!(
            "this account already has the key {fingerprint}"
        )));
    }
    if count("n")? >= MAX_SSH_KEYS as i64 {
        return Err(ApiError::Conflict(format!(
            "an account has at most {MAX_SSH_KEYS} SSH keys; delete one first"
        )));
    }
    let id = SshKeyId::new();
    let res = sqlx::query(
        "INSERT INTO ssh_keys (id, account_id, name, public_key, fingerprint, created_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id.to_string())
    .bind(account.to_string())
    .bind(&req.name)
    .bind(&req.public_key)
    .bind(&fingerprint)
    .bind(now_ms())
    .execute(&mut *tx)
    .await;
    match res {
        Err(e) if is_unique_violation(&e) => {
            return Err(ApiError::Conflict(
                "an SSH key with this name or key was added at the same time".into(),
            ))
        }
        r => r?,
    };
    tx.commit().await?;
    Ok(created(load(&st, &who, id).await?))
}

async fn load(st: &AppState, who: &Caller, id: SshKeyId) -> ApiResult<SshKeyInfo> {
    let not_found = || ApiError::NotFound(format!("no ssh key {id}"));
    let row = sqlx::query(&format!("SELECT {COLS} FROM ssh_keys WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(not_found)?;
    let k = key_row(&row)?;
    if !who.can_see(&k.account) {
        return Err(not_found());
    }
    Ok(k)
}

/// `GET /v1/ssh-keys`: the caller's keys; admins all, or `?account=`.
async fn list(
    State(st): State<AppState>,
    who: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<SshKeyInfo>>> {
    query(&q, &["account"])?;
    let account = super::list_account(&who, &q)?;
    let found = sqlx::query(&format!(
        "SELECT {COLS} FROM ssh_keys WHERE $1 = '' OR account_id = $1 ORDER BY created_ms, id"
    ))
    .bind(account)
    .fetch_all(&st.db.pool)
    .await?;
    Ok(Json(found.iter().map(key_row).collect::<Result<_, _>>()?))
}

async fn remove(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let k = load(&st, &who, path_id(&id, "ssh key")?).await?;
    sqlx::query("DELETE FROM ssh_keys WHERE id = $1")
        .bind(k.id.to_string())
        .execute(&st.db.pool)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
