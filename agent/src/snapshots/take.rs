//! Take Snapshot (see [`super::chain`] for the layering).
//!
//! Running instance: *Switching* — the instance is Snapshotting while its
//! filesystems are frozen through the guest agent (when it has one) and its
//! root disk switches to a fresh overlay, milliseconds; Running again.
//! *Saving* — the frozen layer's own extents are stored on top of the
//! manifest of what lies below it, while the guest runs on. *Merging* — the
//! frozen layer is committed into `root.qcow2` (never into the image). A
//! failure while switching or saving commits the fresh overlay back into the
//! frozen layer (the instance is as it was, nothing is published); a failed
//! merge leaves a valid, longer chain the next snapshot merges.
//!
//! Stopped instance (or `auto_release`, which shuts the guest down cleanly
//! first, so it is not billed while it saves): the active layer is stored as
//! it is, then released, or a fresh overlay is put on top so the next
//! snapshot stays incremental.

use super::chain::{image_manifest, DiskChain, Pending, Saved, SnapshotPhase, ROOT_LAYER};
use super::{SnapshotError, COMMIT_TIMEOUT};
use crate::disks;
use crate::hypervisor::{Commit, GuestCall};
use crate::libvirt::PowerState;
use crate::manager::{Manager, ManagerError};
use gantry_proto::api::local::{SnapshotResult, TakeSnapshot};
use gantry_proto::{Action, InstanceId, InstanceState, OperationId, SnapshotId};
use gantry_store::{CreateRequest, Extent, Progress, Store};
use std::path::Path;
use std::time::{Duration, Instant};

/// For tests that kill the agent mid-snapshot:
/// `GANTRY_FAILPOINT_SNAPSHOT=<Phase>:<ms>` makes a snapshot wait that
/// long right after its journal entered `Phase` (`Saving`, `Merging`).
fn failpoint(phase: SnapshotPhase) {
    let Ok(v) = std::env::var("GANTRY_FAILPOINT_SNAPSHOT") else {
        return;
    };
    if let Some((p, ms)) = v.split_once(':') {
        if p == phase.to_string() {
            if let Ok(ms) = ms.parse::<u64>() {
                tracing::warn!(%phase, ms, "failpoint: waiting");
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
    }
}

/// How long a clean shutdown before an auto-release snapshot may take.
const STOP_FOR_SNAPSHOT: Duration = Duration::from_secs(120);

impl Manager {
    pub(crate) fn run_snapshot(
        &self,
        id: InstanceId,
        req: TakeSnapshot,
        snapshot_id: Option<SnapshotId>,
        op: OperationId,
    ) -> Result<(), ManagerError> {
        let rec = self.record(id)?;
        rec.state.check_action(Action::Snapshot)?;
        let snap = snapshot_id.unwrap_or_default();
        let running = rec.state == InstanceState::Running;
        if running && req.auto_release {
            // Shut down cleanly first: not billed while it saves.
            self.stop_for_snapshot(id, op)?;
        }
        let result = if running && !req.auto_release {
            self.take_live(id, &req, snap, op)?
        } else {
            self.take_offline(id, &req, snap, op)?
        };
        if let Some(o) = self.lock().ops.get_mut(&op) {
            o.snapshot = Some(result);
        }
        if req.auto_release {
            self.release(id, false)?;
        }
        Ok(())
    }

    /// Journals the snapshot's phase in the instance record.
    fn set_phase(
        &self,
        id: InstanceId,
        f: impl FnOnce(&mut DiskChain),
    ) -> Result<DiskChain, ManagerError> {
        Ok(self.update_record(id, |r| f(&mut r.chain))?.chain)
    }

    fn advance(&self, id: InstanceId, to: SnapshotPhase) -> Result<(), ManagerError> {
        let mut err = None;
        self.set_phase(id, |c| {
            if let Some(p) = c.pending.as_mut() {
                match p.phase.transition(to) {
                    Ok(next) => p.phase = next,
                    Err(e) => err = Some(e),
                }
            }
        })?;
        if let Some(e) = err {
            return Err(ManagerError::Conflict(e));
        }
        failpoint(to);
        Ok(())
    }

    fn take_live(
        &self,
        id: InstanceId,
        req: &TakeSnapshot,
        snap: SnapshotId,
        op: OperationId,
    ) -> Result<SnapshotResult, ManagerError> {
        let name = self.domain_name(id);
        let mut chain = self.record(id)?.chain;
        let frozen = chain.active_layer().to_string();
        let fresh = chain.new_layer();
        let fresh_path = self.layout.layer(id, &fresh);
        let _ = std::fs::remove_file(&fresh_path);
        chain.pending = Some(Pending {
            snapshot: snap,
            phase: SnapshotPhase::Switching,
            frozen: frozen.clone(),
            active: fresh.clone(),
        });
        self.set_phase(id, |c| *c = chain.clone())?;
        gantry_crashpoint::hit("agent.snapshot.pending");
        let (switched, frozen_fs, pause) = self.switch(id, &fresh_path)?;
        if let Err(e) = switched {
            let _ = std::fs::remove_file(&fresh_path);
            self.set_phase(id, |c| c.pending = None)?;
            return Err(e.into());
        }
        self.set_phase(id, |c| c.active = Some(fresh.clone()))?;
        gantry_crashpoint::hit("agent.snapshot.switched");
        self.advance(id, SnapshotPhase::Saving)?;
        self.redefine(id)?;
        gantry_crashpoint::hit("agent.snapshot.saving");
        self.progress(op, 5);
        let saved = self.save_layer(id, req, snap, &frozen, &chain.saved, op);
        let info = match saved {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "snapshot failed; folding the fresh overlay back");
                self.undo_switch(id, &frozen, &fresh)?;
                return Err(e);
            }
        };
        gantry_crashpoint::hit("agent.snapshot.stored");
        self.set_phase(id, |c| c.saved = Saved::Snapshot { id: snap })?;
        self.advance(id, SnapshotPhase::Merging)?;
        gantry_crashpoint::hit("agent.snapshot.merging");
        self.progress(op, 92);
        self.merge_down(id, &name, &frozen, &fresh)?;
        gantry_crashpoint::hit("agent.snapshot.merged");
        self.set_phase(id, |c| c.pending = None)?;
        gantry_crashpoint::hit("agent.snapshot.done");
        Ok(SnapshotResult {
            frozen: frozen_fs,
            pause_ms: Some(pause.as_millis() as u64),
            ..info
        })
    }

    /// The instant the guest is paused: Snapshotting, freeze (if the guest
    /// has an agent), switch to `fresh`, thaw, Running. Returns the
    /// switch's result, whether filesystems were frozen, and the pause.
    #[allow(clippy::type_complexity)]
    fn switch(
        &self,
        id: InstanceId,
        fresh: &Path,
    ) -> Result<(Result<(), crate::libvirt::LibvirtError>, bool, Duration), ManagerError> {
        let name = self.domain_name(id);
        self.set_state(id, InstanceState::Snapshotting)?;
        let t0 = Instant::now();
        let frozen_fs = self.virt.guest_agent(&name, GuestCall::Freeze).is_ok();
        let switched = self.virt.disk_snapshot(&name, "vda", fresh);
        if frozen_fs {
            if let Err(e) = self.virt.guest_agent(&name, GuestCall::Thaw) {
                tracing::error!(instance = %id, error = %e, "cannot thaw the guest's filesystems");
            }
        }
        let pause = t0.elapsed();
        self.set_state(id, InstanceState::Running)?;
        self.metrics.snapshot_pause(pause);
        tracing::info!(instance = %id, pause_ms = pause.as_millis() as u64, frozen_fs, ok = switched.is_ok(), "snapshot switch");
        Ok((switched, frozen_fs, pause))
    }

    /// Folds `fresh` back into `frozen` (the guest pivots to it): the
    /// instance is as it was before the snapshot. Should that fail too,
    /// the chain stays longer and the next snapshot reads the whole disk.
    pub(super) fn undo_switch(
        &self,
        id: InstanceId,
        frozen: &str,
        fresh: &str,
    ) -> Result<(), ManagerError> {
        let name = self.domain_name(id);
        let undone = match self.virt.state(&name)? {
            PowerState::Running | PowerState::Paused => self
                .virt
                .block_commit(&name, "vda", Commit::Active, COMMIT_TIMEOUT)
                .map_err(ManagerError::from),
            _ => disks::commit(
                &self.layout.layer(id, fresh),
                &self.layout.layer(id, frozen),
            )
            .map_err(ManagerError::from),
        };
        match undone {
            Ok(()) => {
                self.set_phase(id, |c| {
                    c.active = (frozen != ROOT_LAYER).then(|| frozen.to_string());
                    c.pending = None;
                })?;
                let _ = std::fs::remove_file(self.layout.layer(id, fresh));
            }
            Err(e) => {
                tracing::error!(instance = %id, error = %e, "cannot fold the fresh overlay back; the next snapshot reads the whole disk");
                self.set_phase(id, |c| {
                    c.saved = Saved::Unknown;
                    c.pending = None;
                })?;
            }
        }
        self.redefine(id)
    }

    /// Commits every layer from `frozen` down to `root.qcow2` into it while
    /// the guest writes on `fresh`, and removes their files. A failure
    /// leaves a valid, longer chain (logged); the next merge takes it.
    pub(super) fn merge_down(
        &self,
        id: InstanceId,
        name: &str,
        frozen: &str,
        fresh: &str,
    ) -> Result<(), ManagerError> {
        if frozen == ROOT_LAYER {
            return Ok(());
        }
        let root = self.layout.root_disk(id);
        let chain = disks::backing_chain(&self.layout.layer(id, fresh))?;
        let merged: Vec<_> = chain
            .iter()
            .skip(1)
            .take_while(|p| **p != root)
            .cloned()
            .collect();
        let top = self.layout.layer(id, frozen);
        let r = match self.virt.state(name)? {
            PowerState::Running | PowerState::Paused => self
                .virt
                .block_commit(
                    name,
                    "vda",
                    Commit::Into {
                        top,
                        base: root.clone(),
                    },
                    COMMIT_TIMEOUT,
                )
                .map_err(ManagerError::from),
            _ => disks::commit(&top, &root)
                .and_then(|()| disks::rebase_unsafe(&self.layout.layer(id, fresh), &root))
                .map_err(ManagerError::from),
        };
        match r {
            Ok(()) => {
                for p in merged {
                    let _ = std::fs::remove_file(p);
                }
            }
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "merge failed; the chain stays longer until the next snapshot")
            }
        }
        self.redefine(id)
    }

    /// A stopped instance: the active layer as it is, then a fresh overlay
    /// on top (unless it is released next) so the next one is incremental.
    fn take_offline(
        &self,
        id: InstanceId,
        req: &TakeSnapshot,
        snap: SnapshotId,
        op: OperationId,
    ) -> Result<SnapshotResult, ManagerError> {
        let mut chain = self.record(id)?.chain;
        let frozen = chain.active_layer().to_string();
        chain.pending = Some(Pending {
            snapshot: snap,
            phase: SnapshotPhase::Saving,
            frozen: frozen.clone(),
            active: frozen.clone(),
        });
        self.set_phase(id, |c| *c = chain.clone())?;
        let info = match self.save_layer(id, req, snap, &frozen, &chain.saved, op) {
            Ok(i) => i,
            Err(e) => {
                self.set_phase(id, |c| c.pending = None)?;
                return Err(e);
            }
        };
        gantry_crashpoint::hit("agent.snapshot.offline_stored");
        self.set_phase(id, |c| c.saved = Saved::Snapshot { id: snap })?;
        self.advance(id, SnapshotPhase::Merging)?;
        if !req.auto_release {
            let fresh = self.set_phase(id, |c| {
                let _ = c.new_layer();
            })?;
            let fresh = format!("top-{}.qcow2", fresh.next_layer);
            let top = self.layout.layer(id, &frozen);
            let size = disks::info(&top, Some(disks::Format::Qcow2))?.virtual_size;
            disks::create_overlay(&top, &self.layout.layer(id, &fresh), size)?;
            self.set_phase(id, |c| c.active = Some(fresh.clone()))?;
            self.merge_down(id, &self.domain_name(id), &frozen, &fresh)?;
        }
        self.set_phase(id, |c| c.pending = None)?;
        Ok(info)
    }

    /// Redefines the domain from the record (its disk on the active layer).
    pub(super) fn redefine(&self, id: InstanceId) -> Result<(), ManagerError> {
        let spec = self.record(id)?.spec;
        self.virt
            .define(&self.domain_name(id), &self.domain_def(&spec)?.to_xml())?;
        Ok(())
    }

    /// Stores `layer` (with what lies below it) as snapshot `snap`: only
    /// its own extents, on top of `saved`'s manifest, when that is known.
    fn save_layer(
        &self,
        id: InstanceId,
        req: &TakeSnapshot,
        snap: SnapshotId,
        layer: &str,
        saved: &Saved,
        op: OperationId,
    ) -> Result<SnapshotResult, ManagerError> {
        let store = self.open_store()?;
        let image = self.record(id)?.spec.image;
        let parent = self.parent_manifest(&store, image, saved);
        let path = self.layout.layer(id, layer);
        let extents: Option<Vec<Extent>> = match parent {
            Some(_) => Some(
                disks::layer_extents(&path)?
                    .into_iter()
                    .map(|(offset, length)| Extent { offset, length })
                    .collect(),
            ),
            None => None,
        };
        let progress = |p: Progress| {
            if let Some(part) = (p.done * 85).checked_div(p.total) {
                self.progress(op, (5 + part) as u8);
            }
        };
        let (wanted, parent) = (snap.to_string(), parent.map(|p| p.to_string()));
        let info = store
            .create(&CreateRequest {
                image: &path,
                name: &req.name,
                owner: req.owner.as_deref(),
                parent: parent.as_deref(),
                changed_extents: extents.as_deref(),
                progress: Some(&progress),
                id: Some(&wanted),
            })
            .map_err(SnapshotError::from)?;
        tracing::info!(instance = %id, snapshot = %snap, parent = parent.as_deref().unwrap_or("-"), read_bytes = info.read_bytes, "snapshot stored");
        Ok(SnapshotResult {
            id: snap,
            logical_size: info.logical_size,
            stored_bytes: info.stored_bytes,
            new_bytes: info.new_bytes,
            read_bytes: info.read_bytes,
            frozen: false,
            pause_ms: None,
        })
    }

    /// The manifest a snapshot builds on, when the store has it: the
    /// instance's previous snapshot, or its image's manifest (published
    /// into the public namespace the first time for a file image).
    fn parent_manifest(
        &self,
        store: &Store,
        image: gantry_proto::ImageId,
        saved: &Saved,
    ) -> Option<SnapshotId> {
        let want = saved.manifest(image)?;
        if store.manifest(&want.to_string()).is_ok() {
            return Some(want);
        }
        if *saved != Saved::Image || want != image_manifest(image) {
            tracing::info!(manifest = %want, "the manifest below is gone; reading the whole disk");
            return None;
        }
        match self.publish_image_manifest(store, image) {
            Ok(()) => Some(want),
            Err(e) => {
                tracing::warn!(%image, error = %e, "cannot publish the image's manifest; reading the whole disk");
                None
            }
        }
    }

    /// Publishes a cached file image into the store's public namespace as
    /// `snap-<image uuid>` (once per store; a racing publisher wins).
    fn publish_image_manifest(
        &self,
        store: &Store,
        image: gantry_proto::ImageId,
    ) -> Result<(), ManagerError> {
        let img = crate::images::open(&self.layout, image, false)?;
        let id = image_manifest(image).to_string();
        let name = format!("image {}", img.record.name);
        let r = store.create(&CreateRequest {
            image: &img.disk,
            name: &name,
            owner: None,
            parent: None,
            changed_extents: None,
            progress: None,
            id: Some(&id),
        });
        match r {
            Ok(_) => Ok(()),
            Err(_) if store.manifest(&id).is_ok() => Ok(()),
            Err(e) => Err(SnapshotError::from(e).into()),
        }
    }

    /// Stops the guest for a snapshot with auto-release.
    fn stop_for_snapshot(&self, id: InstanceId, op: OperationId) -> Result<(), ManagerError> {
        self.stop_domain(&self.domain_name(id), true, STOP_FOR_SNAPSHOT, op)?;
        self.set_state(id, InstanceState::Stopped)
    }
}
