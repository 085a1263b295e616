//! The plan: what the data plane must look like, derived (purely) from the
//! controller's [`HostAccess`] and the access NICs of the instances this
//! host holds. The firewall text ([`super::nft`]), the proxy's routes and
//! the conntrack entries to flush all come from it.

use gantry_proto::net::{ForwardSpec, HostAccess, Ipv4Net, MacAddr, NicSpec, Protocol};
use gantry_proto::InstanceId;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

/// The tap of an instance's access NIC: `gt-` and 11 hex digits of the
/// blake3 of its id (interface names have at most 15 characters; the
/// leading hex of a v7 id is a timestamp, so it is hashed).
pub fn tap_name(id: InstanceId) -> String {
    let h = blake3::hash(id.to_string().as_bytes()).to_hex();
    format!("gt-{}", &h.as_str()[..11])
}

/// A test NIC at `ip` on `10.200.0.0/24` (gateway `.1`).
#[cfg(test)]
pub(crate) fn test_nic(ip: &str) -> NicSpec {
    let ip: Ipv4Addr = ip.parse().expect("an IPv4 address");
    NicSpec {
        mac: MacAddr::for_ip(ip),
        ip,
        subnet: "10.200.0.0/24".parse().expect("a network"),
        gateway: Ipv4Addr::new(10, 200, 0, 1),
    }
}

/// One guest port on the bridge, for the anti-spoofing guard.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuestPort {
    pub tap: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

/// What the data plane must be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetPlan {
    pub bridge: String,
    pub subnet: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    /// Every local guest with an access NIC.
    pub guests: Vec<GuestPort>,
    /// Kernel DNAT: host port -> guest address.
    pub tcp: BTreeMap<u16, SocketAddrV4>,
    pub udp: BTreeMap<u16, SocketAddrV4>,
    /// The proxy's per-port TLS listeners: host port -> guest address.
    pub https_ports: BTreeMap<u16, SocketAddrV4>,
    /// The proxy's names (`<guest_port>-<instance>.<domain>`) -> guest.
    pub https_names: BTreeMap<String, SocketAddrV4>,
    /// Ports of the agent's own HTTPS listeners guests may reach too (the
    /// shared one and the per-port ones).
    pub https_listen_port: Option<u16>,
    /// Networks guests may never reach.
    pub deny: Vec<Ipv4Net>,
    /// Forwards also answer on the data plane's loopback.
    pub loopback: bool,
}

/// What the plan is made from, besides the controller's access state.
#[derive(Debug, Clone, Default)]
pub struct PlanInputs {
    pub bridge: String,
    pub nics: Vec<(InstanceId, NicSpec)>,
    pub https_listen_port: Option<u16>,
    pub deny: Vec<Ipv4Net>,
    pub loopback: bool,
}

/// Builds the plan. Forwards of instances this host does not hold (or
/// whose address is outside the host's subnet) are left out: a forward
/// leads only to a guest the agent put on its bridge.
pub fn plan(access: Option<&HostAccess>, inputs: &PlanInputs) -> NetPlan {
    let subnet = access
        .map(|a| a.subnet)
        .or_else(|| inputs.nics.first().map(|(_, n)| n.subnet));
    let gateway = access
        .map(|a| a.gateway)
        .or_else(|| inputs.nics.first().map(|(_, n)| n.gateway));
    let mut p = NetPlan {
        bridge: inputs.bridge.clone(),
        subnet,
        gateway,
        https_listen_port: inputs.https_listen_port,
        deny: inputs.deny.clone(),
        loopback: inputs.loopback,
        ..NetPlan::default()
    };
    let mut ips = BTreeMap::new();
    for (id, nic) in &inputs.nics {
        if subnet.is_some_and(|s| !s.contains(nic.ip)) {
            tracing::warn!(instance = %id, ip = %nic.ip, "access address outside the host's subnet; no network");
            continue;
        }
        ips.insert(*id, nic.ip);
        p.guests.push(GuestPort {
            tap: tap_name(*id),
            mac: nic.mac,
            ip: nic.ip,
        });
    }
    p.guests.sort();
    let Some(access) = access else { return p };
    for f in &access.forwards {
        let Some(ip) = ips.get(&f.instance) else {
            continue;
        };
        let to = SocketAddrV4::new(*ip, f.guest_port);
        match (f.protocol, f.https) {
            (Protocol::Tcp, true) => {
                p.https_ports.insert(f.host_port, to);
                if let Some(d) = &access.domain {
                    let name = gantry_proto::net::https_host_name(f.guest_port, f.instance, d);
                    p.https_names.insert(name, to);
                }
            }
            (Protocol::Tcp, false) => {
                p.tcp.insert(f.host_port, to);
            }
            (Protocol::Udp, _) => {
                p.udp.insert(f.host_port, to);
            }
        }
    }
    p
}

/// The (protocol, host port) pairs whose kernel mapping differs between
/// two plans (added, removed or pointing elsewhere): their conntrack
/// entries are flushed, so no flow keeps an old mapping.
pub fn changed_ports(old: &NetPlan, new: &NetPlan) -> Vec<(Protocol, u16)> {
    let mut out = BTreeSet::new();
    for (proto, a, b) in [
        (Protocol::Tcp, &old.tcp, &new.tcp),
        (Protocol::Udp, &old.udp, &new.udp),
    ] {
        for (port, to) in a {
            if b.get(port) != Some(to) {
                out.insert((proto, *port));
            }
        }
        for (port, to) in b {
            if a.get(port) != Some(to) {
                out.insert((proto, *port));
            }
        }
    }
    // A port that moved between the kernel and the proxy changes too.
    for port in old.https_ports.keys().chain(new.https_ports.keys()) {
        if old.https_ports.contains_key(port) != new.https_ports.contains_key(port) {
            out.insert((Protocol::Tcp, *port));
        }
    }
    out.into_iter().collect()
}

/// The forwards of `access` that lead to `instance`, for logs.
pub fn forwards_of(access: &HostAccess, instance: InstanceId) -> Vec<ForwardSpec> {
    access
        .forwards
        .iter()
        .filter(|f| f.instance == instance)
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::ForwardId;

    fn fwd(
        instance: InstanceId,
        protocol: Protocol,
        host: u16,
        guest: u16,
        https: bool,
    ) -> ForwardSpec {
        ForwardSpec {
            id: ForwardId::new(),
            instance,
            protocol,
            host_port: host,
            guest_port: guest,
            https,
        }
    }

    #[test]
    fn forwards_lead_only_to_local_guests() {
        let a = InstanceId::new();
        let stranger = InstanceId::new();
        let access = HostAccess {
            rev: 3,
            subnet: "10.200.0.0/24".parse().unwrap(),
            gateway: "10.200.0.1".parse().unwrap(),
            domain: Some("gpu1.example.com".into()),
            forwards: vec![
                fwd(a, Protocol::Tcp, 20000, 22, false),
                fwd(a, Protocol::Tcp, 20001, 8888, true),
                fwd(a, Protocol::Udp, 20000, 7001, false),
                fwd(stranger, Protocol::Tcp, 20002, 22, false),
            ],
        };
        let inputs = PlanInputs {
            bridge: "gantry0".into(),
            nics: vec![(a, super::test_nic("10.200.0.2"))],
            https_listen_port: Some(443),
            deny: vec![],
            loopback: true,
        };
        let p = plan(Some(&access), &inputs);
        let to = |port| SocketAddrV4::new("10.200.0.2".parse().unwrap(), port);
        assert_eq!(p.tcp.into_iter().collect::<Vec<_>>(), vec![(20000, to(22))]);
        assert_eq!(
            p.udp.into_iter().collect::<Vec<_>>(),
            vec![(20000, to(7001))]
        );
        assert_eq!(p.https_ports.get(&20001), Some(&to(8888)));
        assert_eq!(
            p.https_names.get(&format!("8888-{a}.gpu1.example.com")),
            Some(&to(8888))
        );
        assert_eq!(p.guests.len(), 1);
        assert_eq!(p.guests[0].tap, tap_name(a));
        assert!(p.guests[0].tap.len() <= 15);
    }

    #[test]
    fn changed_ports_cover_added_removed_and_moved() {
        let g = |ip: &str, port| SocketAddrV4::new(ip.parse().unwrap(), port);
        let mut old = NetPlan::default();
        old.tcp.insert(1, g("10.0.0.2", 22));
        old.tcp.insert(2, g("10.0.0.2", 80));
        old.udp.insert(3, g("10.0.0.2", 53));
        old.https_ports.insert(5, g("10.0.0.2", 8888));
        let mut new = old.clone();
        new.tcp.remove(&1);
        new.tcp.insert(2, g("10.0.0.3", 80));
        new.udp.insert(4, g("10.0.0.2", 54));
        new.https_ports.remove(&5);
        new.tcp.insert(5, g("10.0.0.2", 8888));
        assert_eq!(
            changed_ports(&old, &new),
            vec![
                (Protocol::Tcp, 1),
                (Protocol::Tcp, 2),
                (Protocol::Tcp, 5),
                (Protocol::Udp, 4)
            ]
        );
        assert!(changed_ports(&new, &new).is_empty());
    }
}
