//! The agent's state directory: where each file lives, and the versioned
//! records kept there.
//!
//! ```text
//! <state_dir>/
//!   agent-token                 local API token (0600)
//!   images/<image-id>/          image.json, disk.qcow2, vmlinuz, initrd.img
//!   instances/<instance-id>/    instance.json, root.qcow2 and top-<n>.qcow2 (the root
//!                               disk's layers), console.{sock,log}, exec.sock,
//!                               seed.iso (NoCloud seed, 0600), qga.sock (guest agent),
//!                               metrics.sock (the guest exporter's channel)
//!   access.json                 the controller's access state (crate::net)
//!   tls.json                    the HTTPS front's certificate and key (0600, crate::net)
//!   volumes/<volume-id>.qcow2   data volumes, with volumes/<volume-id>.json
//!   usage/<instance-id>.json    Running-time counters (crate::usage)
//!   controller.json             controller credential (0600, crate::link)
//!   controller-ops/<op-id>.json journal of controller operations
//! ```
//!
//! Record files are JSON envelopes (see [`crate::fsutil`]) with these magics,
//! all at version 1: `gantry-instance`, `gantry-image`, `gantry-volume`.

use crate::fsutil::{self, FsError};
use gantry_proto::spec::InstanceSpec;
use gantry_proto::{ImageId, InstanceId, InstanceState, VolumeId};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const INSTANCE_MAGIC: &str = "gantry-instance";
pub const INSTANCE_VERSION: u32 = 1;
pub const IMAGE_MAGIC: &str = "gantry-image";
pub const IMAGE_VERSION: u32 = 1;
pub const VOLUME_MAGIC: &str = "gantry-volume";
pub const VOLUME_VERSION: u32 = 1;

/// An instance as persisted by its agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub spec: InstanceSpec,
    pub state: InstanceState,
    /// Whether this agent created the data volume as part of creating the
    /// instance (a failed create then deletes it again).
    #[serde(default)]
    pub created_volume: bool,
    #[serde(default)]
    pub last_error: Option<String>,
    /// The root disk's layers ([`crate::snapshots::chain`]).
    #[serde(default)]
    pub chain: crate::snapshots::chain::DiskChain,
}

/// A cached image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: ImageId,
    pub name: String,
    pub virtual_size: u64,
    /// blake3 of disk.qcow2.
    pub checksum: String,
    pub has_kernel: bool,
    pub has_initrd: bool,
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// A data volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub size_bytes: u64,
    #[serde(default)]
    pub attached_to: Option<InstanceId>,
}

/// Longest path a unix socket may have (`sun_path` is 108 bytes with its
/// NUL).
pub const SOCKET_PATH_MAX: usize = 107;
/// Longest state directory whose instance sockets
/// (`<state_dir>/instances/ins-<32 hex>/console.sock`, `metrics.sock`,
/// the longest names) still fit [`SOCKET_PATH_MAX`].
pub const STATE_DIR_MAX_FOR_SOCKETS: usize =
    SOCKET_PATH_MAX - "/instances/ins-0190b4c2e7a47c3a9d2b8f1e4a6c0d12/metrics.sock".len();

/// Whether `p` fits in a unix socket address.
pub fn socket_path_fits(p: &Path) -> bool {
    p.as_os_str().len() <= SOCKET_PATH_MAX
}

/// A record read from disk, or the path that could not be read and why.
pub type LoadedRecord = Result<InstanceRecord, (PathBuf, FsError)>;

/// Paths under the state directory, all derived from validated ids.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Creates the directory tree; QEMU's user must traverse it (0711).
    pub fn create(&self) -> Result<(), FsError> {
        for d in [
            self.root.clone(),
            self.images_dir(),
            self.instances_dir(),
            self.volumes_dir(),
        ] {
            fsutil::create_dir(&d, 0o711)?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn token_file(&self) -> PathBuf {
        self.root.join("agent-token")
    }
    /// Running-time counters ([`crate::usage`]).
    pub fn usage_dir(&self) -> PathBuf {
        self.root.join("usage")
    }
    /// The controller credential ([`crate::link`]).
    pub fn controller_file(&self) -> PathBuf {
        self.root.join("controller.json")
    }
    /// The journal of controller operations ([`crate::link`]).
    pub fn controller_ops_dir(&self) -> PathBuf {
        self.root.join("controller-ops")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn instances_dir(&self) -> PathBuf {
        self.root.join("instances")
    }
    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }
    pub fn image_dir(&self, id: ImageId) -> PathBuf {
        self.images_dir().join(id.to_string())
    }
    pub fn instance_dir(&self, id: InstanceId) -> PathBuf {
        self.instances_dir().join(id.to_string())
    }
    pub fn instance_record(&self, id: InstanceId) -> PathBuf {
        self.instance_dir(id).join("instance.json")
    }
    /// The first layer of the root disk (on the image).
    pub fn root_disk(&self, id: InstanceId) -> PathBuf {
        self.instance_dir(id)
            .join(crate::snapshots::chain::ROOT_LAYER)
    }
    /// A layer of the root disk, by file name (see
    /// [`crate::snapshots::chain::DiskChain`]).
    pub fn layer(&self, id: InstanceId, name: &str) -> PathBuf {
        self.instance_dir(id).join(name)
    }
    /// The layer the guest writes to.
    pub fn active_disk(&self, rec: &InstanceRecord) -> PathBuf {
        self.layer(rec.spec.id, rec.chain.active_layer())
    }
    pub fn console_socket(&self, id: InstanceId) -> PathBuf {
        self.instance_dir(id).join("console.sock")
    }
    pub fn console_log(&self, id: InstanceId) -> PathBuf {
        self.instance_dir(id).join("console.log")
    }
    /// The NoCloud seed disk ([`crate::net::seed`]).
    pub fn seed_disk(&self, id: InstanceId) -> PathBuf {
        self.instance_dir(id).join("seed.iso")
    }
    /// The qemu-guest-agent channel.
    pub fn guest_agent_socket(&self, id: InstanceId) -> PathBuf {
        self.instance_dir(id).join("qga.sock")
    }
    pub fn exec_socket(&self, id: InstanceId) -> PathBuf {
        self.instance_dir(id).join("exec.sock")
    }
    /// The guest exporter's virtio-serial channel
    /// ([`gantry_proto::metrics::GUEST_CHANNEL_NAME`]; QEMU listens, the
    /// agent's [`crate::monitor::guest::GuestChannels`] connects). At most
    /// [`SOCKET_PATH_MAX`] bytes while the state directory is at most
    /// [`STATE_DIR_MAX_FOR_SOCKETS`] bytes long.
    pub fn metrics_socket(&self, id: InstanceId) -> PathBuf {
        self.instance_dir(id).join("metrics.sock")
    }
    pub fn volume_disk(&self, id: VolumeId) -> PathBuf {
        self.volumes_dir().join(format!("{id}.qcow2"))
    }
    pub fn volume_record(&self, id: VolumeId) -> PathBuf {
        self.volumes_dir().join(format!("{id}.json"))
    }

    pub fn save_instance(&self, r: &InstanceRecord) -> Result<(), FsError> {
        fsutil::write_state(
            &self.instance_record(r.spec.id),
            INSTANCE_MAGIC,
            INSTANCE_VERSION,
            r,
        )
    }

    pub fn save_volume(&self, r: &VolumeRecord) -> Result<(), FsError> {
        fsutil::write_state(&self.volume_record(r.id), VOLUME_MAGIC, VOLUME_VERSION, r)
    }

    pub fn load_volume(&self, id: VolumeId) -> Result<Option<VolumeRecord>, FsError> {
        let p = self.volume_record(id);
        if !p.exists() {
            return Ok(None);
        }
        fsutil::read_state(&p, VOLUME_MAGIC, VOLUME_VERSION).map(Some)
    }

    /// Every instance record on disk. Directories without a readable record
    /// are reported, not guessed at.
    pub fn load_instances(&self) -> Result<Vec<LoadedRecord>, FsError> {
        let mut out = Vec::new();
        for e in read_dir_sorted(&self.instances_dir())? {
            let Some(id) = e
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<InstanceId>().ok())
            else {
                continue;
            };
            let p = self.instance_record(id);
            out.push(
                fsutil::read_state(&p, INSTANCE_MAGIC, INSTANCE_VERSION)
                    .map_err(|err| (e.clone(), err)),
            );
        }
        Ok(out)
    }

    pub fn load_images(&self) -> Result<Vec<ImageRecord>, FsError> {
        let mut out = Vec::new();
        for e in read_dir_sorted(&self.images_dir())? {
            let p = e.join("image.json");
            if p.exists() {
                out.push(fsutil::read_state(&p, IMAGE_MAGIC, IMAGE_VERSION)?);
            }
        }
        Ok(out)
    }

    pub fn load_volumes(&self) -> Result<Vec<VolumeRecord>, FsError> {
        let mut out = Vec::new();
        for e in read_dir_sorted(&self.volumes_dir())? {
            if e.extension().is_some_and(|x| x == "json") {
                out.push(fsutil::read_state(&e, VOLUME_MAGIC, VOLUME_VERSION)?);
            }
        }
        Ok(out)
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, FsError> {
    let rd = std::fs::read_dir(dir).map_err(fsutil::io_err("read dir", dir))?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_sockets_fit_a_unix_address_under_the_default_state_dir() {
        let id = InstanceId::new();
        let l = Layout::new("/var/lib/gantry");
        for p in [
            l.metrics_socket(id),
            l.console_socket(id),
            l.exec_socket(id),
            l.guest_agent_socket(id),
        ] {
            // Well under: 75 of 107 bytes.
            assert!(p.as_os_str().len() <= 80, "{}", p.display());
            assert!(socket_path_fits(&p));
        }
        assert_eq!(STATE_DIR_MAX_FOR_SOCKETS, 47);
        let longest = Layout::new(format!("/{}", "d".repeat(STATE_DIR_MAX_FOR_SOCKETS - 1)));
        assert!(socket_path_fits(&longest.metrics_socket(id)));
        assert!(socket_path_fits(&longest.console_socket(id)));
        let too_long = Layout::new(format!("/{}", "d".repeat(STATE_DIR_MAX_FOR_SOCKETS)));
        assert!(!socket_path_fits(&too_long.metrics_socket(id)));
    }
}
