//! scripts/gpu-probe, the one script kept ready for a host with a real
//! NVIDIA GPU, checked here on the simulated library: it dumps what the
//! agent's GPU code reads (inventory, health, samples, raw NVML values,
//! sysfs) and NVIDIA's and lspci's own views into one folder.

use std::process::Command;

#[test]
fn the_gpu_probe_script_dumps_every_gpu_on_the_simulated_library() {
    let sim = tempfile::tempdir().unwrap();
    gantry_nvml_sim::control::init(sim.path(), "h200x8").unwrap();
    let lib = gantry_nvml_sim::built_library().unwrap();
    let out = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(root.join("scripts/gpu-probe"))
        .arg(out.path())
        .env("GANTRY_PROBE_AGENT", env!("CARGO_BIN_EXE_gantry-agent"))
        .env("GANTRY_PROBE_LIBRARY", &lib)
        .env("GANTRY_PROBE_SYSFS", sim.path().join("sys"))
        .env(gantry_nvml_sim::ENV_DIR, sim.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    for f in [
        "gantry-gpu-probe.json",
        "nvidia-smi-q.xml",
        "nvidia-smi-faults.txt",
        "lspci-nvidia.txt",
        "sysfs.txt",
    ] {
        assert!(out.path().join(f).exists(), "{f} missing");
    }
    let dump: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("gantry-gpu-probe.json")).unwrap())
            .unwrap();
    let gpus = dump["nvml"].as_array().unwrap();
    assert_eq!(gpus.len(), 8, "{dump}");
    assert_eq!(gpus[0]["device"]["name"], "NVIDIA H200");
    assert_eq!(gpus[0]["verdict"], "Sound");
    assert!(gpus[0]["health"]["remap"].is_object(), "{}", gpus[0]);
    assert!(gpus[0]["raw"]["bar1"]["ok"].is_string(), "{}", gpus[0]);
    assert_eq!(dump["sysfs"]["gpus"].as_array().unwrap().len(), 8);
}
