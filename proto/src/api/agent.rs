//! The agent <-> controller protocol (`/v1/agent/...` on the controller).
//!
//! The agent always calls; the controller never connects to a host.
//!
//! 1. **Join.** An admin mints a one-time join token
//!    (`POST /v1/admin/join-tokens` -> [`CreatedJoinToken`]). The agent calls
//!    `POST /v1/agent/join` with `Authorization: Bearer <join token>` and a
//!    [`JoinRequest`]; the answer ([`JoinResponse`]) carries the host's id and
//!    its own credential (`ghc_...`), shown once and kept by the controller
//!    only as a hash. A join token is single-use: it is consumed by the
//!    first successful join and any later join with it is 401 ("already
//!    used"). An agent that lost the reply (or crashed before saving the
//!    credential) is joined again by an admin: revoke the host, mint a new
//!    token, join (the same host record is re-bound).
//! 2. **Heartbeat.** Every [`JoinResponse::heartbeat_secs`] the agent posts
//!    an [`AgentHeartbeat`] (`POST /v1/agent/heartbeat`, Bearer: the host
//!    credential): capacity and health, the observed state of every
//!    instance, the per-instance Running-time counters, the store's
//!    per-account usage and, after the store compacted, the snapshots' new
//!    compressed sizes. The answer ([`HeartbeatAck`]) says which counters
//!    are billed.
//! 3. **Work.** The agent long-polls
//!    `GET /v1/agent/work?wait_secs=N&access_rev=R&tls=F` ([`Work`]): the
//!    desired state of the host's instances and the operations to carry
//!    out, each with an id; the host's access state ([`HostAccess`]: its
//!    subnet and every port forward) when its revision differs from `R`, and
//!    the certificate of its HTTPS proxy ([`HostTls`]) when its fingerprint
//!    differs from `F`. The controller answers at once while an operation is
//!    `pending` (not yet acknowledged) or either of those is news, else when
//!    something changes for the host or after `wait_secs`.
//! 4. **Report.** The agent reports each operation's progress and outcome
//!    with `POST /v1/agent/ops/{id}` ([`OpReport`]). Operations are
//!    idempotent by id: the agent remembers the ids it has started and
//!    re-reports instead of re-running; the controller ignores a report for
//!    an operation that has already ended.
//!
//! 5. **Store keys.** Before work on an account's snapshots the agent gets
//!    the account's chunk keys with `GET /v1/agent/store-keys/{account}`
//!    ([`StoreKeys`]; only while the host serves the account), and offers a
//!    key it made itself with `POST` ([`OfferStoreKey`]). Heartbeats carry
//!    the host's [`StoreIdentity`], so the controller knows which hosts read
//!    a snapshot.
//!
//! A host credential acts only on its own host's objects: an operation or
//! instance of another host answers 403.
//!
//! **Usage counters.** For each instance the agent keeps `running_ms`, the
//! total milliseconds the guest has been Running on this host, and `seq`,
//! bumped every time the counter is persisted (before it is ever sent). Both
//! only grow. The controller bills `running_ms - billed_ms` when it sees a
//! larger `seq`, so a retried heartbeat bills nothing twice and time spent
//! while the controller was unreachable is billed when it is back.

use crate::api::v1::{GpuDevice, HostHealth};
use crate::ids::{AccountId, HostId, ImageId, InstanceId, JoinTokenId, OperationId, SnapshotId};
use crate::instance::InstanceState;
use crate::net::{HostAccess, HostTls, Secret};
use crate::spec::InstanceSpec;
use crate::validate::PciAddress;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Prefix of join tokens: `gjt_<join token uuid>_<64 hex>`.
pub const JOIN_TOKEN_PREFIX: &str = "gjt_";
/// Prefix of host credentials: `ghc_<host uuid>_<64 hex>`.
pub const HOST_CREDENTIAL_PREFIX: &str = "ghc_";
/// Words in the 401 sentence a host gets once an admin revoked its
/// credential (the agent looks for them to tell its operator to re-join).
pub const CREDENTIAL_REVOKED: &str = "credential was revoked";
/// Longest long-poll the controller holds.
pub const MAX_WAIT_SECS: u64 = 60;

/// Bounds of what a host reports (heartbeats and op reports). A report
/// with any figure outside them is refused whole (422 naming the field)
/// and nothing of it is applied; see [`AgentHeartbeat::check_bounds`].
///
/// Largest `UsageCounter::running_ms`: ten years of Running time.
pub const MAX_RUNNING_MS: u64 = 10 * 366 * 24 * 3600 * 1000;
/// Largest `UsageCounter::seq` (it is stored as a signed 64-bit integer).
pub const MAX_COUNTER_SEQ: u64 = i64::MAX as u64;
/// Largest snapshot size (logical or compressed) a host may report: the
/// largest disk an instance can have (`spec::MAX_DISK_GIB` GiB, 64 TiB).
pub const MAX_SNAPSHOT_BYTES: u64 = crate::spec::MAX_DISK_GIB << 30;
/// Largest `StoreUsage::billed_bytes` of one account in one host's store
/// (1 PiB): summed over 8192 hosts it still fits in 63 bits.
pub const MAX_STORE_BYTES: u64 = 1 << 50;
/// How far ahead of the controller's clock a host's `sent_at_ms` may be.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// `POST /v1/admin/join-tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    /// How long the token can be used; default one hour, at most 7 days.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// The region the joining host is put in; default: the host's current
    /// region when it re-joins, else the controller's `default_region`.
    #[serde(default)]
    pub region: Option<String>,
}

/// The answer to [`CreateJoinToken`]; `token` is shown only here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedJoinToken {
    pub id: JoinTokenId,
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// What a host has to offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostCapacity {
    /// vCPUs the host offers to guests.
    pub vcpus: u32,
    /// Memory the host offers to guests (after its reserve), MiB.
    pub memory_mib: u64,
    /// Disk for instance disks, GiB.
    pub disk_gib: u64,
    #[serde(default)]
    pub gpus: Vec<GpuDevice>,
}

/// `POST /v1/agent/join` (Bearer: the join token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The host's name (unique in the fleet).
    pub name: String,
    /// Address tenants reach forwarded ports on (IP or DNS name).
    pub address: String,
    pub capacity: HostCapacity,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JoinResponse {
    pub host: HostId,
    /// The host's credential (`ghc_...`): shown once, keep it secret.
    pub credential: String,
    /// How often to heartbeat.
    pub heartbeat_secs: u64,
}

/// An instance as its host last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ObservedInstance {
    pub id: InstanceId,
    pub state: InstanceState,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The Running-time counter of one instance (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UsageCounter {
    pub instance: InstanceId,
    pub seq: u64,
    pub running_ms: u64,
}

/// Compressed bytes an account holds in the host's snapshot store (its
/// own namespace, deduplicated): what it is billed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StoreUsage {
    pub account: AccountId,
    pub billed_bytes: u64,
}

/// What kind of snapshot store a host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A directory on the host (only that host reads it).
    Local,
    /// S3-compatible object storage (every host configured alike shares it).
    S3,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::S3 => "s3",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "local" => Some(Self::Local),
            "s3" => Some(Self::S3),
            _ => None,
        }
    }
}

/// Which snapshot store a host uses: hosts reporting the same `id` see the
/// same snapshots. For S3 the id is a hash of endpoint, bucket and prefix;
/// for a local directory a random id kept in the store's marker object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StoreIdentity {
    pub kind: StoreKind,
    /// `local-<32 hex>` or `s3-<32 hex>`.
    pub id: String,
}

impl StoreIdentity {
    /// Checks the id's shape (`<kind>-<32 lower-case hex>`).
    pub fn validate(&self, field: &str) -> Result<(), crate::validate::ValidationError> {
        let hex = self
            .id
            .strip_prefix(self.kind.name())
            .and_then(|r| r.strip_prefix('-'));
        match hex {
            Some(h)
                if h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                Ok(())
            }
            _ => Err(crate::validate::ValidationError::new(
                format!("{field}.id"),
                format!("must be {}-<32 lower-case hex digits>", self.kind.name()),
            )),
        }
    }
}

/// An account's snapshot-store chunk keys, as the controller hands them to
/// a host (`GET /v1/agent/store-keys/{account}`): `current` names the
/// chunks the host writes, `previous` only read (snapshots written under a
/// key that was replaced). Keys are 64 hex digits, never printed by Debug.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StoreKeys {
    pub account: AccountId,
    pub current: Secret,
    #[serde(default)]
    pub previous: Vec<Secret>,
}

/// A key a host made itself before the controller kept the account's key
/// (`POST /v1/agent/store-keys/{account}`): adopted as the account's key
/// when it has none, else kept as a previous key. Answered with
/// [`StoreKeys`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OfferStoreKey {
    pub key: Secret,
}

/// A snapshot's current compressed size in the host's store. It shrinks
/// when the store compacts the chunks a snapshot was published with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SnapshotSize {
    pub snapshot: SnapshotId,
    pub compressed_bytes: u64,
}

/// `POST /v1/agent/heartbeat` (Bearer: the host credential).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AgentHeartbeat {
    /// When the agent built this heartbeat (Unix ms); older ones than the
    /// last seen are ignored.
    pub sent_at_ms: i64,
    pub capacity: HostCapacity,
    pub health: HostHealth,
    /// What makes the host unhealthy or degraded, in sentences.
    #[serde(default)]
    pub problems: Vec<String>,
    pub instances: Vec<ObservedInstance>,
    pub usage: Vec<UsageCounter>,
    /// Per-account store usage; `None` when not measured this time.
    #[serde(default)]
    pub store: Option<Vec<StoreUsage>>,
    /// Snapshot sizes that changed (after a compaction of the store);
    /// `None` when none did.
    #[serde(default)]
    pub snapshot_sizes: Option<Vec<SnapshotSize>>,
    /// The port of the host's shared HTTPS listener (the proxy that answers
    /// `https://<guest_port>-<instance>.<domain>`); `None` when it has none.
    #[serde(default)]
    pub https_port: Option<u16>,
    /// The host's snapshot store; `None` while it has none.
    #[serde(default)]
    pub store_identity: Option<StoreIdentity>,
    /// Where the host takes network groups' VXLAN traffic (its underlay
    /// address and port); `None` when no underlay is configured (its group
    /// members reach only members on the same host).
    #[serde(default)]
    pub vtep: Option<crate::groups::Vtep>,
    /// The health of each bucket attachment the host has (docs/buckets.md);
    /// `None` from agents that know no buckets.
    #[serde(default)]
    pub buckets: Option<Vec<crate::buckets::BucketReport>>,
}

impl AgentHeartbeat {
    /// Checks every figure against the bounds above and `sent_at_ms`
    /// against the controller's clock `now_ms` (at most
    /// [`MAX_CLOCK_SKEW_MS`] ahead, not negative). The error names the
    /// first field out of range.
    pub fn check_bounds(&self, now_ms: i64) -> Result<(), crate::validate::ValidationError> {
        use crate::validate::{in_range, ValidationError};
        if self.sent_at_ms < 0 || self.sent_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(ValidationError::new(
                "sent_at_ms",
                format!(
                    "must not be negative nor more than {MAX_CLOCK_SKEW_MS} ms ahead of the \
                     controller's clock ({now_ms}), got {}; check the host's clock",
                    self.sent_at_ms
                ),
            ));
        }
        for (i, u) in self.usage.iter().enumerate() {
            in_range(&format!("usage[{i}].seq"), u.seq, 0, MAX_COUNTER_SEQ)?;
            in_range(
                &format!("usage[{i}].running_ms"),
                u.running_ms,
                0,
                MAX_RUNNING_MS,
            )?;
        }
        for (i, u) in self.store.iter().flatten().enumerate() {
            in_range(
                &format!("store[{i}].billed_bytes"),
                u.billed_bytes,
                0,
                MAX_STORE_BYTES,
            )?;
        }
        for (i, s) in self.snapshot_sizes.iter().flatten().enumerate() {
            in_range(
                &format!("snapshot_sizes[{i}].compressed_bytes"),
                s.compressed_bytes,
                0,
                MAX_SNAPSHOT_BYTES,
            )?;
        }
        if let Some(v) = &self.vtep {
            v.validate("vtep")?;
        }
        Ok(())
    }
}

impl SnapshotSizes {
    /// Both sizes within [`MAX_SNAPSHOT_BYTES`], compressed not above
    /// logical; `field` is the report's field (`snapshot`).
    pub fn check_bounds(&self, field: &str) -> Result<(), crate::validate::ValidationError> {
        use crate::validate::{in_range, ValidationError};
        let f = |n: &str| format!("{field}.{n}");
        in_range(
            &f("logical_bytes"),
            self.logical_bytes,
            0,
            MAX_SNAPSHOT_BYTES,
        )?;
        in_range(
            &f("compressed_bytes"),
            self.compressed_bytes,
            0,
            MAX_SNAPSHOT_BYTES,
        )?;
        if self.compressed_bytes > self.logical_bytes {
            return Err(ValidationError::new(
                f("compressed_bytes"),
                format!("must not exceed {}", f("logical_bytes")),
            ));
        }
        Ok(())
    }
}

/// A counter the controller has billed up to `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageAck {
    pub instance: InstanceId,
    pub seq: u64,
    /// The controller has the instance as Released (or unknown): once this
    /// `seq` is acknowledged the agent may forget the counter.
    pub done: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatAck {
    pub heartbeat_secs: u64,
    pub billed: Vec<UsageAck>,
}

/// Where the agent gets an instance's base image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "from", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ImageOrigin {
    /// A disk file on the host (later: a URL), with optional direct-boot
    /// kernel, initrd and command line.
    File {
        disk: String,
        #[serde(default)]
        kernel: Option<String>,
        #[serde(default)]
        initrd: Option<String>,
        #[serde(default)]
        cmdline: Option<String>,
    },
    /// A snapshot in the host's store, restored into the image cache;
    /// direct-boot files are copied from `boot_like`.
    Snapshot {
        snapshot: SnapshotId,
        #[serde(default)]
        boot_like: Option<ImageId>,
        /// Where to get `boot_like` when this host's cache lacks it (a
        /// snapshot restored on another host than the one that took it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "openapi", schema(no_recursion))]
        boot_like_source: Option<Box<ImageSource>>,
    },
}

/// The image an instance boots from: its id in the host's image cache and
/// how to fill the cache when the image is missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ImageSource {
    pub image: ImageId,
    pub name: String,
    pub origin: ImageOrigin,
}

impl ImageSource {
    /// The cache id of the image restored from `snapshot`: the snapshot's
    /// uuid under the image prefix, so every host and every retry agree.
    pub fn snapshot_image_id(snapshot: SnapshotId) -> ImageId {
        ImageId::from_uuid(snapshot.uuid())
    }
}

/// What an operation asks the agent to do.
// `Create` is much larger than the rest; commands are few and short-lived,
// so the size does not matter and a plain enum keeps the JSON flat.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AgentCommand {
    Create {
        spec: InstanceSpec,
        image: ImageSource,
    },
    // Struct variants (not unit ones) so that unknown fields are refused.
    Start {},
    Stop {},
    Reboot {},
    ForceReboot {},
    /// Pause the guest (memory kept); `Resume` runs it again.
    Suspend {},
    Resume {},
    Release {},
    /// New shape while stopped. `gpus`: the whole GPUs the instance
    /// has afterwards (attached and detached to match); `None` leaves them.
    /// `root_disk_gib`: the root disk's size afterwards (it only grows).
    ChangeType {
        vcpus: u32,
        memory_mib: u64,
        #[serde(default)]
        gpus: Option<Vec<PciAddress>>,
        #[serde(default)]
        root_disk_gib: Option<u64>,
    },
    GrowDisk {
        root_disk_gib: u64,
    },
    /// Take Snapshot of the root disk into the host's store under this id.
    Snapshot {
        snapshot: SnapshotId,
        name: String,
        owner: AccountId,
        auto_release: bool,
    },
    /// Remove a snapshot from the host's store (its record is gone).
    DeleteSnapshot {
        snapshot: SnapshotId,
    },
    /// Set root's password: at once through the guest agent when the guest
    /// runs one, else from the next boot (the report's `note` says which).
    SetPassword {
        password_hash: Secret,
    },
    /// An admin cleared a quarantined or lost GPU: run the health gate on
    /// it again (a host operation, no instance).
    ClearGpu {
        pci: PciAddress,
    },
    /// Grow a data volume of this host (attached or not; never shrinks).
    GrowVolume {
        volume: crate::ids::VolumeId,
        size_gib: u64,
    },
    /// Delete a detached data volume of this host (done when it is gone).
    DeleteVolume {
        volume: crate::ids::VolumeId,
    },
    /// Save a Stopped instance for a move to another host: its root disk
    /// (the whole chain, guest-visible data) as store entry `snapshot` and
    /// its data volume as `volume_snapshot`, in `owner`'s namespace.
    MoveOut {
        snapshot: SnapshotId,
        #[serde(default)]
        volume_snapshot: Option<SnapshotId>,
        owner: AccountId,
    },
    /// Define a moved instance here, Stopped: its root disk from `image`
    /// (a store entry), its data volume restored from `volume_snapshot`.
    MoveIn {
        spec: InstanceSpec,
        image: ImageSource,
        #[serde(default)]
        volume_snapshot: Option<SnapshotId>,
        /// Whose chunk keys the store entries need.
        owner: AccountId,
    },
    /// The instance moved away: remove it and its data volume here.
    MoveCleanup {},
}

impl AgentCommand {
    /// The operation kind this command carries out.
    pub fn kind(&self) -> crate::operation::OperationKind {
        use crate::operation::OperationKind as K;
        match self {
            Self::Create { .. } => K::Create,
            Self::Start {} => K::Start,
            Self::Stop {} => K::Stop,
            Self::Reboot {} => K::Reboot,
            Self::ForceReboot {} => K::ForceReboot,
            Self::Suspend {} => K::Suspend,
            Self::Resume {} => K::Resume,
            Self::Release {} => K::Release,
            Self::ChangeType { .. } => K::ChangeType,
            Self::GrowDisk { .. } => K::GrowDisk,
            Self::Snapshot { .. } => K::Snapshot,
            Self::DeleteSnapshot { .. } => K::DeleteSnapshot,
            Self::SetPassword { .. } => K::SetPassword,
            Self::ClearGpu { .. } => K::ClearGpu,
            Self::GrowVolume { .. } => K::GrowVolume,
            Self::DeleteVolume { .. } => K::DeleteVolume,
            Self::MoveOut { .. } => K::MoveOut,
            Self::MoveIn { .. } => K::MoveIn,
            Self::MoveCleanup {} => K::MoveCleanup,
        }
    }
}

/// Whether the agent has acknowledged an operation yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum OpPhase {
    Pending,
    Running,
}

/// One operation for the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentOp {
    pub id: OperationId,
    #[serde(default)]
    pub instance: Option<InstanceId>,
    pub phase: OpPhase,
    pub command: AgentCommand,
}

/// The desired state of one of the host's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredInstance {
    pub id: InstanceId,
    pub desired: InstanceState,
    /// What the controller last recorded as observed.
    pub observed: InstanceState,
}

/// `GET /v1/agent/work?wait_secs=N&access_rev=R&tls=F`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Work {
    pub instances: Vec<DesiredInstance>,
    pub ops: Vec<AgentOp>,
    /// The host's access state, when its revision is not `R`.
    #[serde(default)]
    pub access: Option<HostAccess>,
    /// The proxy's certificate, when its fingerprint is not `F`.
    #[serde(default)]
    pub tls: Option<HostTls>,
    /// The host's network-group state, when its revision is not the
    /// `groups_rev` the agent sent.
    #[serde(default)]
    pub groups: Option<crate::groups::HostGroups>,
    /// The host's bucket attachments, when their revision is not the
    /// `buckets_rev` the agent sent.
    #[serde(default)]
    pub buckets: Option<crate::buckets::HostBuckets>,
}

/// How an operation stands on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum OpOutcome {
    Running,
    Succeeded,
    Failed,
}

/// What a finished snapshot produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SnapshotSizes {
    /// Guest-visible size of the root disk.
    pub logical_bytes: u64,
    /// Compressed bytes of the distinct chunks it references.
    pub compressed_bytes: u64,
    /// The guest's filesystems were frozen through its guest agent for the
    /// switch; else the snapshot is crash-consistent.
    #[serde(default)]
    pub frozen: bool,
}

/// `POST /v1/agent/ops/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OpReport {
    pub outcome: OpOutcome,
    /// 0 to 100.
    pub progress: u8,
    #[serde(default)]
    pub error: Option<String>,
    /// Set when a snapshot operation succeeded.
    #[serde(default)]
    pub snapshot: Option<SnapshotSizes>,
    /// The instance's state on the host when this was sent.
    #[serde(default)]
    pub instance_state: Option<InstanceState>,
    /// A sentence for the user about a successful outcome (e.g. "applies
    /// at the next boot").
    #[serde(default)]
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_read_as_written_and_refuse_unknown_fields() {
        let c: AgentCommand =
            serde_json::from_str(r#"{"kind":"grow-disk","root_disk_gib":80}"#).unwrap();
        assert_eq!(c, AgentCommand::GrowDisk { root_disk_gib: 80 });
        let c: AgentCommand = serde_json::from_str(r#"{"kind":"force-reboot"}"#).unwrap();
        assert_eq!(c, AgentCommand::ForceReboot {});
        let c: AgentCommand =
            serde_json::from_str(r#"{"kind":"set-password","password_hash":"$6$s$h"}"#).unwrap();
        assert!(!format!("{c:?}").contains("$6$s$h"), "secrets never print");
        let e = serde_json::from_str::<AgentCommand>(r#"{"kind":"stop","x":1}"#).unwrap_err();
        assert!(e.to_string().contains('x'), "{e}");
        let o: ImageOrigin =
            serde_json::from_str(r#"{"from":"file","disk":"/srv/img/root.qcow2"}"#).unwrap();
        assert!(matches!(o, ImageOrigin::File { kernel: None, .. }));
    }

    #[test]
    fn snapshot_images_have_stable_ids() {
        let s = SnapshotId::new();
        let a = ImageSource::snapshot_image_id(s);
        assert_eq!(a, ImageSource::snapshot_image_id(s));
        assert_eq!(a.uuid(), s.uuid());
    }

    #[test]
    fn heartbeat_bounds_name_the_field() {
        let mut hb: AgentHeartbeat = serde_json::from_value(serde_json::json!({
            "sent_at_ms": 1_000, "capacity": {"vcpus": 1, "memory_mib": 1024, "disk_gib": 1},
            "health": "healthy", "instances": [], "usage": []
        }))
        .unwrap();
        assert_eq!(hb.check_bounds(1_000), Ok(()));
        hb.sent_at_ms = 1_000 + MAX_CLOCK_SKEW_MS + 1;
        assert_eq!(hb.check_bounds(1_000).unwrap_err().field, "sent_at_ms");
        hb.sent_at_ms = 1_000;
        hb.usage.push(UsageCounter {
            instance: InstanceId::new(),
            seq: 1,
            running_ms: MAX_RUNNING_MS + 1,
        });
        assert_eq!(
            hb.check_bounds(1_000).unwrap_err().field,
            "usage[0].running_ms"
        );
        hb.usage[0].running_ms = MAX_RUNNING_MS;
        hb.store = Some(vec![StoreUsage {
            account: AccountId::new(),
            billed_bytes: MAX_STORE_BYTES + 1,
        }]);
        assert_eq!(
            hb.check_bounds(1_000).unwrap_err().field,
            "store[0].billed_bytes"
        );
        let s = SnapshotSizes {
            logical_bytes: MAX_SNAPSHOT_BYTES + 1,
            compressed_bytes: 1,
            frozen: false,
        };
        assert_eq!(
            s.check_bounds("snapshot").unwrap_err().field,
            "snapshot.logical_bytes"
        );
    }

    #[test]
    fn heartbeat_round_trips() {
        let hb = AgentHeartbeat {
            sent_at_ms: 1,
            capacity: HostCapacity {
                vcpus: 2,
                memory_mib: 4096,
                disk_gib: 10,
                gpus: vec![],
            },
            health: HostHealth::Healthy,
            problems: vec![],
            instances: vec![ObservedInstance {
                id: InstanceId::new(),
                state: InstanceState::Running,
                last_error: None,
            }],
            usage: vec![],
            store: None,
            snapshot_sizes: Some(vec![SnapshotSize {
                snapshot: SnapshotId::new(),
                compressed_bytes: 7,
            }]),
            https_port: Some(443),
            store_identity: None,
            vtep: None,
            buckets: None,
        };
        let text = serde_json::to_string(&hb).unwrap();
        assert_eq!(serde_json::from_str::<AgentHeartbeat>(&text).unwrap(), hb);
    }
}
