//! `GET /v1/usage`: an account's usage ledger records, newest first.

use super::{query, Caller};
use crate::db::rows;
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use gantry_proto::api::v1::UsageRecord;
use gantry_proto::ids::{AccountId, InstanceId};
use gantry_proto::validate;
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new().route("/usage", get(list))
}

/// `?instance=&limit=` (and `account=` for admins, who otherwise see all).
async fn list(
    State(st): State<AppState>,
    who: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<UsageRecord>>> {
    query(&q, &["instance", "limit", "account"])?;
    let account = match (&who.account, q.get("account")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "account",
                "a tenant token sees only its own account",
            ))
        }
        (Some(mine), None) => mine.to_string(),
        (None, Some(a)) => a
            .parse::<AccountId>()
            .map_err(|e| ApiError::bad("account", e.to_string()))?
            .to_string(),
        (None, None) => String::new(),
    };
    let instance = match q.get("instance") {
        Some(i) => i
            .parse::<InstanceId>()
            .map_err(|e| ApiError::bad("instance", e.to_string()))?
            .to_string(),
        None => String::new(),
    };
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => {
            let n: u64 = l
                .parse()
                .map_err(|_| ApiError::bad("limit", "must be a whole number"))?;
            validate::in_range("limit", n, 1, 10_000)?;
            n as i64
        }
    };
    let sql = format!(
        "SELECT {} FROM usage_records WHERE ($1 = '' OR account_id = $1) AND \
         ($2 = '' OR instance_id = $2) ORDER BY at_ms DESC, id DESC LIMIT $3",
        rows::USAGE_COLS
    );
    let found = sqlx::query(&sql)
        .bind(account)
        .bind(instance)
        .bind(limit)
        .fetch_all(&st.db.pool)
        .await?;
    Ok(Json(
        found.iter().map(rows::usage).collect::<Result<_, _>>()?,
    ))
}
