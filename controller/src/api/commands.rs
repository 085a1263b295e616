//! Operations as the agent sees them: turning `operations` rows into
//! [`AgentCommand`]s (the work answer), and applying what the agent
//! reports back (operation outcomes and observed states).

use crate::db::{col, now_ms, parsed, parsed_opt, rows, rows::InstanceRec, DbError, Tx};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use gantry_proto::api::agent::*;
use gantry_proto::ids::*;
use gantry_proto::net::{GuestConfig, Ipv4Net, MacAddr, NicSpec, Secret};
use gantry_proto::spec::{InstanceSpec, VolumeSpec};
use gantry_proto::validate::PciAddress;
use gantry_proto::{InstanceState, SnapshotStatus};

/// One `operations` row the agent still has to finish.
struct OpRow {
    id: OperationId,
    instance: Option<InstanceId>,
    kind: String,
    detail: String,
    state: String,
}

fn op_row(r: &sqlx::any::AnyRow) -> Result<OpRow, DbError> {
    Ok(OpRow {
        id: parsed(r, "id", "operations")?,
        instance: parsed_opt(r, "instance_id", "operations")?,
        kind: col(r, "kind")?,
        detail: col(r, "detail")?,
        state: col(r, "state")?,
    })
}

/// The host's non-final instances, its unfinished operations, and its
/// access state and certificate unless the agent already has them
/// (`known_rev`, `known_tls`). An operation whose command cannot be built
/// (its image is gone, say) is failed here with the reason.
pub async fn build_work(
    st: &AppState,
    host: &HostId,
    known_rev: Option<u64>,
    known_tls: Option<&str>,
) -> ApiResult<Work> {
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
    let found = sqlx::query(
        "SELECT id, instance_id, kind, detail, state FROM operations WHERE host_id = $1 AND \
         state IN ('pending', 'running') ORDER BY created_ms, id",
    )
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
                phase: if op.state == "pending" {
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
                apply_report(&mut tx, host, op.id, &report).await?;
                tx.commit().await?;
            }
        }
    }
    let (access, tls) = super::certs::access_and_tls(st, host).await?;
    Ok(Work {
        instances,
        ops,
        access: access.filter(|a| Some(a.rev) != known_rev),
        tls: tls.filter(|t| Some(t.fingerprint.as_str()) != known_tls),
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
pub(crate) fn plain_command(kind: &str) -> Option<AgentCommand> {
    Some(match kind {
        "start" => AgentCommand::Start {},
        "stop" => AgentCommand::Stop {},
        "reboot" => AgentCommand::Reboot {},
        "force-reboot" => AgentCommand::ForceReboot {},
        "suspend" => AgentCommand::Suspend {},
        "resume" => AgentCommand::Resume {},
        "release" => AgentCommand::Release {},
        _ => return None,
    })
}

/// Operation kinds [`command`] builds from the operation's detail and
/// records (besides the [`plain_command`] ones).
pub(crate) const DETAILED_KINDS: &[&str] = &[
    "create",
    "change-type",
    "clear-gpu",
    "grow-disk",
    "snapshot",
    "delete-snapshot",
    "set-password",
];

/// The command an operation asks for.
async fn command(st: &AppState, op: &OpRow) -> ApiResult<AgentCommand> {
    let snapshot_of = |d: &str| {
        d.parse::<SnapshotId>()
            .map_err(|e| gone(format!("operation detail: {e}")))
    };
    if let Some(c) = plain_command(&op.kind) {
        return Ok(c);
    }
    Ok(match op.kind.as_str() {
        "create" => create_command(st, &instance(st, op.instance).await?).await?,
        "change-type" => {
            let new = op.detail.split(' ').next().unwrap_or_default();
            let row = sqlx::query("SELECT vcpus, memory_mib FROM flavors WHERE id = $1")
                .bind(new)
                .fetch_optional(&st.db.pool)
                .await?
                .ok_or_else(|| gone(format!("flavor {} is gone", op.detail)))?;
            let rec = instance(st, op.instance).await?;
            AgentCommand::ChangeType {
                vcpus: col::<i64>(&row, "vcpus")? as u32,
                memory_mib: col::<i64>(&row, "memory_mib")? as u64,
                gpus: Some(crate::gpus::booked(&st.db.pool, &rec.id.to_string()).await?),
                // Booked by the change (the larger of the two).
                root_disk_gib: Some(rec.root_disk_gib),
            }
        }
        "clear-gpu" => AgentCommand::ClearGpu {
            pci: PciAddress::parse(&op.detail)
                .ok_or_else(|| gone(format!("operation detail {:?}", op.detail)))?,
        },
        "grow-disk" => AgentCommand::GrowDisk {
            root_disk_gib: op
                .detail
                .split(' ')
                .next()
                .unwrap_or_default()
                .parse()
                .map_err(|_| gone(format!("operation detail {:?}", op.detail)))?,
        },
        "snapshot" => {
            let sid = snapshot_of(&op.detail)?;
            let row =
                sqlx::query("SELECT name, account_id, auto_release FROM snapshots WHERE id = $1")
                    .bind(sid.to_string())
                    .fetch_optional(&st.db.pool)
                    .await?
                    .ok_or_else(|| gone(format!("snapshot {sid} is gone")))?;
            AgentCommand::Snapshot {
                snapshot: sid,
                name: col(&row, "name")?,
                owner: parsed(&row, "account_id", "snapshots")?,
                auto_release: col::<i64>(&row, "auto_release")? != 0,
            }
        }
        "delete-snapshot" => AgentCommand::DeleteSnapshot {
            snapshot: snapshot_of(&op.detail)?,
        },
        "set-password" => {
            let id = op.instance.ok_or_else(|| gone("no instance".into()))?;
            let row = sqlx::query("SELECT root_password_hash FROM instances WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&st.db.pool)
                .await?
                .ok_or_else(|| gone(format!("instance {id} is gone")))?;
            let hash: Option<String> = col(&row, "root_password_hash")?;
            AgentCommand::SetPassword {
                password_hash: Secret::new(
                    hash.ok_or_else(|| gone(format!("instance {id} has no password")))?,
                ),
            }
        }
        other => {
            return Err(gone(format!(
                "unknown operation kind {other:?} (known: the plain kinds and {})",
                DETAILED_KINDS.join(", ")
            )))
        }
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
/// or the snapshot it was made from (directly or through an as-image).
async fn image_source(st: &AppState, rec: &InstanceRec) -> ApiResult<ImageSource> {
    let mut snapshot = rec.snapshot;
    if snapshot.is_none() {
        let img = rec
            .image
            .ok_or_else(|| gone(format!("instance {} has no image", rec.id)))?;
        let row = sqlx::query("SELECT name, origin, source_snapshot_id FROM images WHERE id = $1")
            .bind(img.to_string())
            .fetch_optional(&st.db.pool)
            .await?
            .ok_or_else(|| gone(format!("image {img} is gone")))?;
        snapshot = parsed_opt(&row, "source_snapshot_id", "images")?;
        if snapshot.is_none() {
            let origin: Option<String> = col(&row, "origin")?;
            let origin = origin.ok_or_else(|| gone(format!("image {img} has no origin")))?;
            let origin: ImageOrigin =
                serde_json::from_str(&origin).map_err(|e| DbError::Corrupt {
                    table: "images",
                    message: format!("origin: {e}"),
                })?;
            return Ok(ImageSource {
                image: img,
                name: col(&row, "name")?,
                origin,
            });
        }
    }
    let sid = snapshot.ok_or_else(|| gone("no snapshot".into()))?;
    let row = sqlx::query("SELECT name FROM snapshots WHERE id = $1")
        .bind(sid.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| gone(format!("snapshot {sid} is gone")))?;
    Ok(ImageSource {
        image: ImageSource::snapshot_image_id(sid),
        name: col(&row, "name")?,
        origin: ImageOrigin::Snapshot {
            snapshot: sid,
            boot_like: rec.base_image,
        },
    })
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

/// Applies an operation report of `host` (idempotent: an ended operation
/// is left as it is). Returns whether the host's forwards changed.
pub async fn apply_report(
    tx: &mut Tx,
    host: &HostId,
    id: OperationId,
    r: &OpReport,
) -> ApiResult<bool> {
    let row = sqlx::query(
        "SELECT id, host_id, instance_id, kind, detail, state FROM operations WHERE id = $1",
    )
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no operation {id}")))?;
    let owner: Option<HostId> = parsed_opt(&row, "host_id", "operations")?;
    if owner.as_ref() != Some(host) {
        return Err(ApiError::Denied(format!(
            "operation {id} belongs to another host"
        )));
    }
    let op = op_row(&row)?;
    if op.state == "succeeded" || op.state == "failed" {
        return Ok(false);
    }
    let mut changed = false;
    if let (Some(s), Some(i)) = (r.instance_state, op.instance) {
        changed |= observe(tx, host, i, s).await?;
    }
    let now = now_ms();
    if r.outcome == OpOutcome::Running {
        sqlx::query(
            "UPDATE operations SET state = 'running', progress = $1, updated_ms = $2 \
             WHERE id = $3 AND state IN ('pending', 'running')",
        )
        .bind(r.progress as i64)
        .bind(now)
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
        return Ok(changed);
    }
    let failed = r.outcome == OpOutcome::Failed;
    let error = failed.then(|| {
        r.error
            .clone()
            .unwrap_or_else(|| "the host reported a failure without a reason".into())
    });
    if op.kind == "snapshot" {
        settle_snapshot(tx, host, &op, r, error.as_deref()).await?;
    }
    match (failed, op.kind.as_str(), op.instance) {
        (true, "create", Some(i)) => changed |= observe(tx, host, i, InstanceState::Failed).await?,
        (true, "change-type" | "grow-disk", Some(i)) => {
            if let Some(rec) = load_on(tx, host, i).await? {
                super::actions::undo_resize(tx, &rec, &op.kind, &op.detail).await?;
            }
        }
        (true, "set-password", Some(i)) => super::password::undo_reset(tx, i, &op.detail).await?,
        _ => {}
    }
    sqlx::query(
        "UPDATE operations SET state = $1, progress = $2, error = $3, note = $4, \
         updated_ms = $5 WHERE id = $6",
    )
    .bind(if failed { "failed" } else { "succeeded" })
    .bind(if failed { r.progress as i64 } else { 100 })
    .bind(error)
    .bind(r.note.clone().filter(|_| !failed))
    .bind(now)
    .bind(id.to_string())
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE instances SET pending_op = NULL WHERE pending_op = $1")
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(changed)
}

/// A snapshot operation ended: the snapshot is Success (sizes, host, its
/// quota reservation until its host's store reports hold it, and its
/// private image with `as_image`) or Failed (with the reason), through
/// the one status setter; a report its status machine refuses changes
/// nothing.
async fn settle_snapshot(
    tx: &mut Tx,
    host: &HostId,
    op: &OpRow,
    r: &OpReport,
    error: Option<&str>,
) -> ApiResult<()> {
    let sid: SnapshotId = op.detail.parse().map_err(|e| DbError::Corrupt {
        table: "operations",
        message: format!("snapshot detail: {e}"),
    })?;
    if let Some(e) = error {
        if crate::snapshots::set_status(tx, sid, SnapshotStatus::Failed).await? {
            sqlx::query("UPDATE snapshots SET error = $1 WHERE id = $2")
                .bind(e)
                .bind(sid.to_string())
                .execute(&mut **tx)
                .await?;
        }
        return Ok(());
    }
    let sizes = r.snapshot.ok_or_else(|| {
        ApiError::invalid("snapshot", "is required when a snapshot operation succeeds")
    })?;
    if sizes.compressed_bytes > sizes.logical_bytes {
        return Err(ApiError::invalid(
            "snapshot.compressed_bytes",
            "must not exceed snapshot.logical_bytes",
        ));
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
    use gantry_proto::{Action, InstanceState};

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
            for a in s.allowed_actions() {
                if let Some(req) = request(a) {
                    assert_eq!(req.action(), a);
                }
                // The operation's kind is the action's name.
                let kind = a.name();
                assert!(
                    plain_command(kind).is_some() || DETAILED_KINDS.contains(&kind),
                    "{s} advertises {kind}, which no agent command carries out"
                );
            }
        }
    }
}
