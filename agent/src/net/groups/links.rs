//! The groups' narrow view of the kernel ([`Links`]): bridges, VXLAN
//! devices, ports, VXLAN forwarding (FDB) and neighbour entries, and the
//! groups' nftables transaction. [`NetlinkLinks`] speaks rtnetlink from a
//! thread inside the data plane's namespace (one short-lived connection per
//! call, on a current-thread runtime, so it never nests in the agent's);
//! [`FakeLinks`] models the same state in memory, records calls and
//! injects failures.

use super::super::netns::Netns;
use super::super::NetError;
pub use super::fake::FakeLinks;
use futures::TryStreamExt;
use gantry_proto::net::MacAddr;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

/// What kind of link a [`LinkState`] is (as far as groups care).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Vxlan(VxlanParams),
    Other,
}

/// A VXLAN device's settings that need the device re-created to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: u32,
    pub local: Ipv4Addr,
    pub port: u16,
    pub learning: bool,
    pub proxy: bool,
}

/// One link in the data plane's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub kind: LinkKind,
    pub mtu: u32,
    pub up: bool,
    /// The bridge it is enslaved to.
    pub master: Option<String>,
}

/// A unicast forwarding entry of a VXLAN device: frames for `mac` go to
/// the VTEP `dst:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fdb {
    pub mac: MacAddr,
    pub dst: Ipv4Addr,
    pub port: u16,
}

/// A permanent neighbour entry (the VXLAN device answers ARP from them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neigh {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
}

/// What the groups need from the kernel. Every method is idempotent where
/// the kernel allows it; names are validated by the caller (derived from
/// VNIs and instance ids).
pub trait Links: Send + Sync {
    /// Every link in the data plane's namespace.
    fn list(&self) -> Result<Vec<LinkState>, NetError>;
    /// Creates the bridge if missing; MTU, up, no IPv6, no IPv4 forwarding.
    fn ensure_bridge(&self, name: &str, mtu: u16) -> Result<(), NetError>;
    /// Creates the VXLAN device if missing (the caller deletes one whose
    /// [`VxlanParams`] differ), then MTU, onto `bridge`, up.
    fn ensure_vxlan(
        &self,
        name: &str,
        p: &VxlanParams,
        mtu: u16,
        bridge: &str,
    ) -> Result<(), NetError>;
    fn delete_link(&self, name: &str) -> Result<(), NetError>;
    /// Puts `port` onto `bridge` with `mtu`, up.
    fn attach(&self, port: &str, bridge: &str, mtu: u16) -> Result<(), NetError>;
    /// Takes `port` off its bridge, down.
    fn detach(&self, port: &str) -> Result<(), NetError>;
    /// Names starting with `prefix` in the host's (the agent's) namespace.
    fn host_links(&self, prefix: &str) -> Result<Vec<String>, NetError>;
    /// Moves `name` from the host's namespace into the data plane's.
    fn move_in(&self, name: &str) -> Result<(), NetError>;
    fn fdb_list(&self, dev: &str) -> Result<Vec<Fdb>, NetError>;
    fn fdb_add(&self, dev: &str, e: &Fdb) -> Result<(), NetError>;
    fn fdb_del(&self, dev: &str, e: &Fdb) -> Result<(), NetError>;
    fn neigh_list(&self, dev: &str) -> Result<Vec<Neigh>, NetError>;
    fn neigh_add(&self, dev: &str, n: &Neigh) -> Result<(), NetError>;
    fn neigh_del(&self, dev: &str, n: &Neigh) -> Result<(), NetError>;
    /// Applies a whole `nft -f` transaction in the data plane.
    fn apply_rules(&self, text: &str) -> Result<(), NetError>;
}

pub(super) fn fail(what: &'static str, message: impl std::fmt::Display) -> NetError {
    NetError::Command {
        what,
        message: message.to_string(),
    }
}

/// The real kernel, over rtnetlink (and `nft` for the rules).
pub struct NetlinkLinks {
    ns: Netns,
}

impl NetlinkLinks {
    pub fn new(ns: Netns) -> Self {
        Self { ns }
    }

    /// Runs `f` with a fresh rtnetlink handle on a thread inside `ns`.
    fn block<T, F, Fut>(ns: &Netns, what: &'static str, f: F) -> Result<T, NetError>
    where
        T: Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, String>>,
    {
        let ns = ns.clone();
        let run = move || {
            ns.run(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("runtime: {e}"))?;
                rt.block_on(async move {
                    let (conn, handle, _) =
                        rtnetlink::new_connection().map_err(|e| format!("netlink socket: {e}"))?;
                    tokio::spawn(conn);
                    f(handle).await
                })
            })
        };
        match std::thread::spawn(run).join() {
            Ok(Ok(r)) => r.map_err(|m| fail(what, m)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(fail(what, "the netlink thread panicked")),
        }
    }

    fn nl<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T, NetError>
    where
        T: Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, String>>,
    {
        Self::block(&self.ns, what, f)
    }

    fn sysctl(key: &str, value: &str) -> Result<(), String> {
        let path = format!("/proc/sys/{key}");
        std::fs::write(&path, value).map_err(|e| format!("{path}: {e}"))
    }
}

/// The index of link `name`, `None` when there is none.
async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>, String> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m.map(|m| m.header.index)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(format!("{name}: {e}")),
    }
}

async fn must_index(h: &Handle, name: &str) -> Result<u32, String> {
    index_of(h, name)
        .await?
        .ok_or_else(|| format!("{name}: no such link"))
}

fn describe(m: &LinkMessage, names: &BTreeMap<u32, String>) -> Option<LinkState> {
    let mut st = LinkState {
        name: String::new(),
        kind: LinkKind::Other,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        master: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => st.name = n.clone(),
            LinkAttribute::Mtu(v) => st.mtu = *v,
            LinkAttribute::Controller(i) => st.master = names.get(i).cloned(),
            LinkAttribute::LinkInfo(infos) => st.kind = kind_of(infos),
            _ => {}
        }
    }
    (!st.name.is_empty()).then_some(st)
}

fn kind_of(infos: &[LinkInfo]) -> LinkKind {
    let mut kind = LinkKind::Other;
    for i in infos {
        match i {
            LinkInfo::Kind(InfoKind::Bridge) => kind = LinkKind::Bridge,
            LinkInfo::Data(InfoData::Vxlan(v)) => {
                let mut p = VxlanParams {
                    vni: 0,
                    local: Ipv4Addr::UNSPECIFIED,
                    port: 0,
                    learning: true,
                    proxy: false,
                };
                for x in v {
                    match x {
                        InfoVxlan::Id(id) => p.vni = *id,
                        InfoVxlan::Local(a) => p.local = *a,
                        InfoVxlan::Port(port) => p.port = *port,
                        InfoVxlan::Learning(b) => p.learning = *b,
                        InfoVxlan::Proxy(b) => p.proxy = *b,
                        _ => {}
                    }
                }
                kind = LinkKind::Vxlan(p);
            }
            _ => {}
        }
    }
    kind
}

async fn list_links(h: &Handle) -> Result<Vec<LinkState>, String> {
    let msgs: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("link dump: {e}"))?;
    let names: BTreeMap<u32, String> = msgs
        .iter()
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some((m.header.index, n.clone())),
                _ => None,
            })
        })
        .collect();
    Ok(msgs.iter().filter_map(|m| describe(m, &names)).collect())
}

async fn set_link(h: &Handle, msg: LinkMessage, name: &str) -> Result<(), String> {
    h.link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| format!("{name}: {e}"))
}

fn mac_of(attrs: &[NeighbourAttribute]) -> Option<MacAddr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
            let mut m = [0u8; 6];
            m.copy_from_slice(l);
            Some(MacAddr(m))
        }
        _ => None,
    })
}

fn dst_of(attrs: &[NeighbourAttribute]) -> Option<Ipv4Addr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

async fn neigh_dump(
    h: &Handle,
    dev: &str,
    family: AddressFamily,
) -> Result<(u32, Vec<NeighbourMessage>), String> {
    let idx = must_index(h, dev).await?;
    let all: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(family)
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("neighbour dump: {e}"))?;
    Ok((
        idx,
        all.into_iter()
            .filter(|m| m.header.ifindex == idx)
            .collect(),
    ))
}

fn fdb_message(idx: u32, e: &Fdb) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = idx;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(e.mac.0.to_vec()),
        NeighbourAttribute::Destination(NeighbourAddress::Inet(e.dst)),
        NeighbourAttribute::Port(e.port),
    ];
    m
}

fn neigh_message(idx: u32, n: &Neigh) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = idx;
    m.header.state = NeighbourState::Permanent;
    m.attributes = vec![
        NeighbourAttribute::Destination(NeighbourAddress::Inet(n.ip)),
        NeighbourAttribute::LinkLayerAddress(n.mac.0.to_vec()),
    ];
    m
}

impl Links for NetlinkLinks {
    fn list(&self) -> Result<Vec<LinkState>, NetError> {
        self.nl("netlink", |h| async move { list_links(&h).await })
    }

    fn ensure_bridge(&self, name: &str, mtu: u16) -> Result<(), NetError> {
        let name = name.to_string();
        self.nl("netlink", move |h| async move {
            let idx = match index_of(&h, &name).await? {
                Some(i) => i,
                None => {
                    let msg = LinkBridge::new(&name).mtu(mtu.into()).build();
                    h.link()
                        .add(msg)
                        .execute()
                        .await
                        .map_err(|e| format!("add bridge {name}: {e}"))?;
                    must_index(&h, &name).await?
                }
            };
            // No address, no IPv6, no routing: the host takes no part.
            Self::sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1")?;
            Self::sysctl(&format!("net/ipv4/conf/{name}/forwarding"), "0")?;
            // Inet rules must not see bridged frames (absent without
            // br_netfilter, which is what we want anyway).
            let _ = Self::sysctl("net/bridge/bridge-nf-call-iptables", "0");
            let msg = LinkUnspec::new_with_index(idx).mtu(mtu.into()).up().build();
            set_link(&h, msg, &name).await
        })
    }

    fn ensure_vxlan(
        &self,
        name: &str,
        p: &VxlanParams,
        mtu: u16,
        bridge: &str,
    ) -> Result<(), NetError> {
        let (name, bridge, p) = (name.to_string(), bridge.to_string(), *p);
        self.nl("netlink", move |h| async move {
            let br = must_index(&h, &bridge).await?;
            let idx = match index_of(&h, &name).await? {
                Some(i) => i,
                None => {
                    let msg = LinkVxlan::new(&name, p.vni)
                        .local(p.local)
                        .port(p.port)
                        .learning(p.learning)
                        .proxy(p.proxy)
                        .mtu(mtu.into())
                        .build();
                    h.link()
                        .add(msg)
                        .execute()
                        .await
                        .map_err(|e| format!("add vxlan {name}: {e}"))?;
                    must_index(&h, &name).await?
                }
            };
            let _ = Self::sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1");
            let msg = LinkUnspec::new_with_index(idx)
                .mtu(mtu.into())
                .controller(br)
                .up()
                .build();
            set_link(&h, msg, &name).await
        })
    }

    fn delete_link(&self, name: &str) -> Result<(), NetError> {
        let name = name.to_string();
        self.nl("netlink", move |h| async move {
            match index_of(&h, &name).await? {
                None => Ok(()),
                Some(i) => h
                    .link()
                    .del(i)
                    .execute()
                    .await
                    .map_err(|e| format!("delete {name}: {e}")),
            }
        })
    }

    fn attach(&self, port: &str, bridge: &str, mtu: u16) -> Result<(), NetError> {
        let (port, bridge) = (port.to_string(), bridge.to_string());
        self.nl("netlink", move |h| async move {
            let br = must_index(&h, &bridge).await?;
            let idx = must_index(&h, &port).await?;
            let msg = LinkUnspec::new_with_index(idx)
                .mtu(mtu.into())
                .controller(br)
                .up()
                .build();
            set_link(&h, msg, &port).await
        })
    }

    fn detach(&self, port: &str) -> Result<(), NetError> {
        let port = port.to_string();
        self.nl("netlink", move |h| async move {
            let idx = must_index(&h, &port).await?;
            let msg = LinkUnspec::new_with_index(idx)
                .nocontroller()
                .down()
                .build();
            set_link(&h, msg, &port).await
        })
    }

    fn host_links(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        let prefix = prefix.to_string();
        Self::block(&Netns::host(), "netlink", move |h| async move {
            Ok(list_links(&h)
                .await?
                .into_iter()
                .map(|l| l.name)
                .filter(|n| n.starts_with(&prefix))
                .collect())
        })
    }

    fn move_in(&self, name: &str) -> Result<(), NetError> {
        let Some(path) = self.ns.path() else {
            return Ok(());
        };
        let name = name.to_string();
        Self::block(&Netns::host(), "netlink", move |h| async move {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let idx = must_index(&h, &name).await?;
            let msg = LinkUnspec::new_with_index(idx)
                .setns_by_fd(file.as_raw_fd())
                .build();
            let r = set_link(&h, msg, &name).await;
            drop(file);
            r
        })
    }

    fn fdb_list(&self, dev: &str) -> Result<Vec<Fdb>, NetError> {
        let dev = dev.to_string();
        self.nl("netlink", move |h| async move {
            // The kernel leaves out the port when it is the device's own.
            let own_port = list_links(&h)
                .await?
                .into_iter()
                .find(|l| l.name == dev)
                .and_then(|l| match l.kind {
                    LinkKind::Vxlan(p) => Some(p.port),
                    _ => None,
                })
                .ok_or_else(|| format!("{dev}: no such VXLAN device"))?;
            let (_, msgs) = neigh_dump(&h, &dev, AddressFamily::Bridge).await?;
            Ok(msgs
                .iter()
                .filter(|m| m.header.flags.contains(NeighbourFlags::Own))
                .filter_map(|m| {
                    let port = m.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::Port(p) => Some(*p),
                        _ => None,
                    });
                    Some(Fdb {
                        mac: mac_of(&m.attributes)?,
                        dst: dst_of(&m.attributes)?,
                        port: port.unwrap_or(own_port),
                    })
                })
                .collect())
        })
    }

    fn fdb_add(&self, dev: &str, e: &Fdb) -> Result<(), NetError> {
        let (dev, e) = (dev.to_string(), *e);
        self.nl("netlink", move |h| async move {
            let idx = must_index(&h, &dev).await?;
            let mut req = h
                .neighbours()
                .add_bridge(idx, &e.mac.0)
                .flags(NeighbourFlags::Own)
                .replace();
            *req.message_mut() = fdb_message(idx, &e);
            req.execute()
                .await
                .map_err(|x| format!("fdb add {} on {dev}: {x}", e.mac))
        })
    }

    fn fdb_del(&self, dev: &str, e: &Fdb) -> Result<(), NetError> {
        let (dev, e) = (dev.to_string(), *e);
        self.nl("netlink", move |h| async move {
            let idx = must_index(&h, &dev).await?;
            h.neighbours()
                .del(fdb_message(idx, &e))
                .execute()
                .await
                .map_err(|x| format!("fdb del {} on {dev}: {x}", e.mac))
        })
    }

    fn neigh_list(&self, dev: &str) -> Result<Vec<Neigh>, NetError> {
        let dev = dev.to_string();
        self.nl("netlink", move |h| async move {
            let (_, msgs) = neigh_dump(&h, &dev, AddressFamily::Inet).await?;
            Ok(msgs
                .iter()
                .filter(|m| m.header.state == NeighbourState::Permanent)
                .filter_map(|m| {
                    Some(Neigh {
                        ip: dst_of(&m.attributes)?,
                        mac: mac_of(&m.attributes)?,
                    })
                })
                .collect())
        })
    }

    fn neigh_add(&self, dev: &str, n: &Neigh) -> Result<(), NetError> {
        let (dev, n) = (dev.to_string(), *n);
        self.nl("netlink", move |h| async move {
            let idx = must_index(&h, &dev).await?;
            h.neighbours()
                .add(idx, IpAddr::V4(n.ip))
                .link_layer_address(&n.mac.0)
                .replace()
                .execute()
                .await
                .map_err(|x| format!("neigh add {} on {dev}: {x}", n.ip))
        })
    }

    fn neigh_del(&self, dev: &str, n: &Neigh) -> Result<(), NetError> {
        let (dev, n) = (dev.to_string(), *n);
        self.nl("netlink", move |h| async move {
            let idx = must_index(&h, &dev).await?;
            h.neighbours()
                .del(neigh_message(idx, &n))
                .execute()
                .await
                .map_err(|x| format!("neigh del {} on {dev}: {x}", n.ip))
        })
    }

    fn apply_rules(&self, text: &str) -> Result<(), NetError> {
        let mut child = self
            .ns
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail("nft", format!("cannot start nft: {e}")))?;
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(text.as_bytes())
                .map_err(|e| fail("nft", format!("cannot write to nft: {e}")))?;
        }
        let out = child.wait_with_output().map_err(|e| fail("nft", e))?;
        if !out.status.success() {
            return Err(fail(
                "nft",
                format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
    }
}

/// Checks that `nft` accepts `text` without applying it (`nft -c`), in a
/// throwaway namespace (`unshare -n`); for tests.
pub fn nft_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("unshare")
        .args(["-n", "nft", "-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start unshare: {e}"))?;
    if let Some(mut p) = child.stdin.take() {
        p.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A shared kernel (tests keep a handle on the fake they pass in).
impl<T: Links + ?Sized> Links for std::sync::Arc<T> {
    fn list(&self) -> Result<Vec<LinkState>, NetError> {
        (**self).list()
    }
    fn ensure_bridge(&self, name: &str, mtu: u16) -> Result<(), NetError> {
        (**self).ensure_bridge(name, mtu)
    }
    fn ensure_vxlan(&self, n: &str, p: &VxlanParams, mtu: u16, br: &str) -> Result<(), NetError> {
        (**self).ensure_vxlan(n, p, mtu, br)
    }
    fn delete_link(&self, name: &str) -> Result<(), NetError> {
        (**self).delete_link(name)
    }
    fn attach(&self, port: &str, bridge: &str, mtu: u16) -> Result<(), NetError> {
        (**self).attach(port, bridge, mtu)
    }
    fn detach(&self, port: &str) -> Result<(), NetError> {
        (**self).detach(port)
    }
    fn host_links(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        (**self).host_links(prefix)
    }
    fn move_in(&self, name: &str) -> Result<(), NetError> {
        (**self).move_in(name)
    }
    fn fdb_list(&self, dev: &str) -> Result<Vec<Fdb>, NetError> {
        (**self).fdb_list(dev)
    }
    fn fdb_add(&self, dev: &str, e: &Fdb) -> Result<(), NetError> {
        (**self).fdb_add(dev, e)
    }
    fn fdb_del(&self, dev: &str, e: &Fdb) -> Result<(), NetError> {
        (**self).fdb_del(dev, e)
    }
    fn neigh_list(&self, dev: &str) -> Result<Vec<Neigh>, NetError> {
        (**self).neigh_list(dev)
    }
    fn neigh_add(&self, dev: &str, n: &Neigh) -> Result<(), NetError> {
        (**self).neigh_add(dev, n)
    }
    fn neigh_del(&self, dev: &str, n: &Neigh) -> Result<(), NetError> {
        (**self).neigh_del(dev, n)
    }
    fn apply_rules(&self, text: &str) -> Result<(), NetError> {
        (**self).apply_rules(text)
    }
}
