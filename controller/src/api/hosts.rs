//! Admin host calls: register (pre-provision, with capacity and GPUs),
//! list, get, cordon, uncordon, drain, revoke the credential, set the
//! region; and the host rows the agent protocol's join and heartbeat write
//! ([`insert_host`], [`sync_gpus`], [`join_target`]).

use super::{created, path_id, Body, Caller};
use crate::db::{col, is_unique_violation, now_ms, rows, to_time, Tx};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_proto::api::v1::*;
use gantry_proto::ids::HostId;
use gantry_proto::validate;
use std::collections::{HashMap, HashSet};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/hosts", post(register).get(list))
        .route("/admin/hosts/{id}", get(get_one))
        .route("/admin/hosts/{id}/cordon", post(cordon))
        .route("/admin/hosts/{id}/uncordon", post(uncordon))
        .route("/admin/hosts/{id}/drain", post(super::fleet::drain))
        .route("/admin/hosts/{id}/revoke", post(revoke))
        .route("/admin/hosts/{id}/region", post(set_region))
}

fn check(req: &RegisterHost) -> ApiResult<()> {
    validate::object_name("name", &req.name)?;
    validate::object_name("address", &req.address)?;
    check_capacity("", req.vcpus, req.memory_mib, req.disk_gib, &req.gpus)
}

/// Checks a host's capacity; `prefix` goes before field names
/// (`capacity.` in agent bodies).
pub(crate) fn check_capacity(
    prefix: &str,
    vcpus: u32,
    memory_mib: u64,
    disk_gib: u64,
    gpus: &[GpuDevice],
) -> ApiResult<()> {
    use gantry_proto::spec::{MAX_DISK_GIB, MAX_MEMORY_MIB, MAX_VCPUS};
    let f = |n: &str| format!("{prefix}{n}");
    validate::in_range(&f("vcpus"), vcpus.into(), 1, MAX_VCPUS * 16)?;
    validate::in_range(&f("memory_mib"), memory_mib, 1024, MAX_MEMORY_MIB * 16)?;
    validate::in_range(&f("disk_gib"), disk_gib, 1, MAX_DISK_GIB * 16)?;
    if gpus.len() > MAX_HOST_GPUS {
        return Err(ApiError::invalid(
            f("gpus"),
            format!("at most {MAX_HOST_GPUS} GPUs per host"),
        ));
    }
    let mut seen = HashSet::new();
    for (i, g) in gpus.iter().enumerate() {
        crate::gpus::check_device(&f(&format!("gpus[{i}]")), g)?;
        if !seen.insert(g.pci) {
            return Err(ApiError::invalid(
                f(&format!("gpus[{i}].pci")),
                format!("{} is listed twice", g.pci),
            ));
        }
    }
    Ok(())
}

async fn register(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<RegisterHost>,
) -> ApiResult<Response> {
    who.require_admin()?;
    check(&req)?;
    let region =
        crate::regions::or_default("region", req.region.as_deref(), &st.cfg.default_region)?;
    let id = HostId::new();
    let mut tx = st.db.begin_write().await?;
    insert_host(&mut tx, id, &req, &region).await?;
    tx.commit().await?;
    Ok(created(load(&st, &id).await?))
}

/// Inserts a healthy host (heard from now) in `region` and its GPUs.
pub(crate) async fn insert_host(
    tx: &mut Tx,
    id: HostId,
    req: &RegisterHost,
    region: &str,
) -> ApiResult<()> {
    let res = sqlx::query(
        "INSERT INTO hosts (id, name, address, vcpus, memory_mib, disk_gib, health, \
         last_heartbeat_ms, created_ms, region) VALUES ($1, $2, $3, $4, $5, $6, 'healthy', $7, \
         $7, $8)",
    )
    .bind(id.to_string())
    .bind(&req.name)
    .bind(&req.address)
    .bind(req.vcpus as i64)
    .bind(req.memory_mib as i64)
    .bind(req.disk_gib as i64)
    .bind(now_ms())
    .bind(region)
    .execute(&mut **tx)
    .await;
    match res {
        Err(e) if is_unique_violation(&e) => {
            return Err(ApiError::Conflict(format!(
                "a host named {:?} already exists",
                req.name
            )))
        }
        r => r?,
    };
    sync_gpus(tx, &id, &req.gpus).await?;
    Ok(())
}

/// Makes the host's GPU rows match its report (see [`crate::gpus::sync`]).
pub(crate) async fn sync_gpus(tx: &mut Tx, id: &HostId, gpus: &[GpuDevice]) -> ApiResult<()> {
    Ok(crate::gpus::sync(tx, id, gpus).await?)
}

const HOST_SELECT: &str = "SELECT h.id, h.name, h.address, h.vcpus, h.memory_mib, h.disk_gib, \
     h.used_vcpus, h.used_memory_mib, h.used_disk_gib, h.health, h.problems, h.cordoned, h.draining, \
     h.last_heartbeat_ms, h.access_subnet, h.access_domain, h.https_port, h.region, h.revoked_ms, \
     (SELECT COUNT(*) FROM instances i WHERE i.host_id = h.id AND \
     i.observed_state NOT IN ('Released', 'Failed')) AS instances FROM hosts h";

fn host_row(r: &sqlx::any::AnyRow, gpus: Vec<GpuInfo>) -> ApiResult<HostInfo> {
    Ok(HostInfo {
        id: crate::db::parsed(r, "id", "hosts")?,
        name: col(r, "name")?,
        address: col(r, "address")?,
        vcpus: col::<i64>(r, "vcpus")? as u32,
        memory_mib: col::<i64>(r, "memory_mib")? as u64,
        disk_gib: col::<i64>(r, "disk_gib")? as u64,
        used_vcpus: col::<i64>(r, "used_vcpus")? as u32,
        used_memory_mib: col::<i64>(r, "used_memory_mib")? as u64,
        used_disk_gib: col::<i64>(r, "used_disk_gib")? as u64,
        gpus,
        health: rows::health(&col::<String>(r, "health")?),
        access_subnet: col(r, "access_subnet")?,
        domain: col(r, "access_domain")?,
        https_port: col::<Option<i64>>(r, "https_port")?.and_then(|p| u16::try_from(p).ok()),
        problems: col::<String>(r, "problems")?
            .lines()
            .map(str::to_string)
            .collect(),
        cordoned: col::<i64>(r, "cordoned")? != 0,
        draining: col::<i64>(r, "draining")? != 0,
        last_heartbeat: to_time(col(r, "last_heartbeat_ms")?),
        instances: col::<i64>(r, "instances")? as u64,
        region: col(r, "region")?,
        revoked_at: col::<Option<i64>>(r, "revoked_ms")?.map(to_time),
    })
}

async fn gpus_of(st: &AppState, host: Option<&HostId>) -> ApiResult<HashMap<String, Vec<GpuInfo>>> {
    Ok(crate::gpus::of_hosts(&st.db.pool, host).await?)
}

pub(crate) async fn load(st: &AppState, id: &HostId) -> ApiResult<HostInfo> {
    let row = sqlx::query(&format!("{HOST_SELECT} WHERE h.id = $1"))
        .bind(id.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no host {id}")))?;
    let mut gpus = gpus_of(st, Some(id)).await?;
    host_row(&row, gpus.remove(&id.to_string()).unwrap_or_default())
}

/// The host's health and last heartbeat only (one light query, for views
/// that show them beside an instance).
pub(crate) async fn health_of(
    st: &AppState,
    id: &HostId,
) -> ApiResult<(HostHealth, chrono::DateTime<chrono::Utc>)> {
    let row = sqlx::query("SELECT health, last_heartbeat_ms FROM hosts WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no host {id}")))?;
    Ok((
        rows::health(&col::<String>(&row, "health")?),
        to_time(col(&row, "last_heartbeat_ms")?),
    ))
}

async fn list(State(st): State<AppState>, who: Caller) -> ApiResult<Json<Vec<HostInfo>>> {
    who.require_admin()?;
    let found = sqlx::query(&format!("{HOST_SELECT} ORDER BY h.name"))
        .fetch_all(&st.db.pool)
        .await?;
    let mut gpus = gpus_of(&st, None).await?;
    let mut out = Vec::with_capacity(found.len());
    for r in &found {
        let id: String = col(r, "id")?;
        out.push(host_row(r, gpus.remove(&id).unwrap_or_default())?);
    }
    Ok(Json(out))
}

async fn get_one(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfo>> {
    who.require_admin()?;
    Ok(Json(load(&st, &path_id(&id, "host")?).await?))
}

async fn set_flags(st: &AppState, id: &str, sql: &str) -> ApiResult<Json<HostInfo>> {
    let id: HostId = path_id(id, "host")?;
    let done = sqlx::query(sql)
        .bind(id.to_string())
        .execute(&st.db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!("no host {id}")));
    }
    Ok(Json(load(st, &id).await?))
}

/// No new instances are placed on a cordoned host.
async fn cordon(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfo>> {
    who.require_admin()?;
    set_flags(&st, &id, "UPDATE hosts SET cordoned = 1 WHERE id = $1").await
}

async fn uncordon(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfo>> {
    who.require_admin()?;
    set_flags(
        &st,
        &id,
        "UPDATE hosts SET cordoned = 0, draining = 0 WHERE id = $1",
    )
    .await
}

/// What a join needs to know of an existing host.
pub(crate) struct JoinTarget {
    pub region: String,
    pub revoked_ms: Option<i64>,
    /// Instances on it that are not Released or Failed.
    pub instances: i64,
}

impl JoinTarget {
    /// The region a join puts the host in: the token's, else its own. A
    /// host with instances keeps its region (they were placed there).
    pub fn region_for(&self, id: &HostId, token: Option<String>) -> ApiResult<String> {
        match token {
            Some(t) if t != self.region && self.instances > 0 => Err(ApiError::Conflict(format!(
                "host {id} has {} instances in region {}; it cannot join region {t} until they \
                 are released",
                self.instances, self.region
            ))),
            Some(t) => Ok(t),
            None => Ok(self.region.clone()),
        }
    }
}

/// Loads (and locks, being the first write's row) what a join needs of
/// host `id`.
pub(crate) async fn join_target(tx: &mut Tx, id: &HostId) -> ApiResult<JoinTarget> {
    sqlx::query("UPDATE hosts SET region = region WHERE id = $1")
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    let row = sqlx::query(
        "SELECT h.region, h.revoked_ms, (SELECT COUNT(*) FROM instances i WHERE i.host_id = h.id \
         AND i.observed_state NOT IN ('Released', 'Failed')) AS instances FROM hosts h \
         WHERE h.id = $1",
    )
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no host {id}")))?;
    Ok(JoinTarget {
        region: col(&row, "region")?,
        revoked_ms: col(&row, "revoked_ms")?,
        instances: col(&row, "instances")?,
    })
}

/// `POST /v1/admin/hosts/{id}/revoke`: the host's credential stops working
/// at once (every call, and its open work long-poll, answers 401 saying
/// so; other controller replicas within the token cache's few seconds), the
/// host is marked unhealthy and down (its instances are treated as on a
/// dead host). It joins again with a join token minted after this.
async fn revoke(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfo>> {
    who.require_admin()?;
    let id: HostId = path_id(&id, "host")?;
    let now = now_ms();
    let done = sqlx::query(
        "UPDATE hosts SET revoked_ms = COALESCE(revoked_ms, $1), health = 'unhealthy', \
         down_since_ms = COALESCE(down_since_ms, $1) WHERE id = $2",
    )
    .bind(now)
    .bind(id.to_string())
    .execute(&st.db.pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!("no host {id}")));
    }
    st.verifier.forget_all();
    st.wake.wake(&id);
    tracing::warn!(host = %id, "host credential revoked");
    Ok(Json(load(&st, &id).await?))
}

/// `POST /v1/admin/hosts/{id}/region`: moves a host to another region;
/// refused (409) while instances are on it.
async fn set_region(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<SetHostRegion>,
) -> ApiResult<Json<HostInfo>> {
    who.require_admin()?;
    crate::regions::check("region", &req.region)?;
    let id: HostId = path_id(&id, "host")?;
    let mut tx = st.db.begin_write().await?;
    let target = join_target(&mut tx, &id).await?;
    target.region_for(&id, Some(req.region.clone()))?;
    sqlx::query("UPDATE hosts SET region = $1 WHERE id = $2")
        .bind(&req.region)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(host = %id, from = %target.region, to = %req.region, "host region set");
    Ok(Json(load(&st, &id).await?))
}
