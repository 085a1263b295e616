//! The real [`Hypervisor`]: libvirt (define, power, states, XML, NIC
//! hot-plug, disk snapshots, block commits, guest-agent calls).
//!
//! Each call opens its own connection (`virConnectOpen` on a local socket
//! costs about a millisecond), so a restarted libvirtd is picked up without
//! reconnect logic and no connection is shared between threads (the `virt`
//! crate's `Connect` is `Send` but not `Sync`). Only domains whose name starts
//! with [`DOMAIN_PREFIX`] belong to Gantry.

use crate::hypervisor::{Commit, GuestCall, Hypervisor, Power};
use std::path::{Path, PathBuf};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::ErrorNumber;

/// Gantry's domains are named `gantry-<instance id>`.
pub const DOMAIN_PREFIX: &str = "gantry-";

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("libvirt {op} {domain}: {message}")]
    Call {
        op: &'static str,
        domain: String,
        message: String,
    },
}

/// What libvirt says a domain is doing, reduced to what the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    Running,
    Paused,
    Off,
    /// Defined nowhere.
    Missing,
}

#[derive(Debug, Clone)]
pub struct Libvirt {
    uri: String,
}

fn call_err<'a>(
    op: &'static str,
    domain: &'a str,
) -> impl FnOnce(virt::error::Error) -> LibvirtError + 'a {
    move |e| LibvirtError::Call {
        op,
        domain: domain.to_string(),
        message: e.message().to_string(),
    }
}

impl Libvirt {
    pub fn new(uri: impl Into<String>) -> Self {
        Self { uri: uri.into() }
    }

    fn connect(&self) -> Result<Connect, LibvirtError> {
        Connect::open(Some(&self.uri)).map_err(|e| LibvirtError::Connect {
            uri: self.uri.clone(),
            message: e.message().to_string(),
        })
    }

    fn lookup(&self, conn: &Connect, name: &str) -> Result<Option<Domain>, LibvirtError> {
        match conn.lookup_domain_by_name(name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.code() == virt::enumutil::Enum::Known(ErrorNumber::NoDomain) => Ok(None),
            Err(e) => Err(call_err("lookup", name)(e)),
        }
    }

    fn with_domain<T>(
        &self,
        op: &'static str,
        name: &str,
        f: impl FnOnce(&Domain) -> Result<T, virt::error::Error>,
    ) -> Result<T, LibvirtError> {
        let conn = self.connect()?;
        let dom = self
            .lookup(&conn, name)?
            .ok_or_else(|| LibvirtError::Call {
                op,
                domain: name.to_string(),
                message: "no such domain".into(),
            })?;
        f(&dom).map_err(call_err(op, name))
    }

    fn raw_err<'a>(
        op: &'static str,
        name: &'a str,
    ) -> impl Fn(crate::virt_raw::RawError) -> LibvirtError + 'a {
        move |e| LibvirtError::Call {
            op,
            domain: name.to_string(),
            message: e.to_string(),
        }
    }

    /// Waits (up to `timeout`) until `disk` has no block job, or, with
    /// `pivot`, until the job is ready and then pivots.
    fn finish_job(
        &self,
        dom: &Domain,
        name: &str,
        disk: &str,
        pivot: bool,
        timeout: std::time::Duration,
    ) -> Result<(), LibvirtError> {
        use crate::virt_raw;
        let raw = Self::raw_err("blockcommit", name);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match virt_raw::block_job(dom, disk).map_err(&raw)? {
                None if !pivot => return Ok(()),
                Some(job) if pivot && job.ready() => break,
                Some(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                other => {
                    let _ = virt_raw::block_job_finish(dom, disk, false);
                    return Err(LibvirtError::Call {
                        op: "blockcommit",
                        domain: name.to_string(),
                        message: format!("the commit did not finish in {timeout:?} ({other:?})"),
                    });
                }
            }
        }
        virt_raw::pivot_when_ready(dom, disk, deadline).map_err(&raw)?;
        while virt_raw::block_job(dom, disk).map_err(&raw)?.is_some() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }
}

/// Device changes always reach the persistent definition; with `live` the
/// running guest too (libvirt refuses both when the live part fails).
fn device_flags(live: bool) -> u32 {
    let config = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
    if live {
        config | virt::sys::VIR_DOMAIN_AFFECT_LIVE
    } else {
        config
    }
}

impl Hypervisor for Libvirt {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn ping(&self) -> Result<u32, LibvirtError> {
        let conn = self.connect()?;
        conn.lib_version().map_err(call_err("version", ""))
    }

    fn define(&self, name: &str, xml: &str) -> Result<(), LibvirtError> {
        let conn = self.connect()?;
        conn.define_domain_xml(xml)
            .map(drop)
            .map_err(call_err("define", name))
    }

    fn undefine(&self, name: &str) -> Result<(), LibvirtError> {
        let conn = self.connect()?;
        match self.lookup(&conn, name)? {
            Some(d) => d.undefine().map_err(call_err("undefine", name)),
            None => Ok(()),
        }
    }

    fn state(&self, name: &str) -> Result<PowerState, LibvirtError> {
        let conn = self.connect()?;
        let Some(dom) = self.lookup(&conn, name)? else {
            return Ok(PowerState::Missing);
        };
        let (state, _) = dom.state().map_err(call_err("state", name))?;
        Ok(match state {
            virt::enumutil::Enum::Known(DomainState::Running | DomainState::Blocked) => {
                PowerState::Running
            }
            virt::enumutil::Enum::Known(DomainState::Paused | DomainState::PMSuspended) => {
                PowerState::Paused
            }
            virt::enumutil::Enum::Known(DomainState::Shutdown) => PowerState::Running,
            _ => PowerState::Off,
        })
    }

    fn power(&self, name: &str, change: Power) -> Result<(), LibvirtError> {
        match change {
            Power::Start => self.with_domain("start", name, |d| d.create().map(drop)),
            Power::Shutdown => self.with_domain("shutdown", name, |d| d.shutdown().map(drop)),
            Power::Destroy => {
                if matches!(self.state(name)?, PowerState::Off | PowerState::Missing) {
                    return Ok(());
                }
                self.with_domain("destroy", name, |d| d.destroy().map(drop))
            }
            Power::Reboot => self.with_domain("reboot", name, |d| {
                d.reboot(virt::sys::VIR_DOMAIN_REBOOT_DEFAULT).map(drop)
            }),
            Power::Reset => self.with_domain("reset", name, |d| d.reset().map(drop)),
            Power::Suspend => self.with_domain("suspend", name, |d| d.suspend().map(drop)),
            Power::Resume => self.with_domain("resume", name, |d| d.resume().map(drop)),
        }
    }

    fn domains(&self) -> Result<Vec<String>, LibvirtError> {
        let conn = self.connect()?;
        let doms = conn.list_all_domains(0).map_err(call_err("list", "*"))?;
        let mut names: Vec<String> = doms
            .iter()
            .filter_map(|d| d.name().ok())
            .filter(|n| n.starts_with(DOMAIN_PREFIX))
            .collect();
        names.sort();
        Ok(names)
    }

    fn block_resize(&self, name: &str, disk: &str, bytes: u64) -> Result<(), LibvirtError> {
        self.with_domain("blockresize", name, |d| {
            d.block_resize(disk, bytes, virt::sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                .map(drop)
        })
    }

    fn disk_snapshot(&self, name: &str, disk: &str, overlay: &Path) -> Result<(), LibvirtError> {
        // Every other disk is named with snapshot='no': left out, libvirt
        // would give each an external overlay of its own.
        let live = self.with_domain("dumpxml", name, |d| d.xml_desc(0))?;
        let others: Vec<String> = crate::domain_xml::disk_targets(&live)
            .into_iter()
            .filter(|t| t != disk)
            .collect();
        let mut w = quick_xml::Writer::new(Vec::new());
        w.create_element("domainsnapshot")
            .write_inner_content(|w| {
                w.create_element("disks").write_inner_content(|w| {
                    w.create_element("disk")
                        .with_attributes([("name", disk), ("snapshot", "external")])
                        .write_inner_content(|w| {
                            w.create_element("source")
                                .with_attribute(("file", overlay.to_string_lossy().as_ref()))
                                .write_empty()
                                .map(drop)
                        })?;
                    for t in &others {
                        w.create_element("disk")
                            .with_attributes([("name", t.as_str()), ("snapshot", "no")])
                            .write_empty()?;
                    }
                    Ok(())
                })?;
                Ok(())
            })
            .expect("write to memory");
        let xml = String::from_utf8(w.into_inner()).expect("utf-8 XML");
        let flags = virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
        self.with_domain("snapshot-create", name, |d| {
            d.create_snapshot_xml(&xml, flags).map(drop)
        })
    }

    fn block_commit(
        &self,
        name: &str,
        disk: &str,
        commit: Commit,
        timeout: std::time::Duration,
    ) -> Result<(), LibvirtError> {
        use crate::virt_raw;
        let conn = self.connect()?;
        let dom = self
            .lookup(&conn, name)?
            .ok_or_else(|| LibvirtError::Call {
                op: "blockcommit",
                domain: name.to_string(),
                message: "no such domain".into(),
            })?;
        let raw = Self::raw_err("blockcommit", name);
        match commit {
            Commit::Active => {
                virt_raw::block_commit_active(&dom, disk).map_err(&raw)?;
                self.finish_job(&dom, name, disk, true, timeout)
            }
            Commit::Into { top, base } => {
                virt_raw::block_commit(&dom, disk, &base, &top).map_err(&raw)?;
                self.finish_job(&dom, name, disk, false, timeout)
            }
        }
    }

    fn guest_agent(&self, name: &str, call: GuestCall) -> Result<(), LibvirtError> {
        use crate::virt_raw;
        let conn = self.connect()?;
        let dom = self
            .lookup(&conn, name)?
            .ok_or_else(|| LibvirtError::Call {
                op: "guest-agent",
                domain: name.to_string(),
                message: "no such domain".into(),
            })?;
        let raw = Self::raw_err("guest-agent", name);
        match call {
            GuestCall::Freeze => virt_raw::fs_freeze(&dom).map(drop).map_err(raw),
            GuestCall::Thaw => virt_raw::fs_thaw(&dom).map(drop).map_err(raw),
            GuestCall::SetPassword { user, hash } => {
                /// `VIR_DOMAIN_PASSWORD_ENCRYPTED`: the password is a hash.
                const ENCRYPTED: u32 = 1;
                dom.set_user_password(&user, &hash, ENCRYPTED)
                    .map_err(call_err("set-user-password", name))
            }
        }
    }

    fn xml(&self, name: &str, inactive: bool) -> Result<Option<String>, LibvirtError> {
        let conn = self.connect()?;
        let Some(dom) = self.lookup(&conn, name)? else {
            return Ok(None);
        };
        let flags = if inactive {
            virt::sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        dom.xml_desc(flags)
            .map(Some)
            .map_err(call_err("dumpxml", name))
    }

    fn attach_interface(&self, name: &str, xml: &str, live: bool) -> Result<(), LibvirtError> {
        let flags = device_flags(live);
        self.with_domain("attach-device", name, |d| d.attach_device_flags(xml, flags))
    }

    fn detach_interface(&self, name: &str, xml: &str, live: bool) -> Result<(), LibvirtError> {
        let flags = device_flags(live);
        self.with_domain("detach-device", name, |d| d.detach_device_flags(xml, flags))
    }

    fn disk_source(&self, name: &str, disk: &str) -> Result<Option<PathBuf>, LibvirtError> {
        if !matches!(self.state(name)?, PowerState::Running | PowerState::Paused) {
            return Ok(None);
        }
        let xml = self.with_domain("dumpxml", name, |d| d.xml_desc(0))?;
        Ok(crate::domain_xml::disk_source(&xml, disk))
    }
}
