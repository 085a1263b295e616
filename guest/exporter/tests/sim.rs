//! The exporter binary against the workspace's simulated NVML
//! (`gantry-nvml-sim`, 2× RTX A6000), writing to a file in place of the
//! virtio-serial port: the figures, units and UUIDs of every GPU, an XID
//! injected while it runs, and a guest without NVML.

use gantry_nvml_sim::{control, profiles};
use gantry_proto::metrics::GuestReport;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gantry-guest-exporter");

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The reports written to `port` so far (every line must parse and pass
/// the host's check).
fn reports(port: &Path) -> Vec<GuestReport> {
    let text = std::fs::read_to_string(port).unwrap_or_default();
    text.lines()
        .map(|l| {
            let r: GuestReport = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            r.check().unwrap();
            r
        })
        .collect()
}

fn wait_for(port: &Path, what: &str, ok: impl Fn(&GuestReport) -> bool) -> GuestReport {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = reports(port).into_iter().rev().find(&ok) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no report with {what} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn reports_every_gpu_and_the_last_xid() {
    let lib = gantry_nvml_sim::built_library().expect("build the simulated NVML");
    let dir = tempfile::tempdir().unwrap();
    let sim = dir.path().join("sim");
    control::init(&sim, "a6000x2").unwrap();
    let port = dir.path().join("port");
    std::fs::write(&port, b"").unwrap();
    let _child = Killed(
        Command::new(BIN)
            .args(["--interval", "1", "--nvml"])
            .arg(&lib)
            .arg("--port")
            .arg(&port)
            .env("GANTRY_NVML_SIM_DIR", &sim)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let r = wait_for(&port, "2 GPUs", |r| r.gpus.len() == 2);
    for (i, g) in r.gpus.iter().enumerate() {
        assert_eq!(g.index, i as u32);
        assert_eq!(g.uuid, profiles::uuid("a6000x2", i as u32));
        assert_eq!(g.model, "NVIDIA RTX A6000");
        assert_eq!(g.power_w, Some(22.0));
        assert_eq!(g.temperature_c, Some(30.0));
        assert_eq!(g.mem_total_bytes, Some(49140 << 20));
        assert_eq!(g.util_pct, Some(0.0));
        assert!(g.energy_j.unwrap() >= 1_000_000.0, "{g:?}");
        // ECC is off on this board: not supported, not zero.
        assert_eq!(g.ecc_uncorrected, None);
        assert_eq!(g.last_xid, Some(0));
    }
    assert_eq!(r.gpus[0].pci_bus_id, "0000:17:00.0");
    assert_eq!(r.gpus[1].pci_bus_id, "0000:65:00.0");

    control::inject_xid(&sim, 1u32, 79).unwrap();
    let r = wait_for(&port, "XID 79 on GPU 1", |r| {
        r.gpus.get(1).and_then(|g| g.last_xid) == Some(79)
    });
    assert_eq!(r.gpus[0].last_xid, Some(0));
}

#[test]
fn without_nvml_it_says_so_once_and_reports_no_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["--once", "--port", "-", "--nvml"])
        .arg(dir.path().join("libnvidia-ml.so.1"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"{\"v\":1,\"gpus\":[]}\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("cannot load NVML").count(), 1, "{err}");

    let bad = Command::new(BIN)
        .args(["--interval", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--interval must be 1 to 3600"));
}
