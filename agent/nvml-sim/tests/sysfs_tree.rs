//! The fake sysfs tree that `control::init` writes, read the way the agent
//! reads `/sys`: a6000x2 with its audio functions, and h100x8's NUMA nodes.

use gantry_nvml_sim::control;
use std::fs;
use std::path::Path;

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// (start, end, flags) per line of a `resource` file.
fn resource(dev: &Path) -> Vec<(u64, u64, u64)> {
    read(&dev.join("resource"))
        .lines()
        .map(|l| {
            let v: Vec<u64> = l
                .split(' ')
                .map(|x| u64::from_str_radix(x.strip_prefix("0x").expect("0x prefix"), 16).unwrap())
                .collect();
            assert_eq!(v.len(), 3, "{l}");
            (v[0], v[1], v[2])
        })
        .collect()
}

#[test]
fn a6000_gpus_share_their_iommu_group_with_an_audio_function() {
    let t = tempfile::tempdir().unwrap();
    control::init(t.path(), "a6000x2").unwrap();
    let sys = t.path().join("sys");
    let devices = sys.join("bus/pci/devices");
    let mut names: Vec<String> = fs::read_dir(&devices)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "0000:17:00.0",
            "0000:17:00.1",
            "0000:65:00.0",
            "0000:65:00.1"
        ]
    );

    let mut groups = Vec::new();
    for bus in ["17", "65"] {
        let gpu = devices.join(format!("0000:{bus}:00.0"));
        let audio = devices.join(format!("0000:{bus}:00.1"));
        assert!(
            fs::symlink_metadata(&gpu).unwrap().is_dir(),
            "a real directory"
        );
        assert_eq!(read(&gpu.join("vendor")).trim(), "0x10de");
        assert_eq!(read(&gpu.join("device")).trim(), "0x2230");
        assert_eq!(read(&gpu.join("class")).trim(), "0x030200");
        assert_eq!(read(&audio.join("vendor")).trim(), "0x10de");
        assert_eq!(read(&audio.join("class")).trim(), "0x040300");

        let driver = fs::read_link(gpu.join("driver")).unwrap();
        assert_eq!(driver.file_name().unwrap(), "nvidia");
        assert_eq!(
            fs::canonicalize(gpu.join("driver")).unwrap(),
            fs::canonicalize(sys.join("bus/pci/drivers/nvidia")).unwrap()
        );
        assert!(gpu.join("driver/unbind").is_file());
        assert_eq!(
            fs::read_link(audio.join("driver"))
                .unwrap()
                .file_name()
                .unwrap(),
            "snd_hda_intel"
        );

        let group = fs::canonicalize(gpu.join("iommu_group")).unwrap();
        assert_eq!(group, fs::canonicalize(audio.join("iommu_group")).unwrap());
        assert_eq!(
            group.parent().unwrap(),
            fs::canonicalize(sys.join("kernel/iommu_groups")).unwrap()
        );
        let mut members: Vec<_> = fs::read_dir(group.join("devices"))
            .unwrap()
            .map(|e| fs::canonicalize(e.unwrap().path()).unwrap())
            .collect();
        members.sort();
        assert_eq!(
            members,
            vec![
                fs::canonicalize(&gpu).unwrap(),
                fs::canonicalize(&audio).unwrap()
            ]
        );
        groups.push(group);

        let bars = resource(&gpu);
        assert!(bars.len() >= 7);
        let sizes: Vec<u64> = bars
            .iter()
            .take(6)
            .filter(|(s, e, f)| e > s && f & 0x200 != 0)
            .map(|(s, e, _)| e - s + 1)
            .collect();
        assert_eq!(sizes, vec![16 << 20, 256 << 20, 32 << 20]);
        assert!(bars[1].0 % (256 << 20) == 0, "BARs are size-aligned");
        assert_eq!(read(&gpu.join("numa_node")).trim(), "0");
        assert_eq!(
            read(&gpu.join("current_link_speed")).trim(),
            "16.0 GT/s PCIe"
        );
        assert_eq!(read(&gpu.join("max_link_width")).trim(), "16");
        assert_eq!(read(&gpu.join("reset_method")).trim(), "flr bus");
        assert_eq!(read(&gpu.join("driver_override")).trim(), "(null)");
        assert_eq!(read(&gpu.join("reset")), "");
        for (file, total) in [
            ("aer_dev_correctable", "TOTAL_ERR_COR 0"),
            ("aer_dev_nonfatal", "TOTAL_ERR_NONFATAL 0"),
            ("aer_dev_fatal", "TOTAL_ERR_FATAL 0"),
        ] {
            let text = read(&gpu.join(file));
            assert_eq!(text.lines().last(), Some(total), "{file}");
            assert!(text.lines().count() > 5, "{file} lists each cause");
        }
    }
    assert_ne!(groups[0], groups[1], "one group per board");
    for d in ["nvidia", "vfio-pci"] {
        for f in ["bind", "unbind", "new_id"] {
            assert!(
                sys.join("bus/pci/drivers").join(d).join(f).is_file(),
                "{d}/{f}"
            );
        }
    }
}

#[test]
fn h100x8_has_two_numa_nodes_and_one_group_per_gpu() {
    let t = tempfile::tempdir().unwrap();
    control::init(t.path(), "h100x8").unwrap();
    let sys = t.path().join("sys");
    assert_eq!(
        read(&sys.join("devices/system/node/node0/cpulist")).trim(),
        "0-55,112-167"
    );
    assert_eq!(
        read(&sys.join("devices/system/node/node1/cpulist")).trim(),
        "56-111,168-223"
    );
    let groups = fs::read_dir(sys.join("kernel/iommu_groups"))
        .unwrap()
        .count();
    assert_eq!(groups, 8);
    let gpu = sys.join("bus/pci/devices/0000:e4:00.0");
    assert_eq!(read(&gpu.join("numa_node")).trim(), "1");
    assert_eq!(read(&gpu.join("device")).trim(), "0x2330");
    let bar1 = &resource(&gpu)[1];
    assert_eq!(bar1.1 - bar1.0 + 1, 128 << 30);
    assert_eq!(bar1.2 & 0x0010_0000, 0x0010_0000, "64-bit BAR flag");
}
