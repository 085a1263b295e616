//! Opening the manager: re-attaching to what libvirt still runs after a
//! restart or crash, finishing or undoing interrupted operations, and the
//! watcher that keeps recorded states in step with what guests do on their
//! own (a guest that powers itself off becomes Stopped).

use crate::config::AgentConfig;
use crate::gpu::GpuPool;
use crate::hypervisor::{Hypervisor, Power};
use crate::layout::{InstanceRecord, Layout};
use crate::libvirt::{Libvirt, PowerState};
use crate::manager::{Inner, Manager, ManagerError};
use gantry_proto::{InstanceId, InstanceState};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

impl Manager {
    /// Loads every record, reconciles it with libvirt, and returns the
    /// manager. No running VM is touched unless its record says it was being
    /// created or released when the agent stopped.
    pub fn open(cfg: AgentConfig, gpus: Arc<GpuPool>) -> Result<Arc<Manager>, ManagerError> {
        // libvirt would print every error to stderr itself; the agent logs them.
        virt::error::clear_error_callback();
        let virt = Arc::new(Libvirt::new(&cfg.libvirt_uri));
        Self::open_with(cfg, gpus, virt)
    }

    /// [`Manager::open`] over any hypervisor (tests use the fake).
    pub fn open_with(
        cfg: AgentConfig,
        gpus: Arc<GpuPool>,
        virt: Arc<dyn Hypervisor>,
    ) -> Result<Arc<Manager>, ManagerError> {
        // Network groups share the access data plane's namespace.
        let ns = match &cfg.network.netns {
            Some(n) => crate::net::netns::Netns::named(n)?,
            None => crate::net::netns::Netns::host(),
        };
        let groups = crate::net::groups::Groups::open_real(&cfg.network, ns, &cfg.state_dir)?;
        Self::open_with_groups(cfg, gpus, virt, groups)
    }

    /// [`Manager::open_with`] over any network-group data plane (tests use
    /// one over fake links).
    pub fn open_with_groups(
        cfg: AgentConfig,
        gpus: Arc<GpuPool>,
        virt: Arc<dyn Hypervisor>,
        groups: crate::net::groups::Groups,
    ) -> Result<Arc<Manager>, ManagerError> {
        let layout = Layout::new(&cfg.state_dir);
        layout.create()?;
        virt.ping()?;
        let domain_type = cfg.resolved_domain_type();
        let usage = crate::usage::UsageBook::open(
            &layout.usage_dir(),
            Arc::new(crate::usage::SystemClock),
        )?;
        let deny = controller_deny(&cfg);
        let net = Arc::new(crate::net::Network::open_real(
            &cfg.network,
            &cfg.state_dir,
            deny,
        )?);
        let buckets = Arc::new(crate::buckets::Buckets::open_real(&cfg.state_dir)?);
        let m = Arc::new(Manager {
            net,
            buckets,
            groups: Arc::new(groups),
            group_nics: Default::default(),
            cfg,
            layout,
            virt,
            domain_type,
            gpus,
            metrics: crate::metrics::Metrics::default(),
            inner: Mutex::new(Inner::default()),
            usage,
            changed: tokio::sync::Notify::new(),
            compaction: Default::default(),
        });
        let mut known = HashSet::new();
        for loaded in m.layout.load_instances()? {
            match loaded {
                Ok(rec) => {
                    known.insert(m.domain_name(rec.spec.id));
                    let id = rec.spec.id;
                    m.lock().instances.insert(id, rec);
                    if let Err(e) = m.reattach(id) {
                        tracing::error!(instance = %id, error = %e, "cannot re-attach instance");
                    }
                }
                Err((path, e)) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable instance record; left as is")
                }
            }
        }
        let states: HashMap<InstanceId, InstanceState> = m
            .lock()
            .instances
            .values()
            .map(|r| (r.spec.id, r.state))
            .collect();
        m.usage.finish_recovery(&states);
        // Leases follow the instances on disk (a crash between a lease and
        // the record, or between a release and the lease's end).
        let holders: Vec<_> = m
            .lock()
            .instances
            .values()
            .filter(|r| !r.state.is_final())
            .map(|r| (r.spec.id, r.spec.gpus.clone()))
            .collect();
        m.gpus.reconcile(&holders);
        m.gpus.start();
        m.reconcile_network();
        // Rebuilt from the stored group state before the controller answers.
        m.reconcile_groups();
        // Buckets too (after a host reboot nothing is mounted).
        m.reconcile_buckets();
        for name in m.virt.domains()? {
            if !known.contains(&name) {
                tracing::warn!(
                    domain = name,
                    "libvirt domain with no Gantry record; left alone"
                );
            }
        }
        Ok(m)
    }

    fn reattach(&self, id: InstanceId) -> Result<(), ManagerError> {
        let rec = self.record(id)?;
        let name = self.domain_name(id);
        match rec.state {
            InstanceState::Creating => {
                tracing::warn!(instance = %id, "agent stopped during create; rolling back");
                self.rollback_create(id);
                self.set_state(id, InstanceState::Failed)?;
                self.bury(
                    id,
                    Some("the agent restarted while the instance was being created".into()),
                );
                return Ok(());
            }
            InstanceState::Releasing => {
                tracing::info!(instance = %id, "finishing an interrupted release");
                return self.release(id, false);
            }
            _ => {}
        }
        if let Err(e) = self.recover_snapshot(id) {
            tracing::error!(instance = %id, error = %e, "cannot finish an interrupted snapshot");
        }
        if let Err(e) = self.prune_layers(id) {
            tracing::warn!(instance = %id, error = %e, "cannot check the root disk's layers");
        }
        let rec = self.record(id)?;
        let power = self.virt.state(&name)?;
        if power == PowerState::Missing {
            // The definition was lost (e.g. libvirt's state wiped): the disks
            // are still here, so define it again, stopped.
            tracing::warn!(instance = %id, "domain missing in libvirt; defining it again");
            let xml = self.domain_def(&rec.spec)?.to_xml();
            self.virt.define(&name, &xml)?;
        }
        self.observe(id, &rec, power)
    }

    /// Brings a record's state in line with libvirt's power state (at
    /// start-up, when no operation can be running).
    fn observe(
        &self,
        id: InstanceId,
        rec: &InstanceRecord,
        power: PowerState,
    ) -> Result<(), ManagerError> {
        if rec.state.is_snapshotting() && power == PowerState::Paused {
            // A snapshot was interrupted: the guest goes back to work.
            self.virt.power(&self.domain_name(id), Power::Resume)?;
        }
        let mut inner = self.lock();
        for step in observed_path(rec.state, power) {
            self.set_state_locked(&mut inner, id, step)?;
        }
        Ok(())
    }

    /// One pass of the watcher: instances with no operation running are
    /// checked against libvirt. The change is applied under the lock only if
    /// no operation started and the record did not change meanwhile, so the
    /// watcher never races an operation.
    pub fn watch_once(&self) {
        let recs: Vec<InstanceRecord> = {
            let inner = self.lock();
            inner
                .instances
                .values()
                .filter(|r| !inner.busy.contains_key(&r.spec.id))
                .filter(|r| {
                    matches!(
                        r.state,
                        InstanceState::Running | InstanceState::Stopped | InstanceState::Suspended
                    )
                })
                .cloned()
                .collect()
        };
        for rec in recs {
            let id = rec.spec.id;
            let power = match self.virt.state(&self.domain_name(id)) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "cannot read domain state");
                    continue;
                }
            };
            let path = observed_path(rec.state, power);
            if path.is_empty() {
                continue;
            }
            let mut inner = self.lock();
            let unchanged = inner.instances.get(&id).map(|r| r.state) == Some(rec.state);
            if !unchanged || inner.busy.contains_key(&id) {
                continue;
            }
            tracing::info!(instance = %id, ?power, "guest changed state on its own");
            for step in path {
                if let Err(e) = self.set_state_locked(&mut inner, id, step) {
                    tracing::warn!(instance = %id, error = %e, "cannot sync state");
                    break;
                }
            }
        }
    }

    /// Puts running guests' taps on the access bridge and re-applies the
    /// access rules when the plan changed or the kernel's drifted.
    pub fn reconcile_network(&self) {
        if self.nics().is_empty() && self.net.access_rev().is_none() {
            return;
        }
        let running: Vec<InstanceId> = self
            .lock()
            .instances
            .values()
            .filter(|r| r.spec.nic.is_some() && r.state != InstanceState::Stopped)
            .map(|r| r.spec.id)
            .collect();
        if let Err(e) = self.net.adopt_taps(&running) {
            tracing::warn!(error = %e, "cannot attach guest taps");
        }
        if let Err(e) = self.net.reconcile(&self.nics()) {
            tracing::warn!(error = %e, "cannot apply the access rules");
        }
    }

    /// Runs [`Manager::reconcile_network`] and
    /// [`Manager::reconcile_groups`] every `period` on its own thread.
    pub fn spawn_network_reconciler(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("net-reconcile".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                match weak.upgrade() {
                    Some(m) => {
                        m.reconcile_network();
                        m.reconcile_groups();
                        m.reconcile_buckets();
                    }
                    None => return,
                }
            })
            .expect("spawn network reconciler");
    }

    /// Runs [`Manager::watch_once`] every `period` on its own thread.
    pub fn spawn_watcher(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("watcher".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                match weak.upgrade() {
                    Some(m) => m.watch_once(),
                    None => return,
                }
            })
            .expect("spawn watcher");
    }
}

/// The controller's address, when it is an IP guests could otherwise reach
/// through the host's NAT: added to the networks guests may never reach.
fn controller_deny(cfg: &AgentConfig) -> Vec<gantry_proto::net::Ipv4Net> {
    let Some(c) = &cfg.controller else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for url in c.urls() {
        let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
        let host = rest.split(['/', ':']).next().unwrap_or("");
        match host.parse::<std::net::Ipv4Addr>() {
            Ok(ip) if !ip.is_loopback() => out.extend(gantry_proto::net::Ipv4Net::new(ip, 32)),
            _ => {}
        }
    }
    out
}

/// The transitions that take a record in `state` to what libvirt's `power`
/// says, each an edge of the state machine; empty when they agree.
fn observed_path(state: InstanceState, power: PowerState) -> Vec<InstanceState> {
    use InstanceState::*;
    match (state, power) {
        (Snapshotting, PowerState::Running | PowerState::Paused) => vec![Running],
        (Snapshotting, _) => vec![Stopped],
        (Running | Suspended, PowerState::Off | PowerState::Missing) => vec![Stopped],
        (Suspended | Stopped, PowerState::Running) => vec![Running],
        (Running, PowerState::Paused) => vec![Suspended],
        (Stopped, PowerState::Paused) => vec![Running, Suspended],
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every controller replica's IP address is denied to guests.
    #[test]
    fn every_controller_ip_is_denied() {
        let cfg = AgentConfig {
            controller: Some(crate::config::ControllerConfig {
                url: None,
                urls: vec![
                    "http://10.0.0.1:8787".into(),
                    "https://10.0.0.2/".into(),
                    "http://127.0.0.1:8787".into(),
                    "http://ctl.example:8787".into(),
                ],
                join_token_file: None,
                join_token: None,
                host_name: None,
                address: None,
                poll_wait_secs: 25,
            }),
            ..AgentConfig::default()
        };
        let deny: Vec<String> = controller_deny(&cfg)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(deny, ["10.0.0.1/32", "10.0.0.2/32"]);
    }

    /// Every path is made of legal edges and ends where libvirt is.
    #[test]
    fn observed_paths_are_legal_and_land_on_the_power_state() {
        for state in InstanceState::ALL {
            if state.is_final()
                || matches!(state, InstanceState::Creating | InstanceState::Releasing)
            {
                continue;
            }
            for power in [
                PowerState::Running,
                PowerState::Paused,
                PowerState::Off,
                PowerState::Missing,
            ] {
                let mut cur = state;
                for step in observed_path(state, power) {
                    cur = cur
                        .transition(step)
                        .unwrap_or_else(|e| panic!("{state} {power:?}: {e}"));
                }
                let expected = match power {
                    PowerState::Running => InstanceState::Running,
                    PowerState::Paused if state.is_snapshotting() => InstanceState::Running,
                    PowerState::Paused => InstanceState::Suspended,
                    PowerState::Off | PowerState::Missing => InstanceState::Stopped,
                };
                assert_eq!(cur, expected, "{state} with power {power:?}");
            }
        }
    }
}
