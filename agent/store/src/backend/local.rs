//! Local directory backend: one file per object, atomic writes through a
//! `tmp/` directory on the same filesystem, `flock` for the store lock (so a
//! killed process never leaves a stale lock), `syncfs` to make a batch of
//! chunk writes durable with one call. Chunk writes (non-durable puts)
//! bypass the page cache with `O_DIRECT` where the filesystem allows it.

use super::{Backend, BackendError, LockGuard, ObjectInfo};
use crate::output::{AlignedBuf, ALIGN};
use nix::fcntl::{Flock, FlockArg};
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const TMP_DIR: &str = "tmp";
const LOCK_FILE: &str = "lock";

/// A store in a local directory.
pub struct LocalBackend {
    root: PathBuf,
    /// Cleared once the filesystem refuses `O_DIRECT`.
    direct: AtomicBool,
}

thread_local! {
    /// Each writer thread's aligned buffer for direct writes.
    static DIRECT_BUF: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::new(0));
}

/// Writes `data` into the new file `tmp` with `O_DIRECT`, so chunk data
/// goes to the device without filling the host's page cache (which
/// belongs to the guests' disks) and the batch's `syncfs` has little left
/// to flush. The last block is padded and the file trimmed back. Returns
/// false, with nothing left behind, where the filesystem refuses direct I/O.
fn write_direct(tmp: &Path, data: &[u8]) -> std::io::Result<bool> {
    let refused = |e: &std::io::Error| e.raw_os_error() == Some(libc::EINVAL);
    let f = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_DIRECT)
        .open(tmp)
    {
        Ok(f) => f,
        Err(e) if refused(&e) => {
            let _ = std::fs::remove_file(tmp); // created before the flag was refused
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let padded = data.len().next_multiple_of(ALIGN);
    let written = DIRECT_BUF.with_borrow_mut(|buf| {
        if buf.as_mut_slice().len() < padded {
            *buf = AlignedBuf::new(padded);
        }
        let b = &mut buf.as_mut_slice()[..padded];
        b[..data.len()].copy_from_slice(data);
        b[data.len()..].fill(0);
        f.write_all_at(b, 0)
    });
    match written {
        Ok(()) => {
            f.set_len(data.len() as u64)?;
            Ok(true)
        }
        Err(e) if refused(&e) => {
            drop(f);
            std::fs::remove_file(tmp)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn io(op: &'static str, key: &Path) -> impl FnOnce(std::io::Error) -> BackendError {
    let key = key.display().to_string();
    move |source| BackendError::Io { op, key, source }
}

/// Writes `data` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Starts writing `f`'s dirty pages to the device without waiting, so the
/// [`Backend::sync`] that follows a batch of puts finds little left to do.
fn start_writeback(f: &File) {
    // SAFETY: sync_file_range only reads the descriptor, which `f` keeps open.
    // Failure only means the later syncfs does all the work.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// fsyncs a directory so renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl LocalBackend {
    /// Opens (with `create`: creates) the store directory.
    pub fn open(root: &Path, create: bool) -> Result<Self, BackendError> {
        if !root.is_dir() {
            if !create {
                return Err(BackendError::Missing(root.display().to_string()));
            }
            std::fs::create_dir_all(root).map_err(io("create store directory", root))?;
        }
        let tmp = root.join(TMP_DIR);
        if create {
            std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            direct: AtomicBool::new(true),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn walk(&self, dir: &Path, rel: &str, out: &mut Vec<ObjectInfo>) -> Result<(), BackendError> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("list", dir)(e)),
        };
        for ent in rd {
            let ent = ent.map_err(io("list", dir))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let key = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let ft = ent.file_type().map_err(io("stat", &ent.path()))?;
            if ft.is_dir() {
                self.walk(&ent.path(), &key, out)?;
            } else if ft.is_file() {
                let size = match ent.metadata() {
                    Ok(m) => m.len(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io("stat", &ent.path())(e)),
                };
                out.push(ObjectInfo { key, size });
            }
        }
        Ok(())
    }
}

struct FlockGuard(#[allow(dead_code)] Flock<File>);
impl LockGuard for FlockGuard {}

impl Backend for LocalBackend {
    fn put(&self, key: &str, data: &[u8], durable: bool) -> Result<(), BackendError> {
        let path = self.path(key);
        let tmp = self
            .root
            .join(TMP_DIR)
            .join(format!("{:016x}.tmp", rand::random::<u64>()));
        let res = (|| {
            let direct = !durable && self.direct.load(Ordering::Relaxed) && {
                let ok = write_direct(&tmp, data)?;
                if !ok {
                    self.direct.store(false, Ordering::Relaxed);
                }
                ok
            };
            if !direct {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o640)
                    .open(&tmp)?;
                f.write_all(data)?;
                if durable {
                    f.sync_all()?;
                } else {
                    start_writeback(&f);
                }
            }
            let dir = path.parent().expect("keys have a directory");
            if let Err(e) = std::fs::rename(&tmp, &path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(e);
                }
                std::fs::create_dir_all(dir)?;
                std::fs::rename(&tmp, &path)?;
            }
            if durable {
                fsync_dir(dir)?;
            }
            Ok(())
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map_err(io("write", &path))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, BackendError> {
        let path = self.path(key);
        std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BackendError::NotFound(key.to_string())
            } else {
                io("read", &path)(e)
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let prefix = prefix.trim_end_matches('/');
        let mut out = Vec::new();
        self.walk(&self.path(prefix), prefix, &mut out)?;
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("delete", &path)(e)),
        }
        let dir = path.parent().expect("keys have a directory");
        fsync_dir(dir).map_err(io("fsync", dir))
    }

    fn sync(&self) -> Result<(), BackendError> {
        let f = File::open(&self.root).map_err(io("open", &self.root))?;
        // SAFETY: syncfs only reads the descriptor, which `f` keeps open.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(io("syncfs", &self.root)(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn lock(&self, exclusive: bool) -> Result<Box<dyn LockGuard>, BackendError> {
        let path = self.root.join(LOCK_FILE);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open lock", &path))?;
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        let g = Flock::lock(f, arg).map_err(|(_, e)| io("lock", &path)(e.into()))?;
        Ok(Box::new(FlockGuard(g)))
    }

    fn clean_temp(&self) -> Result<u64, BackendError> {
        let dir = self.root.join(TMP_DIR);
        let mut n = 0;
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io("list", &dir)(e)),
        };
        for ent in rd {
            let ent = ent.map_err(io("list", &dir))?;
            std::fs::remove_file(ent.path()).map_err(io("delete", &ent.path()))?;
            n += 1;
        }
        Ok(n)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk writes go through `O_DIRECT` where the filesystem takes it and
    /// through the page cache where it does not; both store the exact bytes.
    #[test]
    fn direct_and_buffered_puts_store_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::open(dir.path(), true).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for (direct, key) in [(true, "chunks/a/00/x"), (false, "chunks/a/00/y")] {
            b.direct.store(direct, Ordering::Relaxed);
            b.put(key, &data, false).unwrap();
            b.put(key, &data[..5], false).unwrap(); // replaced whole
            assert_eq!(b.get(key).unwrap(), &data[..5]);
            b.put(key, &data, false).unwrap();
            assert_eq!(b.get(key).unwrap(), data);
        }
        b.sync().unwrap();
        let tmp: Vec<_> = std::fs::read_dir(dir.path().join(TMP_DIR))
            .unwrap()
            .collect();
        assert!(tmp.is_empty(), "no temp file left behind");
    }
}
