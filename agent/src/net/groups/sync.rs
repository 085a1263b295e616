//! Bringing the kernel in line with a [`GroupsPlan`]: list, diff, change
//! only what differs. Each failure is noted and the rest goes on; the next
//! apply retries (everything is recomputed from the kernel's state).

use super::links::{LinkKind, LinkState};
use super::nft::{self, BRIDGE_PREFIX, TAP_PREFIX, VXLAN_PREFIX};
use super::plan::{GroupLinks, GroupsPlan};
use super::{group_bridge_name, Groups};
use crate::net::NetError;
use gantry_proto::groups::GroupNic;
use std::collections::{BTreeMap, BTreeSet};

/// Notes a failed step (logged) and says whether it went well.
fn note(errors: &mut Vec<String>, what: &str, r: Result<(), NetError>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(step = what, error = %e, "network group step failed");
            errors.push(format!("{what}: {e}"));
            false
        }
    }
}

impl Groups {
    /// Syncs links, entries, taps and rules; returns the rules text when
    /// it was applied.
    pub(super) fn sync_all(&self, p: &GroupsPlan, errors: &mut Vec<String>) -> Option<String> {
        let have = match self.links.list() {
            Ok(h) => h,
            Err(e) => {
                errors.push(format!("cannot list links: {e}"));
                return None;
            }
        };
        let by_name: BTreeMap<&str, &LinkState> =
            have.iter().map(|l| (l.name.as_str(), l)).collect();
        self.remove_unwanted(p, &have, errors);
        let mut created = false;
        for g in p.groups.values() {
            created |= self.sync_group(g, &by_name, errors);
        }
        self.sync_taps(p, &have, errors);
        self.sync_rules(p, created, errors)
    }

    /// Deletes VXLAN devices and bridges of groups that left (and VXLAN
    /// devices whose settings changed: they are re-created).
    fn remove_unwanted(&self, p: &GroupsPlan, have: &[LinkState], errors: &mut Vec<String>) {
        let want_vx: BTreeMap<&str, _> = p
            .groups
            .values()
            .filter_map(|g| g.vxlan.as_ref().map(|(n, v)| (n.as_str(), v)))
            .collect();
        for l in have.iter().filter(|l| l.name.starts_with(VXLAN_PREFIX)) {
            let keep = match (&l.kind, want_vx.get(l.name.as_str())) {
                (LinkKind::Vxlan(now), Some(want)) => now == *want,
                _ => false,
            };
            if !keep {
                tracing::info!(link = l.name, "removing a group VXLAN device");
                note(errors, &l.name, self.links.delete_link(&l.name));
            }
        }
        for l in have.iter().filter(|l| l.name.starts_with(BRIDGE_PREFIX)) {
            if !p.groups.contains_key(&l.name) || l.kind != LinkKind::Bridge {
                tracing::info!(link = l.name, "removing a group bridge");
                note(errors, &l.name, self.links.delete_link(&l.name));
            }
        }
    }

    /// One group's bridge, VXLAN device and entries; says whether a link
    /// had to be created (then the rules are re-applied too).
    fn sync_group(
        &self,
        g: &GroupLinks,
        have: &BTreeMap<&str, &LinkState>,
        errors: &mut Vec<String>,
    ) -> bool {
        let fine = |name: &str, master: Option<&str>| {
            have.get(name)
                .is_some_and(|l| l.up && l.mtu == u32::from(g.mtu) && l.master.as_deref() == master)
        };
        let mut created = false;
        if !(fine(&g.bridge, None) && have[g.bridge.as_str()].kind == LinkKind::Bridge) {
            created |= !have.contains_key(g.bridge.as_str());
            if !note(
                errors,
                &g.bridge,
                self.links.ensure_bridge(&g.bridge, g.mtu),
            ) {
                return created;
            }
        }
        let Some((vx, params)) = &g.vxlan else {
            return created;
        };
        let same = have
            .get(vx.as_str())
            .is_some_and(|l| l.kind == LinkKind::Vxlan(*params));
        if !(same && fine(vx, Some(&g.bridge))) {
            created |= !same;
            let r = self.links.ensure_vxlan(vx, params, g.mtu, &g.bridge);
            if !note(errors, vx, r) {
                return created;
            }
        }
        self.sync_entries(g, vx, errors);
        created
    }

    /// FDB and neighbour entries of one VXLAN device: stale ones out,
    /// missing ones in.
    fn sync_entries(&self, g: &GroupLinks, vx: &str, errors: &mut Vec<String>) {
        match self.links.fdb_list(vx) {
            Ok(now) => {
                let now: BTreeSet<_> = now.into_iter().collect();
                for e in now.difference(&g.fdb) {
                    note(errors, vx, self.links.fdb_del(vx, e));
                }
                for e in g.fdb.difference(&now) {
                    note(errors, vx, self.links.fdb_add(vx, e));
                }
            }
            Err(e) => errors.push(format!("{vx}: {e}")),
        }
        match self.links.neigh_list(vx) {
            Ok(now) => {
                let now: BTreeSet<_> = now.into_iter().collect();
                for n in now.difference(&g.neigh) {
                    note(errors, vx, self.links.neigh_del(vx, n));
                }
                for n in g.neigh.difference(&now) {
                    note(errors, vx, self.links.neigh_add(vx, n));
                }
            }
            Err(e) => errors.push(format!("{vx}: {e}")),
        }
    }

    /// Running members' taps onto their bridges (moved into the data
    /// plane first when they are still in the host's namespace); taps of
    /// instances that are no longer members taken off.
    fn sync_taps(&self, p: &GroupsPlan, have: &[LinkState], errors: &mut Vec<String>) {
        let mine: BTreeMap<&str, _> = p.members.iter().map(|m| (m.tap.as_str(), m)).collect();
        for l in have.iter().filter(|l| l.name.starts_with(TAP_PREFIX)) {
            let wanted = mine.get(l.name.as_str()).map(|m| m.bridge.as_str());
            if l.master.is_some() && wanted.is_none() {
                tracing::info!(tap = l.name, "taking a former member's tap off its group");
                note(errors, &l.name, self.links.detach(&l.name));
            }
        }
        let here: BTreeMap<&str, &LinkState> = have.iter().map(|l| (l.name.as_str(), l)).collect();
        let mut loose: Option<BTreeSet<String>> = None;
        for m in &p.running {
            if let Some(l) = here.get(m.tap.as_str()) {
                let fine = l.up
                    && l.mtu == u32::from(m.mtu)
                    && l.master.as_deref() == Some(m.bridge.as_str());
                if !fine {
                    note(errors, &m.tap, self.links.attach(&m.tap, &m.bridge, m.mtu));
                }
                continue;
            }
            if !self.named {
                continue; // Not started yet: libvirt attaches it.
            }
            let loose = loose.get_or_insert_with(|| match self.links.host_links(TAP_PREFIX) {
                Ok(l) => l.into_iter().collect(),
                Err(e) => {
                    errors.push(format!("cannot list the host's taps: {e}"));
                    BTreeSet::new()
                }
            });
            if loose.contains(&m.tap) && note(errors, &m.tap, self.links.move_in(&m.tap)) {
                note(errors, &m.tap, self.links.attach(&m.tap, &m.bridge, m.mtu));
                tracing::info!(instance = %m.instance, tap = m.tap, "group tap attached");
            }
        }
    }

    /// Applies the rules when they changed (or links were re-created: a
    /// reboot took the rules too).
    fn sync_rules(&self, p: &GroupsPlan, force: bool, errors: &mut Vec<String>) -> Option<String> {
        let text = nft::render(p, self.cfg.underlay_address);
        if !force && self.lock().rules.as_deref() == Some(text.as_str()) {
            return None;
        }
        note(errors, "rules", self.links.apply_rules(&text)).then_some(text)
    }

    /// [`Groups::ensure_for`]: the NIC's group's links (and the rules,
    /// which hold the guard of every local member), or a bare bridge when
    /// the state does not know the group yet.
    pub(super) fn ensure_inner(&self, nic: &GroupNic) -> Result<(), NetError> {
        let p = self.plan(&[]);
        let bridge = group_bridge_name(nic.vni);
        let Some(g) = p.groups.get(&bridge) else {
            return self.links.ensure_bridge(&bridge, nic.mtu);
        };
        let have = self.links.list()?;
        let by_name: BTreeMap<&str, &LinkState> =
            have.iter().map(|l| (l.name.as_str(), l)).collect();
        let mut errors = Vec::new();
        let created = self.sync_group(g, &by_name, &mut errors);
        if let Some(r) = self.sync_rules(&p, created, &mut errors) {
            self.lock().rules = Some(r);
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(NetError::Command {
                what: "network groups",
                message: errors.join("; "),
            }),
        }
    }
}
