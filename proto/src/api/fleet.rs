//! Controller API bodies for a fleet's storage and hosts: data volumes
//! (placed on a host, grown, deleted), and for admins settling stuck
//! operations, removing dead hosts, moving instances and draining hosts.
//! Re-exported from [`super::v1`].

use crate::ids::{AccountId, HostId, InstanceId, OperationId, VolumeId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `POST /v1/admin/operations/{id}/settle`: an admin ends an operation
/// its host will never finish (audited). `succeeded` only for a release or
/// a deletion (the host is gone for good); `failed` for any, undoing what
/// it booked and freeing what it held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SettleOperation {
    pub outcome: SettleOutcome,
    /// Why (recorded with the operation and in the audit log).
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SettleOutcome {
    Succeeded,
    Failed,
}

/// `POST /v1/admin/instances/{id}/move`: move a Stopped instance to
/// another host through the shared snapshot store (root disk and data
/// volume). Without `host`, its host must be cordoned and the best other
/// host of its region is chosen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MoveInstance {
    #[serde(default)]
    pub host: Option<HostId>,
}

/// A move that started (its first operation: poll it, then the instance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MoveStarted {
    pub instance: InstanceId,
    pub operation: OperationId,
}

/// `POST /v1/admin/hosts/{id}/drain`: the host is cordoned; its Stopped
/// instances move; the others are listed with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DrainReport {
    pub host: HostId,
    pub moving: Vec<MoveStarted>,
    /// One sentence per instance that stays (running GPU instances cannot
    /// live-migrate).
    pub not_moved: Vec<String>,
}

/// `POST /v1/admin/hosts/{id}/remove`: what removing a down host settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RemovedHost {
    pub host: HostId,
    /// Instances released (they were being released) or failed (lost
    /// with the host).
    pub released: Vec<InstanceId>,
    pub failed: Vec<InstanceId>,
    /// Operations settled.
    pub settled: Vec<OperationId>,
}

// ---------- volumes ----------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size_gib: u64,
    /// Admins create volumes for an account; tenants leave this out.
    #[serde(default)]
    pub account: Option<AccountId>,
    /// Place the volume on this host now (admins only); its size is booked
    /// on the host's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostId>,
    /// Place the volume on this instance's host now (the account's own
    /// instance), so that a later instance using it lands beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub account: AccountId,
    pub name: String,
    /// The booked size (a grow in flight included).
    pub size_gib: u64,
    pub instance: Option<InstanceId>,
    pub created_at: DateTime<Utc>,
    /// The host that holds the volume; none until it is first placed. An
    /// instance created with the volume runs on this host.
    #[serde(default)]
    pub host: Option<HostId>,
    /// The grow or delete operation the volume waits for.
    #[serde(default)]
    pub operation: Option<OperationId>,
    /// Being deleted on its host (no longer billed).
    #[serde(default)]
    pub deleting: bool,
}

/// `POST /v1/volumes/{id}/grow`: the new size (never smaller; at least the
/// controller's `min_volume_gib`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GrowVolume {
    pub size_gib: u64,
}

/// `POST /v1/volumes/grow`: several volumes grown to one size, one result
/// each ([`VolumeBatchResult`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BatchGrowVolumes {
    pub volumes: Vec<VolumeId>,
    pub size_gib: u64,
}

/// One volume's outcome in a batch: an operation, or the error sentence
/// and the HTTP status it would have had alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeBatchResult {
    pub volume: VolumeId,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
