//! Data volumes on this host as the controller manages them: grow and
//! delete (`AgentCommand::GrowVolume` / `DeleteVolume`).
//!
//! A volume is `volumes/<id>.qcow2` with its record `volumes/<id>.json`
//! ([`crate::layout`]). Growing an attached volume goes through its
//! instance's `grow-disk` operation (a live `block_resize` while the
//! instance runs, `qemu-img resize` while it is stopped: see
//! `lifecycle::grow_disk`), which also updates the instance's spec; a
//! detached volume is grown here with `qemu-img`. A volume the controller
//! placed on this host that no instance has written yet has no file: a
//! grow creates it blank at the new size. Deleting refuses while an
//! instance of this host still uses the volume and is idempotent (a
//! volume already gone is deleted). Both are safe to run again after a
//! restart.

use crate::disks::{self, Format, GIB};
use crate::layout::VolumeRecord;
use crate::manager::{Manager, ManagerError};
use gantry_proto::spec;
use gantry_proto::validate::{self, ValidationError};
use gantry_proto::{InstanceId, VolumeId};

/// How a grow of a volume is carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeGrowth {
    /// Attached: through this instance's `grow-disk` of its data disk.
    Through(InstanceId),
    /// Done here (a detached volume); the sentence says what was done.
    Done(String),
}

impl Manager {
    /// The live instance of this host whose spec uses volume `v`.
    fn user_of(&self, v: VolumeId) -> Option<InstanceId> {
        self.lock()
            .instances
            .values()
            .find(|r| r.spec.data_volume.is_some_and(|d| d.id == v))
            .map(|r| r.spec.id)
    }

    /// Grows volume `v` to `size_gib` GiB (never shrinks), or says which
    /// instance's `grow-disk` is to do it. Blocking (`qemu-img`).
    pub fn grow_volume(&self, v: VolumeId, size_gib: u64) -> Result<VolumeGrowth, ManagerError> {
        validate::in_range("size_gib", size_gib, 1, spec::MAX_DISK_GIB)?;
        if let Some(id) = self.user_of(v) {
            return Ok(VolumeGrowth::Through(id));
        }
        let bytes = size_gib * GIB;
        let path = self.layout.volume_disk(v);
        let Some(mut rec) = self.layout.load_volume(v)? else {
            if path.exists() {
                return Err(ManagerError::Conflict(format!(
                    "volume {v} has a disk but no record on this host; not touching it"
                )));
            }
            // Placed here by the controller, never written: made now.
            disks::create_blank(&path, bytes)?;
            self.layout.save_volume(&VolumeRecord {
                id: v,
                size_bytes: bytes,
                attached_to: None,
            })?;
            tracing::info!(volume = %v, size_gib, "volume created at its grown size");
            return Ok(VolumeGrowth::Done(format!(
                "volume {v} had no disk on this host yet; created blank with {size_gib} GiB"
            )));
        };
        let current = disks::info(&path, Some(Format::Qcow2))?.virtual_size;
        if bytes < current {
            return Err(ValidationError::new(
                "size_gib",
                format!(
                    "must not be smaller than the volume's {} GiB (volumes never shrink)",
                    current.div_ceil(GIB)
                ),
            )
            .into());
        }
        disks::grow(&path, bytes)?;
        rec.size_bytes = bytes;
        rec.attached_to = None;
        self.layout.save_volume(&rec)?;
        tracing::info!(volume = %v, size_gib, "detached volume grown");
        Ok(VolumeGrowth::Done(format!(
            "volume {v} grown to {size_gib} GiB"
        )))
    }

    /// Deletes volume `v`'s disk and record; refused while an instance of
    /// this host uses it; a volume that is not here is already deleted.
    /// Returns whether anything was removed.
    pub fn delete_volume(&self, v: VolumeId) -> Result<bool, ManagerError> {
        if let Some(id) = self.user_of(v) {
            return Err(ManagerError::Conflict(format!(
                "volume {v} is in use by instance {id} on this host"
            )));
        }
        let mut removed = false;
        for p in [self.layout.volume_disk(v), self.layout.volume_record(v)] {
            match std::fs::remove_file(&p) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(crate::fsutil::io_err("remove", &p)(e).into()),
            }
        }
        tracing::info!(volume = %v, removed, "volume deleted");
        Ok(removed)
    }
}
