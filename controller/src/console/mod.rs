//! The web console: server-rendered HTML pages under `/console/`, served
//! by the controller itself (the CSS and the small script are built into
//! the binary; nothing is fetched from elsewhere).
//!
//! A person signs in with an account or admin API token ([`session`]);
//! the console keeps it sealed in the session row and makes every read and
//! write as an in-process call to the public API (`/v1/...`) with that
//! token ([`Api`]). So the pages follow the API's rules exactly: token
//! checks (revocation, expiry, disabled accounts), account scoping
//! (another account's object is a 404 page), admin-only paths, rate limits,
//! the write-ahead audit and the instance state machine's allowed actions.
//!
//! Pages: [`instances`] (My Instances, batch actions, create),
//! [`instance_tabs`] (one instance: Access, Monitor, Billing, Config,
//! Hardware, Network Group; Take Snapshot, Release), [`snapshots`],
//! [`admin`] (hosts and GPUs, accounts, audit log, failed operations).
//! [`layout`] has the page shell and the HTML escaping every page uses.

pub mod admin;
pub mod charts;
pub mod instance_tabs;
pub mod instances;
pub mod layout;
pub mod session;
pub mod snapshots;

use crate::AppState;
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use gantry_proto::net::Secret;
use serde_json::Value;

/// The console's own paths start here; `/` redirects to it.
pub const BASE: &str = "/console";

/// Why a console page could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Not signed in (or the session expired): back to the sign-in page.
    #[error("sign in first")]
    SignedOut,
    /// A form without the session's CSRF token.
    #[error("the form is stale or forged (missing or wrong CSRF token); reload the page")]
    Csrf,
    /// The API refused the call: its status and sentence.
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    /// A form field the console checks itself.
    #[error("{field}: {message}")]
    Field { field: String, message: String },
    #[error("internal error")]
    Db(#[from] crate::db::DbError),
    #[error("internal error")]
    Sql(#[from] sqlx::Error),
}

impl ConsoleError {
    /// The status the page answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::SignedOut => StatusCode::SEE_OTHER,
            Self::Csrf => StatusCode::FORBIDDEN,
            Self::Api { status, .. } => *status,
            Self::Field { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Db(_) | Self::Sql(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Field {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        match &self {
            // A token revoked or expired since sign-in ends the session too.
            Self::SignedOut => return Redirect::to(&format!("{BASE}/sign-in")).into_response(),
            Self::Api { status, .. } if *status == StatusCode::UNAUTHORIZED => {
                return Redirect::to(&format!("{BASE}/sign-in")).into_response()
            }
            Self::Db(e) => tracing::error!(error = %e, "console: database error"),
            Self::Sql(e) => tracing::error!(error = %e, "console: database error"),
            _ => {}
        }
        let status = self.status();
        let title = match status {
            StatusCode::NOT_FOUND => "Not found".to_string(),
            s => format!("Error {}", s.as_u16()),
        };
        let body = format!(
            "<h1>{}</h1><p class=\"error\" role=\"alert\">{}</p>\
             <p><a href=\"{BASE}/instances\">Back to My Instances</a></p>",
            layout::esc(&title),
            layout::esc(&self.to_string())
        );
        (status, layout::bare_page(&title, &body)).into_response()
    }
}

pub type ConsoleResult<T> = Result<T, ConsoleError>;

/// The console's routes (mounted by [`crate::api::router`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(|| async { Redirect::to(&format!("{BASE}/instances")) }),
        )
        .route(
            BASE,
            get(|| async { Redirect::to(&format!("{BASE}/instances")) }),
        )
        .route(
            &format!("{BASE}/sign-in"),
            get(session::sign_in_page).post(session::sign_in),
        )
        .route(&format!("{BASE}/sign-out"), post(session::sign_out))
        .route(&format!("{BASE}/assets/console.css"), get(css))
        .route(&format!("{BASE}/assets/console.js"), get(js))
        .merge(instances::routes())
        .merge(instance_tabs::routes())
        .merge(snapshots::routes())
        .merge(admin::routes())
}

async fn css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    )
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    )
}

fn asset(ct: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, ct),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// The public API, called in-process with the session's token: every rule
/// of the API (authentication, scoping, audit, rate limits) applies.
pub struct Api {
    st: AppState,
    token: Secret,
}

impl Api {
    pub fn new(st: AppState, token: Secret) -> Self {
        Self { st, token }
    }

    /// `GET path`: the JSON body, or the API's refusal.
    pub async fn get(&self, path: &str) -> ConsoleResult<Value> {
        self.send(Method::GET, path, None).await
    }

    /// A call whose refusal is the caller's to show: status and body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> ConsoleResult<(StatusCode, Value)> {
        let mut req = Request::builder().method(method).uri(path).header(
            header::AUTHORIZATION,
            format!("Bearer {}", self.token.expose()),
        );
        let body = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(b).unwrap_or_default())
            }
            None => Body::empty(),
        };
        let req = req.body(body).map_err(|e| ConsoleError::Api {
            status: StatusCode::BAD_REQUEST,
            message: format!("bad path: {e}"),
        })?;
        let app = crate::api::router(self.st.clone());
        let resp = tower::ServiceExt::oneshot(app, req)
            .await
            .unwrap_or_else(|e| match e {});
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .unwrap_or_default();
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, v))
    }

    /// A call whose refusal becomes the page's error.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> ConsoleResult<Value> {
        let (status, v) = self.call(method, path, body).await?;
        if status.is_success() {
            return Ok(v);
        }
        Err(ConsoleError::Api {
            status,
            message: v["error"]
                .as_str()
                .unwrap_or("the API refused the call")
                .to_string(),
        })
    }
}

/// `&`-joined `k=v` pairs, each value percent-encoded for a URL query.
pub fn query_string(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded_serializer();
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn form_urlencoded_serializer() -> url::form_urlencoded::Serializer<'static, String> {
    url::form_urlencoded::Serializer::new(String::new())
}

/// A path segment from a page's URL, checked to be an id-like token
/// (letters, digits, `-`, `_`) before it goes into an API path.
pub fn id_segment(s: &str) -> ConsoleResult<&str> {
    if !s.is_empty()
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(s)
    } else {
        Err(ConsoleError::Api {
            status: StatusCode::NOT_FOUND,
            message: format!("no such object {s:?}"),
        })
    }
}
