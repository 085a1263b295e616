//! Row mappers: the column list each table is selected with, and the
//! function turning such a row into an API type (or an internal record).

use super::{col, parsed, parsed_opt, to_time, DbError};
use gantry_proto::api::v1::{
    AccountInfo, AccountStatus, AuditEntry, FlavorInfo, HostHealth, ImageInfo, OperationInfo,
    OperationKind, OperationState, SnapshotInfo, TokenInfo, UsageKind, UsageRecord, VolumeInfo,
};
use gantry_proto::ids::*;
use gantry_proto::{InstanceState, SnapshotStatus};
use sqlx::any::AnyRow;

/// With the account's deduplicated snapshot bytes (the billed figure) and
/// what its snapshots not yet in that figure reserve (see
/// `crate::snapshots`).
pub const ACCOUNT_COLS: &str = "id, name, credit_micros, billing_complete, snapshot_quota_gib, \
     created_ms, snapshot_bytes, (SELECT CAST(COALESCE(SUM(CASE WHEN s.status = 'Creating' \
     THEN s.reserved_bytes ELSE s.compressed_bytes END), 0) AS BIGINT) FROM snapshots s WHERE \
     s.account_id = accounts.id AND (s.status = 'Creating' OR (s.status = 'Success' AND \
     s.store_reports_due > 0))) AS snapshot_reserved, status";

pub fn account(r: &AnyRow) -> Result<AccountInfo, DbError> {
    Ok(AccountInfo {
        id: parsed(r, "id", "accounts")?,
        name: col(r, "name")?,
        credit_micros: col(r, "credit_micros")?,
        billing_profile_complete: col::<i64>(r, "billing_complete")? != 0,
        snapshot_quota_gib: col::<i64>(r, "snapshot_quota_gib")? as u64,
        snapshot_used_bytes: col::<i64>(r, "snapshot_bytes")?.max(0) as u64,
        snapshot_reserved_bytes: col::<i64>(r, "snapshot_reserved")?.max(0) as u64,
        created_at: to_time(col(r, "created_ms")?),
        status: account_status(&col::<String>(r, "status")?)?,
    })
}

/// An `accounts.status` value.
pub fn account_status(s: &str) -> Result<AccountStatus, DbError> {
    Ok(match s {
        "active" => AccountStatus::Active,
        "disabled" => AccountStatus::Disabled,
        "deleting" => AccountStatus::Deleting,
        "deleted" => AccountStatus::Deleted,
        other => {
            return Err(DbError::Corrupt {
                table: "accounts",
                message: format!("status: unknown {other:?}"),
            })
        }
    })
}

pub const TOKEN_COLS: &str = "id, name, account_id, created_ms, revoked, expires_ms";

pub fn token(r: &AnyRow) -> Result<TokenInfo, DbError> {
    Ok(TokenInfo {
        id: parsed(r, "id", "tokens")?,
        name: col(r, "name")?,
        account: parsed_opt(r, "account_id", "tokens")?,
        created_at: to_time(col(r, "created_ms")?),
        revoked: col::<i64>(r, "revoked")? != 0,
        expires_at: col::<Option<i64>>(r, "expires_ms")?.map(to_time),
    })
}

pub const FLAVOR_COLS: &str =
    "id, name, vcpus, memory_mib, root_disk_gib, gpu_model, gpu_count, price_micros_per_hour";

pub fn flavor(r: &AnyRow) -> Result<FlavorInfo, DbError> {
    Ok(FlavorInfo {
        id: parsed(r, "id", "flavors")?,
        name: col(r, "name")?,
        vcpus: col::<i64>(r, "vcpus")? as u32,
        memory_mib: col::<i64>(r, "memory_mib")? as u64,
        root_disk_gib: col::<i64>(r, "root_disk_gib")? as u64,
        gpu_model: col(r, "gpu_model")?,
        gpu_count: col::<i64>(r, "gpu_count")? as u32,
        price_micros_per_hour: col(r, "price_micros_per_hour")?,
    })
}

pub const IMAGE_COLS: &str = "id, name, size_gib, account_id, source_snapshot_id, created_ms";

pub fn image(r: &AnyRow) -> Result<ImageInfo, DbError> {
    Ok(ImageInfo {
        id: parsed(r, "id", "images")?,
        name: col(r, "name")?,
        size_gib: col::<i64>(r, "size_gib")? as u64,
        account: parsed_opt(r, "account_id", "images")?,
        source_snapshot: parsed_opt(r, "source_snapshot_id", "images")?,
        created_at: to_time(col(r, "created_ms")?),
    })
}

pub const VOLUME_COLS: &str =
    "id, account_id, name, size_gib, instance_id, created_ms, host_id, pending_op, deleting";

pub fn volume(r: &AnyRow) -> Result<VolumeInfo, DbError> {
    Ok(VolumeInfo {
        id: parsed(r, "id", "volumes")?,
        account: parsed(r, "account_id", "volumes")?,
        name: col(r, "name")?,
        size_gib: col::<i64>(r, "size_gib")? as u64,
        instance: parsed_opt(r, "instance_id", "volumes")?,
        created_at: to_time(col(r, "created_ms")?),
        host: parsed_opt(r, "host_id", "volumes")?,
        operation: parsed_opt(r, "pending_op", "volumes")?,
        deleting: col::<i64>(r, "deleting")? != 0,
    })
}

/// With its operation's progress (`FROM snapshots`).
pub const SNAPSHOT_COLS: &str = "id, account_id, instance_id, name, description, status, \
     auto_release, as_image, logical_bytes, compressed_bytes, operation_id, error, created_ms, frozen, region, \
     (SELECT o.progress FROM operations o WHERE o.id = snapshots.operation_id) AS progress";

pub fn snapshot(r: &AnyRow) -> Result<SnapshotInfo, DbError> {
    let status: SnapshotStatus = parsed(r, "status", "snapshots")?;
    let progress = match status {
        SnapshotStatus::Success => 100,
        _ => col::<Option<i64>>(r, "progress")?
            .unwrap_or(0)
            .clamp(0, 100) as u8,
    };
    Ok(SnapshotInfo {
        id: parsed(r, "id", "snapshots")?,
        account: parsed(r, "account_id", "snapshots")?,
        instance: parsed(r, "instance_id", "snapshots")?,
        name: col(r, "name")?,
        description: col(r, "description")?,
        status,
        auto_release: col::<i64>(r, "auto_release")? != 0,
        as_image: col::<i64>(r, "as_image")? != 0,
        logical_bytes: col::<i64>(r, "logical_bytes")? as u64,
        compressed_bytes: col::<i64>(r, "compressed_bytes")? as u64,
        operation: parsed_opt(r, "operation_id", "snapshots")?,
        error: col(r, "error")?,
        progress_percent: progress,
        frozen: col::<Option<i64>>(r, "frozen")?.map(|f| f != 0),
        created_at: to_time(col(r, "created_ms")?),
        // Set from the store's hosts by `crate::store_keys::mark_available`.
        available: true,
        unavailable_reason: None,
        region: col(r, "region")?,
    })
}

pub const OPERATION_COLS: &str = "id, kind, instance_id, state, progress, error, note, created_ms";

pub fn operation(r: &AnyRow) -> Result<OperationInfo, DbError> {
    let state: String = col(r, "state")?;
    let state = OperationState::parse(&state).ok_or_else(|| DbError::Corrupt {
        table: "operations",
        message: format!("state {state:?}"),
    })?;
    let kind: String = col(r, "kind")?;
    let kind = OperationKind::parse(&kind).ok_or_else(|| DbError::Corrupt {
        table: "operations",
        message: format!("kind {kind:?}"),
    })?;
    Ok(OperationInfo {
        id: parsed(r, "id", "operations")?,
        kind,
        instance: parsed_opt(r, "instance_id", "operations")?,
        state,
        progress_percent: col::<i64>(r, "progress")?.clamp(0, 100) as u8,
        error: col(r, "error")?,
        note: col(r, "note")?,
        created_at: to_time(col(r, "created_ms")?),
    })
}

pub const USAGE_COLS: &str =
    "account_id, instance_id, kind, quantity, price_micros, amount_micros, at_ms";

pub fn usage(r: &AnyRow) -> Result<UsageRecord, DbError> {
    let kind: String = col(r, "kind")?;
    Ok(UsageRecord {
        account: parsed(r, "account_id", "usage_records")?,
        instance: parsed_opt(r, "instance_id", "usage_records")?,
        kind: match kind.as_str() {
            "snapshot" => UsageKind::Snapshot,
            "volume" => UsageKind::Volume,
            _ => UsageKind::Instance,
        },
        quantity: col(r, "quantity")?,
        price_micros: col(r, "price_micros")?,
        amount_micros: col(r, "amount_micros")?,
        at: to_time(col(r, "at_ms")?),
    })
}

pub const AUDIT_COLS: &str = "at_ms, actor, account_id, method, path, status, note";

pub fn audit(r: &AnyRow) -> Result<AuditEntry, DbError> {
    Ok(AuditEntry {
        at: to_time(col(r, "at_ms")?),
        actor: col(r, "actor")?,
        account: parsed_opt(r, "account_id", "audit_log")?,
        method: col(r, "method")?,
        path: col(r, "path")?,
        status: col::<i64>(r, "status")? as u16,
        note: col(r, "note")?,
    })
}

pub fn health(s: &str) -> HostHealth {
    if s == "healthy" {
        HostHealth::Healthy
    } else {
        HostHealth::Unhealthy
    }
}

pub fn health_str(h: HostHealth) -> &'static str {
    match h {
        HostHealth::Healthy => "healthy",
        HostHealth::Unhealthy => "unhealthy",
    }
}

/// An instance joined with its flavor (and host address), as the instance
/// handlers need it.
#[derive(Debug, Clone)]
pub struct InstanceRec {
    pub id: InstanceId,
    pub account: AccountId,
    pub name: String,
    pub flavor: FlavorId,
    pub flavor_name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub gpu_model: Option<String>,
    pub gpu_count: u32,
    pub price_micros_per_hour: i64,
    pub image: Option<ImageId>,
    pub snapshot: Option<SnapshotId>,
    pub host: Option<HostId>,
    pub host_address: Option<String>,
    pub desired: InstanceState,
    pub observed: InstanceState,
    pub state_since_ms: i64,
    pub root_disk_gib: u64,
    pub data_volume: Option<VolumeId>,
    pub base_image: Option<ImageId>,
    /// Running time billed so far (up to the counter `usage_seq`).
    pub billed_ms: i64,
    pub usage_seq: i64,
    /// Amount charged so far (the ledger's sum for this instance).
    pub charged_micros: i64,
    pub pending_op: Option<OperationId>,
    pub created_ms: i64,
    /// Set when the instance was released while its host was down: no
    /// usage after it is charged (the host's last heartbeat).
    pub billing_closed_ms: Option<i64>,
    /// Since when its host is down (missed heartbeats or revoked).
    pub host_down_since_ms: Option<i64>,
    /// The region it was created in.
    pub region: String,
}

pub const INSTANCE_SELECT: &str = "SELECT i.id, i.account_id, i.name, i.flavor_id, f.name AS \
     flavor_name, f.vcpus, f.memory_mib, f.gpu_model, f.gpu_count, f.price_micros_per_hour, \
     i.image_id, i.snapshot_id, i.host_id, h.address AS host_address, i.desired_state, \
     i.observed_state, i.state_since_ms, i.root_disk_gib, i.data_volume_id, i.base_image_id, \
     i.billed_ms, i.usage_seq, i.charged_micros, i.pending_op, i.created_ms, \
     i.billing_closed_ms, COALESCE(h.down_since_ms, h.revoked_ms) AS \
     host_down_since_ms, i.region FROM instances i JOIN flavors f ON f.id = \
     i.flavor_id LEFT JOIN hosts h ON h.id = i.host_id";

pub fn instance(r: &AnyRow) -> Result<InstanceRec, DbError> {
    const T: &str = "instances";
    Ok(InstanceRec {
        id: parsed(r, "id", T)?,
        account: parsed(r, "account_id", T)?,
        name: col(r, "name")?,
        flavor: parsed(r, "flavor_id", T)?,
        flavor_name: col(r, "flavor_name")?,
        vcpus: col::<i64>(r, "vcpus")? as u32,
        memory_mib: col::<i64>(r, "memory_mib")? as u64,
        gpu_model: col(r, "gpu_model")?,
        gpu_count: col::<i64>(r, "gpu_count")? as u32,
        price_micros_per_hour: col(r, "price_micros_per_hour")?,
        image: parsed_opt(r, "image_id", T)?,
        snapshot: parsed_opt(r, "snapshot_id", T)?,
        host: parsed_opt(r, "host_id", T)?,
        host_address: col(r, "host_address")?,
        desired: parsed(r, "desired_state", T)?,
        observed: parsed(r, "observed_state", T)?,
        state_since_ms: col(r, "state_since_ms")?,
        root_disk_gib: col::<i64>(r, "root_disk_gib")? as u64,
        data_volume: parsed_opt(r, "data_volume_id", T)?,
        base_image: parsed_opt(r, "base_image_id", T)?,
        billed_ms: col(r, "billed_ms")?,
        usage_seq: col(r, "usage_seq")?,
        charged_micros: col(r, "charged_micros")?,
        pending_op: parsed_opt(r, "pending_op", T)?,
        created_ms: col(r, "created_ms")?,
        billing_closed_ms: col(r, "billing_closed_ms")?,
        host_down_since_ms: col(r, "host_down_since_ms")?,
        region: col(r, "region")?,
    })
}
