//! Object storage behind the store: a narrow blocking trait with a local
//! directory backend, an S3-compatible backend and an in-memory fake.

pub mod local;
pub mod mem;
pub mod s3;

use std::path::PathBuf;

/// Errors from a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("{op} {key}: {source}")]
    Io {
        op: &'static str,
        key: String,
        source: std::io::Error,
    },
    #[error("object store {op} {key}: {message}")]
    Remote {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("store URL {url:?} is invalid: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("store at {0} does not exist (create a snapshot first to initialise it)")]
    Missing(String),
    #[error("store at {0} is not reachable: {1}")]
    Unreachable(String, String),
}

impl BackendError {
    /// True for a missing object.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound(_))
    }
}

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the store root, `/`-separated.
    pub key: String,
    pub size: u64,
}

/// Held while creating (shared) or collecting garbage (exclusive).
pub trait LockGuard: Send {}

/// The storage a store lives on. Keys are `/`-separated relative paths.
pub trait Backend: Send + Sync {
    /// Stores an object atomically (never half visible). With `durable`, it
    /// is on stable storage when this returns; otherwise after [`Backend::sync`].
    fn put(&self, key: &str, data: &[u8], durable: bool) -> Result<(), BackendError>;
    /// Reads a whole object.
    fn get(&self, key: &str) -> Result<Vec<u8>, BackendError>;
    /// Lists objects under a prefix (recursively).
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError>;
    /// Deletes an object durably; a missing object is not an error.
    fn delete(&self, key: &str) -> Result<(), BackendError>;
    /// Makes every earlier `put` durable.
    fn sync(&self) -> Result<(), BackendError>;
    /// Takes the store lock: shared for creates, exclusive for gc.
    fn lock(&self, exclusive: bool) -> Result<Box<dyn LockGuard>, BackendError>;
    /// Removes leftovers of interrupted writes (called under the exclusive lock).
    fn clean_temp(&self) -> Result<u64, BackendError>;
    /// Human-readable location.
    fn describe(&self) -> String;
}

/// Where a store lives, parsed from a `--store` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl std::str::FromStr for StoreUrl {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| BackendError::BadUrl {
            url: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if !s.contains("://") {
            return Ok(Self::Local(PathBuf::from(s)));
        }
        let u = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        match u.scheme() {
            "file" => {
                let p = u
                    .to_file_path()
                    .map_err(|_| bad("file:// URL must hold an absolute local path"))?;
                Ok(Self::Local(p))
            }
            "s3" => {
                let bucket = u
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("missing bucket"))?;
                if u.query().is_some() || u.fragment().is_some() || !u.username().is_empty() {
                    return Err(bad("s3:// URL takes only bucket and prefix"));
                }
                let prefix = u.path().trim_matches('/').to_string();
                Ok(Self::S3 {
                    bucket: bucket.to_string(),
                    prefix,
                })
            }
            other => Err(bad(&format!(
                "unsupported scheme {other:?} (use a path, file:// or s3://)"
            ))),
        }
    }
}

/// Opens the backend for a URL; `create` initialises a missing local store.
pub fn open(url: &StoreUrl, create: bool) -> Result<Box<dyn Backend>, BackendError> {
    match url {
        StoreUrl::Local(p) => Ok(Box::new(local::LocalBackend::open(p, create)?)),
        StoreUrl::S3 { bucket, prefix } => Ok(Box::new(s3::S3Backend::open(bucket, prefix)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            "/a/b".parse::<StoreUrl>().unwrap(),
            StoreUrl::Local("/a/b".into())
        );
        assert_eq!(
            "file:///a/b".parse::<StoreUrl>().unwrap(),
            StoreUrl::Local("/a/b".into())
        );
        assert_eq!(
            "s3://bkt/x/y/".parse::<StoreUrl>().unwrap(),
            StoreUrl::S3 {
                bucket: "bkt".into(),
                prefix: "x/y".into()
            }
        );
        for bad in ["", "s3://", "http://x/y", "s3://b/p?q=1", "ftp://h/p"] {
            let e = bad.parse::<StoreUrl>().unwrap_err();
            assert!(e.to_string().contains("invalid"), "{bad}: {e}");
        }
    }
}
