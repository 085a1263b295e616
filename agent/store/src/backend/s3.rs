//! S3-compatible backend through `object_store`. Endpoint, region and
//! credentials come from the usual `AWS_*` environment variables
//! (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ALLOW_HTTP`). A PUT is atomic and durable once
//! acknowledged, so `sync` has nothing to do.
//!
//! The store lock is a set of `locks/<kind>-<uuid>` objects, each a lease:
//! its holder rewrites it every [`LEASE_REFRESH`] while it holds the lock,
//! and a lock object not rewritten for [`STALE_LOCK`] was left by a dead
//! process and is ignored. Ages are measured on the server's clock (the
//! `last_modified` of the lock just written by the requester against the
//! others'), so clock skew between hosts does not matter.

use super::{Backend, BackendError, LockGuard, ObjectInfo};
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use std::sync::Arc;
use std::time::Duration;

/// Age after which a lock object not refreshed is considered left behind by
/// a dead process.
pub const STALE_LOCK: Duration = Duration::from_secs(120);
/// How often a holder rewrites its lock object.
pub const LEASE_REFRESH: Duration = Duration::from_secs(20);
/// How long a lock request waits for a conflicting lock to go away.
pub const LOCK_WAIT: Duration = Duration::from_secs(120);

/// A store under `s3://bucket/prefix`.
pub struct S3Backend {
    rt: Arc<tokio::runtime::Runtime>,
    s3: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
}

impl S3Backend {
    /// Connects and checks the bucket answers.
    pub fn open(bucket: &str, prefix: &str) -> Result<Self, BackendError> {
        let url = format!("s3://{bucket}/{prefix}");
        // with_client_options replaces what from_env read, so AWS_ALLOW_HTTP is applied here.
        let allow_http = std::env::var("AWS_ALLOW_HTTP")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let client = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(60));
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
            ..RetryConfig::default()
        };
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(|e| BackendError::BadUrl {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| BackendError::Unreachable(url.clone(), e.to_string()))?;
        let me = Self {
            rt: Arc::new(rt),
            s3: Arc::new(s3),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        };
        match me.rt.block_on(me.s3.head(&me.path("gantry-store.json"))) {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(me),
            Err(e) => Err(BackendError::Unreachable(url, e.to_string())),
        }
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn rel(&self, p: &ObjPath) -> String {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&format!("{}/", self.prefix))
                .unwrap_or(s)
                .to_string()
        }
    }

    fn remote(op: &'static str, key: &str, e: object_store::Error) -> BackendError {
        match e {
            object_store::Error::NotFound { .. } => BackendError::NotFound(key.to_string()),
            e => BackendError::Remote {
                op,
                key: key.to_string(),
                message: e.to_string(),
            },
        }
    }

    fn list_meta(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>, BackendError> {
        let p = self.path(prefix.trim_end_matches('/'));
        self.rt
            .block_on(self.s3.list(Some(&p)).try_collect::<Vec<_>>())
            .map_err(|e| Self::remote("list", prefix, e))
    }
}

struct S3Lock {
    backend: (Arc<tokio::runtime::Runtime>, Arc<AmazonS3>),
    path: ObjPath,
    /// Dropping it stops the lease refresher.
    stop: Option<std::sync::mpsc::Sender<()>>,
    refresher: Option<std::thread::JoinHandle<()>>,
}
impl LockGuard for S3Lock {}

impl S3Lock {
    /// Keeps the lease fresh until the guard is dropped.
    fn refresh_lease(&mut self) {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (rt, s3) = self.backend.clone();
        let path = self.path.clone();
        self.stop = Some(tx);
        self.refresher = std::thread::Builder::new()
            .name("s3-lock-lease".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(LEASE_REFRESH)
                {
                    let body = PutPayload::from(format!("pid {}", std::process::id()));
                    if let Err(e) = rt.block_on(s3.put(&path, body)) {
                        tracing::warn!(lock = %path, error = %e, "could not refresh store lock");
                    }
                }
            })
            .ok();
    }
}

impl Drop for S3Lock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let (rt, s3) = &self.backend;
        if let Err(e) = rt.block_on(s3.delete(&self.path)) {
            tracing::warn!(lock = %self.path, error = %e, "could not remove store lock");
        }
    }
}

/// Whether lock `key` keeps `mine` (just written) from being taken: it is
/// another lock, still fresh on the server's clock, and conflicts.
fn conflicts(
    key: &str,
    modified: chrono::DateTime<chrono::Utc>,
    mine: &str,
    mine_modified: chrono::DateTime<chrono::Utc>,
    exclusive: bool,
) -> bool {
    let fresh = (mine_modified - modified)
        .to_std()
        .map_or(true, |age| age < STALE_LOCK);
    key != mine && fresh && (exclusive || key.starts_with("locks/exclusive-"))
}

impl Backend for S3Backend {
    fn put(&self, key: &str, data: &[u8], _durable: bool) -> Result<(), BackendError> {
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        self.rt
            .block_on(self.s3.put(&self.path(key), payload))
            .map(|_| ())
            .map_err(|e| Self::remote("put", key, e))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, BackendError> {
        self.rt
            .block_on(async { self.s3.get(&self.path(key)).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| Self::remote("get", key, e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        Ok(self
            .list_meta(prefix)?
            .into_iter()
            .map(|m| ObjectInfo {
                key: self.rel(&m.location),
                size: m.size,
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), BackendError> {
        match self.rt.block_on(self.s3.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::remote("delete", key, e)),
        }
    }

    fn sync(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn lock(&self, exclusive: bool) -> Result<Box<dyn LockGuard>, BackendError> {
        let kind = if exclusive { "exclusive" } else { "shared" };
        let name = format!("locks/{kind}-{}", uuid_like());
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            self.put(
                &name,
                format!("pid {}", std::process::id()).as_bytes(),
                true,
            )?;
            let mut guard = S3Lock {
                backend: (self.rt.clone(), self.s3.clone()),
                path: self.path(&name),
                stop: None,
                refresher: None,
            };
            let locks: Vec<(String, chrono::DateTime<chrono::Utc>)> = self
                .list_meta("locks/")?
                .into_iter()
                .map(|m| (self.rel(&m.location), m.last_modified))
                .collect();
            let mine_at = locks
                .iter()
                .find(|(k, _)| *k == name)
                .map_or_else(chrono::Utc::now, |(_, at)| *at);
            let conflict = locks
                .iter()
                .any(|(k, at)| conflicts(k, *at, &name, mine_at, exclusive));
            if !conflict {
                guard.refresh_lease();
                return Ok(Box::new(guard));
            }
            drop(guard);
            if std::time::Instant::now() > deadline {
                return Err(BackendError::Remote {
                    op: "lock",
                    key: name,
                    message: "store is busy (another gc or create holds its lock)".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(200 + rand::random::<u64>() % 800));
        }
    }

    fn clean_temp(&self) -> Result<u64, BackendError> {
        Ok(0)
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

fn uuid_like() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    #[test]
    fn stale_and_compatible_locks_do_not_conflict() {
        let now = Utc.timestamp_opt(1_000_000, 0).unwrap();
        let old = now - chrono::Duration::seconds(STALE_LOCK.as_secs() as i64 + 1);
        let recent = now - chrono::Duration::seconds(5);
        let me = "locks/shared-a";
        // Shared locks share; an exclusive one blocks them while fresh.
        assert!(!conflicts("locks/shared-b", recent, me, now, false));
        assert!(conflicts("locks/exclusive-b", recent, me, now, false));
        assert!(!conflicts("locks/exclusive-b", old, me, now, false));
        // An exclusive request waits for every fresh lock but its own.
        assert!(conflicts(
            "locks/shared-b",
            recent,
            "locks/exclusive-a",
            now,
            true
        ));
        assert!(!conflicts(
            "locks/exclusive-a",
            now,
            "locks/exclusive-a",
            now,
            true
        ));
        // A lock written "in the future" (server clock) is fresh.
        let later = now + chrono::Duration::seconds(30);
        assert!(conflicts("locks/exclusive-b", later, me, now, false));
    }
}
