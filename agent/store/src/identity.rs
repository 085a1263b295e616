//! Which store a host uses, so the controller knows which hosts can read
//! a snapshot: hosts reporting the same identity see the same snapshots.
//!
//! - S3: `s3-<32 hex>`, a hash of the endpoint (`AWS_ENDPOINT_URL`, else
//!   AWS in `AWS_REGION`), the bucket and the prefix. Nothing is written,
//!   so hosts configured alike agree at once.
//! - A local directory: `local-<32 hex>`, random, kept in the store's
//!   marker object (`gantry-store.json`, field `id`). A store made before
//!   ids existed gets one the first time it is identified.

use crate::backend::{local::LocalBackend, Backend, StoreUrl};
use crate::store::{Marker, StoreError, MARKER_KEY};
use gantry_proto::api::agent::{StoreIdentity, StoreKind};

/// A fresh random local-store id.
pub fn new_local_id() -> String {
    format!("local-{:032x}", rand::random::<u128>())
}

/// The S3 store id of `bucket`/`prefix` at `endpoint`.
pub fn s3_id(endpoint: &str, bucket: &str, prefix: &str) -> String {
    let endpoint = endpoint.trim().trim_end_matches('/').to_ascii_lowercase();
    let prefix = prefix.trim_matches('/');
    let mut h = blake3::Hasher::new_derive_key("gantry snapshot store id v1");
    for part in [endpoint.as_str(), bucket, prefix] {
        h.update(part.as_bytes());
        h.update(&[0]);
    }
    format!("s3-{}", &h.finalize().to_hex()[..32])
}

/// The endpoint S3 calls go to, as `object_store` reads it from the
/// environment.
fn s3_endpoint() -> String {
    for var in ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"] {
        if let Ok(v) = std::env::var(var) {
            if !v.trim().is_empty() {
                return v;
            }
        }
    }
    let region = std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|_| "us-east-1".into());
    format!("aws:{region}")
}

/// The identity of the store at `url`; `None` for a local store that does
/// not exist yet.
pub fn identify(url: &str) -> Result<Option<StoreIdentity>, StoreError> {
    match url.parse::<StoreUrl>()? {
        StoreUrl::S3 { bucket, prefix } => Ok(Some(StoreIdentity {
            kind: StoreKind::S3,
            id: s3_id(&s3_endpoint(), &bucket, &prefix),
        })),
        StoreUrl::Local(path) => {
            if !path.join(MARKER_KEY).exists() {
                return Ok(None);
            }
            let backend = LocalBackend::open(&path, false)?;
            local_id(&backend).map(|id| {
                Some(StoreIdentity {
                    kind: StoreKind::Local,
                    id,
                })
            })
        }
    }
}

/// The id in the marker, written there first if it has none.
fn local_id(backend: &dyn Backend) -> Result<String, StoreError> {
    let where_ = backend.describe();
    let data = backend.get(MARKER_KEY)?;
    let mut m: Marker = serde_json::from_slice(&data)
        .map_err(|e| StoreError::NotAStore(where_.clone(), e.to_string()))?;
    let valid = |id: &str| {
        StoreIdentity {
            kind: StoreKind::Local,
            id: id.to_string(),
        }
        .validate("id")
        .is_ok()
    };
    match &m.id {
        Some(id) if valid(id) => Ok(id.clone()),
        _ => {
            let id = new_local_id();
            m.id = Some(id.clone());
            let data = serde_json::to_vec(&m).expect("marker serializes");
            backend.put(MARKER_KEY, &data, true)?;
            tracing::info!(store = %where_, id, "the snapshot store has an id now");
            Ok(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Store, StoreConfig};

    #[test]
    fn s3_ids_depend_on_endpoint_bucket_and_prefix_only() {
        let a = s3_id("http://127.0.0.1:9787/", "b", "p/");
        assert_eq!(a, s3_id("HTTP://127.0.0.1:9787", "b", "/p"));
        assert_ne!(a, s3_id("http://127.0.0.1:9787", "b", "q"));
        assert_ne!(a, s3_id("http://127.0.0.1:9787", "c", "p"));
        assert_ne!(a, s3_id("http://10.0.0.1:9787", "b", "p"));
        let id = StoreIdentity {
            kind: StoreKind::S3,
            id: a,
        };
        id.validate("store").unwrap();
    }

    #[test]
    fn local_stores_keep_one_random_id() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("store");
        let url = url.to_str().unwrap();
        assert_eq!(identify(url).unwrap(), None, "no store yet");
        let cfg = StoreConfig {
            create_if_missing: true,
            ..StoreConfig::default()
        };
        drop(Store::open(url, cfg).unwrap());
        let a = identify(url).unwrap().unwrap();
        assert_eq!(a.kind, StoreKind::Local);
        a.validate("store").unwrap();
        assert_eq!(identify(url).unwrap(), Some(a.clone()), "stable");
        // A store made before ids existed gets one, once.
        std::fs::write(
            dir.path().join("store").join(MARKER_KEY),
            r#"{"format":"gantry-snapshot-store","version":1}"#,
        )
        .unwrap();
        let b = identify(url).unwrap().unwrap();
        assert_ne!(a, b);
        assert_eq!(identify(url).unwrap(), Some(b));
        // ... and still opens.
        drop(Store::open(url, StoreConfig::default()).unwrap());
        let other = tempfile::tempdir().unwrap();
        let url2 = other.path().to_str().unwrap();
        let cfg = StoreConfig {
            create_if_missing: true,
            ..StoreConfig::default()
        };
        drop(Store::open(url2, cfg).unwrap());
        assert_ne!(
            identify(url2).unwrap().unwrap().id,
            identify(url).unwrap().unwrap().id
        );
    }
}
