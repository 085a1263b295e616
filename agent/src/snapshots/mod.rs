//! Snapshots of instances into the host's snapshot store, and images made
//! from snapshots.
//!
//! Take Snapshot ([`take`]) pauses a running guest only while its root disk
//! switches to a fresh overlay, then stores the frozen layer incrementally
//! (only what the guest wrote since the previous snapshot, on top of the
//! manifest of what lies below) while the guest runs on, and merges the
//! frozen layer down ([`chain`] has the layering and the phases). A stopped
//! instance is saved from its disk as it is; with `auto_release` a running
//! one is shut down cleanly first. A restarted agent finishes or undoes a
//! snapshot it was in the middle of ([`recover`]).
//!
//! The store writes new chunks at its level at rest. Where the agent is
//! configured to publish at a faster level (`store_publish_level`), a
//! background thread (one at a time, at low priority and on one core) then
//! recompresses the new chunks at the level at rest (`Store::compact`). The operation reports the sizes
//! at publish; the next heartbeat after a compaction carries the snapshots'
//! new sizes, and the store usage in heartbeats, which billing uses, follows
//! too. Garbage collection runs on a schedule ([`Manager::spawn_store_gc`]).

pub mod chain;
mod recover;
mod take;

use crate::disks;
use crate::images;
use crate::layout::ImageRecord;
use crate::manager::{Manager, ManagerError};
use gantry_proto::api::agent::SnapshotSize;
use gantry_proto::api::local::{ImageFromSnapshot, ImageInfo, OperationInfo, TakeSnapshot};
use gantry_proto::validate::{self, ValidationError};
use gantry_proto::{Action, InstanceId, SnapshotId};
use gantry_store::backend::BackendError;
use gantry_store::{Keyring, RestoreFormat, Store, StoreConfig};
use std::sync::Arc;
use std::time::Duration;

/// Nice value of the background compaction thread.
const COMPACTION_NICE: libc::c_int = 10;

/// Whether a background compaction runs, and whether another pass is due.
#[derive(Default)]
pub(crate) struct Compaction {
    state: std::sync::Mutex<CompactionState>,
}

#[derive(Default)]
struct CompactionState {
    running: bool,
    again: bool,
    /// Snapshot sizes after the last compaction, for the next heartbeat.
    sizes: Option<Vec<SnapshotSize>>,
}

impl Compaction {
    fn lock(&self) -> std::sync::MutexGuard<'_, CompactionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long committing the temporary overlay back may take.
pub(super) const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot store: {0}")]
    Store(#[from] gantry_store::StoreError),
    #[error("snapshot store keys: {0}")]
    Keys(String),
}

impl Manager {
    /// The host's keyring: managed by the controller when linked to one
    /// (see `link::keys`).
    fn keyring(&self) -> Result<Arc<Keyring>, SnapshotError> {
        let keyring = Keyring::load(&self.cfg.store_keyring_path())
            .map_err(|e| SnapshotError::Keys(e.to_string()))?;
        keyring.set_managed(self.cfg.controller.is_some());
        Ok(Arc::new(keyring))
    }

    /// Which store the host uses (for the controller); `None` while a
    /// local store does not exist yet, or when it cannot be read.
    pub fn store_identity(&self) -> Option<gantry_proto::api::agent::StoreIdentity> {
        match gantry_store::identity::identify(&self.cfg.snapshot_store_url()) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "cannot identify the snapshot store");
                None
            }
        }
    }

    /// Opens the host's store (created on first use).
    pub fn open_store(&self) -> Result<Store, SnapshotError> {
        let mut cfg = StoreConfig {
            keyring: self.keyring()?,
            create_if_missing: true,
            ..StoreConfig::default()
        };
        if let Some(l) = self.cfg.store_publish_level {
            cfg.publish_level = l;
        }
        Ok(Store::open(&self.cfg.snapshot_store_url(), cfg)?)
    }

    /// Opens the host's store only if it exists already (`None` if not).
    pub fn open_existing_store(&self) -> Result<Option<Store>, SnapshotError> {
        let cfg = StoreConfig {
            keyring: self.keyring()?,
            ..StoreConfig::default()
        };
        match Store::open(&self.cfg.snapshot_store_url(), cfg) {
            Ok(s) => Ok(Some(s)),
            Err(gantry_store::StoreError::Backend(
                BackendError::Missing(_) | BackendError::NotFound(_),
            )) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts compacting the host's store in the background unless a
    /// compaction runs already (it then runs once more when done).
    pub fn compact_store_soon(self: &Arc<Self>) {
        {
            let mut s = self.compaction.lock();
            if s.running {
                s.again = true;
                return;
            }
            s.running = true;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("store-compact".into())
            .spawn(move || loop {
                me.compact_store();
                let mut s = me.compaction.lock();
                if !s.again {
                    s.running = false;
                    break;
                }
                s.again = false;
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start store compaction");
            self.compaction.lock().running = false;
        }
    }

    /// One compaction pass on this thread, niced and on one worker.
    fn compact_store(&self) {
        // SAFETY: setpriority only changes this thread's nice value (Linux
        // keeps it per thread); failing leaves the thread at normal priority.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, COMPACTION_NICE);
        }
        let mut store = match self.open_existing_store() {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the store to compact it");
                return;
            }
        };
        store.set_threads(1);
        match store.compact(None) {
            Ok(r) if r.snapshots > 0 => {
                tracing::info!(
                    snapshots = r.snapshots,
                    before = r.bytes_before,
                    after = r.bytes_after,
                    "snapshot store compacted"
                );
                self.metrics
                    .store_compacted(r.bytes_before.saturating_sub(r.bytes_after));
                match store.list() {
                    Ok(list) => {
                        let sizes = list
                            .iter()
                            .filter_map(|i| {
                                Some(SnapshotSize {
                                    snapshot: i.id.parse().ok()?,
                                    compressed_bytes: i.stored_bytes,
                                })
                            })
                            .collect();
                        self.compaction.lock().sizes = Some(sizes);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot list the compacted store"),
                }
                self.changed.notify_one(); // report the smaller sizes soon
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "snapshot store compaction failed"),
        }
    }

    /// Snapshot sizes changed by a compaction and not yet reported.
    pub fn take_snapshot_sizes(&self) -> Option<Vec<SnapshotSize>> {
        self.compaction.lock().sizes.take()
    }

    /// Gives back sizes a failed heartbeat did not deliver (unless a newer
    /// compaction has replaced them meanwhile).
    pub fn return_snapshot_sizes(&self, sizes: Option<Vec<SnapshotSize>>) {
        let mut s = self.compaction.lock();
        if s.sizes.is_none() {
            s.sizes = sizes;
        }
    }

    /// Collects the store's garbage every `period` on its own thread (at
    /// low priority): chunks of deleted snapshots leave the disk, within
    /// the store's grace rules.
    pub fn spawn_store_gc(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("store-gc".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                let Some(m) = weak.upgrade() else { return };
                m.gc_store();
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the store's garbage collection");
        }
    }

    /// One garbage collection of the store; returns the bytes it freed.
    pub fn gc_store(&self) -> u64 {
        let store = match self.open_existing_store() {
            Ok(Some(s)) => s,
            Ok(None) => return 0,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the store to collect its garbage");
                return 0;
            }
        };
        match store.gc() {
            Ok(r) => {
                if r.deleted_chunks > 0 {
                    tracing::info!(
                        chunks = r.deleted_chunks,
                        bytes = r.deleted_bytes,
                        "snapshot store garbage collected"
                    );
                    self.changed.notify_one();
                }
                self.metrics.store_gc_reclaimed(r.deleted_bytes);
                r.deleted_bytes
            }
            Err(e) => {
                tracing::warn!(error = %e, "snapshot store garbage collection failed");
                0
            }
        }
    }

    /// The sizes of a snapshot the store has published, if it has.
    pub fn published_snapshot(
        &self,
        id: SnapshotId,
    ) -> Option<gantry_proto::api::agent::SnapshotSizes> {
        let store = self.open_existing_store().ok()??;
        let info = store
            .list()
            .ok()?
            .into_iter()
            .find(|i| i.id == id.to_string())?;
        Some(gantry_proto::api::agent::SnapshotSizes {
            logical_bytes: info.logical_size,
            compressed_bytes: info.stored_bytes,
            // The store does not record it: claim only crash consistency.
            frozen: false,
        })
    }

    /// Removes a snapshot from the host's store; an unknown one is already
    /// gone (success).
    pub fn delete_snapshot(&self, id: SnapshotId) -> Result<(), SnapshotError> {
        let Some(store) = self.open_existing_store()? else {
            return Ok(());
        };
        match store.delete(&id.to_string()) {
            Ok(()) | Err(gantry_store::StoreError::UnknownSnapshot(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts a snapshot of an instance's root disk.
    pub fn snapshot(
        self: &Arc<Self>,
        id: InstanceId,
        req: TakeSnapshot,
    ) -> Result<OperationInfo, ManagerError> {
        self.snapshot_as(id, req, None)
    }

    /// [`Manager::snapshot`], published under `snapshot_id` when given
    /// (the controller's id).
    pub fn snapshot_as(
        self: &Arc<Self>,
        id: InstanceId,
        req: TakeSnapshot,
        snapshot_id: Option<SnapshotId>,
    ) -> Result<OperationInfo, ManagerError> {
        validate::snapshot_name("name", &req.name)?;
        if let Some(o) = &req.owner {
            gantry_store::keys::validate_owner(o)
                .map_err(|e| ValidationError::new("owner", e.to_string()))?;
        }
        self.record(id)?.state.check_action(Action::Snapshot)?;
        let me = Arc::clone(self);
        self.submit(id, "snapshot", move |m, op| {
            let r = m.run_snapshot(id, req, snapshot_id, op);
            // A controller's snapshot is compacted once its outcome is
            // reported (see link::work), so the new sizes follow the report.
            if r.is_ok() && snapshot_id.is_none() {
                me.compact_store_soon();
            }
            r
        })
    }

    /// Restores a snapshot into the image cache, checksummed like an import.
    pub fn image_from_snapshot(&self, req: &ImageFromSnapshot) -> Result<ImageInfo, ManagerError> {
        validate::object_name("name", &req.name)?;
        let boot = req
            .boot_like
            .map(|b| images::open(&self.layout, b, false))
            .transpose()?;
        let id = req.id.unwrap_or_default();
        images::publish(
            &self.layout,
            id,
            |tmp| -> Result<ImageRecord, ManagerError> {
                let disk = tmp.join("disk.qcow2");
                let store = self.open_store()?;
                let info = store
                    .restore(&req.snapshot.to_string(), &disk, RestoreFormat::Qcow2, None)
                    .map_err(SnapshotError::from)?;
                disks::info(&disk, Some(disks::Format::Qcow2))?;
                let mut rec = ImageRecord {
                    id,
                    name: req.name.clone(),
                    virtual_size: info.logical_size,
                    checksum: images::hash_file(&disk)?,
                    has_kernel: false,
                    has_initrd: false,
                    cmdline: None,
                };
                if let Some(b) = &boot {
                    for (src, file) in [(&b.kernel, "vmlinuz"), (&b.initrd, "initrd.img")] {
                        if let Some(src) = src {
                            images::copy_into(src, &tmp.join(file))?;
                        }
                    }
                    rec.has_kernel = b.kernel.is_some();
                    rec.has_initrd = b.initrd.is_some();
                    rec.cmdline = b.record.cmdline.clone();
                }
                Ok(rec)
            },
        )
    }
}
