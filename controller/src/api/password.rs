//! An instance's root password: reveal (`GET /v1/instances/{id}/password`,
//! audited like a write) and reset (`POST`: a new password and hash, kept
//! at once, and a `set-password` operation whose command carries the hash;
//! the agent's report says how it applied in its `note`). A failed reset
//! puts the old password back (the operation's detail keeps the old hash
//! and sealed password).

use super::instances::{gate, load};
use super::{accepted, Caller};
use crate::credentials;
use crate::db::{col, rows, Tx};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use gantry_proto::api::v1::{OperationInfo, PasswordView};
use gantry_proto::ids::{InstanceId, OperationId};

pub fn routes() -> Router<AppState> {
    Router::new().route("/instances/{id}/password", get(reveal).post(reset))
}

/// Whether a call is a password reveal (audited although it is a GET).
pub fn is_reveal(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts.as_slice(), ["", "v1", "instances", _, "password"])
}

async fn reveal(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<PasswordView>> {
    let rec = load(&st, &who, &id).await?;
    gate(&rec)?;
    let row = sqlx::query("SELECT root_password_sealed FROM instances WHERE id = $1")
        .bind(rec.id.to_string())
        .fetch_one(&st.db.pool)
        .await?;
    let sealed: Option<String> = col(&row, "root_password_sealed")?;
    let sealed = sealed.ok_or_else(|| {
        ApiError::Conflict(format!(
            "instance {} has no password (it was created before instances had one)",
            rec.id
        ))
    })?;
    let pw = st
        .sealer
        .open(&credentials::password_context(rec.id), &sealed)
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    Ok(Json(PasswordView {
        user: "root".into(),
        password: pw.expose().to_string(),
    }))
}

async fn reset(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let rec = load(&st, &who, &id).await?;
    gate(&rec)?;
    if rec.observed.is_final() {
        return Err(ApiError::Conflict(format!(
            "instance {} is {}; its password cannot change",
            rec.id,
            rec.observed.status()
        )));
    }
    if let Some(op) = rec.pending_op {
        return Err(ApiError::Conflict(format!(
            "instance {} has a pending operation {op}; wait for it to finish",
            rec.id
        )));
    }
    let host = rec
        .host
        .ok_or_else(|| ApiError::Conflict(format!("instance {} has no host", rec.id)))?;
    let pw = credentials::new_password();
    let sealed = st
        .sealer
        .seal(&credentials::password_context(rec.id), pw.expose());
    let hash = credentials::hash_password_blocking(pw)
        .await
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    let op = OperationId::new();
    let mut tx = st.db.begin_write().await?;
    super::actions::claim(&mut tx, &rec, op, rec.desired).await?;
    let row =
        sqlx::query("SELECT root_password_hash, root_password_sealed FROM instances WHERE id = $1")
            .bind(rec.id.to_string())
            .fetch_one(&mut *tx)
            .await?;
    let old: (Option<String>, Option<String>) = (
        col(&row, "root_password_hash")?,
        col(&row, "root_password_sealed")?,
    );
    let detail = crate::operations::OpDetail::SetPassword {
        old: match old {
            (Some(h), Some(s)) => Some((h, s)),
            _ => None,
        },
    };
    sqlx::query(
        "UPDATE instances SET root_password_hash = $1, root_password_sealed = $2 WHERE id = $3",
    )
    .bind(&hash)
    .bind(&sealed)
    .bind(rec.id.to_string())
    .execute(&mut *tx)
    .await?;
    let new =
        crate::operations::NewOp::on(&rec, op, gantry_proto::OperationKind::SetPassword, detail);
    crate::operations::create(&mut tx, &new).await?;
    tx.commit().await?;
    st.wake.wake(&host);
    Ok(accepted(load_op(&st, op).await?))
}

async fn load_op(st: &AppState, id: OperationId) -> ApiResult<OperationInfo> {
    let row = sqlx::query(&format!(
        "SELECT {} FROM operations WHERE id = $1",
        rows::OPERATION_COLS
    ))
    .bind(id.to_string())
    .fetch_one(&st.db.pool)
    .await?;
    Ok(rows::operation(&row)?)
}

/// A `set-password` operation failed: the old password comes back.
pub(crate) async fn undo_reset(
    tx: &mut Tx,
    instance: InstanceId,
    old: Option<&(String, String)>,
) -> ApiResult<()> {
    let Some((hash, sealed)) = old else {
        return Ok(());
    };
    sqlx::query(
        "UPDATE instances SET root_password_hash = $1, root_password_sealed = $2 WHERE id = $3",
    )
    .bind(hash)
    .bind(sealed)
    .bind(instance.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_password_paths_are_reveals() {
        assert!(super::is_reveal("/v1/instances/ins-1/password"));
        assert!(!super::is_reveal("/v1/instances/ins-1/access"));
        assert!(!super::is_reveal("/v1/instances/password"));
        assert!(!super::is_reveal("/v1/instances/ins-1/password/x"));
    }
}
