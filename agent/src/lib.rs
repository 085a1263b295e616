//! `gantry-agent`: the host agent of a Gantry GPU cloud.
//!
//! Code map:
//! - [`config`]: the config file and its defaults.
//! - [`layout`]: the state directory and its versioned records.
//! - [`fsutil`]: atomic writes and the versioned JSON envelope.
//! - [`disks`]: qcow2 overlays, blank volumes, growth (`qemu-img`).
//! - [`images`]: the host's checksummed image cache.
//! - [`domain_xml`]: typed, escaped libvirt domain XML.
//! - [`libvirt`]: the narrow wrapper over the `virt` crate.
//! - [`gpu`]: GPU inventory (NVML, simulated, none).
//! - [`manager`]: instance records, operations, the one state setter.
//! - [`lifecycle`]: the operation bodies (create with rollback, stop, ...).
//! - [`recover`]: re-attach after restart; the observed-state watcher.
//! - [`group_nic`]: guests' network-group NICs (definition, hot-plug, seed).
//! - [`snapshots`]: Take Snapshot into the host's store; images from snapshots.
//! - [`api`]: the local operator HTTP API.
//! - [`metrics`]: Prometheus metrics on `/metrics`.
//! - [`client`]: the command line's HTTP client for that API.
//! - [`serve`]: the daemon: startup, readiness, shutdown.
//! - [`usage`]: per-instance Running-time counters (billing).
//! - [`link`]: the link to a gantry-controller: join, heartbeat, work.
//! - [`virt_raw`]: safe wrappers over raw libvirt calls (block jobs, fsfreeze).
//! - [`volumes`]: grow and delete data volumes for the controller.

pub mod api;
pub mod buckets;
pub mod client;
pub mod config;
pub mod disks;
pub mod domain_xml;
pub mod fsutil;
pub mod gpu;
pub mod group_nic;
pub mod hypervisor;
pub mod hypervisor_fake;
pub mod images;
pub mod layout;
pub mod libvirt;
pub mod lifecycle;
pub mod link;
pub mod manager;
pub mod metrics;
pub mod monitor;
pub mod moves;
pub mod net;
pub mod recover;
pub mod serve;
pub mod snapshots;
#[cfg(test)]
mod testutil;
pub mod usage;
pub mod virt_raw;
pub mod volumes;
