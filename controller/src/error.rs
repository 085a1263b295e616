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
    #[error("a bearer token is required (Authorization: Bearer ...)")]
    Unauthorized,
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
            Self::Unauthorized | Self::BadToken(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::Denied(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PaymentRequired(_) => StatusCode::PAYMENT_REQUIRED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
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
        (self.status(), Json(self.body())).into_response()
    }
}
