//! The store: opening it, creating snapshots (the parallel read → hash →
//! compress → write pipeline), restoring them, listing and deleting.
//! Verification, garbage collection and statistics live in `maintain`.
//!
//! Store layout (keys under the store root):
//! - `gantry-store.json` marker: `{"format":"gantry-snapshot-store","version":1,
//!   "id":"local-<32 hex>"}` (the id: see `identity`)
//! - `chunks/<namespace>/<2 hex>/<64 hex>`: chunk objects (see `format`)
//! - `snapshots/<snap-id>`: manifests, written last and atomically
//! - `compact/<snap-id>`: chunks written at the fast publish level, waiting
//!   to be recompressed at the level at rest (see `compact`)
//!
//! All calls block; an async caller runs them on a blocking thread.

use crate::backend::{self, Backend, BackendError, StoreUrl};
pub use crate::extents::{parse_extents, Extent};
use crate::format::{self, ChunkId, Entry, FormatError, Manifest, SnapshotMeta};
use crate::image::{ImageError, ImageSource};
use crate::keys::{ChunkHasher, KeyError, Keyring, Namespace};
use crate::pipeline;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Key of the store marker object.
pub const MARKER_KEY: &str = "gantry-store.json";
/// Format tag in the marker.
pub const STORE_FORMAT: &str = "gantry-snapshot-store";
/// Current store layout version.
pub const STORE_VERSION: u32 = 1;
/// Default chunk size (chosen by measurement, see docs/snapshot-store.md).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Default zstd level at rest (chosen by measurement, with
/// [`DEFAULT_ZSTD_HASH_LOG`]; see docs/snapshot-store.md).
pub const DEFAULT_ZSTD_LEVEL: i32 = 2;
/// Default zstd level a create writes new chunks at before publishing. Equal
/// to the level at rest: since a live snapshot saves while the guest runs,
/// writing once at rest costs less CPU than publishing fast and compacting
/// (measured, see docs/benchmarks.md "First snapshot to rest").
pub const DEFAULT_PUBLISH_LEVEL: i32 = DEFAULT_ZSTD_LEVEL;
/// Default log2 of zstd's hash table size for chunks (level 2's own is 16):
/// at level 2 it stores 1.6% fewer bytes for 15% more CPU, still 25% less
/// CPU than level 3 (measured, see docs/snapshot-store.md).
pub const DEFAULT_ZSTD_HASH_LOG: u32 = 17;

/// Errors of store operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("snapshot {id}: {source}")]
    BadManifest { id: String, source: FormatError },
    #[error("unknown snapshot {0}")]
    UnknownSnapshot(String),
    #[error("invalid snapshot id {0:?} (expected snap-<32 hex>)")]
    BadId(String),
    #[error("chunk {chunk} of snapshot {snapshot} is corrupt: {reason}")]
    CorruptChunk {
        chunk: String,
        snapshot: String,
        reason: String,
    },
    #[error("chunk {chunk} of snapshot {snapshot} is missing from the store")]
    MissingChunk { chunk: String, snapshot: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {0} is not a gantry snapshot store: {1}")]
    NotAStore(String, String),
    #[error("{0}")]
    Tool(String),
}

/// Store tuning; the defaults are the measured choices.
pub struct StoreConfig {
    pub keyring: Arc<Keyring>,
    pub chunk_size: u32,
    /// Level chunks rest at (after compaction).
    pub zstd_level: i32,
    /// Level a create writes new chunks at. When below `zstd_level`, the
    /// create queues them for [`Store::compact`]; otherwise it writes them
    /// at `zstd_level` directly.
    pub publish_level: i32,
    /// log2 of zstd's hash table size; 0 leaves the level's own.
    pub zstd_hash_log: u32,
    pub threads: usize,
    /// Initialise the store when it does not exist yet.
    pub create_if_missing: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            keyring: Arc::new(Keyring::in_memory()),
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            publish_level: DEFAULT_PUBLISH_LEVEL,
            zstd_hash_log: DEFAULT_ZSTD_HASH_LOG,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            create_if_missing: false,
        }
    }
}

/// Progress of a long operation, in guest bytes.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// Progress callback; called from worker threads.
pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Sync);

/// What to snapshot.
pub struct CreateRequest<'a> {
    pub image: &'a Path,
    pub name: &'a str,
    /// Owning account; `None` puts the snapshot in the public namespace.
    pub owner: Option<&'a str>,
    pub parent: Option<&'a str>,
    /// With a parent: only these ranges changed since it was taken.
    pub changed_extents: Option<&'a [Extent]>,
    pub progress: Option<ProgressFn<'a>>,
    /// Publish under this id (`snap-<32 hex>`, e.g. one the controller
    /// chose); `None` makes a fresh one. An id already in the store is
    /// refused.
    pub id: Option<&'a str>,
}

/// A snapshot as reported to callers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub owner: Option<String>,
    pub parent: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Guest-visible size.
    pub logical_size: u64,
    /// Bytes in non-zero chunks.
    pub allocated_size: u64,
    /// Compressed bytes of the distinct chunks it references.
    pub stored_bytes: u64,
    /// Compressed bytes this create wrote (0 when listed later).
    pub new_bytes: u64,
    /// Guest bytes this create read from the image: the chunks it could
    /// not take from its parent and that hold data (0 when listed later).
    #[serde(default)]
    pub read_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub chunk_size: u32,
}

impl SnapshotInfo {
    pub(crate) fn from_manifest(m: &Manifest, new_bytes: u64) -> Self {
        let mut seen = std::collections::HashSet::new();
        let mut stored = 0u64;
        let mut zero = 0;
        for e in &m.entries {
            match e {
                Entry::Zero => zero += 1,
                Entry::Chunk {
                    space,
                    id,
                    stored_len,
                } => {
                    if seen.insert((*space, *id)) {
                        stored += u64::from(*stored_len);
                    }
                }
            }
        }
        let meta = &m.meta;
        Self {
            id: meta.id.clone(),
            name: meta.name.clone(),
            owner: meta.owner.clone(),
            parent: meta.parent.clone(),
            created_at: meta.created_at,
            logical_size: meta.virtual_size,
            allocated_size: meta.allocated_bytes,
            stored_bytes: stored,
            new_bytes,
            read_bytes: 0,
            chunks: m.entries.len() as u64,
            zero_chunks: zero,
            chunk_size: meta.chunk_size,
        }
    }
}

/// Output format of a restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreFormat {
    Raw,
    Qcow2,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Marker {
    pub(crate) format: String,
    pub(crate) version: u32,
    /// The store's random identity (`local-<32 hex>`), see `identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<String>,
}

/// A snapshot store on some backend.
pub struct Store {
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) cfg: StoreConfig,
}

/// Object key of a chunk.
pub fn chunk_key(ns: &Namespace, id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("chunks/{}/{}/{hex}", ns.dir(), &hex[..2])
}

/// Object key of a manifest.
pub fn manifest_key(id: &str) -> String {
    format!("snapshots/{id}")
}

fn check_id(id: &str) -> Result<(), StoreError> {
    id.parse::<gantry_proto::SnapshotId>()
        .map(|_| ())
        .map_err(|_| StoreError::BadId(id.to_string()))
}

impl Store {
    /// Opens the store at `url` (a path, `file://` or `s3://bucket/prefix`).
    pub fn open(url: &str, cfg: StoreConfig) -> Result<Self, StoreError> {
        let parsed: StoreUrl = url.parse()?;
        let backend = backend::open(&parsed, cfg.create_if_missing)?;
        Self::with_backend(backend, cfg)
    }

    /// Opens a store on an already-built backend.
    pub fn with_backend(backend: Box<dyn Backend>, cfg: StoreConfig) -> Result<Self, StoreError> {
        if !(format::MIN_CHUNK_SIZE..=format::MAX_CHUNK_SIZE).contains(&cfg.chunk_size)
            || !cfg.chunk_size.is_power_of_two()
        {
            return Err(StoreError::Invalid {
                field: "chunk size",
                reason: format!(
                    "{} is not a power of two between 4 KiB and 64 MiB",
                    cfg.chunk_size
                ),
            });
        }
        for (field, level) in [
            ("zstd level", cfg.zstd_level),
            ("publish level", cfg.publish_level),
        ] {
            if !zstd::compression_level_range().contains(&level) {
                return Err(StoreError::Invalid {
                    field,
                    reason: format!("{level} is out of range"),
                });
            }
        }
        if cfg.zstd_hash_log != 0 && !(6..=30).contains(&cfg.zstd_hash_log) {
            return Err(StoreError::Invalid {
                field: "zstd hash log",
                reason: format!("{} is not 0 or between 6 and 30", cfg.zstd_hash_log),
            });
        }
        let where_ = backend.describe();
        match backend.get(MARKER_KEY) {
            Ok(data) => {
                let m: Marker = serde_json::from_slice(&data)
                    .map_err(|e| StoreError::NotAStore(where_.clone(), e.to_string()))?;
                if m.format != STORE_FORMAT || m.version != STORE_VERSION {
                    let why = format!("unsupported layout {} v{}", m.format, m.version);
                    return Err(StoreError::NotAStore(where_, why));
                }
            }
            Err(e) if e.is_not_found() && cfg.create_if_missing => {
                let m = Marker {
                    format: STORE_FORMAT.into(),
                    version: STORE_VERSION,
                    id: Some(crate::identity::new_local_id()),
                };
                backend.put(MARKER_KEY, &serde_json::to_vec(&m).expect("marker"), true)?;
            }
            Err(e) if e.is_not_found() => return Err(BackendError::Missing(where_).into()),
            Err(e) => return Err(e.into()),
        }
        Ok(Self { backend, cfg })
    }

    /// Sets the number of worker threads (at least 1).
    pub fn set_threads(&mut self, n: usize) {
        self.cfg.threads = n.max(1);
    }

    /// The level a create writes new chunks at.
    pub fn publish_level(&self) -> i32 {
        self.cfg.publish_level.min(self.cfg.zstd_level)
    }

    /// A zstd compressor for chunks at `level`: its window covers a whole
    /// chunk (a chunk is one frame; decoding needs the chunk's size of
    /// memory in any case) and its hash table is `zstd_hash_log` wide.
    pub(crate) fn chunk_compressor(
        &self,
        level: i32,
    ) -> Result<zstd::bulk::Compressor<'static>, StoreError> {
        use zstd::stream::raw::CParameter;
        let tool = |e: std::io::Error| StoreError::Tool(format!("zstd: {e}"));
        let mut c = zstd::bulk::Compressor::new(level).map_err(tool)?;
        let window = self.cfg.chunk_size.trailing_zeros().clamp(10, 27);
        c.set_parameter(CParameter::WindowLog(window))
            .map_err(tool)?;
        if self.cfg.zstd_hash_log != 0 {
            c.set_parameter(CParameter::HashLog(self.cfg.zstd_hash_log))
                .map_err(tool)?;
        }
        Ok(c)
    }

    /// Where the store lives.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Reads and parses one manifest.
    pub fn manifest(&self, id: &str) -> Result<Manifest, StoreError> {
        check_id(id)?;
        let data = self.backend.get(&manifest_key(id)).map_err(|e| {
            if e.is_not_found() {
                StoreError::UnknownSnapshot(id.to_string())
            } else {
                e.into()
            }
        })?;
        let m = Manifest::decode(&data).map_err(|source| StoreError::BadManifest {
            id: id.to_string(),
            source,
        })?;
        if m.meta.id != id {
            let source = FormatError::Invalid(format!("manifest names itself {}", m.meta.id));
            return Err(StoreError::BadManifest {
                id: id.to_string(),
                source,
            });
        }
        Ok(m)
    }

    /// Ids of all published snapshots.
    pub fn snapshot_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .backend
            .list("snapshots/")?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix("snapshots/").map(str::to_string))
            .filter(|id| check_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// All snapshots, oldest first.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let mut out = Vec::new();
        let sizes = self.chunk_object_sizes()?;
        for id in self.snapshot_ids()? {
            match self.manifest(&id) {
                Ok(mut m) => {
                    crate::compact::current_sizes(&mut m, &sizes);
                    out.push(SnapshotInfo::from_manifest(&m, 0))
                }
                Err(StoreError::UnknownSnapshot(_)) => {} // deleted meanwhile
                Err(e @ StoreError::BadManifest { .. }) => {
                    tracing::warn!(error = %e, "skipping unreadable manifest (see verify)");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Deletes a snapshot's manifest; its chunks go at the next gc.
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        // Existence only: a damaged manifest must stay deletable.
        check_id(id)?;
        self.backend.get(&manifest_key(id)).map_err(|e| {
            if e.is_not_found() {
                StoreError::UnknownSnapshot(id.to_string())
            } else {
                e.into()
            }
        })?;
        self.backend.delete(&manifest_key(id))?;
        self.backend.delete(&crate::compact::compact_key(id))?;
        Ok(())
    }

    pub(crate) fn hasher(&self, ns: &Namespace, create: bool) -> Result<ChunkHasher, StoreError> {
        Ok(self.cfg.keyring.hasher(ns, create)?)
    }

    /// Existing chunks of a namespace with their stored sizes.
    pub(crate) fn chunk_sizes(&self, ns: &Namespace) -> Result<HashMap<ChunkId, u32>, StoreError> {
        let prefix = format!("chunks/{}/", ns.dir());
        Ok(self
            .backend
            .list(&prefix)?
            .into_iter()
            .filter_map(|o| {
                let name = o.key.rsplit('/').next()?;
                Some((ChunkId::from_hex(name)?, o.size as u32))
            })
            .collect())
    }

    /// Takes a snapshot of an image.
    pub fn create(&self, req: &CreateRequest<'_>) -> Result<SnapshotInfo, StoreError> {
        check_create(req)?;
        let name = req.name;
        let ns = Namespace::for_owner(req.owner)?;
        let hasher = self.hasher(&ns, true)?;
        let image = ImageSource::open(req.image)?;
        let _lock = self.backend.lock(false)?;
        if let Some(id) = req.id {
            self.refuse_existing(id)?;
        }
        let parent = req.parent.map(|p| self.manifest(p)).transpose()?;
        let chunk_size = parent
            .as_ref()
            .map_or(self.cfg.chunk_size, |p| p.meta.chunk_size);
        let reuse = match &parent {
            Some(p) => pipeline::reuse_plan(
                p,
                &ns,
                image.virtual_size(),
                chunk_size,
                req.changed_extents,
            )?,
            None => Vec::new(),
        };
        let known = self.chunk_sizes(&ns)?;
        let public = match ns {
            Namespace::Public => HashMap::new(),
            Namespace::Owner(_) => self.chunk_sizes(&Namespace::Public)?,
        };
        let id = req.id.map_or_else(
            || gantry_proto::SnapshotId::new().to_string(),
            str::to_string,
        );
        tracing::info!(snapshot = %id, image = %req.image.display(), store = %self.describe(), "creating snapshot");
        let ctx = pipeline::CreateCtx {
            store: self,
            image: &image,
            ns: &ns,
            hasher,
            chunk_size,
            reuse,
            known: std::sync::Mutex::new(known),
            public,
            progress: req.progress,
        };
        let out = pipeline::run_create(&ctx)?;
        let manifest = Manifest {
            meta: SnapshotMeta {
                id: id.clone(),
                name: name.to_string(),
                owner: ns.owner().map(str::to_string),
                parent: req.parent.map(str::to_string),
                created_at: chrono::Utc::now(),
                virtual_size: image.virtual_size(),
                chunk_size,
                zstd_level: self.publish_level(),
                source_format: image.format().as_str().into(),
                allocated_bytes: out.allocated,
            },
            entries: out.entries,
        };
        // Every chunk must be durable before the manifest can name it.
        self.backend.sync()?;
        self.queue_compaction(&id, &ns, out.written)?;
        gantry_crashpoint::hit("agent.store.before_manifest");
        self.backend
            .put(&manifest_key(&id), &manifest.encode(), true)?;
        tracing::info!(snapshot = %id, new_bytes = out.new_bytes, read_bytes = out.read_bytes, "snapshot published");
        Ok(SnapshotInfo {
            read_bytes: out.read_bytes,
            ..SnapshotInfo::from_manifest(&manifest, out.new_bytes)
        })
    }

    /// Refuses a snapshot id the store already has (under the lock).
    fn refuse_existing(&self, id: &str) -> Result<(), StoreError> {
        match self.backend.get(&manifest_key(id)) {
            Ok(_) => Err(StoreError::Invalid {
                field: "id",
                reason: format!("snapshot {id} already exists"),
            }),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Restores a snapshot to `out` (created atomically), checking every chunk.
    pub fn restore(
        &self,
        id: &str,
        out: &Path,
        fmt: RestoreFormat,
        progress: Option<ProgressFn<'_>>,
    ) -> Result<SnapshotInfo, StoreError> {
        let m = self.manifest(id)?;
        let own = Namespace::for_owner(m.meta.owner.as_deref())?;
        let own_h = self.hasher(&own, false)?;
        let pub_h = self.hasher(&Namespace::Public, false)?;
        let dir = out
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = out
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("restore");
        let tmp_raw = dir.join(format!(
            ".{base}.gantry-restore-{:08x}",
            rand::random::<u32>()
        ));
        let outp = |source| StoreError::Output {
            path: out.to_path_buf(),
            source,
        };
        let res = (|| {
            pipeline::restore_raw(
                self,
                &m,
                (&own, &own_h),
                (&Namespace::Public, &pub_h),
                &tmp_raw,
                progress,
            )?;
            let final_tmp = match fmt {
                RestoreFormat::Raw => tmp_raw.clone(),
                RestoreFormat::Qcow2 => {
                    let q = dir.join(format!(
                        ".{base}.gantry-qcow2-{:08x}",
                        rand::random::<u32>()
                    ));
                    let r = convert_to_qcow2(&tmp_raw, &q);
                    let _ = std::fs::remove_file(&tmp_raw);
                    r?;
                    q
                }
            };
            let r = (|| {
                std::fs::File::open(&final_tmp)?.sync_all()?;
                std::fs::rename(&final_tmp, out)?;
                backend::local::fsync_dir(dir)
            })();
            if r.is_err() {
                let _ = std::fs::remove_file(&final_tmp);
            }
            r.map_err(outp)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp_raw);
        }
        res?;
        Ok(SnapshotInfo::from_manifest(&m, 0))
    }
}

/// A create request's own fields: the name (1-200 printable characters),
/// a changed-extent list only with a parent, a well-formed id.
fn check_create(req: &CreateRequest<'_>) -> Result<(), StoreError> {
    let name = req.name;
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid {
            field: "name",
            reason: "must be 1-200 printable characters".into(),
        });
    }
    if req.changed_extents.is_some() && req.parent.is_none() {
        return Err(StoreError::Invalid {
            field: "changed extents",
            reason: "a changed-extent list needs --parent".into(),
        });
    }
    req.id.map_or(Ok(()), check_id)
}

fn convert_to_qcow2(raw: &Path, out: &Path) -> Result<(), StoreError> {
    // Out-of-order writes, and both files read and written with O_DIRECT
    // (`-T none -t none`) like the raw restore before it; where the
    // filesystem refuses direct I/O, the same conversion through the page
    // cache.
    let mut last = String::new();
    for cache in [&["-T", "none", "-t", "none"][..], &[]] {
        let o = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2", "-W"])
            .args(cache)
            .arg(raw)
            .arg(out)
            .output()
            .map_err(|e| StoreError::Tool(format!("cannot run qemu-img: {e}")))?;
        if o.status.success() {
            return Ok(());
        }
        let _ = std::fs::remove_file(out);
        last = String::from_utf8_lossy(&o.stderr).trim().to_string();
    }
    Err(StoreError::Tool(format!(
        "qemu-img convert to qcow2 failed: {last}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mem::MemBackend;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn store() -> Store {
        let cfg = StoreConfig {
            chunk_size: 65536,
            create_if_missing: true,
            ..StoreConfig::default()
        };
        Store::with_backend(Box::new(MemBackend::default()), cfg).unwrap()
    }

    fn image(dir: &Path, name: &str, fill: &[(u64, u8)]) -> PathBuf {
        let p = dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        for (off, b) in fill {
            let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 ^ b).collect();
            f.write_all_at(&data, *off).unwrap();
        }
        p
    }

    fn req<'a>(
        image: &'a Path,
        owner: Option<&'a str>,
        parent: Option<&'a str>,
    ) -> CreateRequest<'a> {
        CreateRequest {
            image,
            name: "t",
            owner,
            parent,
            changed_extents: None,
            progress: None,
            id: None,
        }
    }

    #[test]
    fn progress_reaches_the_disk_size() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), "a.raw", &[(0, 1), (65536 * 3, 2)]);
        let s = store();
        let last = AtomicU64::new(0);
        let cb = |p: Progress| {
            assert_eq!(p.total, 1 << 20);
            last.fetch_max(p.done, Ordering::Relaxed);
        };
        let r = CreateRequest {
            progress: Some(&cb),
            ..req(&img, None, None)
        };
        let info = s.create(&r).unwrap();
        assert_eq!(last.load(Ordering::Relaxed), 1 << 20);
        assert_eq!((info.chunks, info.zero_chunks), (16, 14));
    }

    #[test]
    fn incremental_child_of_public_image_references_public_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let base = image(
            dir.path(),
            "base.raw",
            &[(0, 1), (65536, 2), (65536 * 5, 3)],
        );
        let s = store();
        let pub_snap = s.create(&req(&base, None, None)).unwrap();
        let child_img = image(
            dir.path(),
            "child.raw",
            &[(0, 1), (65536, 9), (65536 * 5, 3)],
        );
        let ext = [Extent {
            offset: 65536,
            length: 100,
        }];
        let r = CreateRequest {
            changed_extents: Some(&ext),
            ..req(&child_img, Some("acct"), Some(&pub_snap.id))
        };
        let child = s.create(&r).unwrap();
        assert_eq!(
            child.new_bytes,
            child.stored_bytes - 2 * (pub_snap.stored_bytes / 3),
            "only the changed chunk is new"
        );
        let stats = s.stats().unwrap();
        let acct = stats
            .owners
            .iter()
            .find(|o| o.owner.as_deref() == Some("acct"))
            .unwrap();
        assert_eq!(
            acct.billed_bytes, child.new_bytes,
            "public chunks are not billed to the account"
        );
        // A parent of another account is refused.
        let other = s.create(&req(&base, Some("other"), None)).unwrap();
        let err = s
            .create(&req(&base, Some("acct"), Some(&other.id)))
            .unwrap_err();
        assert!(err.to_string().contains("another owner"), "{err}");
    }

    #[test]
    fn publishes_under_a_given_id_once() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), "a.raw", &[(0, 1)]);
        let s = store();
        let want = gantry_proto::SnapshotId::new().to_string();
        let r = CreateRequest {
            id: Some(&want),
            ..req(&img, Some("acct"), None)
        };
        let info = s.create(&r).unwrap();
        assert_eq!(info.id, want);
        assert_eq!(s.manifest(&want).unwrap().meta.id, want);
        let again = s.create(&r).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
        let bad = CreateRequest {
            id: Some("snap-nothex"),
            ..req(&img, None, None)
        };
        let e = s.create(&bad).unwrap_err().to_string();
        assert!(e.contains("invalid snapshot id"), "{e}");
        assert_eq!(s.snapshot_ids().unwrap(), vec![want]);
    }
}
