//! Network groups on the host (docs/network-groups.md): a bridge per group
//! with a local member, the group's VXLAN segment on the underlay with the
//! controller's unicast forwarding entries, the members' group taps, and the
//! rules that keep each group to itself.
//!
//! Per group with a local member: a bridge `gn-<vni>` (no address, no
//! IPv6, no forwarding), with an underlay a VXLAN device `gx-<vni>`
//! (`nolearning`, `proxy`: the kernel answers ARP for remote members from
//! its neighbour table) on it, a static FDB entry `MAC dst VTEP` and a
//! permanent neighbour entry per remote member (no flooding entry:
//! unknown destinations are dropped), the members' taps `gg-*` moved into
//! the data plane and onto the bridge. Everything converges from the
//! desired state on each [`Groups::apply`] (the kernel's links, FDB and
//! neighbour entries are listed and diffed), so an agent restart
//! (`groups.json`) or a host reboot (links gone) ends in the same place.
//!
//! - [`plan`]: the desired state (pure); [`nft`]: the rules (pure, golden).
//! - [`links`]: [`links::Links`], the narrow trait over rtnetlink and
//!   `nft`, real ([`links::NetlinkLinks`]) and fake ([`links::FakeLinks`]).

mod fake;
pub mod links;
pub mod nft;
pub mod plan;
mod sync;
#[cfg(test)]
mod tests;

use super::netns::Netns;
use super::{InterfaceDef, NetError};
use crate::config::NetworkConfig;
use crate::fsutil;
use gantry_proto::groups::{GroupNic, HostGroups, Vtep};
use gantry_proto::InstanceId;
use links::{Links, NetlinkLinks};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Magic and version of `groups.json` (the last [`HostGroups`] received).
pub const GROUPS_MAGIC: &str = "gantry-groups";
pub const GROUPS_VERSION: u32 = 1;

/// The group tap of instance `id` (`gg-` and 11 hex digits of its id's hash).
pub fn group_tap_name(id: InstanceId) -> String {
    let h = blake3::hash(id.to_string().as_bytes()).to_hex();
    format!("gg-{}", &h.as_str()[..11])
}

/// The bridge of the group with `vni` (`gn-` and the VNI in 6 hex digits).
pub fn group_bridge_name(vni: u32) -> String {
    format!("gn-{vni:06x}")
}

/// The VXLAN device of the group with `vni`.
pub fn group_vxlan_name(vni: u32) -> String {
    format!("gx-{vni:06x}")
}

#[derive(Default)]
struct State {
    groups: Option<HostGroups>,
    /// The last revision received, taken or refused.
    seen_rev: Option<u64>,
    /// Why the last state was refused (or `groups.json` unreadable).
    refused: Option<String>,
    /// The planner's and the last apply's sentences.
    problems: Vec<String>,
    /// The rules last applied.
    rules: Option<String>,
}

/// The host's network groups (see the module docs).
pub struct Groups {
    cfg: NetworkConfig,
    /// The data plane has a namespace of its own (taps are moved in).
    named: bool,
    links: Box<dyn Links>,
    file: PathBuf,
    state: Mutex<State>,
    /// One apply at a time.
    applying: Mutex<()>,
}

impl Groups {
    /// The real data plane for `cfg` (netlink in the namespace `ns`),
    /// loading `<state_dir>/groups.json` when present.
    pub fn open_real(cfg: &NetworkConfig, ns: Netns, state_dir: &Path) -> Result<Self, NetError> {
        let named = ns.name().is_some();
        Self::open(cfg, Box::new(NetlinkLinks::new(ns)), named, state_dir)
    }

    /// Groups over any [`Links`] (tests use [`links::FakeLinks`]); `named`:
    /// the data plane is a namespace of its own.
    pub fn open(
        cfg: &NetworkConfig,
        links: Box<dyn Links>,
        named: bool,
        state_dir: &Path,
    ) -> Result<Self, NetError> {
        let me = Self {
            cfg: cfg.clone(),
            named,
            links,
            file: state_dir.join("groups.json"),
            state: Mutex::new(State::default()),
            applying: Mutex::new(()),
        };
        if me.file.exists() {
            match fsutil::read_state::<HostGroups>(&me.file, GROUPS_MAGIC, GROUPS_VERSION) {
                Ok(g) => me.lock().groups = Some(g),
                // The controller sends the state again (no revision held).
                Err(e) => {
                    tracing::warn!(error = %e, "groups.json unreadable; waiting for the controller");
                    me.lock().refused =
                        Some(format!("network groups: groups.json unreadable: {e}"));
                }
            }
        }
        Ok(me)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The revision of the group state last received (for `groups_rev`).
    pub fn rev(&self) -> Option<u64> {
        let st = self.lock();
        st.seen_rev.or(st.groups.as_ref().map(|g| g.rev))
    }

    /// This host's VXLAN endpoint (from `network.underlay_address` and
    /// `network.vxlan_port`), for heartbeats; `None` without an underlay.
    pub fn vtep(&self) -> Option<Vtep> {
        self.cfg.underlay_address.map(|address| Vtep {
            address,
            port: self.cfg.vxlan_port,
        })
    }

    /// The group NIC local instance `id` should have now.
    pub fn nic_of(&self, id: InstanceId) -> Option<GroupNic> {
        self.lock().groups.as_ref().and_then(|g| g.nic_of(id))
    }

    /// How that NIC goes into the domain XML (tap `gg-...`; with the
    /// host's namespace as data plane, libvirt attaches it to the group's
    /// bridge, else the agent moves it in after start).
    pub fn interface(&self, id: InstanceId, nic: &GroupNic) -> InterfaceDef {
        InterfaceDef {
            mac: nic.mac,
            tap: group_tap_name(id),
            bridge: (!self.named).then(|| group_bridge_name(nic.vni)),
            mtu: Some(nic.mtu),
        }
    }

    /// Makes sure the group's bridge (and VXLAN segment) exist before a
    /// guest with `nic` starts or has it hot-plugged.
    pub fn ensure_for(&self, nic: &GroupNic) -> Result<(), NetError> {
        let _one = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.ensure_inner(nic);
        if let Err(e) = &r {
            tracing::warn!(vni = nic.vni, error = %e, "group bridge not ready");
        }
        r
    }

    /// Takes a new state from the controller: validates, persists
    /// (`groups.json`), applies with `running` the instances whose guests
    /// run here now.
    pub fn set(&self, groups: HostGroups, running: &[InstanceId]) -> Result<(), NetError> {
        self.lock().seen_rev = Some(groups.rev);
        if let Err(e) = groups.validate() {
            let line = format!("network groups: revision {} refused: {e}", groups.rev);
            tracing::warn!(problem = line, "group state refused");
            self.lock().refused = Some(line);
            return Err(e.into());
        }
        fsutil::write_state(&self.file, GROUPS_MAGIC, GROUPS_VERSION, &groups)?;
        tracing::info!(
            rev = groups.rev,
            groups = groups.groups.len(),
            "group state received"
        );
        {
            let mut st = self.lock();
            st.groups = Some(groups);
            st.refused = None;
        }
        self.apply(running)
    }

    /// Brings links, forwarding entries, taps and rules in line with the
    /// state held (the periodic reconciliation, after starts, after a
    /// restart): bridges and segments for groups with a local member,
    /// removed for the others; loose group taps of `running` guests moved
    /// into the data plane and onto their bridge.
    pub fn apply(&self, running: &[InstanceId]) -> Result<(), NetError> {
        let _one = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.plan(running);
        let mut errors = Vec::new();
        let rules = self.sync_all(&p, &mut errors);
        let mut st = self.lock();
        if let Some(r) = rules {
            st.rules = Some(r);
        }
        st.problems = p.problems.clone();
        st.problems
            .extend(errors.iter().map(|e| format!("network groups: {e}")));
        match errors.is_empty() {
            true => Ok(()),
            false => Err(NetError::Command {
                what: "network groups",
                message: errors.join("; "),
            }),
        }
    }

    /// What is wrong, in sentences (for heartbeats).
    pub fn problems(&self) -> Vec<String> {
        let st = self.lock();
        st.refused
            .iter()
            .chain(st.problems.iter())
            .cloned()
            .collect()
    }

    fn plan(&self, running: &[InstanceId]) -> plan::GroupsPlan {
        let st = self.lock();
        plan::plan(
            st.groups.as_ref(),
            running,
            self.vtep(),
            self.cfg.vxlan_port,
        )
    }
}
