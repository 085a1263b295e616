//! Moving an instance between hosts, this host's side (the controller
//! chains the steps: see `controller/src/moves.rs`).
//!
//! - **Out** ([`Manager::move_out`]): a Stopped instance's root disk (the
//!   guest-visible data of its whole layer chain) and its data volume are
//!   saved into the snapshot store the hosts share, as store entries with
//!   ids the controller chose, in the owner's namespace. A retry finds the
//!   entries already published and is done.
//! - **In** ([`Manager::move_in`]): the data volume is restored from its
//!   entry (atomically; an unattached copy already here is replaced), then
//!   the instance is defined from the restored root disk, Stopped.
//! - **Cleanup**: the old host releases the instance and deletes its data
//!   volume (`ActionRequest::Release { delete_data_volume: true }`).

use crate::layout::VolumeRecord;
use crate::manager::{Manager, ManagerError};
use gantry_proto::api::local::OperationInfo;
use gantry_proto::spec::InstanceSpec;
use gantry_proto::{InstanceId, InstanceState, SnapshotId};
use gantry_store::{CreateRequest, RestoreFormat, Store, StoreError};
use std::path::Path;
use std::sync::Arc;

impl Manager {
    /// Saves Stopped instance `id` into the store for a move.
    pub fn move_out(
        &self,
        id: InstanceId,
        snapshot: SnapshotId,
        volume_snapshot: Option<SnapshotId>,
        owner: &str,
    ) -> Result<(), ManagerError> {
        let rec = self.record(id)?;
        if rec.state != InstanceState::Stopped {
            return Err(ManagerError::Conflict(format!(
                "instance {id} is {}; only a Stopped instance moves",
                rec.state
            )));
        }
        let store = self.open_store()?;
        let root = self.layout().active_disk(&rec);
        save(
            &store,
            &root,
            snapshot,
            owner,
            &format!("move of {id}: root disk"),
        )?;
        match (rec.spec.data_volume, volume_snapshot) {
            (Some(v), Some(sid)) => {
                let path = self.layout().volume_disk(v.id);
                save(
                    &store,
                    &path,
                    sid,
                    owner,
                    &format!("move of {id}: volume {}", v.id),
                )?;
            }
            (None, None) => {}
            (v, s) => {
                return Err(ManagerError::Conflict(format!(
                    "instance {id} has data volume {v:?} but the move carries {s:?}"
                )))
            }
        }
        tracing::info!(instance = %id, %snapshot, "saved for a move");
        Ok(())
    }

    /// Restores a moved instance's data volume, then defines the instance
    /// (Stopped) from `spec`, whose image the caller put in the cache.
    pub fn move_in(
        self: &Arc<Self>,
        spec: InstanceSpec,
        volume_snapshot: Option<SnapshotId>,
    ) -> Result<OperationInfo, ManagerError> {
        if let (Some(v), Some(sid)) = (spec.data_volume, volume_snapshot) {
            if let Some(vol) = self.layout().load_volume(v.id)? {
                if vol.attached_to.is_some_and(|i| i != spec.id) {
                    return Err(ManagerError::Conflict(format!(
                        "volume {} is attached to another instance here",
                        v.id
                    )));
                }
            }
            let store = self.open_store()?;
            let path = self.layout().volume_disk(v.id);
            store
                .restore(&sid.to_string(), &path, RestoreFormat::Qcow2, None)
                .map_err(crate::snapshots::SnapshotError::from)?;
            self.layout().save_volume(&VolumeRecord {
                id: v.id,
                size_bytes: v.size_gib * crate::disks::GIB,
                attached_to: None,
            })?;
        }
        self.create_stopped(spec)
    }
}

/// Publishes `path` as store entry `id` unless it is there already.
fn save(
    store: &Store,
    path: &Path,
    id: SnapshotId,
    owner: &str,
    name: &str,
) -> Result<(), ManagerError> {
    let sid = id.to_string();
    match store.manifest(&sid) {
        Ok(_) => return Ok(()),
        Err(StoreError::UnknownSnapshot(_)) => {}
        Err(e) => return Err(crate::snapshots::SnapshotError::from(e).into()),
    }
    store
        .create(&CreateRequest {
            image: path,
            name,
            owner: Some(owner),
            parent: None,
            changed_extents: None,
            progress: None,
            id: Some(&sid),
        })
        .map_err(crate::snapshots::SnapshotError::from)?;
    Ok(())
}
