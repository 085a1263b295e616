//! The agent's local operator API (`gantry-agent serve` answers it on
//! 127.0.0.1; `gantry-agent instance ...` calls it). Every call needs the
//! agent's local bearer token. Long operations answer `202` with an
//! [`OperationInfo`] at once; `GET /v1/operations/{id}` reports its state and
//! progress.

use crate::ids::{ImageId, InstanceId, OperationId, SnapshotId, VolumeId};
use crate::instance::{Action, InstanceState};
use crate::spec::InstanceSpec;
use serde::{Deserialize, Serialize};

/// `POST /v1/images`: import a disk image file from this host into the
/// agent's image cache (converted to qcow2 and checksummed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    #[serde(default)]
    pub id: Option<ImageId>,
    pub name: String,
    /// Path of a raw or qcow2 disk on the agent's host.
    pub disk: String,
    /// Direct kernel boot: kernel, initrd and command line. Without a kernel
    /// the disk's own boot loader is used.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub id: ImageId,
    pub name: String,
    pub virtual_size: u64,
    pub direct_boot: bool,
    /// blake3 of the cached qcow2, checked before each use.
    pub checksum: String,
}

/// `POST /v1/images/from-snapshot`: restore a snapshot from the host's
/// store into the image cache (checksummed), so instances can boot from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFromSnapshot {
    #[serde(default)]
    pub id: Option<ImageId>,
    pub name: String,
    pub snapshot: SnapshotId,
    /// Copy direct-boot kernel, initrd and command line from this image
    /// (images that boot from their own disk need none).
    #[serde(default)]
    pub boot_like: Option<ImageId>,
}

/// `POST /v1/instances/{id}/snapshot`: snapshot the root disk (never the
/// data volume) into the host's store. A running instance is Snapshotting
/// only while its root disk switches to a fresh overlay, then Running while
/// the snapshot saves; with `auto_release` it is stopped first, saved from
/// its disk and released. On failure it is as it was before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeSnapshot {
    pub name: String,
    /// The account that owns it (its chunks are keyed per account);
    /// none means the public namespace.
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub auto_release: bool,
}

/// What a finished snapshot operation produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotResult {
    pub id: SnapshotId,
    /// Guest-visible size of the root disk.
    pub logical_size: u64,
    /// Compressed bytes of the distinct chunks it references.
    pub stored_bytes: u64,
    /// Compressed bytes this snapshot added to the store.
    pub new_bytes: u64,
    /// Bytes of the disk it read (only what changed since the snapshot
    /// or image below it, when that is known).
    #[serde(default)]
    pub read_bytes: u64,
    /// Whether the guest's filesystems were frozen through its guest agent
    /// for the switch (else the snapshot is crash-consistent).
    #[serde(default)]
    pub frozen: bool,
    /// How long the guest was paused (a running instance; ms).
    #[serde(default)]
    pub pause_ms: Option<u64>,
}

/// Which disk of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    Root,
    Data,
}

/// `POST /v1/instances/{id}/actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ActionRequest {
    Start,
    Stop {
        /// Seconds to wait for the guest's ACPI shutdown before destroying it.
        #[serde(default)]
        timeout_secs: Option<u64>,
    },
    Reboot,
    ForceReboot,
    Suspend,
    Resume,
    ChangeType {
        vcpus: u32,
        memory_mib: u64,
        /// The whole GPUs the instance has afterwards (attached and
        /// detached to match); `None` leaves them as they are.
        #[serde(default)]
        gpus: Option<Vec<crate::validate::PciAddress>>,
        /// The root disk's size afterwards; it only grows (a smaller size
        /// leaves it as it is).
        #[serde(default)]
        root_disk_gib: Option<u64>,
    },
    GrowDisk {
        disk: DiskKind,
        size_gib: u64,
    },
    Release {
        /// Also delete the data volume (kept by default).
        #[serde(default)]
        delete_data_volume: bool,
    },
}

impl ActionRequest {
    pub fn action(&self) -> Action {
        match self {
            Self::Start => Action::Start,
            Self::Stop { .. } => Action::Stop,
            Self::Reboot => Action::Reboot,
            Self::ForceReboot => Action::ForceReboot,
            Self::Suspend => Action::Suspend,
            Self::Resume => Action::Resume,
            Self::ChangeType { .. } => Action::ChangeType,
            Self::GrowDisk { .. } => Action::GrowDisk,
            Self::Release { .. } => Action::Release,
        }
    }
}

/// An instance as the agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub spec: InstanceSpec,
    pub state: InstanceState,
    /// libvirt domain name (`gantry-<id>`).
    pub domain: String,
    /// Serial console, as a unix socket (`socat -,raw,echo=0 UNIX-CONNECT:PATH`),
    /// and the file it is logged to.
    pub console_socket: String,
    pub console_log: String,
    /// Root disk's virtual size in bytes.
    pub root_disk_bytes: u64,
    #[serde(default)]
    pub data_volume: Option<VolumeInfo>,
    /// Last error of a failed operation, if any.
    #[serde(default)]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub size_bytes: u64,
    pub path: String,
    /// The instance it is attached to, if any.
    #[serde(default)]
    pub attached_to: Option<InstanceId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

/// A long operation: returned at once, polled until it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationInfo {
    pub id: OperationId,
    pub instance: InstanceId,
    /// `create` or an [`Action`] name.
    pub kind: String,
    pub state: OperationState,
    /// 0 to 100.
    pub progress: u8,
    #[serde(default)]
    pub error: Option<String>,
    /// Set when a snapshot operation succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_requests_read_as_users_write_them() {
        let r: ActionRequest =
            serde_json::from_str(r#"{"action":"grow-disk","disk":"root","size_gib":8}"#).unwrap();
        assert_eq!(
            r,
            ActionRequest::GrowDisk {
                disk: DiskKind::Root,
                size_gib: 8
            }
        );
        assert_eq!(r.action(), Action::GrowDisk);
        let r: ActionRequest = serde_json::from_str(r#"{"action":"stop"}"#).unwrap();
        assert_eq!(r, ActionRequest::Stop { timeout_secs: None });
        assert!(serde_json::from_str::<ActionRequest>(r#"{"action":"explode"}"#).is_err());
    }
}
