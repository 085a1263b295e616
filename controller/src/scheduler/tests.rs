//! Ranking, pack and spread, GPU picking and the explanation of a miss.

use super::*;

fn host(id: &str, gpus: i64, total: i64, cpu: i64) -> Candidate {
    Candidate {
        id: id.into(),
        free_vcpus: cpu,
        free_memory_mib: 1 << 20,
        free_disk_gib: 10_000,
        free_gpus: gpus,
        total_gpus: total,
    }
}

/// A need for `gpus` H100s and 8 vCPUs (also used by the group tests).
pub(crate) fn need(gpus: u32, placement: Placement) -> Need {
    Need {
        vcpus: 8,
        memory_mib: 1024,
        disk_gib: 50,
        gpu_model: Some("H100".into()),
        gpu_count: gpus,
        placement,
        region: "default".into(),
        host: None,
    }
}

#[test]
fn pack_fills_partly_used_hosts_and_spread_does_not() {
    let hosts = [
        host("a", 8, 8, 64),
        host("b", 3, 8, 64),
        host("c", 1, 8, 64),
    ];
    // c has too few; b is the fullest that fits.
    assert_eq!(choose(&hosts, &need(2, Placement::Pack)), Some(1));
    assert_eq!(choose(&hosts, &need(2, Placement::Spread)), Some(0));
    assert_eq!(choose(&hosts, &need(9, Placement::Pack)), None);
}

#[test]
fn cpu_only_work_avoids_gpu_hosts() {
    let hosts = [host("gpu", 8, 8, 10), host("cpu", 0, 0, 64)];
    let mut n = need(0, Placement::Pack);
    n.gpu_model = None;
    assert_eq!(choose(&hosts, &n), Some(1));
    n.placement = Placement::Spread;
    assert_eq!(choose(&hosts, &n), Some(1));
}

#[test]
fn gpus_of_one_model_are_preferred() {
    let free: BTreeMap<String, Vec<String>> = [
        ("A".to_string(), vec!["a1".into(), "a2".into(), "a3".into()]),
        ("B".to_string(), vec!["b1".into(), "b2".into()]),
    ]
    .into();
    // Both fit 2: the model with fewer free is taken (packing).
    assert_eq!(
        pick_gpus(&free, 2),
        Some(vec![("B".into(), vec!["b1".into(), "b2".into()])])
    );
    assert_eq!(pick_gpus(&free, 3).unwrap()[0].0, "A");
    // Only a mix fits 4: the largest model first.
    let mix = pick_gpus(&free, 4).unwrap();
    assert_eq!(
        mix[0],
        ("A".into(), vec!["a1".into(), "a2".into(), "a3".into()])
    );
    assert_eq!(mix[1], ("B".into(), vec!["b1".into()]));
    assert_eq!(pick_gpus(&free, 6), None);
}

#[test]
fn explains_what_is_missing() {
    let hosts = [host("a", 4, 8, 64), host("b", 2, 8, 64)];
    assert_eq!(
        explain(&hosts, &need(8, Placement::Pack), 60),
        "no host has 8 free H100 GPUs; largest is 4"
    );
    let hosts = [host("a", 4, 8, 6), host("b", 0, 8, 64)];
    assert_eq!(
        explain(&hosts, &need(2, Placement::Pack), 60),
        "no host with 2 free H100 GPUs has 8 free vCPUs; largest is 6"
    );
    assert!(explain(&[], &need(1, Placement::Pack), 60).contains("last 60 s"));
}
