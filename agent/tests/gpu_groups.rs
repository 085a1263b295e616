//! A GPU's whole IOMMU group goes to the VM: on the simulated 2× RTX A6000
//! host each GPU shares its group with its HDMI audio function, and both
//! become hostdevs. (Its own test binary: NVML is loaded once per process.)

use gantry_agent::gpu::{self, GpuConfig, GpuSource};
use gantry_nvml_sim::control;

#[test]
fn a_gpus_whole_iommu_group_is_passed_through() {
    let sim = tempfile::tempdir().unwrap();
    control::init(sim.path(), "a6000x2").unwrap();
    std::env::set_var(gantry_nvml_sim::ENV_DIR, sim.path());
    let lib = gantry_nvml_sim::built_library().expect("the simulated NVML library builds");
    let cfg = GpuConfig {
        source: GpuSource::Nvml,
        nvml_library: lib.to_string_lossy().into_owned(),
        sysfs_root: sim.path().join("sys"),
        ..GpuConfig::default()
    };
    let state = tempfile::tempdir().unwrap();
    let pool = gpu::open(&cfg, state.path()).unwrap();
    let list = pool.list();
    assert_eq!(list.len(), 2, "audio functions are not GPUs: {list:?}");
    assert_eq!(list[0].model, "NVIDIA RTX A6000");
    let fns: Vec<String> = list[0].functions.iter().map(|f| f.to_string()).collect();
    assert_eq!(fns.len(), 2, "{fns:?}");
    assert!(fns[1].ends_with(".1"), "{fns:?}");
    let plan = pool.passthrough(&[list[0].pci]).unwrap().unwrap();
    assert_eq!(plan.functions, list[0].functions);
    assert_eq!(plan.numa, None, "a single-node host is not pinned");
    // Unknown GPUs are refused, never passed through.
    let other = gantry_proto::validate::PciAddress::parse("0000:ff:00.0").unwrap();
    assert!(pool.passthrough(&[other]).is_err());
    assert!(pool
        .lease(gantry_proto::InstanceId::new(), &[other])
        .is_err());
}
