//! GPUs end to end: a real controller and a real agent whose NVML is the
//! workspace's simulated library (8× H100) over a fake sysfs tree. An
//! injected XID 79 quarantines a GPU and the scheduler stops offering it;
//! change-type onto a GPU flavor attaches the booked GPUs to the domain
//! libvirt holds and grows its root disk to the flavor's (starting it needs
//! VFIO, which this kernel lacks, so the instance stays stopped);
//! change-type back detaches them and they come
//! back through the health gate; the agent's leases survive its restart; an
//! admin clears the quarantined GPU.

use anyhow::Context;
use gantry_nvml_sim::control;
use gantry_tests::cloud::Cloud;
use gantry_tests::controller::Database;
use gantry_tests::fixture::OP_TIMEOUT;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

fn host_gpus(cloud: &Cloud) -> anyhow::Result<Vec<Value>> {
    let h = cloud
        .admin
        .get(&format!("/v1/admin/hosts/{}", cloud.host))?;
    Ok(h["gpus"].as_array().context("gpus")?.clone())
}

fn wait_gpu(cloud: &Cloud, pci: &str, state: &str) -> anyhow::Result<Value> {
    let want = state.to_string();
    let p = pci.to_string();
    let h = cloud.admin.wait_for(
        &format!("/v1/admin/hosts/{}", cloud.host),
        Duration::from_secs(60),
        &format!("GPU {pci} to be {state}"),
        |v| {
            v["gpus"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|g| g["pci"] == p.as_str() && g["health"]["state"] == want.as_str())
            })
        },
    )?;
    let gpus = h["gpus"].as_array().context("gpus")?;
    Ok(gpus
        .iter()
        .find(|g| g["pci"] == pci)
        .cloned()
        .unwrap_or_default())
}

/// The PCI addresses of the domain's hostdevs, as libvirt holds them.
fn hostdevs(id: &str) -> anyhow::Result<Vec<String>> {
    let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into());
    let out = Command::new("virsh")
        .args(["-c", &uri, "dumpxml", &format!("gantry-{id}")])
        .output()?;
    anyhow::ensure!(out.status.success(), "virsh dumpxml failed");
    let xml = String::from_utf8(out.stdout)?;
    let mut found = Vec::new();
    for part in xml.split("<hostdev ").skip(1) {
        let a = part.split("<address ").nth(1).context("hostdev address")?;
        let attr = |k: &str| -> Option<String> {
            let v = a.split(&format!("{k}='")).nth(1)?.split('\'').next()?;
            Some(v.trim_start_matches("0x").to_string())
        };
        found.push(format!(
            "{}:{}:{}.{}",
            attr("domain").context("domain")?,
            attr("bus").context("bus")?,
            attr("slot").context("slot")?,
            attr("function").context("function")?
        ));
    }
    Ok(found)
}

/// The root disk's capacity as libvirt sees it (`virsh domblkinfo`).
fn root_disk_bytes(id: &str) -> anyhow::Result<u64> {
    let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into());
    let out = Command::new("virsh")
        .args(["-c", &uri, "domblkinfo", &format!("gantry-{id}"), "vda"])
        .output()?;
    anyhow::ensure!(out.status.success(), "virsh domblkinfo failed");
    let text = String::from_utf8(out.stdout)?;
    text.lines()
        .find_map(|l| l.strip_prefix("Capacity:"))
        .context("no capacity")?
        .trim()
        .parse()
        .context("capacity")
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn gpus_through_the_controller_on_the_simulated_library() -> anyhow::Result<()> {
    let sim = tempfile::tempdir()?;
    control::init(sim.path(), "h100x8")?;
    // The agent inherits it and hands it to the simulated library.
    std::env::set_var(gantry_nvml_sim::ENV_DIR, sim.path());
    let lib = gantry_nvml_sim::built_library()?;
    let mut cloud = Cloud::start_with(
        &Database::Sqlite,
        &format!(
            "[gpu]\nsource = \"nvml\"\nnvml_library = {:?}\nsysfs_root = {:?}\npoll_secs = 1\n",
            lib.display().to_string(),
            sim.path().join("sys").display().to_string()
        ),
    )?;
    let gpus = host_gpus(&cloud)?;
    assert_eq!(gpus.len(), 8, "{gpus:?}");
    for g in &gpus {
        assert_eq!(g["model"], "NVIDIA H100 80GB HBM3", "{g}");
        assert_eq!(g["health"]["state"], "healthy", "{g}");
        assert!(g["uuid"].as_str().unwrap_or("").starts_with("GPU-"), "{g}");
    }

    // XID 13 is the application's; XID 79 takes GPU 0 out of the pool.
    control::inject_xid(sim.path(), 1u32, 13)?;
    control::inject_xid(sim.path(), 0u32, 79)?;
    let g0 = wait_gpu(&cloud, "0000:1a:00.0", "quarantined")?;
    assert!(
        g0["health"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("XID 79"),
        "{g0}"
    );
    assert_eq!(host_gpus(&cloud)?[1]["health"]["state"], "healthy");

    // A GPU flavor by alias ("H100" matches NVML's name); 8 no longer fit.
    let eight = cloud.admin.post(
        "/v1/admin/flavors",
        &json!({"name": "h100-8", "vcpus": 1, "memory_mib": 256, "root_disk_gib": 1,
                "gpu_model": "H100", "gpu_count": 8, "price_micros_per_hour": 8_000_000}),
    )?;
    let refused = cloud
        .tenant
        .post(
            "/v1/instances",
            &json!({"name": "big", "flavor": eight["id"], "image": cloud.image}),
        )
        .unwrap_err();
    assert!(refused.error.contains("largest is 7"), "{}", refused.error);
    let two = cloud.admin.post(
        "/v1/admin/flavors",
        &json!({"name": "h100-2", "vcpus": 1, "memory_mib": 256, "root_disk_gib": 2,
                "gpu_model": "H100", "gpu_count": 2, "price_micros_per_hour": 2_000_000}),
    )?;

    // A CPU instance, stopped, changed onto the GPU flavor.
    let id =
        cloud.create(json!({"name": "train", "flavor": cloud.flavor, "image": cloud.image}))?;
    cloud.wait_state(&id, "Running")?;
    cloud.act(&id, "stop")?;
    cloud.wait_state(&id, "Stopped")?;
    let v = cloud.tenant.post(
        &format!("/v1/instances/{id}/actions"),
        &json!({"action": "change-type", "flavor": two["id"]}),
    )?;
    cloud
        .tenant
        .wait_op(v["operation"].as_str().context("op")?, OP_TIMEOUT)?;
    let hw = cloud.tenant.get(&format!("/v1/instances/{id}/hardware"))?;
    let booked: Vec<String> = hw["gpus"]
        .as_array()
        .context("hardware gpus")?
        .iter()
        .map(|g| g.as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(booked.len(), 2, "{hw}");
    assert!(
        !booked.contains(&"0000:1a:00.0".to_string()),
        "quarantined GPU booked: {hw}"
    );
    assert_eq!(
        hostdevs(&id)?,
        booked,
        "the domain libvirt holds has the booked GPUs"
    );
    // The flavor's larger root disk reached the host too.
    assert_eq!(root_disk_bytes(&id)?, 2 << 30);
    for p in &booked {
        wait_gpu(&cloud, p, "leased")?;
    }
    // The agent dies and comes back: its leases are where they were.
    cloud.agent.kill9();
    cloud.agent.spawn()?;
    let local: Vec<Value> = cloud.agent.get("/v1/gpus")?;
    let held: Vec<&str> = local
        .iter()
        .filter(|g| g["instance"] == id.as_str())
        .map(|g| g["pci"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(held, booked, "leases after an agent restart");
    assert!(local
        .iter()
        .filter(|g| g["instance"] == id.as_str())
        .all(|g| g["health"]["state"] == "leased"));

    // Back to the CPU flavor: detached, gated, healthy again.
    let v = cloud.tenant.post(
        &format!("/v1/instances/{id}/actions"),
        &json!({"action": "change-type", "flavor": cloud.flavor}),
    )?;
    cloud
        .tenant
        .wait_op(v["operation"].as_str().context("op")?, OP_TIMEOUT)?;
    assert!(hostdevs(&id)?.is_empty(), "GPUs detached from the domain");
    for p in &booked {
        wait_gpu(&cloud, p, "healthy")?;
    }

    // The admin clears GPU 0: the gate passes it and it is offered again.
    let op = cloud.admin.post(
        &format!("/v1/admin/hosts/{}/gpus/0000:1a:00.0/clear", cloud.host),
        &json!({"note": "reseated"}),
    )?;
    cloud
        .admin
        .wait_op(op["id"].as_str().context("clear op")?, OP_TIMEOUT)?;
    wait_gpu(&cloud, "0000:1a:00.0", "healthy")?;
    cloud.act(&id, "release")?;
    Ok(())
}
