//! The audit log: one row per state-changing call (who, what, when,
//! outcome), written ahead by the API guard.
//!
//! The guarantee: no committed change lacks its audit row. Before a call
//! that may change state runs, the guard commits its row ([`begin`], status
//! 0); only then does the handler run, and its answer fills the row in
//! ([`finish`]). If the guard cannot write the row, the call is refused
//! (`503`) without running. A controller killed mid-call (or a failing
//! outcome write) leaves the row at status 0, which [`list`] shows with a
//! note that the outcome is unknown (the change may or may not have been
//! made). Refusals of callers without a valid token are not written here
//! (they are counted, see `auth::Limiter`); refusals of known callers are.

use crate::auth::Identity;
use crate::db::{now_ms, rows, Db, DbError};
use axum::http::StatusCode;
use gantry_proto::api::v1::AuditEntry;

/// A sentence a handler attaches to its response (as an extension) for the
/// call's audit record, e.g. why an admin cleared a GPU.
#[derive(Debug, Clone)]
pub struct AuditNote(pub String);

/// The longest path stored (longer ones are cut, ending in `...`).
pub const MAX_PATH_CHARS: usize = 512;
/// The longest note stored.
pub const MAX_NOTE_CHARS: usize = 2000;

/// The note [`list`] shows on a row whose call never recorded an outcome.
pub const NO_OUTCOME: &str =
    "no outcome recorded: the call is still running, or the controller stopped during it \
     (the change may or may not have been made)";

/// `s` cut to `max` characters (ending in `...` when cut).
pub fn bounded(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

/// Commits the write-ahead row of a call about to run (status 0) and
/// returns its id for [`finish`].
pub async fn begin(db: &Db, who: &Identity, method: &str, path: &str) -> Result<String, DbError> {
    let id = uuid::Uuid::now_v7().simple().to_string();
    insert(db, &id, who, method, path, 0, None).await?;
    Ok(id)
}

/// Fills in the outcome of the call whose row [`begin`] wrote. A failure
/// is logged, not returned: the call itself already happened, and its row
/// says the outcome is unknown.
pub async fn finish(db: &Db, id: &str, status: StatusCode, note: Option<&str>) {
    let res = async {
        let mut w = db.writer().await?;
        sqlx::query("UPDATE audit_log SET status = $1, note = $2 WHERE id = $3")
            .bind(status.as_u16() as i64)
            .bind(note.map(|n| bounded(n, MAX_NOTE_CHARS)))
            .bind(id)
            .execute(&mut *w)
            .await?;
        Ok::<_, DbError>(())
    }
    .await;
    if let Err(e) = res {
        tracing::error!(error = %e, audit_id = id, "cannot write the outcome of an audited call");
    }
}

/// Records a finished call at once (a refusal of a known caller: nothing
/// changed). A failure to write is logged, not returned.
pub async fn record(
    db: &Db,
    who: &Identity,
    method: &str,
    path: &str,
    status: StatusCode,
    note: Option<&str>,
) {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let status = status.as_u16() as i64;
    if let Err(e) = insert(db, &id, who, method, path, status, note).await {
        tracing::error!(error = %e, %method, "cannot write audit record");
    }
}

async fn insert(
    db: &Db,
    id: &str,
    who: &Identity,
    method: &str,
    path: &str,
    status: i64,
    note: Option<&str>,
) -> Result<(), DbError> {
    let mut w = db.writer().await?;
    sqlx::query(
        "INSERT INTO audit_log (id, at_ms, actor, account_id, method, path, status, note) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(now_ms())
    .bind(bounded(&who.actor, 200))
    .bind(who.account.map(|a| a.to_string()))
    .bind(bounded(method, 16))
    .bind(bounded(path, MAX_PATH_CHARS))
    .bind(status)
    .bind(note.map(|n| bounded(n, MAX_NOTE_CHARS)))
    .execute(&mut *w)
    .await?;
    Ok(())
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
    found
        .iter()
        .map(|r| {
            let mut e = rows::audit(r)?;
            if e.status == 0 && e.note.is_none() {
                e.note = Some(NO_OUTCOME.into());
            }
            Ok(e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_paths_are_cut() {
        let long = "/v1/".to_string() + &"a".repeat(10_000);
        let cut = super::bounded(&long, super::MAX_PATH_CHARS);
        assert_eq!(cut.chars().count(), super::MAX_PATH_CHARS);
        assert!(cut.ends_with("..."));
        assert_eq!(super::bounded("/v1/volumes", 512), "/v1/volumes");
    }
}
