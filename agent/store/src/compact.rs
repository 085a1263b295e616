//! Compaction: a create writes new chunks at a fast zstd level (the
//! publish level) so the snapshot is published sooner, and queues their
//! ids (`compact/<snap-id>`, format in `format`). [`Store::compact`] later
//! recompresses each queued chunk at the level at rest and replaces the
//! object atomically.
//!
//! Why this is safe: a chunk's id hashes its raw bytes, so both encodings
//! of a chunk are valid under the same name, and a reader (restore, verify,
//! another create deduplicating against it) sees one or the other whole.
//! Compaction runs under the shared store lock like a create, so gc (which
//! takes it exclusively) never sweeps while a chunk is rewritten. Every
//! chunk is decoded and its hash checked before it is re-encoded, so a
//! damaged chunk is reported, never re-sealed. A queue is deleted only after
//! its rewritten chunks are durable; a compaction killed midway leaves the
//! queue, and the next run redoes it. The queue of a snapshot that is not
//! published yet (its create still running) waits for the next run; gc
//! removes queues whose snapshot never appeared.

use crate::format::{self, ChunkId, CompactQueue, Entry, Manifest, Space, CHUNK_HEADER_LEN};
use crate::keys::{ChunkHasher, Namespace};
use crate::pipeline::{decode_chunk, run_workers};
use crate::store::{chunk_key, manifest_key, Progress, ProgressFn, Store, StoreError};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Key prefix of compaction queues.
pub const COMPACT_PREFIX: &str = "compact/";

/// Key of a snapshot's compaction queue.
pub fn compact_key(snapshot: &str) -> String {
    format!("{COMPACT_PREFIX}{snapshot}")
}

/// Result of [`Store::compact`].
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CompactReport {
    /// Snapshots whose queue was worked off.
    pub snapshots: u64,
    /// Queued chunks looked at.
    pub chunks: u64,
    /// Chunks replaced by a smaller encoding.
    pub rewritten: u64,
    /// Stored bytes of the queued chunks before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Queues left for a later run: their snapshot is not published yet.
    pub waiting: u64,
    /// Chunks that failed their check and were left as they are (see verify).
    pub problems: Vec<String>,
}

/// Chunk sizes keyed by (namespace, id).
pub(crate) type SizeMap = HashMap<(Namespace, ChunkId), u64>;

/// Replaces the sizes a manifest recorded at publish time with the chunk
/// objects' current sizes (they shrink when compacted).
pub(crate) fn current_sizes(m: &mut Manifest, sizes: &SizeMap) {
    let Ok(own) = Namespace::for_owner(m.meta.owner.as_deref()) else {
        return;
    };
    for e in &mut m.entries {
        if let Entry::Chunk {
            space,
            id,
            stored_len,
        } = e
        {
            let ns = if *space == Space::Own {
                own.clone()
            } else {
                Namespace::Public
            };
            if let Some(sz) = sizes.get(&(ns, *id)) {
                *stored_len = *sz as u32;
            }
        }
    }
}

impl Store {
    /// Sizes of every chunk object in the store.
    pub(crate) fn chunk_object_sizes(&self) -> Result<SizeMap, StoreError> {
        Ok(self
            .all_chunks()?
            .into_iter()
            .map(|(r, _, size)| (r, size))
            .collect())
    }

    /// Whether creates write chunks below the level at rest.
    pub fn compacts(&self) -> bool {
        self.publish_level() < self.cfg.zstd_level
    }

    /// Queues the chunks a create wrote for compaction (durably; called
    /// before the manifest is published).
    pub(crate) fn queue_compaction(
        &self,
        snapshot: &str,
        ns: &Namespace,
        chunks: Vec<ChunkId>,
    ) -> Result<(), StoreError> {
        if !self.compacts() || chunks.is_empty() {
            return Ok(());
        }
        let q = CompactQueue {
            namespace: ns.dir(),
            chunks,
        };
        self.backend
            .put(&compact_key(snapshot), &q.encode(), true)?;
        Ok(())
    }

    /// Snapshot ids with a compaction queue.
    pub fn compaction_queues(&self) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .backend
            .list(COMPACT_PREFIX)?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(COMPACT_PREFIX).map(str::to_string))
            .filter(|id| id.parse::<gantry_proto::SnapshotId>().is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Recompresses every queued chunk of published snapshots at the level
    /// at rest. Progress counts queued chunks.
    pub fn compact(&self, progress: Option<ProgressFn<'_>>) -> Result<CompactReport, StoreError> {
        let _lock = self.backend.lock(false)?;
        let mut report = CompactReport::default();
        let mut work = Vec::new();
        for id in self.compaction_queues()? {
            match self.backend.get(&manifest_key(&id)) {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {
                    report.waiting += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            let q = match self.backend.get(&compact_key(&id)) {
                Ok(data) => CompactQueue::decode(&data).map_err(|e| StoreError::Invalid {
                    field: "compaction queue",
                    reason: format!("{id}: {e}"),
                })?,
                Err(e) if e.is_not_found() => continue, // done by another run
                Err(e) => return Err(e.into()),
            };
            work.push((id, q));
        }
        let total: u64 = work.iter().map(|(_, q)| q.chunks.len() as u64).sum();
        let done = AtomicU64::new(0);
        for (id, q) in work {
            let Some(ns) = Namespace::from_dir(&q.namespace) else {
                report.problems.push(format!(
                    "queue of {id} names an invalid namespace {:?}",
                    q.namespace
                ));
                continue;
            };
            let hasher = self.hasher(&ns, false)?;
            let part = self.compact_queue(&ns, &hasher, &q.chunks, &done, total, progress)?;
            report.chunks += part.chunks;
            report.rewritten += part.rewritten;
            report.bytes_before += part.bytes_before;
            report.bytes_after += part.bytes_after;
            report.problems.extend(
                part.problems
                    .into_iter()
                    .map(|p| format!("{p} (snapshot {id})")),
            );
            // The rewrites must be durable before the queue that names them goes.
            self.backend.sync()?;
            self.backend.delete(&compact_key(&id))?;
            report.snapshots += 1;
        }
        tracing::info!(
            snapshots = report.snapshots,
            before = report.bytes_before,
            after = report.bytes_after,
            "compaction done"
        );
        Ok(report)
    }

    /// Recompresses one queue's chunks on the configured threads.
    fn compact_queue(
        &self,
        ns: &Namespace,
        hasher: &ChunkHasher,
        chunks: &[ChunkId],
        done: &AtomicU64,
        total: u64,
        progress: Option<ProgressFn<'_>>,
    ) -> Result<CompactReport, StoreError> {
        let next = AtomicU64::new(0);
        let abort = AtomicBool::new(false);
        let report = Mutex::new(CompactReport::default());
        let threads = self.cfg.threads.clamp(1, 64).min(chunks.len().max(1));
        let worker = || -> Result<(), StoreError> {
            let mut w = Recompressor::new(self.chunk_compressor(self.cfg.zstd_level)?)?;
            while !abort.load(Ordering::Relaxed) {
                let Some(id) = chunks.get(next.fetch_add(1, Ordering::Relaxed) as usize) else {
                    break;
                };
                let key = chunk_key(ns, id);
                let outcome = w.recompress(self, &key, hasher, id)?;
                let mut r = report.lock().expect("report");
                r.chunks += 1;
                match outcome {
                    Outcome::Gone => {}
                    Outcome::Kept(n) => {
                        r.bytes_before += n;
                        r.bytes_after += n;
                    }
                    Outcome::Rewritten(before, after) => {
                        r.rewritten += 1;
                        r.bytes_before += before;
                        r.bytes_after += after;
                    }
                    Outcome::Damaged(n, why) => {
                        r.bytes_before += n;
                        r.bytes_after += n;
                        r.problems.push(format!("chunk {key}: {why}"));
                    }
                }
                drop(r);
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(p) = progress {
                    p(Progress { done: d, total });
                }
            }
            Ok(())
        };
        run_workers(threads, &abort, worker)?;
        Ok(report.into_inner().expect("report"))
    }
}

/// What happened to one queued chunk.
enum Outcome {
    /// Removed meanwhile (its snapshots deleted and collected).
    Gone,
    /// Left as it is (stored uncompressed, or no smaller at rest): its size.
    Kept(u64),
    /// Replaced: sizes before and after.
    Rewritten(u64, u64),
    /// Failed its check: size and reason.
    Damaged(u64, String),
}

/// One worker's buffers and codecs.
struct Recompressor {
    raw: Vec<u8>,
    out: Vec<u8>,
    dec: zstd::bulk::Decompressor<'static>,
    comp: zstd::bulk::Compressor<'static>,
}

impl Recompressor {
    fn new(comp: zstd::bulk::Compressor<'static>) -> Result<Self, StoreError> {
        let tool = |e: std::io::Error| StoreError::Tool(format!("zstd: {e}"));
        Ok(Self {
            raw: Vec::new(),
            out: Vec::new(),
            dec: zstd::bulk::Decompressor::new().map_err(tool)?,
            comp,
        })
    }

    fn recompress(
        &mut self,
        store: &Store,
        key: &str,
        hasher: &ChunkHasher,
        id: &ChunkId,
    ) -> Result<Outcome, StoreError> {
        let data = match store.backend.get(key) {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(Outcome::Gone),
            Err(e) => return Err(e.into()),
        };
        let before = data.len() as u64;
        let n = match decode_chunk(&data, &mut self.raw, hasher, id, &mut self.dec) {
            Ok(n) => n,
            Err(why) => return Ok(Outcome::Damaged(before, why)),
        };
        let (codec, _, _) = format::parse_chunk(&data).expect("decoded above");
        if codec == format::CODEC_STORED {
            return Ok(Outcome::Kept(before));
        }
        let raw = &self.raw[..n];
        self.out
            .resize(CHUNK_HEADER_LEN + zstd::zstd_safe::compress_bound(n), 0);
        let len = self
            .comp
            .compress_to_buffer(raw, &mut self.out[CHUNK_HEADER_LEN..])
            .map_err(|e| StoreError::Tool(format!("zstd: {e}")))?;
        let after = (CHUNK_HEADER_LEN + len) as u64;
        if after >= before {
            return Ok(Outcome::Kept(before));
        }
        self.out[..CHUNK_HEADER_LEN]
            .copy_from_slice(&format::chunk_header(format::CODEC_ZSTD, n as u32));
        store
            .backend
            .put(key, &self.out[..CHUNK_HEADER_LEN + len], false)?;
        Ok(Outcome::Rewritten(before, after))
    }
}
