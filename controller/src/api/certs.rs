//! Hosts' access state and certificates: what the work answer carries
//! ([`access_and_tls`]: the subnet and forwards, the HTTPS proxy's
//! certificate, issued or renewed by the controller's CA when missing,
//! within 30 days of expiry or issued for other names), the CA download
//! (`GET /v1/ca.pem`) and an operator's own certificate for a host
//! (`PUT/DELETE /v1/admin/hosts/{id}/certificate`).

use super::{path_id, Body, Caller};
use crate::access::{self, AccessError};
use crate::db::{col, now_ms, Tx};
use crate::error::{ApiError, ApiResult};
use crate::{pki, AppState};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use gantry_proto::api::v1::{HostInfo, SetHostCertificate};
use gantry_proto::ids::HostId;
use gantry_proto::net::{HostAccess, HostTls, Ipv4Net};

pub fn routes() -> Router<AppState> {
    Router::new().route("/ca.pem", get(ca_pem)).route(
        "/admin/hosts/{id}/certificate",
        put(set_certificate).delete(clear_certificate),
    )
}

/// `GET /v1/ca.pem`: the CA that signs the hosts' HTTPS certificates.
async fn ca_pem(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        st.ca.pem().to_string(),
    )
        .into_response()
}

/// What the hosts row says about access and TLS.
struct HostRow {
    name: String,
    address: String,
    subnet: Option<Ipv4Net>,
    domain: Option<String>,
    fingerprint: Option<String>,
    not_after_ms: i64,
    names: Option<String>,
    custom: bool,
    chain_pem: Option<String>,
    key_sealed: Option<String>,
}

async fn read_host(st: &AppState, host: &HostId) -> ApiResult<HostRow> {
    let r = sqlx::query(
        "SELECT name, address, access_subnet, access_domain, tls_fingerprint, tls_not_after_ms, \
         tls_names, tls_custom, tls_cert_pem, tls_key_sealed FROM hosts WHERE id = $1",
    )
    .bind(host.to_string())
    .fetch_optional(&st.db.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no host {host}")))?;
    Ok(HostRow {
        name: col(&r, "name")?,
        address: col(&r, "address")?,
        subnet: crate::db::parsed_opt(&r, "access_subnet", "hosts")?,
        domain: col(&r, "access_domain")?,
        fingerprint: col(&r, "tls_fingerprint")?,
        not_after_ms: col::<Option<i64>>(&r, "tls_not_after_ms")?.unwrap_or(0),
        names: col(&r, "tls_names")?,
        custom: col::<i64>(&r, "tls_custom")? != 0,
        chain_pem: col(&r, "tls_cert_pem")?,
        key_sealed: col(&r, "tls_key_sealed")?,
    })
}

/// The names a CA-issued certificate of the host covers: `*.<domain>` and
/// `<domain>` when it has a domain, and its address.
fn cert_names(domain: Option<&str>, address: &str) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(d) = domain {
        names.push(format!("*.{d}"));
        names.push(d.to_string());
    }
    names.push(address.to_string());
    names
}

fn sealing_context(host: &HostId) -> String {
    format!("hosts.tls_key:{host}")
}

/// The host's access state and certificate as its agent should have them,
/// allocating its subnet and issuing or renewing its certificate first
/// when needed. A host whose subnet cannot be allocated gets no access
/// state (logged).
pub async fn access_and_tls(
    st: &AppState,
    host: &HostId,
) -> ApiResult<(Option<HostAccess>, Option<HostTls>)> {
    let mut h = read_host(st, host).await?;
    let domain = st.cfg.host_domain(&h.name);
    let names = cert_names(domain.as_deref(), &h.address).join(",");
    let now = now_ms();
    let renew = h.chain_pem.is_none()
        || (!h.custom && (pki::due(h.not_after_ms, now) || h.names.as_deref() != Some(&names)));
    if h.subnet.is_none() || h.domain != domain || renew {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= crate::db::WRITE_ATTEMPTS;
            match prepare(st, host, &h, renew, now).await {
                Ok(true) => break,
                Err(e) if e.is_retryable() && !last => {
                    st.metrics.retried(crate::metrics::Write::HostAccess);
                }
                Ok(false) if !last => st.metrics.retried(crate::metrics::Write::HostAccess),
                Ok(false) => {
                    tracing::warn!(%host, "preparing the host's access state kept racing");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        h = read_host(st, host).await?;
    }
    let access = match h.subnet {
        Some(subnet) => Some(access::host_access(&st.db.pool, host, subnet).await?.0),
        None => None,
    };
    let tls = match (h.fingerprint, h.chain_pem, h.key_sealed) {
        (Some(fingerprint), Some(cert_chain_pem), Some(sealed)) => {
            match st.sealer.open(&sealing_context(host), &sealed) {
                Ok(key_pem) => Some(HostTls {
                    fingerprint,
                    cert_chain_pem,
                    key_pem,
                }),
                Err(e) => {
                    tracing::error!(%host, error = %e, "cannot open the host's TLS key");
                    None
                }
            }
        }
        _ => None,
    };
    Ok((access, tls))
}

/// One write transaction: the subnet and domain, and a fresh certificate
/// when `renew` (unless another request renewed it meanwhile). `false`:
/// another request took the subnet first; try again. The key is made,
/// signed and sealed before the transaction: a fleet's hosts all ask at
/// once after a first start, and SQLite's one writer waits for nothing
/// but the statements.
async fn prepare(
    st: &AppState,
    host: &HostId,
    h: &HostRow,
    renew: bool,
    now: i64,
) -> ApiResult<bool> {
    let fresh = if renew {
        let domain = st.cfg.host_domain(&h.name);
        let names = cert_names(domain.as_deref(), &h.address);
        let leaf = st
            .ca
            .issue(&names, now)
            .map_err(|e| ApiError::Conflict(format!("cannot issue a certificate: {e}")))?;
        let sealed = st
            .sealer
            .seal(&sealing_context(host), leaf.key_pem.expose());
        Some((leaf, sealed, names.join(",")))
    } else {
        None
    };
    let mut tx = st.db.begin_write().await?;
    match access::prepare_host(&mut tx, &st.cfg, host).await {
        Ok(_) => {}
        Err(AccessError::Exhausted(why)) => {
            tracing::warn!(%host, %why, "the host has no access subnet");
        }
        Err(AccessError::Taken) => return Ok(false),
        Err(AccessError::Db(e)) => return Err(e.into()),
    }
    if let Some((leaf, sealed, names)) = &fresh {
        store_cert(&mut tx, host, leaf, sealed, names, h.fingerprint.as_deref()).await?;
    }
    tx.commit().await?;
    if let Some((leaf, ..)) = &fresh {
        tracing::info!(%host, fingerprint = %leaf.fingerprint, "issued the host's HTTPS certificate");
    }
    Ok(true)
}

async fn store_cert(
    tx: &mut Tx,
    host: &HostId,
    leaf: &pki::Issued,
    sealed: &str,
    names: &str,
    was: Option<&str>,
) -> ApiResult<()> {
    sqlx::query(
        "UPDATE hosts SET tls_cert_pem = $1, tls_key_sealed = $2, tls_fingerprint = $3, \
         tls_not_after_ms = $4, tls_names = $5, tls_custom = 0 WHERE id = $6 \
         AND COALESCE(tls_fingerprint, '') = $7",
    )
    .bind(&leaf.chain_pem)
    .bind(sealed)
    .bind(&leaf.fingerprint)
    .bind(leaf.not_after_ms)
    .bind(names)
    .bind(host.to_string())
    .bind(was.unwrap_or(""))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// `PUT /v1/admin/hosts/{id}/certificate`: the operator's certificate
/// replaces the CA's (it is never renewed by the controller).
async fn set_certificate(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<SetHostCertificate>,
) -> ApiResult<Json<HostInfo>> {
    who.require_admin()?;
    let host: HostId = path_id(&id, "host")?;
    super::hosts::load(&st, &host).await?;
    let checked = pki::check_operator(&req.cert_chain_pem, req.key_pem.expose(), now_ms())?;
    sqlx::query(
        "UPDATE hosts SET tls_cert_pem = $1, tls_key_sealed = $2, tls_fingerprint = $3, \
         tls_not_after_ms = $4, tls_names = NULL, tls_custom = 1 WHERE id = $5",
    )
    .bind(&req.cert_chain_pem)
    .bind(
        st.sealer
            .seal(&sealing_context(&host), req.key_pem.expose()),
    )
    .bind(&checked.fingerprint)
    .bind(checked.not_after_ms)
    .bind(host.to_string())
    .execute(&st.db.pool)
    .await?;
    tracing::info!(%host, fingerprint = %checked.fingerprint, "operator certificate set");
    st.wake.wake(&host);
    Ok(Json(super::hosts::load(&st, &host).await?))
}

/// `DELETE /v1/admin/hosts/{id}/certificate`: back to a CA-issued one
/// (issued at the host's next work poll).
async fn clear_certificate(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    who.require_admin()?;
    let host: HostId = path_id(&id, "host")?;
    super::hosts::load(&st, &host).await?;
    sqlx::query(
        "UPDATE hosts SET tls_cert_pem = NULL, tls_key_sealed = NULL, tls_fingerprint = NULL, \
         tls_not_after_ms = NULL, tls_names = NULL, tls_custom = 0 WHERE id = $1",
    )
    .bind(host.to_string())
    .execute(&st.db.pool)
    .await?;
    st.wake.wake(&host);
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}
