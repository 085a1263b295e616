//! Moving a Stopped instance to another host, and draining a host.
//!
//! A move is three operations, chained by [`step`] as each succeeds (from
//! `operations::finish`), and undone by [`undo`] when one fails or times
//! out:
//!
//! 1. `move-out` on the old host: the agent saves the instance's root disk
//!    (its guest-visible data) and its data volume into the snapshot store
//!    the two hosts share, as two store entries in the account's namespace.
//!    The new host's capacity, GPUs and the volume's GiB were reserved when
//!    the move was asked for, so nothing can take them meanwhile.
//! 2. `move-in` on the new host: its address and port forwards move there
//!    (new host ports), and the agent restores the two entries and defines
//!    the instance, Stopped. Then the instance, its volume and its usage
//!    counter belong to the new host; the old host's capacity and GPUs are
//!    given back.
//! 3. `move-cleanup` on the old host: the agent removes the instance and
//!    its data volume there; then the two store entries are deleted.
//!
//! GPU instances cannot live-migrate, so only Stopped instances move; a
//! drain cordons the host, moves each of its Stopped instances and reports
//! the others.

use crate::db::{col, now_ms, parsed, rows, rows::InstanceRec, DbError, Tx};
use crate::error::{ApiError, ApiResult};
use crate::operations::{NewOp, OpDetail, OpRow};
use crate::scheduler::{self, Need, PlaceError};
use crate::AppState;
use gantry_proto::api::v1::{DrainReport, Placement};
use gantry_proto::ids::*;
use gantry_proto::{InstanceState, OperationKind, OperationState};

/// Starts moving `rec` (Stopped) to `target`, or to the best other host
/// of its region sharing its host's snapshot store (the old host must then
/// be cordoned). Returns the `move-out` operation.
pub async fn start(
    st: &AppState,
    rec: &InstanceRec,
    target: Option<HostId>,
) -> ApiResult<OperationId> {
    let source = rec
        .host
        .ok_or_else(|| ApiError::Conflict(format!("instance {} has no host", rec.id)))?;
    if rec.observed != InstanceState::Stopped {
        return Err(ApiError::Conflict(format!(
            "instance {} is {}; only a Stopped instance can move (running instances with \
             whole GPUs cannot live-migrate): stop it first",
            rec.id, rec.observed
        )));
    }
    if crate::api::instances::host_down(rec) {
        return Err(ApiError::Conflict(format!(
            "instance {}'s host {source} is down; it cannot save the instance",
            rec.id
        )));
    }
    if target == Some(source) {
        return Err(ApiError::invalid("host", "is the instance's own host"));
    }
    let op = OperationId::new();
    let mut tx = st.db.begin_write().await?;
    crate::api::actions::claim(&mut tx, rec, op, InstanceState::Stopped).await?;
    let to = reserve_target(st, &mut tx, rec, &source, target).await?;
    let detail = OpDetail::MoveOut {
        target: to,
        snapshot: SnapshotId::new(),
        volume_snapshot: rec.data_volume.map(|_| SnapshotId::new()),
    };
    let new = NewOp::on(rec, op, OperationKind::MoveOut, detail);
    crate::operations::create(&mut tx, &new).await?;
    tx.commit().await?;
    st.wake.wake(&source);
    tracing::info!(instance = %rec.id, from = %source, to = %to, %op, "move started");
    Ok(op)
}

/// Hosts the instance may move to: `target`, or every other schedulable
/// host of its region on the same snapshot store, most free first.
async fn targets(
    st: &AppState,
    tx: &mut Tx,
    rec: &InstanceRec,
    source: &HostId,
    target: Option<HostId>,
) -> ApiResult<Vec<HostId>> {
    let row = sqlx::query("SELECT cordoned, draining, store_id FROM hosts WHERE id = $1")
        .bind(source.to_string())
        .fetch_one(&mut **tx)
        .await?;
    let store: Option<String> = col(&row, "store_id")?;
    if let Some(t) = target {
        check_same_store(st, tx, store.as_deref(), &t).await?;
        return Ok(vec![t]);
    }
    if col::<i64>(&row, "cordoned")? == 0 && col::<i64>(&row, "draining")? == 0 {
        return Err(ApiError::invalid(
            "host",
            "name the host to move to, or cordon the instance's host first",
        ));
    }
    let found = sqlx::query(
        "SELECT id FROM hosts WHERE id <> $1 AND region = $2 AND removed_ms IS NULL \
         AND ($3 = 1 OR store_id = $4) ORDER BY (disk_gib - used_disk_gib) DESC, id",
    )
    .bind(source.to_string())
    .bind(&rec.region)
    .bind(i64::from(st.cfg.snapshot_store_shared))
    .bind(store.unwrap_or_default())
    .fetch_all(&mut **tx)
    .await?;
    found
        .iter()
        .map(|r| parsed(r, "id", "hosts"))
        .collect::<Result<Vec<HostId>, _>>()
        .map_err(Into::into)
}

/// The two hosts must share a snapshot store (by the identity their
/// agents report, or because the operator says every host does).
async fn check_same_store(
    st: &AppState,
    tx: &mut Tx,
    source_store: Option<&str>,
    target: &HostId,
) -> ApiResult<()> {
    let row = sqlx::query("SELECT store_id FROM hosts WHERE id = $1 AND removed_ms IS NULL")
        .bind(target.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| ApiError::invalid("host", format!("no host {target}")))?;
    let theirs: Option<String> = col(&row, "store_id")?;
    if st.cfg.snapshot_store_shared || (theirs.is_some() && theirs.as_deref() == source_store) {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "host {target} does not share the instance's snapshot store; an instance moves \
         through the store"
    )))
}

/// Reserves the instance's capacity, GPUs and volume GiB on the first
/// target that takes them.
async fn reserve_target(
    st: &AppState,
    tx: &mut Tx,
    rec: &InstanceRec,
    source: &HostId,
    target: Option<HostId>,
) -> ApiResult<HostId> {
    let cutoff = now_ms() - st.cfg.heartbeat_timeout_secs as i64 * 1000;
    let vol = volume_gib(tx, rec).await?;
    let mut why = format!("no other host of region {} shares its store", rec.region);
    for t in targets(st, tx, rec, source, target).await? {
        let need = Need {
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            disk_gib: rec.root_disk_gib + vol,
            gpu_model: rec.gpu_model.clone().filter(|_| rec.gpu_count > 0),
            gpu_count: rec.gpu_count,
            placement: Placement::Pack,
            region: rec.region.clone(),
            host: Some(t),
        };
        match scheduler::place(tx, rec.id, &need, cutoff, st.cfg.heartbeat_timeout_secs).await {
            Ok((host, _)) => return Ok(host),
            Err(PlaceError::Db(e)) => return Err(e.into()),
            Err(e) => why = e.to_string(),
        }
    }
    Err(ApiError::Conflict(format!(
        "instance {} cannot move: {why}",
        rec.id
    )))
}

async fn volume_gib(tx: &mut Tx, rec: &InstanceRec) -> Result<u64, DbError> {
    let Some(v) = rec.data_volume else {
        return Ok(0);
    };
    let row = sqlx::query("SELECT size_gib FROM volumes WHERE id = $1")
        .bind(v.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    Ok(match row {
        Some(r) => col::<i64>(&r, "size_gib")?.max(0) as u64,
        None => 0,
    })
}

/// The next step of a move whose `op` succeeded (nothing for other
/// operations).
pub async fn step(st: &AppState, tx: &mut Tx, op: &OpRow) -> ApiResult<()> {
    match (&op.detail, op.instance, op.host) {
        (
            OpDetail::MoveOut {
                target,
                snapshot,
                volume_snapshot,
            },
            Some(id),
            Some(source),
        ) => {
            let rec = instance(tx, id).await?;
            rehome_access(st, tx, &rec, &source, target).await?;
            let next = OperationId::new();
            let detail = OpDetail::MoveIn {
                source,
                snapshot: *snapshot,
                volume_snapshot: *volume_snapshot,
            };
            let mut new = NewOp::on(&rec, next, OperationKind::MoveIn, detail);
            new.host = Some(*target);
            crate::operations::create(tx, &new).await?;
            sqlx::query("UPDATE instances SET pending_op = $1 WHERE id = $2")
                .bind(next.to_string())
                .bind(id.to_string())
                .execute(&mut **tx)
                .await?;
            st.wake.wake(target);
        }
        (
            OpDetail::MoveIn {
                source,
                snapshot,
                volume_snapshot,
            },
            Some(id),
            Some(target),
        ) => {
            let rec = instance(tx, id).await?;
            arrive(tx, &rec, source, &target).await?;
            let detail = OpDetail::MoveCleanup {
                snapshot: *snapshot,
                volume_snapshot: *volume_snapshot,
            };
            let mut new = NewOp::on(&rec, OperationId::new(), OperationKind::MoveCleanup, detail);
            new.host = Some(*source);
            crate::operations::create(tx, &new).await?;
            st.wake.wake(source);
            tracing::info!(instance = %id, from = %source, to = %target, "instance moved");
        }
        (
            OpDetail::MoveCleanup {
                snapshot,
                volume_snapshot,
            },
            _,
            _,
        ) => {
            let host = op
                .host
                .unwrap_or_else(|| unreachable!("a move-cleanup has a host"));
            forget_entries(tx, op, &host, *snapshot, *volume_snapshot).await?;
            st.wake.wake(&host);
        }
        _ => {}
    }
    Ok(())
}

/// Undoes a move whose `op` failed or timed out: the new host's
/// reservations are given back, the address and forwards return to the
/// old host, the store entries are deleted; the instance stays where it
/// was, Stopped.
pub async fn undo(st: &AppState, tx: &mut Tx, op: &OpRow) -> ApiResult<()> {
    let (target, source, snapshot, volume_snapshot) = match (&op.detail, op.host) {
        (
            OpDetail::MoveOut {
                target,
                snapshot,
                volume_snapshot,
            },
            Some(source),
        ) => (*target, source, *snapshot, *volume_snapshot),
        (
            OpDetail::MoveIn {
                source,
                snapshot,
                volume_snapshot,
            },
            Some(target),
        ) => (target, *source, *snapshot, *volume_snapshot),
        (OpDetail::MoveCleanup { .. }, Some(h)) => {
            tracing::error!(op = %op.id, host = %h, "a moved instance was not removed from its old host");
            return Ok(());
        }
        _ => return Ok(()),
    };
    let Some(id) = op.instance else {
        return Ok(());
    };
    let rec = instance(tx, id).await?;
    let vol = volume_gib(tx, &rec).await? as i64;
    scheduler::free(
        tx,
        &target,
        id,
        rec.vcpus,
        rec.memory_mib,
        rec.root_disk_gib + vol as u64,
    )
    .await?;
    if op.kind == OperationKind::MoveIn {
        rehome_access(st, tx, &rec, &target, &source).await?;
    }
    forget_entries(tx, op, &source, snapshot, volume_snapshot).await?;
    st.wake.wake(&source);
    Ok(())
}

/// A move-in that had already failed or timed out when its host finished
/// it left a copy of the instance there: the host removes it again.
pub async fn late_move_in(tx: &mut Tx, op: &OpRow) -> ApiResult<()> {
    let (
        OpDetail::MoveIn {
            snapshot,
            volume_snapshot,
            ..
        },
        Some(host),
    ) = (&op.detail, op.host)
    else {
        return Ok(());
    };
    if op.state == OperationState::Succeeded {
        return Ok(());
    }
    tracing::warn!(op = %op.id, %host, "a move-in finished after it was undone; removing the copy");
    let new = NewOp {
        id: OperationId::new(),
        account: op.account,
        host: Some(host),
        instance: op.instance,
        kind: OperationKind::MoveCleanup,
        detail: OpDetail::MoveCleanup {
            snapshot: *snapshot,
            volume_snapshot: *volume_snapshot,
        },
    };
    crate::operations::create(tx, &new).await?;
    Ok(())
}

async fn instance(tx: &mut Tx, id: InstanceId) -> ApiResult<InstanceRec> {
    crate::operations::load_instance(tx, id)
        .await?
        .ok_or_else(|| ApiError::Conflict(format!("instance {id} is gone")))
}

/// The instance now lives on `target`: its row, volume and usage counter
/// go there, the old host's capacity and GPUs come back.
async fn arrive(tx: &mut Tx, rec: &InstanceRec, source: &HostId, target: &HostId) -> ApiResult<()> {
    let vol = volume_gib(tx, rec).await?;
    scheduler::free(
        tx,
        source,
        rec.id,
        rec.vcpus,
        rec.memory_mib,
        rec.root_disk_gib + vol,
    )
    .await?;
    // The new host's agent counts Running time from zero.
    sqlx::query("UPDATE instances SET host_id = $1, usage_seq = 0, billed_ms = 0 WHERE id = $2")
        .bind(target.to_string())
        .bind(rec.id.to_string())
        .execute(&mut **tx)
        .await?;
    // Its network group (membership and address kept) now reaches it there.
    crate::groups::note_moved(tx, rec.id, source).await?;
    if let Some(v) = rec.data_volume {
        sqlx::query("UPDATE volumes SET host_id = $1 WHERE id = $2")
            .bind(target.to_string())
            .bind(v.to_string())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Moves the instance's address lease and port forwards from `from` to
/// `to` (new host ports where the old ones are taken).
async fn rehome_access(
    st: &AppState,
    tx: &mut Tx,
    rec: &InstanceRec,
    from: &HostId,
    to: &HostId,
) -> ApiResult<()> {
    let found = sqlx::query(&format!(
        "SELECT {} FROM port_forwards WHERE instance_id = $1 AND host_id = $2 ORDER BY id",
        crate::access::FORWARD_COLS
    ))
    .bind(rec.id.to_string())
    .bind(from.to_string())
    .fetch_all(&mut **tx)
    .await?;
    let forwards = found
        .iter()
        .map(crate::access::forward_row)
        .collect::<Result<Vec<_>, _>>()?;
    let had_lease = sqlx::query("DELETE FROM ip_leases WHERE instance_id = $1 AND host_id = $2")
        .bind(rec.id.to_string())
        .bind(from.to_string())
        .execute(&mut **tx)
        .await?
        .rows_affected()
        > 0;
    sqlx::query("DELETE FROM port_forwards WHERE instance_id = $1 AND host_id = $2")
        .bind(rec.id.to_string())
        .bind(from.to_string())
        .execute(&mut **tx)
        .await?;
    if had_lease {
        let subnet = crate::access::ensure_subnet(tx, &st.cfg, to)
            .await
            .map_err(access)?;
        crate::access::lease_address(tx, to, subnet, rec.id)
            .await
            .map_err(access)?;
    }
    for f in &forwards {
        let new = crate::access::NewForward {
            protocol: f.protocol,
            guest_port: f.guest_port,
            https: f.https,
            label: f.label.clone(),
        };
        crate::access::insert_forward(tx, &st.cfg, to, rec.id, &rec.account, &new)
            .await
            .map_err(access)?;
    }
    crate::access::bump(tx, from).await?;
    crate::access::bump(tx, to).await?;
    Ok(())
}

fn access(e: crate::access::AccessError) -> ApiError {
    ApiError::Conflict(e.to_string())
}

/// Deletes a move's store entries (through `host`, which shares the
/// store).
async fn forget_entries(
    tx: &mut Tx,
    op: &OpRow,
    host: &HostId,
    snapshot: SnapshotId,
    volume_snapshot: Option<SnapshotId>,
) -> Result<(), DbError> {
    for s in std::iter::once(snapshot).chain(volume_snapshot) {
        let new = NewOp {
            id: OperationId::new(),
            account: op.account,
            host: Some(*host),
            instance: None,
            kind: OperationKind::DeleteSnapshot,
            detail: OpDetail::DeleteSnapshot { snapshot: s },
        };
        crate::operations::create(tx, &new).await?;
    }
    Ok(())
}

/// What a move-in's agent command needs beyond the create's: the GPUs
/// booked on the new host.
pub async fn gpus_on(
    st: &AppState,
    host: &HostId,
    instance: InstanceId,
) -> Result<Vec<gantry_proto::validate::PciAddress>, DbError> {
    let found = sqlx::query(
        "SELECT pci FROM host_gpus WHERE host_id = $1 AND instance_id = $2 ORDER BY pci",
    )
    .bind(host.to_string())
    .bind(instance.to_string())
    .fetch_all(&st.db.pool)
    .await?;
    let mut out = Vec::with_capacity(found.len());
    for r in &found {
        let pci: String = col(r, "pci")?;
        out.push(
            gantry_proto::validate::PciAddress::parse(&pci).ok_or_else(|| DbError::Corrupt {
                table: "host_gpus",
                message: format!("pci {pci:?}"),
            })?,
        );
    }
    Ok(out)
}

/// Drains `host`: cordons it (nothing new is placed there), starts a move
/// for each of its Stopped instances, and reports the instances it cannot
/// move (running ones: GPU instances cannot live-migrate; busy ones).
pub async fn drain(st: &AppState, host: HostId) -> ApiResult<DrainReport> {
    let done = sqlx::query("UPDATE hosts SET cordoned = 1, draining = 1 WHERE id = $1")
        .bind(host.to_string())
        .execute(&st.db.pool)
        .await?;
    if done.rows_affected() != 1 {
        return Err(ApiError::NotFound(format!("no host {host}")));
    }
    let found = sqlx::query(&format!(
        "{} WHERE i.host_id = $1 AND i.observed_state NOT IN ('Released', 'Failed') ORDER BY i.id",
        rows::INSTANCE_SELECT
    ))
    .bind(host.to_string())
    .fetch_all(&st.db.pool)
    .await?;
    let mut report = DrainReport {
        host,
        moving: Vec::new(),
        not_moved: Vec::new(),
    };
    for r in &found {
        let rec = rows::instance(r)?;
        let why = if rec.observed != InstanceState::Stopped {
            Some(format!(
                "{} ({}): only Stopped instances move; stop it or wait for its owner",
                rec.id, rec.observed
            ))
        } else if rec.pending_op.is_some() {
            Some(format!("{}: busy with an operation", rec.id))
        } else {
            None
        };
        if let Some(w) = why {
            report.not_moved.push(w);
            continue;
        }
        match start(st, &rec, None).await {
            Ok(op) => report.moving.push(gantry_proto::api::v1::MoveStarted {
                instance: rec.id,
                operation: op,
            }),
            Err(ApiError::Db(e)) => return Err(e.into()),
            Err(e) => report.not_moved.push(format!("{}: {e}", rec.id)),
        }
    }
    tracing::info!(%host, moving = report.moving.len(), not_moved = report.not_moved.len(), "drain");
    Ok(report)
}
