//! Snapshots of instances into the host's snapshot store, and images made
//! from snapshots.
//!
//! Take Snapshot: Running -> Suspending (the guest is paused) -> Paused
//! (QEMU flushes the root disk and switches the guest to a temporary
//! external overlay, so the root layer is consistent and read-only) ->
//! Saving (the root disk and its backing chain are written to the store;
//! the data volume never is) -> the overlay is committed back and the guest
//! resumes (Running), or is released (`auto_release`). Any failure commits
//! the overlay back, resumes the guest and ends in Running.
//!
//! The store publishes at a fast zstd level, which keeps the guest's pause
//! short; a background thread (one at a time, at low priority and on one
//! core) then recompresses the new chunks at the level at rest
//! (`Store::compact`). The operation reports the sizes at publish; the next
//! heartbeat after a compaction carries the snapshots' new sizes, and the
//! store usage in heartbeats, which billing uses, follows too.

use crate::hypervisor::{Commit, Power};
use crate::disks;
use crate::images;
use crate::layout::ImageRecord;
use crate::manager::{domain_name, Manager, ManagerError};
use gantry_proto::api::agent::SnapshotSize;
use gantry_proto::api::local::{
    ImageFromSnapshot, ImageInfo, OperationInfo, SnapshotResult, TakeSnapshot,
};
use gantry_proto::validate::{self, ValidationError};
use gantry_proto::{Action, InstanceId, InstanceState, OperationId, SnapshotId};
use gantry_store::backend::BackendError;
use gantry_store::{CreateRequest, Keyring, Progress, RestoreFormat, Store, StoreConfig};
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
const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot store: {0}")]
    Store(#[from] gantry_store::StoreError),
    #[error("snapshot store keys: {0}")]
    Keys(String),
}

impl Manager {
    /// Opens the host's store (created on first use).
    pub fn open_store(&self) -> Result<Store, SnapshotError> {
        let keyring = Keyring::load(&self.cfg.store_keyring_path())
            .map_err(|e| SnapshotError::Keys(e.to_string()))?;
        let cfg = StoreConfig {
            keyring: Arc::new(keyring),
            create_if_missing: true,
            ..StoreConfig::default()
        };
        Ok(Store::open(&self.cfg.snapshot_store_url(), cfg)?)
    }

    /// Opens the host's store only if it exists already (`None` if not).
    pub fn open_existing_store(&self) -> Result<Option<Store>, SnapshotError> {
        let keyring = Keyring::load(&self.cfg.store_keyring_path())
            .map_err(|e| SnapshotError::Keys(e.to_string()))?;
        let cfg = StoreConfig {
            keyring: Arc::new(keyring),
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

    fn run_snapshot(
        &self,
        id: InstanceId,
        req: TakeSnapshot,
        snapshot_id: Option<SnapshotId>,
        op: OperationId,
    ) -> Result<(), ManagerError> {
        let name = domain_name(id);
        self.record(id)?.state.check_action(Action::Snapshot)?;
        self.set_state(id, InstanceState::Snapshotting)?;
        let saved = self.pause_and_save(id, &req, snapshot_id, op);
        match saved {
            Ok(result) => {
                if let Some(o) = self.lock().ops.get_mut(&op) {
                    o.snapshot = Some(result);
                }
                self.set_state(id, InstanceState::Running)?;
                if req.auto_release {
                    self.release(id, false)
                } else {
                    self.virt.power(&name, Power::Resume)?;
                    Ok(())
                }
            }
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "snapshot failed; resuming the guest");
                if let Err(re) = self.virt.power(&name, Power::Resume) {
                    tracing::error!(instance = %id, error = %re, "cannot resume after a failed snapshot");
                }
                self.set_state(id, InstanceState::Running)?;
                Err(e)
            }
        }
    }

    fn pause_and_save(
        &self,
        id: InstanceId,
        req: &TakeSnapshot,
        snapshot_id: Option<SnapshotId>,
        op: OperationId,
    ) -> Result<SnapshotResult, ManagerError> {
        let name = domain_name(id);
        self.virt.power(&name, Power::Suspend)?;
        self.progress(op, 5);
        let overlay = self.layout.instance_dir(id).join("root.snapshot.qcow2");
        let _ = std::fs::remove_file(&overlay);
        self.virt.disk_snapshot(&name, "vda", &overlay)?;
        let saved = self.save_root(id, req, snapshot_id, op);
        // Whatever the store said, fold the overlay back into root.qcow2 and
        // keep the persistent definition pointing at it.
        let merged = self.virt.block_commit(&name, "vda", Commit::Active, COMMIT_TIMEOUT);
        if merged.is_ok() {
            let _ = std::fs::remove_file(&overlay);
        }
        let spec = self.record(id)?.spec;
        self.virt.define(&name, &self.domain_def(&spec)?.to_xml())?;
        let result = saved?;
        merged?;
        Ok(result)
    }

    fn save_root(
        &self,
        id: InstanceId,
        req: &TakeSnapshot,
        snapshot_id: Option<SnapshotId>,
        op: OperationId,
    ) -> Result<SnapshotResult, ManagerError> {
        let store = self.open_store()?;
        let root = self.layout.root_disk(id);
        let wanted = snapshot_id.map(|s| s.to_string());
        let progress = |p: Progress| {
            if let Some(part) = (p.done * 85).checked_div(p.total) {
                self.progress(op, (10 + part) as u8);
            }
        };
        let info = store
            .create(&CreateRequest {
                image: &root,
                name: &req.name,
                owner: req.owner.as_deref(),
                parent: None,
                changed_extents: None,
                progress: Some(&progress),
                id: wanted.as_deref(),
            })
            .map_err(SnapshotError::from)?;
        let snapshot_id = info.id.parse().map_err(|_| {
            SnapshotError::Keys(format!("store returned a bad snapshot id {}", info.id))
        })?;
        Ok(SnapshotResult {
            id: snapshot_id,
            logical_size: info.logical_size,
            stored_bytes: info.stored_bytes,
            new_bytes: info.new_bytes,
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
