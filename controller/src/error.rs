//! The API's error type: every refusal becomes an HTTP status and an
//! [`ErrorBody`] sentence (naming the field when one is to blame).

use crate::db::DbError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use gantry_proto::api::error::ErrorBody;
use gantry_proto::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// 401: no token at all.
    #[error("a bearer token is required (Authorization: Bearer ...)")]
    Unauthorized,
    /// 401: a token that matches nothing (unknown id or wrong secret).
    #[error("the bearer token is not valid (unknown token or wrong secret)")]
    UnknownToken,
    /// 401: a token an admin revoked.
    #[error("this token was revoked by an admin; ask an admin for a new one")]
    RevokedToken,
    /// 401: a token of a disabled account.
    #[error("account {0} is disabled; ask an admin to enable it")]
    AccountDisabled(String),
    /// 401 with a reason (an expired or already used join token).
    #[error("{0}")]
    BadToken(String),
    #[error("this call needs an admin token")]
    Forbidden,
    /// 403 with a reason (host credentials, join tokens, other hosts' objects).
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PaymentRequired(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("too many requests for this token; slow down")]
    RateLimited,
    /// 429 for refused requests from one source address, with the seconds
    /// to wait (sent as `Retry-After`).
    #[error("too many refused requests from this address; retry in {0} s")]
    SourceLimited(u64),
    /// 405, naming the methods the path allows.
    #[error("method {method} is not allowed on this path (allowed: {allowed})")]
    MethodNotAllowed { method: String, allowed: String },
    /// 503 when a call cannot be audited (nothing was changed).
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Db(#[from] DbError),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// Whether the database aborted the transaction over a conflict with
    /// another one, so that running it again is safe.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Db(e) if crate::db::is_retryable(e))
    }

    /// The metric label of a refusal without a valid token, or `None`
    /// for any other error.
    pub fn refusal_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::Unauthorized => "missing",
            Self::UnknownToken => "unknown",
            Self::RevokedToken => "revoked",
            Self::AccountDisabled(_) => "disabled",
            Self::BadToken(_) => "bad_token",
            Self::NotFound(_) => "account_deleted",
            _ => return None,
        })
    }

    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid(ValidationError::new(field, message))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized
            | Self::UnknownToken
            | Self::RevokedToken
            | Self::AccountDisabled(_)
            | Self::BadToken(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::Denied(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PaymentRequired(_) => StatusCode::PAYMENT_REQUIRED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited | Self::SourceLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            // Busy, not broken: the client may retry.
            Self::Db(DbError::NoTurn(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> ErrorBody {
        let field = match self {
            Self::BadRequest { field, .. } => field.clone(),
            Self::Invalid(v) => Some(v.field.clone()),
            _ => None,
        };
        ErrorBody {
            error: self.to_string(),
            field,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Db(e) = &self {
            tracing::error!(error = %e, "request failed");
        }
        let mut resp = (self.status(), Json(self.body())).into_response();
        if let Self::SourceLimited(secs) = &self {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, (*secs).into());
        }
        if let Self::MethodNotAllowed { allowed, .. } = &self {
            if let Ok(v) = axum::http::HeaderValue::from_str(allowed) {
                resp.headers_mut().insert(axum::http::header::ALLOW, v);
            }
        }
        resp
    }
}
