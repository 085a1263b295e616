//! Network groups (`/v1/network-groups...`): create (the CIDR chosen or
//! allocated, checked against the account's other groups and the access
//! network), list, get with members, delete when empty, join and leave;
//! and an instance's Network Group tab (`/v1/instances/{id}/network-group`).
//! The allocation rules and the hosts' group state are in
//! [`crate::groups`]; every change wakes the hosts it concerns through the
//! guard (see `api::guard`).

use super::{created, path_id, query, Body, Caller};
use crate::db::{col, now_ms, parsed, to_time, Tx};
use crate::error::{ApiError, ApiResult};
use crate::groups::{self as g, GroupError, GroupRow, GROUP_COLS};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use gantry_proto::api::v1::{
    CreateNetworkGroup, InstanceNetworkGroup, JoinNetworkGroup, NetworkGroupInfo,
    NetworkGroupMember,
};
use gantry_proto::groups::check_group_cidr;
use gantry_proto::ids::{AccountId, InstanceId, NetworkGroupId};
use gantry_proto::net::Ipv4Net;
use gantry_proto::{validate, InstanceState};
use std::collections::HashMap;
use std::net::Ipv4Addr;

/// The guest's interface name of the group NIC in Gantry's images (the
/// access NIC is `eth0`).
pub const GROUP_INTERFACE: &str = "eth1";

/// Attempts a call makes when another request took its address or VNI.
const ATTEMPTS: u32 = 10;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/network-groups", post(create).get(list))
        .route("/network-groups/{id}", get(get_one).delete(remove))
        .route("/network-groups/{id}/members", post(join))
        .route("/network-groups/{id}/members/{instance}", delete(leave))
        .route("/instances/{id}/network-group", get(instance_view))
}

/// How a failed attempt ends: retried (another request took the value
/// first, or the database asked for it), or answered.
enum Attempt {
    Again,
    Stop(ApiError),
}

impl From<ApiError> for Attempt {
    fn from(e: ApiError) -> Self {
        if e.is_retryable() {
            Self::Again
        } else {
            Self::Stop(e)
        }
    }
}

impl From<GroupError> for Attempt {
    fn from(e: GroupError) -> Self {
        match e {
            GroupError::Taken => Self::Again,
            other => api_error(other).into(),
        }
    }
}

impl From<sqlx::Error> for Attempt {
    fn from(e: sqlx::Error) -> Self {
        GroupError::from(e).into()
    }
}

impl From<crate::db::DbError> for Attempt {
    fn from(e: crate::db::DbError) -> Self {
        ApiError::from(e).into()
    }
}

/// The API's answer to a [`GroupError`].
pub fn api_error(e: GroupError) -> ApiError {
    match e {
        GroupError::Full(m) | GroupError::Member(m) => ApiError::Conflict(m),
        GroupError::Gone(id) => ApiError::NotFound(format!("no network group {id}")),
        GroupError::Taken => {
            ApiError::Conflict("the network group kept racing with other requests; retry".into())
        }
        GroupError::Db(e) => e.into(),
    }
}

/// The group `id` when the caller may see it (another account's is 404,
/// answered exactly like a missing one).
pub async fn load(st: &AppState, who: &Caller, id: NetworkGroupId) -> ApiResult<GroupRow> {
    let not_found = || ApiError::NotFound(format!("no network group {id}"));
    let row = sqlx::query(&format!(
        "SELECT {GROUP_COLS} FROM network_groups WHERE id = $1"
    ))
    .bind(id.to_string())
    .fetch_optional(&st.db.pool)
    .await?
    .ok_or_else(not_found)?;
    let row = g::group_row(&row)?;
    if !who.can_see(&row.account) {
        return Err(not_found());
    }
    Ok(row)
}

/// The group's members, by address.
async fn members(st: &AppState, id: NetworkGroupId) -> ApiResult<Vec<NetworkGroupMember>> {
    const T: &str = "network_group_members";
    let found = sqlx::query(
        "SELECT m.instance_id, m.ip, m.joined_ms, i.name, i.observed_state FROM \
         network_group_members m JOIN instances i ON i.id = m.instance_id WHERE m.group_id = $1",
    )
    .bind(id.to_string())
    .fetch_all(&st.db.pool)
    .await?;
    let mut out = Vec::with_capacity(found.len());
    for r in &found {
        out.push(NetworkGroupMember {
            instance: parsed(r, "instance_id", T)?,
            name: col(r, "name")?,
            ip: parsed(r, "ip", T)?,
            state: parsed(r, "observed_state", "instances")?,
            joined_at: to_time(col(r, "joined_ms")?),
        });
    }
    out.sort_by_key(|m| m.ip);
    Ok(out)
}

fn info(g: &GroupRow, member_count: usize, members: Vec<NetworkGroupMember>) -> NetworkGroupInfo {
    NetworkGroupInfo {
        id: g.id,
        account: g.account,
        name: g.name.clone(),
        cidr: g.cidr,
        placement: g.placement,
        mtu: g.mtu,
        member_count,
        members,
        created_at: to_time(g.created_ms),
    }
}

/// The group with its members.
async fn full_info(st: &AppState, g: &GroupRow) -> ApiResult<NetworkGroupInfo> {
    let m = members(st, g.id).await?;
    Ok(info(g, m.len(), m))
}

/// A CIDR a tenant chose: private, a /8 to a /29, clear of the access
/// network (guests have both NICs).
fn check_chosen(st: &AppState, cidr: &Ipv4Net) -> ApiResult<()> {
    check_group_cidr("cidr", cidr)?;
    let access = st.cfg.access_network;
    if cidr.overlaps(&access) {
        return Err(ApiError::invalid(
            "cidr",
            format!(
                "{cidr} overlaps the access network {access} that every instance's first NIC \
                 is on; choose another range"
            ),
        ));
    }
    Ok(())
}

/// `POST /v1/network-groups`.
async fn create(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<CreateNetworkGroup>,
) -> ApiResult<Response> {
    let account = super::owner_for(&who, req.account)?;
    validate::object_name("name", &req.name)?;
    if let Some(c) = &req.cidr {
        check_chosen(&st, c)?;
    }
    super::accounts::require_active(&st, &account).await?;
    let id = NetworkGroupId::new();
    for _ in 0..ATTEMPTS {
        let mut tx = st.db.begin_write().await?;
        match create_once(&st, &mut tx, id, account, &req).await {
            Ok(row) => {
                tx.commit().await?;
                tracing::info!(group = %id, %account, cidr = %row.cidr, vni = row.vni,
                    "network group created");
                return Ok(created(info(&row, 0, Vec::new())));
            }
            Err(Attempt::Again) => continue,
            Err(Attempt::Stop(e)) => return Err(e),
        }
    }
    Err(api_error(GroupError::Taken))
}

async fn create_once(
    st: &AppState,
    tx: &mut Tx,
    id: NetworkGroupId,
    account: AccountId,
    req: &CreateNetworkGroup,
) -> Result<GroupRow, Attempt> {
    let others = g::account_groups(tx, &account).await?;
    if others.iter().any(|o| o.name == req.name) {
        return Err(Attempt::Stop(ApiError::Conflict(format!(
            "a network group named {:?} already exists in this account",
            req.name
        ))));
    }
    let cidr = match req.cidr {
        Some(c) => {
            if let Some(o) = others.iter().find(|o| o.cidr.overlaps(&c)) {
                return Err(Attempt::Stop(ApiError::invalid(
                    "cidr",
                    format!(
                        "{c} overlaps network group {:?} ({}) of this account; an account's \
                         groups must not overlap",
                        o.name, o.cidr
                    ),
                )));
            }
            c
        }
        None => {
            let mut taken: Vec<Ipv4Net> = others.iter().map(|o| o.cidr).collect();
            taken.push(st.cfg.access_network);
            let pool = st.cfg.group_pool;
            g::default_cidr(pool, &taken).ok_or_else(|| {
                Attempt::Stop(ApiError::Conflict(format!(
                    "the controller's group_pool {pool} has no free block left for this \
                     account; give a cidr"
                )))
            })?
        }
    };
    let mut row = GroupRow {
        id,
        account,
        name: req.name.clone(),
        cidr,
        vni: 0,
        mtu: st.cfg.group_mtu,
        placement: req.placement,
        created_ms: now_ms(),
    };
    row.vni = g::insert_group(tx, &row).await?;
    Ok(row)
}

/// `GET /v1/network-groups`: the caller's groups (admins: all, or
/// `?account=`), members counted, not listed.
async fn list(
    State(st): State<AppState>,
    who: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<NetworkGroupInfo>>> {
    query(&q, &["account"])?;
    let account = super::list_account(&who, &q)?;
    let found = sqlx::query(&format!(
        "SELECT {GROUP_COLS}, (SELECT COUNT(*) FROM network_group_members m WHERE m.group_id = \
         network_groups.id) AS n FROM network_groups WHERE $1 = '' OR account_id = $1 \
         ORDER BY created_ms, id"
    ))
    .bind(account)
    .fetch_all(&st.db.pool)
    .await?;
    let mut out = Vec::with_capacity(found.len());
    for r in &found {
        let n = col::<i64>(r, "n")?.max(0) as usize;
        out.push(info(&g::group_row(r)?, n, Vec::new()));
    }
    Ok(Json(out))
}

/// `GET /v1/network-groups/{id}`.
async fn get_one(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<NetworkGroupInfo>> {
    let row = load(&st, &who, path_id(&id, "network group")?).await?;
    Ok(Json(full_info(&st, &row).await?))
}

/// `DELETE /v1/network-groups/{id}`: only an empty group.
async fn remove(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let row = load(&st, &who, path_id(&id, "network group")?).await?;
    let mut tx = st.db.begin_write().await?;
    g::lock_group(&mut tx, row.id).await.map_err(api_error)?;
    let n: i64 = col(
        &sqlx::query("SELECT COUNT(*) AS n FROM network_group_members WHERE group_id = $1")
            .bind(row.id.to_string())
            .fetch_one(&mut *tx)
            .await?,
        "n",
    )?;
    if n > 0 {
        return Err(ApiError::Conflict(format!(
            "network group {} still has {n} member{}: remove them first (gantryctl group leave \
             {} INSTANCE)",
            row.name,
            if n == 1 { "" } else { "s" },
            row.id
        )));
    }
    sqlx::query("DELETE FROM network_groups WHERE id = $1")
        .bind(row.id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(group = %row.id, "network group deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Why `rec` cannot join a group now, if it cannot: it is Snapshotting,
/// gone, or being moved to another host.
async fn refuse_join(st: &AppState, rec: &crate::db::rows::InstanceRec) -> ApiResult<()> {
    let s = rec.observed;
    if s.is_snapshotting() || s.is_final() {
        return Err(ApiError::Conflict(format!(
            "instance {} is {s}; it can join a network group when it is not Snapshotting, \
             Released or Failed",
            rec.id
        )));
    }
    let moving = sqlx::query(
        "SELECT COUNT(*) AS n FROM operations WHERE instance_id = $1 AND state IN ('pending', \
         'running') AND kind IN ('move-out', 'move-in', 'move-cleanup')",
    )
    .bind(rec.id.to_string())
    .fetch_one(&st.db.pool)
    .await?;
    if col::<i64>(&moving, "n")? > 0 {
        return Err(ApiError::Conflict(format!(
            "instance {} is being moved to another host; join the group once the move is done",
            rec.id
        )));
    }
    Ok(())
}

/// `POST /v1/network-groups/{id}/members`.
async fn join(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<JoinNetworkGroup>,
) -> ApiResult<Response> {
    let group = load(&st, &who, path_id(&id, "network group")?).await?;
    let rec = super::instances::load_in(&st.db.pool, &who, req.instance).await?;
    if rec.account != group.account {
        return Err(ApiError::invalid(
            "instance",
            format!(
                "instance {} belongs to another account than network group {}",
                rec.id, group.id
            ),
        ));
    }
    super::accounts::require_active(&st, &group.account).await?;
    refuse_join(&st, &rec).await?;
    for _ in 0..ATTEMPTS {
        let mut tx = st.db.begin_write().await?;
        match join_once(&mut tx, group.id, rec.id).await {
            Ok(ip) => {
                tx.commit().await?;
                tracing::info!(group = %group.id, instance = %rec.id, %ip, "joined a network group");
                let me = members(&st, group.id)
                    .await?
                    .into_iter()
                    .find(|m| m.instance == rec.id)
                    .ok_or_else(|| ApiError::Conflict("the member left meanwhile".into()))?;
                return Ok(created(me));
            }
            Err(Attempt::Again) => continue,
            Err(Attempt::Stop(e)) => return Err(e),
        }
    }
    Err(api_error(GroupError::Taken))
}

async fn join_once(
    tx: &mut Tx,
    group: NetworkGroupId,
    instance: InstanceId,
) -> Result<Ipv4Addr, Attempt> {
    let row = g::lock_group(tx, group).await?;
    // The instance row again, inside the transaction: it may have ended.
    let state = sqlx::query("SELECT observed_state FROM instances WHERE id = $1")
        .bind(instance.to_string())
        .fetch_one(&mut **tx)
        .await?;
    let state: InstanceState = parsed(&state, "observed_state", "instances")?;
    if state.is_final() {
        return Err(Attempt::Stop(ApiError::Conflict(format!(
            "instance {instance} is {state}; it cannot join a network group"
        ))));
    }
    Ok(g::join(tx, &row, instance).await?)
}

/// `DELETE /v1/network-groups/{id}/members/{instance}`.
async fn leave(
    State(st): State<AppState>,
    who: Caller,
    Path((id, instance)): Path<(String, String)>,
) -> ApiResult<Response> {
    let group = load(&st, &who, path_id(&id, "network group")?).await?;
    let instance: InstanceId = path_id(&instance, "instance")?;
    let not_member = || {
        ApiError::NotFound(format!(
            "instance {instance} is not a member of network group {}",
            group.id
        ))
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut tx = st.db.begin_write().await?;
        let res: ApiResult<()> = async {
            g::lock_group(&mut tx, group.id).await.map_err(api_error)?;
            if g::group_of(&mut tx, instance).await? != Some(group.id) {
                return Err(not_member());
            }
            g::leave(&mut tx, instance).await?;
            Ok(())
        }
        .await;
        match res {
            Err(e) if e.is_retryable() && attempt < crate::db::WRITE_ATTEMPTS => continue,
            r => r?,
        }
        tx.commit().await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
}

/// `GET /v1/instances/{id}/network-group`: the instance's Network Group tab.
async fn instance_view(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<InstanceNetworkGroup>> {
    let rec = super::instances::load(&st, &who, &id).await?;
    super::instances::gate(&rec)?;
    let row = sqlx::query("SELECT group_id, ip FROM network_group_members WHERE instance_id = $1")
        .bind(rec.id.to_string())
        .fetch_optional(&st.db.pool)
        .await?;
    let Some(row) = row else {
        return Ok(Json(InstanceNetworkGroup {
            instance: rec.id,
            group: None,
            private_ip: None,
            interface: None,
        }));
    };
    let gid: NetworkGroupId = parsed(&row, "group_id", "network_group_members")?;
    let ip: Ipv4Addr = parsed(&row, "ip", "network_group_members")?;
    let group = load(&st, &who, gid).await?;
    Ok(Json(InstanceNetworkGroup {
        instance: rec.id,
        group: Some(full_info(&st, &group).await?),
        private_ip: Some(ip),
        interface: Some(GROUP_INTERFACE.into()),
    }))
}
