//! Built-in host profiles: `h100x8`, `h200x8` and `a6000x2`.
//!
//! Values come from public nvidia-smi/lspci output and NVIDIA's own mocks
//! (see `shared/research/gpu.md`); the ones marked "unverified" must be
//! captured on real hardware before anyone relies on them.

use crate::state::{
    Aer, Clocks, Companion, Ecc, Gpu, Link, MigMode, NumaNode, Remap, State, FORMAT, VERSION,
};

/// The profile served when none is named.
pub const DEFAULT_PROFILE: &str = "h100x8";

/// Every built-in profile, with a one-line description.
pub const PROFILES: &[(&str, &str)] = &[
    (
        "h100x8",
        "8x NVIDIA H100 80GB HBM3 (SXM), 2 NUMA nodes, one IOMMU group per GPU",
    ),
    (
        "h200x8",
        "8x NVIDIA H200 (SXM, 141 GB), 2 NUMA nodes, one IOMMU group per GPU",
    ),
    (
        "a6000x2",
        "2x NVIDIA RTX A6000, each with an HDMI audio function in its IOMMU group",
    ),
];

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const NVIDIA: u32 = 0x10de;

/// What differs between models.
struct Model {
    name: &'static str,
    device: u32,
    subsystem_device: u32,
    memory_mib: u64,
    reserved_mib: u64,
    bar1_bytes: u64,
    vbios: &'static str,
    mig: bool,
    ecc: bool,
    link_speed: &'static str,
    power_mw: u32,
    power_limit_mw: u32,
    temperature_c: u32,
    clocks: Clocks,
}

const H100: Model = Model {
    name: "NVIDIA H100 80GB HBM3",
    device: 0x2330,
    subsystem_device: 0x16c1,
    memory_mib: 81559,
    reserved_mib: 527,
    // nvidia-smi on H100 SXM reports a 131072 MiB BAR1 (unverified here;
    // k8s-test-infra's H100 profile says 256 GiB).
    bar1_bytes: 128 * GIB,
    vbios: "96.00.99.00.01",
    mig: true,
    ecc: true,
    link_speed: "32.0 GT/s PCIe",
    power_mw: 71_000,
    power_limit_mw: 700_000,
    temperature_c: 33,
    clocks: Clocks {
        graphics: 345,
        sm: 345,
        mem: 2619,
        video: 765,
    },
};

const H200: Model = Model {
    name: "NVIDIA H200",
    // Unverified: 0x2335 follows the brief; NVIDIA's VM guide lists 10de:2336
    // and go-nvml's mock 0x2333. Capture the real id on an H200 host.
    device: 0x2335,
    subsystem_device: 0x18be,
    memory_mib: 143771,
    reserved_mib: 551,
    bar1_bytes: 256 * GIB,
    vbios: "96.00.A5.00.01",
    mig: true,
    ecc: true,
    link_speed: "32.0 GT/s PCIe",
    power_mw: 76_000,
    power_limit_mw: 700_000,
    temperature_c: 31,
    clocks: Clocks {
        graphics: 345,
        sm: 345,
        mem: 3201,
        video: 765,
    },
};

const A6000: Model = Model {
    name: "NVIDIA RTX A6000",
    device: 0x2230,
    subsystem_device: 0x1459,
    memory_mib: 49140,
    reserved_mib: 0,
    // No resizable BAR by default: 256 MiB.
    bar1_bytes: 256 * MIB,
    vbios: "94.02.5C.00.01",
    mig: false,
    ecc: false,
    link_speed: "16.0 GT/s PCIe",
    power_mw: 22_000,
    power_limit_mw: 300_000,
    temperature_c: 30,
    clocks: Clocks {
        graphics: 210,
        sm: 210,
        mem: 405,
        video: 555,
    },
};

/// The HDMI audio function of a GA102 board.
const GA102_AUDIO: u32 = 0x1aef;

/// The names of the built-in profiles.
pub fn names() -> Vec<&'static str> {
    PROFILES.iter().map(|(n, _)| *n).collect()
}

/// A fresh state for profile `name`, or `None` if there is no such profile.
pub fn build(name: &str) -> Option<State> {
    let hgx_buses = [0x1a, 0x40, 0x53, 0x66, 0x9c, 0xc0, 0xd2, 0xe4];
    let hgx_nodes = vec![
        NumaNode {
            id: 0,
            cpulist: "0-55,112-167".into(),
        },
        NumaNode {
            id: 1,
            cpulist: "56-111,168-223".into(),
        },
    ];
    let (model, buses, nodes): (&Model, &[u32], Vec<NumaNode>) = match name {
        "h100x8" => (&H100, &hgx_buses, hgx_nodes),
        "h200x8" => (&H200, &hgx_buses, hgx_nodes),
        "a6000x2" => (
            &A6000,
            &[0x17, 0x65],
            vec![NumaNode {
                id: 0,
                cpulist: "0-31".into(),
            }],
        ),
        _ => return None,
    };
    let per_node = buses.len().div_ceil(nodes.len());
    let mut gpus = Vec::new();
    let mut companions = Vec::new();
    for (i, &bus) in buses.iter().enumerate() {
        let node = &nodes[i / per_node];
        let bdf = format!("0000:{bus:02x}:00.0");
        // Distinct, non-contiguous group numbers, as on real hosts.
        let group = 20 + 7 * i as u32;
        gpus.push(gpu(name, model, i as u32, bus, &bdf, group, node));
        if model.device == A6000.device {
            companions.push(Companion {
                sysfs_bdf: format!("0000:{bus:02x}:00.1"),
                vendor: NVIDIA,
                device: GA102_AUDIO,
                class: 0x040300,
                iommu_group: group,
                numa_node: node.id,
                driver: "snd_hda_intel".into(),
            });
        }
    }
    Some(State {
        format: FORMAT.into(),
        version: VERSION,
        profile: name.into(),
        driver_version: "550.127.05".into(),
        nvml_version: "12.550.127.05".into(),
        cuda_driver_version: 12040,
        numa_nodes: nodes,
        gpus,
        companions,
        events: Vec::new(),
    })
}

fn gpu(
    profile: &str,
    m: &Model,
    index: u32,
    bus: u32,
    bdf: &str,
    group: u32,
    node: &NumaNode,
) -> Gpu {
    let total = m.memory_mib * MIB;
    let reserved = m.reserved_mib * MIB;
    let gen = crate::state::link_gen(m.link_speed).unwrap_or(0);
    Gpu {
        index,
        name: m.name.into(),
        uuid: uuid(profile, index),
        serial: format!(
            "165{:010}",
            2_300_000_000u64 + u64::from(index) * 7919 + profile.len() as u64
        ),
        minor_number: index,
        pci_bus_id: format!("00000000:{bus:02X}:00.0"),
        sysfs_bdf: bdf.into(),
        pci_device_id: (m.device << 16) | NVIDIA,
        pci_subsystem_id: (m.subsystem_device << 16) | NVIDIA,
        pci_class: 0x030200,
        iommu_group: group,
        memory_total_bytes: total,
        memory_reserved_bytes: reserved,
        memory_used_bytes: MIB,
        bar0_bytes: 16 * MIB,
        bar1_bytes: m.bar1_bytes,
        bar3_bytes: 32 * MIB,
        vbios_version: m.vbios.into(),
        numa_node: node.id,
        cpu_affinity: node.cpulist.clone(),
        mig: m.mig.then_some(MigMode {
            current: 0,
            pending: 0,
        }),
        link: Link {
            current_gen: gen,
            current_width: 16,
            max_gen: gen,
            max_width: 16,
            current_speed: m.link_speed.into(),
            max_speed: m.link_speed.into(),
        },
        temperature_c: m.temperature_c,
        power_mw: m.power_mw,
        power_limit_mw: m.power_limit_mw,
        energy_mj: 1_000_000_000 + u64::from(index) * 12_345_678,
        utilization_gpu: 0,
        utilization_memory: 0,
        clocks: m.clocks,
        ecc: Ecc {
            enabled: m.ecc,
            corrected_volatile: 0,
            uncorrected_volatile: 0,
            corrected_aggregate: 0,
            uncorrected_aggregate: 0,
            volatile_since_ms: None,
        },
        remap: Remap {
            corr: 0,
            unc: 0,
            pending_corr: 0,
            pending_unc: 0,
            pending: false,
            failure: false,
            pending_since_ms: None,
        },
        pages_pending: false,
        pages_pending_since_ms: None,
        recovery_action: 0,
        pcie_replay_count: 0,
        aer: Aer::default(),
        lost: false,
    }
}

/// splitmix64: a fixed, well-mixed sequence from a seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` per profile
/// and index (version-4 layout, so it parses as a UUID anywhere).
pub fn uuid(profile: &str, index: u32) -> String {
    let seed = profile.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let a = mix(seed ^ u64::from(index));
    let b = mix(a);
    let hi = (a & 0xffff_ffff_ffff_0fff) | 0x4000;
    let lo = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_profile_builds_and_unknown_ones_do_not() {
        for n in names() {
            let s = build(n).unwrap();
            assert!(!s.gpus.is_empty(), "{n}");
        }
        assert!(build("v100x1").is_none());
    }

    #[test]
    fn uuids_are_stable_well_formed_and_distinct() {
        let u = uuid("h100x8", 3);
        assert_eq!(u, uuid("h100x8", 3));
        assert_ne!(u, uuid("h200x8", 3));
        assert_ne!(u, uuid("h100x8", 4));
        let parts: Vec<&str> = u.strip_prefix("GPU-").unwrap().split('-').collect();
        let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        assert_eq!(lens, vec![8, 4, 4, 4, 12]);
        assert!(parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit())));
        assert!(parts[2].starts_with('4'), "version nibble");
    }

    #[test]
    fn hgx_profiles_split_gpus_over_two_numa_nodes() {
        let s = build("h100x8").unwrap();
        let nodes: Vec<u32> = s.gpus.iter().map(|g| g.numa_node).collect();
        assert_eq!(nodes, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        let a6000 = build("a6000x2").unwrap();
        assert_eq!(a6000.companions.len(), 2);
        assert_eq!(a6000.companions[0].iommu_group, a6000.gpus[0].iommu_group);
    }
}
