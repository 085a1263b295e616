//! Owner namespaces and their chunk-id keys.
//!
//! Every account gets its own 32-byte blake3 key, so the same bytes stored by
//! two accounts get different chunk ids and never deduplicate across accounts.
//! The public namespace (admin images) uses unkeyed blake3. Keys live in the
//! agent's keyring file, never in the store.
//!
//! An account's *current* key names the chunks it writes; *previous* keys
//! only read (a chunk checks out when its id matches any of them), so
//! snapshots written under a key that was later replaced stay restorable.
//! A standalone agent makes a random current key on an account's first
//! snapshot (source `local`). An agent linked to a controller is
//! [`Keyring::set_managed`]: it writes only under a key the controller
//! handed it ([`Keyring::adopt`], source `controller`), which then wins over
//! a different local key (kept as a previous key, never dropped).
//!
//! Keyring file (JSON, written atomically with mode 0600), version 2:
//! `{"format":"gantry-store-keyring","version":2,"keys":{"acct":{"key":"<64 hex>",
//! "source":"controller","previous":["<64 hex>"]}}}`; version 1 files
//! (`"keys":{"acct":"<64 hex>"}`, all local) are read and rewritten as 2.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Format tag of the keyring file.
pub const KEYRING_FORMAT: &str = "gantry-store-keyring";
/// Current keyring file version.
pub const KEYRING_VERSION: u32 = 2;
/// Reserved name of the shared namespace.
pub const PUBLIC: &str = "public";

/// Keyring and namespace errors.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid owner {0:?}: use 1-64 of a-z, 0-9, '-', '_', '.' (and not \"public\")")]
    BadOwner(String),
    #[error("no key for owner {0:?} in the keyring {1}")]
    NoKey(String, String),
    #[error(
        "the controller has not handed this host the chunk key of account {0:?} yet, so it \
         cannot write that account's snapshots"
    )]
    NotProvided(String),
    #[error("a chunk key must be 64 hex digits")]
    BadKey,
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

/// A 32-byte chunk key.
pub type Key = [u8; 32];

/// Parses a key from its 64 hex digits.
pub fn parse_key(hex: &str) -> Result<Key, KeyError> {
    blake3::Hash::from_hex(hex)
        .map(|h| *h.as_bytes())
        .map_err(|_| KeyError::BadKey)
}

/// A key's 64 hex digits (a secret: never log it).
pub fn key_hex(key: &Key) -> String {
    blake3::Hash::from_bytes(*key).to_hex().to_string()
}

/// Hashes raw chunk bytes into a chunk id for one namespace.
#[derive(Clone)]
pub struct ChunkHasher {
    key: Option<Key>,
    /// Read-only keys: chunks named under them still check out.
    previous: Vec<Key>,
}

impl ChunkHasher {
    /// The chunk id of `data` (under the current key).
    pub fn id(&self, data: &[u8]) -> crate::format::ChunkId {
        let h = match &self.key {
            Some(k) => blake3::keyed_hash(k, data),
            None => blake3::hash(data),
        };
        crate::format::ChunkId(*h.as_bytes())
    }

    /// Whether `data` is the chunk named `id`, under the current key or a
    /// previous one.
    pub fn matches(&self, data: &[u8], id: &crate::format::ChunkId) -> bool {
        self.id(data) == *id
            || self
                .previous
                .iter()
                .any(|k| blake3::keyed_hash(k, data).as_bytes() == &id.0)
    }
}

/// Where an account's current key came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    /// Made by this host (a standalone agent, or before it was linked).
    Local,
    /// Handed over by the controller, which keeps it for every host.
    Controller,
}

/// What [`Keyring::adopt`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adopted {
    /// The keyring already held exactly these keys.
    Unchanged,
    /// The account had no key here.
    Added,
    /// The local key was the controller's; now marked so (or previous
    /// keys were added).
    Confirmed,
    /// A different local key was replaced; it stays as a previous key.
    Replaced,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct OwnerKeys {
    current: Key,
    source: KeySource,
    previous: Vec<Key>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    format: String,
    version: u32,
    keys: BTreeMap<String, FileEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum FileEntry {
    /// Version 1: the key alone (local).
    V1(String),
    V2 {
        key: String,
        source: KeySource,
        #[serde(default)]
        previous: Vec<String>,
    },
}

/// The per-account keys. Backed by a file, or in memory for tests.
pub struct Keyring {
    path: Option<PathBuf>,
    keys: Mutex<BTreeMap<String, OwnerKeys>>,
    managed: AtomicBool,
}

impl Keyring {
    /// A keyring that lives only in memory.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            keys: Mutex::new(BTreeMap::new()),
            managed: AtomicBool::new(false),
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
                if f.format != KEYRING_FORMAT || !(1..=KEYRING_VERSION).contains(&f.version) {
                    return Err(bad(format!("unsupported {} v{}", f.format, f.version)));
                }
                for (owner, entry) in f.keys {
                    validate_owner(&owner).map_err(|e| bad(e.to_string()))?;
                    let hex_bad = |_| bad(format!("a key of {owner:?} is not 64 hex digits"));
                    let k = match entry {
                        FileEntry::V1(hex) => OwnerKeys {
                            current: parse_key(&hex).map_err(hex_bad)?,
                            source: KeySource::Local,
                            previous: Vec::new(),
                        },
                        FileEntry::V2 {
                            key,
                            source,
                            previous,
                        } => OwnerKeys {
                            current: parse_key(&key).map_err(hex_bad)?,
                            source,
                            previous: previous
                                .iter()
                                .map(|p| parse_key(p))
                                .collect::<Result<_, _>>()
                                .map_err(hex_bad)?,
                        },
                    };
                    keys.insert(owner, k);
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
            managed: AtomicBool::new(false),
        })
    }

    /// Managed by a controller: writes need a key the controller handed
    /// over ([`Keyring::adopt`]); no key is made up here.
    pub fn set_managed(&self, managed: bool) {
        self.managed.store(managed, Ordering::Relaxed);
    }

    /// The hasher of a namespace; with `create` (writing), a new account
    /// gets a fresh random key, saved before it is used (not when managed).
    pub fn hasher(&self, ns: &Namespace, create: bool) -> Result<ChunkHasher, KeyError> {
        let owner = match ns {
            Namespace::Public => {
                return Ok(ChunkHasher {
                    key: None,
                    previous: Vec::new(),
                })
            }
            Namespace::Owner(o) => o,
        };
        let managed = self.managed.load(Ordering::Relaxed);
        let mut keys = self.keys.lock().expect("keyring lock");
        if let Some(k) = keys.get(owner) {
            if create && managed && k.source != KeySource::Controller {
                return Err(KeyError::NotProvided(owner.clone()));
            }
            return Ok(ChunkHasher {
                key: Some(k.current),
                previous: k.previous.clone(),
            });
        }
        if !create {
            let where_ = self
                .path
                .as_ref()
                .map_or("(in memory)".to_string(), |p| p.display().to_string());
            return Err(KeyError::NoKey(owner.clone(), where_));
        }
        if managed {
            return Err(KeyError::NotProvided(owner.clone()));
        }
        let key: Key = rand::random();
        let entry = OwnerKeys {
            current: key,
            source: KeySource::Local,
            previous: Vec::new(),
        };
        keys.insert(owner.clone(), entry);
        if let Err(e) = self.save(&keys) {
            keys.remove(owner);
            return Err(e);
        }
        Ok(ChunkHasher {
            key: Some(key),
            previous: Vec::new(),
        })
    }

    /// Takes the controller's keys of `owner`: `current` becomes the key
    /// chunks are written under; a different key held here is kept as a
    /// previous (read-only) key, as is every key in `previous`.
    pub fn adopt(&self, owner: &str, current: Key, previous: &[Key]) -> Result<Adopted, KeyError> {
        validate_owner(owner)?;
        let mut keys = self.keys.lock().expect("keyring lock");
        let before = keys.get(owner).cloned();
        let mut next = before.clone().unwrap_or(OwnerKeys {
            current,
            source: KeySource::Controller,
            previous: Vec::new(),
        });
        let outcome = match &before {
            None => Adopted::Added,
            Some(b) if b.current == current => Adopted::Confirmed,
            Some(b) => {
                next.previous.push(b.current);
                Adopted::Replaced
            }
        };
        next.current = current;
        next.source = KeySource::Controller;
        for p in previous {
            if !next.previous.contains(p) {
                next.previous.push(*p);
            }
        }
        next.previous.retain(|p| *p != current);
        if before.as_ref() == Some(&next) {
            return Ok(Adopted::Unchanged);
        }
        keys.insert(owner.to_string(), next);
        if let Err(e) = self.save(&keys) {
            match before {
                Some(b) => keys.insert(owner.to_string(), b),
                None => keys.remove(owner),
            };
            return Err(e);
        }
        Ok(outcome)
    }

    /// Accounts whose current key was made here and never confirmed by a
    /// controller, with that key (to offer it to the controller).
    pub fn local_keys(&self) -> Vec<(String, Key)> {
        let keys = self.keys.lock().expect("keyring lock");
        keys.iter()
            .filter(|(_, k)| k.source == KeySource::Local)
            .map(|(o, k)| (o.clone(), k.current))
            .collect()
    }

    /// Where `owner`'s current key came from, if there is one.
    pub fn source(&self, owner: &str) -> Option<KeySource> {
        let keys = self.keys.lock().expect("keyring lock");
        keys.get(owner).map(|k| k.source)
    }

    fn save(&self, keys: &BTreeMap<String, OwnerKeys>) -> Result<(), KeyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        save(path, keys).map_err(|source| KeyError::Write {
            path: path.clone(),
            source,
        })
    }
}

fn save(path: &Path, keys: &BTreeMap<String, OwnerKeys>) -> std::io::Result<()> {
    let file = KeyringFile {
        format: KEYRING_FORMAT.into(),
        version: KEYRING_VERSION,
        keys: keys
            .iter()
            .map(|(o, k)| {
                let e = FileEntry::V2 {
                    key: key_hex(&k.current),
                    source: k.source,
                    previous: k.previous.iter().map(key_hex).collect(),
                };
                (o.clone(), e)
            })
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

    #[test]
    fn version_1_files_load_as_local() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let hex = "11".repeat(32);
        std::fs::write(
            &path,
            format!(r#"{{"format":"gantry-store-keyring","version":1,"keys":{{"a":"{hex}"}}}}"#),
        )
        .unwrap();
        let ring = Keyring::load(&path).unwrap();
        assert_eq!(ring.source("a"), Some(KeySource::Local));
        assert_eq!(ring.local_keys(), vec![("a".to_string(), [0x11; 32])]);
    }

    #[test]
    fn managed_keyrings_write_only_under_the_controllers_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let ring = Keyring::load(&path).unwrap();
        let a = Namespace::for_owner(Some("a")).unwrap();
        // A local key made before the host was linked.
        let local = ring.hasher(&a, true).unwrap();
        let old_id = local.id(b"old chunk");
        ring.set_managed(true);
        let e = ring.hasher(&a, true).err().unwrap().to_string();
        assert!(e.contains("has not handed this host"), "{e}");
        let b = Namespace::for_owner(Some("b")).unwrap();
        assert!(matches!(
            ring.hasher(&b, true),
            Err(KeyError::NotProvided(_))
        ));
        // The controller's key wins; the local one still reads.
        let ctl = [7u8; 32];
        assert_eq!(ring.adopt("a", ctl, &[]).unwrap(), Adopted::Replaced);
        assert_eq!(ring.adopt("a", ctl, &[]).unwrap(), Adopted::Unchanged);
        let h = ring.hasher(&a, true).unwrap();
        assert_eq!(
            h.id(b"x"),
            crate::format::ChunkId(*blake3::keyed_hash(&ctl, b"x").as_bytes())
        );
        assert!(
            h.matches(b"old chunk", &old_id),
            "the replaced key still reads"
        );
        assert!(!h.matches(b"other", &old_id));
        assert!(ring.local_keys().is_empty());
        // Persisted: a restart keeps both.
        let again = Keyring::load(&path).unwrap();
        assert_eq!(again.source("a"), Some(KeySource::Controller));
        let h2 = again.hasher(&a, false).unwrap();
        assert_eq!(h2.id(b"x"), h.id(b"x"));
        assert!(h2.matches(b"old chunk", &old_id));
        assert_eq!(
            ring.adopt("b", [9; 32], &[[7; 32], [8; 32]]).unwrap(),
            Adopted::Added
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"version\": 2") && text.contains("controller"),
            "{text}"
        );
    }
}
