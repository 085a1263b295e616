//! Passthrough of a whole 8-GPU host (the simulated 8× H200 profile): the
//! pool's plan (every function, an MMIO window that fits the BARs, NUMA
//! pinning across both nodes) and a domain with eight managed VFIO
//! hostdevs that the real libvirtd defines. Starting it needs VFIO, which
//! this kernel lacks; the test says so in its name and does not fake it.

use gantry_agent::domain_xml::{Boot, DiskDef, DomainDef};
use gantry_agent::gpu::{self, GpuConfig, GpuSource};
use gantry_nvml_sim::control;
use std::process::Command;

fn pool(sim: &std::path::Path, state: &std::path::Path) -> std::sync::Arc<gpu::GpuPool> {
    let lib = gantry_nvml_sim::built_library().expect("the simulated NVML library builds");
    let cfg = GpuConfig {
        source: GpuSource::Nvml,
        nvml_library: lib.to_string_lossy().into_owned(),
        sysfs_root: sim.join("sys"),
        ..GpuConfig::default()
    };
    gpu::open(&cfg, state).unwrap()
}

fn virsh(args: &[&str]) -> std::process::Output {
    let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into());
    Command::new("virsh")
        .args(["-c", &uri])
        .args(args)
        .output()
        .expect("virsh runs")
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn eight_h200s_define_in_libvirt_but_starting_needs_vfio_which_this_kernel_lacks() {
    let sim = tempfile::tempdir().unwrap();
    control::init(sim.path(), "h200x8").unwrap();
    std::env::set_var(gantry_nvml_sim::ENV_DIR, sim.path());
    let state = tempfile::tempdir().unwrap();
    let pool = pool(sim.path(), state.path());
    let list = pool.list();
    assert_eq!(list.len(), 8);
    assert!(list.iter().all(|g| g.model == "NVIDIA H200"), "{list:?}");
    assert!(list
        .iter()
        .all(|g| g.memory_bytes.unwrap() > 140_000_000_000));
    let all: Vec<_> = list.iter().map(|g| g.pci).collect();
    let plan = pool.passthrough(&all).unwrap().unwrap();
    assert_eq!(plan.functions, all, "one function per GPU on HGX boards");
    // Eight large BAR1s: far beyond QEMU's default 32 GiB window.
    assert!(plan.mmio_window_mb >= 8 * 128 * 1024, "{plan:?}");
    assert!(plan.mmio_window_mb.is_power_of_two());
    let numa = plan.numa.as_ref().expect("two NUMA nodes: pinned");
    assert_eq!(numa.nodes, vec![0, 1]);

    let id = gantry_proto::InstanceId::new();
    let name = format!("gantry-gputest-{}", &id.to_string()[4..16]);
    let dir = tempfile::tempdir().unwrap();
    let def = DomainDef {
        name: name.clone(),
        uuid: id.uuid(),
        domain_type: "kvm",
        machine: "q35".into(),
        vcpus: 8,
        memory_mib: 4096,
        boot: Boot::Disk,
        disks: vec![DiskDef {
            path: dir.path().join("root.qcow2"),
            target: "vda",
            serial: "root",
        }],
        console_socket: dir.path().join("console.sock"),
        console_log: dir.path().join("console.log"),
        exec_socket: dir.path().join("exec.sock"),
        passthrough: Some(plan),
        instance_id: id.to_string(),
        interface: None,
        group_interface: None,
        seed: None,
        guest_agent_socket: None,
        metrics_socket: dir.path().join("metrics.sock"),
        share: None,
    };
    let xml_path = dir.path().join("domain.xml");
    std::fs::write(&xml_path, def.to_xml()).unwrap();
    let out = virsh(&["define", xml_path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "libvirt refused the 8-GPU domain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dumped = virsh(&["dumpxml", &name]);
    let _ = virsh(&["undefine", &name]);
    let text = String::from_utf8_lossy(&dumped.stdout);
    assert_eq!(
        text.matches("<hostdev mode='subsystem' type='pci' managed='yes'>")
            .count(),
        8
    );
    assert!(text.contains("<maxphysaddr mode='passthrough'/>"), "{text}");
    assert!(text.contains("<locked/>"), "{text}");
    assert!(text.contains("opt/ovmf/X-PciMmio64Mb"), "{text}");
    assert!(
        !std::path::Path::new("/dev/vfio/vfio").exists(),
        "this host has VFIO: start the domain here instead of stopping at define"
    );
}
