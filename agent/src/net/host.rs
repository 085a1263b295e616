//! The data plane's narrow view of the host's networking ([`HostNet`]):
//! the bridge, guests' taps, the nftables ruleset and conntrack. The real
//! implementation ([`CommandHost`]) runs `ip`, `nft`, `conntrack` and writes
//! sysctls inside the data plane's namespace; [`FakeHost`] records calls and
//! injects failures for tests.

use super::netns::Netns;
use super::NetError;
use gantry_proto::net::{Ipv4Net, Protocol};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Where a guest's tap is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapState {
    /// Nowhere (the guest is not running).
    Missing,
    /// In the data plane, on the bridge and up: nothing to do.
    Attached,
    /// Somewhere the agent must take it from (the host's namespace while
    /// the data plane has its own, or off the bridge).
    Loose,
}

/// What the data plane needs from the host.
pub trait HostNet: Send + Sync {
    /// Creates the bridge if missing, gives it `gateway/prefix` (only),
    /// brings it up, and sets the sysctls forwarding needs.
    fn ensure_bridge(
        &self,
        bridge: &str,
        gateway: Ipv4Addr,
        subnet: Ipv4Net,
        loopback: bool,
    ) -> Result<(), NetError>;
    fn tap_state(&self, tap: &str, bridge: &str) -> Result<TapState, NetError>;
    /// Moves a loose tap into the data plane, onto the bridge, up.
    fn adopt_tap(&self, tap: &str, bridge: &str) -> Result<(), NetError>;
    /// Applies a whole `nft -f` transaction.
    fn apply_rules(&self, text: &str) -> Result<(), NetError>;
    /// The kernel's current listing of the agent's tables (for drift).
    fn list_rules(&self) -> Result<String, NetError>;
    /// Deletes the conntrack entries of flows to any of `ports`; returns
    /// how many ports had entries.
    fn flush_conntrack(&self, proto: Protocol, ports: &[u16]) -> Result<usize, NetError>;
}

/// The real host: commands run inside the data plane's namespace.
pub struct CommandHost {
    ns: Netns,
}

impl CommandHost {
    pub fn new(ns: Netns) -> Self {
        Self { ns }
    }

    fn run(
        &self,
        what: &'static str,
        cmd: &mut Command,
        stdin: Option<&str>,
    ) -> Result<String, NetError> {
        let fail = |message: String| NetError::Command { what, message };
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {:?}: {e}", cmd.get_program())))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .map_err(|e| fail(format!("cannot write to {:?}: {e}", cmd.get_program())))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| fail(format!("{:?}: {e}", cmd.get_program())))?;
        if !out.status.success() {
            return Err(fail(format!(
                "{:?} {}: {}",
                cmd.get_program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn ip(&self, args: &[&str]) -> Result<String, NetError> {
        self.run("ip", self.ns.command("ip").args(args), None)
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<(), NetError> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let v = value.to_string();
        let p = path.clone();
        self.ns
            .run(move || std::fs::write(&p, v))?
            .map_err(|e| NetError::Command {
                what: "sysctl",
                message: format!("{path}: {e}"),
            })
    }

    /// Whether `dev` exists in the data plane's namespace.
    fn link_exists(&self, dev: &str) -> Result<bool, NetError> {
        let out = self
            .ns
            .command("ip")
            .args(["-o", "link", "show", "dev", dev])
            .output();
        Ok(out.is_ok_and(|o| o.status.success()))
    }
}

impl HostNet for CommandHost {
    fn ensure_bridge(
        &self,
        bridge: &str,
        gateway: Ipv4Addr,
        subnet: Ipv4Net,
        loopback: bool,
    ) -> Result<(), NetError> {
        if !self.link_exists(bridge)? {
            self.ip(&["link", "add", bridge, "type", "bridge"])?;
        }
        let want = format!("{gateway}/{}", subnet.prefix());
        let have = self.ip(&["-o", "-4", "addr", "show", "dev", bridge])?;
        let current: Vec<&str> = have
            .lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
            .collect();
        if current != [want.as_str()] {
            self.ip(&["addr", "flush", "dev", bridge])?;
            self.ip(&["addr", "add", &want, "dev", bridge])?;
        }
        self.ip(&["link", "set", bridge, "up"])?;
        self.sysctl("net.ipv4.ip_forward", "1")?;
        // Layer-3 rules must not see bridged frames (hairpin NAT breaks);
        // the guard works in the bridge family instead. Absent without
        // br_netfilter, which is what we want anyway.
        for k in [
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
        ] {
            if let Err(e) = self.sysctl(k, "0") {
                tracing::debug!(key = k, error = %e, "sysctl not set");
            }
        }
        self.sysctl(
            &format!("net.ipv4.conf.{bridge}.route_localnet"),
            if loopback { "1" } else { "0" },
        )?;
        // Guests get no IPv6 on the access network.
        let _ = self.sysctl(&format!("net.ipv6.conf.{bridge}.disable_ipv6"), "1");
        Ok(())
    }

    fn tap_state(&self, tap: &str, bridge: &str) -> Result<TapState, NetError> {
        let out = self
            .ns
            .command("ip")
            .args(["-o", "link", "show", "dev", tap])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let line = String::from_utf8_lossy(&o.stdout);
                let on_bridge = line.contains(&format!(" master {bridge} "));
                let up = line.contains(",UP") || line.contains("<UP");
                Ok(if on_bridge && up {
                    TapState::Attached
                } else {
                    TapState::Loose
                })
            }
            _ if self.ns.name().is_some() => {
                // Not in the data plane: still in the host's namespace?
                let here = Command::new("ip")
                    .args(["-o", "link", "show", "dev", tap])
                    .output()
                    .is_ok_and(|o| o.status.success());
                Ok(if here {
                    TapState::Loose
                } else {
                    TapState::Missing
                })
            }
            _ => Ok(TapState::Missing),
        }
    }

    fn adopt_tap(&self, tap: &str, bridge: &str) -> Result<(), NetError> {
        if let Some(ns) = self.ns.name() {
            if !self.link_exists(tap)? {
                self.run(
                    "ip",
                    Command::new("ip").args(["link", "set", "dev", tap, "netns", ns]),
                    None,
                )?;
            }
        }
        self.ip(&["link", "set", "dev", tap, "master", bridge])?;
        self.ip(&["link", "set", "dev", tap, "up"])?;
        Ok(())
    }

    fn apply_rules(&self, text: &str) -> Result<(), NetError> {
        self.run("nft", self.ns.command("nft").args(["-f", "-"]), Some(text))
            .map(drop)
    }

    fn list_rules(&self) -> Result<String, NetError> {
        // Both tables in one run; a missing table fails the whole run, so
        // fall back to one at a time (then say which is missing).
        let both = format!(
            "list table inet {}\nlist table bridge {}\n",
            super::nft::TABLE,
            super::nft::GUARD_TABLE
        );
        if let Ok(text) = self.run("nft", self.ns.command("nft").args(["-f", "-"]), Some(&both)) {
            return Ok(text);
        }
        let mut out = String::new();
        for t in [
            ["inet", super::nft::TABLE],
            ["bridge", super::nft::GUARD_TABLE],
        ] {
            let cmd = &mut self.ns.command("nft");
            match self.run("nft", cmd.args(["list", "table", t[0], t[1]]), None) {
                Ok(text) => out.push_str(&text),
                Err(_) => out.push_str(&format!("# no table {} {}\n", t[0], t[1])),
            }
        }
        Ok(out)
    }

    fn flush_conntrack(&self, proto: Protocol, ports: &[u16]) -> Result<usize, NetError> {
        if ports.is_empty() {
            return Ok(0);
        }
        // One listing, then a delete only for ports that have flows.
        let listing = self.run(
            "conntrack",
            self.ns
                .command("conntrack")
                .args(["-L", "-p", proto.as_str()]),
            None,
        )?;
        let live = flows_by_orig_dport(&listing);
        let mut flushed = 0;
        for port in ports.iter().filter(|p| live.contains(p)) {
            let out = self
                .ns
                .command("conntrack")
                .args([
                    "-D",
                    "-p",
                    proto.as_str(),
                    "--orig-port-dst",
                    &port.to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| NetError::Command {
                    what: "conntrack",
                    message: format!("cannot start conntrack: {e}"),
                })?;
            // Exit 1 with "0 flow entries have been deleted" is no error.
            let err = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && !err.contains("0 flow entries") {
                return Err(NetError::Command {
                    what: "conntrack",
                    message: err.trim().to_string(),
                });
            }
            flushed += 1;
        }
        Ok(flushed)
    }
}

/// The original-direction destination ports of the flows in a
/// `conntrack -L` listing (the first `dport=` of each line).
pub fn flows_by_orig_dport(listing: &str) -> std::collections::HashSet<u16> {
    listing
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("dport=")))
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn conntrack_listings_give_original_ports() {
        let l =
            "udp      17 29 src=10.77.0.2 dst=10.77.0.1 sport=40000 dport=20001 src=10.200.0.2 \
                 dst=10.77.0.2 sport=7001 dport=40000 mark=0 use=1\n\
                 tcp      6 431999 ESTABLISHED src=10.77.0.2 dst=10.77.0.1 sport=5 dport=20000 \
                 src=10.200.0.2 dst=10.77.0.2 sport=22 dport=5 [ASSURED] mark=0 use=1\n";
        let ports = super::flows_by_orig_dport(l);
        assert!(ports.contains(&20001) && ports.contains(&20000) && !ports.contains(&40000));
    }
}

/// A host that records what was asked of it, for tests; `fail` makes the
/// named call fail once.
#[derive(Default)]
pub struct FakeHost {
    pub calls: Mutex<Vec<String>>,
    pub rules: Mutex<String>,
    pub fail: Mutex<Option<&'static str>>,
    pub taps: Mutex<std::collections::HashMap<String, TapState>>,
}

impl FakeHost {
    fn call(&self, name: &'static str, detail: String) -> Result<(), NetError> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{name} {detail}"));
        let mut f = self.fail.lock().unwrap_or_else(|p| p.into_inner());
        if *f == Some(name) {
            *f = None;
            return Err(NetError::Command {
                what: name,
                message: "injected failure".into(),
            });
        }
        Ok(())
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl HostNet for FakeHost {
    fn ensure_bridge(&self, b: &str, g: Ipv4Addr, s: Ipv4Net, l: bool) -> Result<(), NetError> {
        self.call("ensure_bridge", format!("{b} {g} {s} {l}"))
    }
    fn tap_state(&self, tap: &str, _bridge: &str) -> Result<TapState, NetError> {
        self.call("tap_state", tap.into())?;
        let taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        Ok(taps.get(tap).copied().unwrap_or(TapState::Missing))
    }
    fn adopt_tap(&self, tap: &str, bridge: &str) -> Result<(), NetError> {
        self.call("adopt_tap", format!("{tap} {bridge}"))?;
        let mut taps = self.taps.lock().unwrap_or_else(|p| p.into_inner());
        taps.insert(tap.into(), TapState::Attached);
        Ok(())
    }
    fn apply_rules(&self, text: &str) -> Result<(), NetError> {
        self.call("apply_rules", String::new())?;
        *self.rules.lock().unwrap_or_else(|p| p.into_inner()) = text.to_string();
        Ok(())
    }
    fn list_rules(&self) -> Result<String, NetError> {
        self.call("list_rules", String::new())?;
        Ok(self.rules.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    fn flush_conntrack(&self, proto: Protocol, ports: &[u16]) -> Result<usize, NetError> {
        for port in ports {
            self.call("flush_conntrack", format!("{proto} {port}"))?;
        }
        Ok(ports.len())
    }
}
