//! A snapshot interrupted by an agent restart (or a host reboot): the
//! journal in the instance record says which phase it was in. Switching or
//! Saving: undone (the fresh overlay is folded back; nothing was
//! published, or what was is kept and reported). Merging: the snapshot was
//! published, so the merge is finished.

use super::chain::{SnapshotPhase, ROOT_LAYER};
use crate::disks;
use crate::manager::{Manager, ManagerError};
use gantry_proto::InstanceId;

impl Manager {
    /// Finishes or undoes the snapshot the record's journal names, if any.
    pub(crate) fn recover_snapshot(&self, id: InstanceId) -> Result<(), ManagerError> {
        let Some(p) = self.record(id)?.chain.pending else {
            return Ok(());
        };
        let name = self.domain_name(id);
        tracing::warn!(instance = %id, snapshot = %p.snapshot, phase = %p.phase, "finishing a snapshot interrupted by a restart");
        if p.frozen == p.active {
            // A stopped instance's snapshot: nothing was switched. If it
            // was published and a fresh overlay was put on, merge down.
            let active = self.record(id)?.chain.active_layer().to_string();
            if p.phase.published() && active != p.frozen {
                let frozen = self.layout.layer(id, &p.frozen);
                if disks::backing_chain(&self.layout.layer(id, &active))?.contains(&frozen) {
                    self.merge_down(id, &name, &p.frozen, &active)?;
                }
            }
            self.set_phase_pub(id, |c| c.pending = None)?;
            return self.redefine(id);
        }
        let live = self.virt.disk_source(&name, "vda")?;
        let fresh = self.layout.layer(id, &p.active);
        let switched = match &live {
            Some(src) => *src == fresh,
            None => self.record(id)?.chain.active.as_deref() == Some(p.active.as_str()),
        };
        match (p.phase, switched) {
            (SnapshotPhase::Switching | SnapshotPhase::Saving, true) => {
                self.undo_switch(id, &p.frozen, &p.active)
            }
            (SnapshotPhase::Switching | SnapshotPhase::Saving, false) => {
                let _ = std::fs::remove_file(&fresh);
                self.set_phase_pub(id, |c| {
                    c.active = (p.frozen != ROOT_LAYER).then(|| p.frozen.clone());
                    c.pending = None;
                })?;
                self.redefine(id)
            }
            _ => {
                // Published: finish the merge (QEMU may have done it).
                let frozen = self.layout.layer(id, &p.frozen);
                let still = disks::backing_chain(&fresh)?.contains(&frozen);
                if still {
                    self.merge_down(id, &name, &p.frozen, &p.active)?;
                } else if p.frozen != ROOT_LAYER {
                    let _ = std::fs::remove_file(&frozen);
                }
                self.set_phase_pub(id, |c| {
                    c.active = Some(p.active.clone());
                    c.pending = None;
                })?;
                self.redefine(id)
            }
        }
    }

    /// Removes layer files of the instance that are not in its disk's
    /// chain (an overlay made just before a crash): no orphan overlay.
    pub(crate) fn prune_layers(&self, id: InstanceId) -> Result<(), ManagerError> {
        let rec = self.record(id)?;
        let active = self.layout.active_disk(&rec);
        if !active.exists() {
            return Ok(());
        }
        let chain = disks::backing_chain(&active)?;
        let dir = self.layout.instance_dir(id);
        let entries = std::fs::read_dir(&dir).map_err(crate::fsutil::io_err("list", &dir))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if super::chain::DiskChain::is_layer_name(&name)
                && name != ROOT_LAYER
                && !chain.contains(&e.path())
            {
                tracing::info!(instance = %id, layer = name, "removing an overlay left by an interrupted snapshot");
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    fn set_phase_pub(
        &self,
        id: InstanceId,
        f: impl FnOnce(&mut super::chain::DiskChain),
    ) -> Result<(), ManagerError> {
        self.update_record(id, |r| f(&mut r.chain)).map(drop)
    }
}
