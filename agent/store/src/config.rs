//! The `[snapshot_store]` section of the agent's config file, and turning
//! it into an opened [`Store`].

use crate::keys::Keyring;
use crate::store::{
    Store, StoreConfig, StoreError, DEFAULT_CHUNK_SIZE, DEFAULT_PUBLISH_LEVEL,
    DEFAULT_ZSTD_HASH_LOG, DEFAULT_ZSTD_LEVEL,
};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

/// Agent config for the snapshot store (TOML/JSON via serde).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// A path, `file://` or `s3://bucket/prefix` URL.
    pub url: String,
    /// Keyring with the per-account chunk keys.
    #[serde(default = "default_keyring")]
    pub keyring: PathBuf,
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
    /// zstd level chunks rest at.
    #[serde(default = "default_level")]
    pub zstd_level: i32,
    /// zstd level snapshots are published at (compacted to `zstd_level`
    /// afterwards when lower).
    #[serde(default = "default_publish_level")]
    pub publish_level: i32,
    /// log2 of zstd's hash table size for chunks; 0 leaves the level's own.
    #[serde(default = "default_hash_log")]
    pub zstd_hash_log: u32,
    /// Worker threads; 0 means all cores.
    #[serde(default)]
    pub threads: usize,
}

fn default_keyring() -> PathBuf {
    PathBuf::from(crate::cli::DEFAULT_KEYRING)
}
fn default_chunk_size() -> u32 {
    DEFAULT_CHUNK_SIZE
}
fn default_level() -> i32 {
    DEFAULT_ZSTD_LEVEL
}
fn default_publish_level() -> i32 {
    DEFAULT_PUBLISH_LEVEL
}
fn default_hash_log() -> u32 {
    DEFAULT_ZSTD_HASH_LOG
}

impl StoreSettings {
    /// Opens (creating when missing) the configured store.
    pub fn open(&self) -> Result<Store, StoreError> {
        let mut cfg = StoreConfig {
            keyring: Arc::new(Keyring::load(&self.keyring)?),
            chunk_size: self.chunk_size,
            zstd_level: self.zstd_level,
            publish_level: self.publish_level,
            zstd_hash_log: self.zstd_hash_log,
            create_if_missing: true,
            ..StoreConfig::default()
        };
        if self.threads > 0 {
            cfg.threads = self.threads;
        }
        Store::open(&self.url, cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_and_refuse_unknown_fields() {
        let s: StoreSettings =
            serde_json::from_str(r#"{"url":"/var/lib/gantry/snapshots"}"#).unwrap();
        assert_eq!(
            (s.chunk_size, s.zstd_level, s.threads),
            (DEFAULT_CHUNK_SIZE, DEFAULT_ZSTD_LEVEL, 0)
        );
        let err = serde_json::from_str::<StoreSettings>(r#"{"url":"/x","chunk":1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
