//! The nftables ruleset, rendered (purely) from a [`NetPlan`].
//!
//! Two tables, both owned by the agent and replaced whole and atomically
//! in one `nft -f` transaction (`table X` + `delete table X` + the new
//! table: the delete needs the table to exist; open connections survive):
//!
//! - `table inet gantry`: DNAT of host ports to guests through two maps
//!   (`tcp_fwd`, `udp_fwd`) in prerouting and output (for connections the
//!   host makes itself, loopback included); masquerade of guest egress, of
//!   hairpin flows (a guest reaching a forwarded port) and of loopback
//!   flows — and nothing else, so guests see clients' real addresses; a
//!   forward filter that lets into the bridge only forwarded flows and
//!   keeps guests off each other, off the `deny` networks and off IPv6; an
//!   input filter that keeps guests off the host's own services (only the
//!   HTTPS proxy's ports answer them, and pings of the gateway).
//! - `table bridge gantry_guard`: per guest port, frames must carry the
//!   guest's MAC, ARP must name its MAC and address, IPv4 its address, and
//!   no other ethertype passes; ports of unknown guests pass nothing; guest
//!   ports never talk to each other at layer 2.
//!
//! The text is multi-line on purpose (nft 1.0.6 refuses some one-line
//! forms). Values come from typed addresses, ports and the validated
//! bridge name; tap names are derived from ids.

use super::plan::NetPlan;
use std::fmt::Write;

/// The inet table's name.
pub const TABLE: &str = "gantry";
/// The bridge table's name.
pub const GUARD_TABLE: &str = "gantry_guard";
/// Prefix of guests' taps (see [`super::plan::tap_name`]).
pub const TAP_PREFIX: &str = "gt-";

/// The whole ruleset as one `nft -f` transaction.
pub fn render(p: &NetPlan) -> String {
    let mut s = String::new();
    render_inet(&mut s, p);
    render_guard(&mut s, p);
    s
}

fn elements<I: IntoIterator<Item = String>>(s: &mut String, items: I) {
    let items: Vec<String> = items.into_iter().collect();
    if !items.is_empty() {
        let _ = writeln!(s, "\t\telements = {{ {} }}", items.join(", "));
    }
}

fn render_inet(s: &mut String, p: &NetPlan) {
    let br = &p.bridge;
    let _ = writeln!(s, "table inet {TABLE}\ndelete table inet {TABLE}");
    let _ = writeln!(s, "table inet {TABLE} {{");
    let _ = writeln!(s, "\tcomment \"gantry-agent: instance access\"");
    s.push_str("\tset deny4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\tauto-merge\n");
    elements(s, p.deny.iter().map(|n| n.to_string()));
    s.push_str("\t}\n");
    for (name, map) in [("tcp_fwd", &p.tcp), ("udp_fwd", &p.udp)] {
        let _ = writeln!(
            s,
            "\tmap {name} {{\n\t\ttype inet_service : ipv4_addr . inet_service"
        );
        elements(
            s,
            map.iter()
                .map(|(port, to)| format!("{port} : {} . {}", to.ip(), to.port())),
        );
        s.push_str("\t}\n");
    }
    s.push_str("\tset https_ports {\n\t\ttype inet_service\n");
    let https: std::collections::BTreeSet<u16> = p
        .https_ports
        .keys()
        .copied()
        .chain(p.https_listen_port)
        .collect();
    elements(s, https.iter().map(u16::to_string));
    s.push_str("\t}\n");
    let dnat = "\t\tfib daddr type local dnat ip to tcp dport map @tcp_fwd\n\
                \t\tfib daddr type local dnat ip to udp dport map @udp_fwd\n";
    let _ = write!(
        s,
        "\tchain raw_prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifname \"{br}\" ip daddr 127.0.0.0/8 drop\n\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n{dnat}\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n"
    );
    if p.loopback {
        s.push_str(dnat);
    } else {
        s.push_str(
            "\t\toifname != \"lo\" fib daddr type local dnat ip to tcp dport map @tcp_fwd\n",
        );
        s.push_str(
            "\t\toifname != \"lo\" fib daddr type local dnat ip to udp dport map @udp_fwd\n",
        );
    }
    s.push_str("\t}\n");
    render_inet_filters(s, p);
    s.push_str("}\n");
}

fn render_inet_filters(s: &mut String, p: &NetPlan) {
    let br = &p.bridge;
    let _ = write!(
        s,
        "\tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n"
    );
    if let Some(net) = p.subnet {
        let _ = writeln!(
            s,
            "\t\toifname \"{br}\" ip saddr {net} ct status dnat masquerade"
        );
    }
    let _ = writeln!(
        s,
        "\t\toifname \"{br}\" ip saddr 127.0.0.0/8 ct status dnat masquerade"
    );
    if let Some(net) = p.subnet {
        let _ = writeln!(
            s,
            "\t\tiifname \"{br}\" oifname != \"{br}\" ip saddr {net} masquerade"
        );
    }
    let _ = write!(
        s,
        "\t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tct state established,related accept\n\
         \t\tct status dnat accept\n\
         \t\tiifname \"{br}\" oifname \"{br}\" drop\n\
         \t\tiifname \"{br}\" ip daddr @deny4 drop\n\
         \t\tiifname \"{br}\" meta nfproto ipv6 drop\n\
         \t\tiifname \"{br}\" accept\n\
         \t\toifname \"{br}\" drop\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{br}\" ct state established,related accept\n\
         \t\tiifname \"{br}\" tcp dport @https_ports accept\n\
         \t\tiifname \"{br}\" icmp type echo-request limit rate 10/second accept\n\
         \t\tiifname \"{br}\" drop\n\
         \t}}\n"
    );
}

fn render_guard(s: &mut String, p: &NetPlan) {
    let _ = writeln!(
        s,
        "table bridge {GUARD_TABLE}\ndelete table bridge {GUARD_TABLE}"
    );
    let _ = writeln!(s, "table bridge {GUARD_TABLE} {{");
    s.push_str("\tchain guard {\n\t\ttype filter hook prerouting priority -200; policy accept;\n");
    for g in &p.guests {
        let _ = writeln!(s, "\t\tiifname \"{}\" jump {}", g.tap, port_chain(&g.tap));
    }
    let _ = write!(
        s,
        "\t\tiifname \"{TAP_PREFIX}*\" drop\n\
         \t}}\n\
         \tchain isolate {{\n\
         \t\ttype filter hook forward priority -200; policy accept;\n\
         \t\tiifname \"{TAP_PREFIX}*\" oifname \"{TAP_PREFIX}*\" drop\n\
         \t}}\n"
    );
    for g in &p.guests {
        let _ = write!(
            s,
            "\tchain {chain} {{\n\
             \t\tether saddr != {mac} drop\n\
             \t\tether type arp arp saddr ether != {mac} drop\n\
             \t\tether type arp arp saddr ip != {ip} drop\n\
             \t\tether type ip ip saddr != {ip} drop\n\
             \t\tether type != {{ arp, ip }} drop\n\
             \t\taccept\n\
             \t}}\n",
            chain = port_chain(&g.tap),
            mac = g.mac,
            ip = g.ip,
        );
    }
    s.push_str("}\n");
}

/// The guard chain of a tap (`gt-0123456789a` -> `port_0123456789a`).
fn port_chain(tap: &str) -> String {
    format!("port_{}", tap.trim_start_matches(TAP_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::super::plan::{plan, PlanInputs};
    use super::*;
    use gantry_proto::net::{ForwardSpec, HostAccess, Protocol};
    use gantry_proto::{ForwardId, InstanceId};

    fn id(n: u128) -> InstanceId {
        InstanceId::from_uuid(uuid::Uuid::from_u128(n))
    }

    /// A plan with two guests and every kind of forward.
    pub(crate) fn sample() -> NetPlan {
        let (a, b) = (id(1), id(2));
        let f = |n: u128, instance, protocol, host_port, guest_port, https| ForwardSpec {
            id: ForwardId::from_uuid(uuid::Uuid::from_u128(n)),
            instance,
            protocol,
            host_port,
            guest_port,
            https,
        };
        let access = HostAccess {
            rev: 1,
            subnet: "10.200.0.0/24".parse().unwrap(),
            gateway: "10.200.0.1".parse().unwrap(),
            domain: Some("gpu1.example.com".into()),
            forwards: vec![
                f(1, a, Protocol::Tcp, 20000, 22, false),
                f(2, a, Protocol::Tcp, 20001, 8888, true),
                f(3, a, Protocol::Udp, 20002, 7001, false),
                f(4, b, Protocol::Tcp, 20003, 22, false),
            ],
        };
        plan(
            Some(&access),
            &PlanInputs {
                bridge: "gantry0".into(),
                nics: vec![
                    (a, super::super::plan::test_nic("10.200.0.2")),
                    (b, super::super::plan::test_nic("10.200.0.3")),
                ],
                https_listen_port: Some(443),
                deny: vec![
                    "10.0.0.0/8".parse().unwrap(),
                    "192.0.2.7/32".parse().unwrap(),
                ],
                loopback: true,
            },
        )
    }

    use crate::testutil::golden;

    #[test]
    fn golden_two_guests() {
        golden("nft-two-guests.nft", &render(&sample()));
    }

    #[test]
    fn golden_empty_host() {
        let p = plan(
            None,
            &PlanInputs {
                bridge: "gantry0".into(),
                loopback: false,
                ..PlanInputs::default()
            },
        );
        golden("nft-empty.nft", &render(&p));
    }

    /// `nft -c` accepts the rendered text (in a throwaway network
    /// namespace, so nothing on the host is touched).
    #[test]
    #[ignore = "needs root and nft: ./scripts/test runs it"]
    fn nft_accepts_the_rendered_ruleset() {
        for text in [
            render(&sample()),
            render(&NetPlan {
                bridge: "gantry0".into(),
                ..Default::default()
            }),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("rules.nft");
            std::fs::write(&f, &text).unwrap();
            let out = std::process::Command::new("unshare")
                .args(["-n", "nft", "-c", "-f"])
                .arg(&f)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "nft -c refused:\n{}\n{text}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
