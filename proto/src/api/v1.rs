//! Bodies of the controller's HTTP API (`/v1/...`), for admins and tenants.
//!
//! Requests carry `deny_unknown_fields`; amounts of money are integer
//! micro-units (1 unit = 1_000_000 micros) so no float ever reaches the
//! ledger. Times are RFC 3339 UTC. Long work answers `202` with an
//! [`OperationInfo`]; `GET /v1/operations/{id}` reports it.

use crate::api::agent::ImageOrigin;
use crate::gpu::GpuHealth;
use crate::ids::{
    AccountId, FlavorId, ForwardId, HostId, ImageId, InstanceId, OperationId, SnapshotId, SshKeyId,
    VolumeId,
};
use crate::instance::{Action, InstanceState};
use crate::net::{Protocol, Secret};
use crate::snapshot::SnapshotStatus;
use crate::validate::PciAddress;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Most GPUs one host may declare.
pub const MAX_HOST_GPUS: usize = 64;
/// Most instances one batch call may name.
pub const MAX_BATCH: usize = 500;
/// Most extra guest ports one instance may forward (SSH is always forwarded).
pub const MAX_PORT_FORWARDS: usize = 8;

// ---------- accounts and tokens: in [`super::accounts`] ----------

pub use super::accounts::*;
pub use super::groups::*;

// ---------- hosts ----------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GpuDevice {
    /// The model as NVML names it (`NVIDIA H100 80GB HBM3`); flavors match
    /// it through the GPU alias table.
    pub model: String,
    pub pci: PciAddress,
    /// NVML's UUID (`GPU-...`), when NVML could read it.
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// The host NUMA node the GPU hangs off.
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// Its health on the host (default: healthy, for hosts registered by
    /// hand).
    #[serde(default)]
    pub health: GpuHealth,
    /// The instance the host has it passed through to.
    #[serde(default)]
    pub instance: Option<InstanceId>,
}

impl GpuDevice {
    /// A healthy, idle GPU known only by model and address.
    pub fn new(model: impl Into<String>, pci: PciAddress) -> Self {
        Self {
            model: model.into(),
            pci,
            uuid: None,
            memory_bytes: None,
            numa_node: None,
            health: GpuHealth::Healthy,
            instance: None,
        }
    }
}

/// `POST /v1/admin/hosts`: pre-registers a host and its capacity (a host
/// normally joins itself with a join token; see [`crate::api::agent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterHost {
    pub name: String,
    /// Address tenants reach forwarded ports on (IP or DNS name).
    pub address: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    #[serde(default)]
    pub gpus: Vec<GpuDevice>,
    /// The host's region; default: the controller's `default_region`.
    #[serde(default)]
    pub region: Option<String>,
}

/// `POST /v1/admin/hosts/{id}/region`: moves a host (with no instances)
/// to another region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetHostRegion {
    pub region: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum HostHealth {
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuInfo {
    pub model: String,
    pub pci: PciAddress,
    /// The instance the controller booked it for.
    pub instance: Option<InstanceId>,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// Its health as the host last reported it.
    #[serde(default)]
    pub health: GpuHealth,
}

/// `POST /v1/admin/hosts/{id}/gpus/{pci}/clear`: puts a quarantined (or
/// lost) GPU back through the health gate; audited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClearGpu {
    /// Why the admin clears it (kept in the audit log).
    #[serde(default)]
    pub note: Option<String>,
}

/// One entry of the GPU alias table: a flavor's `gpu_model` of `alias`
/// matches GPUs whose NVML name is one of `models` (and a flavor's model
/// always matches a GPU of exactly that name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuAlias {
    pub alias: String,
    pub models: Vec<String>,
}

/// `PUT /v1/admin/gpu-aliases/{alias}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetGpuAlias {
    /// NVML model names (`NVIDIA H100 80GB HBM3`), at least one.
    pub models: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostInfo {
    pub id: HostId,
    pub name: String,
    pub address: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub used_vcpus: u32,
    pub used_memory_mib: u64,
    pub used_disk_gib: u64,
    pub gpus: Vec<GpuInfo>,
    pub health: HostHealth,
    /// What the host last said makes it unhealthy or degraded.
    #[serde(default)]
    pub problems: Vec<String>,
    pub cordoned: bool,
    pub draining: bool,
    pub last_heartbeat: DateTime<Utc>,
    pub instances: u64,
    /// The host's access subnet (its instances' addresses come from it).
    #[serde(default)]
    pub access_subnet: Option<String>,
    /// The host's HTTPS name suffix (`<guest_port>-<instance>.<domain>`).
    #[serde(default)]
    pub domain: Option<String>,
    /// The port of the host's shared HTTPS listener.
    #[serde(default)]
    pub https_port: Option<u16>,
    /// The host's region (controller-owned: set by its join token or an
    /// admin).
    #[serde(default)]
    pub region: String,
    /// When an admin revoked the host's credential; it is refused until it
    /// joins again with a new join token.
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
}

/// `PUT /v1/admin/hosts/{id}/certificate`: the operator's certificate for
/// the host's HTTPS proxy (it should cover `*.<domain>` and the host's
/// address), replacing the one the controller's CA issued. `DELETE` goes
/// back to the CA's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetHostCertificate {
    /// Leaf first, then intermediates (PEM).
    pub cert_chain_pem: String,
    /// The leaf's private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key_pem: Secret,
}

// ---------- flavors and images ----------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateFlavor {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub root_disk_gib: u64,
    #[serde(default)]
    pub gpu_model: Option<String>,
    #[serde(default)]
    pub gpu_count: u32,
    pub price_micros_per_hour: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FlavorInfo {
    pub id: FlavorId,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub root_disk_gib: u64,
    pub gpu_model: Option<String>,
    pub gpu_count: u32,
    pub price_micros_per_hour: i64,
}

/// `POST /v1/admin/images`: a base image every account may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    pub name: String,
    pub size_gib: u64,
    /// Where hosts get the image; an image without one cannot be booted.
    #[serde(default)]
    pub origin: Option<ImageOrigin>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageInfo {
    pub id: ImageId,
    pub name: String,
    pub size_gib: u64,
    /// Set for images made from a snapshot (private to that account).
    pub account: Option<AccountId>,
    pub source_snapshot: Option<SnapshotId>,
    pub created_at: DateTime<Utc>,
}

// ---------- instances ----------

/// Scheduler weighing for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Fill partly used hosts first (keeps whole hosts free for big jobs).
    #[default]
    Pack,
    /// Prefer the emptiest host.
    Spread,
}

/// `POST /v1/instances`: exactly one of `image` and `snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    pub name: String,
    pub flavor: FlavorId,
    #[serde(default)]
    pub image: Option<ImageId>,
    #[serde(default)]
    pub snapshot: Option<SnapshotId>,
    /// An existing, unattached volume of the account.
    #[serde(default)]
    pub data_volume: Option<VolumeId>,
    /// Extra guest TCP ports to forward (SSH on 22 and JupyterLab on 8888,
    /// over HTTPS, always are).
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub placement: Option<Placement>,
    /// Admins create instances for an account; tenants leave this out.
    #[serde(default)]
    pub account: Option<AccountId>,
    /// The region to place it in; default: the snapshot's region when
    /// created from a snapshot (or its image), else the controller's
    /// `default_region`.
    #[serde(default)]
    pub region: Option<String>,
    /// A network group of the account to put the instance in (a second
    /// NIC on the group's private network).
    #[serde(default)]
    pub network_group: Option<crate::ids::NetworkGroupId>,
}

/// One port forward of an instance (the Access tab's rows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PortForwardInfo {
    pub id: ForwardId,
    pub protocol: Protocol,
    pub guest_port: u16,
    pub host_port: u16,
    /// Served over HTTPS by the host's proxy (the browser connection is
    /// encrypted; the guest port speaks plain HTTP).
    pub https: bool,
    pub label: String,
    /// `https://<address>:<host_port>/`, `tcp://<address>:<host_port>` or
    /// `udp://<address>:<host_port>`.
    pub url: String,
    /// `https://<guest_port>-<instance>.<domain>/` where the host has a
    /// domain (wildcard DNS).
    #[serde(default)]
    pub domain_url: Option<String>,
}

/// `POST /v1/instances/{id}/forwards` ("New Port Forwarding").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateForward {
    /// The service port inside the instance.
    pub guest_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// Serve it over HTTPS (web services such as JupyterLab or dashboards).
    #[serde(default)]
    pub https: bool,
    #[serde(default)]
    pub label: String,
}

/// `PATCH /v1/instances/{id}/forwards/{forward}` ("Edit"): fields left out
/// stay as they are. The host port stays unless the protocol changes and
/// the same port is taken for the new one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateForward {
    #[serde(default)]
    pub guest_port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub https: Option<bool>,
    #[serde(default)]
    pub label: Option<String>,
}

/// `POST /v1/ssh-keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSshKey {
    pub name: String,
    /// One OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
    pub public_key: String,
    /// Admins add keys for an account; tenants leave this out.
    #[serde(default)]
    pub account: Option<AccountId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SshKeyInfo {
    pub id: SshKeyId,
    pub account: AccountId,
    pub name: String,
    pub public_key: String,
    /// `SHA256:<base64>`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/instances/{id}/password` (each reveal is audited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PasswordView {
    pub user: String,
    pub password: String,
}

/// One row of `GET /v1/instances`, and the answer to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceSummary {
    pub id: InstanceId,
    pub name: String,
    pub account: AccountId,
    /// `Running`, `Snapshotting`, `Released`, ... (see `InstanceState::status`).
    pub status: String,
    pub state: InstanceState,
    pub flavor: FlavorId,
    pub host: Option<HostId>,
    pub cost_micros: i64,
    pub allowed_actions: Vec<Action>,
    pub created_at: DateTime<Utc>,
    /// The region it was created in.
    #[serde(default)]
    pub region: String,
    /// How far the operation in flight has come, in percent (a snapshot
    /// being saved, a create copying its image, a move), once its host
    /// has taken it up; absent when none runs. In the list only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_percent: Option<u8>,
}

/// `GET /v1/instances/{id}/access`: the Access tab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccessView {
    pub host_address: Option<String>,
    /// The instance's address on the host's access network.
    pub private_ip: Option<String>,
    /// Always `root`.
    pub ssh_user: String,
    /// Ready to paste: `ssh -p <port> root@<address>`.
    pub ssh_command: Option<String>,
    /// Whether the instance has an initial password (reveal it with
    /// `GET /v1/instances/{id}/password`).
    pub password_set: bool,
    /// The shareable JupyterLab link, token included.
    pub jupyter_url: Option<String>,
    pub forwards: Vec<PortForwardInfo>,
    /// Where to download the CA certificate that signs the HTTPS links.
    pub ca_certificate_path: String,
}

/// `GET /v1/instances/{id}/billing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BillingView {
    pub price_micros_per_hour: i64,
    pub billed_seconds: u64,
    pub cost_micros: i64,
    pub account_credit_micros: i64,
}

/// `GET /v1/instances/{id}/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigView {
    pub name: String,
    pub flavor: FlavorId,
    pub flavor_name: String,
    pub image: Option<ImageId>,
    pub snapshot: Option<SnapshotId>,
    pub root_disk_gib: u64,
    pub data_volume: Option<VolumeId>,
    pub created_at: DateTime<Utc>,
    /// Buckets attached as directories (docs/buckets.md).
    #[serde(default)]
    pub buckets: Vec<crate::buckets::BucketAttachmentInfo>,
}

/// `GET /v1/instances/{id}/hardware`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HardwareView {
    pub host: Option<HostId>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub root_disk_gib: u64,
    pub gpu_model: Option<String>,
    pub gpus: Vec<PciAddress>,
    /// Each GPU's model, UUID and health as its host reports them.
    #[serde(default)]
    pub gpu_devices: Vec<GpuInfo>,
}

/// `POST /v1/instances/{id}/actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum InstanceAction {
    // Empty struct variants (not unit ones) so unknown fields are refused.
    Start {},
    Stop {},
    Reboot {},
    ForceReboot {},
    /// Pause the guest, memory kept (not billed while Suspended).
    Suspend {},
    Resume {},
    ChangeType {
        flavor: FlavorId,
    },
    GrowDisk {
        root_disk_gib: u64,
    },
    Release {},
}

impl InstanceAction {
    pub fn action(&self) -> Action {
        match self {
            Self::Start {} => Action::Start,
            Self::Stop {} => Action::Stop,
            Self::Reboot {} => Action::Reboot,
            Self::ForceReboot {} => Action::ForceReboot,
            Self::Suspend {} => Action::Suspend,
            Self::Resume {} => Action::Resume,
            Self::ChangeType { .. } => Action::ChangeType,
            Self::GrowDisk { .. } => Action::GrowDisk,
            Self::Release {} => Action::Release,
        }
    }
}

/// `POST /v1/instances/batch`: one action on many instances, e.g.
/// `{"instances": [...], "request": {"action": "stop"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BatchAction {
    pub instances: Vec<InstanceId>,
    pub request: InstanceAction,
}

/// One instance's outcome in a batch: an operation, or the error sentence
/// and the HTTP status it would have had alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchResult {
    pub instance: InstanceId,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub use super::fleet::*;
pub use crate::operation::{OperationKind, OperationState};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OperationInfo {
    pub id: OperationId,
    pub kind: OperationKind,
    pub instance: Option<InstanceId>,
    pub state: OperationState,
    pub progress_percent: u8,
    pub error: Option<String>,
    /// A sentence about a successful outcome (e.g. a password reset that
    /// applies at the next boot).
    #[serde(default)]
    pub note: Option<String>,
    pub created_at: DateTime<Utc>,
}

// ---------- snapshots ----------

/// `POST /v1/instances/{id}/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Release the instance once the snapshot is saved.
    #[serde(default)]
    pub auto_release: bool,
    /// Also publish the snapshot as a (private) image.
    #[serde(default)]
    pub as_image: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub account: AccountId,
    pub instance: InstanceId,
    pub name: String,
    pub description: String,
    pub status: SnapshotStatus,
    pub auto_release: bool,
    pub as_image: bool,
    pub logical_bytes: u64,
    pub compressed_bytes: u64,
    pub operation: Option<OperationId>,
    /// Why the snapshot failed.
    #[serde(default)]
    pub error: Option<String>,
    /// How far its operation has got while Creating (0 to 100); 100 once
    /// Success; where it stopped once Failed.
    #[serde(default)]
    pub progress_percent: u8,
    /// Once saved: whether the guest's filesystems were frozen through its
    /// guest agent (`true`), or the snapshot is crash-consistent (`false`).
    #[serde(default)]
    pub frozen: Option<bool>,
    pub created_at: DateTime<Utc>,
    /// Whether an instance can be created from it now: false until it is
    /// Success, and when no live host reads the store that holds it (a
    /// host-local store whose host is removed, revoked or down).
    #[serde(default = "yes")]
    pub available: bool,
    /// Why it is not available, in a sentence.
    #[serde(default)]
    pub unavailable_reason: Option<String>,
    /// The region it lives in (its instance's); instances are created from
    /// it in this region only.
    #[serde(default)]
    pub region: String,
}

fn yes() -> bool {
    true
}

// ---------- usage ----------

/// What a usage record charges for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum UsageKind {
    /// Time an instance spent Running: `quantity` in ms, `price_micros`
    /// per hour.
    Instance,
    /// Snapshot storage: `quantity` in byte-ms (the account's deduplicated
    /// bytes integrated over the time since its last charge; a charge
    /// above `i64::MAX` byte-ms comes as several records), `price_micros`
    /// per TB-hour (TB = 10^12 bytes).
    Snapshot,
    /// Data volume storage: `quantity` in GiB-ms (the account's placed
    /// volumes' GiB integrated over the time since its last charge),
    /// `price_micros` per GiB-hour.
    Volume,
}

/// One row of `GET /v1/usage`: a charge against the account's credit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageRecord {
    pub account: AccountId,
    pub instance: Option<InstanceId>,
    pub kind: UsageKind,
    pub quantity: i64,
    pub price_micros: i64,
    pub amount_micros: i64,
    pub at: DateTime<Utc>,
}

// ---------- audit ----------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// Token id, `bootstrap-admin`, or `anonymous`.
    pub actor: String,
    pub account: Option<AccountId>,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// What the call said about itself (an admin's note on a GPU clear).
    #[serde(default)]
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_tagged_and_strict() {
        let a: InstanceAction =
            serde_json::from_str(r#"{"action":"grow-disk","root_disk_gib":80}"#).unwrap();
        assert_eq!(a, InstanceAction::GrowDisk { root_disk_gib: 80 });
        assert_eq!(a.action(), Action::GrowDisk);
        assert!(serde_json::from_str::<InstanceAction>(r#"{"action":"stop","x":1}"#).is_err());
        let b: BatchAction =
            serde_json::from_str(r#"{"instances":[],"request":{"action":"reboot"}}"#).unwrap();
        assert_eq!(b.request, InstanceAction::Reboot {});
        let e = serde_json::from_str::<BatchAction>(
            r#"{"instances":[],"request":{"action":"stop"},"x":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains('x'), "{e}");
    }

    #[test]
    fn snapshot_progress_and_reservations_are_additive() {
        let old = serde_json::json!({"id": SnapshotId::new(), "account": AccountId::new(),
            "instance": InstanceId::new(), "name": "s", "description": "",
            "status": "Creating", "auto_release": false, "as_image": false,
            "logical_bytes": 0, "compressed_bytes": 0, "operation": null,
            "created_at": "2026-01-01T00:00:00Z"});
        let s: SnapshotInfo = serde_json::from_value(old).unwrap();
        assert_eq!(s.progress_percent, 0);
        assert_eq!(serde_json::to_value(&s).unwrap()["progress_percent"], 0);
        let old = serde_json::json!({"id": AccountId::new(), "name": "a", "credit_micros": 0,
            "billing_profile_complete": true, "snapshot_quota_gib": 1,
            "snapshot_used_bytes": 2, "created_at": "2026-01-01T00:00:00Z"});
        let a: AccountInfo = serde_json::from_value(old).unwrap();
        assert_eq!((a.snapshot_used_bytes, a.snapshot_reserved_bytes), (2, 0));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<CreateSnapshot>(r#"{"name":"a","colour":1}"#).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
