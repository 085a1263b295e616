//! Inventory through the real nvml-wrapper 0.13 loading the simulated
//! library: h100x8 and h200x8 from state directories, a built-in profile
//! from memory, shutdown/re-init, and the raw ABI conventions.

mod common;

use common::{library, nvml_for_dir, nvml_for_profile, serial};
use gantry_nvml_sim::control;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper_sys::bindings::*;

const MIB: u64 = 1 << 20;

#[test]
fn h100x8_inventory_matches_the_profile() {
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let state = control::init(t.path(), "h100x8").unwrap();
    let nvml = nvml_for_dir(t.path());

    assert_eq!(nvml.sys_driver_version().unwrap(), "550.127.05");
    assert_eq!(nvml.sys_nvml_version().unwrap(), "12.550.127.05");
    assert_eq!(nvml.sys_cuda_driver_version().unwrap(), 12040);
    assert_eq!(nvml.device_count().unwrap(), 8);

    let mut bus_ids = Vec::new();
    let mut uuids = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..8 {
        let d = nvml.device_by_index(i).unwrap();
        assert_eq!(d.index().unwrap(), i);
        assert_eq!(d.name().unwrap(), "NVIDIA H100 80GB HBM3");
        let mem = d.memory_info().unwrap();
        assert_eq!(mem.total, 81559 * MIB);
        assert_eq!(mem.free + mem.used + mem.reserved, mem.total);
        let pci = d.pci_info().unwrap();
        assert_eq!(pci.pci_device_id, 0x2330_10DE);
        assert_eq!(pci.domain, 0);
        bus_ids.push(pci.bus_id);
        uuids.push(d.uuid().unwrap());
        nodes.push(d.numa_node_id().unwrap());
        let mig = d.mig_mode().unwrap();
        assert_eq!((mig.current, mig.pending), (0, 0));
        assert_eq!(d.vbios_version().unwrap(), "96.00.99.00.01");
        assert_eq!(d.bar1_memory_info().unwrap().total, 128 << 30);
        assert!(d.is_ecc_enabled().unwrap().currently_enabled);
        assert_eq!(
            d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                .unwrap(),
            0
        );
        assert_eq!(d.current_pcie_link_gen().unwrap(), 5);
        assert_eq!(d.max_pcie_link_width().unwrap(), 16);
        assert!(d.temperature(TemperatureSensor::Gpu).unwrap() > 0);
        assert_eq!(d.enforced_power_limit().unwrap(), 700_000);
        assert!(d.clock_info(Clock::Memory).unwrap() > 0);
        assert!(!d.are_pages_pending_retired().unwrap());
        assert!(d
            .retired_pages(nvml_wrapper::enum_wrappers::device::RetirementCause::DoubleBitEccError)
            .unwrap()
            .is_empty());
    }
    assert_eq!(
        bus_ids,
        ["1A", "40", "53", "66", "9C", "C0", "D2", "E4"]
            .iter()
            .map(|b| format!("00000000:{b}:00.0"))
            .collect::<Vec<_>>()
    );
    assert_eq!(nodes, vec![0, 0, 0, 0, 1, 1, 1, 1]);
    let want: Vec<String> = state.gpus.iter().map(|g| g.uuid.clone()).collect();
    assert_eq!(uuids, want);
    let mut distinct = uuids.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 8);

    // Lookups by UUID and by either PCI address form land on the same GPU.
    assert_eq!(
        nvml.device_by_uuid(uuids[5].as_str())
            .unwrap()
            .index()
            .unwrap(),
        5
    );
    assert_eq!(
        nvml.device_by_pci_bus_id("0000:9c:00.0")
            .unwrap()
            .index()
            .unwrap(),
        4
    );
    assert_eq!(
        nvml.device_by_pci_bus_id("00000000:E4:00.0")
            .unwrap()
            .index()
            .unwrap(),
        7
    );
    assert!(matches!(
        nvml.device_by_uuid("GPU-00000000-0000-4000-8000-000000000000"),
        Err(NvmlError::NotFound)
    ));
    assert!(matches!(
        nvml.device_by_index(8),
        Err(NvmlError::InvalidArg)
    ));

    // GPU 0 is near node 0's CPUs (0-55, 112-167), GPU 4 near node 1's.
    let aff = nvml.device_by_index(0).unwrap().cpu_affinity(4).unwrap();
    assert_eq!(aff[0], (1u64 << 56) - 1);
    assert_eq!(aff[1] & 0xffff_ffff_ffff, 0);
    assert_ne!(aff[1] >> 48, 0, "CPUs 112.. are in word 1");
    let aff4 = nvml.device_by_index(4).unwrap().cpu_affinity(4).unwrap();
    assert_eq!(aff4[0], !((1u64 << 56) - 1));
}

#[test]
fn h200x8_inventory_matches_the_profile() {
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    control::init(t.path(), "h200x8").unwrap();
    let nvml = nvml_for_dir(t.path());
    assert_eq!(nvml.device_count().unwrap(), 8);
    for i in 0..8 {
        let d = nvml.device_by_index(i).unwrap();
        assert_eq!(d.name().unwrap(), "NVIDIA H200");
        assert_eq!(d.memory_info().unwrap().total, 143771 * MIB);
        assert_eq!(d.pci_info().unwrap().pci_device_id, 0x2335_10DE);
        assert_eq!(d.bar1_memory_info().unwrap().total, 256 << 30);
        assert_eq!(d.vbios_version().unwrap(), "96.00.A5.00.01");
        assert_eq!(d.numa_node_id().unwrap(), i / 4);
    }
    let h100 = gantry_nvml_sim::profiles::uuid("h100x8", 0);
    assert_ne!(nvml.device_by_index(0).unwrap().uuid().unwrap(), h100);
}

#[test]
fn a_built_in_profile_is_served_without_a_state_directory() {
    let _g = serial();
    let nvml = nvml_for_profile("a6000x2").unwrap();
    assert_eq!(
        nvml.device_count().unwrap(),
        2,
        "the audio functions are not GPUs"
    );
    let d = nvml.device_by_index(1).unwrap();
    assert_eq!(d.name().unwrap(), "NVIDIA RTX A6000");
    assert!(matches!(d.mig_mode(), Err(NvmlError::NotSupported)));
    assert!(!d.is_ecc_enabled().unwrap().currently_enabled);
    assert!(matches!(
        d.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate),
        Err(NvmlError::NotSupported)
    ));
    drop(nvml);

    assert!(matches!(
        nvml_for_profile("v100x1"),
        Err(NvmlError::DriverNotLoaded)
    ));
    // After a failed init and a shutdown, a fresh init works again.
    let again = nvml_for_profile("h100x8").unwrap();
    assert_eq!(again.device_count().unwrap(), 8);
}

#[test]
fn raw_abi_conventions_hold() {
    let _g = serial();
    std::env::remove_var(gantry_nvml_sim::ENV_DIR);
    std::env::remove_var(gantry_nvml_sim::ENV_PROFILE);
    // SAFETY: the simulated library exports every symbol called below with
    // NVML's signatures; all pointers passed are valid locals.
    unsafe {
        let lib = NvmlLib::new(library()).unwrap();
        let mut count = 0u32;
        assert_eq!(
            lib.nvmlDeviceGetCount_v2(&mut count),
            nvmlReturn_enum_NVML_ERROR_UNINITIALIZED
        );
        assert_eq!(lib.nvmlShutdown(), nvmlReturn_enum_NVML_ERROR_UNINITIALIZED);
        assert_eq!(lib.nvmlInit_v2(), nvmlReturn_enum_NVML_SUCCESS);
        assert_eq!(lib.nvmlInitWithFlags(0), nvmlReturn_enum_NVML_SUCCESS);
        assert_eq!(
            lib.nvmlDeviceGetCount_v2(std::ptr::null_mut()),
            nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT
        );

        let mut dev: nvmlDevice_t = std::ptr::null_mut();
        assert_eq!(
            lib.nvmlDeviceGetHandleByIndex_v2(2, &mut dev),
            nvmlReturn_enum_NVML_SUCCESS
        );
        assert_eq!(dev as usize, 3, "handles are index + 1");
        let mut small = [0 as std::ffi::c_char; 5];
        assert_eq!(
            lib.nvmlDeviceGetName(dev, small.as_mut_ptr(), 5),
            nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE
        );
        let mut buf = [1 as std::ffi::c_char; 96];
        assert_eq!(
            lib.nvmlDeviceGetName(dev, buf.as_mut_ptr(), 96),
            nvmlReturn_enum_NVML_SUCCESS
        );
        let name = std::ffi::CStr::from_ptr(buf.as_ptr()).to_str().unwrap();
        assert_eq!(name, "NVIDIA H100 80GB HBM3");
        let bogus = 99 as nvmlDevice_t;
        assert_eq!(
            lib.nvmlDeviceGetName(bogus, buf.as_mut_ptr(), 96),
            nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT
        );
        let msg =
            std::ffi::CStr::from_ptr(lib.nvmlErrorString(nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST));
        assert_eq!(msg.to_str().unwrap(), "GPU is lost");

        // Two inits need two shutdowns.
        assert_eq!(lib.nvmlShutdown(), nvmlReturn_enum_NVML_SUCCESS);
        assert_eq!(
            lib.nvmlDeviceGetCount_v2(&mut count),
            nvmlReturn_enum_NVML_SUCCESS
        );
        assert_eq!(lib.nvmlShutdown(), nvmlReturn_enum_NVML_SUCCESS);
        assert_eq!(
            lib.nvmlDeviceGetCount_v2(&mut count),
            nvmlReturn_enum_NVML_ERROR_UNINITIALIZED
        );
    }
}
