//! Golden-file and reader tests of the domain XML.

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
