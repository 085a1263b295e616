//! The layers of an instance's root disk, and the phases of a snapshot.
//!
//! The root disk is always "a known manifest plus the user's changes":
//!
//! ```text
//! image (cache, shared, read-only) <- root.qcow2 <- top-<n>.qcow2 (active)
//! ```
//!
//! `root.qcow2` starts as the active layer. Take Snapshot switches the
//! guest to a fresh `top-<n>.qcow2` (the old active layer freezes), stores
//! what the frozen layer holds on top of the manifest of what lies below it
//! (`DiskChain::saved`) -- so it reads only what the guest wrote since the
//! previous snapshot -- and merges the frozen layer into `root.qcow2` while
//! the guest runs on. So the chain is never longer than three layers (four
//! while a snapshot runs), whatever the number of snapshots. The image
//! below `root.qcow2` is never written.
//!
//! A snapshot's phases ([`SnapshotPhase`], one transition function) are
//! journalled in the instance record ([`Pending`]), so an agent restarted
//! mid-snapshot finishes or undoes the step it was in.

use gantry_proto::{ImageId, SnapshotId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The layer every instance starts with.
pub const ROOT_LAYER: &str = "root.qcow2";

/// What the layers below the active one hold, as a manifest in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Saved {
    /// The image the instance was created from: its manifest is
    /// `snap-<image uuid>` (the source snapshot for an image restored
    /// from one; published into the store's public namespace for a file
    /// image, the first time it is needed).
    #[default]
    Image,
    /// A snapshot of this instance.
    Snapshot { id: SnapshotId },
    /// Not known (a failure left it unclear): the next snapshot reads the
    /// whole disk.
    Unknown,
}

impl Saved {
    /// The store id of the manifest, given the instance's image.
    pub fn manifest(&self, image: ImageId) -> Option<SnapshotId> {
        match self {
            Self::Image => Some(image_manifest(image)),
            Self::Snapshot { id } => Some(*id),
            Self::Unknown => None,
        }
    }
}

/// The store id of an image's manifest: the image's uuid as a snapshot id
/// (so an image restored from snapshot S maps back to S).
pub fn image_manifest(image: ImageId) -> SnapshotId {
    SnapshotId::from_uuid(image.uuid())
}

/// Where a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SnapshotPhase {
    /// The guest is paused while its disk switches to a fresh overlay.
    Switching,
    /// The frozen layer is being stored (the guest runs on).
    Saving,
    /// Stored (published); the frozen layer is merged down.
    Merging,
    Done,
    Failed,
}

impl SnapshotPhase {
    pub const ALL: [SnapshotPhase; 5] = [
        Self::Switching,
        Self::Saving,
        Self::Merging,
        Self::Done,
        Self::Failed,
    ];

    /// Whether `self -> to` is an edge. A stopped instance's snapshot
    /// starts at Saving (nothing to switch).
    pub fn can_become(self, to: SnapshotPhase) -> bool {
        use SnapshotPhase::*;
        matches!(
            (self, to),
            (Switching, Saving | Failed) | (Saving, Merging | Failed) | (Merging, Done)
        )
    }

    /// The one transition function.
    pub fn transition(self, to: SnapshotPhase) -> Result<SnapshotPhase, String> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(format!("a snapshot cannot go from {self:?} to {to:?}"))
        }
    }

    /// Whether the snapshot was published (a crash from here on finishes
    /// it rather than undoing it).
    pub fn published(self) -> bool {
        matches!(self, Self::Merging | Self::Done)
    }
}

impl fmt::Display for SnapshotPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A snapshot in progress on an instance (the journal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub snapshot: SnapshotId,
    pub phase: SnapshotPhase,
    /// The layer being stored (file name in the instance directory).
    pub frozen: String,
    /// The layer the guest writes to meanwhile (equal to `frozen` when
    /// the instance is stopped).
    pub active: String,
}

/// The root disk's layers (file names in the instance directory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskChain {
    /// The layer the guest writes to; `None`: `root.qcow2`.
    #[serde(default)]
    pub active: Option<String>,
    #[serde(default)]
    pub saved: Saved,
    #[serde(default)]
    pub pending: Option<Pending>,
    /// Number of the next overlay (`top-<n>.qcow2`).
    #[serde(default)]
    pub next_layer: u32,
}

impl DiskChain {
    pub fn active_layer(&self) -> &str {
        self.active.as_deref().unwrap_or(ROOT_LAYER)
    }

    /// A fresh overlay's name; bumps the counter.
    pub fn new_layer(&mut self) -> String {
        self.next_layer += 1;
        format!("top-{}.qcow2", self.next_layer)
    }

    /// Whether `name` is one of this chain's layer files (what recovery
    /// may delete).
    pub fn is_layer_name(name: &str) -> bool {
        name == ROOT_LAYER
            || name
                .strip_prefix("top-")
                .and_then(|r| r.strip_suffix(".qcow2"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_table_is_exhaustive() {
        use SnapshotPhase::*;
        let edges = [
            (Switching, Saving),
            (Switching, Failed),
            (Saving, Merging),
            (Saving, Failed),
            (Merging, Done),
        ];
        for from in SnapshotPhase::ALL {
            for to in SnapshotPhase::ALL {
                assert_eq!(
                    from.transition(to).is_ok(),
                    edges.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        assert!(Merging.published() && Done.published() && !Saving.published());
    }

    #[test]
    fn chains_name_layers_and_read_old_records() {
        let mut c = DiskChain::default();
        assert_eq!(c.active_layer(), "root.qcow2");
        assert_eq!(c.new_layer(), "top-1.qcow2");
        assert_eq!(c.new_layer(), "top-2.qcow2");
        assert!(DiskChain::is_layer_name("top-12.qcow2"));
        assert!(!DiskChain::is_layer_name("top-../x.qcow2"));
        assert!(!DiskChain::is_layer_name("seed.iso"));
        let old: DiskChain = serde_json::from_str("{}").unwrap();
        assert_eq!(old.saved, Saved::Image);
        let img = ImageId::new();
        assert_eq!(Saved::Image.manifest(img).unwrap().uuid(), img.uuid());
        assert_eq!(Saved::Unknown.manifest(img), None);
    }
}
