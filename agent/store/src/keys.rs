//! Owner namespaces and their chunk-id keys.
//!
//! Every account gets its own 32-byte blake3 key, so the same bytes stored by
//! two accounts get different chunk ids and never deduplicate across accounts.
//! The public namespace (admin images) uses unkeyed blake3. Keys live in the
//! agent's keyring file, never in the store.
//!
//! Keyring file (JSON, written atomically with mode 0600):
//! `{"format":"gantry-store-keyring","version":1,"keys":{"acct":"<64 hex>"}}`

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Format tag of the keyring file.
pub const KEYRING_FORMAT: &str = "gantry-store-keyring";
/// Current keyring file version.
pub const KEYRING_VERSION: u32 = 1;
/// Reserved name of the shared namespace.
pub const PUBLIC: &str = "public";

/// Keyring and namespace errors.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid owner {0:?}: use 1-64 of a-z, 0-9, '-', '_', '.' (and not \"public\")")]
    BadOwner(String),
    #[error("no key for owner {0:?} in the keyring {1}")]
    NoKey(String, String),
    #[error("cannot read keyring {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keyring {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("cannot write keyring {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A chunk namespace: the shared public one or one account's.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Namespace {
    Public,
    Owner(String),
}

impl Namespace {
    /// Namespace for an optional owner (`None` is public); validates the name.
    pub fn for_owner(owner: Option<&str>) -> Result<Self, KeyError> {
        match owner {
            None => Ok(Self::Public),
            Some(o) => {
                validate_owner(o)?;
                Ok(Self::Owner(o.to_string()))
            }
        }
    }

    /// Directory name of the namespace inside `chunks/`.
    pub fn dir(&self) -> String {
        match self {
            Self::Public => PUBLIC.to_string(),
            Self::Owner(o) => format!("acct-{o}"),
        }
    }

    /// Inverse of [`Namespace::dir`].
    pub fn from_dir(dir: &str) -> Option<Self> {
        if dir == PUBLIC {
            return Some(Self::Public);
        }
        let o = dir.strip_prefix("acct-")?;
        validate_owner(o).ok()?;
        Some(Self::Owner(o.to_string()))
    }

    /// The owner name, `None` for public.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Self::Public => None,
            Self::Owner(o) => Some(o),
        }
    }
}

/// Checks an account name is safe as a path component.
pub fn validate_owner(o: &str) -> Result<(), KeyError> {
    let ok = !o.is_empty()
        && o.len() <= 64
        && o != PUBLIC
        && !o.starts_with('.')
        && o.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        });
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadOwner(o.to_string()))
    }
}

/// Hashes raw chunk bytes into a chunk id for one namespace.
#[derive(Clone)]
pub struct ChunkHasher {
    key: Option<[u8; 32]>,
}

impl ChunkHasher {
    /// The chunk id of `data`.
    pub fn id(&self, data: &[u8]) -> crate::format::ChunkId {
        let h = match &self.key {
            Some(k) => blake3::keyed_hash(k, data),
            None => blake3::hash(data),
        };
        crate::format::ChunkId(*h.as_bytes())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    format: String,
    version: u32,
    keys: BTreeMap<String, String>,
}

/// The per-account keys. Backed by a file, or in memory for tests.
pub struct Keyring {
    path: Option<PathBuf>,
    keys: Mutex<BTreeMap<String, [u8; 32]>>,
}

impl Keyring {
    /// A keyring that lives only in memory.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            keys: Mutex::new(BTreeMap::new()),
        }
    }

    /// Loads the keyring at `path`; a missing file is an empty keyring.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let mut keys = BTreeMap::new();
        match std::fs::read(path) {
            Ok(data) => {
                let bad = |reason: String| KeyError::Malformed {
                    path: path.to_path_buf(),
                    reason,
                };
                let f: KeyringFile =
                    serde_json::from_slice(&data).map_err(|e| bad(e.to_string()))?;
                if f.format != KEYRING_FORMAT || f.version != KEYRING_VERSION {
                    return Err(bad(format!("unsupported {} v{}", f.format, f.version)));
                }
                for (owner, hex) in f.keys {
                    validate_owner(&owner).map_err(|e| bad(e.to_string()))?;
                    let k = blake3::Hash::from_hex(&hex)
                        .map_err(|_| bad(format!("key of {owner:?} is not 64 hex digits")))?;
                    keys.insert(owner, *k.as_bytes());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KeyError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        Ok(Self {
            path: Some(path.to_path_buf()),
            keys: Mutex::new(keys),
        })
    }

    /// The hasher of a namespace; with `create`, a new account gets a fresh
    /// random key, saved before it is used.
    pub fn hasher(&self, ns: &Namespace, create: bool) -> Result<ChunkHasher, KeyError> {
        let owner = match ns {
            Namespace::Public => return Ok(ChunkHasher { key: None }),
            Namespace::Owner(o) => o,
        };
        let mut keys = self.keys.lock().expect("keyring lock");
        if let Some(k) = keys.get(owner) {
            return Ok(ChunkHasher { key: Some(*k) });
        }
        if !create {
            let where_ = self
                .path
                .as_ref()
                .map_or("(in memory)".to_string(), |p| p.display().to_string());
            return Err(KeyError::NoKey(owner.clone(), where_));
        }
        let key: [u8; 32] = rand::random();
        keys.insert(owner.clone(), key);
        if let Some(path) = &self.path {
            save(path, &keys).map_err(|source| {
                keys.remove(owner);
                KeyError::Write {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        Ok(ChunkHasher { key: Some(key) })
    }
}

fn save(path: &Path, keys: &BTreeMap<String, [u8; 32]>) -> std::io::Result<()> {
    let file = KeyringFile {
        format: KEYRING_FORMAT.into(),
        version: KEYRING_VERSION,
        keys: keys
            .iter()
            .map(|(o, k)| (o.clone(), blake3::Hash::from_bytes(*k).to_hex().to_string()))
            .collect(),
    };
    let data = serde_json::to_vec_pretty(&file).expect("keyring serializes");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::backend::local::write_atomic(path, &data, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_validated() {
        assert!(Namespace::for_owner(Some("acct-1")).is_ok());
        for bad in ["", "public", "../x", "A", "a/b", ".hidden"] {
            assert!(Namespace::for_owner(Some(bad)).is_err(), "{bad}");
        }
        let ns = Namespace::for_owner(Some("a.b")).unwrap();
        assert_eq!(Namespace::from_dir(&ns.dir()), Some(ns));
    }

    #[test]
    fn keys_differ_per_owner_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let ring = Keyring::load(&path).unwrap();
        let a = Namespace::for_owner(Some("a")).unwrap();
        let b = Namespace::for_owner(Some("b")).unwrap();
        assert!(ring.hasher(&a, false).is_err());
        let ha = ring.hasher(&a, true).unwrap();
        let hb = ring.hasher(&b, true).unwrap();
        assert_ne!(ha.id(b"same"), hb.id(b"same"));
        let again = Keyring::load(&path).unwrap().hasher(&a, false).unwrap();
        assert_eq!(again.id(b"same"), ha.id(b"same"));
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
