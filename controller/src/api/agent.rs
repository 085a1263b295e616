//! The agent protocol's endpoints (`/v1/agent/*`, see
//! `gantry_proto::api::agent`): join, heartbeat, the work long-poll and
//! operation reports; and `POST /v1/admin/join-tokens`.
//!
//! The guard lets only join tokens reach `join` and only host credentials
//! reach the rest; each handler acts on the calling host's objects only.

use super::commands;
use super::{created, path_id, query, Body, Caller};
use crate::auth;
use crate::db::{col, now_ms, rows, to_time, Tx};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_proto::api::agent::*;
use gantry_proto::api::v1::{HostHealth, RegisterHost};
use gantry_proto::ids::{HostId, JoinTokenId, OperationId};
use gantry_proto::{validate, SnapshotStatus};
use std::collections::HashMap;
use std::time::Duration;

/// Default and longest life of a join token.
const JOIN_TTL_SECS: u64 = 3600;
const JOIN_TTL_MAX_SECS: u64 = 7 * 24 * 3600;
/// Default work long-poll.
const DEFAULT_WAIT_SECS: u64 = 25;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/join-tokens", post(create_join_token))
        .route("/agent/join", post(join))
        .route("/agent/heartbeat", post(heartbeat))
        .route("/agent/work", get(work))
        .route("/agent/ops/{id}", post(report))
}

/// The calling host (the guard already refused everyone else).
fn host_of(who: &Caller) -> ApiResult<HostId> {
    who.host
        .ok_or_else(|| ApiError::Denied("this call needs a host credential".into()))
}

async fn create_join_token(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<CreateJoinToken>,
) -> ApiResult<Response> {
    who.require_admin()?;
    let ttl = req.ttl_secs.unwrap_or(JOIN_TTL_SECS);
    validate::in_range("ttl_secs", ttl, 1, JOIN_TTL_MAX_SECS)?;
    if let Some(r) = &req.region {
        crate::regions::check("region", r)?;
    }
    let id = JoinTokenId::new();
    let (token, hash) = auth::mint_with(JOIN_TOKEN_PREFIX, id.uuid());
    let now = now_ms();
    let expires = now + ttl as i64 * 1000;
    sqlx::query(
        "INSERT INTO join_tokens (id, hash, expires_ms, created_ms, region) VALUES ($1, $2, $3, \
         $4, $5)",
    )
    .bind(id.to_string())
    .bind(hash)
    .bind(expires)
    .bind(now)
    .bind(req.region.clone())
    .execute(&st.db.pool)
    .await?;
    Ok(created(CreatedJoinToken {
        id,
        token,
        expires_at: to_time(expires),
    }))
}

/// `POST /v1/agent/join`: creates (or adopts a pre-registered or revoked)
/// host and mints its credential; consumes the join token.
async fn join(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<JoinRequest>,
) -> ApiResult<Response> {
    let jt = who
        .join
        .ok_or_else(|| ApiError::Denied("joining needs a join token".into()))?;
    let c = &req.capacity;
    validate::object_name("name", &req.name)?;
    validate::object_name("address", &req.address)?;
    super::hosts::check_capacity("capacity.", c.vcpus, c.memory_mib, c.disk_gib, &c.gpus)?;
    let mut tx = st.db.begin_write().await?;
    let (host, region) = claim_join(&mut tx, jt, &req, &st.cfg.default_region).await?;
    let (credential, hash) = auth::mint_with(HOST_CREDENTIAL_PREFIX, host.uuid());
    sqlx::query(
        "UPDATE hosts SET credential_hash = $1, health = 'healthy', last_heartbeat_ms = $2, \
         down_since_ms = NULL, revoked_ms = NULL, region = $4 WHERE id = $3",
    )
    .bind(hash)
    .bind(now_ms())
    .bind(host.to_string())
    .bind(&region)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    // An older credential of this host must stop working at once.
    st.verifier.forget_all();
    tracing::info!(%host, name = %req.name, %region, "host joined");
    Ok(created(JoinResponse {
        host,
        credential,
        heartbeat_secs: st.cfg.heartbeat_secs,
    }))
}

/// Checks the join token (unused, unexpired) and binds it to the host
/// named in `req`: a new host, a pre-registered one that never joined, or
/// a revoked one joining again (with a token minted after the
/// revocation). Returns the host and its region.
async fn claim_join(
    tx: &mut Tx,
    jt: JoinTokenId,
    req: &JoinRequest,
    default_region: &str,
) -> ApiResult<(HostId, String)> {
    let row = sqlx::query(
        "SELECT expires_ms, host_name, host_id, region, created_ms FROM join_tokens WHERE id = $1",
    )
    .bind(jt.to_string())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or(ApiError::Unauthorized)?;
    if col::<i64>(&row, "expires_ms")? <= now_ms() {
        return Err(ApiError::BadToken(format!(
            "join token {jt} has expired; ask an admin for a new one"
        )));
    }
    let token_region: Option<String> = col(&row, "region")?;
    let minted_ms: i64 = col(&row, "created_ms")?;
    // Single-use: consumed by the first successful join (below, in the
    // same transaction). An agent that lost the reply is joined again by an
    // admin: revoke the host, mint a new token.
    if col::<Option<String>>(&row, "host_name")?.is_some() {
        return Err(used_token(jt));
    }
    let existing = sqlx::query("SELECT id, credential_hash FROM hosts WHERE name = $1")
        .bind(&req.name)
        .fetch_optional(&mut **tx)
        .await?;
    let c = &req.capacity;
    let (host, region) = match existing {
        Some(r) => {
            let id: HostId = crate::db::parsed(&r, "id", "hosts")?;
            let h = super::hosts::join_target(tx, &id).await?;
            let joined = col::<Option<String>>(&r, "credential_hash")?.is_some();
            match h.revoked_ms {
                // Joined and not revoked: the name is taken.
                None if joined => {
                    return Err(ApiError::Conflict(format!(
                        "a host named {:?} already exists",
                        req.name
                    )))
                }
                Some(at) if minted_ms < at => {
                    return Err(ApiError::BadToken(format!(
                        "join token {jt} was minted before host {id} was revoked; ask an admin \
                         for a new one"
                    )))
                }
                // Pre-registered by an admin, or revoked: this join adopts it.
                _ => {}
            }
            let region = h.region_for(&id, token_region)?;
            update_capacity(tx, &id, c, Some(&req.address)).await?;
            (id, region)
        }
        None => {
            let id = HostId::new();
            let region = token_region.unwrap_or_else(|| default_region.to_string());
            let reg = RegisterHost {
                name: req.name.clone(),
                address: req.address.clone(),
                vcpus: c.vcpus,
                memory_mib: c.memory_mib,
                disk_gib: c.disk_gib,
                gpus: c.gpus.clone(),
                region: Some(region.clone()),
            };
            super::hosts::insert_host(tx, id, &reg, &region).await?;
            (id, region)
        }
    };
    let done = sqlx::query(
        "UPDATE join_tokens SET host_name = $1, host_id = $2 WHERE id = $3 AND host_name IS NULL",
    )
    .bind(&req.name)
    .bind(host.to_string())
    .bind(jt.to_string())
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(used_token(jt));
    }
    Ok((host, region))
}

/// The refusal of a join token that was already used.
fn used_token(jt: JoinTokenId) -> ApiError {
    tracing::warn!(join_token = %jt, "refused a second join with a used join token");
    ApiError::BadToken(format!(
        "join token {jt} was already used; join tokens are single-use: ask an admin for a new \
         join token (for a host that joined but lost its credential, the admin revokes the \
         host first)"
    ))
}

async fn update_capacity(
    tx: &mut Tx,
    id: &HostId,
    c: &HostCapacity,
    address: Option<&str>,
) -> ApiResult<()> {
    sqlx::query(
        "UPDATE hosts SET vcpus = $1, memory_mib = $2, disk_gib = $3, \
         address = COALESCE($4, address) WHERE id = $5",
    )
    .bind(c.vcpus as i64)
    .bind(c.memory_mib as i64)
    .bind(c.disk_gib as i64)
    .bind(address.map(str::to_owned))
    .bind(id.to_string())
    .execute(&mut **tx)
    .await?;
    super::hosts::sync_gpus(tx, id, &c.gpus).await
}

/// `POST /v1/agent/heartbeat`: capacity, health and observed states (unless
/// older than the last heartbeat applied), store usage, and billing of the
/// usage counters.
async fn heartbeat(
    State(st): State<AppState>,
    who: Caller,
    Body(mut hb): Body<AgentHeartbeat>,
) -> ApiResult<Json<HeartbeatAck>> {
    let host = host_of(&who)?;
    let c = &hb.capacity;
    super::hosts::check_capacity("capacity.", c.vcpus, c.memory_mib, c.disk_gib, &c.gpus)?;
    check_problems(&hb.problems)?;
    // Rows are locked host, then instances by id, then accounts by id,
    // then snapshots, in every write transaction of the agent protocol, so
    // two heartbeats (or a heartbeat and an op report) cannot deadlock.
    hb.instances.sort_by_key(|o| o.id);
    hb.usage.sort_by_key(|u| u.instance);
    if hb.https_port == Some(0) {
        return Err(ApiError::invalid("https_port", "must be 1 to 65535"));
    }
    check_store(hb.store.as_deref().unwrap_or_default())?;
    if let Some(v) = &hb.vtep {
        v.validate("vtep")?;
    }
    crate::store_keys::check_store_identity(hb.store_identity.as_ref())?;
    if hb
        .buckets
        .as_ref()
        .is_some_and(|b| b.len() > MAX_BUCKET_REPORTS)
    {
        return Err(ApiError::invalid(
            "buckets",
            format!("at most {MAX_BUCKET_REPORTS} bucket reports"),
        ));
    }
    // Every figure in range and the timestamp not ahead of our clock, or
    // none of the heartbeat is applied.
    if let Err(e) = hb.check_bounds(st.clock.now_ms()) {
        tracing::warn!(%host, field = %e.field, error = %e.message,
            "refused a heartbeat out of bounds; nothing of it was applied");
        return Err(e.into());
    }
    let (billed, changed) = st.heartbeats.apply(&st, host, hb).await?;
    if changed {
        st.wake.wake(&host);
    }
    Ok(Json(HeartbeatAck {
        heartbeat_secs: st.cfg.heartbeat_secs,
        billed,
    }))
}

/// A heartbeat lists at most this many problems.
const MAX_PROBLEMS: usize = 32;

/// Problems are sentences: one line each, bounded, no control characters.
fn check_problems(problems: &[String]) -> ApiResult<()> {
    if problems.len() > MAX_PROBLEMS {
        return Err(ApiError::invalid(
            "problems",
            format!("at most {MAX_PROBLEMS} problems"),
        ));
    }
    for (i, p) in problems.iter().enumerate() {
        let field = format!("problems[{i}]");
        validate::free_text(&field, p, 500)?;
        if p.trim().is_empty() || p.contains('\n') {
            return Err(ApiError::invalid(field, "must be one non-empty line"));
        }
    }
    Ok(())
}

/// Each account at most once in a store report.
fn check_store(store: &[StoreUsage]) -> ApiResult<()> {
    let mut seen = std::collections::HashSet::new();
    for (i, u) in store.iter().enumerate() {
        if !seen.insert(u.account) {
            return Err(ApiError::invalid(
                format!("store[{i}].account"),
                format!("{} is listed twice", u.account),
            ));
        }
    }
    Ok(())
}

/// Applies a heartbeat in a transaction of its own, retrying conflicts;
/// it queues for the writer's turn as of `asked`, when its caller asked.
pub(super) async fn heartbeat_alone(
    st: &AppState,
    host: &HostId,
    hb: &AgentHeartbeat,
    asked: std::time::Instant,
) -> ApiResult<(Vec<UsageAck>, bool)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let once = async {
            let mut tx = st.db.begin_write_asked_at(asked).await?;
            let applied = heartbeat_in(st, &mut tx, host, hb).await?;
            gantry_crashpoint::hit("controller.heartbeat.before_commit");
            tx.commit().await.map_err(crate::db::DbError::from)?;
            gantry_crashpoint::hit("controller.heartbeat.after_commit");
            Ok::<_, ApiError>(applied)
        };
        match once.await {
            Err(e) if e.is_retryable() && attempt < crate::db::WRITE_ATTEMPTS => {
                tracing::debug!(%host, attempt, error = %e, "heartbeat conflicted; retrying");
            }
            r => return r,
        }
    }
}

/// Applies a heartbeat inside `tx` (alone, or with others in a group:
/// [`super::heartbeats`]): the billed counters, and whether the host's
/// forwards changed.
pub(super) async fn heartbeat_in(
    st: &AppState,
    tx: &mut Tx,
    host: &HostId,
    hb: &AgentHeartbeat,
) -> ApiResult<(Vec<UsageAck>, bool)> {
    let now = st.clock.now_ms();
    let shared = st.cfg.snapshot_store_shared;
    // Any heartbeat shows the host is alive; only a newer one says more.
    mark_alive(tx, host).await?;
    gantry_crashpoint::hit("controller.heartbeat.begin");
    let mut changed = false;
    let fresh = record_host_state(tx, host, hb, now).await?;
    let mut figures = Vec::new();
    if fresh {
        if hb.health != HostHealth::Healthy {
            tracing::warn!(%host, problems = ?hb.problems, "host reports itself unhealthy");
        }
        super::hosts::sync_gpus(tx, host, &hb.capacity.gpus).await?;
        crate::groups::set_vtep(tx, host, hb.vtep.as_ref()).await?;
        crate::store_keys::record_host_store(tx, host, hb.store_identity.as_ref()).await?;
        if let Some(b) = &hb.buckets {
            crate::buckets::record_reports(tx, host, b).await?;
        }
        changed |= commands::observe_all(tx, host, &hb.instances).await?;
        gantry_crashpoint::hit("controller.heartbeat.observed");
        if let Some(store) = &hb.store {
            figures = crate::meter::take_report(tx, host, store, shared, now).await?;
        }
    } else {
        tracing::debug!(%host, sent_at_ms = hb.sent_at_ms, "ignoring an older heartbeat");
    }
    let mut charges = Vec::new();
    let billed = crate::billing::bill_counters(tx, host, &hb.usage, &mut charges).await?;
    gantry_crashpoint::hit("controller.heartbeat.billed");
    // Instance rows are done: now every account row this touches, in id order.
    let mut accounts: Vec<_> = charges.iter().map(|c| c.account).collect();
    accounts.extend_from_slice(&figures);
    crate::billing::lock_accounts(tx, &accounts).await?;
    crate::meter::apply_figures(tx, host, &figures, shared, now).await?;
    gantry_crashpoint::hit("controller.heartbeat.figures_applied");
    crate::billing::charge_all(tx, charges, now).await?;
    if fresh && hb.store.is_some() {
        crate::meter::count_report(tx, host).await?;
    }
    if let Some(sizes) = &hb.snapshot_sizes {
        snapshot_sizes(tx, host, sizes, shared).await?;
    }
    Ok((billed, changed))
}

/// Marks the host alive (a heartbeat brings a down host back: see
/// `reconcile::mark_down`). A revoked host is refused even when its call
/// got past the credential check just before the revocation.
async fn mark_alive(tx: &mut Tx, host: &HostId) -> ApiResult<()> {
    let back =
        sqlx::query("SELECT down_since_ms FROM hosts WHERE id = $1 AND down_since_ms IS NOT NULL")
            .bind(host.to_string())
            .fetch_optional(&mut **tx)
            .await?
            .is_some();
    let alive = sqlx::query(
        "UPDATE hosts SET last_heartbeat_ms = $1, down_since_ms = NULL WHERE id = $2 \
         AND revoked_ms IS NULL",
    )
    .bind(now_ms())
    .bind(host.to_string())
    .execute(&mut **tx)
    .await?;
    if alive.rows_affected() != 1 {
        return Err(auth::revoked(host));
    }
    if back {
        tracing::warn!(%host, "host is back after missing its heartbeats");
    }
    Ok(())
}

/// Health, capacity, problems and the HTTPS port, in one statement, only
/// from a newer heartbeat than the last one applied; whether it was newer.
/// A stored time ahead of the clock's bound (kept before heartbeats were
/// bounded) would hide every later heartbeat: it counts as older.
async fn record_host_state(
    tx: &mut Tx,
    host: &HostId,
    hb: &AgentHeartbeat,
    now: i64,
) -> ApiResult<bool> {
    let c = &hb.capacity;
    Ok(sqlx::query(
        "UPDATE hosts SET last_heartbeat_sent_ms = $1, health = $2, vcpus = $3, \
         memory_mib = $4, disk_gib = $5, problems = $6, https_port = $7 WHERE id = $8 \
         AND (last_heartbeat_sent_ms < $1 OR last_heartbeat_sent_ms > $9)",
    )
    .bind(hb.sent_at_ms)
    .bind(rows::health_str(hb.health))
    .bind(c.vcpus as i64)
    .bind(c.memory_mib as i64)
    .bind(c.disk_gib as i64)
    .bind(hb.problems.join("\n"))
    .bind(hb.https_port.map(i64::from))
    .bind(host.to_string())
    .bind(now.saturating_add(MAX_CLOCK_SKEW_MS))
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}

/// Applies the sizes a host measured after compacting its store to its
/// successful snapshots (with a shared store, to those in the store this
/// host uses, since it then sees the same chunks). A size above the
/// snapshot's logical size, or for a snapshot this host does not store or
/// an unknown one, changes nothing (and is logged).
async fn snapshot_sizes(
    tx: &mut Tx,
    host: &HostId,
    sizes: &[SnapshotSize],
    shared: bool,
) -> ApiResult<()> {
    let sql = if shared {
        "UPDATE snapshots SET compressed_bytes = $1 WHERE id = $2 AND status = $3 \
         AND logical_bytes >= $1 AND (host_id = $4 OR store_id = \
         (SELECT h.store_id FROM hosts h WHERE h.id = $4))"
    } else {
        "UPDATE snapshots SET compressed_bytes = $1 WHERE id = $2 AND status = $3 \
         AND logical_bytes >= $1 AND host_id = $4"
    };
    for s in sizes {
        // In range after `AgentHeartbeat::check_bounds`.
        let bytes = i64::try_from(s.compressed_bytes)
            .map_err(|_| ApiError::invalid("snapshot_sizes", "compressed_bytes out of range"))?;
        let done = sqlx::query(sql)
            .bind(bytes)
            .bind(s.snapshot.to_string())
            .bind(SnapshotStatus::Success.name())
            .bind(host.to_string())
            .execute(&mut **tx)
            .await?;
        if done.rows_affected() == 0 {
            tracing::warn!(%host, snapshot = %s.snapshot, bytes,
                "ignored a snapshot size: not a snapshot this host stores, or above its logical size");
        }
    }
    Ok(())
}

/// Most bucket reports one heartbeat may carry.
const MAX_BUCKET_REPORTS: usize = 4096;

/// `GET /v1/agent/work?wait_secs=N&access_rev=R&tls=F&groups_rev=G&buckets_rev=B`:
/// answers at once while an operation is pending or the access state,
/// certificate or network-group state is news to the agent (an agent that
/// names no `groups_rev` gets the group state in every answer, but waits
/// for it only when the host has groups).
async fn work(
    State(st): State<AppState>,
    who: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Work>> {
    let host = host_of(&who)?;
    query(
        &q,
        &[
            "wait_secs",
            "access_rev",
            "tls",
            "groups_rev",
            "buckets_rev",
        ],
    )?;
    let wait = match q.get("wait_secs") {
        None => DEFAULT_WAIT_SECS,
        Some(w) => w
            .parse::<u64>()
            .map_err(|_| ApiError::bad("wait_secs", "must be a whole number of seconds"))?,
    };
    validate::in_range("wait_secs", wait, 0, MAX_WAIT_SECS)?;
    let rev = match q.get("access_rev") {
        None => None,
        Some(r) => Some(
            r.parse::<u64>()
                .map_err(|_| ApiError::bad("access_rev", "must be a whole number"))?,
        ),
    };
    let groups_rev = match q.get("groups_rev") {
        None => None,
        Some(r) => Some(
            r.parse::<u64>()
                .map_err(|_| ApiError::bad("groups_rev", "must be a whole number"))?,
        ),
    };
    let buckets_rev = match q.get("buckets_rev") {
        None => None,
        Some(r) => Some(
            r.parse::<u64>()
                .map_err(|_| ApiError::bad("buckets_rev", "must be a whole number"))?,
        ),
    };
    let known = commands::Known {
        access: rev,
        tls: q.get("tls").map(String::as_str),
        groups: groups_rev,
        buckets: buckets_rev,
    };
    // Listen before looking, so a wake between the two is not lost.
    let notify = st.wake.get(&host);
    let woken = notify.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    let w = commands::build_work(&st, &host, &known).await?;
    let group_news = match (&w.groups, groups_rev) {
        (Some(_), Some(_)) => true,
        (Some(g), None) => !g.groups.is_empty(),
        (None, _) => false,
    };
    // Like groups: an agent that names no `buckets_rev` is not woken for
    // an empty bucket state.
    let bucket_news = match (&w.buckets, buckets_rev) {
        (Some(_), Some(_)) => true,
        (Some(b), None) => !b.mounts.is_empty(),
        (None, _) => false,
    };
    let news = w.access.is_some() || w.tls.is_some() || group_news || bucket_news;
    let pending = w.ops.iter().any(|o| o.phase == OpPhase::Pending);
    if pending {
        gantry_crashpoint::hit("controller.work.deliver");
    }
    if wait == 0 || st.wake.closed() || pending || news {
        return Ok(Json(w));
    }
    let _ = tokio::time::timeout(Duration::from_secs(wait), woken).await;
    // A revocation wakes the poll and ends it with the refusal.
    auth::check_not_revoked(&st.db, &host).await?;
    let w = commands::build_work(&st, &host, &known).await?;
    if w.ops.iter().any(|o| o.phase == OpPhase::Pending) {
        gantry_crashpoint::hit("controller.work.deliver");
    }
    Ok(Json(w))
}

/// `POST /v1/agent/ops/{id}`.
async fn report(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(r): Body<OpReport>,
) -> ApiResult<StatusCode> {
    let host = host_of(&who)?;
    let id: OperationId = path_id(&id, "operation")?;
    validate::in_range("progress", r.progress.into(), 0, 100)?;
    if let Some(e) = &r.error {
        validate::free_text("error", e, 2000)?;
    }
    if let Some(n) = &r.note {
        validate::free_text("note", n, 500)?;
        if n.contains('\n') {
            return Err(ApiError::invalid("note", "must be one line"));
        }
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match report_once(&st, &host, id, &r).await {
            Err(e) if e.is_retryable() && attempt < crate::db::WRITE_ATTEMPTS => {
                tracing::debug!(%host, op = %id, attempt, error = %e, "report conflicted; retrying");
            }
            res => {
                if res? {
                    st.wake.wake(&host);
                }
                break Ok(StatusCode::NO_CONTENT);
            }
        }
    }
}

/// One attempt at applying an op report, in one transaction; the host row
/// is locked first, as in heartbeats (see [`heartbeat`]). Returns whether
/// the host's forwards changed.
async fn report_once(
    st: &AppState,
    host: &HostId,
    id: OperationId,
    r: &OpReport,
) -> ApiResult<bool> {
    let mut tx = st.db.begin_write().await?;
    let alive = sqlx::query(
        "UPDATE hosts SET last_heartbeat_ms = last_heartbeat_ms WHERE id = $1 \
         AND revoked_ms IS NULL",
    )
    .bind(host.to_string())
    .execute(&mut *tx)
    .await?;
    if alive.rows_affected() != 1 {
        return Err(auth::revoked(host));
    }
    gantry_crashpoint::hit("controller.report.begin");
    let changed = commands::apply_report(st, &mut tx, host, id, r).await?;
    // A volume operation that ended changes what its account is billed.
    if let Some(op) = crate::operations::load(&mut tx, id).await? {
        use gantry_proto::OperationKind as K;
        if let (K::GrowVolume | K::DeleteVolume, Some(a), true) =
            (op.kind, op.account, op.state.is_final())
        {
            crate::volume_meter::sync(&mut tx, &a, st.clock.now_ms()).await?;
        }
    }
    let last = r.outcome != OpOutcome::Running;
    if last {
        gantry_crashpoint::hit("controller.report.before_commit");
    }
    tx.commit().await?;
    if last {
        gantry_crashpoint::hit("controller.report.after_commit");
    }
    Ok(changed)
}
