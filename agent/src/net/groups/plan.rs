//! What the kernel should hold for the host's groups (pure): from the
//! controller's [`HostGroups`], the local running instances and the host's
//! VXLAN endpoint, the bridges, VXLAN devices, their forwarding and
//! neighbour entries, the taps to attach and the rules' inputs.

use super::links::{Fdb, Neigh, VxlanParams};
use super::{group_bridge_name, group_tap_name, group_vxlan_name};
use gantry_proto::groups::{GroupSpec, HostGroups, Vtep};
use gantry_proto::net::MacAddr;
use gantry_proto::InstanceId;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// One group's links on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLinks {
    pub vni: u32,
    pub mtu: u16,
    pub bridge: String,
    /// The VXLAN device and its settings; `None` without an underlay.
    pub vxlan: Option<(String, VxlanParams)>,
    pub fdb: BTreeSet<Fdb>,
    pub neigh: BTreeSet<Neigh>,
}

/// A local member's tap and what its guard allows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemberPort {
    pub instance: InstanceId,
    pub tap: String,
    pub bridge: String,
    pub mtu: u16,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

/// The whole desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupsPlan {
    /// By bridge name.
    pub groups: BTreeMap<String, GroupLinks>,
    /// Every local member (running or not: the guard is ready before the
    /// guest starts).
    pub members: Vec<MemberPort>,
    /// Members whose guests run here now (their taps get attached).
    pub running: Vec<MemberPort>,
    /// Per VNI, the peer hosts' VXLAN addresses allowed to send it.
    pub peers: BTreeMap<u32, BTreeSet<Ipv4Addr>>,
    /// The UDP port this host takes VXLAN on.
    pub vxlan_port: u16,
    /// Sentences about members that cannot be reached.
    pub problems: Vec<String>,
}

/// The plan for `groups` with `running` guests here and this host's
/// endpoint `vtep` (`None`: no underlay, same-host groups only).
pub fn plan(
    groups: Option<&HostGroups>,
    running: &[InstanceId],
    vtep: Option<Vtep>,
    vxlan_port: u16,
) -> GroupsPlan {
    let mut p = GroupsPlan {
        vxlan_port,
        ..GroupsPlan::default()
    };
    let Some(hg) = groups else {
        return p;
    };
    let running: BTreeSet<InstanceId> = running.iter().copied().collect();
    for g in hg
        .groups
        .iter()
        .filter(|g| g.members.iter().any(|m| m.local))
    {
        let links = group_links(g, vtep, &mut p);
        for m in g.members.iter().filter(|m| m.local) {
            let port = MemberPort {
                instance: m.instance,
                tap: group_tap_name(m.instance),
                bridge: links.bridge.clone(),
                mtu: g.mtu,
                mac: m.mac,
                ip: m.ip,
            };
            if running.contains(&m.instance) {
                p.running.push(port.clone());
            }
            p.members.push(port);
        }
        p.groups.insert(links.bridge.clone(), links);
    }
    p.members.sort();
    p.running.sort();
    p
}

fn group_links(g: &GroupSpec, vtep: Option<Vtep>, p: &mut GroupsPlan) -> GroupLinks {
    let mut links = GroupLinks {
        vni: g.vni,
        mtu: g.mtu,
        bridge: group_bridge_name(g.vni),
        vxlan: vtep.map(|v| {
            (
                group_vxlan_name(g.vni),
                VxlanParams {
                    vni: g.vni,
                    local: v.address,
                    port: v.port,
                    learning: false,
                    proxy: true,
                },
            )
        }),
        fdb: BTreeSet::new(),
        neigh: BTreeSet::new(),
    };
    let remote: Vec<_> = g.members.iter().filter(|m| !m.local).collect();
    if remote.is_empty() {
        return links;
    }
    if vtep.is_none() {
        p.problems.push(format!(
            "group {} (VNI {}): {} member(s) on other hosts are unreachable: \
             network.underlay_address is not set",
            g.id,
            g.vni,
            remote.len()
        ));
        return links;
    }
    let mut unreachable = 0;
    for m in remote {
        let Some(v) = m.vtep else {
            unreachable += 1;
            continue;
        };
        links.fdb.insert(Fdb {
            mac: m.mac,
            dst: v.address,
            port: v.port,
        });
        links.neigh.insert(Neigh {
            ip: m.ip,
            mac: m.mac,
        });
        p.peers.entry(g.vni).or_default().insert(v.address);
    }
    if unreachable > 0 {
        p.problems.push(format!(
            "group {} (VNI {}): {unreachable} member(s) are on hosts without a VXLAN \
             endpoint and unreachable",
            g.id, g.vni
        ));
    }
    links
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use gantry_proto::groups::{group_mac, GroupMember, VXLAN_PORT};
    use gantry_proto::NetworkGroupId;

    pub fn member(ip: &str, local: bool, vtep: Option<&str>) -> GroupMember {
        let ip: Ipv4Addr = ip.parse().unwrap();
        GroupMember {
            instance: InstanceId::new(),
            mac: group_mac(ip),
            ip,
            local,
            vtep: vtep.map(|a| Vtep {
                address: a.parse().unwrap(),
                port: VXLAN_PORT,
            }),
        }
    }

    pub fn group(vni: u32, members: Vec<GroupMember>) -> GroupSpec {
        GroupSpec {
            id: NetworkGroupId::new(),
            vni,
            cidr: "172.16.0.0/24".parse().unwrap(),
            mtu: 1450,
            members,
        }
    }

    fn me() -> Option<Vtep> {
        Some(Vtep {
            address: "192.0.2.1".parse().unwrap(),
            port: VXLAN_PORT,
        })
    }

    #[test]
    fn groups_without_local_members_get_nothing() {
        let hg = HostGroups {
            rev: 1,
            groups: vec![group(
                5000,
                vec![member("172.16.0.3", false, Some("192.0.2.2"))],
            )],
        };
        let p = plan(Some(&hg), &[], me(), VXLAN_PORT);
        assert!(p.groups.is_empty() && p.members.is_empty());
    }

    #[test]
    fn remote_members_become_fdb_and_neighbour_entries() {
        let (a, b) = (
            member("172.16.0.2", true, None),
            member("172.16.0.3", false, Some("192.0.2.2")),
        );
        let hg = HostGroups {
            rev: 1,
            groups: vec![group(5000, vec![a, b])],
        };
        let p = plan(Some(&hg), &[a.instance], me(), VXLAN_PORT);
        let g = &p.groups["gn-001388"];
        assert_eq!(g.vxlan.as_ref().unwrap().0, "gx-001388");
        assert_eq!(g.fdb.len(), 1);
        assert_eq!(g.neigh.iter().next().unwrap().ip, b.ip);
        assert_eq!(p.running.len(), 1);
        assert_eq!(p.peers[&5000].len(), 1);
        assert!(p.problems.is_empty());
    }

    #[test]
    fn without_an_underlay_remote_members_are_a_problem() {
        let hg = HostGroups {
            rev: 1,
            groups: vec![group(
                5000,
                vec![
                    member("172.16.0.2", true, None),
                    member("172.16.0.3", false, None),
                ],
            )],
        };
        let p = plan(Some(&hg), &[], None, VXLAN_PORT);
        assert!(p.groups["gn-001388"].vxlan.is_none());
        assert!(
            p.problems[0].contains("underlay_address"),
            "{:?}",
            p.problems
        );
    }
}
