//! The agent's GPU pool on the simulated NVML library (8× H100 profile):
//! the same nvml-wrapper calls, sysfs reads and gate that run on a GPU
//! host. NVML is loaded once per process, so the scenarios share one
//! simulated host and use different GPUs; they run in order in one test.

use gantry_agent::gpu::{self, GpuConfig, GpuPool, GpuSource};
use gantry_nvml_sim::control;
use gantry_proto::gpu::{GpuHealth, GpuHealthKind};
use gantry_proto::validate::PciAddress;
use gantry_proto::InstanceId;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(sim: &Path) -> GpuConfig {
    let lib = gantry_nvml_sim::built_library().expect("the simulated NVML library builds");
    GpuConfig {
        source: GpuSource::Nvml,
        nvml_library: lib.to_string_lossy().into_owned(),
        sysfs_root: sim.join("sys"),
        poll_secs: 1,
        ..GpuConfig::default()
    }
}

fn pci(s: &str) -> PciAddress {
    PciAddress::parse(s).unwrap()
}

fn health(pool: &GpuPool, at: &PciAddress) -> GpuHealth {
    pool.list()
        .into_iter()
        .find(|g| g.pci == *at)
        .unwrap()
        .health
}

/// Waits until the GPU's health satisfies `ok` (the poller and the XID
/// watcher run on their own threads).
fn wait_for(pool: &GpuPool, at: &PciAddress, what: &str, ok: impl Fn(&GpuHealth) -> bool) {
    let start = Instant::now();
    loop {
        let h = health(pool, at);
        if ok(&h) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "GPU {at} never became {what}; it is {h}"
        );
        pool.wake();
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(pool: &GpuPool) -> String {
    let mut s = String::new();
    pool.render_metrics(&mut s);
    s
}

#[test]
fn gpu_pool_on_the_simulated_library() {
    let sim = tempfile::tempdir().unwrap();
    control::init(sim.path(), "h100x8").unwrap();
    // Before NVML is first loaded in this process.
    std::env::set_var(gantry_nvml_sim::ENV_DIR, sim.path());
    let state = tempfile::tempdir().unwrap();
    let cfg = config(sim.path());
    let pool = gpu::open(&cfg, state.path()).unwrap();
    pool.start();

    inventory(&pool);
    concurrent_leases_never_share_a_gpu(&pool);
    xid_79_quarantines_and_xid_13_does_not(&pool, sim.path());
    pending_remaps_are_reset_and_returned(&pool, sim.path());
    admin_clear_sends_it_through_the_gate(&pool);
    a_degraded_link_fails_the_gate(&pool, sim.path());
    a_gpu_off_the_bus_is_lost(&pool, sim.path());
    drop(pool);
    // Its own state directory: the pool above keeps its threads.
    let state = tempfile::tempdir().unwrap();
    leases_survive_a_restart(&cfg, state.path());
}

fn inventory(pool: &Arc<GpuPool>) {
    let list = pool.list();
    assert_eq!(list.len(), 8, "{list:#?}");
    assert_eq!(pool.source(), "nvml");
    for g in &list {
        assert_eq!(g.model, "NVIDIA H100 80GB HBM3");
        assert!(g.uuid.as_deref().unwrap().starts_with("GPU-"), "{g:?}");
        assert!(g.memory_bytes.unwrap() > 80_000_000_000, "{g:?}");
        assert_eq!(g.health, GpuHealth::Healthy);
        assert_eq!(g.driver.as_deref(), Some("nvidia"));
        assert_eq!(g.functions, vec![g.pci], "one function per group");
        assert_eq!(g.driver_version.as_deref(), Some("550.127.05"));
        assert!(g.vbios.is_some() && g.mig_mode == Some(0), "{g:?}");
        assert!(g.cpu_affinity.is_some(), "{g:?}");
    }
    assert_eq!(list[0].pci, pci("0000:1a:00.0"));
    assert_eq!(list[0].numa_node, Some(0));
    assert_eq!(list[7].numa_node, Some(1));
    let uuids: std::collections::HashSet<_> = list.iter().map(|g| g.uuid.clone()).collect();
    assert_eq!(uuids.len(), 8, "distinct UUIDs");
    let m = metrics(pool);
    assert!(
        m.contains("gantry_gpu_health{pci=\"0000:1a:00.0\",state=\"healthy\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("gantry_gpu_temperature_celsius{pci=\"0000:1a:00.0\"}") || {
            pool.poll();
            metrics(pool).contains("gantry_gpu_temperature_celsius{pci=\"0000:1a:00.0\"}")
        }
    );
}

fn concurrent_leases_never_share_a_gpu(pool: &Arc<GpuPool>) {
    let all: Vec<PciAddress> = pool.list().iter().map(|g| g.pci).collect();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (pool, all) = (pool.clone(), all.clone());
            std::thread::spawn(move || {
                let id = InstanceId::new();
                let want = vec![all[i % 8], all[(i + 3) % 8]];
                pool.lease(id, &want).ok().map(|_| (id, want))
            })
        })
        .collect();
    let won: Vec<(InstanceId, Vec<PciAddress>)> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap())
        .collect();
    assert!(!won.is_empty());
    let mut held = std::collections::HashMap::new();
    for (id, gpus) in &won {
        for g in gpus {
            assert!(held.insert(*g, *id).is_none(), "GPU {g} leased twice");
        }
    }
    for g in pool.list() {
        assert_eq!(g.instance, held.get(&g.pci).copied(), "{g:?}");
    }
    // Released: every GPU goes through the gate and back to the pool.
    for (id, _) in &won {
        pool.release(*id, &[]);
    }
    for g in &all {
        wait_for(pool, g, "healthy", |h| *h == GpuHealth::Healthy);
    }
    assert!(metrics(pool).contains("gantry_gpu_gates_total{result=\"passed\"}"));
}

fn xid_79_quarantines_and_xid_13_does_not(pool: &Arc<GpuPool>, sim: &Path) {
    let (g0, g1) = (pci("0000:1a:00.0"), pci("0000:40:00.0"));
    control::inject_xid(sim, 1u32, 13).unwrap();
    control::inject_xid(sim, 0u32, 79).unwrap();
    wait_for(pool, &g0, "quarantined", |h| {
        h.kind() == GpuHealthKind::Quarantined
    });
    let reason = health(pool, &g0).reason().unwrap().to_string();
    assert!(reason.contains("XID 79"), "{reason}");
    // XIDs are delivered in order: 13 came first and left GPU 1 alone.
    assert_eq!(health(pool, &g1), GpuHealth::Healthy);
    assert!(
        metrics(pool).contains("gantry_gpu_xid_errors_total{pci=\"0000:40:00.0\",xid=\"13\"} 1")
    );
    let err = pool.lease(InstanceId::new(), &[g0]).unwrap_err();
    assert!(err.to_string().contains("quarantined"), "{err}");
}

fn pending_remaps_are_reset_and_returned(pool: &Arc<GpuPool>, sim: &Path) {
    let g2 = pci("0000:53:00.0");
    let reset_file = sim.join("sys/bus/pci/devices/0000:53:00.0/reset");
    let id = InstanceId::new();
    pool.lease(id, &[g2]).unwrap();
    control::set_remap(sim, 2u32, 0, 1, true, false).unwrap();
    // The simulated reset counts only when its file is newer than the
    // fault by more than the file clock's tick.
    std::thread::sleep(Duration::from_millis(50));
    let before = std::fs::metadata(&reset_file).unwrap().modified().unwrap();
    // Back from the VM: the gate reads the pending remap, resets the GPU
    // (the simulated reset applies the remap), reads it again, returns it.
    pool.release(id, &[]);
    wait_for(pool, &g2, "healthy again", |h| *h == GpuHealth::Healthy);
    let after = std::fs::metadata(&reset_file).unwrap().modified().unwrap();
    assert!(after > before, "the gate reset the GPU through sysfs");
    let shown = control::load(sim).unwrap();
    assert!(!shown.gpus[2].remap.pending, "the reset applied the remap");
}

fn admin_clear_sends_it_through_the_gate(pool: &Arc<GpuPool>) {
    let g0 = pci("0000:1a:00.0");
    let g3 = pci("0000:66:00.0");
    assert!(pool.clear(&g3).is_err(), "a healthy GPU cannot be cleared");
    pool.clear(&g0).unwrap();
    wait_for(pool, &g0, "healthy", |h| *h == GpuHealth::Healthy);
}

fn a_degraded_link_fails_the_gate(pool: &Arc<GpuPool>, sim: &Path) {
    let g5 = pci("0000:c0:00.0");
    let id = InstanceId::new();
    pool.lease(id, &[g5]).unwrap();
    control::set_link(sim, 5u32, "16.0 GT/s PCIe", 8).unwrap();
    pool.release(id, &[]);
    wait_for(pool, &g5, "quarantined", |h| {
        h.kind() == GpuHealthKind::Quarantined
    });
    let reason = health(pool, &g5).reason().unwrap().to_string();
    assert!(
        reason.contains("PCIe link at 16.0 GT/s PCIe x8"),
        "{reason}"
    );
    control::restore(sim, 5u32).unwrap();
    pool.clear(&g5).unwrap();
    wait_for(pool, &g5, "healthy", |h| *h == GpuHealth::Healthy);
}

fn a_gpu_off_the_bus_is_lost(pool: &Arc<GpuPool>, sim: &Path) {
    let g6 = pci("0000:d2:00.0");
    control::lose(sim, 6u32).unwrap();
    wait_for(pool, &g6, "lost", |h| *h == GpuHealth::Lost);
    // The XID 79 that came with it is in too (else it could land after the
    // clear below and quarantine the GPU again).
    let start = Instant::now();
    while !metrics(pool).contains("gantry_gpu_xid_errors_total{pci=\"0000:d2:00.0\",xid=\"79\"} 1")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "XID 79 of GPU 6 never seen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    control::restore(sim, 6u32).unwrap();
    pool.clear(&g6).unwrap();
    wait_for(pool, &g6, "healthy", |h| *h == GpuHealth::Healthy);
}

fn leases_survive_a_restart(cfg: &GpuConfig, state: &Path) {
    let id = InstanceId::new();
    let two = [pci("0000:9c:00.0"), pci("0000:e4:00.0")];
    {
        let pool = GpuPool::open(
            cfg.clone(),
            gpu::sysfs::Sysfs::new(&cfg.sysfs_root),
            gpu::open_nvml(cfg).unwrap(),
            state.join("gpus.json"),
        )
        .unwrap();
        pool.lease(id, &two).unwrap();
    }
    let pool = gpu::open(cfg, state).unwrap();
    for g in &two {
        let s = pool.list().into_iter().find(|x| x.pci == *g).unwrap();
        assert_eq!((s.health, s.instance), (GpuHealth::Leased, Some(id)));
    }
    let other = pool.lease(InstanceId::new(), &two[..1]).unwrap_err();
    assert!(other.to_string().contains(&id.to_string()), "{other}");
    // The instance is gone after the restart: its lease ends.
    pool.reconcile(&[]);
    assert!(pool.list().iter().all(|g| g.instance.is_none()));
}
