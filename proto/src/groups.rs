//! Network groups, shared by the controller and the agent: a private layer-2
//! network between an account's instances (docs/network-groups.md).
//!
//! Each group has a private IPv4 CIDR, a VXLAN network identifier (VNI,
//! never reused while the group lives) and an MTU that fits the overlay.
//! A member instance gets a second NIC ([`GroupNic`]) on the group's
//! network. The controller hands each host its whole group state
//! ([`HostGroups`]): every group with a member on the host, with all of the
//! group's members, so the host can build the group's bridge, its VXLAN
//! segment and the unicast forwarding entries of remote members (no
//! flooding, no multicast underlay).
//!
//! Every value here ends up in a link name, a forwarding entry, a firewall
//! rule or the guest's seed, so each struct has a `validate` that names the
//! first bad field.

use crate::ids::{InstanceId, NetworkGroupId};
use crate::net::{Ipv4Net, MacAddr};
use crate::validate::ValidationError;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::Ipv4Addr;

/// The lowest VNI the controller hands out (below are left to operators).
pub const VNI_MIN: u32 = 4096;
/// The highest VNI (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;
/// Bytes VXLAN over IPv4 adds to a frame (outer IPv4 20 + UDP 8 + VXLAN 8
/// + inner Ethernet 14).
pub const VXLAN_OVERHEAD: u16 = 50;
/// The group MTU when the operator sets none: a 1500-byte underlay less the
/// VXLAN overhead.
pub const DEFAULT_GROUP_MTU: u16 = 1450;
/// Smallest and largest MTU a group may have.
pub const MIN_GROUP_MTU: u16 = 576;
pub const MAX_GROUP_MTU: u16 = 9000 - VXLAN_OVERHEAD;
/// The standard VXLAN UDP port (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// Most members one group may have.
pub const MAX_GROUP_MEMBERS: usize = 1024;
/// Shortest and longest prefix a group's CIDR may have: from a /8 down to a
/// /29 (six usable addresses: the network, `.1` and the broadcast address
/// are never given to members).
pub const MIN_GROUP_PREFIX: u8 = 8;
pub const MAX_GROUP_PREFIX: u8 = 29;

/// How the scheduler places a group's members.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum GroupPlacement {
    /// Onto hosts that already hold members (traffic never leaves the
    /// host when they all fit on one); other hosts when they are full.
    #[default]
    Pack,
    /// Onto hosts that hold no member yet while there are any (a host's
    /// failure takes as few members as possible).
    Spread,
}

/// The MAC Gantry gives the group NIC with address `ip`: `52:54:01` and the
/// address's last three octets, so it is unique in its group whenever the
/// address is, and never equal to an access NIC's (`52:54:00:...`).
pub fn group_mac(ip: Ipv4Addr) -> MacAddr {
    let o = ip.octets();
    MacAddr([0x52, 0x54, 0x01, o[1], o[2], o[3]])
}

/// Checks a group CIDR a user chose: private (RFC 1918 or the shared
/// 100.64.0.0/10 range), prefix between [`MIN_GROUP_PREFIX`] and
/// [`MAX_GROUP_PREFIX`].
pub fn check_group_cidr(field: &str, cidr: &Ipv4Net) -> Result<(), ValidationError> {
    if !(MIN_GROUP_PREFIX..=MAX_GROUP_PREFIX).contains(&cidr.prefix()) {
        return Err(ValidationError::new(
            field,
            format!(
                "{cidr}: the prefix must be between /{MIN_GROUP_PREFIX} and /{MAX_GROUP_PREFIX}"
            ),
        ));
    }
    let private: [Ipv4Net; 4] = [
        "10.0.0.0/8".parse().expect("constant"),
        "172.16.0.0/12".parse().expect("constant"),
        "192.168.0.0/16".parse().expect("constant"),
        "100.64.0.0/10".parse().expect("constant"),
    ];
    let inside = private
        .iter()
        .any(|p| p.contains(cidr.network()) && p.contains(cidr.broadcast()));
    if !inside {
        return Err(ValidationError::new(
            field,
            format!(
                "{cidr} is not a private network: use one inside 10.0.0.0/8, 172.16.0.0/12, \
                 192.168.0.0/16 or 100.64.0.0/10"
            ),
        ));
    }
    Ok(())
}

/// A host's VXLAN endpoint on the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Vtep {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub address: Ipv4Addr,
    pub port: u16,
}

impl Vtep {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let a = self.address;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
            return Err(ValidationError::new(
                format!("{field}.address"),
                format!("{a} cannot be a VXLAN endpoint"),
            ));
        }
        if self.port == 0 {
            return Err(ValidationError::new(
                format!("{field}.port"),
                "must be a UDP port (1 to 65535)",
            ));
        }
        Ok(())
    }
}

/// The NIC an instance has on its group's network, as its domain and its
/// guest's seed need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GroupNic {
    pub group: NetworkGroupId,
    pub vni: u32,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub mac: MacAddr,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub ip: Ipv4Addr,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub cidr: Ipv4Net,
    pub mtu: u16,
}

/// One member of a group, as a host needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GroupMember {
    pub instance: InstanceId,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub mac: MacAddr,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub ip: Ipv4Addr,
    /// On the host this state is for.
    pub local: bool,
    /// Where a remote member's host takes VXLAN traffic; `None` for local
    /// members, and for remote ones whose host has no underlay configured
    /// (they are unreachable from here, and the agent says so).
    #[serde(default)]
    pub vtep: Option<Vtep>,
}

/// One group with a member on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub id: NetworkGroupId,
    pub vni: u32,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub cidr: Ipv4Net,
    pub mtu: u16,
    pub members: Vec<GroupMember>,
}

impl GroupSpec {
    /// The NIC of local member `id`, if it is one.
    pub fn nic_of(&self, id: InstanceId) -> Option<GroupNic> {
        self.members
            .iter()
            .find(|m| m.local && m.instance == id)
            .map(|m| GroupNic {
                group: self.id,
                vni: self.vni,
                mac: m.mac,
                ip: m.ip,
                cidr: self.cidr,
                mtu: self.mtu,
            })
    }

    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if !(VNI_MIN..=VNI_MAX).contains(&self.vni) {
            return Err(ValidationError::new(
                format!("{field}.vni"),
                format!("must be between {VNI_MIN} and {VNI_MAX}"),
            ));
        }
        check_group_cidr(&format!("{field}.cidr"), &self.cidr)?;
        if !(MIN_GROUP_MTU..=MAX_GROUP_MTU).contains(&self.mtu) {
            return Err(ValidationError::new(
                format!("{field}.mtu"),
                format!("must be between {MIN_GROUP_MTU} and {MAX_GROUP_MTU}"),
            ));
        }
        if self.members.len() > MAX_GROUP_MEMBERS {
            return Err(ValidationError::new(
                format!("{field}.members"),
                format!("at most {MAX_GROUP_MEMBERS}"),
            ));
        }
        let (mut ips, mut macs, mut ids) = (HashSet::new(), HashSet::new(), HashSet::new());
        for (i, m) in self.members.iter().enumerate() {
            let f = format!("{field}.members[{i}]");
            crate::net::check_host_address(&format!("{f}.ip"), m.ip, &self.cidr)?;
            if !m.mac.is_unicast() {
                return Err(ValidationError::new(format!("{f}.mac"), "must be unicast"));
            }
            if !ips.insert(m.ip) || !macs.insert(m.mac) || !ids.insert(m.instance) {
                return Err(ValidationError::new(
                    f,
                    "repeats another member's instance, address or MAC",
                ));
            }
            if let Some(v) = &m.vtep {
                if m.local {
                    return Err(ValidationError::new(
                        format!("{f}.vtep"),
                        "a local member has no VXLAN endpoint",
                    ));
                }
                v.validate(&format!("{f}.vtep"))?;
            }
        }
        Ok(())
    }
}

/// A host's whole network-group state, as the controller hands it to the
/// agent in the work answer when `rev` differs from the agent's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostGroups {
    /// Changes whenever the content does (the controller may derive it from
    /// the content); the agent sends back the last one it received.
    pub rev: u64,
    /// Every group with at least one member on the host.
    pub groups: Vec<GroupSpec>,
}

impl HostGroups {
    /// The group NIC local instance `id` should have.
    pub fn nic_of(&self, id: InstanceId) -> Option<GroupNic> {
        self.groups.iter().find_map(|g| g.nic_of(id))
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        let (mut vnis, mut ids, mut local) = (HashSet::new(), HashSet::new(), HashSet::new());
        for (i, g) in self.groups.iter().enumerate() {
            let f = format!("groups[{i}]");
            g.validate(&f)?;
            if !vnis.insert(g.vni) || !ids.insert(g.id) {
                return Err(ValidationError::new(f, "repeats another group's id or VNI"));
            }
            for m in g.members.iter().filter(|m| m.local) {
                if !local.insert(m.instance) {
                    return Err(ValidationError::new(
                        f,
                        format!("instance {} is in two groups", m.instance),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(ip: &str, local: bool) -> GroupMember {
        let ip: Ipv4Addr = ip.parse().unwrap();
        GroupMember {
            instance: InstanceId::new(),
            mac: group_mac(ip),
            ip,
            local,
            vtep: (!local).then_some(Vtep {
                address: "192.0.2.7".parse().unwrap(),
                port: VXLAN_PORT,
            }),
        }
    }

    fn group() -> GroupSpec {
        GroupSpec {
            id: NetworkGroupId::new(),
            vni: 5000,
            cidr: "172.16.0.0/24".parse().unwrap(),
            mtu: DEFAULT_GROUP_MTU,
            members: vec![member("172.16.0.2", true), member("172.16.0.3", false)],
        }
    }

    #[test]
    fn a_good_state_validates_and_yields_local_nics_only() {
        let g = group();
        let hg = HostGroups {
            rev: 1,
            groups: vec![g.clone()],
        };
        hg.validate().unwrap();
        let nic = hg.nic_of(g.members[0].instance).unwrap();
        assert_eq!(nic.ip.to_string(), "172.16.0.2");
        assert_eq!(nic.mac.to_string(), "52:54:01:10:00:02");
        assert_eq!(nic.vni, 5000);
        assert!(hg.nic_of(g.members[1].instance).is_none());
    }

    #[test]
    fn bad_values_name_their_field() {
        let field = |f: fn(&mut GroupSpec)| {
            let mut g = group();
            f(&mut g);
            g.validate("g").unwrap_err().field
        };
        assert_eq!(field(|g| g.vni = 1), "g.vni");
        assert_eq!(field(|g| g.mtu = 100), "g.mtu");
        assert_eq!(field(|g| g.cidr = "8.8.8.0/24".parse().unwrap()), "g.cidr");
        assert_eq!(field(|g| g.members[1].ip = g.members[0].ip), "g.members[1]");
        assert_eq!(
            field(|g| g.members[1].ip = "172.16.0.0".parse().unwrap()),
            "g.members[1].ip"
        );
        assert_eq!(
            field(|g| g.members[0].vtep = g.members[1].vtep),
            "g.members[0].vtep"
        );
        assert_eq!(
            field(|g| g.members[1].vtep.as_mut().unwrap().port = 0),
            "g.members[1].vtep.port"
        );
    }

    #[test]
    fn cidr_rules() {
        let ok = |s: &str| check_group_cidr("cidr", &s.parse().unwrap()).is_ok();
        assert!(ok("172.16.0.0/24"));
        assert!(ok("10.0.0.0/8"));
        assert!(ok("192.168.10.0/29"));
        assert!(ok("100.64.0.0/16"));
        assert!(!ok("192.168.10.0/30"));
        assert!(!ok("8.8.8.0/24"));
        assert!(!ok("172.0.0.0/8"));
        assert!(!ok("0.0.0.0/0"));
    }
}
