//! Fault injection seen through the real nvml-wrapper 0.13: field values,
//! events, a lost GPU and the simulated GPU reset.

mod common;

use common::{nvml_for_dir, serial};
use gantry_nvml_sim::control;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::FieldValueSample;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::*;
use nvml_wrapper::{Device, Nvml};
use std::path::Path;
use std::time::{Duration, Instant};

fn u32_value(s: &FieldValueSample) -> u32 {
    match s.value {
        Ok(SampleValue::U32(v)) => v,
        ref other => panic!("field {:?}: {other:?}", s.field),
    }
}

fn remap_fields(d: &Device) -> Vec<u32> {
    d.field_values_for(&[
        FieldId(NVML_FI_DEV_REMAPPED_COR),
        FieldId(NVML_FI_DEV_REMAPPED_UNC),
        FieldId(NVML_FI_DEV_REMAPPED_PENDING),
        FieldId(NVML_FI_DEV_REMAPPED_FAILURE),
        FieldId(NVML_FI_DEV_GET_GPU_RECOVERY_ACTION),
    ])
    .unwrap()
    .iter()
    .map(|r| u32_value(r.as_ref().unwrap()))
    .collect()
}

/// Writes the sysfs `reset` file, as the agent does to reset a GPU. The
/// pause first puts the reset on a later tick of the kernel's coarse file
/// clock than the fault it should clear.
fn reset_gpu(dir: &Path, bdf: &str) {
    std::thread::sleep(Duration::from_millis(30));
    std::fs::write(dir.join("sys/bus/pci/devices").join(bdf).join("reset"), "1").unwrap();
}

#[test]
fn remap_and_recovery_action_fields_follow_the_control_api() {
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    control::init(t.path(), "h100x8").unwrap();
    let nvml = nvml_for_dir(t.path());
    let d2 = nvml.device_by_index(2).unwrap();
    assert_eq!(remap_fields(&d2), vec![0, 0, 0, 0, 0]);

    control::set_remap(t.path(), 2, 3, 0, false, true).unwrap();
    control::set_recovery_action(t.path(), "0000:53:00.0", 2).unwrap();
    assert_eq!(
        remap_fields(&d2),
        vec![3, 0, 0, 1, 2],
        "cor, unc, pending, failure, recovery"
    );

    // Unknown ids fail in their own entry, not the call.
    let mixed = d2
        .field_values_for(&[
            FieldId(NVML_FI_DEV_REMAPPED_COR),
            FieldId(NVML_FI_DEV_NVLINK_BANDWIDTH_C0_L0),
        ])
        .unwrap();
    assert_eq!(u32_value(mixed[0].as_ref().unwrap()), 3);
    assert!(matches!(
        mixed[1].as_ref().unwrap().value,
        Err(NvmlError::NotSupported)
    ));

    // The raw symbol agrees, and GPU 3 is untouched.
    let (mut c, mut u, mut p, mut f) = (0u32, 0u32, 0u32, 0u32);
    // SAFETY: a handle from nvml-wrapper and four valid out-pointers.
    let rc = unsafe {
        nvml.lib()
            .nvmlDeviceGetRemappedRows(d2.handle(), &mut c, &mut u, &mut p, &mut f)
    };
    assert_eq!((rc, c, u, p, f), (0, 3, 0, 0, 1));
    assert_eq!(
        remap_fields(&nvml.device_by_index(3).unwrap()),
        vec![0, 0, 0, 0, 0]
    );
}

#[test]
fn a_gpu_reset_applies_pending_remaps_and_clears_volatile_faults() {
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    control::init(dir, "h100x8").unwrap();
    // GPU 4 is reset *before* its fault: that reset must not clear it.
    reset_gpu(dir, "0000:9c:00.0");
    std::thread::sleep(Duration::from_millis(30));
    for gpu in [1, 4] {
        control::set_remap(dir, gpu, 0, 1, true, false).unwrap();
        control::set_pages_pending(dir, gpu, true).unwrap();
        control::set_ecc(dir, gpu, 2, 1).unwrap();
    }
    let nvml = nvml_for_dir(dir);
    let (d1, d4) = (
        nvml.device_by_index(1).unwrap(),
        nvml.device_by_index(4).unwrap(),
    );
    for d in [&d1, &d4] {
        assert_eq!(
            remap_fields(d),
            vec![0, 0, 1, 0, 0],
            "one row waits for a reset"
        );
        assert!(d.are_pages_pending_retired().unwrap());
        assert_eq!(
            d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                .unwrap(),
            1
        );
    }

    reset_gpu(dir, "0000:40:00.0");
    assert_eq!(
        remap_fields(&d1),
        vec![0, 1, 0, 0, 0],
        "the pending row is now remapped"
    );
    assert!(!d1.are_pages_pending_retired().unwrap());
    assert_eq!(
        d1.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            .unwrap(),
        0
    );
    assert_eq!(
        d1.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
            .unwrap(),
        0
    );
    assert_eq!(
        d1.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate)
            .unwrap(),
        1
    );
    assert_eq!(
        d1.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate)
            .unwrap(),
        2
    );

    assert_eq!(
        remap_fields(&d4),
        vec![0, 0, 1, 0, 0],
        "an earlier reset does not count"
    );
    assert!(d4.are_pages_pending_retired().unwrap());

    // The library never writes state.json; the control API sees the reset.
    let stored = gantry_nvml_sim::State::read(dir).unwrap();
    assert!(stored.gpus[1].remap.pending);
    assert!(!control::load(dir).unwrap().gpus[1].remap.pending);
}

fn xid_set<'n>(nvml: &'n Nvml, d: &Device<'n>) -> nvml_wrapper::EventSet<'n> {
    let types = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
    assert!(d.supported_event_types().unwrap().contains(types));
    d.register_events(types, nvml.create_event_set().unwrap())
        .unwrap()
}

#[test]
fn an_injected_xid_reaches_a_waiting_event_set() {
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    control::init(&dir, "h100x8").unwrap();
    control::inject_xid(&dir, 1, 48).unwrap(); // before registration: never delivered
    let nvml = nvml_for_dir(&dir);
    let set = xid_set(&nvml, &nvml.device_by_index(1).unwrap());

    let start = Instant::now();
    assert!(matches!(set.wait(100), Err(NvmlError::Timeout)));
    assert!(start.elapsed() >= Duration::from_millis(100));

    control::inject_xid(&dir, 2, 13).unwrap(); // unregistered GPU
    let injector = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        control::inject_xid(&dir, "0000:40:00.0", 79).unwrap();
        control::set_ecc(&dir, 1, 0, 2).unwrap();
    });
    let ev = set.wait(5000).unwrap();
    assert!(ev.event_type.contains(EventTypes::CRITICAL_XID_ERROR));
    assert_eq!(ev.event_data, Some(XidError::Value(79)));
    assert_eq!(ev.device.index().unwrap(), 1);
    injector.join().unwrap();

    let ecc = set.wait(1000).unwrap();
    assert_eq!(ecc.event_type, EventTypes::DOUBLE_BIT_ECC_ERROR);
    assert_eq!(ecc.event_data, None);
    assert!(
        matches!(set.wait(50), Err(NvmlError::Timeout)),
        "each event is delivered once"
    );
}

#[test]
fn a_lost_gpu_answers_gpu_lost_except_for_identity() {
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    control::init(dir, "h100x8").unwrap();
    let nvml = nvml_for_dir(dir);
    let set = xid_set(&nvml, &nvml.device_by_index(5).unwrap());
    control::lose(dir, 5).unwrap();

    let d = nvml.device_by_index(5).unwrap();
    assert!(matches!(d.name(), Err(NvmlError::GpuLost)));
    assert!(matches!(d.memory_info(), Err(NvmlError::GpuLost)));
    assert!(matches!(d.uuid(), Err(NvmlError::GpuLost)));
    assert!(matches!(
        d.field_values_for(&[FieldId(NVML_FI_DEV_REMAPPED_PENDING)]),
        Err(NvmlError::GpuLost)
    ));
    assert_eq!(d.index().unwrap(), 5);
    assert_eq!(d.pci_info().unwrap().bus_id, "00000000:C0:00.0");
    assert_eq!(nvml.device_count().unwrap(), 8);
    assert_eq!(
        nvml.device_by_index(6).unwrap().name().unwrap(),
        "NVIDIA H100 80GB HBM3"
    );

    let ev = set.wait(1000).unwrap();
    assert_eq!(ev.event_data, Some(XidError::Value(79)));
    let vendor = dir.join("sys/bus/pci/devices/0000:c0:00.0/vendor");
    assert_eq!(std::fs::read_to_string(&vendor).unwrap().trim(), "0xffff");

    control::restore(dir, 5).unwrap();
    assert_eq!(d.name().unwrap(), "NVIDIA H100 80GB HBM3");
    assert_eq!(std::fs::read_to_string(&vendor).unwrap().trim(), "0x10de");
}

#[test]
fn a_degraded_link_shows_in_nvml_and_sysfs() {
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    control::init(dir, "h100x8").unwrap();
    control::set_link(dir, 0, "16.0 GT/s PCIe", 8).unwrap();
    control::add_aer(dir, 0, 0, 1, 4).unwrap();
    let nvml = nvml_for_dir(dir);
    let d = nvml.device_by_index(0).unwrap();
    assert_eq!(
        (
            d.current_pcie_link_gen().unwrap(),
            d.current_pcie_link_width().unwrap()
        ),
        (4, 8)
    );
    assert_eq!(
        (
            d.max_pcie_link_gen().unwrap(),
            d.max_pcie_link_width().unwrap()
        ),
        (5, 16)
    );
    let dev = dir.join("sys/bus/pci/devices/0000:1a:00.0");
    let read = |f: &str| std::fs::read_to_string(dev.join(f)).unwrap();
    assert_eq!(read("current_link_speed").trim(), "16.0 GT/s PCIe");
    assert_eq!(read("max_link_speed").trim(), "32.0 GT/s PCIe");
    assert!(read("aer_dev_correctable").contains("\nTOTAL_ERR_COR 4\n"));
    assert!(read("aer_dev_nonfatal").ends_with("TOTAL_ERR_NONFATAL 1\n"));
}
