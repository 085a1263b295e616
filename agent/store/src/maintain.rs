//! Whole-store maintenance: verify (re-hash every chunk), garbage collection
//! (mark and sweep under the exclusive store lock, so it never races a
//! create) and statistics for billing.

use crate::compact::{compact_key, current_sizes, SizeMap};
use crate::format::{ChunkId, Entry, Manifest, Space};
use crate::keys::Namespace;
use crate::pipeline::{decode_chunk, run_workers};
use crate::store::{chunk_key, Progress, ProgressFn, SnapshotInfo, Store, StoreError};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

type ChunkRef = (Namespace, ChunkId);

/// A chunk that is damaged or absent.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ChunkProblem {
    pub namespace: String,
    pub chunk: String,
    pub reason: String,
    /// Snapshots that need this chunk.
    pub snapshots: Vec<String>,
}

/// A manifest that cannot be read.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ManifestProblem {
    pub snapshot: String,
    pub reason: String,
}

/// Result of [`Store::verify`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub snapshots: u64,
    pub chunks_checked: u64,
    pub corrupt: Vec<ChunkProblem>,
    pub missing: Vec<ChunkProblem>,
    pub bad_manifests: Vec<ManifestProblem>,
    /// Namespaces whose key is not in this agent's keyring (not checked).
    pub unverifiable_namespaces: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.bad_manifests.is_empty()
    }
    /// Snapshots that cannot be restored.
    pub fn broken_snapshots(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .corrupt
            .iter()
            .chain(&self.missing)
            .flat_map(|p| p.snapshots.clone())
            .chain(self.bad_manifests.iter().map(|m| m.snapshot.clone()))
            .collect();
        s.sort();
        s.dedup();
        s
    }
}

/// Result of [`Store::gc`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub snapshots: u64,
    pub kept_chunks: u64,
    pub deleted_chunks: u64,
    pub deleted_bytes: u64,
    pub temp_files_removed: u64,
}

/// Per-snapshot figures.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotStats {
    #[serde(flatten)]
    pub info: SnapshotInfo,
    /// Compressed bytes of chunks no other snapshot references.
    pub unique_bytes: u64,
}

/// Per-account figures.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct OwnerStats {
    /// Account; `None` for the public namespace.
    pub owner: Option<String>,
    pub snapshots: u64,
    pub logical_bytes: u64,
    /// Compressed bytes of the distinct chunks in the account's own
    /// namespace that its snapshots reference: what it is billed for.
    pub billed_bytes: u64,
}

/// Result of [`Store::stats`].
#[derive(Clone, Debug, Serialize)]
pub struct StatsReport {
    pub snapshots: Vec<SnapshotStats>,
    pub owners: Vec<OwnerStats>,
    pub chunk_objects: u64,
    /// Bytes of all chunk objects in the store.
    pub stored_bytes: u64,
    /// Bytes of chunk objects no snapshot references (freed by gc).
    pub garbage_bytes: u64,
}

fn refs_of(m: &Manifest) -> Result<impl Iterator<Item = (ChunkRef, u32)> + '_, StoreError> {
    let own = Namespace::for_owner(m.meta.owner.as_deref())?;
    Ok(m.entries.iter().filter_map(move |e| match e {
        Entry::Zero => None,
        Entry::Chunk {
            space: Space::Own,
            id,
            stored_len,
        } => Some(((own.clone(), *id), *stored_len)),
        Entry::Chunk {
            space: Space::Public,
            id,
            stored_len,
        } => Some(((Namespace::Public, *id), *stored_len)),
    }))
}

impl Store {
    /// Every chunk object: (namespace, id, key, size). Stray keys are skipped.
    pub(crate) fn all_chunks(&self) -> Result<Vec<(ChunkRef, String, u64)>, StoreError> {
        Ok(self
            .backend
            .list("chunks/")?
            .into_iter()
            .filter_map(|o| {
                let mut parts = o.key.split('/');
                let (_, ns, _, hex) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
                let r = (Namespace::from_dir(ns)?, ChunkId::from_hex(hex)?);
                Some((r, o.key, o.size))
            })
            .collect())
    }

    /// Loads every manifest; unreadable ones are returned separately.
    fn all_manifests(&self) -> Result<(Vec<Manifest>, Vec<ManifestProblem>), StoreError> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for id in self.snapshot_ids()? {
            match self.manifest(&id) {
                Ok(m) => good.push(m),
                Err(StoreError::UnknownSnapshot(_)) => {}
                Err(e @ StoreError::BadManifest { .. }) => bad.push(ManifestProblem {
                    snapshot: id,
                    reason: e.to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
        Ok((good, bad))
    }

    /// Re-hashes every chunk and checks every snapshot's chunks exist.
    pub fn verify(&self, progress: Option<ProgressFn<'_>>) -> Result<VerifyReport, StoreError> {
        let (manifests, bad_manifests) = self.all_manifests()?;
        let mut refs: HashMap<ChunkRef, Vec<String>> = HashMap::new();
        for m in &manifests {
            for (r, _) in refs_of(m)? {
                let v = refs.entry(r).or_default();
                if v.last() != Some(&m.meta.id) {
                    v.push(m.meta.id.clone());
                }
            }
        }
        let chunks = self.all_chunks()?;
        let mut hashers = HashMap::new();
        let mut unverifiable = Vec::new();
        for ((ns, _), _, _) in &chunks {
            if !hashers.contains_key(ns) {
                match self.hasher(ns, false) {
                    Ok(h) => drop(hashers.insert(ns.clone(), h)),
                    Err(_) if !unverifiable.contains(&ns.dir()) => unverifiable.push(ns.dir()),
                    Err(_) => {}
                }
            }
        }
        let present: HashSet<&ChunkRef> = chunks.iter().map(|(r, _, _)| r).collect();
        let snaps_of = |r: &ChunkRef| refs.get(r).cloned().unwrap_or_default();
        let mut missing: Vec<ChunkProblem> = refs
            .keys()
            .filter(|r| !present.contains(r))
            .map(|r| ChunkProblem {
                namespace: r.0.dir(),
                chunk: r.1.to_hex(),
                reason: "missing".into(),
                snapshots: snaps_of(r),
            })
            .collect();
        missing.sort_by(|a, b| a.chunk.cmp(&b.chunk));
        let total: u64 = chunks.iter().map(|c| c.2).sum();
        let (next, done, checked) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        let corrupt = Mutex::new(Vec::new());
        let worker = || -> Result<(), StoreError> {
            let mut buf = Vec::new();
            let mut dec = zstd::bulk::Decompressor::new()
                .map_err(|e| StoreError::Tool(format!("zstd: {e}")))?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some((r, key, size)) = chunks.get(i) else {
                    break;
                };
                let d = done.fetch_add(*size, Ordering::Relaxed) + size;
                let Some(h) = hashers.get(&r.0) else { continue };
                let why = match self.backend.get(key) {
                    Ok(data) => decode_chunk(&data, &mut buf, h, &r.1, &mut dec).err(),
                    Err(e) if e.is_not_found() => None, // removed by a concurrent gc
                    Err(e) => return Err(e.into()),
                };
                checked.fetch_add(1, Ordering::Relaxed);
                if let Some(reason) = why {
                    let p = ChunkProblem {
                        namespace: r.0.dir(),
                        chunk: r.1.to_hex(),
                        reason,
                        snapshots: snaps_of(r),
                    };
                    corrupt.lock().expect("corrupt").push(p);
                }
                if let Some(p) = progress {
                    p(Progress { done: d, total });
                }
            }
            Ok(())
        };
        let threads = self.cfg.threads.clamp(1, 64);
        run_workers(threads, &AtomicBool::new(false), worker)?;
        let mut corrupt = corrupt.into_inner().expect("corrupt");
        corrupt.sort_by(|a, b| a.chunk.cmp(&b.chunk));
        Ok(VerifyReport {
            snapshots: (manifests.len() + bad_manifests.len()) as u64,
            chunks_checked: checked.into_inner(),
            corrupt,
            missing,
            bad_manifests,
            unverifiable_namespaces: unverifiable,
        })
    }

    /// Deletes every chunk no snapshot references, and temp leftovers.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _lock = self.backend.lock(true)?;
        let (manifests, bad) = self.all_manifests()?;
        if let Some(b) = bad.first() {
            let reason = format!("{} (delete it before collecting garbage)", b.reason);
            return Err(StoreError::Invalid {
                field: "manifest",
                reason,
            });
        }
        let mut marked = HashSet::new();
        for m in &manifests {
            marked.extend(refs_of(m)?.map(|(r, _)| r));
        }
        let mut report = GcReport {
            snapshots: manifests.len() as u64,
            ..GcReport::default()
        };
        for (r, key, size) in self.all_chunks()? {
            if marked.contains(&r) {
                report.kept_chunks += 1;
            } else {
                debug_assert_eq!(key, chunk_key(&r.0, &r.1));
                self.backend.delete(&key)?;
                report.deleted_chunks += 1;
                report.deleted_bytes += size;
            }
        }
        // Queues of creates that died before publishing, or of snapshots
        // deleted since (no create runs now: this lock is exclusive).
        let live: HashSet<&str> = manifests.iter().map(|m| m.meta.id.as_str()).collect();
        for id in self.compaction_queues()? {
            if !live.contains(id.as_str()) {
                self.backend.delete(&compact_key(&id))?;
            }
        }
        report.temp_files_removed = self.backend.clean_temp()?;
        self.backend.sync()?;
        tracing::info!(
            deleted = report.deleted_chunks,
            bytes = report.deleted_bytes,
            "gc done"
        );
        Ok(report)
    }

    /// Sizes per snapshot and per owner.
    pub fn stats(&self) -> Result<StatsReport, StoreError> {
        let (manifests, bad) = self.all_manifests()?;
        if let Some(b) = bad.first() {
            return Err(StoreError::Invalid {
                field: "manifest",
                reason: b.reason.clone(),
            });
        }
        let chunks = self.all_chunks()?;
        let sizes: SizeMap = chunks.iter().map(|(r, _, sz)| (r.clone(), *sz)).collect();
        let mut users: HashMap<ChunkRef, (u32, u32)> = HashMap::new();
        let mut per: Vec<HashMap<ChunkRef, u32>> = Vec::new();
        let mut manifests = manifests;
        for m in &mut manifests {
            current_sizes(m, &sizes);
        }
        for m in &manifests {
            let mine: HashMap<ChunkRef, u32> = refs_of(m)?.collect();
            for (r, sz) in &mine {
                users.entry(r.clone()).or_insert((0, *sz)).0 += 1;
            }
            per.push(mine);
        }
        let mut owners: BTreeMap<Option<String>, (OwnerStats, HashSet<ChunkRef>)> = BTreeMap::new();
        let mut snapshots = Vec::new();
        for (m, mine) in manifests.iter().zip(&per) {
            let unique = mine
                .keys()
                .filter(|r| users[*r].0 == 1)
                .map(|r| u64::from(users[r].1))
                .sum();
            let owner = m.meta.owner.clone();
            let own_ns = Namespace::for_owner(owner.as_deref())?;
            let (o, set) = owners.entry(owner.clone()).or_insert_with(|| {
                (
                    OwnerStats {
                        owner,
                        snapshots: 0,
                        logical_bytes: 0,
                        billed_bytes: 0,
                    },
                    HashSet::new(),
                )
            });
            o.snapshots += 1;
            o.logical_bytes += m.meta.virtual_size;
            for (r, sz) in mine {
                if r.0 == own_ns && set.insert(r.clone()) {
                    o.billed_bytes += u64::from(*sz);
                }
            }
            snapshots.push(SnapshotStats {
                info: SnapshotInfo::from_manifest(m, 0),
                unique_bytes: unique,
            });
        }
        let stored_bytes = chunks.iter().map(|c| c.2).sum();
        let garbage_bytes = chunks
            .iter()
            .filter(|c| !users.contains_key(&c.0))
            .map(|c| c.2)
            .sum();
        Ok(StatsReport {
            snapshots,
            owners: owners.into_values().map(|(o, _)| o).collect(),
            chunk_objects: chunks.len() as u64,
            stored_bytes,
            garbage_bytes,
        })
    }
}
