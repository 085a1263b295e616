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

/// The group NIC in a domain's XML (live or persistent, as libvirt prints
/// it): the `<interface>` whose target starts with [`GROUP_TAP_PREFIX`].
/// `None` when there is none or the XML does not parse.
pub fn group_interface(xml: &str) -> Option<InterfaceDef> {
    let mut r = quick_xml::Reader::from_str(xml);
    /// What the current `<interface>` says so far.
    #[derive(Default)]
    struct Seen {
        mac: Option<String>,
        tap: Option<String>,
        bridge: Option<String>,
        mtu: Option<u16>,
    }
    let mut cur: Option<Seen> = None;
    loop {
        let e = match r.read_event().ok()? {
            Event::Eof => return None,
            Event::End(e) if e.name().as_ref() == b"interface" => {
                if let Some(Seen {
                    mac: Some(mac),
                    tap: Some(tap),
                    bridge,
                    mtu,
                }) = cur.take()
                {
                    if tap.starts_with(GROUP_TAP_PREFIX) {
                        return Some(InterfaceDef {
                            mac: mac.parse().ok()?,
                            tap,
                            bridge,
                            mtu,
                        });
                    }
                }
                continue;
            }
            Event::Start(e) if e.name().as_ref() == b"interface" => {
                cur = Some(Seen::default());
                continue;
            }
            Event::Start(e) | Event::Empty(e) => e,
            _ => continue,
        };
        let Some(c) = cur.as_mut() else { continue };
        let attr = |k: &[u8]| {
            e.attributes()
                .flatten()
                .find(|a| a.key.as_ref() == k)
                .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
        };
        match e.name().as_ref() {
            b"mac" if c.mac.is_none() => c.mac = attr(b"address"),
            b"target" if c.tap.is_none() => c.tap = attr(b"dev"),
            b"source" if c.bridge.is_none() => c.bridge = attr(b"bridge"),
            b"mtu" => c.mtu = attr(b"size").and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
}

/// The targets of every disk in a domain's XML (`vda`, `vdb`, ...).
pub fn disk_targets(xml: &str) -> Vec<String> {
    let mut r = quick_xml::Reader::from_str(xml);
    let (mut out, mut in_disk) = (Vec::new(), false);
    loop {
        match r.read_event() {
            Ok(Event::Start(e)) if e.name().as_ref() == b"disk" => in_disk = true,
            Ok(Event::End(e)) if e.name().as_ref() == b"disk" => in_disk = false,
            Ok(Event::Empty(e)) | Ok(Event::Start(e))
                if in_disk && e.name().as_ref() == b"target" =>
            {
                if let Some(a) = e.attributes().flatten().find(|a| a.key.as_ref() == b"dev") {
                    if let Ok(v) = a.unescape_value() {
                        out.push(v.into_owned());
                    }
                }
            }
            Ok(Event::Eof) | Err(_) => return out,
            _ => {}
        }
    }
}

/// The source file of the disk with target `dev` in a domain's XML (as
/// libvirt prints it): the layer the guest uses now (not one of its
/// `backingStore` layers).
pub fn disk_source(xml: &str, dev: &str) -> Option<PathBuf> {
    let mut r = quick_xml::Reader::from_str(xml);
    // Depth inside the current <disk>; None outside one.
    let mut depth: Option<usize> = None;
    let (mut source, mut target) = (None, None);
    loop {
        let (e, opens) = match r.read_event().ok()? {
            Event::Eof => return None,
            Event::Start(e) => (e, true),
            Event::Empty(e) => (e, false),
            Event::End(e) => {
                match (e.name().as_ref(), depth) {
                    (b"disk", Some(0)) => {
                        if target.as_deref() == Some(dev) {
                            return source.map(PathBuf::from);
                        }
                        depth = None;
                    }
                    (_, Some(d)) => depth = Some(d.saturating_sub(1)),
                    _ => {}
                }
                continue;
            }
            _ => continue,
        };
        let attr = |k: &[u8]| {
            e.attributes()
                .flatten()
                .find(|a| a.key.as_ref() == k)
                .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
        };
        match (e.name().as_ref(), depth) {
            (b"disk", None) if opens => {
                (depth, source, target) = (Some(0), None, None);
                continue;
            }
            (b"source", Some(0)) if source.is_none() => source = attr(b"file"),
            (b"target", Some(0)) => target = attr(b"dev"),
            _ => {}
        }
        if opens {
            depth = depth.map(|d| d + 1);
        }
    }
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
mod tests {
    use super::*;

    fn def() -> DomainDef {
        DomainDef {
            name: "gantry-ins-0190b4c2e7a47c3a9d2b8f1e4a6c0d12".into(),
            uuid: uuid::Uuid::parse_str("0190b4c2-e7a4-7c3a-9d2b-8f1e4a6c0d12").unwrap(),
            domain_type: "qemu",
            machine: "pc".into(),
            vcpus: 2,
            memory_mib: 512,
            boot: Boot::Kernel {
                kernel: "/var/lib/gantry/images/img-1/vmlinuz".into(),
                initrd: Some("/var/lib/gantry/images/img-1/initrd.img".into()),
                cmdline: "console=ttyS0 root=/dev/vda rw".into(),
            },
            disks: vec![
                DiskDef {
                    path: "/var/lib/gantry/instances/ins-1/root.qcow2".into(),
                    target: "vda",
                    serial: "root",
                },
                DiskDef {
                    path: "/var/lib/gantry/volumes/vol-1.qcow2".into(),
                    target: "vdb",
                    serial: "data",
                },
            ],
            console_socket: "/var/lib/gantry/instances/ins-1/console.sock".into(),
            console_log: "/var/lib/gantry/instances/ins-1/console.log".into(),
            exec_socket: "/var/lib/gantry/instances/ins-1/exec.sock".into(),
            passthrough: None,
            instance_id: "ins-0190b4c2e7a47c3a9d2b8f1e4a6c0d12".into(),
            interface: None,
            group_interface: None,
            seed: None,
            guest_agent_socket: None,
            metrics_socket: "/var/lib/gantry/instances/ins-1/metrics.sock".into(),
            share: None,
        }
    }

    use crate::testutil::golden;

    #[test]
    fn golden_direct_boot_two_disks() {
        golden("domain-direct-boot.xml", &def().to_xml());
    }

    #[test]
    fn golden_kvm_disk_boot_with_gpus() {
        let mut d = def();
        d.domain_type = "kvm";
        d.boot = Boot::Disk;
        d.disks.truncate(1);
        d.passthrough = Some(Passthrough {
            functions: vec![
                PciAddress::parse("0000:65:00.0").unwrap(),
                PciAddress::parse("0000:65:00.1").unwrap(),
                PciAddress::parse("0000:b3:00.0").unwrap(),
            ],
            mmio_window_mb: 524288,
            numa: Some(NumaPin {
                nodes: vec![1],
                cpuset: "48-95,144-191".into(),
            }),
        });
        golden("domain-kvm-gpus.xml", &d.to_xml());
    }

    #[test]
    fn golden_access_nic_seed_and_guest_agent() {
        let mut d = def();
        d.interface = Some(InterfaceDef {
            mac: "52:54:00:c8:00:02".parse().unwrap(),
            tap: "gt-0123456789a".into(),
            bridge: Some("gantry0".into()),
            mtu: None,
        });
        d.seed = Some("/var/lib/gantry/instances/ins-1/seed.iso".into());
        d.guest_agent_socket = Some("/var/lib/gantry/instances/ins-1/qga.sock".into());
        golden("domain-access-bridge.xml", &d.to_xml());
        d.interface.as_mut().unwrap().bridge = None;
        golden("domain-access-netns.xml", &d.to_xml());
        // The bucket share: virtiofs over shared memory (docs/buckets.md).
        d.share = Some(ShareDef {
            dir: "/var/lib/gantry/buckets/ins-1/share".into(),
            tag: "gantry-buckets",
            virtiofsd: "/usr/lib/qemu/virtiofsd".into(),
        });
        golden("domain-bucket-share.xml", &d.to_xml());
    }

    fn group_nic(bridge: Option<&str>) -> InterfaceDef {
        InterfaceDef {
            mac: "52:54:01:10:00:02".parse().unwrap(),
            tap: "gg-0123456789a".into(),
            bridge: bridge.map(String::from),
            mtu: Some(1450),
        }
    }

    #[test]
    fn golden_access_and_group_nics() {
        let mut d = def();
        d.interface = Some(InterfaceDef {
            mac: "52:54:00:c8:00:02".parse().unwrap(),
            tap: "gt-0123456789a".into(),
            bridge: None,
            mtu: None,
        });
        d.group_interface = Some(group_nic(None));
        d.seed = Some("/var/lib/gantry/instances/ins-1/seed.iso".into());
        golden("domain-group-netns.xml", &d.to_xml());
        d.interface.as_mut().unwrap().bridge = Some("gantry0".into());
        d.group_interface = Some(group_nic(Some("gn-001388")));
        golden("domain-group-bridge.xml", &d.to_xml());
        // Read back (not the access NIC); after the access NIC (eth1).
        assert_eq!(group_interface(&d.to_xml()), d.group_interface);
        d.group_interface = None;
        assert_eq!(group_interface(&d.to_xml()), None);
        d.group_interface = Some(group_nic(Some("gn-001388")));
        let xml = d.to_xml();
        assert!(xml.find("gt-0123456789a").unwrap() < xml.find("gg-0123456789a").unwrap());
    }

    #[test]
    fn q35_domains_get_spare_root_ports() {
        let mut d = def();
        assert!(!d.to_xml().contains("pcie-root-port"));
        d.machine = "pc-q35-8.2".into();
        let xml = d.to_xml();
        assert_eq!(
            xml.matches("model=\"pcie-root-port\"").count(),
            SPARE_ROOT_PORTS
        );
        assert!(is_q35("q35") && !is_q35("pc-i440fx-8.2") && !is_q35("pc"));
    }

    #[test]
    fn disk_sources_are_read_from_live_xml() {
        let xml = r#"<domain><devices>
          <disk type='file' device='disk'>
            <source file='/i/top-2.qcow2' index='3'/>
            <backingStore type='file' index='2'>
              <source file='/i/root.qcow2'/>
              <backingStore/>
            </backingStore>
            <target dev='vda' bus='virtio'/>
          </disk>
          <disk type='file' device='disk'><source file='/v/vol.qcow2'/><target dev='vdb'/></disk>
        </devices></domain>"#;
        assert_eq!(disk_source(xml, "vda"), Some("/i/top-2.qcow2".into()));
        assert_eq!(disk_source(xml, "vdb"), Some("/v/vol.qcow2".into()));
        assert_eq!(disk_source(xml, "vdc"), None);
        assert_eq!(
            disk_source(&def().to_xml(), "vda"),
            Some(def().disks[0].path.clone())
        );
    }

    #[test]
    fn hostile_values_are_escaped() {
        let mut d = def();
        d.boot = Boot::Kernel {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "a</cmdline><devices><hostdev x='1'/>&amp;\"'".into(),
        };
        d.console_log = "/x'/><evil a='".into();
        d.metrics_socket = "/m'/><evil4 a='".into();
        d.group_interface = Some(InterfaceDef {
            tap: "gg-x'/><evil2 b='".into(),
            ..group_nic(Some("gn-'/><evil3/>"))
        });
        let xml = d.to_xml();
        assert!(!xml.contains("<hostdev"), "{xml}");
        assert!(!xml.contains("<evil"), "{xml}");
        assert!(xml.contains("gg-x&apos;/&gt;&lt;evil2"), "{xml}");
        assert!(xml.contains("a&lt;/cmdline&gt;&lt;devices&gt;"), "{xml}");
        assert!(xml.contains("&apos;/&gt;&lt;evil"), "{xml}");
        // The whole document still parses, with one <cmdline> holding the text.
        let mut r = quick_xml::Reader::from_str(&xml);
        let mut cmdlines = 0;
        loop {
            match r.read_event().unwrap() {
                Event::Start(e) if e.name().as_ref() == b"cmdline" => cmdlines += 1,
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(cmdlines, 1);
    }
}
