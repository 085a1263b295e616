//! The parallel chunk pipelines. Create: every worker thread claims the next
//! chunk index, reads it (only when the allocation map says it holds data),
//! hashes, deduplicates, compresses and writes it; memory is one chunk buffer
//! and one compression buffer per thread. Restore: every worker fetches,
//! decompresses, verifies and writes chunks at their offsets, leaving zeros
//! as holes.

use crate::format::{self, chunk_count, ChunkId, Entry, Manifest, Space, CHUNK_HEADER_LEN};
use crate::image::ImageSource;
use crate::keys::{ChunkHasher, Namespace};
use crate::output::{is_zero, AlignedBuf, SparseOut};
use crate::store::{chunk_key, Extent, Progress, ProgressFn, Store, StoreError};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Everything a create worker needs.
pub(crate) struct CreateCtx<'a> {
    pub store: &'a Store,
    pub image: &'a ImageSource,
    pub ns: &'a Namespace,
    pub hasher: ChunkHasher,
    pub chunk_size: u32,
    /// Per chunk, with a parent: take its entry, patch it, or read it
    /// (empty: read every chunk).
    pub reuse: Vec<ChunkPlan>,
    /// Chunks already in the namespace (and those written by this run).
    pub known: Mutex<HashMap<ChunkId, u32>>,
    /// Chunks of the public namespace (empty for public snapshots).
    pub public: HashMap<ChunkId, u32>,
    pub progress: Option<ProgressFn<'a>>,
}

/// Result of a create run.
pub(crate) struct CreateOut {
    pub entries: Vec<Entry>,
    pub allocated: u64,
    pub new_bytes: u64,
    /// Chunks this run wrote (at the publish level).
    pub written: Vec<ChunkId>,
    /// Image bytes read (chunks not reused that hold data).
    pub read_bytes: u64,
}

/// One create worker's entries (by chunk index), the bytes it wrote, the
/// chunks it wrote and the image bytes it read.
type WorkerOut = (Vec<(u64, Entry)>, u64, Vec<ChunkId>, u64);

fn chunk_len(size: u64, cs: u32, i: u64) -> u64 {
    (size - i * u64::from(cs)).min(u64::from(cs))
}

/// What an incremental create does with one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ChunkPlan {
    /// Read it whole from the image.
    Read,
    /// Unchanged since the parent: its entry.
    Reuse(Entry),
    /// Changed in parts: the parent's chunk with these byte ranges
    /// (offset in the chunk, length) read from the image over it.
    Patch {
        base: Entry,
        ranges: Vec<(u32, u32)>,
    },
}

/// Patching a chunk costs a fetch and a decompression of the parent's;
/// when more than this share of it changed, it is read whole.
const PATCH_MAX_SHARE: f64 = 0.75;

/// The changed ranges of each chunk (offset in the chunk, length), merged.
fn dirty_ranges(
    changed: &[Extent],
    size: u64,
    cs: u32,
    n: u64,
) -> Result<Vec<Vec<(u32, u32)>>, StoreError> {
    let mut dirty: Vec<Vec<(u32, u32)>> = vec![Vec::new(); n as usize];
    let cs64 = u64::from(cs);
    for e in changed {
        let end = e
            .offset
            .checked_add(e.length)
            .filter(|end| *end <= size)
            .ok_or_else(|| StoreError::Invalid {
                field: "changed extents",
                reason: format!(
                    "extent {}+{} lies beyond the {size} byte disk",
                    e.offset, e.length
                ),
            })?;
        let mut pos = e.offset;
        while pos < end {
            let i = pos / cs64;
            let chunk_end = ((i + 1) * cs64).min(end);
            let r = &mut dirty[i as usize];
            let (off, len) = ((pos - i * cs64) as u32, (chunk_end - pos) as u32);
            match r.last_mut() {
                Some((o, l)) if *o + *l >= off => *l = (*l).max(off + len - *o),
                _ => r.push((off, len)),
            }
            pos = chunk_end;
        }
    }
    Ok(dirty)
}

/// Which chunks an incremental create may take from its parent.
pub(crate) fn reuse_plan(
    parent: &Manifest,
    ns: &Namespace,
    size: u64,
    cs: u32,
    changed: Option<&[Extent]>,
) -> Result<Vec<ChunkPlan>, StoreError> {
    let p_owner = parent.meta.owner.as_deref();
    let remap_public = match (p_owner, ns.owner()) {
        (a, b) if a == b => false,
        (None, Some(_)) => true,
        _ => {
            let reason = format!("parent {} belongs to another owner", parent.meta.id);
            return Err(StoreError::Invalid {
                field: "parent",
                reason,
            });
        }
    };
    let Some(changed) = changed else {
        return Ok(Vec::new());
    };
    let n = chunk_count(size, cs);
    let dirty = dirty_ranges(changed, size, cs, n)?;
    let psize = parent.meta.virtual_size;
    let remap = |e: Entry| match e {
        Entry::Chunk {
            space: Space::Own,
            id,
            stored_len,
        } if remap_public => Entry::Chunk {
            space: Space::Public,
            id,
            stored_len,
        },
        e => e,
    };
    Ok((0..n)
        .map(|i| {
            let same_len = i < parent.entries.len() as u64
                && chunk_len(psize, cs, i) == chunk_len(size, cs, i);
            if !same_len {
                return ChunkPlan::Read;
            }
            let base = remap(parent.entries[i as usize]);
            let ranges = &dirty[i as usize];
            let changed: u64 = ranges.iter().map(|(_, l)| u64::from(*l)).sum();
            if ranges.is_empty() {
                ChunkPlan::Reuse(base)
            } else if changed as f64 > chunk_len(size, cs, i) as f64 * PATCH_MAX_SHARE {
                ChunkPlan::Read
            } else {
                ChunkPlan::Patch {
                    base,
                    ranges: ranges.clone(),
                }
            }
        })
        .collect())
}

/// Runs `worker` on `threads` scoped threads; the first to fail sets
/// `abort` so the others stop at their next chunk. Returns every worker's
/// result, or the first error.
pub(crate) fn run_workers<T: Send>(
    threads: usize,
    abort: &AtomicBool,
    worker: impl Fn() -> Result<T, StoreError> + Sync,
) -> Result<Vec<T>, StoreError> {
    let results: Vec<Result<T, StoreError>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let r = worker();
                    if r.is_err() {
                        abort.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("store worker panicked"))
            .collect()
    });
    results.into_iter().collect()
}

/// Runs the create pipeline on all cores.
pub(crate) fn run_create(ctx: &CreateCtx<'_>) -> Result<CreateOut, StoreError> {
    let size = ctx.image.virtual_size();
    let n = chunk_count(size, ctx.chunk_size);
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let abort = AtomicBool::new(false);
    // A worker waits while its chunk is read and written; two per core keep
    // the cores busy meanwhile (memory: two chunk buffers per worker).
    let threads = (ctx.store.cfg.threads.clamp(1, 64) * 2).min(n.max(1) as usize);
    let results = run_workers(threads, &abort, || {
        create_worker(ctx, n, &next, &done, &abort)
    })?;
    let mut entries = vec![Entry::Zero; n as usize];
    let mut new_bytes = 0;
    let mut written = Vec::new();
    let mut read_bytes = 0;
    for (part, nb, w, rb) in results {
        new_bytes += nb;
        read_bytes += rb;
        written.extend(w);
        for (i, e) in part {
            entries[i as usize] = e;
        }
    }
    let allocated = (0..n)
        .filter(|i| entries[*i as usize] != Entry::Zero)
        .map(|i| chunk_len(size, ctx.chunk_size, i))
        .sum();
    Ok(CreateOut {
        entries,
        allocated,
        new_bytes,
        written,
        read_bytes,
    })
}

fn create_worker(
    ctx: &CreateCtx<'_>,
    n: u64,
    next: &AtomicU64,
    done: &AtomicU64,
    abort: &AtomicBool,
) -> Result<WorkerOut, StoreError> {
    let size = ctx.image.virtual_size();
    let cs = ctx.chunk_size as usize;
    let mut buf = vec![0u8; cs];
    let mut out = vec![0u8; CHUNK_HEADER_LEN + zstd::zstd_safe::compress_bound(cs)];
    let level = ctx.store.publish_level();
    let mut comp = ctx.store.chunk_compressor(level)?;
    let public_hasher = ctx.store.hasher(&Namespace::Public, false)?;
    let mut dec =
        zstd::bulk::Decompressor::new().map_err(|e| StoreError::Tool(format!("zstd: {e}")))?;
    let mut mine = Vec::new();
    let mut new_bytes = 0u64;
    let mut written = Vec::new();
    let mut read_bytes = 0u64;
    while !abort.load(Ordering::Relaxed) {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        let start = i * u64::from(ctx.chunk_size);
        let len = chunk_len(size, ctx.chunk_size, i) as usize;
        let plan = ctx.reuse.get(i as usize).unwrap_or(&ChunkPlan::Read);
        let entry = match plan {
            ChunkPlan::Reuse(e) => *e,
            ChunkPlan::Read if !ctx.image.has_data(start, len as u64) => Entry::Zero,
            ChunkPlan::Read | ChunkPlan::Patch { .. } => {
                let data = &mut buf[..len];
                read_bytes += fill_chunk(ctx, plan, start, data, &mut dec, &public_hasher)?;
                if is_zero(data) {
                    Entry::Zero
                } else {
                    let (e, nb) = store_chunk(ctx, data, &mut comp, &mut out, &public_hasher)?;
                    if let (Entry::Chunk { id, .. }, 1..) = (e, nb) {
                        written.push(id);
                    }
                    new_bytes += nb;
                    e
                }
            }
        };
        mine.push((i, entry));
        let d = done.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        if let Some(p) = ctx.progress {
            p(Progress {
                done: d,
                total: size,
            });
        }
    }
    Ok((mine, new_bytes, written, read_bytes))
}

/// Fills `data` (the chunk at `start`) as `plan` says: read whole, or the
/// parent's chunk with the changed ranges read over it. Returns the image
/// bytes read.
fn fill_chunk(
    ctx: &CreateCtx<'_>,
    plan: &ChunkPlan,
    start: u64,
    data: &mut [u8],
    dec: &mut zstd::bulk::Decompressor<'_>,
    public_hasher: &ChunkHasher,
) -> Result<u64, StoreError> {
    let ChunkPlan::Patch { base, ranges } = plan else {
        ctx.image.read(start, data)?;
        return Ok(data.len() as u64);
    };
    match base {
        Entry::Zero => data.fill(0),
        Entry::Chunk { space, id, .. } => {
            let (ns, h) = match space {
                Space::Own => (ctx.ns, &ctx.hasher),
                Space::Public => (&Namespace::Public, public_hasher),
            };
            let obj = ctx.store.backend.get(&chunk_key(ns, id))?;
            let got = decode_chunk_into(&obj, data, h, id, dec).map_err(|reason| {
                StoreError::CorruptChunk {
                    chunk: id.to_hex(),
                    snapshot: "the parent".into(),
                    reason,
                }
            })?;
            if got != data.len() {
                return Err(StoreError::CorruptChunk {
                    chunk: id.to_hex(),
                    snapshot: "the parent".into(),
                    reason: format!("holds {got} bytes where {} are needed", data.len()),
                });
            }
        }
    }
    let mut read = 0u64;
    for (off, len) in ranges {
        let (o, l) = (*off as usize, *len as usize);
        ctx.image.read(start + o as u64, &mut data[o..o + l])?;
        read += l as u64;
    }
    Ok(read)
}

/// Hashes one chunk and writes it unless the store already has it.
fn store_chunk(
    ctx: &CreateCtx<'_>,
    data: &[u8],
    comp: &mut zstd::bulk::Compressor<'_>,
    out: &mut [u8],
    public_hasher: &ChunkHasher,
) -> Result<(Entry, u64), StoreError> {
    if !ctx.public.is_empty() {
        let pid = public_hasher.id(data);
        if let Some(sz) = ctx.public.get(&pid) {
            return Ok((
                Entry::Chunk {
                    space: Space::Public,
                    id: pid,
                    stored_len: *sz,
                },
                0,
            ));
        }
    }
    let id = ctx.hasher.id(data);
    if let Some(sz) = ctx.known.lock().expect("known").get(&id) {
        return Ok((
            Entry::Chunk {
                space: Space::Own,
                id,
                stored_len: *sz,
            },
            0,
        ));
    }
    let n = comp
        .compress_to_buffer(data, &mut out[CHUNK_HEADER_LEN..])
        .map_err(|e| StoreError::Tool(format!("zstd: {e}")))?;
    let (codec, total) = if n < data.len() {
        (format::CODEC_ZSTD, CHUNK_HEADER_LEN + n)
    } else {
        out[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + data.len()].copy_from_slice(data);
        (format::CODEC_STORED, CHUNK_HEADER_LEN + data.len())
    };
    out[..CHUNK_HEADER_LEN].copy_from_slice(&format::chunk_header(codec, data.len() as u32));
    ctx.store
        .backend
        .put(&chunk_key(ctx.ns, &id), &out[..total], false)?;
    ctx.known.lock().expect("known").insert(id, total as u32);
    Ok((
        Entry::Chunk {
            space: Space::Own,
            id,
            stored_len: total as u32,
        },
        total as u64,
    ))
}

/// Decodes a chunk object into `buf` (resized to fit), checking length and hash.
pub(crate) fn decode_chunk(
    data: &[u8],
    buf: &mut Vec<u8>,
    hasher: &ChunkHasher,
    id: &ChunkId,
    dec: &mut zstd::bulk::Decompressor<'_>,
) -> Result<usize, String> {
    let (_, raw_len, _) = format::parse_chunk(data).map_err(|e| e.to_string())?;
    if buf.len() < raw_len as usize {
        buf.resize(raw_len as usize, 0);
    }
    decode_chunk_into(data, buf, hasher, id, dec)
}

/// Decodes a chunk object into the front of `dst`, checking length and hash.
pub(crate) fn decode_chunk_into(
    data: &[u8],
    dst: &mut [u8],
    hasher: &ChunkHasher,
    id: &ChunkId,
    dec: &mut zstd::bulk::Decompressor<'_>,
) -> Result<usize, String> {
    let (codec, raw_len, payload) = format::parse_chunk(data).map_err(|e| e.to_string())?;
    let raw_len = raw_len as usize;
    let Some(dst) = dst.get_mut(..raw_len) else {
        return Err(format!("holds {raw_len} bytes, more than a chunk"));
    };
    if codec == format::CODEC_STORED {
        if payload.len() != raw_len {
            return Err("stored payload has the wrong length".into());
        }
        dst.copy_from_slice(payload);
    } else {
        let n = dec
            .decompress_to_buffer(payload, dst)
            .map_err(|e| format!("zstd: {e}"))?;
        if n != raw_len {
            return Err(format!("decompressed {n} bytes, expected {raw_len}"));
        }
    }
    if !hasher.matches(dst, id) {
        return Err("content does not match its hash".into());
    }
    Ok(raw_len)
}

/// Restores a manifest into a new sparse raw file at `path`, bypassing the
/// page cache where the filesystem allows (see `output`).
pub(crate) fn restore_raw(
    store: &Store,
    m: &Manifest,
    own: (&Namespace, &ChunkHasher),
    public: (&Namespace, &ChunkHasher),
    path: &Path,
    progress: Option<ProgressFn<'_>>,
) -> Result<(), StoreError> {
    let outp = |source| StoreError::Output {
        path: path.to_path_buf(),
        source,
    };
    let size = m.meta.virtual_size;
    let f = SparseOut::create(path, size, true).map_err(outp)?;
    let cs = m.meta.chunk_size;
    let n = m.entries.len() as u64;
    let (next, done, abort) = (AtomicU64::new(0), AtomicU64::new(0), AtomicBool::new(false));
    // A direct write blocks its worker until the device has the data, so
    // twice as many workers as cores keep the cores busy meanwhile.
    let per_core = if f.is_direct() { 2 } else { 1 };
    let threads = (store.cfg.threads.clamp(1, 64) * per_core).min(n.max(1) as usize);
    let worker = || -> Result<(), StoreError> {
        let mut abuf = AlignedBuf::new(cs as usize);
        let buf = abuf.as_mut_slice();
        let mut dec =
            zstd::bulk::Decompressor::new().map_err(|e| StoreError::Tool(format!("zstd: {e}")))?;
        while !abort.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let len = chunk_len(size, cs, i);
            if let Entry::Chunk { space, id, .. } = &m.entries[i as usize] {
                let (ns, h) = if *space == Space::Own { own } else { public };
                let snapshot = m.meta.id.clone();
                let data = store.backend.get(&chunk_key(ns, id)).map_err(|e| match e {
                    e if e.is_not_found() => StoreError::MissingChunk {
                        chunk: id.to_hex(),
                        snapshot: snapshot.clone(),
                    },
                    e => e.into(),
                })?;
                let got = decode_chunk_into(&data, buf, h, id, &mut dec).map_err(|reason| {
                    StoreError::CorruptChunk {
                        chunk: id.to_hex(),
                        snapshot: snapshot.clone(),
                        reason,
                    }
                })?;
                if got as u64 != len {
                    let reason = format!("holds {got} bytes where the snapshot needs {len}");
                    return Err(StoreError::CorruptChunk {
                        chunk: id.to_hex(),
                        snapshot,
                        reason,
                    });
                }
                f.write_at(buf, got, i * u64::from(cs)).map_err(outp)?;
            }
            let d = done.fetch_add(len, Ordering::Relaxed) + len;
            if let Some(p) = progress {
                p(Progress {
                    done: d,
                    total: size,
                });
            }
        }
        Ok(())
    };
    run_workers(threads, &abort, worker)?;
    f.finish().map_err(outp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn changed_extents_split_into_chunk_ranges() {
        let cs = 4096u32;
        let d = dirty_ranges(
            &[ext(100, 50), ext(150, 10), ext(4000, 200), ext(9000, 10)],
            16384,
            cs,
            4,
        )
        .unwrap();
        assert_eq!(d[0], vec![(100, 60), (4000, 96)]);
        assert_eq!(d[1], vec![(0, 104)]);
        assert_eq!(d[2], vec![(808, 10)]);
        assert!(d[3].is_empty());
        assert!(dirty_ranges(&[ext(16000, 1000)], 16384, cs, 4).is_err());
    }
}
