//! [`FakeLinks`]: the groups' kernel in memory, for tests: the links, FDB
//! and neighbour entries and rules it was told to make, the calls it got,
//! and one injected failure at a time.

use super::links::{fail, Fdb, LinkKind, LinkState, Links, Neigh, VxlanParams};
use crate::net::NetError;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// An in-memory kernel for tests: the links, FDB and neighbour entries and
/// rules it was told to make; `fail` makes the named call fail once.
#[derive(Default)]
pub struct FakeLinks {
    pub calls: Mutex<Vec<String>>,
    pub fail: Mutex<Option<&'static str>>,
    pub links: Mutex<BTreeMap<String, LinkState>>,
    /// Links in the host's namespace (loose taps).
    pub host: Mutex<BTreeSet<String>>,
    pub fdb: Mutex<BTreeMap<String, BTreeSet<Fdb>>>,
    pub neigh: Mutex<BTreeMap<String, BTreeSet<Neigh>>>,
    pub rules: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeLinks {
    fn call(&self, name: &'static str, detail: String) -> Result<(), NetError> {
        lock(&self.calls).push(format!("{name} {detail}").trim_end().to_string());
        let mut f = lock(&self.fail);
        if *f == Some(name) {
            *f = None;
            return Err(fail(name, "injected failure"));
        }
        Ok(())
    }

    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    pub fn clear_calls(&self) {
        lock(&self.calls).clear();
    }

    /// A link the test puts in the data plane (a tap, a stray device).
    pub fn add_link(&self, name: &str, kind: LinkKind) {
        lock(&self.links).insert(
            name.into(),
            LinkState {
                name: name.into(),
                kind,
                mtu: 1500,
                up: false,
                master: None,
            },
        );
    }

    fn exists(&self, name: &str) -> Result<(), NetError> {
        if lock(&self.links).contains_key(name) {
            Ok(())
        } else {
            Err(fail("netlink", format!("{name}: no such link")))
        }
    }

    fn upsert(&self, name: &str, kind: LinkKind, mtu: u16, master: Option<&str>) {
        let mut links = lock(&self.links);
        let l = links.entry(name.into()).or_insert_with(|| LinkState {
            name: name.into(),
            kind: kind.clone(),
            mtu: 1500,
            up: false,
            master: None,
        });
        l.mtu = mtu.into();
        l.up = true;
        if master.is_some() {
            l.master = master.map(str::to_string);
        }
    }
}

impl Links for FakeLinks {
    fn list(&self) -> Result<Vec<LinkState>, NetError> {
        self.call("list", String::new())?;
        Ok(lock(&self.links).values().cloned().collect())
    }
    fn ensure_bridge(&self, name: &str, mtu: u16) -> Result<(), NetError> {
        self.call("ensure_bridge", format!("{name} {mtu}"))?;
        self.upsert(name, LinkKind::Bridge, mtu, None);
        Ok(())
    }
    fn ensure_vxlan(&self, n: &str, p: &VxlanParams, mtu: u16, br: &str) -> Result<(), NetError> {
        self.call(
            "ensure_vxlan",
            format!("{n} {} {}:{} {br}", p.vni, p.local, p.port),
        )?;
        self.exists(br)?;
        self.upsert(n, LinkKind::Vxlan(*p), mtu, Some(br));
        Ok(())
    }
    fn delete_link(&self, name: &str) -> Result<(), NetError> {
        self.call("delete_link", name.into())?;
        let mut links = lock(&self.links);
        links.remove(name);
        for l in links.values_mut() {
            if l.master.as_deref() == Some(name) {
                l.master = None;
            }
        }
        lock(&self.fdb).remove(name);
        lock(&self.neigh).remove(name);
        Ok(())
    }
    fn attach(&self, port: &str, bridge: &str, mtu: u16) -> Result<(), NetError> {
        self.call("attach", format!("{port} {bridge} {mtu}"))?;
        self.exists(port)?;
        self.exists(bridge)?;
        self.upsert(port, LinkKind::Other, mtu, Some(bridge));
        Ok(())
    }
    fn detach(&self, port: &str) -> Result<(), NetError> {
        self.call("detach", port.into())?;
        if let Some(l) = lock(&self.links).get_mut(port) {
            l.master = None;
            l.up = false;
        }
        Ok(())
    }
    fn host_links(&self, prefix: &str) -> Result<Vec<String>, NetError> {
        self.call("host_links", prefix.into())?;
        let host = lock(&self.host);
        Ok(host
            .iter()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect())
    }
    fn move_in(&self, name: &str) -> Result<(), NetError> {
        self.call("move_in", name.into())?;
        if !lock(&self.host).remove(name) {
            return Err(fail("netlink", format!("{name}: no such link")));
        }
        self.add_link(name, LinkKind::Other);
        Ok(())
    }
    fn fdb_list(&self, dev: &str) -> Result<Vec<Fdb>, NetError> {
        self.call("fdb_list", dev.into())?;
        Ok(lock(&self.fdb)
            .get(dev)
            .into_iter()
            .flatten()
            .copied()
            .collect())
    }
    fn fdb_add(&self, dev: &str, e: &Fdb) -> Result<(), NetError> {
        self.call("fdb_add", format!("{dev} {} {}:{}", e.mac, e.dst, e.port))?;
        self.exists(dev)?;
        lock(&self.fdb).entry(dev.into()).or_default().insert(*e);
        Ok(())
    }
    fn fdb_del(&self, dev: &str, e: &Fdb) -> Result<(), NetError> {
        self.call("fdb_del", format!("{dev} {} {}:{}", e.mac, e.dst, e.port))?;
        lock(&self.fdb).entry(dev.into()).or_default().remove(e);
        Ok(())
    }
    fn neigh_list(&self, dev: &str) -> Result<Vec<Neigh>, NetError> {
        self.call("neigh_list", dev.into())?;
        Ok(lock(&self.neigh)
            .get(dev)
            .into_iter()
            .flatten()
            .copied()
            .collect())
    }
    fn neigh_add(&self, dev: &str, n: &Neigh) -> Result<(), NetError> {
        self.call("neigh_add", format!("{dev} {} {}", n.ip, n.mac))?;
        self.exists(dev)?;
        lock(&self.neigh).entry(dev.into()).or_default().insert(*n);
        Ok(())
    }
    fn neigh_del(&self, dev: &str, n: &Neigh) -> Result<(), NetError> {
        self.call("neigh_del", format!("{dev} {} {}", n.ip, n.mac))?;
        lock(&self.neigh).entry(dev.into()).or_default().remove(n);
        Ok(())
    }
    fn apply_rules(&self, text: &str) -> Result<(), NetError> {
        self.call("apply_rules", String::new())?;
        *lock(&self.rules) = text.to_string();
        Ok(())
    }
}
