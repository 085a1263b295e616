//! Opening the manager: re-attaching to what libvirt still runs after a
//! restart or crash, finishing or undoing interrupted operations, and the
//! watcher that keeps recorded states in step with what guests do on their
//! own (a guest that powers itself off becomes Stopped).

use crate::config::AgentConfig;
use crate::gpu::GpuInventory;
use crate::layout::{InstanceRecord, Layout};
use crate::libvirt::{Libvirt, PowerState};
use crate::manager::{domain_name, Inner, Manager, ManagerError};
use gantry_proto::{InstanceId, InstanceState};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

impl Manager {
    /// Loads every record, reconciles it with libvirt, and returns the
    /// manager. No running VM is touched unless its record says it was being
    /// created or released when the agent stopped.
    pub fn open(
        cfg: AgentConfig,
        gpus: Box<dyn GpuInventory>,
    ) -> Result<Arc<Manager>, ManagerError> {
        let layout = Layout::new(&cfg.state_dir);
        layout.create()?;
        // libvirt would print every error to stderr itself; the agent logs them.
        virt::error::clear_error_callback();
        let virt = Libvirt::new(&cfg.libvirt_uri);
        virt.ping()?;
        let domain_type = cfg.resolved_domain_type();
        let m = Arc::new(Manager {
            cfg,
            layout,
            virt,
            domain_type,
            gpus,
            metrics: crate::metrics::Metrics::default(),
            inner: Mutex::new(Inner::default()),
        });
        let mut known = HashSet::new();
        for loaded in m.layout.load_instances()? {
            match loaded {
                Ok(rec) => {
                    known.insert(domain_name(rec.spec.id));
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
        for name in m.virt.gantry_domains()? {
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
        let name = domain_name(id);
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

    /// Brings a record's state in line with libvirt's power state.
    fn observe(
        &self,
        id: InstanceId,
        rec: &InstanceRecord,
        power: PowerState,
    ) -> Result<(), ManagerError> {
        use InstanceState::*;
        let target = match (rec.state, power) {
            (Suspending | Paused | Saving, PowerState::Paused) => {
                // A snapshot was interrupted: the guest goes back to work.
                self.virt.resume(&domain_name(id))?;
                Running
            }
            (Suspending | Paused | Saving, PowerState::Running) => Running,
            (_, PowerState::Off | PowerState::Missing) => Stopped,
            (Suspended, PowerState::Running) | (Stopped, PowerState::Running) => Running,
            (Running, PowerState::Paused) | (Stopped, PowerState::Paused) => Suspended,
            (s, _) => s,
        };
        if target != rec.state {
            if rec.state == Stopped && target == Suspended {
                self.set_state(id, Running)?;
            }
            self.set_state(id, target)?;
        }
        Ok(())
    }

    /// One pass of the watcher: instances with no operation running are
    /// checked against libvirt.
    pub fn watch_once(&self) {
        let ids: Vec<InstanceId> = {
            let inner = self.lock();
            inner
                .instances
                .keys()
                .filter(|id| !inner.busy.contains_key(id))
                .copied()
                .collect()
        };
        for id in ids {
            let Ok(rec) = self.record(id) else { continue };
            if rec.state.is_final()
                || rec.state == InstanceState::Creating
                || rec.state == InstanceState::Releasing
            {
                continue;
            }
            match self.virt.state(&domain_name(id)) {
                Ok(power) => {
                    // Re-check under no lock races: an operation may have
                    // started meanwhile; it then owns the state.
                    if self.lock().busy.contains_key(&id) {
                        continue;
                    }
                    if let Err(e) = self.observe(id, &rec, power) {
                        tracing::warn!(instance = %id, error = %e, "cannot sync state");
                    }
                }
                Err(e) => tracing::warn!(instance = %id, error = %e, "cannot read domain state"),
            }
        }
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
