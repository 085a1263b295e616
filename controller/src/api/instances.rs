//! Instances: create (placed by the scheduler), list with status filter,
//! get and its views (access, monitor, billing, config, hardware). Actions
//! live in [`super::actions`].

use super::{path_id, query, Body, Caller};
use crate::db::{now_ms, rows, rows::InstanceRec, to_time, Tx};
use crate::error::{ApiError, ApiResult};
use crate::scheduler::{self, Need, PlaceError};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_proto::api::v1::*;
use gantry_proto::ids::*;
use gantry_proto::net::{Protocol, JUPYTER_PORT, SSH_PORT};
use gantry_proto::{validate, Action, InstanceState};
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/instances", post(create).get(list))
        .route("/instances/batch", post(super::actions::batch))
        .route("/instances/{id}", get(get_one))
        .route("/instances/{id}/actions", post(super::actions::act))
        .route("/instances/{id}/{view}", get(view))
}

/// Loads an instance the caller may see (another account's is 404).
pub(crate) async fn load(st: &AppState, who: &Caller, id: &str) -> ApiResult<InstanceRec> {
    let id: InstanceId = path_id(id, "instance")?;
    load_in(&st.db.pool, who, id).await
}

pub(crate) async fn load_in<'e, E>(ex: E, who: &Caller, id: InstanceId) -> ApiResult<InstanceRec>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let not_found = || ApiError::NotFound(format!("no instance {id}"));
    let row = sqlx::query(&format!("{} WHERE i.id = $1", rows::INSTANCE_SELECT))
        .bind(id.to_string())
        .fetch_optional(ex)
        .await?
        .ok_or_else(not_found)?;
    let rec = rows::instance(&row)?;
    if !who.can_see(&rec.account) {
        return Err(not_found());
    }
    Ok(rec)
}

/// While Snapshotting or Released only the config and hardware views
/// answer; everything else gets this 409.
pub(crate) fn gate(rec: &InstanceRec) -> ApiResult<()> {
    let s = rec.observed;
    if s.is_snapshotting() {
        return Err(ApiError::Conflict(format!(
            "instance {} is Snapshotting; while its guest is paused for the snapshot only its \
             config and hardware views answer",
            rec.id
        )));
    }
    if s == InstanceState::Released {
        return Err(ApiError::Conflict(format!(
            "instance {} is Released; only its config and hardware views answer",
            rec.id
        )));
    }
    Ok(())
}

/// The status shown while an instance's host is down: its last observed
/// state is kept in `state`, but nobody can vouch for it.
pub const HOST_DOWN: &str = "HostDown";

/// Whether `rec`'s host is down (and it is not final).
pub(crate) fn host_down(rec: &InstanceRec) -> bool {
    rec.host_down_since_ms.is_some() && !rec.observed.is_final()
}

/// The actions an instance in state `s` offers: those its state allows
/// that the controller executes end to end (`commands::executable`); only
/// release while its host is down.
pub(crate) fn advertised(s: InstanceState, host_down: bool) -> Vec<Action> {
    s.allowed_actions()
        .into_iter()
        .filter(|a| super::commands::executable(*a))
        .filter(|a| !host_down || *a == Action::Release)
        .collect()
}

/// Whether `rec` is on its way out with no operation to show it: the
/// controller wants it Released (an auto-release after its snapshot) and
/// its host has not said Released yet. It reads Releasing, with nothing to
/// do but wait: a start of it now would race the host's release.
pub(crate) fn releasing(rec: &InstanceRec) -> bool {
    rec.desired == InstanceState::Released
        && !rec.observed.is_final()
        && rec.pending_op.is_none()
        && !host_down(rec)
}

pub(crate) fn summary(rec: &InstanceRec, _now: i64) -> InstanceSummary {
    let down = host_down(rec);
    let releasing = releasing(rec);
    let shown = if releasing {
        InstanceState::Releasing
    } else {
        rec.observed
    };
    InstanceSummary {
        id: rec.id,
        name: rec.name.clone(),
        account: rec.account,
        status: if down {
            HOST_DOWN.to_string()
        } else {
            shown.status().to_string()
        },
        state: shown,
        flavor: rec.flavor,
        host: rec.host,
        cost_micros: rec.charged_micros,
        allowed_actions: if rec.pending_op.is_some() || releasing {
            Vec::new()
        } else {
            advertised(rec.observed, down)
        },
        created_at: to_time(rec.created_ms),
        region: rec.region.clone(),
        progress_percent: None,
    }
}

/// The percent of each listed instance's operation in flight that its host
/// has taken up (state `running`), read in one query per 500 operations.
async fn with_progress(
    st: &AppState,
    list: &mut [InstanceSummary],
    ops: &[Option<OperationId>],
) -> ApiResult<()> {
    let pending: Vec<String> = ops.iter().flatten().map(|o| o.to_string()).collect();
    let mut percent = HashMap::new();
    for chunk in pending.chunks(500) {
        let sql = format!(
            "SELECT id, progress FROM operations WHERE state = 'running' AND id IN ({})",
            crate::db::placeholders(1, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for o in chunk {
            q = q.bind(o.as_str());
        }
        for r in q.fetch_all(&st.db.pool).await? {
            let p: i64 = crate::db::col(&r, "progress")?;
            percent.insert(crate::db::col::<String>(&r, "id")?, p.clamp(0, 100) as u8);
        }
    }
    for (summary, op) in list.iter_mut().zip(ops) {
        summary.progress_percent = op.and_then(|o| percent.get(&o.to_string()).copied());
    }
    Ok(())
}

/// What `create` resolved the request to.
struct Resolved {
    flavor: FlavorInfo,
    image: Option<ImageId>,
    snapshot: Option<SnapshotId>,
    root_disk_gib: u64,
    /// The image the disk descends from (see `instances.base_image_id`).
    base_image: Option<ImageId>,
    /// The host whose store holds the snapshot (host-local stores).
    pin: Option<HostId>,
    /// The snapshot the disk comes from (directly or through its image)
    /// and its region.
    snapshot_region: Option<(SnapshotId, String)>,
    /// The network group to join (`CreateInstance::network_group`).
    group: Option<crate::groups::GroupRow>,
}

/// A Success snapshot of `account`: its region, the base image of the
/// snapshotted instance, its as-image image and its logical size (its
/// host and store: `crate::store_keys::restore_pin`).
struct SnapBase {
    region: String,
    base_image: Option<ImageId>,
    image: Option<ImageId>,
    logical_bytes: u64,
}

async fn snapshot_base(
    st: &AppState,
    account: &AccountId,
    s: SnapshotId,
    field: &str,
) -> ApiResult<SnapBase> {
    let row = sqlx::query(
        "SELECT s.status, s.host_id, s.region, s.logical_bytes, i.id AS image_id, src.base_image_id FROM \
         snapshots s LEFT JOIN images i ON i.source_snapshot_id = s.id LEFT JOIN instances src \
         ON src.id = s.instance_id WHERE s.id = $1 AND s.account_id = $2",
    )
    .bind(s.to_string())
    .bind(account.to_string())
    .fetch_optional(&st.db.pool)
    .await?
    .ok_or_else(|| ApiError::invalid(field, format!("no snapshot {s}")))?;
    let status: String = crate::db::col(&row, "status")?;
    if status != "Success" {
        return Err(ApiError::invalid(
            field,
            format!("snapshot {s} is {status}, not Success"),
        ));
    }
    Ok(SnapBase {
        region: crate::db::col(&row, "region")?,
        base_image: crate::db::parsed_opt(&row, "base_image_id", "instances")?,
        image: crate::db::parsed_opt(&row, "image_id", "images")?,
        logical_bytes: crate::db::col::<i64>(&row, "logical_bytes")?.max(0) as u64,
    })
}

fn check_ports(req: &CreateInstance) -> ApiResult<()> {
    if req.ports.len() > MAX_PORT_FORWARDS {
        return Err(ApiError::invalid(
            "ports",
            format!("at most {MAX_PORT_FORWARDS} ports"),
        ));
    }
    for (i, p) in req.ports.iter().enumerate() {
        if *p == SSH_PORT || *p == JUPYTER_PORT {
            return Err(ApiError::invalid(
                format!("ports[{i}]"),
                format!(
                    "{p} is always forwarded (SSH on {SSH_PORT}, JupyterLab on {JUPYTER_PORT})"
                ),
            ));
        }
        if *p == 0 || req.ports[..i].contains(p) {
            return Err(ApiError::invalid(
                format!("ports[{i}]"),
                "must be 1 to 65535 and listed once",
            ));
        }
    }
    Ok(())
}

/// What a flavor with this root disk needs of a host (for placing
/// restores, `crate::store_keys::restore_pin`).
fn room(flavor: &FlavorInfo, root_disk_gib: u64) -> crate::store_keys::Room {
    crate::store_keys::Room {
        vcpus: flavor.vcpus,
        memory_mib: flavor.memory_mib,
        disk_gib: root_disk_gib,
        gpus: flavor.gpu_count,
    }
}

async fn resolve(st: &AppState, account: &AccountId, req: &CreateInstance) -> ApiResult<Resolved> {
    validate::object_name("name", &req.name)?;
    check_ports(req)?;
    let row = sqlx::query(&format!(
        "SELECT {} FROM flavors WHERE id = $1",
        rows::FLAVOR_COLS
    ))
    .bind(req.flavor.to_string())
    .fetch_optional(&st.db.pool)
    .await?
    .ok_or_else(|| ApiError::invalid("flavor", format!("no flavor {}", req.flavor)))?;
    let flavor = rows::flavor(&row)?;
    let image_id = match (req.image, req.snapshot) {
        (Some(i), None) => i,
        (None, Some(s)) => {
            let b = snapshot_base(st, account, s, "snapshot").await?;
            let root = flavor.root_disk_gib.max(b.logical_bytes.div_ceil(1 << 30));
            let pin = crate::store_keys::restore_pin(st, s, room(&flavor, root)).await?;
            return Ok(Resolved {
                flavor,
                image: b.image,
                snapshot: Some(s),
                root_disk_gib: root,
                base_image: b.base_image,
                pin,
                snapshot_region: Some((s, b.region)),
                group: None,
            });
        }
        _ => {
            return Err(ApiError::invalid(
                "image",
                "give exactly one of image and snapshot",
            ))
        }
    };
    let row = sqlx::query(&format!(
        "SELECT {}, origin FROM images WHERE id = $1 AND (account_id IS NULL OR account_id = $2)",
        rows::IMAGE_COLS
    ))
    .bind(image_id.to_string())
    .bind(account.to_string())
    .fetch_optional(&st.db.pool)
    .await?
    .ok_or_else(|| ApiError::invalid("image", format!("no image {image_id}")))?;
    let image = rows::image(&row)?;
    let mut root = flavor.root_disk_gib.max(image.size_gib);
    let (base_image, pin, snapshot_region) = match image.source_snapshot {
        Some(s) => {
            let b = snapshot_base(st, account, s, "image").await?;
            root = root.max(b.logical_bytes.div_ceil(1 << 30));
            let pin = crate::store_keys::restore_pin(st, s, room(&flavor, root)).await?;
            (b.base_image, pin, Some((s, b.region)))
        }
        None => {
            let origin: Option<String> = crate::db::col(&row, "origin")?;
            if origin.is_none() {
                return Err(ApiError::invalid(
                    "image",
                    format!("image {image_id} has no origin, so no host can fetch it"),
                ));
            }
            (Some(image_id), None, None)
        }
    };
    Ok(Resolved {
        flavor,
        image: Some(image_id),
        snapshot: None,
        root_disk_gib: root,
        base_image,
        pin,
        snapshot_region,
        group: None,
    })
}

/// The region to create in: the one asked for, else the snapshot's, else
/// the default; a snapshot of another region is refused (409).
fn region_of(st: &AppState, req: &CreateInstance, r: &Resolved) -> ApiResult<String> {
    let asked = req.region.as_deref();
    if let Some(a) = asked {
        crate::regions::check("region", a)?;
    }
    match (&r.snapshot_region, asked) {
        (Some((s, from)), Some(to)) if from != to => Err(crate::regions::cross_region(s, from, to)),
        (Some((_, from)), _) => Ok(from.clone()),
        (None, a) => Ok(a.unwrap_or(&st.cfg.default_region).to_string()),
    }
}

async fn create(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<CreateInstance>,
) -> ApiResult<Response> {
    let account = super::owner_for(&who, req.account)?;
    super::accounts::require_active(&st, &account).await?;
    let mut r = resolve(&st, &account, &req).await?;
    if let Some(gid) = req.network_group {
        // Another account's group is answered like a missing one.
        let g = super::groups::load(&st, &who, gid).await?;
        if g.account != account {
            return Err(ApiError::invalid(
                "network_group",
                format!("network group {gid} belongs to another account"),
            ));
        }
        r.group = Some(g);
    }
    let region = region_of(&st, &req, &r)?;
    crate::billing::require_credit(&st, &account, "creating instances").await?;
    let mut need = Need {
        vcpus: r.flavor.vcpus,
        memory_mib: r.flavor.memory_mib,
        disk_gib: r.root_disk_gib,
        gpu_model: r.flavor.gpu_model.clone(),
        gpu_count: r.flavor.gpu_count,
        placement: req.placement.unwrap_or_default(),
        region,
        host: r.pin,
    };
    // An existing volume's host, or room for a new one.
    let vol = match req.data_volume {
        Some(v) => Some(super::volumes::plan(&st, &account, v, &mut need).await?),
        None => None,
    };
    let id = InstanceId::new();
    // Hashed once, before the write transaction and off the runtime's
    // workers (5,000 rounds of SHA-512): the write lock and the other
    // requests never wait for it.
    let creds = credentials(&st, id).await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut tx = st.db.begin_write().await?;
        let placed = insert(
            &st,
            &mut tx,
            (id, &creds),
            account,
            &req,
            &r,
            &need,
            vol.as_ref(),
        );
        match placed.await {
            Ok((op, host)) => {
                gantry_crashpoint::hit("controller.create.before_commit");
                tx.commit().await?;
                gantry_crashpoint::hit("controller.create.after_commit");
                st.wake.wake(&host);
                let rec = load_in(&st.db.pool, &who, id).await?;
                let mut body = serde_json::to_value(summary(&rec, now_ms())).unwrap_or_default();
                body["operation"] = serde_json::json!(op.to_string());
                return Ok((axum::http::StatusCode::ACCEPTED, Json(body)).into_response());
            }
            Err(Insert::Place(PlaceError::Raced)) | Err(Insert::Duplicate) if attempt < 10 => {
                drop(tx);
                st.metrics.retried(crate::metrics::Write::Create);
                tokio::time::sleep(std::time::Duration::from_millis(attempt * 3)).await;
            }
            Err(Insert::Place(PlaceError::NoFit(why))) => {
                return Err(no_fit(&st, &req, &r, &need, vol.as_ref(), why))
            }
            Err(Insert::Place(PlaceError::Raced)) | Err(Insert::Duplicate) => {
                return Err(ApiError::Conflict(
                    "placement kept racing with other requests; retry".into(),
                ))
            }
            Err(Insert::Place(PlaceError::Db(e))) => return Err(e.into()),
            Err(Insert::Api(e)) => return Err(e),
        }
    }
}

/// The refusal of a create that fits on no host, saying why.
fn no_fit(
    st: &AppState,
    req: &CreateInstance,
    r: &Resolved,
    need: &Need,
    vol: Option<&super::volumes::Plan>,
    why: String,
) -> ApiError {
    let why = match r.pin.filter(|h| need.host == Some(*h)) {
        Some(h) => format!("the snapshot is stored on host {h}; {why}"),
        // Named where the caller chose a region (or it is not the default).
        None if req.region.is_some() || need.region != st.cfg.default_region => {
            format!("{why} (region {})", need.region)
        }
        None => why,
    };
    ApiError::Conflict(match vol.filter(|p| p.host.is_some()) {
        Some(p) => super::volumes::cannot_place(p, &why),
        None => why,
    })
}

enum Insert {
    Place(PlaceError),
    Duplicate,
    Api(ApiError),
}

impl From<crate::access::AccessError> for Insert {
    fn from(e: crate::access::AccessError) -> Self {
        use crate::access::AccessError as A;
        match e {
            A::Exhausted(m) => Insert::Api(ApiError::Conflict(m)),
            A::Taken => Insert::Duplicate,
            A::Db(e) => Insert::Api(e.into()),
        }
    }
}

impl From<crate::groups::GroupError> for Insert {
    fn from(e: crate::groups::GroupError) -> Self {
        match e {
            crate::groups::GroupError::Taken => Insert::Duplicate,
            other => Insert::Api(super::groups::api_error(other)),
        }
    }
}

impl From<sqlx::Error> for Insert {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_unique_violation(&e) {
            Insert::Duplicate
        } else {
            Insert::Api(e.into())
        }
    }
}

/// One placement attempt inside `tx`: host, GPUs, volume, ports, record.
#[allow(clippy::too_many_arguments)]
async fn insert(
    st: &AppState,
    tx: &mut Tx,
    (id, c): (InstanceId, &NewCredentials),
    account: AccountId,
    req: &CreateInstance,
    r: &Resolved,
    need: &Need,
    vol: Option<&super::volumes::Plan>,
) -> Result<(OperationId, HostId), Insert> {
    let cutoff = now_ms() - st.cfg.heartbeat_timeout_secs as i64 * 1000;
    let timeout = st.cfg.heartbeat_timeout_secs;
    // A group member: the group's row locked first, its hosts preferred.
    let group = match &r.group {
        Some(g) => Some(crate::groups::lock_group(tx, g.id).await?),
        None => None,
    };
    let pref = match &group {
        Some(g) => Some(
            crate::groups::placement_pref(tx, g)
                .await
                .map_err(|e| Insert::Api(e.into()))?,
        ),
        None => None,
    };
    let (host, _gpus) = scheduler::place_with(tx, id, need, pref.as_ref(), cutoff, timeout)
        .await
        .map_err(Insert::Place)?;
    if let Some(plan) = vol {
        // Placed with the instance: billed from now.
        if super::volumes::attach(tx, plan, &account, id, &host)
            .await
            .map_err(Insert::Api)?
        {
            crate::volume_meter::sync(tx, &account, st.clock.now_ms())
                .await
                .map_err(|e| Insert::Api(e.into()))?;
        }
    }
    give_access(st, tx, &host, id, &account, &req.ports).await?;
    let now = now_ms();
    let op = OperationId::new();
    sqlx::query(
        "INSERT INTO instances (id, account_id, name, flavor_id, image_id, snapshot_id, host_id, \
         desired_state, observed_state, state_since_ms, root_disk_gib, data_volume_id, pending_op, \
         created_ms, base_image_id, root_password_sealed, root_password_hash, \
         jupyter_token_sealed, region) VALUES ($1, $2, $3, $4, $5, $6, $7, 'Running', \
         'Creating', $8, $9, $10, $11, $8, $12, $13, $14, $15, $16)",
    )
    .bind(id.to_string())
    .bind(account.to_string())
    .bind(&req.name)
    .bind(r.flavor.id.to_string())
    .bind(r.image.map(|i| i.to_string()))
    .bind(r.snapshot.map(|s| s.to_string()))
    .bind(host.to_string())
    .bind(now)
    .bind(r.root_disk_gib as i64)
    .bind(req.data_volume.map(|v| v.to_string()))
    .bind(op.to_string())
    .bind(r.base_image.map(|i| i.to_string()))
    .bind(&c.password_sealed)
    .bind(&c.password_hash)
    .bind(&c.token_sealed)
    .bind(&need.region)
    .execute(&mut **tx)
    .await?;
    if let Some(g) = &group {
        crate::groups::join(tx, g, id).await?;
    }
    let new = crate::operations::NewOp {
        id: op,
        account: Some(account),
        host: Some(host),
        instance: Some(id),
        kind: gantry_proto::OperationKind::Create,
        detail: crate::operations::OpDetail::None,
    };
    crate::operations::create(tx, &new)
        .await
        .map_err(|e| Insert::Api(e.into()))?;
    Ok((op, host))
}

/// The new instance's access on its host: an address in the host's
/// subnet, the default forwards (SSH, JupyterLab) and one per asked port;
/// the host's access state moves on.
async fn give_access(
    st: &AppState,
    tx: &mut Tx,
    host: &HostId,
    id: InstanceId,
    account: &AccountId,
    ports: &[u16],
) -> Result<(), Insert> {
    let subnet = crate::access::ensure_subnet(tx, &st.cfg, host).await?;
    crate::access::lease_address(tx, host, subnet, id).await?;
    let extra = ports.iter().map(|p| crate::access::NewForward {
        protocol: Protocol::Tcp,
        guest_port: *p,
        https: false,
        label: String::new(),
    });
    for f in super::forwards::defaults().into_iter().chain(extra) {
        crate::access::insert_forward(tx, &st.cfg, host, id, account, &f).await?;
    }
    crate::access::bump(tx, host)
        .await
        .map_err(|e| Insert::Api(e.into()))?;
    Ok(())
}

/// A new instance's sealed root password, its crypt hash and its sealed
/// JupyterLab token.
struct NewCredentials {
    password_sealed: String,
    password_hash: String,
    token_sealed: String,
}

async fn credentials(st: &AppState, id: InstanceId) -> ApiResult<NewCredentials> {
    use crate::credentials as c;
    let pw = c::new_password();
    let password_sealed = st.sealer.seal(&c::password_context(id), pw.expose());
    Ok(NewCredentials {
        password_sealed,
        password_hash: c::hash_password_blocking(pw)
            .await
            .map_err(|e| ApiError::Conflict(e.to_string()))?,
        token_sealed: st
            .sealer
            .seal(&c::token_context(id), c::new_jupyter_token().expose()),
    })
}

async fn list(
    State(st): State<AppState>,
    who: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<InstanceSummary>>> {
    query(&q, &["status", "account", "limit", "after"])?;
    let mut states: Vec<&str> = InstanceState::ALL.iter().map(|s| s.name()).collect();
    if let Some(want) = q.get("status") {
        states = InstanceState::ALL
            .iter()
            .filter(|s| s.status().eq_ignore_ascii_case(want))
            .map(|s| s.name())
            .collect();
        if states.is_empty() {
            return Err(ApiError::bad(
                "status",
                format!("unknown status {want:?} (e.g. Running, Stopped, Snapshotting, Released)"),
            ));
        }
    }
    let account = super::list_account(&who, &q)?;
    let limit = match q.get("limit") {
        Some(l) => {
            let n = l
                .parse::<u64>()
                .map_err(|_| ApiError::bad("limit", "must be a whole number"))?;
            validate::in_range("limit", n, 1, 10_000)?;
            n as i64
        }
        None => 1000,
    };
    let after = match q.get("after") {
        Some(a) => a
            .parse::<InstanceId>()
            .map_err(|e| ApiError::bad("after", e.to_string()))?
            .to_string(),
        None => String::new(),
    };
    let in_list = states
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "{} WHERE ($1 = '' OR i.account_id = $1) AND i.id > $2 AND i.observed_state IN ({in_list}) \
         ORDER BY i.id LIMIT $3",
        rows::INSTANCE_SELECT
    );
    let found = sqlx::query(&sql)
        .bind(account)
        .bind(after)
        .bind(limit)
        .fetch_all(&st.db.pool)
        .await?;
    let now = now_ms();
    let recs = found
        .iter()
        .map(rows::instance)
        .collect::<Result<Vec<_>, _>>()?;
    let mut out: Vec<_> = recs.iter().map(|rec| summary(rec, now)).collect();
    let ops: Vec<_> = recs.iter().map(|rec| rec.pending_op).collect();
    with_progress(&st, &mut out, &ops).await?;
    Ok(Json(out))
}

async fn get_one(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<InstanceSummary>> {
    let rec = load(&st, &who, &id).await?;
    gate(&rec)?;
    Ok(Json(summary(&rec, now_ms())))
}

async fn view(
    State(st): State<AppState>,
    who: Caller,
    Path((id, view)): Path<(String, String)>,
) -> ApiResult<Response> {
    let rec = load(&st, &who, &id).await?;
    let json = match view.as_str() {
        "config" => Json(ConfigView {
            name: rec.name.clone(),
            flavor: rec.flavor,
            flavor_name: rec.flavor_name.clone(),
            image: rec.image,
            snapshot: rec.snapshot,
            root_disk_gib: rec.root_disk_gib,
            data_volume: rec.data_volume,
            created_at: to_time(rec.created_ms),
            buckets: super::buckets::attachments(&st, rec.id).await?,
        })
        .into_response(),
        "hardware" => Json(hardware(&st, &rec).await?).into_response(),
        // `monitor` has its own route (`super::monitor`).
        "access" | "billing" => {
            gate(&rec)?;
            match view.as_str() {
                "access" => Json(super::forwards::access_view(&st, &rec).await?).into_response(),
                _ => Json(billing(&st, &rec).await?).into_response(),
            }
        }
        other => {
            return Err(ApiError::NotFound(format!(
                "no view {other:?}; views are access, monitor, billing, config, hardware, \
                 network-group"
            )))
        }
    };
    Ok(json)
}

async fn hardware(st: &AppState, rec: &InstanceRec) -> ApiResult<HardwareView> {
    let gpu_devices = crate::gpus::of_instance(&st.db.pool, &rec.id.to_string()).await?;
    Ok(HardwareView {
        host: rec.host,
        vcpus: rec.vcpus,
        memory_mib: rec.memory_mib,
        root_disk_gib: rec.root_disk_gib,
        gpu_model: rec.gpu_model.clone(),
        gpus: gpu_devices.iter().map(|g| g.pci).collect(),
        gpu_devices,
    })
}

/// What the ledger has charged for the instance: its Running time as its
/// host counted it, up to the last heartbeat.
async fn billing(st: &AppState, rec: &InstanceRec) -> ApiResult<BillingView> {
    let acct = super::admin::load_account(st, &rec.account).await?;
    Ok(BillingView {
        price_micros_per_hour: rec.price_micros_per_hour,
        billed_seconds: (rec.billed_ms.max(0) / 1000) as u64,
        cost_micros: rec.charged_micros,
        account_credit_micros: acct.credit_micros,
    })
}
