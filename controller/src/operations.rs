//! The one place operations are created, advanced, timed out and settled.
//!
//! An operation row has a kind ([`OperationKind`]), a state that only
//! changes through [`OperationState::apply`], and a typed detail
//! ([`OpDetail`], stored as JSON in `operations.detail`) that says what
//! the operation carries and what undoing it needs. The API handlers, the
//! agent protocol (`api::commands`), the reconcile loop and an admin's hand
//! all end an operation through [`finish`], which applies the state
//! machine, undoes what a failed operation booked (capacity, GPUs, disk
//! sizes, a password, a snapshot), gives back what a released or failed
//! instance held, and frees the instance for its next action.
//!
//! Timeouts: an operation its host has not advanced for its kind's timeout
//! (`OperationKind::default_timeout_secs`, overridden by the controller's
//! `operation_timeout_secs`) ends `timed-out`. A release (or a volume or
//! snapshot deletion) on a host that is down waits for the host instead:
//! the agent carries it out when the host returns, or it is settled when
//! the host is removed.

use crate::db::{col, now_ms, parsed_opt, rows, rows::InstanceRec, DbError, Tx};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use gantry_proto::ids::*;
use gantry_proto::operation::{OperationEvent, OperationKind, OperationState};
use gantry_proto::validate::PciAddress;
use gantry_proto::InstanceState;
use serde::{Deserialize, Serialize};

/// What an operation carries besides its kind (`operations.detail`,
/// JSON). Rows written before version 7 of the schema hold the old
/// space-separated strings; [`OpDetail::load`] reads both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OpDetail {
    None,
    /// The new flavor, and the old flavor, root disk and GPU booking to
    /// restore when the host fails the change.
    ChangeType {
        flavor: FlavorId,
        old_flavor: FlavorId,
        old_root_disk_gib: u64,
        old_gpus: Vec<String>,
    },
    GrowDisk {
        root_disk_gib: u64,
        old_root_disk_gib: u64,
    },
    GrowVolume {
        volume: VolumeId,
        size_gib: u64,
        old_size_gib: u64,
    },
    DeleteVolume {
        volume: VolumeId,
    },
    Snapshot {
        snapshot: SnapshotId,
    },
    DeleteSnapshot {
        snapshot: SnapshotId,
    },
    /// The password's previous hash and sealed copy (restored if the host
    /// fails the reset); none when it had none.
    SetPassword {
        old: Option<(String, String)>,
    },
    ClearGpu {
        pci: PciAddress,
    },
    /// A move's steps (`crate::moves`): the store entries the instance's
    /// root disk and data volume travel in, and the other host.
    MoveOut {
        target: HostId,
        snapshot: SnapshotId,
        volume_snapshot: Option<SnapshotId>,
    },
    MoveIn {
        source: HostId,
        snapshot: SnapshotId,
        volume_snapshot: Option<SnapshotId>,
    },
    MoveCleanup {
        snapshot: SnapshotId,
        volume_snapshot: Option<SnapshotId>,
    },
}

impl OpDetail {
    /// The stored text.
    pub fn store(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| unreachable!("plain data serializes"))
    }

    /// Reads a stored detail of an operation of `kind`.
    pub fn load(kind: OperationKind, text: &str) -> Result<Self, DbError> {
        let corrupt = |m: String| DbError::Corrupt {
            table: "operations",
            message: format!("{kind} detail: {m}"),
        };
        if text.starts_with('{') {
            return serde_json::from_str(text).map_err(|e| corrupt(e.to_string()));
        }
        let parts: Vec<&str> = text.split(' ').filter(|p| !p.is_empty()).collect();
        let num = |s: &str| s.parse::<u64>().map_err(|e| corrupt(format!("{s:?}: {e}")));
        fn id<T: std::str::FromStr>(s: &str) -> Result<T, String>
        where
            T::Err: std::fmt::Display,
        {
            s.parse().map_err(|e| format!("{s:?}: {e}"))
        }
        Ok(match (kind, parts.as_slice()) {
            (OperationKind::ChangeType, [new, old, disk, rest @ ..]) => Self::ChangeType {
                flavor: id(new).map_err(corrupt)?,
                old_flavor: id(old).map_err(corrupt)?,
                old_root_disk_gib: num(disk)?,
                old_gpus: match rest.first() {
                    None | Some(&"-") => Vec::new(),
                    Some(p) => p.split(',').map(str::to_string).collect(),
                },
            },
            (OperationKind::GrowDisk, [new, old]) => Self::GrowDisk {
                root_disk_gib: num(new)?,
                old_root_disk_gib: num(old)?,
            },
            (OperationKind::Snapshot, [s]) => Self::Snapshot {
                snapshot: id(s).map_err(corrupt)?,
            },
            (OperationKind::DeleteSnapshot, [s]) => Self::DeleteSnapshot {
                snapshot: id(s).map_err(corrupt)?,
            },
            (OperationKind::SetPassword, []) => Self::SetPassword { old: None },
            (OperationKind::SetPassword, [h, s]) => Self::SetPassword {
                old: Some((h.to_string(), s.to_string())),
            },
            (OperationKind::ClearGpu, [p]) => Self::ClearGpu {
                pci: PciAddress::parse(p).ok_or_else(|| corrupt(format!("PCI {p:?}")))?,
            },
            (_, []) => Self::None,
            _ => return Err(corrupt(format!("{text:?}"))),
        })
    }
}

/// A new operation.
pub struct NewOp {
    pub id: OperationId,
    /// None for host operations (admins only).
    pub account: Option<AccountId>,
    pub host: Option<HostId>,
    pub instance: Option<InstanceId>,
    pub kind: OperationKind,
    pub detail: OpDetail,
}

impl NewOp {
    /// An operation on `rec`'s host for `rec`.
    pub fn on(rec: &InstanceRec, id: OperationId, kind: OperationKind, detail: OpDetail) -> Self {
        Self {
            id,
            account: Some(rec.account),
            host: rec.host,
            instance: Some(rec.id),
            kind,
            detail,
        }
    }
}

/// Records a pending operation.
pub async fn create(tx: &mut Tx, op: &NewOp) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO operations (id, account_id, host_id, instance_id, kind, detail, state, \
         created_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7)",
    )
    .bind(op.id.to_string())
    .bind(op.account.map(|a| a.to_string()))
    .bind(op.host.map(|h| h.to_string()))
    .bind(op.instance.map(|i| i.to_string()))
    .bind(op.kind.name())
    .bind(op.detail.store())
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One stored operation.
#[derive(Debug, Clone)]
pub struct OpRow {
    pub id: OperationId,
    pub account: Option<AccountId>,
    pub host: Option<HostId>,
    pub instance: Option<InstanceId>,
    pub kind: OperationKind,
    pub detail: OpDetail,
    pub state: OperationState,
    pub updated_ms: i64,
}

/// The columns [`op_row`] reads.
pub const OP_COLS: &str = "id, account_id, host_id, instance_id, kind, detail, state, updated_ms";

pub fn op_row(r: &sqlx::any::AnyRow) -> Result<OpRow, DbError> {
    const T: &str = "operations";
    let kind: String = col(r, "kind")?;
    let kind = OperationKind::parse(&kind).ok_or_else(|| DbError::Corrupt {
        table: T,
        message: format!("kind {kind:?}"),
    })?;
    let state: String = col(r, "state")?;
    let state = OperationState::parse(&state).ok_or_else(|| DbError::Corrupt {
        table: T,
        message: format!("state {state:?}"),
    })?;
    Ok(OpRow {
        id: crate::db::parsed(r, "id", T)?,
        account: parsed_opt(r, "account_id", T)?,
        host: parsed_opt(r, "host_id", T)?,
        instance: parsed_opt(r, "instance_id", T)?,
        kind,
        detail: OpDetail::load(kind, &col::<String>(r, "detail")?)?,
        state,
        updated_ms: col(r, "updated_ms")?,
    })
}

/// Loads operation `id` inside `tx`.
pub async fn load(tx: &mut Tx, id: OperationId) -> Result<Option<OpRow>, DbError> {
    let row = sqlx::query(&format!("SELECT {OP_COLS} FROM operations WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(op_row).transpose()
}

/// The host acknowledged `op` or reported progress (ignored once ended).
pub async fn progress(tx: &mut Tx, op: &OpRow, percent: u8) -> Result<(), DbError> {
    if op.state.apply(OperationEvent::Progress).is_err() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE operations SET state = 'running', progress = $1, updated_ms = $2 \
         WHERE id = $3 AND state IN ('pending', 'running')",
    )
    .bind(i64::from(percent.min(100)))
    .bind(now_ms())
    .bind(op.id.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// How an operation ends.
pub struct Ending<'a> {
    pub event: OperationEvent,
    pub progress: u8,
    pub error: Option<&'a str>,
    pub note: Option<&'a str>,
}

/// Ends `op` through the state machine: undoes a failed one, gives back
/// what an instance that ended up Released or Failed held, records the
/// outcome and frees the instance. An event the state machine refuses (the
/// operation already ended) changes nothing and returns `Ok(None)`; else
/// whether the host's forwards changed.
pub async fn finish(
    st: &AppState,
    tx: &mut Tx,
    op: &OpRow,
    end: Ending<'_>,
) -> ApiResult<Option<bool>> {
    let Ok(to) = op.state.apply(end.event) else {
        return Ok(None);
    };
    let mut changed = false;
    let rec = match op.instance {
        Some(i) => load_instance(tx, i).await?,
        None => None,
    };
    if to == OperationState::Succeeded {
        crate::api::volumes::settled(tx, op).await?;
        crate::moves::step(st, tx, op).await?;
        if let (OperationEvent::Settled(true), Some(rec)) = (end.event, &rec) {
            changed |= settle_succeeded(tx, op, rec).await?;
        }
    } else {
        changed |= undo(tx, op, rec.as_ref(), end.error.unwrap_or_default()).await?;
        crate::moves::undo(st, tx, op).await?;
    }
    sqlx::query(
        "UPDATE operations SET state = $1, progress = $2, error = $3, note = $4, \
         updated_ms = $5 WHERE id = $6 AND state IN ('pending', 'running')",
    )
    .bind(to.name())
    .bind(i64::from(if to == OperationState::Succeeded {
        100
    } else {
        end.progress.min(100)
    }))
    .bind(end.error)
    .bind(end.note)
    .bind(now_ms())
    .bind(op.id.to_string())
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE instances SET pending_op = NULL WHERE pending_op = $1")
        .bind(op.id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(Some(changed))
}

/// Instance `id` inside `tx`, if it exists.
pub(crate) async fn load_instance(
    tx: &mut Tx,
    id: InstanceId,
) -> Result<Option<InstanceRec>, DbError> {
    let row = sqlx::query(&format!("{} WHERE i.id = $1", rows::INSTANCE_SELECT))
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(rows::instance).transpose()
}

/// Undoes what a failed (or timed out) operation booked.
async fn undo(tx: &mut Tx, op: &OpRow, rec: Option<&InstanceRec>, why: &str) -> ApiResult<bool> {
    let mut changed = false;
    match (&op.detail, rec) {
        (OpDetail::Snapshot { snapshot }, _) => {
            crate::snapshots::fail(tx, *snapshot, why).await?;
        }
        (OpDetail::ChangeType { .. } | OpDetail::GrowDisk { .. }, Some(rec)) => {
            crate::api::actions::undo_resize(tx, rec, &op.detail).await?;
        }
        (OpDetail::SetPassword { old }, Some(rec)) => {
            crate::api::password::undo_reset(tx, rec.id, old.as_ref()).await?;
        }
        (OpDetail::GrowVolume { .. } | OpDetail::DeleteVolume { .. }, _) => {
            crate::api::volumes::undo(tx, op).await?;
        }
        _ => {}
    }
    if let (OperationKind::Create, Some(rec)) = (op.kind, rec) {
        changed |= set_final(tx, rec, InstanceState::Failed).await?;
    }
    Ok(changed)
}

/// An admin settled `op` as done although its host never said so: a
/// release (the host is gone for good) leaves the instance Released.
async fn settle_succeeded(tx: &mut Tx, op: &OpRow, rec: &InstanceRec) -> ApiResult<bool> {
    match op.kind {
        OperationKind::Release => Ok(set_final(tx, rec, InstanceState::Released).await?),
        _ => Ok(false),
    }
}

/// Moves `rec` to a final state by hand (the host cannot report it) and
/// gives back what it held. Returns whether the host's forwards changed.
pub async fn set_final(tx: &mut Tx, rec: &InstanceRec, to: InstanceState) -> Result<bool, DbError> {
    if rec.observed.is_final() {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE instances SET observed_state = $1, desired_state = $1, state_since_ms = $2 \
         WHERE id = $3",
    )
    .bind(to.name())
    .bind(now_ms())
    .bind(rec.id.to_string())
    .execute(&mut **tx)
    .await?;
    crate::api::actions::release_resources(tx, rec).await
}

/// The timeout of operations of `kind`, ms.
pub fn timeout_ms(st: &AppState, kind: OperationKind) -> i64 {
    let secs = st
        .cfg
        .operation_timeout_secs
        .get(&kind)
        .copied()
        .unwrap_or_else(|| kind.default_timeout_secs());
    secs.min(i64::MAX as u64 / 1000) as i64 * 1000
}

/// Ends every operation its host has not advanced within its timeout
/// (the reconcile loop). Returns how many timed out.
pub async fn time_out(st: &AppState) -> Result<u64, DbError> {
    let found = sqlx::query(&format!(
        "SELECT {OP_COLS}, (SELECT COALESCE(h.down_since_ms, h.revoked_ms) FROM hosts h \
         WHERE h.id = operations.host_id) \
         AS host_down FROM operations WHERE state IN ('pending', 'running') ORDER BY created_ms"
    ))
    .fetch_all(&st.db.pool)
    .await?;
    let now = now_ms();
    let mut n = 0;
    for r in &found {
        let op = op_row(r)?;
        let host_down: Option<i64> = col(r, "host_down")?;
        let limit = timeout_ms(st, op.kind);
        if now - op.updated_ms < limit || (host_down.is_some() && op.kind.waits_for_host()) {
            continue;
        }
        let why = format!(
            "timed out: the host did not finish this {} within {} s",
            op.kind,
            limit / 1000
        );
        let mut tx = st.db.begin_write().await?;
        let Some(cur) = load(&mut tx, op.id).await? else {
            continue;
        };
        let ended = finish(
            st,
            &mut tx,
            &cur,
            Ending {
                event: OperationEvent::TimedOut,
                progress: 0,
                error: Some(&why),
                note: None,
            },
        )
        .await;
        match ended {
            Ok(Some(changed)) => {
                tx.commit().await?;
                n += 1;
                tracing::warn!(op = %op.id, kind = %op.kind, "operation timed out");
                if let (true, Some(h)) = (changed, &op.host) {
                    st.wake.wake(h);
                }
            }
            Ok(None) => {}
            Err(ApiError::Db(e)) => return Err(e),
            Err(e) => tracing::error!(op = %op.id, error = %e, "cannot time out the operation"),
        }
    }
    Ok(n)
}

/// Settles `id` by hand (an admin): `succeeded` only for operations that
/// wait for their host (a release on a host that is gone), `failed` for
/// any. Refused once the operation has ended.
pub async fn settle(st: &AppState, id: OperationId, ok: bool, reason: &str) -> ApiResult<OpRow> {
    let mut tx = st.db.begin_write().await?;
    let op = load(&mut tx, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no operation {id}")))?;
    if op.state.is_final() {
        return Err(ApiError::Conflict(format!(
            "operation {id} is already {}; nothing to settle",
            op.state
        )));
    }
    if ok && !op.kind.waits_for_host() {
        return Err(ApiError::invalid(
            "outcome",
            format!(
                "a {} cannot be settled as succeeded by hand (only a release or a deletion \
                 can); settle it as failed",
                op.kind
            ),
        ));
    }
    let why = format!("settled by an admin: {reason}");
    let changed = finish(
        st,
        &mut tx,
        &op,
        Ending {
            event: OperationEvent::Settled(ok),
            progress: 0,
            error: (!ok).then_some(why.as_str()),
            note: ok.then_some(why.as_str()),
        },
    )
    .await?;
    tx.commit().await?;
    if let (Some(true), Some(h)) = (changed, &op.host) {
        st.wake.wake(h);
    }
    Ok(op)
}

/// Stops a Running instance for a policy (credit run out, account
/// disabled): claims it (no operation pending, still Running), queues a
/// `stop` operation and wakes its host. `None` when someone else got to
/// it first.
pub async fn stop_for_policy(
    st: &AppState,
    rec: &InstanceRec,
    why: &str,
) -> Result<Option<OperationId>, DbError> {
    let op = OperationId::new();
    let mut tx = st.db.begin_write().await?;
    let claimed = sqlx::query(
        "UPDATE instances SET pending_op = $1, desired_state = $2 WHERE id = $3 \
         AND pending_op IS NULL AND observed_state = 'Running'",
    )
    .bind(op.to_string())
    .bind(InstanceState::Stopped.name())
    .bind(rec.id.to_string())
    .execute(&mut *tx)
    .await?;
    if claimed.rows_affected() != 1 {
        return Ok(None);
    }
    let new = NewOp::on(rec, op, OperationKind::Stop, OpDetail::None);
    create(&mut tx, &new).await?;
    tx.commit().await?;
    tracing::warn!(instance = %rec.id, account = %rec.account, "{why}; stopping");
    if let Some(h) = &rec.host {
        st.wake.wake(h);
    }
    Ok(Some(op))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_round_trip_and_old_rows_still_read() {
        let snap = SnapshotId::new();
        let (new, old) = (FlavorId::new(), FlavorId::new());
        let pci = PciAddress::parse("0000:65:00.0").unwrap();
        let all = [
            (OperationKind::Start, OpDetail::None),
            (
                OperationKind::ChangeType,
                OpDetail::ChangeType {
                    flavor: new,
                    old_flavor: old,
                    old_root_disk_gib: 50,
                    old_gpus: vec![pci.to_string()],
                },
            ),
            (
                OperationKind::GrowDisk,
                OpDetail::GrowDisk {
                    root_disk_gib: 80,
                    old_root_disk_gib: 50,
                },
            ),
            (
                OperationKind::GrowVolume,
                OpDetail::GrowVolume {
                    volume: VolumeId::new(),
                    size_gib: 100,
                    old_size_gib: 60,
                },
            ),
            (
                OperationKind::Snapshot,
                OpDetail::Snapshot { snapshot: snap },
            ),
            (OperationKind::ClearGpu, OpDetail::ClearGpu { pci }),
            (
                OperationKind::SetPassword,
                OpDetail::SetPassword {
                    old: Some(("$6$h".into(), "sealed".into())),
                },
            ),
        ];
        for (kind, d) in all {
            assert_eq!(OpDetail::load(kind, &d.store()).unwrap(), d, "{kind}");
        }
        // Rows written before schema version 7.
        let legacy = [
            (OperationKind::Start, String::new(), OpDetail::None),
            (
                OperationKind::ChangeType,
                format!("{new} {old} 50 -"),
                OpDetail::ChangeType {
                    flavor: new,
                    old_flavor: old,
                    old_root_disk_gib: 50,
                    old_gpus: vec![],
                },
            ),
            (
                OperationKind::GrowDisk,
                "80 50".into(),
                OpDetail::GrowDisk {
                    root_disk_gib: 80,
                    old_root_disk_gib: 50,
                },
            ),
            (
                OperationKind::DeleteSnapshot,
                snap.to_string(),
                OpDetail::DeleteSnapshot { snapshot: snap },
            ),
            (
                OperationKind::ClearGpu,
                "0000:65:00.0".into(),
                OpDetail::ClearGpu { pci },
            ),
        ];
        for (kind, text, want) in legacy {
            assert_eq!(
                OpDetail::load(kind, &text).unwrap(),
                want,
                "{kind} {text:?}"
            );
        }
        assert!(OpDetail::load(OperationKind::GrowDisk, "80").is_err());
        assert!(OpDetail::load(OperationKind::Snapshot, "{\"t\":\"nope\"}").is_err());
    }
}
