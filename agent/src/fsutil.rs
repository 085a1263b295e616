//! Atomic, durable file writes and the versioned JSON envelope every agent
//! state file uses.
//!
//! Every state file is JSON of the form
//! `{"magic": "<kind>", "version": N, ...payload}`; readers check both and
//! refuse anything else. Writes go to a temp file in the same directory, are
//! fsynced, renamed over the target, and the directory is fsynced.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a {expected} file (magic {found:?})")]
    Magic {
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
    #[error("{path}: {kind} version {found} is newer than this agent understands ({supported})")]
    Version {
        path: PathBuf,
        kind: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FsError + 'a {
    move |source| FsError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically and durably, with file mode `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    magic: String,
    version: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Deserialize)]
struct Header {
    magic: String,
    version: u32,
}

/// Writes `body` as a versioned state file.
pub fn write_state<T: Serialize>(
    path: &Path,
    magic: &'static str,
    version: u32,
    body: &T,
) -> Result<(), FsError> {
    let env = Envelope {
        magic: magic.to_string(),
        version,
        body,
    };
    let mut bytes = serde_json::to_vec_pretty(&env).map_err(|source| FsError::Json {
        path: path.into(),
        source,
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, 0o600)
}

/// Reads a versioned state file written by [`write_state`].
pub fn read_state<T: DeserializeOwned>(
    path: &Path,
    magic: &'static str,
    version: u32,
) -> Result<T, FsError> {
    let bytes = fs::read(path).map_err(io_err("read", path))?;
    let json = |source| FsError::Json {
        path: path.into(),
        source,
    };
    let h: Header = serde_json::from_slice(&bytes).map_err(json)?;
    if h.magic != magic {
        return Err(FsError::Magic {
            path: path.into(),
            expected: magic,
            found: h.magic,
        });
    }
    if h.version > version {
        return Err(FsError::Version {
            path: path.into(),
            kind: magic,
            found: h.version,
            supported: version,
        });
    }
    let env: Envelope<T> = serde_json::from_slice(&bytes).map_err(json)?;
    Ok(env.body)
}

/// Creates a directory (and parents) with `mode`; QEMU, running as its own
/// user, must be able to traverse the agent's directories, hence 0711.
pub fn create_dir(path: &Path, mode: u32) -> Result<(), FsError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_err("mkdir", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Thing {
        n: u32,
    }

    #[test]
    fn state_files_round_trip_and_check_magic_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("thing.json");
        write_state(&p, "gantry-thing", 1, &Thing { n: 7 }).unwrap();
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"magic\": \"gantry-thing\""));
        assert_eq!(
            read_state::<Thing>(&p, "gantry-thing", 1).unwrap(),
            Thing { n: 7 }
        );
        let e = read_state::<Thing>(&p, "gantry-other", 1).unwrap_err();
        assert!(matches!(e, FsError::Magic { .. }), "{e}");
        write_state(&p, "gantry-thing", 9, &Thing { n: 7 }).unwrap();
        let e = read_state::<Thing>(&p, "gantry-thing", 1).unwrap_err();
        assert!(e.to_string().contains("version 9 is newer"), "{e}");
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
