//! libvirt domain XML, built from a typed [`DomainDef`].
//!
//! Nothing is pasted into XML as text: element text and attribute values go
//! through quick-xml's writer, which escapes them, and the values themselves
//! come from validated types (ids, PCI addresses, absolute paths, checked
//! machine names). Golden-file tests pin the output.

use crate::net::InterfaceDef;
use gantry_proto::validate::PciAddress;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;
use std::io::Cursor;
use std::path::PathBuf;

mod read;
pub use read::{disk_source, disk_targets, group_interface};

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// From the first disk's own boot loader.
    Disk,
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDef {
    pub path: PathBuf,
    /// `vda`, `vdb`, ...
    pub target: &'static str,
    /// Guest-visible serial (`root`, `data`), so guests find disks by id.
    pub serial: &'static str,
}

/// How whole GPUs are passed through (built by the GPU pool from sysfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passthrough {
    /// Every PCI function of the GPUs' IOMMU groups (bridges left out):
    /// each becomes a managed VFIO hostdev.
    pub functions: Vec<PciAddress>,
    /// The guest firmware's 64-bit MMIO window, MiB (OVMF's
    /// `X-PciMmio64Mb`): the BARs' sum, size-aligned, to a power of two.
    pub mmio_window_mb: u64,
    /// vCPUs and memory pinned to the GPUs' NUMA node(s).
    pub numa: Option<NumaPin>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaPin {
    pub nodes: Vec<u32>,
    /// The host CPUs of those nodes (a cpulist).
    pub cpuset: String,
}

/// Memory beyond the guest's that QEMU may lock and use (VFIO pins all
/// guest memory, so the lock limit is the hard limit): 2 GiB plus 1/32 of
/// the guest's memory.
pub fn gpu_memory_hard_limit_mib(memory_mib: u64) -> u64 {
    memory_mib + 2048 + memory_mib / 32
}

/// Everything the XML is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDef {
    pub name: String,
    pub uuid: uuid::Uuid,
    pub domain_type: &'static str,
    pub machine: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub boot: Boot,
    pub disks: Vec<DiskDef>,
    /// Serial 0: the console, as a unix socket, logged to a file.
    pub console_socket: PathBuf,
    pub console_log: PathBuf,
    /// Serial 1: a second port bound to a unix socket (test guests run a
    /// command service there).
    pub exec_socket: PathBuf,
    /// Whole GPUs passed through, and what they need.
    pub passthrough: Option<Passthrough>,
    /// Free-form metadata under Gantry's namespace (the instance id).
    pub instance_id: String,
    /// The access NIC (the guest's `eth0`).
    pub interface: Option<InterfaceDef>,
    /// The network group's NIC, after the access NIC (the guest's `eth1`).
    pub group_interface: Option<InterfaceDef>,
    /// The read-only seed disk (NoCloud ISO, serial `cidata`).
    pub seed: Option<PathBuf>,
    /// The qemu-guest-agent channel's socket.
    pub guest_agent_socket: Option<PathBuf>,
    /// The guest exporter's channel (`org.gantry.metrics.0`), in every
    /// domain: its socket ([`crate::layout::Layout::metrics_socket`]).
    pub metrics_socket: PathBuf,
    /// The bucket share (virtiofs; needs shared memory), docs/buckets.md.
    pub share: Option<ShareDef>,
}

/// A host directory shared into the guest with virtiofs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDef {
    pub dir: PathBuf,
    pub tag: &'static str,
    /// The virtiofsd libvirt starts for it (chroot sandbox, no cache:
    /// host-side mounts made later show through at once).
    pub virtiofsd: PathBuf,
}

/// The prefix of group NICs' tap names (see `net::groups::group_tap_name`):
/// how a group NIC is told from the access NIC in a domain's XML.
pub const GROUP_TAP_PREFIX: &str = "gg-";

/// Empty PCIe root ports a q35 domain gets for hot-plugged devices.
pub const SPARE_ROOT_PORTS: usize = 2;

/// Whether QEMU machine type `machine` is a q35 one (PCIe: hot-plug needs
/// free root ports; `pc` hot-plugs on its root bus through ACPI).
pub fn is_q35(machine: &str) -> bool {
    machine == "q35" || machine.contains("-q35")
}

/// libvirt's namespace for QEMU pass-through elements.
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

type W = Writer<Cursor<Vec<u8>>>;

fn open(w: &mut W, name: &str, attrs: &[(&str, &str)]) {
    let mut e = BytesStart::new(name);
    for (k, v) in attrs {
        e.push_attribute((*k, *v));
    }
    w.write_event(Event::Start(e)).expect("write to memory");
}

fn close(w: &mut W, name: &str) {
    w.write_event(Event::End(BytesEnd::new(name)))
        .expect("write to memory");
}

fn empty(w: &mut W, name: &str, attrs: &[(&str, &str)]) {
    let mut e = BytesStart::new(name);
    for (k, v) in attrs {
        e.push_attribute((*k, *v));
    }
    w.write_event(Event::Empty(e)).expect("write to memory");
}

fn text(w: &mut W, name: &str, attrs: &[(&str, &str)], value: &str) {
    open(w, name, attrs);
    w.write_event(Event::Text(BytesText::new(value)))
        .expect("write to memory");
    close(w, name);
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

impl DomainDef {
    /// Renders the domain XML.
    pub fn to_xml(&self) -> String {
        let mut w = Writer::new_with_indent(Cursor::new(Vec::new()), b' ', 2);
        match self.passthrough {
            Some(_) => open(
                &mut w,
                "domain",
                &[("type", self.domain_type), ("xmlns:qemu", QEMU_NS)],
            ),
            None => open(&mut w, "domain", &[("type", self.domain_type)]),
        }
        text(&mut w, "name", &[], &self.name);
        text(&mut w, "uuid", &[], &self.uuid.hyphenated().to_string());
        open(&mut w, "metadata", &[]);
        text(
            &mut w,
            "gantry:instance",
            &[("xmlns:gantry", "https://gantry.dev/xmlns/instance/1")],
            &self.instance_id,
        );
        close(&mut w, "metadata");
        text(
            &mut w,
            "memory",
            &[("unit", "MiB")],
            &self.memory_mib.to_string(),
        );
        self.write_cpus_and_memory(&mut w);
        self.write_os(&mut w);
        open(&mut w, "features", &[]);
        empty(&mut w, "acpi", &[]);
        empty(&mut w, "apic", &[]);
        close(&mut w, "features");
        self.write_cpu_model(&mut w);
        text(&mut w, "on_poweroff", &[], "destroy");
        text(&mut w, "on_reboot", &[], "restart");
        text(&mut w, "on_crash", &[], "destroy");
        open(&mut w, "devices", &[]);
        for d in &self.disks {
            write_disk(&mut w, d);
        }
        if let Some(seed) = &self.seed {
            write_seed(&mut w, seed);
        }
        for i in self.interface.iter().chain(&self.group_interface) {
            write_interface(&mut w, i);
        }
        self.write_serials(&mut w);
        if let Some(sock) = &self.guest_agent_socket {
            write_channel(&mut w, sock, "org.qemu.guest_agent.0");
        }
        write_channel(
            &mut w,
            &self.metrics_socket,
            gantry_proto::metrics::GUEST_CHANNEL_NAME,
        );
        if let Some(s) = &self.share {
            write_share(&mut w, s);
        }
        for f in self.passthrough.iter().flat_map(|p| &p.functions) {
            write_hostdev(&mut w, f);
        }
        if is_q35(&self.machine) {
            // Free hot-plug slots (a group NIC joined while running):
            // PCIe has no slots on the root bus, and libvirt adds a root
            // port only per device it knows of at define time.
            // The root complex is named first: libvirt would otherwise
            // number the first port 0, where only the root may be.
            empty(
                &mut w,
                "controller",
                &[("type", "pci"), ("index", "0"), ("model", "pcie-root")],
            );
            for _ in 0..SPARE_ROOT_PORTS {
                empty(
                    &mut w,
                    "controller",
                    &[("type", "pci"), ("model", "pcie-root-port")],
                );
            }
        }
        empty(&mut w, "memballoon", &[("model", "none")]);
        close(&mut w, "devices");
        self.write_fw_cfg(&mut w);
        close(&mut w, "domain");
        let mut s = String::from_utf8(w.into_inner().into_inner()).expect("utf-8 XML");
        s.push('\n');
        s
    }

    /// `<vcpu>`, and with GPUs: NUMA pinning and locked memory with its
    /// hard limit.
    fn write_cpus_and_memory(&self, w: &mut W) {
        let vcpus = self.vcpus.to_string();
        let pin = self.passthrough.as_ref().and_then(|p| p.numa.as_ref());
        match pin {
            Some(p) => text(
                w,
                "vcpu",
                &[("placement", "static"), ("cpuset", &p.cpuset)],
                &vcpus,
            ),
            None => text(w, "vcpu", &[("placement", "static")], &vcpus),
        }
        if self.passthrough.is_none() {
            self.write_memory_backing(w, false);
            return;
        }
        if let Some(pin) = pin {
            let nodes: Vec<String> = pin.nodes.iter().map(u32::to_string).collect();
            open(w, "numatune", &[]);
            empty(
                w,
                "memory",
                &[("mode", "strict"), ("nodeset", &nodes.join(","))],
            );
            close(w, "numatune");
        }
        open(w, "memtune", &[]);
        text(
            w,
            "hard_limit",
            &[("unit", "MiB")],
            &gpu_memory_hard_limit_mib(self.memory_mib).to_string(),
        );
        close(w, "memtune");
        self.write_memory_backing(w, true);
    }

    /// `<memoryBacking>`: locked with GPUs, shared memfd with a share.
    fn write_memory_backing(&self, w: &mut W, locked: bool) {
        if !locked && self.share.is_none() {
            return;
        }
        open(w, "memoryBacking", &[]);
        if self.share.is_some() {
            empty(w, "source", &[("type", "memfd")]);
            empty(w, "access", &[("mode", "shared")]);
        }
        if locked {
            empty(w, "locked", &[]);
        }
        close(w, "memoryBacking");
    }

    /// OVMF's 64-bit MMIO window through fw_cfg. libvirt reserves the
    /// `opt/ovmf/` names in `<sysinfo type="fwcfg">`, so it goes on QEMU's
    /// command line (the `qemu` namespace is declared on `<domain>`).
    fn write_fw_cfg(&self, w: &mut W) {
        let Some(p) = &self.passthrough else { return };
        open(w, "qemu:commandline", &[]);
        empty(w, "qemu:arg", &[("value", "-fw_cfg")]);
        empty(
            w,
            "qemu:arg",
            &[(
                "value",
                &format!("name=opt/ovmf/X-PciMmio64Mb,string={}", p.mmio_window_mb),
            )],
        );
        close(w, "qemu:commandline");
    }

    /// KVM guests get the host's CPU; with GPUs also the host's physical
    /// address bits, so large BARs fit above guest RAM.
    fn write_cpu_model(&self, w: &mut W) {
        if self.domain_type != "kvm" {
            return;
        }
        if self.passthrough.is_none() {
            empty(w, "cpu", &[("mode", "host-passthrough")]);
            return;
        }
        open(
            w,
            "cpu",
            &[
                ("mode", "host-passthrough"),
                ("check", "none"),
                ("migratable", "off"),
            ],
        );
        empty(w, "maxphysaddr", &[("mode", "passthrough")]);
        close(w, "cpu");
    }

    fn write_os(&self, w: &mut W) {
        open(w, "os", &[]);
        text(
            w,
            "type",
            &[("arch", "x86_64"), ("machine", &self.machine)],
            "hvm",
        );
        match &self.boot {
            Boot::Disk => empty(w, "boot", &[("dev", "hd")]),
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                text(w, "kernel", &[], &path_str(kernel));
                if let Some(i) = initrd {
                    text(w, "initrd", &[], &path_str(i));
                }
                text(w, "cmdline", &[], cmdline);
            }
        }
        close(w, "os");
    }

    fn write_serials(&self, w: &mut W) {
        let console = path_str(&self.console_socket);
        let log = path_str(&self.console_log);
        open(w, "serial", &[("type", "unix")]);
        empty(w, "source", &[("mode", "bind"), ("path", &console)]);
        empty(w, "log", &[("file", &log), ("append", "on")]);
        empty(w, "target", &[("port", "0")]);
        close(w, "serial");
        open(w, "serial", &[("type", "unix")]);
        empty(
            w,
            "source",
            &[("mode", "bind"), ("path", &path_str(&self.exec_socket))],
        );
        empty(w, "target", &[("port", "1")]);
        close(w, "serial");
        open(w, "console", &[("type", "unix")]);
        empty(w, "source", &[("mode", "bind"), ("path", &console)]);
        empty(w, "target", &[("type", "serial"), ("port", "0")]);
        close(w, "console");
    }
}

fn write_disk(w: &mut W, d: &DiskDef) {
    // Only the root disk is ever snapshotted: a disk-only snapshot would
    // otherwise switch the data volume to an overlay of its own.
    if d.target == "vda" {
        open(w, "disk", &[("type", "file"), ("device", "disk")]);
    } else {
        open(
            w,
            "disk",
            &[("type", "file"), ("device", "disk"), ("snapshot", "no")],
        );
    }
    empty(
        w,
        "driver",
        &[
            ("name", "qemu"),
            ("type", "qcow2"),
            ("cache", "none"),
            ("discard", "unmap"),
        ],
    );
    empty(w, "source", &[("file", &path_str(&d.path))]);
    empty(w, "target", &[("dev", d.target), ("bus", "virtio")]);
    text(w, "serial", &[], d.serial);
    close(w, "disk");
}

/// A virtio-serial channel on a unix socket QEMU listens on.
fn write_channel(w: &mut W, sock: &std::path::Path, name: &str) {
    open(w, "channel", &[("type", "unix")]);
    empty(w, "source", &[("mode", "bind"), ("path", &path_str(sock))]);
    empty(w, "target", &[("type", "virtio"), ("name", name)]);
    close(w, "channel");
}

/// The virtiofs share (libvirt starts its virtiofsd).
fn write_share(w: &mut W, s: &ShareDef) {
    open(
        w,
        "filesystem",
        &[("type", "mount"), ("accessmode", "passthrough")],
    );
    empty(w, "driver", &[("type", "virtiofs"), ("queue", "1024")]);
    open(w, "binary", &[("path", &path_str(&s.virtiofsd))]);
    empty(w, "cache", &[("mode", "none")]);
    empty(w, "sandbox", &[("mode", "chroot")]);
    close(w, "binary");
    empty(w, "source", &[("dir", &path_str(&s.dir))]);
    empty(w, "target", &[("dir", s.tag)]);
    close(w, "filesystem");
}

/// The seed: raw, read-only, excluded from disk-only snapshots.
fn write_seed(w: &mut W, path: &std::path::Path) {
    open(
        w,
        "disk",
        &[("type", "file"), ("device", "disk"), ("snapshot", "no")],
    );
    empty(w, "driver", &[("name", "qemu"), ("type", "raw")]);
    empty(w, "source", &[("file", &path_str(path))]);
    empty(w, "target", &[("dev", "vdz"), ("bus", "virtio")]);
    text(w, "serial", &[], "cidata");
    empty(w, "readonly", &[]);
    close(w, "disk");
}

/// A NIC alone, as `virDomainAttachDevice`/`DetachDevice` take it.
pub fn interface_xml(i: &InterfaceDef) -> String {
    let mut w = Writer::new_with_indent(Cursor::new(Vec::new()), b' ', 2);
    write_interface(&mut w, i);
    let mut s = String::from_utf8(w.into_inner().into_inner()).expect("utf-8 XML");
    s.push('\n');
    s
}

/// A NIC (access or group): on a bridge (libvirt attaches the tap), or a
/// bare tap the agent moves into the data plane's namespace.
fn write_interface(w: &mut W, i: &InterfaceDef) {
    let kind = if i.bridge.is_some() {
        "bridge"
    } else {
        "ethernet"
    };
    open(w, "interface", &[("type", kind)]);
    empty(w, "mac", &[("address", &i.mac.to_string())]);
    if let Some(b) = &i.bridge {
        empty(w, "source", &[("bridge", b)]);
    }
    empty(w, "target", &[("dev", &i.tap)]);
    empty(w, "model", &[("type", "virtio")]);
    if let Some(mtu) = i.mtu {
        empty(w, "mtu", &[("size", &mtu.to_string())]);
    }
    close(w, "interface");
}

fn write_hostdev(w: &mut W, g: &PciAddress) {
    open(
        w,
        "hostdev",
        &[("mode", "subsystem"), ("type", "pci"), ("managed", "yes")],
    );
    empty(w, "driver", &[("name", "vfio")]);
    open(w, "source", &[]);
    empty(
        w,
        "address",
        &[
            ("domain", &format!("0x{:04x}", g.domain)),
            ("bus", &format!("0x{:02x}", g.bus)),
            ("slot", &format!("0x{:02x}", g.slot)),
            ("function", &format!("0x{:x}", g.function)),
        ],
    );
    close(w, "source");
    close(w, "hostdev");
}

#[cfg(test)]
mod tests;
