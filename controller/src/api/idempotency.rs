//! `Idempotency-Key` on POSTs: a client that retries a POST with the same
//! key gets the first answer replayed instead of a second change (a second
//! credit, a second instance).
//!
//! Rules (per caller: the key space of one token is its own):
//! - the key is 1 to [`MAX_KEY_CHARS`] visible ASCII characters, else `400`
//!   naming the header;
//! - same key, same request (method, path with query, body): the stored
//!   status and body are replayed, with `Idempotency-Replayed: true`;
//! - same key, another request: `422` naming the header;
//! - same key while the first request runs, or after it was interrupted
//!   (the controller stopped before it answered): `409` naming the header
//!   (the outcome is unknown, so it is never run twice);
//! - a `5xx` answer is not kept (the change was rolled back): a retry runs
//!   again;
//! - keys expire [`KEY_TTL_MS`] after their first use and are pruned.

use crate::audit::AuditNote;
use crate::auth::Identity;
use crate::db::now_ms;
use crate::error::ApiError;
use crate::AppState;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The request header.
pub const HEADER: &str = "Idempotency-Key";
/// The response header set on a replayed answer.
pub const REPLAYED: &str = "Idempotency-Replayed";
/// The longest key accepted.
pub const MAX_KEY_CHARS: usize = 255;
/// How long a key is remembered: 24 hours.
pub const KEY_TTL_MS: i64 = 24 * 3600 * 1000;

/// The request's key: `None` without the header, `400` when malformed.
pub fn key_of(req: &Request) -> Result<Option<String>, ApiError> {
    let Some(v) = req.headers().get(HEADER) else {
        return Ok(None);
    };
    let key = v.to_str().unwrap_or_default();
    if key.is_empty() || key.len() > MAX_KEY_CHARS || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad(
            HEADER,
            format!("{HEADER} must be 1 to {MAX_KEY_CHARS} visible ASCII characters"),
        ));
    }
    Ok(Some(key.to_string()))
}

/// Runs `req` (whose caller is `who`, with key `key`) at most once.
pub async fn run(st: &AppState, who: &Identity, key: String, req: Request, next: Next) -> Response {
    match run_inner(st, who, &key, req, next).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run_inner(
    st: &AppState,
    who: &Identity,
    key: &str,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let limit = st.cfg.max_body_bytes;
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge(limit))?;
    let target = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let hash = request_hash(parts.method.as_str(), target, &bytes);
    if let Some(stored) = claim(st, who, key, &hash).await? {
        return Ok(stored);
    }
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let (parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot read an answer to keep for its Idempotency-Key");
            forget(st, who, key).await;
            return Err(ApiError::Unavailable("the answer could not be read".into()));
        }
    };
    let text = std::str::from_utf8(&bytes).ok();
    match text.filter(|_| !parts.status.is_server_error()) {
        Some(text) => {
            let ct = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            keep(st, who, key, parts.status, text, ct).await;
        }
        None => forget(st, who, key).await,
    }
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

/// The blake3 hash of what was asked.
fn request_hash(method: &str, target: &str, body: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(method.as_bytes());
    h.update(b"\0");
    h.update(target.as_bytes());
    h.update(b"\0");
    h.update(body);
    h.finalize().to_hex().to_string()
}

/// Takes the key for this request (`None`: go ahead), or answers from what
/// it holds: the stored answer, or a refusal.
async fn claim(
    st: &AppState,
    who: &Identity,
    key: &str,
    hash: &str,
) -> Result<Option<Response>, ApiError> {
    let now = now_ms();
    if rand::random::<u8>() < 4 {
        prune(st, now).await;
    }
    for _ in 0..2 {
        let row = sqlx::query(
            "SELECT request_hash, status, body, content_type, created_ms FROM idempotency_keys \
             WHERE actor = $1 AND idem_key = $2",
        )
        .bind(&who.actor)
        .bind(key)
        .fetch_optional(&st.db.pool)
        .await?;
        match row {
            Some(r) if crate::db::col::<i64>(&r, "created_ms")? >= now - KEY_TTL_MS => {
                return stored(&r, key, hash).map(Some);
            }
            Some(_) => {
                sqlx::query(
                    "DELETE FROM idempotency_keys WHERE actor = $1 AND idem_key = $2 \
                     AND created_ms < $3",
                )
                .bind(&who.actor)
                .bind(key)
                .bind(now - KEY_TTL_MS)
                .execute(&st.db.pool)
                .await?;
            }
            None => {}
        }
        let ins = sqlx::query(
            "INSERT INTO idempotency_keys (actor, idem_key, request_hash, created_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&who.actor)
        .bind(key)
        .bind(hash)
        .bind(now)
        .execute(&st.db.pool)
        .await;
        match ins {
            Ok(_) => return Ok(None),
            // Another request took the key meanwhile: look again.
            Err(e) if crate::db::is_unique_violation(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(busy(key))
}

/// The answer to a retry, from the key's row.
fn stored(r: &sqlx::any::AnyRow, key: &str, hash: &str) -> Result<Response, ApiError> {
    use crate::db::col;
    if col::<String>(r, "request_hash")? != hash {
        return Err(ApiError::invalid(
            HEADER,
            format!(
                "{HEADER} {key:?} was already used for a different request (method, path or \
                 body); use a new key for a new request"
            ),
        ));
    }
    let Some(status) = col::<Option<i64>>(r, "status")? else {
        return Err(busy(key));
    };
    let body: String = col::<Option<String>>(r, "body")?.unwrap_or_default();
    let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
    let mut resp = (status, body).into_response();
    let ct = col::<Option<String>>(r, "content_type")?;
    resp.headers_mut().remove(header::CONTENT_TYPE);
    if let Some(v) = ct.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp.headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    resp.extensions_mut().insert(AuditNote(format!(
        "replayed the stored answer to {HEADER} {key:?}"
    )));
    Ok(resp)
}

fn busy(key: &str) -> ApiError {
    ApiError::Conflict(format!(
        "{HEADER} {key:?}: the first request with this key has not answered (still running, or \
         interrupted); check whether it took effect, then retry with a new key"
    ))
}

/// Stores the answer for replays. A failure is logged: the key then
/// stays taken without an answer, and retries get `409`.
async fn keep(
    st: &AppState,
    who: &Identity,
    key: &str,
    status: StatusCode,
    body: &str,
    ct: Option<&str>,
) {
    let res = sqlx::query(
        "UPDATE idempotency_keys SET status = $1, body = $2, content_type = $3 \
         WHERE actor = $4 AND idem_key = $5",
    )
    .bind(status.as_u16() as i64)
    .bind(body)
    .bind(ct)
    .bind(&who.actor)
    .bind(key)
    .execute(&st.db.pool)
    .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "cannot store the answer for an Idempotency-Key");
    }
}

/// Frees the key (the request failed and changed nothing).
async fn forget(st: &AppState, who: &Identity, key: &str) {
    let res = sqlx::query("DELETE FROM idempotency_keys WHERE actor = $1 AND idem_key = $2")
        .bind(&who.actor)
        .bind(key)
        .execute(&st.db.pool)
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "cannot free an Idempotency-Key");
    }
}

/// Deletes expired keys.
pub async fn prune(st: &AppState, now: i64) {
    let res = sqlx::query("DELETE FROM idempotency_keys WHERE created_ms < $1")
        .bind(now - KEY_TTL_MS)
        .execute(&st.db.pool)
        .await;
    if let Err(e) = res {
        tracing::warn!(error = %e, "cannot prune expired idempotency keys");
    }
}
