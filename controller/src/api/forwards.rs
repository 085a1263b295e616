//! Port forwards of an instance (`/v1/instances/{id}/forwards`: create,
//! list, edit, delete) and the Access view (`GET /v1/instances/{id}/access`).
//!
//! Every change locks the host's row first by moving its access revision
//! ([`access::bump`]), re-reads the instance inside the transaction (a
//! Released instance gets no new forwards) and wakes the host's work long
//! poll after the commit. A forward's host port is the lowest free one in
//! the configured range for its host and protocol.

use super::instances::{gate, load_in};
use super::{created, path_id, Body, Caller};
use crate::access::{self, AccessError, ForwardRow, NewForward};
use crate::db::{col, parsed_opt, rows::InstanceRec, Tx};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use axum::{Json, Router};
use gantry_proto::api::v1::*;
use gantry_proto::ids::{ForwardId, HostId, InstanceId};
use gantry_proto::net::{Protocol, JUPYTER_PORT, MAX_FORWARDS_PER_INSTANCE, SSH_PORT};
use gantry_proto::InstanceState;

/// Longest forward label.
pub const MAX_LABEL: usize = 40;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/instances/{id}/forwards", post(create).get(list))
        .route(
            "/instances/{id}/forwards/{fwd}",
            patch(update).delete(delete),
        )
}

/// The forwards every instance is created with: SSH and JupyterLab (HTTPS).
pub fn defaults() -> [NewForward; 2] {
    [
        NewForward {
            protocol: Protocol::Tcp,
            guest_port: SSH_PORT,
            https: false,
            label: "SSH".into(),
        },
        NewForward {
            protocol: Protocol::Tcp,
            guest_port: JUPYTER_PORT,
            https: true,
            label: "JupyterLab".into(),
        },
    ]
}

pub fn check_label(label: &str) -> ApiResult<()> {
    if label.chars().count() > MAX_LABEL {
        return Err(ApiError::invalid(
            "label",
            format!("must be at most {MAX_LABEL} characters"),
        ));
    }
    if label.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "label",
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_forward(f: &NewForward, https_field: &str) -> ApiResult<()> {
    if f.guest_port == 0 {
        return Err(ApiError::invalid("guest_port", "must be 1 to 65535"));
    }
    if f.https && f.protocol != Protocol::Tcp {
        return Err(ApiError::invalid(
            https_field,
            "HTTPS forwards must use the tcp protocol",
        ));
    }
    check_label(&f.label)
}

/// Forwards may change while the instance is neither Snapshotting nor in
/// a final state, and has a host.
fn writable(rec: &InstanceRec) -> ApiResult<HostId> {
    gate(rec)?;
    if rec.observed == InstanceState::Failed {
        return Err(ApiError::Conflict(format!(
            "instance {} is Failed; its forwards are gone",
            rec.id
        )));
    }
    rec.host
        .ok_or_else(|| ApiError::Conflict(format!("instance {} has no host", rec.id)))
}

fn access_err(e: AccessError) -> ApiError {
    match e {
        AccessError::Exhausted(m) => ApiError::Conflict(m),
        AccessError::Taken => ApiError::Conflict(
            "a host port was taken by another request at the same time; retry".into(),
        ),
        AccessError::Db(e) => ApiError::Db(e),
    }
}

/// Refuses a second forward of `(protocol, guest_port)` on the instance.
async fn check_unique(
    tx: &mut Tx,
    instance: InstanceId,
    protocol: Protocol,
    guest_port: u16,
    except: Option<ForwardId>,
) -> ApiResult<()> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM port_forwards WHERE instance_id = $1 AND protocol = $2 \
         AND guest_port = $3 AND id <> $4",
    )
    .bind(instance.to_string())
    .bind(protocol.as_str())
    .bind(i64::from(guest_port))
    .bind(except.map(|e| e.to_string()).unwrap_or_default())
    .fetch_one(&mut **tx)
    .await?;
    if col::<i64>(&row, "n")? > 0 {
        return Err(ApiError::Conflict(format!(
            "instance {instance} already forwards guest port {guest_port}/{protocol}"
        )));
    }
    Ok(())
}

/// Where an instance's host is reached: address, HTTPS domain and port.
pub struct HostUrls {
    pub address: String,
    pub domain: Option<String>,
    pub https_port: Option<u16>,
}

pub async fn host_urls(st: &AppState, host: &HostId) -> ApiResult<HostUrls> {
    let row = sqlx::query("SELECT name, address, https_port FROM hosts WHERE id = $1")
        .bind(host.to_string())
        .fetch_one(&st.db.pool)
        .await?;
    Ok(HostUrls {
        address: col(&row, "address")?,
        domain: st.cfg.host_domain(&col::<String>(&row, "name")?),
        https_port: col::<Option<i64>>(&row, "https_port")?.and_then(|p| u16::try_from(p).ok()),
    })
}

pub fn info(f: &ForwardRow, at: &HostUrls) -> PortForwardInfo {
    PortForwardInfo {
        id: f.id,
        protocol: f.protocol,
        guest_port: f.guest_port,
        host_port: f.host_port,
        https: f.https,
        label: f.label.clone(),
        url: access::forward_url(&at.address, f.protocol, f.https, f.host_port),
        domain_url: match (&at.domain, f.https) {
            (Some(d), true) => Some(access::domain_url(
                f.guest_port,
                f.instance,
                d,
                at.https_port,
            )),
            _ => None,
        },
    }
}

/// The instance's forwards, by guest port then protocol.
pub async fn forwards_of(st: &AppState, instance: InstanceId) -> ApiResult<Vec<ForwardRow>> {
    let sql = format!(
        "SELECT {} FROM port_forwards WHERE instance_id = $1 ORDER BY guest_port, protocol",
        access::FORWARD_COLS
    );
    let found = sqlx::query(&sql)
        .bind(instance.to_string())
        .fetch_all(&st.db.pool)
        .await?;
    Ok(found
        .iter()
        .map(access::forward_row)
        .collect::<Result<_, _>>()?)
}

/// Runs one forward change in a write transaction that first locks the
/// host (moving its revision) and re-reads the instance; retries lost
/// races; wakes the host after the commit.
async fn change<T, F>(st: &AppState, who: &Caller, id: InstanceId, body: F) -> ApiResult<T>
where
    F: for<'a> Fn(&'a mut Tx, &'a InstanceRec, HostId) -> BoxFut<'a, ApiResult<T>>,
{
    let rec = load_in(&st.db.pool, who, id).await?;
    let host = writable(&rec)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut tx = st.db.begin_write().await?;
        access::bump(&mut tx, &host).await?;
        let rec = load_in(&mut *tx, who, id).await?;
        writable(&rec)?;
        match body(&mut tx, &rec, host).await {
            Err(e) if attempt < crate::db::WRITE_ATTEMPTS && retry(&e) => continue,
            r => {
                let out = r?;
                tx.commit().await?;
                st.wake.wake(&host);
                return Ok(out);
            }
        }
    }
}

fn retry(e: &ApiError) -> bool {
    e.is_retryable() || matches!(e, ApiError::Conflict(m) if m.starts_with("a host port was taken"))
}

/// The future of one change's body, borrowing its transaction.
type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

async fn create(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<CreateForward>,
) -> ApiResult<Response> {
    let id: InstanceId = path_id(&id, "instance")?;
    let f = NewForward {
        protocol: req.protocol,
        guest_port: req.guest_port,
        https: req.https,
        label: req.label,
    };
    load_in(&st.db.pool, &who, id).await?;
    check_forward(&f, "https")?;
    let cfg = st.cfg.clone();
    let row = change(&st, &who, id, |tx, rec, host| {
        let (f, cfg) = (f.clone(), cfg.clone());
        Box::pin(async move {
            let n = sqlx::query("SELECT COUNT(*) AS n FROM port_forwards WHERE instance_id = $1")
                .bind(rec.id.to_string())
                .fetch_one(&mut **tx)
                .await?;
            if col::<i64>(&n, "n")? >= MAX_FORWARDS_PER_INSTANCE as i64 {
                return Err(ApiError::invalid(
                    "forwards",
                    format!("an instance has at most {MAX_FORWARDS_PER_INSTANCE} port forwards"),
                ));
            }
            check_unique(tx, rec.id, f.protocol, f.guest_port, None).await?;
            access::insert_forward(tx, &cfg, &host, rec.id, &rec.account, &f)
                .await
                .map_err(access_err)
        })
    })
    .await?;
    let at = host_urls(&st, &row.host).await?;
    Ok(created(info(&row, &at)))
}

async fn list(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<PortForwardInfo>>> {
    let rec = super::instances::load(&st, &who, &id).await?;
    gate(&rec)?;
    let rows = forwards_of(&st, rec.id).await?;
    let Some(host) = rec.host else {
        return Ok(Json(Vec::new()));
    };
    let at = host_urls(&st, &host).await?;
    Ok(Json(rows.iter().map(|f| info(f, &at)).collect()))
}

async fn load_forward(tx: &mut Tx, instance: InstanceId, fwd: ForwardId) -> ApiResult<ForwardRow> {
    let sql = format!(
        "SELECT {} FROM port_forwards WHERE id = $1 AND instance_id = $2",
        access::FORWARD_COLS
    );
    let row = sqlx::query(&sql)
        .bind(fwd.to_string())
        .bind(instance.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("no port forward {fwd} on instance {instance}"))
        })?;
    Ok(access::forward_row(&row)?)
}

async fn update(
    State(st): State<AppState>,
    who: Caller,
    Path((id, fwd)): Path<(String, String)>,
    Body(req): Body<UpdateForward>,
) -> ApiResult<Json<PortForwardInfo>> {
    let id: InstanceId = path_id(&id, "instance")?;
    let fwd: ForwardId = path_id(&fwd, "port forward")?;
    load_in(&st.db.pool, &who, id).await?;
    if let Some(l) = &req.label {
        check_label(l)?;
    }
    if req.guest_port == Some(0) {
        return Err(ApiError::invalid("guest_port", "must be 1 to 65535"));
    }
    let cfg = st.cfg.clone();
    let row = change(&st, &who, id, |tx, rec, host| {
        let (req, cfg) = (req.clone(), cfg.clone());
        Box::pin(async move {
            let old = load_forward(tx, rec.id, fwd).await?;
            let new = NewForward {
                protocol: req.protocol.unwrap_or(old.protocol),
                guest_port: req.guest_port.unwrap_or(old.guest_port),
                https: req.https.unwrap_or(old.https),
                label: req.label.clone().unwrap_or_else(|| old.label.clone()),
            };
            let field = if req.https.is_some() {
                "https"
            } else {
                "protocol"
            };
            check_forward(&new, field)?;
            check_unique(tx, rec.id, new.protocol, new.guest_port, Some(fwd)).await?;
            let host_port = if new.protocol == old.protocol {
                old.host_port
            } else {
                access::free_port(tx, &cfg, &host, new.protocol, Some(old.host_port))
                    .await
                    .map_err(access_err)?
            };
            sqlx::query(
                "UPDATE port_forwards SET protocol = $1, host_port = $2, guest_port = $3, \
                 https = $4, label = $5 WHERE id = $6",
            )
            .bind(new.protocol.as_str())
            .bind(i64::from(host_port))
            .bind(i64::from(new.guest_port))
            .bind(new.https as i64)
            .bind(&new.label)
            .bind(fwd.to_string())
            .execute(&mut **tx)
            .await
            .map_err(|e| access_err(e.into()))?;
            Ok(ForwardRow {
                protocol: new.protocol,
                host_port,
                guest_port: new.guest_port,
                https: new.https,
                label: new.label,
                ..old
            })
        })
    })
    .await?;
    let at = host_urls(&st, &row.host).await?;
    Ok(Json(info(&row, &at)))
}

async fn delete(
    State(st): State<AppState>,
    who: Caller,
    Path((id, fwd)): Path<(String, String)>,
) -> ApiResult<Response> {
    let id: InstanceId = path_id(&id, "instance")?;
    let fwd: ForwardId = path_id(&fwd, "port forward")?;
    change(&st, &who, id, |tx, rec, _| {
        Box::pin(async move {
            load_forward(tx, rec.id, fwd).await?;
            sqlx::query("DELETE FROM port_forwards WHERE id = $1")
                .bind(fwd.to_string())
                .execute(&mut **tx)
                .await?;
            Ok(())
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/instances/{id}/access`: how to reach the instance.
pub async fn access_view(st: &AppState, rec: &InstanceRec) -> ApiResult<AccessView> {
    let row = sqlx::query(
        "SELECT i.root_password_sealed, i.jupyter_token_sealed, l.ip FROM instances i \
         LEFT JOIN ip_leases l ON l.instance_id = i.id WHERE i.id = $1",
    )
    .bind(rec.id.to_string())
    .fetch_one(&st.db.pool)
    .await?;
    let password_set = col::<Option<String>>(&row, "root_password_sealed")?.is_some();
    let token: Option<String> = col(&row, "jupyter_token_sealed")?;
    let private_ip: Option<std::net::Ipv4Addr> = parsed_opt(&row, "ip", "ip_leases")?;
    let mut view = AccessView {
        host_address: rec.host_address.clone(),
        private_ip: private_ip.map(|i| i.to_string()),
        ssh_user: "root".into(),
        ssh_command: None,
        password_set,
        jupyter_url: None,
        forwards: Vec::new(),
        ca_certificate_path: "/v1/ca.pem".into(),
    };
    let Some(host) = rec.host else {
        return Ok(view);
    };
    let at = host_urls(st, &host).await?;
    view.forwards = forwards_of(st, rec.id)
        .await?
        .iter()
        .map(|f| info(f, &at))
        .collect();
    let ssh = view
        .forwards
        .iter()
        .find(|f| f.protocol == Protocol::Tcp && f.guest_port == SSH_PORT);
    view.ssh_command = ssh.map(|f| format!("ssh -p {} root@{}", f.host_port, at.address));
    let jupyter = view
        .forwards
        .iter()
        .find(|f| f.https && f.guest_port == JUPYTER_PORT);
    if let (Some(j), Some(sealed)) = (jupyter, token) {
        let token = st
            .sealer
            .open(&crate::credentials::token_context(rec.id), &sealed)
            .map_err(|e| ApiError::Conflict(e.to_string()))?;
        let base = j.domain_url.clone().unwrap_or_else(|| j.url.clone());
        view.jupyter_url = Some(format!("{base}lab?token={}", token.expose()));
    }
    Ok(view)
}
