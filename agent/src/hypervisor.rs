//! The agent's narrow view of the hypervisor ([`Hypervisor`]): domains
//! (define, power, state), and the block jobs and guest-agent calls that
//! snapshots are made of. [`crate::libvirt::Libvirt`] is the real one;
//! [`crate::hypervisor_fake::FakeHypervisor`] keeps domains in memory,
//! does to disk files what QEMU would (with `qemu-img`), and fails any call
//! on request, so every failure path of an operation is tested without a
//! guest while real-guest tests keep the real path honest.

use crate::libvirt::{LibvirtError, PowerState};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A change of a domain's power.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Start,
    /// ACPI power button.
    Shutdown,
    /// Pull the plug; fine when already off.
    Destroy,
    /// ACPI reboot.
    Reboot,
    /// Reset button.
    Reset,
    Suspend,
    Resume,
}

/// A block commit of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// The active layer into its backing file, then the guest pivots to it.
    Active,
    /// Every layer from `top` down to just above `base` into `base`, while
    /// the guest writes on above them; the layer above `top` is then backed
    /// by `base`.
    Into { top: PathBuf, base: PathBuf },
}

/// A call to the guest's qemu-guest-agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestCall {
    /// Freeze every filesystem (writes flushed, then blocked).
    Freeze,
    Thaw,
    /// Set `user`'s password from a crypt(3) hash.
    SetPassword {
        user: String,
        hash: String,
    },
}

/// What the agent needs from the hypervisor. Domains are named
/// `gantry-<instance id>`; every call opens its own connection.
pub trait Hypervisor: Send + Sync {
    /// The connection URI (for logs).
    fn uri(&self) -> &str;
    /// Checks the hypervisor answers (readiness, health): its version.
    fn ping(&self) -> Result<u32, LibvirtError>;
    /// Defines (or redefines) a persistent domain.
    fn define(&self, name: &str, xml: &str) -> Result<(), LibvirtError>;
    /// Removes the definition; a missing domain is fine.
    fn undefine(&self, name: &str) -> Result<(), LibvirtError>;
    fn state(&self, name: &str) -> Result<PowerState, LibvirtError>;
    fn power(&self, name: &str, change: Power) -> Result<(), LibvirtError>;
    /// Names of every Gantry domain, running or only defined.
    fn domains(&self) -> Result<Vec<String>, LibvirtError>;
    /// Grows a disk of a running domain, in bytes.
    fn block_resize(&self, name: &str, disk: &str, bytes: u64) -> Result<(), LibvirtError>;
    /// Switches `disk` of a running domain to a new external qcow2 overlay
    /// at `overlay`, backed by the current layer, which is then read-only
    /// (disk only, no snapshot metadata, atomic).
    fn disk_snapshot(&self, name: &str, disk: &str, overlay: &Path) -> Result<(), LibvirtError>;
    /// Runs a block commit on `disk` of a running domain and waits for it
    /// (at most `timeout`).
    fn block_commit(
        &self,
        name: &str,
        disk: &str,
        commit: Commit,
        timeout: Duration,
    ) -> Result<(), LibvirtError>;
    fn guest_agent(&self, name: &str, call: GuestCall) -> Result<(), LibvirtError>;
    /// The file `disk` of a running domain reads and writes now (its
    /// active layer); `None` when the domain is not running.
    fn disk_source(&self, name: &str, disk: &str) -> Result<Option<PathBuf>, LibvirtError>;
    /// The domain's XML: with `inactive`, its persistent definition; else
    /// what runs now (the definition when it is off). `None` when the
    /// domain is defined nowhere.
    fn xml(&self, name: &str, inactive: bool) -> Result<Option<String>, LibvirtError>;
    /// Adds the NIC `xml` (one `<interface>`) to the persistent
    /// definition, and with `live` to the running guest too (hot-plug);
    /// nothing changes when either fails.
    fn attach_interface(&self, name: &str, xml: &str, live: bool) -> Result<(), LibvirtError>;
    /// Removes the NIC `xml` names (by MAC) from the persistent definition,
    /// and with `live` from the running guest too (which must cooperate:
    /// the unplug may still be under way when this returns).
    fn detach_interface(&self, name: &str, xml: &str, live: bool) -> Result<(), LibvirtError>;
}
