//! Heartbeats: what the host offers (vCPUs and memory from sysinfo, less
//! the memory reserve; disk from statvfs of the state directory; GPUs from
//! the inventory), its health (unhealthy when libvirt does not answer), the
//! observed state of every instance, the usage counters, per-account
//! store usage (measured at most once a minute, only when the store
//! exists) and, after a compaction, the snapshots' new sizes. Sent every
//! `heartbeat_secs`, and ~200 ms after any instance changes state or an
//! operation ends.

use super::{client::backoff, store_heartbeat_secs, Link};
use crate::manager::Manager;
use backon::BackoffBuilder;
use gantry_proto::api::agent::{AgentHeartbeat, HostCapacity, ObservedInstance, StoreUsage};
use gantry_proto::api::v1::{GpuDevice, HostHealth};
use gantry_proto::{AccountId, InstanceState};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often store usage is measured at most.
const STORE_EVERY: Duration = Duration::from_secs(60);
/// How long after a change the prompt heartbeat waits (more changes fold in).
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What the host offers guests, and sentences about what is wrong with it.
pub fn capacity(m: &Manager) -> (HostCapacity, Vec<String>) {
    let mut problems = Vec::new();
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
    let vcpus = u32::try_from(sys.cpus().len()).unwrap_or(u32::MAX);
    let memory_mib =
        (sys.total_memory() / (1024 * 1024)).saturating_sub(m.config().reserved_memory_mib);
    let disk_gib = match nix::sys::statvfs::statvfs(m.layout().root()) {
        Ok(s) => s.blocks().saturating_mul(s.fragment_size()) / crate::disks::GIB,
        Err(e) => {
            problems.push(format!(
                "cannot measure the disk of {}: {e}",
                m.layout().root().display()
            ));
            0
        }
    };
    // Every GPU with its health: the controller tells quarantined from
    // leased from removed (absent).
    let gpus = m
        .gpus()
        .list()
        .into_iter()
        .map(|g| {
            use gantry_proto::gpu::GpuHealthKind as K;
            if matches!(g.health.kind(), K::Quarantined | K::Lost) {
                problems.push(format!("GPU {} ({}) is {}", g.pci, g.model, g.health));
            }
            GpuDevice {
                model: g.model,
                pci: g.pci,
                uuid: g.uuid,
                memory_bytes: g.memory_bytes,
                numa_node: g.numa_node,
                health: g.health,
                instance: g.instance,
            }
        })
        .collect();
    let cap = HostCapacity {
        vcpus,
        memory_mib,
        disk_gib,
        gpus,
    };
    (cap, problems)
}

/// Compressed bytes per account in the host's store; `None` when the store
/// does not exist or cannot be read.
fn store_usage(m: &Manager) -> Option<Vec<StoreUsage>> {
    let store = match m.open_existing_store() {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the snapshot store to measure usage");
            return None;
        }
    };
    match store.stats() {
        Ok(stats) => Some(
            stats
                .owners
                .iter()
                .filter_map(|o| {
                    let account: AccountId = o.owner.as_deref()?.parse().ok()?;
                    Some(StoreUsage {
                        account,
                        billed_bytes: o.billed_bytes,
                    })
                })
                .collect(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot measure snapshot store usage");
            None
        }
    }
}

/// Builds a heartbeat (blocking: libvirt, disk and store are read). The
/// usage counters are persisted with a new `seq` before this returns.
pub fn build(link: &Link) -> Result<AgentHeartbeat, crate::usage::UsageError> {
    let m = &link.manager;
    let (capacity, mut problems) = capacity(m);
    problems.extend(m.net().problems());
    problems.extend(m.groups().problems());
    problems.extend(m.group_nic_problems());
    let health = match m.libvirt().ping() {
        Ok(_) => HostHealth::Healthy,
        Err(e) => {
            problems.push(format!("libvirt is unreachable: {e}"));
            HostHealth::Unhealthy
        }
    };
    let (live, gone) = m.states();
    let mut instances: Vec<ObservedInstance> = live
        .into_iter()
        .map(|(id, state)| ObservedInstance {
            id,
            state,
            last_error: None,
        })
        .collect();
    instances.extend(gone.into_iter().map(|r| ObservedInstance {
        id: r.spec.id,
        state: r.state,
        last_error: r.last_error,
    }));
    let absent = link
        .absent_released
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    instances.extend(absent.into_iter().map(|id| ObservedInstance {
        id,
        state: InstanceState::Released,
        last_error: None,
    }));
    let store = {
        let mut last = link
            .store_measured
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= STORE_EVERY) {
            *last = Some(Instant::now());
            drop(last);
            store_usage(m)
        } else {
            None
        }
    };
    let usage = m.usage().snapshot()?;
    Ok(AgentHeartbeat {
        sent_at_ms: chrono::Utc::now().timestamp_millis(),
        capacity,
        health,
        problems,
        instances,
        usage,
        store,
        snapshot_sizes: m.take_snapshot_sizes(),
        https_port: m.net().https_port(),
        store_identity: m.store_identity(),
        vtep: m.groups().vtep(),
        buckets: Some(m.buckets().reports()),
    })
}

/// Builds and sends one heartbeat; applies the acknowledgement.
pub async fn send_once(link: &Arc<Link>) -> Result<(), String> {
    let l = link.clone();
    let hb = tokio::task::spawn_blocking(move || build(&l))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    gantry_crashpoint::hit("agent.heartbeat.built");
    let ack = match link.client.heartbeat(link.credential(), &hb).await {
        Ok(ack) => ack,
        Err(e) => {
            link.manager.return_snapshot_sizes(hb.snapshot_sizes);
            return Err(e.to_string());
        }
    };
    gantry_crashpoint::hit("agent.heartbeat.sent");
    link.manager.usage().ack(&ack.billed);
    gantry_crashpoint::hit("agent.heartbeat.acked");
    store_heartbeat_secs(link, ack.heartbeat_secs);
    Ok(())
}

/// The heartbeat loop: forever, every `heartbeat_secs` or soon after a
/// change; a failure waits per the backoff schedule, then a fresh
/// heartbeat is built (counters keep growing meanwhile, nothing is lost).
pub async fn run(link: Arc<Link>) {
    let mut delays = backoff().build();
    loop {
        match send_once(&link).await {
            Ok(()) => {
                link.link_up(true);
                delays = backoff().build();
                let every = Duration::from_secs(link.heartbeat_secs.load(Ordering::Relaxed));
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = link.manager.changed() => tokio::time::sleep(DEBOUNCE).await,
                }
            }
            Err(e) => {
                link.link_up(false);
                link.manager.metrics().heartbeat_failed();
                let wait = delays.next().unwrap_or(super::client::MAX_BACKOFF);
                if !super::revoked(&link, &e) {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "heartbeat failed");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}
