//! `GET|POST /v1/agent/store-keys/{account}`: an account's snapshot-store
//! chunk keys for the calling host ([`crate::store_keys`]). Only a host
//! credential reaches these (the guard), and only for an account the host
//! serves now; anyone else gets 403 with a sentence. Keys travel only in
//! these answers, never in logs or tenant bodies.

use super::{path_id, Body, Caller};
use crate::error::{ApiError, ApiResult};
use crate::store_keys;
use crate::AppState;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use gantry_proto::api::agent::{OfferStoreKey, StoreKeys};
use gantry_proto::ids::{AccountId, HostId};

pub fn routes() -> Router<AppState> {
    Router::new().route("/agent/store-keys/{account}", get(fetch).post(offer))
}

/// The calling host, allowed to hold `account`'s keys.
async fn serving_host(
    st: &AppState,
    who: &Caller,
    account: &str,
) -> ApiResult<(HostId, AccountId)> {
    let host = who
        .host
        .ok_or_else(|| ApiError::Denied("this call needs a host credential".into()))?;
    let account: AccountId = path_id(account, "account")?;
    if !store_keys::host_serves(st, &host, &account).await? {
        return Err(ApiError::Denied(format!(
            "host {host} has no instance, open operation or snapshot of account {account}, so \
             it gets no chunk key for it"
        )));
    }
    Ok((host, account))
}

/// `GET`: the account's keys (its current key made on first need).
async fn fetch(
    State(st): State<AppState>,
    who: Caller,
    Path(account): Path<String>,
) -> ApiResult<Json<StoreKeys>> {
    let (host, account) = serving_host(&st, &who, &account).await?;
    let keys = store_keys::keys_for(&st, &account).await?;
    tracing::debug!(%host, %account, "handed the account's chunk keys to a host");
    Ok(Json(keys))
}

/// `POST`: a key the host made itself (adopted if the account has none).
async fn offer(
    State(st): State<AppState>,
    who: Caller,
    Path(account): Path<String>,
    Body(req): Body<OfferStoreKey>,
) -> ApiResult<Json<StoreKeys>> {
    let (host, account) = serving_host(&st, &who, &account).await?;
    Ok(Json(
        store_keys::offer(&st, &host, &account, &req.key).await?,
    ))
}
