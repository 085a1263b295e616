//! A [`Hypervisor`] for tests: domains live in memory, and what QEMU would
//! do to disk files (an external overlay, a commit down the chain) is done
//! with `qemu-img`, so an operation's disk bookkeeping is exercised for
//! real. Any call can be made to fail ([`FakeHypervisor::fail`]); the guest
//! agent answers only when [`FakeHypervisor::with_guest_agent`] says so;
//! a call can be held midway ([`FakeHypervisor::hold`]) to test what runs
//! beside it.
//! Domains keep their XML, persistent and live: a start copies the first
//! into the second, NIC hot-plug edits both (`attach_interface:live` and
//! `detach_interface:live` fail only the live part, as a guest without a
//! free slot or one that ignores the unplug request would).

use crate::disks;
use crate::hypervisor::{Commit, GuestCall, Hypervisor, Power};
use crate::libvirt::{LibvirtError, PowerState, DOMAIN_PREFIX};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Debug, Clone)]
struct Domain {
    power: PowerState,
    /// Disk target -> the file it uses (its active layer).
    disks: HashMap<String, PathBuf>,
    /// The persistent definition, and what runs (while it runs).
    config: String,
    live: Option<String>,
}

/// `xml` with `device` added at the end of `<devices>`.
fn add_device(xml: &str, device: &str) -> String {
    match xml.rfind("</devices>") {
        Some(at) => format!("{}{}{}", &xml[..at], device, &xml[at..]),
        None => xml.to_string(),
    }
}

/// `xml` without the `<interface>` whose MAC is `mac`; `None` when it has
/// no such interface.
fn remove_interface(xml: &str, mac: &str) -> Option<String> {
    let mut from = 0;
    while let Some(start) = xml[from..].find("<interface").map(|i| i + from) {
        let end = xml[start..].find("</interface>")? + start + "</interface>".len();
        if xml[start..end].contains(mac) {
            return Some(format!("{}{}", &xml[..start], &xml[end..]));
        }
        from = end;
    }
    None
}

#[derive(Default)]
struct State {
    domains: BTreeMap<String, Domain>,
    /// Calls to fail: (call name, how many more to let through first).
    fail: Vec<(&'static str, usize)>,
    calls: Vec<String>,
    guest_agent: bool,
    /// Calls that wait in [`FakeHypervisor::hold`] until released, and how
    /// many are waiting now.
    held: Vec<&'static str>,
    waiting: usize,
}

/// See the module docs.
#[derive(Default)]
pub struct FakeHypervisor {
    state: Mutex<State>,
    changed: Condvar,
}

impl FakeHypervisor {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the call named `call` (`disk_snapshot`, `block_commit`,
    /// `power:Resume`, ...) fail once, after `after` successful ones.
    pub fn fail(&self, call: &'static str, after: usize) {
        self.lock().fail.push((call, after));
    }

    /// Makes every call named `call` wait (after it is recorded, before it
    /// acts) until [`FakeHypervisor::release`].
    pub fn hold(&self, call: &'static str) {
        self.lock().held.push(call);
    }

    /// Lets held calls named `call` go on.
    pub fn release(&self, call: &'static str) {
        self.lock().held.retain(|c| *c != call);
        self.changed.notify_all();
    }

    /// Waits until some call is held (panics after 30 s).
    pub fn wait_held(&self) {
        let st = self.lock();
        let (st, timeout) = self
            .changed
            .wait_timeout_while(st, Duration::from_secs(30), |st| st.waiting == 0)
            .unwrap_or_else(|p| p.into_inner());
        assert!(!timeout.timed_out(), "no call was held: {:?}", st.calls);
    }

    /// Whether guests answer guest-agent calls.
    pub fn with_guest_agent(&self, yes: bool) {
        self.lock().guest_agent = yes;
    }

    /// Every call so far, as `name arg`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Sets a domain's power as if the guest did it (powered itself off).
    pub fn set_power(&self, name: &str, power: PowerState) {
        if let Some(d) = self.lock().domains.get_mut(name) {
            d.power = power;
        }
    }

    fn enter(&self, call: &'static str, name: &str) -> Result<(), LibvirtError> {
        let mut st = self.lock();
        st.calls.push(format!("{call} {name}"));
        if let Some(i) = st.fail.iter().position(|(c, _)| *c == call) {
            if st.fail[i].1 == 0 {
                st.fail.remove(i);
                return Err(err(call, name, "injected failure"));
            }
            st.fail[i].1 -= 1;
        }
        if st.held.contains(&call) {
            st.waiting += 1;
            self.changed.notify_all();
            st = self
                .changed
                .wait_while(st, |st| st.held.contains(&call))
                .unwrap_or_else(|p| p.into_inner());
            st.waiting -= 1;
        }
        Ok(())
    }

    fn with<T>(&self, name: &str, f: impl FnOnce(&mut Domain) -> T) -> Result<T, LibvirtError> {
        let mut st = self.lock();
        let d = st
            .domains
            .get_mut(name)
            .ok_or_else(|| err("lookup", name, "no such domain"))?;
        Ok(f(d))
    }
}

fn err(op: &'static str, name: &str, message: &str) -> LibvirtError {
    LibvirtError::Call {
        op,
        domain: name.to_string(),
        message: message.to_string(),
    }
}

fn disk_err<'a>(
    op: &'static str,
    name: &'a str,
) -> impl FnOnce(disks::DiskError) -> LibvirtError + 'a {
    move |e| err(op, name, &e.to_string())
}

/// The disks of a domain XML: target -> source file.
fn disks_of(xml: &str) -> HashMap<String, PathBuf> {
    ["vda", "vdb", "vdz"]
        .into_iter()
        .filter_map(|t| crate::domain_xml::disk_source(xml, t).map(|p| (t.to_string(), p)))
        .collect()
}

impl Hypervisor for FakeHypervisor {
    fn uri(&self) -> &str {
        "fake:///"
    }

    fn ping(&self) -> Result<u32, LibvirtError> {
        self.enter("ping", "")?;
        Ok(9_000_000)
    }

    fn define(&self, name: &str, xml: &str) -> Result<(), LibvirtError> {
        self.enter("define", name)?;
        let disks = disks_of(xml);
        let mut st = self.lock();
        let d = st.domains.entry(name.to_string()).or_insert(Domain {
            power: PowerState::Off,
            disks: HashMap::new(),
            config: String::new(),
            live: None,
        });
        // A running domain keeps the disks it has until it restarts.
        if d.power == PowerState::Off {
            d.disks = disks;
        }
        d.config = xml.to_string();
        Ok(())
    }

    fn undefine(&self, name: &str) -> Result<(), LibvirtError> {
        self.enter("undefine", name)?;
        self.lock().domains.remove(name);
        Ok(())
    }

    fn state(&self, name: &str) -> Result<PowerState, LibvirtError> {
        self.enter("state", name)?;
        Ok(self
            .lock()
            .domains
            .get(name)
            .map_or(PowerState::Missing, |d| d.power))
    }

    fn power(&self, name: &str, change: Power) -> Result<(), LibvirtError> {
        let call = match change {
            Power::Start => "power:Start",
            Power::Shutdown => "power:Shutdown",
            Power::Destroy => "power:Destroy",
            Power::Reboot => "power:Reboot",
            Power::Reset => "power:Reset",
            Power::Suspend => "power:Suspend",
            Power::Resume => "power:Resume",
        };
        self.enter(call, name)?;
        if change == Power::Destroy && !self.lock().domains.contains_key(name) {
            return Ok(());
        }
        self.with(name, |d| match change {
            Power::Start => {
                d.power = PowerState::Running;
                d.live = Some(d.config.clone());
            }
            Power::Resume => d.power = PowerState::Running,
            // The fake guest obeys the power button at once.
            Power::Shutdown | Power::Destroy => {
                d.power = PowerState::Off;
                d.live = None;
            }
            Power::Suspend => d.power = PowerState::Paused,
            Power::Reboot | Power::Reset => {}
        })
    }

    fn domains(&self) -> Result<Vec<String>, LibvirtError> {
        self.enter("domains", "")?;
        Ok(self
            .lock()
            .domains
            .keys()
            .filter(|n| n.starts_with(DOMAIN_PREFIX))
            .cloned()
            .collect())
    }

    fn block_resize(&self, name: &str, disk: &str, bytes: u64) -> Result<(), LibvirtError> {
        self.enter("block_resize", name)?;
        let path = self.with(name, |d| d.disks.get(disk).cloned())?;
        let path = path.ok_or_else(|| err("blockresize", name, "no such disk"))?;
        disks::grow(&path, bytes).map_err(disk_err("blockresize", name))
    }

    fn disk_snapshot(&self, name: &str, disk: &str, overlay: &Path) -> Result<(), LibvirtError> {
        self.enter("disk_snapshot", name)?;
        let current = self
            .with(name, |d| d.disks.get(disk).cloned())?
            .ok_or_else(|| err("snapshot-create", name, "no such disk"))?;
        let size = disks::info(&current, Some(disks::Format::Qcow2))
            .map_err(disk_err("snapshot-create", name))?
            .virtual_size;
        disks::create_overlay(&current, overlay, size)
            .map_err(disk_err("snapshot-create", name))?;
        self.with(name, |d| {
            d.disks.insert(disk.to_string(), overlay.to_path_buf())
        })?;
        Ok(())
    }

    fn block_commit(
        &self,
        name: &str,
        disk: &str,
        commit: Commit,
        _timeout: Duration,
    ) -> Result<(), LibvirtError> {
        self.enter("block_commit", name)?;
        let active = self
            .with(name, |d| d.disks.get(disk).cloned())?
            .ok_or_else(|| err("blockcommit", name, "no such disk"))?;
        let chain = disks::backing_chain(&active).map_err(disk_err("blockcommit", name))?;
        match commit {
            Commit::Active => {
                let backing = chain.get(1).cloned().ok_or_else(|| {
                    err("blockcommit", name, "the active layer has no backing file")
                })?;
                disks::commit(&active, &backing).map_err(disk_err("blockcommit", name))?;
                self.with(name, |d| d.disks.insert(disk.to_string(), backing))?;
            }
            Commit::Into { top, base } => {
                let at = chain
                    .iter()
                    .position(|p| *p == top)
                    .filter(|i| *i > 0 && chain[i + 1..].contains(&base))
                    .ok_or_else(|| {
                        err("blockcommit", name, "top is not above base in the chain")
                    })?;
                disks::commit(&top, &base).map_err(disk_err("blockcommit", name))?;
                disks::rebase_unsafe(&chain[at - 1], &base)
                    .map_err(disk_err("blockcommit", name))?;
            }
        }
        Ok(())
    }

    fn guest_agent(&self, name: &str, call: GuestCall) -> Result<(), LibvirtError> {
        let n = match call {
            GuestCall::Freeze => "guest_agent:Freeze",
            GuestCall::Thaw => "guest_agent:Thaw",
            GuestCall::SetPassword { .. } => "guest_agent:SetPassword",
        };
        self.enter(n, name)?;
        if self.lock().guest_agent {
            Ok(())
        } else {
            Err(err(
                "guest-agent",
                name,
                "QEMU guest agent is not connected",
            ))
        }
    }

    fn xml(&self, name: &str, inactive: bool) -> Result<Option<String>, LibvirtError> {
        self.enter("xml", name)?;
        Ok(self.lock().domains.get(name).map(|d| match &d.live {
            Some(live) if !inactive => live.clone(),
            _ => d.config.clone(),
        }))
    }

    fn attach_interface(&self, name: &str, xml: &str, live: bool) -> Result<(), LibvirtError> {
        self.enter("attach_interface", name)?;
        if live {
            self.enter("attach_interface:live", name)?;
        }
        self.with(name, |d| {
            if live {
                let Some(l) = &d.live else {
                    return Err(err("attach-device", name, "domain is not running"));
                };
                d.live = Some(add_device(l, xml));
            }
            d.config = add_device(&d.config, xml);
            Ok(())
        })?
    }

    fn detach_interface(&self, name: &str, xml: &str, live: bool) -> Result<(), LibvirtError> {
        self.enter("detach_interface", name)?;
        if live {
            self.enter("detach_interface:live", name)?;
        }
        let mac = crate::domain_xml::group_interface(xml)
            .map(|i| i.mac.to_string())
            .ok_or_else(|| err("detach-device", name, "no group NIC in the device XML"))?;
        let missing = || err("detach-device", name, "no matching device found");
        self.with(name, |d| {
            let live_xml = match (&d.live, live) {
                (Some(l), true) => Some(remove_interface(l, &mac).ok_or_else(missing)?),
                (None, true) => return Err(err("detach-device", name, "domain is not running")),
                (l, false) => l.clone(),
            };
            d.config = remove_interface(&d.config, &mac).ok_or_else(missing)?;
            d.live = live_xml;
            Ok(())
        })?
    }

    fn disk_source(&self, name: &str, disk: &str) -> Result<Option<PathBuf>, LibvirtError> {
        self.enter("disk_source", name)?;
        let st = self.lock();
        Ok(st
            .domains
            .get(name)
            .filter(|d| matches!(d.power, PowerState::Running | PowerState::Paused))
            .and_then(|d| d.disks.get(disk).cloned()))
    }
}
