//! The audit log: one row per state-changing call (who, what, when,
//! outcome), written by the API guard after the handler answered.

use crate::auth::Identity;
use crate::db::{now_ms, rows, Db, DbError};
use axum::http::StatusCode;
use gantry_proto::api::v1::AuditEntry;

/// A sentence a handler attaches to its response (as an extension) for the
/// call's audit record, e.g. why an admin cleared a GPU.
#[derive(Debug, Clone)]
pub struct AuditNote(pub String);

/// Records one call (with the handler's [`AuditNote`], if any). A failure
/// to write is logged, not returned: the call itself already happened.
pub async fn record(
    db: &Db,
    who: Option<&Identity>,
    method: &str,
    path: &str,
    status: StatusCode,
    note: Option<&str>,
) {
    let actor = who.map_or("anonymous", |w| w.actor.as_str());
    let account = who.and_then(|w| w.account).map(|a| a.to_string());
    let res = sqlx::query(
        "INSERT INTO audit_log (id, at_ms, actor, account_id, method, path, status, note) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(uuid::Uuid::now_v7().simple().to_string())
    .bind(now_ms())
    .bind(actor)
    .bind(account)
    .bind(method)
    .bind(path)
    .bind(status.as_u16() as i64)
    .bind(note.map(str::to_owned))
    .execute(&db.pool)
    .await;
    if let Err(e) = res {
        tracing::error!(error = %e, %method, %path, "cannot write audit record");
    }
}

/// The newest `limit` entries, newest first, optionally for one account.
pub async fn list(db: &Db, account: Option<&str>, limit: i64) -> Result<Vec<AuditEntry>, DbError> {
    let sql = format!(
        "SELECT {} FROM audit_log WHERE ($1 = '' OR account_id = $1) ORDER BY at_ms DESC, id DESC \
         LIMIT $2",
        rows::AUDIT_COLS
    );
    let found = sqlx::query(&sql)
        .bind(account.unwrap_or(""))
        .bind(limit)
        .fetch_all(&db.pool)
        .await?;
    found.iter().map(rows::audit).collect()
}
