//! gantry-store: the snapshot store. Disk images are cut into fixed,
//! disk-aligned chunks; each chunk is named by its (per-account keyed)
//! blake3 hash, zstd-compressed and stored once per namespace. A snapshot is
//! a manifest listing the chunk ids that rebuild the guest-visible bytes.
//!
//! Entry points: [`Store::open`], [`Store::create`], [`Store::restore`],
//! [`Store::verify`], [`Store::gc`], [`Store::list`], [`Store::delete`],
//! [`Store::stats`], [`Store::compact`]; the `gantry-agent snapshot` command line is [`cli`].

pub mod backend;
pub mod cli;
pub mod compact;
pub mod config;
pub mod extents;
pub mod format;
pub mod identity;
pub mod image;
pub mod keys;
pub mod maintain;
mod output;
mod pipeline;
pub mod store;

pub use compact::CompactReport;
pub use config::StoreSettings;
pub use keys::Keyring;
pub use maintain::{GcReport, StatsReport, VerifyReport};
pub use store::{
    parse_extents, CreateRequest, Extent, Progress, ProgressFn, RestoreFormat, SnapshotInfo, Store,
    StoreConfig, StoreError,
};
