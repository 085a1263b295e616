//! Console sessions: sign-in with an API token, the session cookie, CSRF
//! tokens, sign-out.
//!
//! Sign-in checks the token exactly as the API does
//! ([`crate::auth::Verifier::verify`]; refusals count against the source
//! address's limit) and accepts account and admin tokens only. The browser
//! gets a random 256-bit session id in the cookie [`COOKIE`] (`HttpOnly`,
//! `SameSite=Strict`, `Path=/console`, `Secure` behind a TLS-terminating
//! proxy that sends `X-Forwarded-Proto: https`); the database keeps only
//! its blake3 hash, the token sealed under the controller's key, and a
//! random CSRF token every form must carry back. Sessions end after
//! [`SESSION_TTL_MS`] or at sign-out (the row is deleted). Neither the
//! token nor the cookie is ever logged.

use super::{layout, Api, ConsoleError, ConsoleResult, BASE};
use crate::db::col;
use crate::AppState;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "gantry_console";

/// How long a session lasts after sign-in.
pub const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;

/// A signed-in browser: the API as its token, and its CSRF token.
pub struct Session {
    pub api: Api,
    pub csrf: String,
    /// Admin sessions see the Admin page; account sessions their account.
    pub admin: bool,
    pub account: Option<String>,
    id_hash: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn seal_context(id_hash: &str) -> String {
    format!("console_sessions.token:{id_hash}")
}

/// The session id the request's cookie carries, if any.
fn cookie_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl FromRequestParts<AppState> for Session {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> ConsoleResult<Self> {
        let id = cookie_id(&parts.headers).ok_or(ConsoleError::SignedOut)?;
        let id_hash = hex(&crate::auth::hash(&id));
        let row = sqlx::query(
            "SELECT token_sealed, csrf, actor, account_id, expires_ms FROM console_sessions \
             WHERE id_hash = $1",
        )
        .bind(&id_hash)
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or(ConsoleError::SignedOut)?;
        if col::<i64>(&row, "expires_ms")? <= crate::db::now_ms() {
            delete(st, &id_hash).await?;
            return Err(ConsoleError::SignedOut);
        }
        let sealed: String = col(&row, "token_sealed")?;
        let token = st
            .sealer
            .open(&seal_context(&id_hash), &sealed)
            .map_err(|_| ConsoleError::SignedOut)?;
        let account: Option<String> = col(&row, "account_id")?;
        Ok(Session {
            api: Api::new(st.clone(), token),
            csrf: col(&row, "csrf")?,
            admin: account.is_none(),
            account,
            id_hash,
        })
    }
}

impl Session {
    /// Checks a form's CSRF token (constant time).
    pub fn check_csrf(&self, form: &HashMap<String, String>) -> ConsoleResult<()> {
        let got = form.get("csrf").map(String::as_bytes).unwrap_or_default();
        if got.len() == self.csrf.len() && bool::from(got.ct_eq(self.csrf.as_bytes())) {
            Ok(())
        } else {
            Err(ConsoleError::Csrf)
        }
    }

    /// The hidden form field carrying the CSRF token.
    pub fn csrf_field(&self) -> String {
        format!(
            "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
            layout::esc(&self.csrf)
        )
    }
}

async fn delete(st: &AppState, id_hash: &str) -> ConsoleResult<()> {
    sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
        .bind(id_hash)
        .execute(&st.db.pool)
        .await?;
    Ok(())
}

/// `GET /console/sign-in`.
pub async fn sign_in_page() -> Response {
    sign_in_form(None).into_response()
}

fn sign_in_form(error: Option<&str>) -> axum::response::Html<String> {
    let err = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", layout::esc(e)))
        .unwrap_or_default();
    let body = format!(
        "<form method=\"post\" action=\"{BASE}/sign-in\" class=\"card narrow\">\
         <h1>Sign in to Gantry</h1>{err}\
         <label for=\"token\">Account or admin API token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" \
          required autofocus>\
         <button type=\"submit\" id=\"sign-in\">Sign in</button>\
         <p class=\"muted\">The token an admin gave you (<code>gty_…</code>), or the admin token.</p>\
         </form>"
    );
    layout::bare_page("Sign in", &body)
}

#[derive(Deserialize)]
pub struct SignIn {
    token: String,
}

/// `POST /console/sign-in`: checks the token as the API does and starts a
/// session. (No CSRF token here: there is no session yet, and the cookie
/// is `SameSite=Strict`.)
pub async fn sign_in(
    State(st): State<AppState>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Form(f): Form<SignIn>,
) -> ConsoleResult<Response> {
    let token = f.token.trim();
    let who = match st.verifier.verify(&st.db, token).await {
        Ok(w) if w.host.is_none() && w.join.is_none() => w,
        Ok(_) => {
            let page = sign_in_form(Some("host credentials and join tokens cannot sign in"));
            return Ok((axum::http::StatusCode::FORBIDDEN, page).into_response());
        }
        Err(e) => {
            let reason = e.refusal_reason().unwrap_or("other");
            let e = st.limiter.refuse(reason, peer.map(|p| p.0 .0.ip()), e);
            let page = sign_in_form(Some(&e.to_string()));
            return Ok((e.status(), page).into_response());
        }
    };
    let now = crate::db::now_ms();
    sqlx::query("DELETE FROM console_sessions WHERE expires_ms <= $1")
        .bind(now)
        .execute(&st.db.pool)
        .await?;
    let id = hex(&rand::random::<[u8; 32]>());
    let id_hash = hex(&crate::auth::hash(&id));
    let csrf = hex(&rand::random::<[u8; 32]>());
    sqlx::query(
        "INSERT INTO console_sessions (id_hash, token_sealed, csrf, actor, account_id, \
         created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id_hash)
    .bind(st.sealer.seal(&seal_context(&id_hash), token))
    .bind(&csrf)
    .bind(&who.actor)
    .bind(who.account.map(|a| a.to_string()))
    .bind(now)
    .bind(now + SESSION_TTL_MS)
    .execute(&st.db.pool)
    .await?;
    tracing::info!(actor = %who.actor, "console: signed in");
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{COOKIE}={id}; Path={BASE}; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL_MS / 1000,
        if secure { "; Secure" } else { "" }
    );
    let mut resp = Redirect::to(&format!("{BASE}/instances")).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// `POST /console/sign-out`: deletes the session and clears the cookie.
pub async fn sign_out(
    State(st): State<AppState>,
    s: Session,
    Form(f): Form<HashMap<String, String>>,
) -> ConsoleResult<Response> {
    s.check_csrf(&f)?;
    delete(&st, &s.id_hash).await?;
    let mut resp = Redirect::to(&format!("{BASE}/sign-in")).into_response();
    let clear = format!("{COOKIE}=; Path={BASE}; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&clear) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}
