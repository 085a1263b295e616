//! Instance access on the host (docs/access.md): the access bridge, guests'
//! taps, kernel DNAT of forwarded ports, the anti-spoofing guard, the HTTPS
//! front and the guests' seed disks.
//!
//! [`Network`] holds the controller's [`HostAccess`] (persisted in
//! `<state_dir>/access.json`, so a restarted agent re-applies it before the
//! controller answers) and the host's certificate (`<state_dir>/tls.json`,
//! 0600). [`Network::apply`] turns them and the local instances' NICs into a
//! [`plan::NetPlan`], renders it ([`nft`]) and replaces the agent's tables
//! atomically when the plan changed or the kernel's listing drifted from
//! what was applied; conntrack entries of changed ports are flushed; the
//! proxy gets its routes. Everything lives in the data plane's namespace
//! ([`netns`]): the host's own, or a named one (tests, `scripts/up`).
//!
//! - [`plan`]: the plan (pure); [`nft`]: the ruleset text (pure, golden files).
//! - [`host`]: [`host::HostNet`], the narrow trait over `ip`/`nft`/`conntrack`, real and fake.
//! - [`https`]: [`https::HttpsFront`], the proxy's side, real (`gantry-proxy`) and fake.
//! - [`seed`]: the NoCloud seed image.
//! - [`groups`]: network groups (per-group bridges, VXLAN, their rules).

pub mod groups;
pub mod host;
pub mod https;
pub mod netns;
pub mod nft;
pub mod plan;
pub mod seed;

use crate::config::NetworkConfig;
use crate::fsutil::{self, FsError};
use gantry_proto::net::{HostAccess, HostTls, Ipv4Net, MacAddr, NicSpec};
use gantry_proto::{InstanceId, ValidationError};
use host::{HostNet, TapState};
use https::HttpsFront;
use plan::{NetPlan, PlanInputs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// Magic and version of `access.json`.
pub const ACCESS_MAGIC: &str = "gantry-access";
pub const ACCESS_VERSION: u32 = 1;
/// Magic and version of `tls.json`.
pub const TLS_MAGIC: &str = "gantry-host-tls";
pub const TLS_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network namespace {name}: {message}")]
    Netns { name: String, message: String },
    #[error("{what}: {message}")]
    Command { what: &'static str, message: String },
    #[error("seed disk: {0}")]
    Seed(String),
    #[error("HTTPS proxy: {0}")]
    Https(String),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// How a guest's access NIC appears in its domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceDef {
    pub mac: MacAddr,
    pub tap: String,
    /// `Some(bridge)`: libvirt attaches the tap (`type='bridge'`); `None`:
    /// the agent moves it into the data plane's namespace after start
    /// (`type='ethernet'`).
    pub bridge: Option<String>,
    /// The link's MTU (`<mtu size>`: libvirt sets the tap's and tells
    /// virtio-net the host's); `None` leaves the default (access NICs).
    pub mtu: Option<u16>,
}

/// Starts the HTTPS front (the first time access arrives).
pub type FrontStarter = Box<dyn Fn() -> Result<Arc<dyn HttpsFront>, NetError> + Send + Sync>;

#[derive(Default)]
struct State {
    access: Option<HostAccess>,
    tls: Option<HostTls>,
    /// The last revision and certificate received, taken or refused (a
    /// refused one is not asked for again until it changes).
    seen_rev: Option<u64>,
    seen_tls: Option<String>,
    applied: Option<NetPlan>,
    listing: Option<String>,
    front: Option<Arc<dyn HttpsFront>>,
    problems: Vec<String>,
    /// The bridge's subnet and gateway as last ensured.
    bridge: Option<(Ipv4Net, std::net::Ipv4Addr)>,
    applies: u64,
    repairs: u64,
}

/// The data plane (see the module docs).
pub struct Network {
    cfg: NetworkConfig,
    ns: netns::Netns,
    host: Box<dyn HostNet>,
    start_front: FrontStarter,
    access_file: PathBuf,
    tls_file: PathBuf,
    deny: Vec<Ipv4Net>,
    state: Mutex<State>,
}

/// The data plane's numbers, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct NetStats {
    /// Forwards applied now: kernel TCP, kernel UDP, HTTPS (proxy).
    pub tcp: usize,
    pub udp: usize,
    pub https: usize,
    /// Rule replacements, and those that repaired drift.
    pub applies: u64,
    pub repairs: u64,
    pub proxy: gantry_proxy::ProxyStats,
}

/// What an [`Network::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// No access state and no NIC: nothing to do.
    Idle,
    Unchanged,
    /// Rules replaced because the plan changed.
    Changed,
    /// Rules replaced because the kernel's differed from what was applied.
    Repaired,
}

impl Network {
    /// The real data plane for `cfg`, with `deny` added to the configured
    /// networks guests may not reach.
    pub fn open_real(
        cfg: &NetworkConfig,
        state_dir: &std::path::Path,
        deny: Vec<Ipv4Net>,
    ) -> Result<Self, NetError> {
        let ns = match &cfg.netns {
            Some(n) => netns::Netns::named(n)?,
            None => netns::Netns::host(),
        };
        let listen = cfg.https_addr();
        let path = ns.path();
        let start: FrontStarter = Box::new(move || {
            https::ProxyFront::start(listen, path.clone())
                .map(|f| Arc::new(f) as Arc<dyn HttpsFront>)
        });
        let host = Box::new(host::CommandHost::new(ns.clone()));
        Self::open(cfg, ns, host, start, state_dir, deny)
    }

    /// A data plane over any host and front (tests use fakes).
    pub fn open(
        cfg: &NetworkConfig,
        ns: netns::Netns,
        host: Box<dyn HostNet>,
        start_front: FrontStarter,
        state_dir: &std::path::Path,
        mut deny: Vec<Ipv4Net>,
    ) -> Result<Self, NetError> {
        deny.extend(cfg.deny.iter().copied());
        let me = Self {
            cfg: cfg.clone(),
            ns,
            host,
            start_front,
            access_file: state_dir.join("access.json"),
            tls_file: state_dir.join("tls.json"),
            deny,
            state: Mutex::new(State::default()),
        };
        {
            let mut st = me.lock();
            if me.access_file.exists() {
                st.access = Some(fsutil::read_state(
                    &me.access_file,
                    ACCESS_MAGIC,
                    ACCESS_VERSION,
                )?);
            }
            if me.tls_file.exists() {
                st.tls = Some(fsutil::read_state(&me.tls_file, TLS_MAGIC, TLS_VERSION)?);
            }
        }
        Ok(me)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }

    /// The revision of the access state the agent last received.
    pub fn access_rev(&self) -> Option<u64> {
        let st = self.lock();
        st.seen_rev.or(st.access.as_ref().map(|a| a.rev))
    }

    /// The fingerprint of the certificate the agent last received.
    pub fn tls_fingerprint(&self) -> Option<String> {
        let st = self.lock();
        st.seen_tls
            .clone()
            .or_else(|| st.tls.as_ref().map(|t| t.fingerprint.clone()))
    }

    /// The shared HTTPS listener's port, once the proxy runs.
    pub fn https_port(&self) -> Option<u16> {
        self.lock().front.as_ref().and_then(|f| f.https_port())
    }

    /// What is wrong with the data plane, in sentences (for heartbeats).
    pub fn problems(&self) -> Vec<String> {
        self.lock().problems.clone()
    }

    /// How an instance's NIC goes into its domain XML.
    pub fn interface(&self, id: InstanceId, nic: &NicSpec) -> InterfaceDef {
        InterfaceDef {
            mac: nic.mac,
            tap: plan::tap_name(id),
            bridge: self.ns.name().is_none().then(|| self.cfg.bridge.clone()),
            mtu: None,
        }
    }

    /// Makes sure the bridge exists before a guest with `nic` starts.
    pub fn ensure_bridge_for(&self, nic: &NicSpec) -> Result<(), NetError> {
        let (subnet, gateway) = match &self.lock().access {
            Some(a) => (a.subnet, a.gateway),
            None => (nic.subnet, nic.gateway),
        };
        self.host.ensure_bridge(
            &self.cfg.bridge,
            gateway,
            subnet,
            self.cfg.loopback_forwards,
        )
    }

    /// Puts the taps of running guests where they belong (into the data
    /// plane's namespace, onto the bridge). Returns how many it moved.
    pub fn adopt_taps(&self, running: &[InstanceId]) -> Result<usize, NetError> {
        let mut moved = 0;
        for id in running {
            let tap = plan::tap_name(*id);
            if self.host.tap_state(&tap, &self.cfg.bridge)? == TapState::Loose {
                self.host.adopt_tap(&tap, &self.cfg.bridge)?;
                tracing::info!(instance = %id, tap, "guest tap attached to the access bridge");
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Takes a new access state from the controller: validates, persists,
    /// applies.
    pub fn set_access(
        &self,
        access: HostAccess,
        nics: &[(InstanceId, NicSpec)],
    ) -> Result<Applied, NetError> {
        self.lock().seen_rev = Some(access.rev);
        if let Err(e) = access.validate() {
            self.note_problem(
                "access state",
                &format!("revision {} refused: {e}", access.rev),
            );
            return Err(e.into());
        }
        fsutil::write_state(&self.access_file, ACCESS_MAGIC, ACCESS_VERSION, &access)?;
        tracing::info!(
            rev = access.rev,
            forwards = access.forwards.len(),
            "access state received"
        );
        self.lock().access = Some(access);
        self.apply(nics)
    }

    /// Takes a new certificate: the proxy presents it at once; persisted.
    pub fn set_tls(&self, tls: HostTls) -> Result<(), NetError> {
        self.lock().seen_tls = Some(tls.fingerprint.clone());
        if let Some(front) = self.front()? {
            if let Err(e) = front.set_certificate(&tls.cert_chain_pem, tls.key_pem.expose()) {
                self.note_problem("HTTPS certificate", &e.to_string());
                return Err(e);
            }
        }
        fsutil::write_state(&self.tls_file, TLS_MAGIC, TLS_VERSION, &tls)?;
        tracing::info!(fingerprint = tls.fingerprint, "HTTPS certificate installed");
        let mut st = self.lock();
        st.problems.retain(|p| !p.starts_with("HTTPS certificate"));
        st.tls = Some(tls);
        Ok(())
    }

    /// The HTTPS front, started (with the stored certificate) on first use
    /// once the host has access state.
    fn front(&self) -> Result<Option<Arc<dyn HttpsFront>>, NetError> {
        let (access, tls) = {
            let st = self.lock();
            if let Some(f) = &st.front {
                return Ok(Some(f.clone()));
            }
            (st.access.is_some(), st.tls.clone())
        };
        if !access && tls.is_none() {
            return Ok(None);
        }
        let front = (self.start_front)()?;
        if let Some(t) = &tls {
            if let Err(e) = front.set_certificate(&t.cert_chain_pem, t.key_pem.expose()) {
                tracing::warn!(error = %e, "the stored certificate was refused");
            }
        }
        tracing::info!(port = ?front.https_port(), "HTTPS front started");
        self.lock().front = Some(front.clone());
        Ok(Some(front))
    }

    /// Brings the kernel and the proxy in line with the access state and
    /// `nics` (the local instances' NICs); see [`Applied`].
    pub fn apply(&self, nics: &[(InstanceId, NicSpec)]) -> Result<Applied, NetError> {
        self.apply_with(nics, false)
    }

    /// [`Network::apply`], also checking the bridge and its sysctls (the
    /// periodic reconciliation; `apply` checks them when they change).
    pub fn reconcile(&self, nics: &[(InstanceId, NicSpec)]) -> Result<Applied, NetError> {
        self.apply_with(nics, true)
    }

    fn apply_with(&self, nics: &[(InstanceId, NicSpec)], full: bool) -> Result<Applied, NetError> {
        let r = self.apply_inner(nics, full);
        let mut st = self.lock();
        st.problems.retain(|p| !p.starts_with("access rules:"));
        if let Err(e) = &r {
            st.problems.push(format!("access rules: {e}"));
        }
        r
    }

    fn apply_inner(&self, nics: &[(InstanceId, NicSpec)], full: bool) -> Result<Applied, NetError> {
        if self.lock().access.is_none() && nics.is_empty() {
            return Ok(Applied::Idle);
        }
        let front = match self.front() {
            Ok(f) => f,
            Err(e) => {
                self.note_problem("HTTPS front", &e.to_string());
                None
            }
        };
        let access = self.lock().access.clone();
        let p = plan::plan(
            access.as_ref(),
            &PlanInputs {
                bridge: self.cfg.bridge.clone(),
                nics: nics.to_vec(),
                https_listen_port: front.as_ref().and_then(|f| f.https_port()),
                deny: self.deny.clone(),
                loopback: self.cfg.loopback_forwards,
            },
        );
        if let (Some(subnet), Some(gw)) = (p.subnet, p.gateway) {
            let bridge = Some((subnet, gw));
            if full || self.lock().bridge != bridge {
                self.host.ensure_bridge(
                    &self.cfg.bridge,
                    gw,
                    subnet,
                    self.cfg.loopback_forwards,
                )?;
                self.lock().bridge = bridge;
            }
        }
        let previous = self.lock().applied.clone();
        let same_plan = previous.as_ref() == Some(&p);
        if same_plan {
            // Only an unchanged plan needs the kernel's listing compared.
            let listing = self.host.list_rules()?;
            if self.lock().listing.as_deref() == Some(listing.as_str()) {
                return Ok(Applied::Unchanged);
            }
            tracing::warn!("the kernel's access rules drifted from the agent's; re-applying");
        }
        self.host.apply_rules(&nft::render(&p))?;
        let after = self.host.list_rules()?;
        if let Some(old) = &previous {
            self.flush_changed(old, &p);
        }
        if let Some(f) = &front {
            let failed = f.set_routes(&p.https_names, &p.https_ports);
            for (port, why) in &failed {
                tracing::warn!(port, error = why, "HTTPS forward not served");
            }
            let mut st = self.lock();
            st.problems.retain(|x| !x.starts_with("HTTPS port"));
            for (port, why) in failed {
                st.problems.push(format!("HTTPS port {port}: {why}"));
            }
        }
        tracing::info!(
            tcp = p.tcp.len(),
            udp = p.udp.len(),
            https = p.https_ports.len(),
            guests = p.guests.len(),
            "access rules applied"
        );
        let mut st = self.lock();
        st.applied = Some(p);
        st.listing = Some(after);
        st.applies += 1;
        st.repairs += u64::from(same_plan);
        Ok(if same_plan {
            Applied::Repaired
        } else {
            Applied::Changed
        })
    }

    /// Flushes conntrack entries of forwards that went or moved (TCP and
    /// UDP), and of new UDP forwards (a UDP flow that began before the
    /// forward existed would otherwise never reach the guest).
    fn flush_changed(&self, old: &NetPlan, new: &NetPlan) {
        let changed = plan::changed_ports(old, new);
        for proto in [
            gantry_proto::net::Protocol::Tcp,
            gantry_proto::net::Protocol::Udp,
        ] {
            let ports: Vec<u16> = changed
                .iter()
                .filter(|(p, port)| {
                    *p == proto
                        && (proto == gantry_proto::net::Protocol::Udp
                            || old.tcp.contains_key(port)
                            || old.https_ports.contains_key(port))
                })
                .map(|(_, port)| *port)
                .collect();
            match self.host.flush_conntrack(proto, &ports) {
                Ok(n) if n > 0 => {
                    tracing::info!(%proto, ports = n, "flushed flows of changed forwards")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(%proto, error = %e, "cannot flush conntrack entries"),
            }
        }
    }

    fn note_problem(&self, what: &str, why: &str) {
        let line = format!("{what}: {why}");
        tracing::warn!(problem = line, "data plane problem");
        let mut st = self.lock();
        st.problems.retain(|p| !p.starts_with(what));
        st.problems.push(line);
    }

    /// Counts for `/metrics`.
    pub fn stats(&self) -> NetStats {
        let st = self.lock();
        let p = st.applied.clone().unwrap_or_default();
        NetStats {
            tcp: p.tcp.len(),
            udp: p.udp.len(),
            https: p.https_ports.len(),
            applies: st.applies,
            repairs: st.repairs,
            proxy: st.front.as_ref().map(|f| f.stats()).unwrap_or_default(),
        }
    }

    /// The plan last applied (for tests and diagnostics).
    pub fn applied(&self) -> Option<NetPlan> {
        self.lock().applied.clone()
    }
}

#[cfg(test)]
mod tests;
