//! The HTTP API: the router, the shared request plumbing (token check, rate
//! limits, write-ahead audit, idempotency keys, strict JSON bodies, JSON
//! `405`s) and one module per area.

pub mod accounts;
pub mod actions;
pub mod admin;
pub mod agent;
pub mod buckets;
pub mod certs;
pub mod change_type;
pub mod commands;
pub mod fleet;
pub mod forwards;
pub mod gpus;
pub mod groups;
pub mod heartbeats;
pub mod hosts;
pub mod idempotency;
pub mod instances;
pub mod keys;
pub mod monitor;
pub mod password;
pub mod snapshots;
pub mod store_keys;
pub mod usage;
pub mod volumes;

use crate::auth::Identity;
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{FromRequest, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::collections::HashMap;

/// The whole router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .merge(admin::routes())
        .merge(accounts::routes())
        .merge(hosts::routes())
        .merge(fleet::routes())
        .merge(gpus::routes())
        .merge(instances::routes())
        .merge(snapshots::routes())
        .merge(volumes::routes())
        .merge(agent::routes())
        .merge(store_keys::routes())
        .merge(usage::routes())
        .merge(forwards::routes())
        .merge(password::routes())
        .merge(keys::routes())
        .merge(certs::routes())
        .merge(groups::routes())
        .merge(buckets::routes())
        .merge(monitor::routes())
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard));
    let app = Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/openapi.json", get(crate::openapi::serve))
        .route("/metrics", get(crate::metrics::serve))
        .nest("/v1", v1)
        .merge(crate::console::routes())
        .fallback(|| async { ApiError::NotFound("no such API path".into()) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .with_state(state);
    // Outside the routes' method routers, which add the `Allow` header.
    Router::new()
        .fallback_service(app)
        .layer(axum::middleware::from_fn(method_not_allowed))
}

/// Every `/v1` call: bearer token, rate limit, then (for state-changing
/// methods, and password reveals) a write-ahead audit row (see
/// [`crate::audit`]), and for a POST with an `Idempotency-Key` at most one
/// run (see [`idempotency`]). Refusals without a valid token are counted,
/// not audited, and rate-limited per source address. Hosts whose network
/// groups the call changed are woken once it is done (after its commit;
/// see [`crate::groups::note_wakes`]).
async fn guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| req.uri().path().to_string(), |u| u.path().to_string());
    let who = match authenticate(&st, req.headers()).await {
        Ok(w) => w,
        Err(e) => {
            // The peer address, when the server provides it.
            let source = req
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip());
            let reason = e.refusal_reason().unwrap_or("other");
            return st.limiter.refuse(reason, source, e).into_response();
        }
    };
    if let Err(e) = st.limiter.check(&who.actor) {
        return e.into_response();
    }
    // A person waits on a tenant's or an admin's call: its writes go
    // before the hosts' steady traffic in SQLite's writer queue.
    if who.host.is_none() && who.join.is_none() {
        crate::db::interactive(guarded(st, who, method, path, req, next)).await
    } else {
        guarded(st, who, method, path, req, next).await
    }
}

/// The rest of [`guard`], for an authenticated caller within its rate.
async fn guarded(
    st: AppState,
    who: Identity,
    method: Method,
    path: String,
    mut req: Request,
    next: Next,
) -> Response {
    // A host's steady traffic (heartbeats, metrics batches, op reports,
    // work polls) is too much to audit, and an op report's effect is kept
    // in its operation (state, error, host, time); joins and store-key offers are
    // audited. Revealing a password is a read worth recording.
    let write = method != Method::GET && method != Method::HEAD;
    let host_traffic = path == "/v1/agent/heartbeat"
        || path == gantry_proto::metrics::AGENT_METRICS_PATH
        || path.starts_with("/v1/agent/ops/");
    let audited = (write && !host_traffic) || (method == Method::GET && password::is_reveal(&path));
    // Admin and agent paths are refused before their body is even read.
    let refused = allowed(&who, &path).and_then(|()| match method {
        Method::POST if !path.starts_with("/v1/agent/") => idempotency::key_of(&req),
        _ => Ok(None),
    });
    let key = match refused {
        Ok(k) => k,
        Err(e) => {
            let resp = e.into_response();
            if audited {
                let s = resp.status();
                crate::audit::record(&st.db, &who, method.as_str(), &path, s, None).await;
            }
            return resp;
        }
    };
    let row = if audited {
        match crate::audit::begin(&st.db, &who, method.as_str(), &path).await {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::error!(error = %e, "cannot write an audit row; refusing the call");
                return ApiError::Unavailable(
                    "the call cannot be audited right now, so it was not run; retry shortly".into(),
                )
                .into_response();
            }
        }
    } else {
        None
    };
    req.extensions_mut().insert(who.clone());
    let (resp, woken) = crate::groups::collecting_wakes(async {
        match key {
            Some(k) => idempotency::run(&st, &who, k, req, next).await,
            None => next.run(req).await,
        }
    })
    .await;
    for h in &woken {
        st.wake.wake(h);
    }
    if let Some(id) = row {
        let note = resp
            .extensions()
            .get::<crate::audit::AuditNote>()
            .map(|n| n.0.clone());
        crate::audit::finish(&st.db, &id, resp.status(), note.as_deref()).await;
    }
    resp
}

/// The caller of `req`, from its bearer token.
async fn authenticate(st: &AppState, headers: &axum::http::HeaderMap) -> ApiResult<Identity> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    st.verifier.verify(&st.db, token).await
}

/// Gives a bodiless `405` the standard JSON error body, naming the
/// methods the path allows (from the `Allow` header).
async fn method_not_allowed(req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let resp = next.run(req).await;
    if resp.status() != StatusCode::METHOD_NOT_ALLOWED
        || resp
            .headers()
            .contains_key(axum::http::header::CONTENT_TYPE)
    {
        return resp;
    }
    let allowed = resp
        .headers()
        .get(axum::http::header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(", ");
    ApiError::MethodNotAllowed { method, allowed }.into_response()
}

/// Path rules: a join token may only join; a host credential may only call
/// `/v1/agent/*` (but not join); nobody else may call `/v1/agent/*`; admin
/// paths need an admin.
fn allowed(who: &Identity, path: &str) -> ApiResult<()> {
    let agent = path.starts_with("/v1/agent/");
    if who.join.is_some() {
        if path != "/v1/agent/join" {
            return Err(ApiError::Denied(
                "a join token may only call /v1/agent/join".into(),
            ));
        }
    } else if who.host.is_some() {
        if !agent || path == "/v1/agent/join" {
            return Err(ApiError::Denied(
                "a host credential may only call /v1/agent/ paths".into(),
            ));
        }
    } else if agent {
        return Err(ApiError::Denied(
            "only hosts call /v1/agent/ paths (with a join token or host credential)".into(),
        ));
    } else if path.starts_with("/v1/admin/") {
        who.require_admin()?;
    }
    Ok(())
}

/// A JSON body, parsed strictly: malformed JSON is 400, an unknown or
/// mistyped field is 400 naming the field, an oversized body is 413.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T>
where
    AppState: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let st = <AppState as axum::extract::FromRef<S>>::from_ref(state);
        let limit = st.cfg.max_body_bytes;
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError::TooLarge(limit))?;
        parse_json(&bytes).map(Body)
    }
}

/// A JSON body that may be left out: an empty body reads as `T::default()`.
pub struct OptionalBody<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalBody<T>
where
    AppState: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let st = <AppState as axum::extract::FromRef<S>>::from_ref(state);
        let limit = st.cfg.max_body_bytes;
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError::TooLarge(limit))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        parse_json(&bytes).map(OptionalBody)
    }
}

/// Parses `bytes` as `T`, naming the offending field on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::BadRequest {
                field: None,
                message: format!("malformed JSON: {inner}"),
            };
        }
        let msg = inner.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        let mut field = if path == "." { String::new() } else { path };
        if let Some(name) = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            field = if field.is_empty() {
                name.to_string()
            } else if field == name || field.ends_with(&format!(".{name}")) {
                field
            } else {
                format!("{field}.{name}")
            };
        }
        if field.is_empty() {
            if let Some(name) = msg
                .strip_prefix("missing field `")
                .and_then(|r| r.split('`').next())
            {
                field = name.to_string();
            }
        }
        ApiError::BadRequest {
            message: if field.is_empty() {
                msg
            } else {
                format!("{field}: {msg}")
            },
            field: (!field.is_empty()).then_some(field),
        }
    })
}

/// Query parameters, refusing any not in `allowed`.
pub fn query(q: &HashMap<String, String>, allowed: &[&str]) -> ApiResult<()> {
    match q.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad(
            k.clone(),
            format!(
                "unknown query parameter {k:?} (allowed: {})",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// The account a list is scoped to, as a SQL parameter: a tenant's own
/// (`?account=` ignored), an admin's `?account=` (checked), or `""` for an
/// admin's whole list.
pub fn list_account(who: &Identity, q: &HashMap<String, String>) -> ApiResult<String> {
    Ok(match (&who.account, q.get("account")) {
        (Some(mine), _) => mine.to_string(),
        (None, Some(a)) => a
            .parse::<gantry_proto::AccountId>()
            .map_err(|e| ApiError::bad("account", e.to_string()))?
            .to_string(),
        (None, None) => String::new(),
    })
}

/// Parses a path id; a malformed id is simply not found.
pub fn path_id<T: std::str::FromStr>(s: &str, kind: &str) -> ApiResult<T> {
    s.parse()
        .map_err(|_| ApiError::NotFound(format!("no {kind} {s:?}")))
}

/// `202 Accepted` with a JSON body.
pub fn accepted<T: serde::Serialize>(body: T) -> Response {
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

/// `201 Created` with a JSON body.
pub fn created<T: serde::Serialize>(body: T) -> Response {
    (StatusCode::CREATED, Json(body)).into_response()
}

/// The caller's identity, put there by [`guard`].
pub type Caller = axum::Extension<Identity>;

/// The account an object is created for: the caller's, or for an admin
/// the one named in the body.
pub fn owner_for(
    who: &Identity,
    named: Option<gantry_proto::AccountId>,
) -> ApiResult<gantry_proto::AccountId> {
    match (&who.account, named) {
        (Some(mine), None) => Ok(*mine),
        (Some(mine), Some(n)) if *mine == n => Ok(n),
        (Some(_), Some(_)) => Err(ApiError::bad(
            "account",
            "a tenant token cannot act for another account",
        )),
        (None, Some(n)) => Ok(n),
        (None, None) => Err(ApiError::bad("account", "an admin must name the account")),
    }
}
