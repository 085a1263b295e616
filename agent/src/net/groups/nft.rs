//! The groups' nftables ruleset, rendered (purely) from a [`GroupsPlan`].
//! Two tables of their own, next to the access tables and never touching
//! them, replaced whole and atomically in one `nft -f` transaction
//! (`table X` + `delete table X` + the new table):
//!
//! - `table bridge gantry_groups`: per member tap (`gg-*`), frames must
//!   carry the member's MAC, ARP must name its MAC and address, IPv4 its
//!   address, and no other ethertype passes; taps of no known member pass
//!   nothing; frames from group taps and VXLAN ports to the host itself
//!   (bridge input) are dropped. Built for the per-frame cost: a tap finds
//!   its member's chain in one verdict-map lookup (not a rule per member),
//!   and a member's IPv4 frame is accepted by the chain's first rule.
//! - `table inet gantry_groups`: nothing enters the host or is routed from
//!   or to a group bridge (`gn-*`); VXLAN (UDP to the host's VXLAN port on
//!   its underlay address) passes only from the group's peer hosts and only
//!   for that group's VNI (the VNI is read from the VXLAN header: bits 96
//!   to 119 after the UDP header's start); the rest is dropped. Nothing is
//!   routed to a peer host's VXLAN endpoint (a guest's egress, masqueraded
//!   to this host's address, would otherwise pass the peer's filter).
//!
//! Multi-line on purpose (nft 1.0.6 refuses some one-line forms). Values
//! come from typed addresses and numbers; tap names are derived from ids.

use super::plan::GroupsPlan;
use std::fmt::Write;
use std::net::Ipv4Addr;

/// Both tables' name.
pub const TABLE: &str = "gantry_groups";
/// Prefix of group taps, bridges and VXLAN devices.
pub const TAP_PREFIX: &str = "gg-";
pub const BRIDGE_PREFIX: &str = "gn-";
pub const VXLAN_PREFIX: &str = "gx-";

/// The whole ruleset as one `nft -f` transaction; `underlay` is this
/// host's VXLAN address (`None`: no VXLAN rules, nothing listens).
pub fn render(p: &GroupsPlan, underlay: Option<Ipv4Addr>) -> String {
    let mut s = String::new();
    render_bridge(&mut s, p);
    render_inet(&mut s, p, underlay);
    s
}

fn render_bridge(s: &mut String, p: &GroupsPlan) {
    let _ = writeln!(s, "table bridge {TABLE}\ndelete table bridge {TABLE}");
    let _ = writeln!(s, "table bridge {TABLE} {{");
    let _ = writeln!(s, "\tcomment \"gantry-agent: network groups\"");
    s.push_str("\tchain guard {\n\t\ttype filter hook prerouting priority -200; policy accept;\n");
    if !p.members.is_empty() {
        let entries: Vec<String> = p
            .members
            .iter()
            .map(|m| format!("\"{}\" : jump {}", m.tap, port_chain(&m.tap)))
            .collect();
        let _ = writeln!(s, "\t\tiifname vmap {{ {} }}", entries.join(", "));
    }
    let _ = write!(
        s,
        "\t\tiifname \"{TAP_PREFIX}*\" drop\n\
         \t}}\n\
         \tchain to_host {{\n\
         \t\ttype filter hook input priority -200; policy accept;\n\
         \t\tiifname \"{TAP_PREFIX}*\" counter drop\n\
         \t\tiifname \"{VXLAN_PREFIX}*\" counter drop\n\
         \t}}\n"
    );
    for m in &p.members {
        let _ = write!(
            s,
            "\tchain {chain} {{\n\
             \t\tether saddr {mac} ether type ip ip saddr {ip} accept\n\
             \t\tether saddr {mac} ether type arp arp saddr ether {mac} arp saddr ip {ip} accept\n\
             \t\tdrop\n\
             \t}}\n",
            chain = port_chain(&m.tap),
            mac = m.mac,
            ip = m.ip,
        );
    }
    s.push_str("}\n");
}

fn render_inet(s: &mut String, p: &GroupsPlan, underlay: Option<Ipv4Addr>) {
    let _ = writeln!(s, "table inet {TABLE}\ndelete table inet {TABLE}");
    let _ = writeln!(s, "table inet {TABLE} {{");
    let _ = writeln!(s, "\tcomment \"gantry-agent: network groups\"");
    let _ = write!(
        s,
        "\tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{BRIDGE_PREFIX}*\" counter drop\n"
    );
    if let Some(addr) = underlay {
        let port = p.vxlan_port;
        for (vni, peers) in &p.peers {
            let list: Vec<String> = peers.iter().map(Ipv4Addr::to_string).collect();
            let _ = writeln!(
                s,
                "\t\tip daddr {addr} udp dport {port} @th,96,24 {vni} ip saddr {{ {} }} accept",
                list.join(", ")
            );
        }
        let _ = writeln!(s, "\t\tip daddr {addr} udp dport {port} counter drop");
    }
    let _ = write!(
        s,
        "\t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{BRIDGE_PREFIX}*\" counter drop\n\
         \t\toifname \"{BRIDGE_PREFIX}*\" counter drop\n"
    );
    // Guests' egress (routed and masqueraded through this host) must never
    // reach a peer's VXLAN endpoint: it would arrive from this host's
    // underlay address, which the peer accepts for the groups they share.
    let peers: std::collections::BTreeSet<Ipv4Addr> = p.peers.values().flatten().copied().collect();
    if !peers.is_empty() {
        let list: Vec<String> = peers.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(s, "\t\tip daddr {{ {} }} counter drop", list.join(", "));
    }
    s.push_str("\t}\n}\n");
}

/// The guard chain of a tap (`gg-0123456789a` -> `member_0123456789a`).
fn port_chain(tap: &str) -> String {
    format!("member_{}", tap.trim_start_matches(TAP_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::super::plan::plan;
    use super::super::plan::tests::{group, member};
    use super::*;
    use crate::testutil::golden;
    use gantry_proto::groups::{HostGroups, Vtep, VXLAN_PORT};
    use gantry_proto::InstanceId;

    fn id(n: u128) -> InstanceId {
        InstanceId::from_uuid(uuid::Uuid::from_u128(n))
    }

    /// Two groups: one with a local and two remote members on two hosts,
    /// one with a single local member.
    pub(crate) fn sample() -> String {
        let mut a = member("172.16.0.2", true, None);
        a.instance = id(1);
        let mut b = member("172.16.0.3", false, Some("192.0.2.2"));
        b.instance = id(2);
        let mut c = member("172.16.0.4", false, Some("192.0.2.3"));
        c.instance = id(3);
        let mut d = member("10.9.0.2", true, None);
        d.instance = id(4);
        let mut g2 = group(5001, vec![d]);
        g2.cidr = "10.9.0.0/24".parse().unwrap();
        let hg = HostGroups {
            rev: 3,
            groups: vec![group(5000, vec![a, b, c]), g2],
        };
        let vtep = Vtep {
            address: "192.0.2.1".parse().unwrap(),
            port: VXLAN_PORT,
        };
        render(
            &plan(Some(&hg), &[id(1)], Some(vtep), VXLAN_PORT),
            Some(vtep.address),
        )
    }

    fn empty() -> String {
        render(&plan(None, &[], None, VXLAN_PORT), None)
    }

    #[test]
    fn golden_two_groups() {
        golden("groups-two-groups.nft", &sample());
    }

    #[test]
    fn golden_no_groups() {
        golden("groups-empty.nft", &empty());
    }

    /// `nft -c` accepts the rendered text (in a throwaway namespace).
    #[test]
    #[ignore = "needs root and nft: ./scripts/test runs it"]
    fn nft_accepts_the_rendered_groups_rules() {
        for text in [sample(), empty()] {
            if let Err(e) = super::super::links::nft_check(&text) {
                panic!("nft -c refused:\n{e}\n{text}");
            }
        }
    }
}
