//! Operations as the agent sees them: turning `operations` rows into
//! [`AgentCommand`]s (the work answer), and applying what the agent
//! reports back (operation outcomes and observed states).

use crate::db::{col, now_ms, parsed, parsed_opt, rows, rows::InstanceRec, DbError, Tx};
use crate::error::{ApiError, ApiResult};
use crate::operations::{op_row, OpDetail, OpRow, OP_COLS};
use crate::AppState;
use gantry_proto::api::agent::*;
use gantry_proto::ids::*;
use gantry_proto::net::{GuestConfig, Ipv4Net, MacAddr, NicSpec, Secret};
use gantry_proto::operation::{OperationEvent, OperationKind, OperationState};
use gantry_proto::spec::{InstanceSpec, VolumeSpec};
use gantry_proto::{Action, InstanceState, SnapshotStatus};

/// The host's non-final instances, its unfinished operations, and its
/// access state, certificate and network-group state unless the agent
/// already has them (`known_rev`, `known_tls`, `known_groups`; an agent
/// that names no group revision gets the state, empty or not). An
/// operation whose command cannot be built (its image is gone, say) is
/// failed here with the reason.
/// What the agent says it already has (the work poll's query).
#[derive(Debug, Default)]
pub struct Known<'a> {
    pub access: Option<u64>,
    pub tls: Option<&'a str>,
    pub groups: Option<u64>,
    pub buckets: Option<u64>,
}

pub async fn build_work(st: &AppState, host: &HostId, known: &Known<'_>) -> ApiResult<Work> {
    let found = sqlx::query(
        "SELECT id, desired_state, observed_state FROM instances WHERE host_id = $1 AND \
         observed_state NOT IN ('Released', 'Failed') ORDER BY id",
    )
    .bind(host.to_string())
    .fetch_all(&st.db.pool)
    .await?;
    let mut instances = Vec::with_capacity(found.len());
    for r in &found {
        instances.push(DesiredInstance {
            id: parsed(r, "id", "instances")?,
            desired: parsed(r, "desired_state", "instances")?,
            observed: parsed(r, "observed_state", "instances")?,
        });
    }
    let found = sqlx::query(&format!(
        "SELECT {OP_COLS} FROM operations WHERE host_id = $1 AND \
         state IN ('pending', 'running') ORDER BY created_ms, id"
    ))
    .bind(host.to_string())
    .fetch_all(&st.db.pool)
    .await?;
    let mut ops = Vec::with_capacity(found.len());
    for r in &found {
        let op = op_row(r)?;
        match command(st, &op).await {
            Ok(command) => ops.push(AgentOp {
                id: op.id,
                instance: op.instance,
                phase: if op.state == OperationState::Pending {
                    OpPhase::Pending
                } else {
                    OpPhase::Running
                },
                command,
            }),
            Err(ApiError::Db(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(op = %op.id, error = %e, "cannot build the command; failing it");
                let report = OpReport {
                    outcome: OpOutcome::Failed,
                    progress: 0,
                    error: Some(e.to_string()),
                    snapshot: None,
                    instance_state: None,
                    note: None,
                };
                let mut tx = st.db.begin_write().await?;
                apply_report(st, &mut tx, host, op.id, &report).await?;
                tx.commit().await?;
            }
        }
    }
    let (access, tls) = super::certs::access_and_tls(st, host).await?;
    let groups = crate::groups::host_groups(&st.db.pool, host).await?;
    let buckets = crate::buckets::host_buckets(&st.db.pool, &st.sealer, host)
        .await
        .map_err(|e| match e {
            crate::buckets::BucketError::Db(e) => ApiError::Db(e),
            e => {
                tracing::error!(%host, error = %e, "cannot build the host's bucket state");
                ApiError::Unavailable(format!("cannot build the bucket state: {e}"))
            }
        })?;
    Ok(Work {
        instances,
        ops,
        access: access.filter(|a| Some(a.rev) != known.access),
        tls: tls.filter(|t| Some(t.fingerprint.as_str()) != known.tls),
        groups: Some(groups).filter(|g| Some(g.rev) != known.groups),
        buckets: Some(buckets).filter(|b| Some(b.rev) != known.buckets),
    })
}

fn gone(what: String) -> ApiError {
    ApiError::Conflict(what)
}

async fn instance(st: &AppState, id: Option<InstanceId>) -> ApiResult<InstanceRec> {
    let id = id.ok_or_else(|| gone("the operation names no instance".into()))?;
    let row = sqlx::query(&format!("{} WHERE i.id = $1", rows::INSTANCE_SELECT))
        .bind(id.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| gone(format!("instance {id} is gone")))?;
    Ok(rows::instance(&row)?)
}

/// The command of an operation kind that needs nothing but the kind.
pub(crate) fn plain(kind: OperationKind) -> Option<AgentCommand> {
    use OperationKind as K;
    Some(match kind {
        K::Start => AgentCommand::Start {},
        K::Stop => AgentCommand::Stop {},
        K::Reboot => AgentCommand::Reboot {},
        K::ForceReboot => AgentCommand::ForceReboot {},
        K::Suspend => AgentCommand::Suspend {},
        K::Resume => AgentCommand::Resume {},
        K::Release => AgentCommand::Release {},
        K::MoveCleanup => AgentCommand::MoveCleanup {},
        K::Create
        | K::ChangeType
        | K::GrowDisk
        | K::Snapshot
        | K::DeleteSnapshot
        | K::SetPassword
        | K::ClearGpu
        | K::GrowVolume
        | K::DeleteVolume
        | K::MoveOut
        | K::MoveIn => return None,
    })
}

/// Whether the controller carries out instance action `a` end to end: its
/// operation's command is built from the kind alone, or from the detail
/// the action's handler records (`actions`, `change_type`, the snapshot
/// route). The allowed actions an instance advertises are filtered by it.
pub(crate) fn executable(a: Action) -> bool {
    use OperationKind as K;
    let kind = OperationKind::for_action(a);
    plain(kind).is_some() || matches!(kind, K::ChangeType | K::GrowDisk | K::Snapshot)
}

/// The command an operation asks for, from its kind and typed detail.
async fn command(st: &AppState, op: &OpRow) -> ApiResult<AgentCommand> {
    use OperationKind as K;
    let bad = || {
        gone(format!(
            "operation {} has a {} detail it cannot use",
            op.id, op.kind
        ))
    };
    if let Some(c) = plain(op.kind) {
        return Ok(c);
    }
    Ok(match (op.kind, &op.detail) {
        (K::Create, _) => create_command(st, &instance(st, op.instance).await?).await?,
        (K::ChangeType, OpDetail::ChangeType { flavor, .. }) => {
            change_type_command(st, op, *flavor).await?
        }
        (K::ClearGpu, OpDetail::ClearGpu { pci }) => AgentCommand::ClearGpu { pci: *pci },
        (K::GrowDisk, OpDetail::GrowDisk { root_disk_gib, .. }) => AgentCommand::GrowDisk {
            root_disk_gib: *root_disk_gib,
        },
        (K::Snapshot, OpDetail::Snapshot { snapshot }) => snapshot_command(st, *snapshot).await?,
        (K::DeleteSnapshot, OpDetail::DeleteSnapshot { snapshot }) => {
            AgentCommand::DeleteSnapshot {
                snapshot: *snapshot,
            }
        }
        (K::SetPassword, OpDetail::SetPassword { .. }) => password_command(st, op).await?,
        (
            K::GrowVolume,
            OpDetail::GrowVolume {
                volume, size_gib, ..
            },
        ) => AgentCommand::GrowVolume {
            volume: *volume,
            size_gib: *size_gib,
        },
        (
            K::MoveOut,
            OpDetail::MoveOut {
                snapshot,
                volume_snapshot,
                ..
            },
        ) => AgentCommand::MoveOut {
            snapshot: *snapshot,
            volume_snapshot: *volume_snapshot,
            owner: op
                .account
                .ok_or_else(|| gone("a move names no account".into()))?,
        },
        (
            K::MoveIn,
            OpDetail::MoveIn {
                snapshot,
                volume_snapshot,
                ..
            },
        ) => move_in_command(st, op, *snapshot, *volume_snapshot).await?,
        (K::DeleteVolume, OpDetail::DeleteVolume { volume }) => {
            AgentCommand::DeleteVolume { volume: *volume }
        }
        (
            K::Start
            | K::Stop
            | K::Reboot
            | K::ForceReboot
            | K::Suspend
            | K::Resume
            | K::Release
            | K::MoveCleanup,
            _,
        ) => unreachable!("plain kinds are answered above"),
        (
            K::ChangeType
            | K::ClearGpu
            | K::GrowDisk
            | K::Snapshot
            | K::DeleteSnapshot
            | K::SetPassword
            | K::GrowVolume
            | K::DeleteVolume
            | K::MoveOut
            | K::MoveIn,
            _,
        ) => return Err(bad()),
    })
}

/// `ChangeType`: the flavor's size, the GPUs booked for the instance, and
/// the root disk booked by the change (the larger of the two).
async fn change_type_command(
    st: &AppState,
    op: &OpRow,
    flavor: FlavorId,
) -> ApiResult<AgentCommand> {
    let row = sqlx::query("SELECT vcpus, memory_mib FROM flavors WHERE id = $1")
        .bind(flavor.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| gone(format!("flavor {flavor} is gone")))?;
    let rec = instance(st, op.instance).await?;
    Ok(AgentCommand::ChangeType {
        vcpus: col::<i64>(&row, "vcpus")? as u32,
        memory_mib: col::<i64>(&row, "memory_mib")? as u64,
        gpus: Some(crate::gpus::booked(&st.db.pool, &rec.id.to_string()).await?),
        root_disk_gib: Some(rec.root_disk_gib),
    })
}

/// `Snapshot`: the snapshot's name, owner and whether it releases the
/// instance once saved.
async fn snapshot_command(st: &AppState, snapshot: SnapshotId) -> ApiResult<AgentCommand> {
    let row = sqlx::query("SELECT name, account_id, auto_release FROM snapshots WHERE id = $1")
        .bind(snapshot.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| gone(format!("snapshot {snapshot} is gone")))?;
    Ok(AgentCommand::Snapshot {
        snapshot,
        name: col(&row, "name")?,
        owner: parsed(&row, "account_id", "snapshots")?,
        auto_release: col::<i64>(&row, "auto_release")? != 0,
    })
}

/// `SetPassword`: the instance's stored hash (never the password).
async fn password_command(st: &AppState, op: &OpRow) -> ApiResult<AgentCommand> {
    let id = op.instance.ok_or_else(|| gone("no instance".into()))?;
    let row = sqlx::query("SELECT root_password_hash FROM instances WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| gone(format!("instance {id} is gone")))?;
    let hash: Option<String> = col(&row, "root_password_hash")?;
    Ok(AgentCommand::SetPassword {
        password_hash: Secret::new(
            hash.ok_or_else(|| gone(format!("instance {id} has no password")))?,
        ),
    })
}

/// `MoveIn`: the create's spec, with the GPUs booked on the new host and
/// the root disk restored from the move's store entry.
async fn move_in_command(
    st: &AppState,
    op: &OpRow,
    snapshot: SnapshotId,
    volume_snapshot: Option<SnapshotId>,
) -> ApiResult<AgentCommand> {
    let rec = instance(st, op.instance).await?;
    let host = op
        .host
        .ok_or_else(|| gone("a move-in names no host".into()))?;
    let AgentCommand::Create { mut spec, .. } = create_command(st, &rec).await? else {
        unreachable!("create_command builds a Create")
    };
    let boot_like = rec.base_image.or(rec.image);
    let boot_like_source = match boot_like {
        Some(img) => image_origin(st, img).await?.ok().map(Box::new),
        None => None,
    };
    let image = ImageSource {
        image: ImageSource::snapshot_image_id(snapshot),
        name: format!("moved-{}", rec.id),
        origin: ImageOrigin::Snapshot {
            snapshot,
            boot_like,
            boot_like_source,
        },
    };
    spec.image = image.image;
    spec.gpus = crate::moves::gpus_on(st, &host, rec.id).await?;
    Ok(AgentCommand::MoveIn {
        spec,
        image,
        volume_snapshot,
        owner: rec.account,
    })
}

/// `Create`: the spec from the flavor, disk, volume and GPUs held, and
/// where the image comes from.
async fn create_command(st: &AppState, rec: &InstanceRec) -> ApiResult<AgentCommand> {
    let image = image_source(st, rec).await?;
    let gpus = crate::gpus::booked(&st.db.pool, &rec.id.to_string()).await?;
    let data_volume = match rec.data_volume {
        None => None,
        Some(v) => {
            let row = sqlx::query("SELECT size_gib FROM volumes WHERE id = $1")
                .bind(v.to_string())
                .fetch_optional(&st.db.pool)
                .await?
                .ok_or_else(|| gone(format!("volume {v} is gone")))?;
            Some(VolumeSpec {
                id: v,
                size_gib: col::<i64>(&row, "size_gib")? as u64,
            })
        }
    };
    let spec = InstanceSpec {
        id: rec.id,
        name: rec.name.clone(),
        vcpus: rec.vcpus,
        memory_mib: rec.memory_mib,
        root_disk_gib: rec.root_disk_gib,
        image: image.image,
        data_volume,
        gpus,
        nic: nic_spec(st, rec).await?,
        guest: guest_config(st, rec).await?,
    };
    Ok(AgentCommand::Create { spec, image })
}

/// The instance's access NIC: its lease on the host's subnet (none for
/// instances created before instances had addresses).
async fn nic_spec(st: &AppState, rec: &InstanceRec) -> ApiResult<Option<NicSpec>> {
    let row = sqlx::query(
        "SELECT l.ip, h.access_subnet FROM ip_leases l JOIN hosts h ON h.id = l.host_id \
         WHERE l.instance_id = $1",
    )
    .bind(rec.id.to_string())
    .fetch_optional(&st.db.pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let ip: std::net::Ipv4Addr = parsed(&row, "ip", "ip_leases")?;
    let subnet: Ipv4Net = parsed(&row, "access_subnet", "hosts")?;
    Ok(Some(NicSpec {
        mac: MacAddr::for_ip(ip),
        ip,
        subnet,
        gateway: crate::access::gateway(subnet),
    }))
}

/// What the guest is told at boot: its hostname, root's password hash,
/// the account's SSH keys as they are now and the JupyterLab token.
async fn guest_config(st: &AppState, rec: &InstanceRec) -> ApiResult<Option<GuestConfig>> {
    let row =
        sqlx::query("SELECT root_password_hash, jupyter_token_sealed FROM instances WHERE id = $1")
            .bind(rec.id.to_string())
            .fetch_one(&st.db.pool)
            .await?;
    let hash: Option<String> = col(&row, "root_password_hash")?;
    let token: Option<String> = col(&row, "jupyter_token_sealed")?;
    let (Some(hash), Some(token)) = (hash, token) else {
        return Ok(None);
    };
    let token = st
        .sealer
        .open(&crate::credentials::token_context(rec.id), &token)
        .map_err(|e| gone(e.to_string()))?;
    let found = sqlx::query(
        "SELECT public_key FROM ssh_keys WHERE account_id = $1 ORDER BY created_ms, id",
    )
    .bind(rec.account.to_string())
    .fetch_all(&st.db.pool)
    .await?;
    let keys = found
        .iter()
        .map(|r| col::<String>(r, "public_key"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(GuestConfig {
        hostname: gantry_proto::net::hostname_for(&rec.name),
        root_password_hash: Secret::new(hash),
        ssh_authorized_keys: keys,
        jupyter_token: token,
    }))
}

/// Where the instance's base image comes from: the image's own origin,
/// or the snapshot it was made from (directly or through an as-image),
/// with where to get the image it boots like.
async fn image_source(st: &AppState, rec: &InstanceRec) -> ApiResult<ImageSource> {
    let mut snapshot = rec.snapshot;
    if snapshot.is_none() {
        let img = rec
            .image
            .ok_or_else(|| gone(format!("instance {} has no image", rec.id)))?;
        match image_origin(st, img).await? {
            Ok(src) => return Ok(src),
            Err(sid) => snapshot = Some(sid),
        }
    }
    let sid = snapshot.ok_or_else(|| gone("no snapshot".into()))?;
    let row = sqlx::query("SELECT name FROM snapshots WHERE id = $1")
        .bind(sid.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| gone(format!("snapshot {sid} is gone")))?;
    let boot_like_source = match rec.base_image {
        Some(img) => image_origin(st, img).await?.ok().map(Box::new),
        None => None,
    };
    Ok(ImageSource {
        image: ImageSource::snapshot_image_id(sid),
        name: col(&row, "name")?,
        origin: ImageOrigin::Snapshot {
            snapshot: sid,
            boot_like: rec.base_image,
            boot_like_source,
        },
    })
}

/// Image `img`'s own origin, or (`Err`) the snapshot it was made from.
async fn image_origin(st: &AppState, img: ImageId) -> ApiResult<Result<ImageSource, SnapshotId>> {
    let row = sqlx::query("SELECT name, origin, source_snapshot_id FROM images WHERE id = $1")
        .bind(img.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| gone(format!("image {img} is gone")))?;
    if let Some(sid) = parsed_opt(&row, "source_snapshot_id", "images")? {
        return Ok(Err(sid));
    }
    let origin: Option<String> = col(&row, "origin")?;
    let origin = origin.ok_or_else(|| gone(format!("image {img} has no origin")))?;
    let origin: ImageOrigin = serde_json::from_str(&origin).map_err(|e| DbError::Corrupt {
        table: "images",
        message: format!("origin: {e}"),
    })?;
    Ok(Ok(ImageSource {
        image: img,
        name: col(&row, "name")?,
        origin,
    }))
}

/// The instance `id` when it is on `host`.
async fn load_on(
    tx: &mut Tx,
    host: &HostId,
    id: InstanceId,
) -> Result<Option<InstanceRec>, DbError> {
    let row = sqlx::query(&format!("{} WHERE i.id = $1", rows::INSTANCE_SELECT))
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row
        .as_ref()
        .map(rows::instance)
        .transpose()?
        .filter(|rec| rec.host.as_ref() == Some(host)))
}

/// Applies a state `host` observed for `id`; instances of other hosts (or
/// unknown ones) are ignored with a warning. Returns whether the host's
/// forwards changed.
pub async fn observe(
    tx: &mut Tx,
    host: &HostId,
    id: InstanceId,
    state: InstanceState,
) -> Result<bool, DbError> {
    match load_on(tx, host, id).await? {
        Some(rec) => super::actions::apply_observed(tx, &rec, state).await,
        None => {
            tracing::warn!(instance = %id, %host, "ignoring a state for an instance not on this host");
            Ok(false)
        }
    }
}

/// Applies the states `host` observed for `observed` (a heartbeat's list)
/// like [`observe`] one by one, reading the stored states in one statement
/// first: an instance of this host whose stored state is already the one
/// observed changes nothing there, so it is skipped. Returns whether the
/// host's forwards changed.
pub async fn observe_all(
    tx: &mut Tx,
    host: &HostId,
    observed: &[ObservedInstance],
) -> Result<bool, DbError> {
    let mut same = std::collections::HashSet::new();
    for chunk in observed.chunks(crate::db::IN_LIST_MAX) {
        let sql = format!(
            "SELECT id, observed_state FROM instances WHERE host_id = $1 AND id IN ({})",
            crate::db::placeholders(2, chunk.len())
        );
        let mut q = sqlx::query(&sql).bind(host.to_string());
        for o in chunk {
            q = q.bind(o.id.to_string());
        }
        for r in q.fetch_all(&mut **tx).await? {
            same.insert((
                col::<String>(&r, "id")?,
                col::<String>(&r, "observed_state")?,
            ));
        }
    }
    let mut changed = false;
    // A repeated id is applied in full: its first report may change it.
    let mut seen = std::collections::HashSet::new();
    for o in observed {
        let first = seen.insert(o.id);
        if !first || !same.contains(&(o.id.to_string(), o.state.name().to_string())) {
            changed |= observe(tx, host, o.id, o.state).await?;
        }
    }
    Ok(changed)
}

/// Applies an operation report of `host` (idempotent: an ended operation
/// is left as it is). Returns whether the host's forwards changed.
pub async fn apply_report(
    st: &AppState,
    tx: &mut Tx,
    host: &HostId,
    id: OperationId,
    r: &OpReport,
) -> ApiResult<bool> {
    let op = crate::operations::load(tx, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no operation {id}")))?;
    if op.host.as_ref() != Some(host) {
        return Err(ApiError::Denied(format!(
            "operation {id} belongs to another host"
        )));
    }
    if op.state.is_final() {
        if r.outcome == OpOutcome::Succeeded {
            crate::moves::late_move_in(tx, &op).await?;
        }
        return Ok(false);
    }
    let mut changed = false;
    if let (Some(s), Some(i)) = (r.instance_state, op.instance) {
        changed |= observe(tx, host, i, s).await?;
    }
    let event = match r.outcome {
        OpOutcome::Running => {
            crate::operations::progress(tx, &op, r.progress).await?;
            gantry_crashpoint::hit("controller.report.progress");
            return Ok(changed);
        }
        OpOutcome::Succeeded => OperationEvent::Succeeded,
        OpOutcome::Failed => OperationEvent::Failed,
    };
    let failed = event == OperationEvent::Failed;
    let error = failed.then(|| {
        r.error
            .clone()
            .unwrap_or_else(|| "the host reported a failure without a reason".into())
    });
    if let (false, OpDetail::Snapshot { snapshot }) = (failed, &op.detail) {
        snapshot_saved(tx, host, *snapshot, r).await?;
        gantry_crashpoint::hit("controller.report.snapshot_saved");
    }
    let ended = crate::operations::finish(
        st,
        tx,
        &op,
        crate::operations::Ending {
            event,
            progress: r.progress,
            error: error.as_deref(),
            note: r.note.as_deref().filter(|_| !failed),
        },
    )
    .await?;
    gantry_crashpoint::hit("controller.report.finished");
    Ok(changed | ended.unwrap_or(false))
}

/// A snapshot operation succeeded: the snapshot is Success (sizes, host,
/// its quota reservation until its host's store reports hold it, and its
/// private image with `as_image`) through the one status setter; a report
/// its status machine refuses changes nothing. (A failed one is settled
/// by `operations::finish`.)
async fn snapshot_saved(
    tx: &mut Tx,
    host: &HostId,
    sid: SnapshotId,
    r: &OpReport,
) -> ApiResult<()> {
    let sizes = r.snapshot.ok_or_else(|| {
        ApiError::invalid("snapshot", "is required when a snapshot operation succeeds")
    })?;
    // Within the largest disk, compressed not above logical; else refused.
    if let Err(e) = sizes.check_bounds("snapshot") {
        tracing::warn!(%host, snapshot = %sid, field = %e.field, error = %e.message,
            "refused a snapshot report out of bounds; nothing of it was applied");
        return Err(e.into());
    }
    if !crate::snapshots::set_status(tx, sid, SnapshotStatus::Success).await? {
        return Ok(());
    }
    sqlx::query(
        "UPDATE snapshots SET logical_bytes = $1, compressed_bytes = $2, host_id = $3, \
         store_reports_due = $4, frozen = $5 WHERE id = $6",
    )
    .bind(sizes.logical_bytes.min(i64::MAX as u64) as i64)
    .bind(sizes.compressed_bytes.min(i64::MAX as u64) as i64)
    .bind(host.to_string())
    .bind(crate::snapshots::STORE_REPORTS_DUE)
    .bind(i64::from(sizes.frozen))
    .bind(sid.to_string())
    .execute(&mut **tx)
    .await?;
    let row = sqlx::query("SELECT account_id, as_image FROM snapshots WHERE id = $1")
        .bind(sid.to_string())
        .fetch_one(&mut **tx)
        .await?;
    if col::<i64>(&row, "as_image")? != 0 {
        sqlx::query(
            "INSERT INTO images (id, name, size_gib, account_id, source_snapshot_id, \
             created_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(ImageId::new().to_string())
        .bind(format!("snapshot-{sid}"))
        .bind(sizes.logical_bytes.div_ceil(crate::snapshots::GIB).max(1) as i64)
        .bind(col::<String>(&row, "account_id")?)
        .bind(sid.to_string())
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::api::v1::InstanceAction;

    /// The API body (or route) that asks for `a`.
    fn request(a: Action) -> Option<InstanceAction> {
        let body = match a {
            // Its own route: `POST /v1/instances/{id}/snapshots`.
            Action::Snapshot => return None,
            Action::ChangeType => serde_json::json!({
                "action": "change-type", "flavor": gantry_proto::ids::FlavorId::new()
            }),
            Action::GrowDisk => serde_json::json!({"action": "grow-disk", "root_disk_gib": 60}),
            other => serde_json::json!({ "action": other.name() }),
        };
        Some(serde_json::from_value(body).expect("the API takes every advertised action"))
    }

    #[test]
    fn every_advertised_action_is_one_the_controller_executes() {
        for s in InstanceState::ALL {
            let advertised = super::super::instances::advertised(s, false);
            // Nothing the state machine allows is left out: the controller
            // executes every one of them.
            assert_eq!(advertised, s.allowed_actions(), "{s}");
            for a in advertised {
                if let Some(req) = request(a) {
                    assert_eq!(req.action(), a);
                }
                assert_eq!(OperationKind::for_action(a).name(), a.name());
            }
        }
    }

    #[test]
    fn a_host_that_is_down_advertises_only_release() {
        for s in InstanceState::ALL {
            let down = super::super::instances::advertised(s, true);
            let want: Vec<Action> = s
                .allowed_actions()
                .into_iter()
                .filter(|a| *a == Action::Release)
                .collect();
            assert_eq!(down, want, "{s}");
        }
    }
}
