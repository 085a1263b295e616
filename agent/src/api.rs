//! The agent's local operator API over HTTP (axum), bound to loopback.
//!
//! Every route but `/healthz` needs `Authorization: Bearer <token>`, where
//! the token is the one in `<state_dir>/agent-token` (0600, made at first
//! start), compared in constant time. Errors answer with
//! [`gantry_proto::api::error::ErrorBody`].

use crate::images;
use crate::manager::{Manager, ManagerError};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_proto::api::error::ErrorBody;
use gantry_proto::api::local::{ActionRequest, ImageFromSnapshot, ImportImage, TakeSnapshot};
use gantry_proto::spec::InstanceSpec;
use gantry_proto::{InstanceId, OperationId};
use std::sync::Arc;
use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    pub token: Arc<String>,
    /// The metrics collector, when `monitor.enabled`.
    pub monitor: Option<Arc<crate::monitor::Monitor>>,
}

/// An API error: a status and a sentence, and the field when one is to blame.
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: msg.into(),
                field: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        use ManagerError as E;
        let status = match &e {
            E::NotFound(_) | E::NoOperation(_) => StatusCode::NOT_FOUND,
            E::Image(images::ImageError::NotFound(_)) => StatusCode::NOT_FOUND,
            E::Snapshot(crate::snapshots::SnapshotError::Store(
                gantry_store::StoreError::UnknownSnapshot(_),
            )) => StatusCode::NOT_FOUND,
            E::Image(images::ImageError::Exists(_)) => StatusCode::CONFLICT,
            E::Exists(_) | E::Busy { .. } | E::State(_) | E::Conflict(_) => StatusCode::CONFLICT,
            E::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            E::NoMemory { .. } => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let field = match &e {
            E::Invalid(v) => Some(v.field.clone()),
            _ => None,
        };
        Self {
            status,
            body: ErrorBody {
                error: e.to_string(),
                field,
            },
        }
    }
}

impl From<images::ImageError> for ApiError {
    fn from(e: images::ImageError) -> Self {
        match e {
            images::ImageError::Invalid(v) => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: ErrorBody {
                    error: v.to_string(),
                    field: Some(v.field),
                },
            },
            images::ImageError::Exists(_) => Self::new(StatusCode::CONFLICT, e.to_string()),
            other => ManagerError::Image(other).into(),
        }
    }
}

/// JSON body extraction whose rejections use the error body.
pub struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => Err(ApiError::new(r.status(), r.body_text())),
        }
    }
}

fn parse_id<T: std::str::FromStr<Err = gantry_proto::IdParseError>>(
    s: &str,
) -> Result<T, ApiError> {
    s.parse().map_err(|e: gantry_proto::IdParseError| {
        ApiError::new(StatusCode::NOT_FOUND, e.to_string())
    })
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if given.as_bytes().ct_eq(st.token.as_bytes()).into() {
        Ok(next.run(req).await)
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required",
        ))
    }
}

/// Runs blocking manager work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/images", get(list_images).post(import_image))
        .route("/v1/instances", get(list_instances).post(create_instance))
        .route("/v1/instances/{id}", get(get_instance))
        .route("/v1/instances/{id}/actions", post(instance_action))
        .route("/v1/instances/{id}/snapshot", post(take_snapshot))
        .route("/v1/images/from-snapshot", post(image_from_snapshot))
        .route("/v1/operations/{id}", get(get_operation))
        .route("/v1/volumes", get(list_volumes))
        .route("/v1/gpus", get(list_gpus))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .merge(v1)
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

async fn list_images(State(st): State<AppState>) -> Result<Response, ApiError> {
    let recs = st
        .manager
        .layout()
        .load_images()
        .map_err(ManagerError::from)?;
    Ok(Json(recs.iter().map(images::info).collect::<Vec<_>>()).into_response())
}

async fn import_image(
    State(st): State<AppState>,
    Body(req): Body<ImportImage>,
) -> Result<Response, ApiError> {
    let m = st.manager.clone();
    let info = blocking(move || images::import(m.layout(), &req).map_err(ApiError::from)).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list_instances(
    State(st): State<AppState>,
) -> Json<Vec<gantry_proto::api::local::InstanceInfo>> {
    Json(st.manager.list())
}

async fn create_instance(
    State(st): State<AppState>,
    Body(spec): Body<InstanceSpec>,
) -> Result<Response, ApiError> {
    let m = st.manager.clone();
    let op = blocking(move || m.create(spec).map_err(ApiError::from)).await?;
    Ok((StatusCode::ACCEPTED, Json(op)).into_response())
}

async fn get_instance(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: InstanceId = parse_id(&id)?;
    Ok(Json(st.manager.instance_info(id)?).into_response())
}

async fn instance_action(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Body(req): Body<ActionRequest>,
) -> Result<Response, ApiError> {
    let id: InstanceId = parse_id(&id)?;
    let m = st.manager.clone();
    let op = blocking(move || m.action(id, req).map_err(ApiError::from)).await?;
    Ok((StatusCode::ACCEPTED, Json(op)).into_response())
}

async fn take_snapshot(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Body(req): Body<TakeSnapshot>,
) -> Result<Response, ApiError> {
    let id: InstanceId = parse_id(&id)?;
    let m = st.manager.clone();
    let op = blocking(move || m.snapshot(id, req).map_err(ApiError::from)).await?;
    Ok((StatusCode::ACCEPTED, Json(op)).into_response())
}

async fn image_from_snapshot(
    State(st): State<AppState>,
    Body(req): Body<ImageFromSnapshot>,
) -> Result<Response, ApiError> {
    let m = st.manager.clone();
    let info = blocking(move || m.image_from_snapshot(&req).map_err(ApiError::from)).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn get_operation(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: OperationId = parse_id(&id)?;
    Ok(Json(st.manager.operation(id)?).into_response())
}

async fn list_volumes(State(st): State<AppState>) -> Result<Response, ApiError> {
    let vols = st
        .manager
        .layout()
        .load_volumes()
        .map_err(ManagerError::from)?;
    Ok(Json(vols).into_response())
}

async fn list_gpus(State(st): State<AppState>) -> Result<Response, ApiError> {
    let gpus = st.manager.gpus.list();
    Ok(Json(gpus).into_response())
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        {
            let mut text = st.manager.render_metrics();
            if let Some(m) = &st.monitor {
                let mut mon = String::new();
                m.render(&mut mon);
                match text.rfind("# EOF") {
                    Some(at) => text.insert_str(at, &mon),
                    None => text.push_str(&mon),
                }
            }
            text
        },
    )
        .into_response()
}
