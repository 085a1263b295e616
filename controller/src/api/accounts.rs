//! Account lifecycle (admin only): disable, enable, delete.
//!
//! - `POST /v1/admin/accounts/{id}/disable`: the account's tokens answer
//!   `401` "account ... is disabled"; its Running instances get a `stop`
//!   operation (like the credit-grace stop), so compute billing stops; its
//!   instances, snapshots and volumes are kept (storage is still billed).
//!   The reconcile loop ([`tick`]) stops any that become Running later.
//! - `POST /v1/admin/accounts/{id}/enable`: access comes back; stopped
//!   instances stay stopped until the owner starts them.
//! - `DELETE /v1/admin/accounts/{id}`: only a disabled account (else
//!   `409`). It becomes `deleting` at once (its tokens answer `404`, and are
//!   revoked); its instances are released, its snapshots and volumes
//!   deleted, each through the same operations their own API calls start.
//!   `200` once nothing is left (`deleted`), else `202` listing what it
//!   waits for; the reconcile loop finishes it when the hosts report. The
//!   ledger and the audit rows are kept.

use super::{path_id, Caller};
use crate::auth::Identity;
use crate::db::{col, now_ms, rows, to_time, DbError};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use gantry_proto::api::v1::{AccountLifecycle, AccountStatus};
use gantry_proto::ids::{AccountId, OperationId};
use tower::ServiceExt;

/// The actor the removal calls made on a deleted account's behalf run as.
const DELETION_ACTOR: &str = "account-deletion";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/accounts/{id}/disable", post(disable))
        .route("/admin/accounts/{id}/enable", post(enable))
        .route("/admin/accounts/{id}", delete(remove))
}

fn status_name(s: AccountStatus) -> &'static str {
    match s {
        AccountStatus::Active => "active",
        AccountStatus::Disabled => "disabled",
        AccountStatus::Deleting => "deleting",
        AccountStatus::Deleted => "deleted",
    }
}

/// The account's status now.
async fn load(st: &AppState, id: &AccountId) -> ApiResult<AccountLifecycle> {
    let row = sqlx::query("SELECT status, status_ms FROM accounts WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no account {id}")))?;
    Ok(AccountLifecycle {
        id: *id,
        status: rows::account_status(&col::<String>(&row, "status")?)?,
        since: col::<Option<i64>>(&row, "status_ms")?.map(to_time),
        operations: vec![],
        waiting_for: vec![],
    })
}

/// Refuses to create objects for an account that is not active (an admin
/// naming a disabled or deleted account): `409`, or `422` naming
/// `account` when there is no such account.
pub async fn require_active(st: &AppState, id: &AccountId) -> ApiResult<()> {
    let a = load(st, id)
        .await
        .map_err(|_| ApiError::invalid("account", format!("no account {id}")))?;
    if a.status == AccountStatus::Active {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "account {id} is {}; nothing new can be created for it",
        status_name(a.status)
    )))
}

/// Moves the account from `from` to `to`; `false` when it was not in `from`.
async fn set_status(
    st: &AppState,
    id: &AccountId,
    from: AccountStatus,
    to: AccountStatus,
) -> ApiResult<bool> {
    let done = sqlx::query(
        "UPDATE accounts SET status = $1, status_ms = $2 WHERE id = $3 AND status = $4",
    )
    .bind(status_name(to))
    .bind(now_ms())
    .bind(id.to_string())
    .bind(status_name(from))
    .execute(&st.db.pool)
    .await?;
    // Cached verifications of its tokens must not outlive the change.
    st.verifier.forget_all();
    Ok(done.rows_affected() == 1)
}

fn gone(a: &AccountLifecycle) -> ApiError {
    ApiError::Conflict(format!(
        "account {} is {}; it can no longer be changed",
        a.id,
        status_name(a.status)
    ))
}

fn answer(a: AccountLifecycle, note: String) -> Response {
    let code = match a.status {
        AccountStatus::Deleting => StatusCode::ACCEPTED,
        _ => StatusCode::OK,
    };
    let mut resp = (code, Json(a)).into_response();
    resp.extensions_mut().insert(crate::audit::AuditNote(note));
    resp
}

/// `POST /v1/admin/accounts/{id}/disable`.
async fn disable(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    who.require_admin()?;
    let id: AccountId = path_id(&id, "account")?;
    let a = load(&st, &id).await?;
    match a.status {
        AccountStatus::Active => {
            set_status(&st, &id, AccountStatus::Active, AccountStatus::Disabled).await?;
        }
        AccountStatus::Disabled => {}
        _ => return Err(gone(&a)),
    }
    let operations = stop_running(&st, Some(&id)).await?;
    let a = AccountLifecycle {
        operations,
        ..load(&st, &id).await?
    };
    let note = format!(
        "account {id} disabled; {} instances stopping",
        a.operations.len()
    );
    Ok(answer(a, note))
}

/// `POST /v1/admin/accounts/{id}/enable`.
async fn enable(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    who.require_admin()?;
    let id: AccountId = path_id(&id, "account")?;
    let a = load(&st, &id).await?;
    match a.status {
        AccountStatus::Disabled => {
            set_status(&st, &id, AccountStatus::Disabled, AccountStatus::Active).await?;
        }
        AccountStatus::Active => {}
        _ => return Err(gone(&a)),
    }
    Ok(answer(
        load(&st, &id).await?,
        format!("account {id} enabled"),
    ))
}

/// `DELETE /v1/admin/accounts/{id}`.
async fn remove(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    who.require_admin()?;
    let id: AccountId = path_id(&id, "account")?;
    let a = load(&st, &id).await?;
    match a.status {
        AccountStatus::Active => {
            return Err(ApiError::Conflict(format!(
                "account {id} is active; disable it first (POST /v1/admin/accounts/{id}/disable)"
            )))
        }
        AccountStatus::Disabled => {
            if !set_status(&st, &id, AccountStatus::Disabled, AccountStatus::Deleting).await? {
                return Err(ApiError::Conflict(format!(
                    "account {id} changed meanwhile; retry"
                )));
            }
            sqlx::query("UPDATE tokens SET revoked = 1 WHERE account_id = $1")
                .bind(id.to_string())
                .execute(&st.db.pool)
                .await?;
            st.verifier.forget_all();
        }
        AccountStatus::Deleting | AccountStatus::Deleted => {}
    }
    let (operations, waiting_for) = advance(&st, &id).await?;
    let a = AccountLifecycle {
        operations,
        waiting_for,
        ..load(&st, &id).await?
    };
    let note = format!(
        "account {id} {}; {} operations started, waiting for {}",
        status_name(a.status),
        a.operations.len(),
        a.waiting_for.len()
    );
    Ok(answer(a, note))
}

/// Stops the Running instances (without a pending operation) of disabled
/// accounts (of `only`, when given): a `stop` operation each, as the
/// credit-grace stop does. Returns the operations started.
pub async fn stop_running(
    st: &AppState,
    only: Option<&AccountId>,
) -> Result<Vec<OperationId>, DbError> {
    let sql = format!(
        "{} JOIN accounts a ON a.id = i.account_id WHERE a.status = 'disabled' AND \
         ($1 = '' OR a.id = $1) AND i.observed_state = 'Running' AND i.pending_op IS NULL",
        rows::INSTANCE_SELECT
    );
    let found = sqlx::query(&sql)
        .bind(only.map(|a| a.to_string()).unwrap_or_default())
        .fetch_all(&st.db.pool)
        .await?;
    let mut ops = vec![];
    for r in &found {
        let rec = rows::instance(r)?;
        if let Some(op) = crate::operations::stop_for_policy(st, &rec, "account disabled").await? {
            ops.push(op);
        }
    }
    Ok(ops)
}

/// What a deletion step started and what it still waits for.
#[derive(Default)]
struct Progress {
    ops: Vec<OperationId>,
    waiting: Vec<String>,
}

/// One step of deleting account `id`: starts the removal of whatever is
/// left (releases, snapshot and volume deletions, through their own API
/// handlers), and marks it deleted once nothing is. Returns the
/// operations started and what it still waits for.
pub async fn advance(st: &AppState, id: &AccountId) -> ApiResult<(Vec<OperationId>, Vec<String>)> {
    let acct = id.to_string();
    let mut p = Progress::default();
    release_instances(st, &acct, &mut p).await?;
    delete_stored(st, &acct, &mut p).await?;
    sqlx::query("DELETE FROM ssh_keys WHERE account_id = $1")
        .bind(&acct)
        .execute(&st.db.pool)
        .await?;
    // Network groups once their members are gone (their VNIs free again).
    sqlx::query(
        "DELETE FROM network_groups WHERE account_id = $1 AND NOT EXISTS (SELECT 1 FROM \
         network_group_members m WHERE m.group_id = network_groups.id)",
    )
    .bind(&acct)
    .execute(&st.db.pool)
    .await?;
    if p.waiting.is_empty() {
        set_status(st, id, AccountStatus::Deleting, AccountStatus::Deleted).await?;
        tracing::info!(account = %id, "account deleted");
    }
    Ok((p.ops, p.waiting))
}

/// Releases every instance of the account not gone yet.
async fn release_instances(st: &AppState, acct: &str, p: &mut Progress) -> ApiResult<()> {
    let instances = sqlx::query(
        "SELECT id, pending_op FROM instances WHERE account_id = $1 \
         AND observed_state NOT IN ('Released', 'Failed') ORDER BY id",
    )
    .bind(acct)
    .fetch_all(&st.db.pool)
    .await?;
    for r in &instances {
        let ins: String = col(r, "id")?;
        if let Some(op) = col::<Option<String>>(r, "pending_op")? {
            p.waiting
                .push(format!("instance {ins}: operation {op} has not finished"));
            continue;
        }
        let body = serde_json::json!({"action": "release"});
        let path = format!("/instances/{ins}/actions");
        if p.internal(st, Method::POST, &path, Some(body), &ins).await == 202 {
            p.waiting.push(format!("instance {ins}: being released"));
        }
    }
    Ok(())
}

/// Deletes the account's snapshots and volumes.
async fn delete_stored(st: &AppState, acct: &str, p: &mut Progress) -> ApiResult<()> {
    let snaps = sqlx::query("SELECT id FROM snapshots WHERE account_id = $1 ORDER BY id")
        .bind(acct)
        .fetch_all(&st.db.pool)
        .await?;
    for r in &snaps {
        let snap: String = col(r, "id")?;
        let path = format!("/snapshots/{snap}");
        p.internal(st, Method::DELETE, &path, None, &snap).await;
    }
    let vols = sqlx::query("SELECT id, deleting FROM volumes WHERE account_id = $1 ORDER BY id")
        .bind(acct)
        .fetch_all(&st.db.pool)
        .await?;
    for r in &vols {
        let vol: String = col(r, "id")?;
        let path = format!("/volumes/{vol}");
        if col::<i64>(r, "deleting")? != 0
            || p.internal(st, Method::DELETE, &path, None, &vol).await == 202
        {
            p.waiting
                .push(format!("volume {vol}: its host has not deleted it yet"));
        }
    }
    Ok(())
}

impl Progress {
    /// Calls an API handler (instances, snapshots, volumes) as an admin,
    /// the way its own route would run it. Notes the operation it started,
    /// or (on a refusal) what blocks; returns the status.
    async fn internal(
        &mut self,
        st: &AppState,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        what: &str,
    ) -> u16 {
        let app = super::instances::routes()
            .merge(super::snapshots::routes())
            .merge(super::volumes::routes())
            .with_state(st.clone());
        let mut req = Request::builder().method(method).uri(path);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let Ok(mut req) = req.body(axum::body::Body::from(bytes)) else {
            self.waiting
                .push(format!("{what}: cannot build the removal request"));
            return 500;
        };
        req.extensions_mut().insert(Identity::admin(DELETION_ACTOR));
        let Ok(resp) = app.oneshot(req).await;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status.is_success() {
            let op = v["operation"]
                .as_str()
                .and_then(|o| o.parse::<OperationId>().ok());
            self.ops.extend(op);
        } else {
            let why = v["error"].as_str().unwrap_or("refused");
            self.waiting.push(format!("{what}: {why}"));
        }
        status.as_u16()
    }
}

/// The reconcile step: stops what disabled accounts run, and moves the
/// deletion of every `deleting` account on.
pub async fn tick(st: &AppState) -> Result<(), DbError> {
    stop_running(st, None).await?;
    let deleting: Vec<String> =
        sqlx::query_scalar("SELECT id FROM accounts WHERE status = 'deleting'")
            .fetch_all(&st.db.pool)
            .await?;
    for id in deleting {
        let Ok(id) = id.parse::<AccountId>() else {
            continue;
        };
        if let Err(e) = advance(st, &id).await {
            tracing::error!(account = %id, error = %e, "cannot move an account deletion on");
        }
    }
    Ok(())
}
