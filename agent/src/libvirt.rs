//! The agent's narrow view of libvirt: define, start, stop, reset, pause,
//! resume, resize a disk, undefine, and read domain states.
//!
//! Each call opens its own connection (`virConnectOpen` on a local socket
//! costs about a millisecond), so a restarted libvirtd is picked up without
//! reconnect logic and no connection is shared between threads (the `virt`
//! crate's `Connect` is `Send` but not `Sync`). Only domains whose name starts
//! with [`DOMAIN_PREFIX`] belong to Gantry.

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

    pub fn uri(&self) -> &str {
        &self.uri
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

    /// Checks that libvirt answers (readiness, health).
    pub fn ping(&self) -> Result<u32, LibvirtError> {
        let conn = self.connect()?;
        conn.lib_version().map_err(call_err("version", ""))
    }

    /// Defines (or redefines) a persistent domain from XML.
    pub fn define(&self, name: &str, xml: &str) -> Result<(), LibvirtError> {
        let conn = self.connect()?;
        conn.define_domain_xml(xml)
            .map(drop)
            .map_err(call_err("define", name))
    }

    pub fn state(&self, name: &str) -> Result<PowerState, LibvirtError> {
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

    pub fn start(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain("start", name, |d| d.create())
    }

    /// Asks the guest to power off (ACPI power button).
    pub fn shutdown(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain("shutdown", name, |d| d.shutdown())
    }

    /// Pulls the plug. Idempotent: an already stopped domain is fine.
    pub fn destroy(&self, name: &str) -> Result<(), LibvirtError> {
        if matches!(self.state(name)?, PowerState::Off | PowerState::Missing) {
            return Ok(());
        }
        self.with_domain("destroy", name, |d| d.destroy())
    }

    /// Graceful reboot (ACPI; libvirt restarts the guest after it powers off).
    pub fn reboot(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain("reboot", name, |d| {
            d.reboot(virt::sys::VIR_DOMAIN_REBOOT_DEFAULT)
        })
    }

    /// Hard reset, like the reset button.
    pub fn reset(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain("reset", name, |d| d.reset())
    }

    pub fn suspend(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain("suspend", name, |d| d.suspend())
    }

    pub fn resume(&self, name: &str) -> Result<(), LibvirtError> {
        self.with_domain("resume", name, |d| d.resume())
    }

    /// Grows a disk of a running domain, in bytes.
    pub fn block_resize(&self, name: &str, target: &str, bytes: u64) -> Result<(), LibvirtError> {
        self.with_domain("blockresize", name, |d| {
            d.block_resize(target, bytes, virt::sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        })
    }

    /// Removes the definition. Idempotent: a missing domain is fine.
    pub fn undefine(&self, name: &str) -> Result<(), LibvirtError> {
        let conn = self.connect()?;
        match self.lookup(&conn, name)? {
            Some(d) => d.undefine().map_err(call_err("undefine", name)),
            None => Ok(()),
        }
    }

    /// Names of every domain (running or only defined) that is Gantry's.
    pub fn gantry_domains(&self) -> Result<Vec<String>, LibvirtError> {
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

    /// Freezes `disk`'s current image: QEMU flushes it and switches the guest
    /// to a new external qcow2 overlay at `overlay` (no snapshot metadata).
    pub fn external_overlay(
        &self,
        name: &str,
        disk: &str,
        overlay: &std::path::Path,
    ) -> Result<(), LibvirtError> {
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
                        })
                        .map(drop)
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

    /// Commits `disk`'s active overlay into its backing image and pivots
    /// back to it, waiting up to `timeout` for the copy.
    pub fn commit_and_pivot(
        &self,
        name: &str,
        disk: &str,
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
        let raw = |e: virt_raw::RawError| LibvirtError::Call {
            op: "blockcommit",
            domain: name.to_string(),
            message: e.to_string(),
        };
        virt_raw::block_commit_active(&dom, disk).map_err(raw)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match virt_raw::block_job(&dom, disk).map_err(raw)? {
                Some(job) if job.ready() => break,
                Some(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                other => {
                    let _ = virt_raw::block_job_finish(&dom, disk, false);
                    return Err(LibvirtError::Call {
                        op: "blockcommit",
                        domain: name.to_string(),
                        message: format!("commit did not become ready in {timeout:?} ({other:?})"),
                    });
                }
            }
        }
        virt_raw::block_job_finish(&dom, disk, true).map_err(raw)?;
        while virt_raw::block_job(&dom, disk).map_err(raw)?.is_some() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// Sets `user`'s password inside the guest through qemu-guest-agent,
    /// from a crypt(3) hash (`VIR_DOMAIN_PASSWORD_ENCRYPTED`). Fails when
    /// the guest runs no guest agent.
    pub fn set_user_password(
        &self,
        name: &str,
        user: &str,
        hash: &str,
    ) -> Result<(), LibvirtError> {
        /// `VIR_DOMAIN_PASSWORD_ENCRYPTED`: the password is already a hash.
        const ENCRYPTED: u32 = 1;
        self.with_domain("set-user-password", name, |d| {
            d.set_user_password(user, hash, ENCRYPTED)
        })
    }

    /// Host memory libvirt reports free, in bytes.
    pub fn free_memory(&self) -> Result<u64, LibvirtError> {
        let conn = self.connect()?;
        conn.free_memory().map_err(call_err("freememory", ""))
    }
}
