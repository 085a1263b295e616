//! Benchmark (scripts/bench-gpu): time from the end of a lease to the GPU
//! back in the pool through the health gate, on the simulated NVML
//! library (8× H100): `cargo run --release --example gpu_gate -- [N]`.

use gantry_agent::gpu::{self, GpuConfig, GpuSource};
use gantry_proto::gpu::GpuHealth;
use gantry_proto::InstanceId;
use std::time::{Duration, Instant};

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map_or(Ok(50), |s| s.parse())?;
    let sim = tempfile::tempdir()?;
    gantry_nvml_sim::control::init(sim.path(), "h100x8")?;
    std::env::set_var(gantry_nvml_sim::ENV_DIR, sim.path());
    let cfg = GpuConfig {
        source: GpuSource::Nvml,
        nvml_library: gantry_nvml_sim::built_library()?.display().to_string(),
        sysfs_root: sim.path().join("sys"),
        poll_secs: 10,
        ..GpuConfig::default()
    };
    let state = tempfile::tempdir()?;
    let pool = gpu::open(&cfg, state.path())?;
    pool.start();
    let g = pool.list()[3].pci;
    for (label, remap) in [
        ("plain gate (checks + reset)", false),
        ("pending row remap (reset, re-read)", true),
    ] {
        let mut took = Vec::with_capacity(n);
        for _ in 0..n {
            let id = InstanceId::new();
            pool.lease(id, &[g])?;
            if remap {
                gantry_nvml_sim::control::set_remap(sim.path(), 3u32, 0, 1, true, false)?;
                // The simulated reset must be newer than the fault by a tick.
                std::thread::sleep(Duration::from_millis(20));
            }
            let start = Instant::now();
            pool.release(id, &[]);
            loop {
                let h = pool
                    .list()
                    .into_iter()
                    .find(|x| x.pci == g)
                    .map(|x| x.health);
                match h {
                    Some(GpuHealth::Healthy) => break,
                    Some(GpuHealth::Checking) | Some(GpuHealth::Leased) => {}
                    other => anyhow::bail!("the gate did not pass: {other:?}"),
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            took.push(start.elapsed());
        }
        println!(
            "{label}: n={n} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            pct(&mut took, 0.5),
            pct(&mut took, 0.99),
            pct(&mut took, 1.0)
        );
    }
    Ok(())
}
