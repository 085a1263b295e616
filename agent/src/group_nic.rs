//! The instance side of network groups (docs/network-groups.md): each
//! instance's group NIC (the guest's `eth1`) in its domain definition, in
//! the running guest (hot-plug on join, unplug on leave) and in its seed.
//!
//! The data plane ([`crate::net::groups::Groups`]) says which NIC an
//! instance should have ([`Groups::nic_of`]); [`sync`] brings a domain in
//! line with it, and [`Manager::reconcile_group_nics`] runs it for every
//! local instance after a new group state arrives and periodically:
//!
//! - stopped: the persistent definition only (the next start has it);
//! - running: the change is hot-plugged (persistent and live at once); when
//!   the live part fails (no free slot, a guest that ignores the unplug
//!   request) only the definition changes and the instance's problem
//!   sentence says it applies at the next start. A failed live change is
//!   not retried until the wanted NIC changes again or the guest restarts;
//! - suspended: the definition only, and the same sentence.
//!
//! The seed is rewritten whenever the wanted NIC changes (in place while the
//! guest runs: Gantry's test guest re-reads it when a NIC appears).
//! [`group_nic_change`] and [`sync`] are pure over a [`Hypervisor`], so the
//! fake tests every path.

use crate::domain_xml::{group_interface, interface_xml};
use crate::hypervisor::Hypervisor;
use crate::libvirt::{LibvirtError, PowerState};
use crate::manager::{Manager, ManagerError};
use crate::net::groups::Groups;
use crate::net::InterfaceDef;
use gantry_proto::groups::GroupNic;
use gantry_proto::{InstanceId, InstanceState};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What one copy of a domain (persistent or live) needs so its group NIC
/// is the wanted one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Keep,
    Attach(InterfaceDef),
    Detach(InterfaceDef),
    /// Another NIC (a new MAC, bridge or MTU): the old one out, the new in.
    Replace {
        old: InterfaceDef,
        new: InterfaceDef,
    },
}

/// The change that turns `current` into `desired` (pure).
pub fn group_nic_change(desired: Option<&InterfaceDef>, current: Option<&InterfaceDef>) -> Change {
    match (desired, current) {
        (None, None) => Change::Keep,
        (Some(d), None) => Change::Attach(d.clone()),
        (None, Some(c)) => Change::Detach(c.clone()),
        (Some(d), Some(c)) if d == c => Change::Keep,
        (Some(d), Some(c)) => Change::Replace {
            old: c.clone(),
            new: d.clone(),
        },
    }
}

/// How the running guest stands after a [`sync`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// Not running: only the definition matters.
    Off,
    /// The guest has the wanted NIC (already had it).
    Same,
    /// The change was hot-plugged now.
    HotPlugged,
    /// The guest's NIC differs and keeps differing until the next start:
    /// the live change failed now (why), or was not tried (`None`).
    NextStart(Option<String>),
}

/// What a [`sync`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    /// Whether the persistent definition changed.
    pub config: bool,
    pub live: Live,
}

fn apply(virt: &dyn Hypervisor, name: &str, c: &Change, live: bool) -> Result<(), LibvirtError> {
    match c {
        Change::Keep => Ok(()),
        Change::Attach(d) => virt.attach_interface(name, &interface_xml(d), live),
        Change::Detach(o) => virt.detach_interface(name, &interface_xml(o), live),
        Change::Replace { old, new } => {
            virt.detach_interface(name, &interface_xml(old), live)?;
            virt.attach_interface(name, &interface_xml(new), live)
        }
    }
}

/// The group NIC of domain `name` now (persistent or live).
fn current(
    virt: &dyn Hypervisor,
    name: &str,
    inactive: bool,
) -> Result<Option<InterfaceDef>, LibvirtError> {
    Ok(virt
        .xml(name, inactive)?
        .as_deref()
        .and_then(group_interface))
}

/// Brings the persistent definition to `desired`; whether it changed.
fn fix_config(
    virt: &dyn Hypervisor,
    name: &str,
    desired: Option<&InterfaceDef>,
) -> Result<bool, LibvirtError> {
    let c = group_nic_change(desired, current(virt, name, true)?.as_ref());
    apply(virt, name, &c, false)?;
    Ok(c != Change::Keep)
}

/// Brings domain `name`'s group NIC to `desired`. `running`: `None` when
/// the guest is off (the definition only); `Some(try_live)` when it runs
/// (or is paused), `try_live` saying whether to hot-plug a difference.
/// A missing domain is left alone.
pub fn sync(
    virt: &dyn Hypervisor,
    name: &str,
    desired: Option<&InterfaceDef>,
    running: Option<bool>,
) -> Result<Synced, LibvirtError> {
    let Some(try_live) = running else {
        let config = fix_config(virt, name, desired)?;
        return Ok(Synced {
            config,
            live: Live::Off,
        });
    };
    let live_now = current(virt, name, false)?;
    let live_change = group_nic_change(desired, live_now.as_ref());
    if live_change == Change::Keep || !try_live {
        let config = fix_config(virt, name, desired)?;
        let live = match live_change {
            Change::Keep => Live::Same,
            _ => Live::NextStart(None),
        };
        return Ok(Synced { config, live });
    }
    // The definition first to what runs, so one change fits both copies.
    fix_config(virt, name, live_now.as_ref())?;
    match apply(virt, name, &live_change, true) {
        Ok(()) => Ok(Synced {
            config: true,
            live: Live::HotPlugged,
        }),
        Err(e) => {
            tracing::warn!(domain = name, error = %e, "group NIC hot-plug failed; it applies at the next start");
            fix_config(virt, name, desired)?;
            Ok(Synced {
                config: true,
                live: Live::NextStart(Some(e.to_string())),
            })
        }
    }
}

/// The manager's group NIC bookkeeping, and the lock that keeps two
/// passes (the work loop's and the periodic one) from interleaving: a
/// second pass must not see a live unplug still in progress and undo or
/// repeat it.
#[derive(Default)]
pub(crate) struct GroupNics {
    state: std::sync::Mutex<GroupNicState>,
    pass: std::sync::Mutex<()>,
}

/// What the manager remembers about group NICs (in memory: after a restart
/// every seed is rewritten once and every hot-plug may be tried once more).
#[derive(Default)]
pub(crate) struct GroupNicState {
    /// The NIC last tried live per running instance (not tried again while
    /// it is still the wanted one).
    tried: HashMap<InstanceId, Option<InterfaceDef>>,
    /// The group NIC each instance's seed was last written with.
    seeded: HashMap<InstanceId, Option<GroupNic>>,
    /// Per instance, why its guest's group NIC differs from the wanted one.
    problems: BTreeMap<InstanceId, String>,
}

impl Manager {
    pub fn groups(&self) -> &Arc<Groups> {
        &self.groups
    }

    fn group_state(&self) -> std::sync::MutexGuard<'_, GroupNicState> {
        self.group_nics
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The group NIC instance `id` should have, as its domain XML needs it.
    pub(crate) fn group_interface(&self, id: InstanceId) -> Option<InterfaceDef> {
        let nic = self.groups.nic_of(id)?;
        let mut def = self.groups.interface(id, &nic);
        def.mtu = Some(nic.mtu);
        Some(def)
    }

    /// The instances whose guests run (or may run) here now and that no
    /// operation is working on: their loose group taps may be adopted. An
    /// operation that starts a guest adopts its own tap once libvirt is done
    /// ([`Manager::group_after_start`]); moving the tap into the data plane
    /// while libvirt still sets it up fails the start ("Cannot set
    /// interface MTU").
    pub fn running_guests(&self) -> Vec<InstanceId> {
        let inner = self.lock();
        inner
            .instances
            .values()
            .filter(|r| !r.state.is_final() && r.state != InstanceState::Stopped)
            .filter(|r| !inner.busy.contains_key(&r.spec.id))
            .map(|r| r.spec.id)
            .collect()
    }

    /// Notes which group NIC a seed was just written with.
    pub(crate) fn seeded_with(&self, id: InstanceId, nic: Option<GroupNic>) {
        self.group_state().seeded.insert(id, nic);
    }

    /// Problems of guests' group NICs, in sentences (for heartbeats).
    pub fn group_nic_problems(&self) -> Vec<String> {
        self.group_state().problems.values().cloned().collect()
    }

    /// Before a guest starts: its definition has the wanted group NIC and
    /// the group's bridge exists.
    pub(crate) fn group_before_start(&self, id: InstanceId) -> Result<(), ManagerError> {
        if let Some(nic) = self.groups.nic_of(id) {
            self.groups.ensure_for(&nic)?;
        }
        let want = self.group_interface(id);
        sync(
            self.virt.as_ref(),
            &self.domain_name(id),
            want.as_ref(),
            None,
        )?;
        let mut st = self.group_state();
        st.tried.remove(&id);
        st.problems.remove(&id);
        Ok(())
    }

    /// After a guest started: its group tap is adopted into the data plane.
    pub(crate) fn group_after_start(&self, id: InstanceId) -> Result<(), ManagerError> {
        if self.groups.nic_of(id).is_none() {
            return Ok(());
        }
        let mut running = self.running_guests();
        if !running.contains(&id) {
            running.push(id);
        }
        Ok(self.groups.apply(&running)?)
    }

    /// Brings the data plane in line (bridges, segments, taps) and every
    /// local instance's group NIC with the wanted one (after a new group
    /// state, and periodically). Failures are logged and kept as problems.
    pub fn reconcile_groups(&self) {
        let _pass = self
            .group_nics
            .pass
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let running = self.running_guests();
        if let Err(e) = self.groups.apply(&running) {
            tracing::warn!(error = %e, "cannot apply the network groups");
        }
        if self.reconcile_group_nics() > 0 {
            if let Err(e) = self.groups.apply(&self.running_guests()) {
                tracing::warn!(error = %e, "cannot adopt hot-plugged group taps");
            }
        }
    }

    /// One pass over the instances with no operation running; returns how
    /// many NICs were hot-plugged.
    pub fn reconcile_group_nics(&self) -> usize {
        let recs: Vec<(InstanceId, InstanceState)> = {
            let inner = self.lock();
            inner
                .instances
                .values()
                .filter(|r| !inner.busy.contains_key(&r.spec.id))
                .map(|r| (r.spec.id, r.state))
                .collect()
        };
        {
            let mut st = self.group_state();
            let keep = |id: &InstanceId| recs.iter().any(|(i, _)| i == id);
            st.tried.retain(|id, _| keep(id));
            st.seeded.retain(|id, _| keep(id));
            st.problems.retain(|id, _| keep(id));
        }
        let mut plugged = 0;
        for (id, state) in recs {
            match self.reconcile_group_nic(id, state) {
                Ok(true) => plugged += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "cannot bring the group NIC in line");
                    self.group_state()
                        .problems
                        .insert(id, format!("instance {id}: group NIC: {e}"));
                }
            }
        }
        plugged
    }

    /// [`Manager::reconcile_group_nics`] for one instance; whether it
    /// hot-plugged.
    fn reconcile_group_nic(
        &self,
        id: InstanceId,
        state: InstanceState,
    ) -> Result<bool, ManagerError> {
        let running = match state {
            InstanceState::Running => true,
            InstanceState::Suspended => false,
            InstanceState::Stopped => {
                self.sync_group_definition(id)?;
                return Ok(false);
            }
            _ => return Ok(false),
        };
        let want = self.group_interface(id);
        let try_live = running && self.group_state().tried.get(&id) != Some(&want);
        if try_live {
            if let Some(nic) = self.groups.nic_of(id) {
                self.groups.ensure_for(&nic)?;
            }
        }
        // The seed first: a guest that sees the NIC appear reads it then.
        self.refresh_seed(id, true)?;
        let name = self.domain_name(id);
        let synced = sync(self.virt.as_ref(), &name, want.as_ref(), Some(try_live))?;
        let mut st = self.group_state();
        if try_live {
            st.tried.insert(id, want.clone());
        }
        match &synced.live {
            Live::NextStart(why) => {
                const NEXT_START: &str = "the group NIC change applies at the next start";
                let known = st.problems.get(&id).is_some_and(|p| p.contains(NEXT_START));
                // Not tried again: the sentence of the failure stays.
                if why.is_some() || !known {
                    let why = why.as_deref().map_or(String::new(), |w| format!(" ({w})"));
                    let line = format!("instance {id}: {NEXT_START}{why}");
                    tracing::info!(instance = %id, "{line}");
                    st.problems.insert(id, line);
                }
            }
            _ => {
                st.problems.remove(&id);
            }
        }
        if synced.live == Live::HotPlugged {
            tracing::info!(instance = %id, nic = ?want.map(|w| w.mac.to_string()), "group NIC hot-plugged");
        }
        Ok(synced.live == Live::HotPlugged)
    }

    /// A stopped instance: the definition and the seed.
    fn sync_group_definition(&self, id: InstanceId) -> Result<(), ManagerError> {
        let want = self.group_interface(id);
        let synced = sync(
            self.virt.as_ref(),
            &self.domain_name(id),
            want.as_ref(),
            None,
        )?;
        if synced.config {
            tracing::info!(instance = %id, "group NIC changed in the definition (stopped)");
        }
        self.refresh_seed(id, false)?;
        self.group_state().problems.remove(&id);
        Ok(())
    }

    /// Rewrites the seed when the wanted group NIC is not the one it was
    /// last written with.
    fn refresh_seed(&self, id: InstanceId, in_place: bool) -> Result<(), ManagerError> {
        let want = self.groups.nic_of(id);
        if self.group_state().seeded.get(&id) == Some(&want) {
            return Ok(());
        }
        let spec = self.record(id)?.spec;
        let power = self.virt.state(&self.domain_name(id))?;
        let open = in_place || matches!(power, PowerState::Running | PowerState::Paused);
        self.write_seed(&spec, open)
    }
}

#[cfg(test)]
mod tests;
