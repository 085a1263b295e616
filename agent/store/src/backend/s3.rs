//! S3-compatible backend through `object_store`. Endpoint, region and
//! credentials come from the usual `AWS_*` environment variables
//! (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ALLOW_HTTP`). A PUT is atomic and durable once
//! acknowledged, so `sync` has nothing to do. The store lock is a set of
//! `locks/<kind>-<uuid>` objects; a lock older than [`STALE_LOCK`] is ignored.

use super::{Backend, BackendError, LockGuard, ObjectInfo};
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use std::sync::Arc;
use std::time::Duration;

/// Age after which a lock object is considered left behind by a dead process.
pub const STALE_LOCK: Duration = Duration::from_secs(6 * 3600);
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
}
impl LockGuard for S3Lock {}
impl Drop for S3Lock {
    fn drop(&mut self) {
        let (rt, s3) = &self.backend;
        if let Err(e) = rt.block_on(s3.delete(&self.path)) {
            tracing::warn!(lock = %self.path, error = %e, "could not remove store lock");
        }
    }
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
            let guard = S3Lock {
                backend: (self.rt.clone(), self.s3.clone()),
                path: self.path(&name),
            };
            let now = chrono::Utc::now();
            let conflict = self.list_meta("locks/")?.into_iter().any(|m| {
                let key = self.rel(&m.location);
                let fresh = (now - m.last_modified)
                    .to_std()
                    .map_or(true, |age| age < STALE_LOCK);
                key != name && fresh && (exclusive || key.starts_with("locks/exclusive-"))
            });
            if !conflict {
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
