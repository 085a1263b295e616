//! The guest exporter's channel end to end on a real TCG guest: a domain
//! from the agent's own `DomainDef` (with the `org.gantry.metrics.0`
//! channel on `Layout::metrics_socket`), the test guest's
//! `gantry-guest-exporter` started through the exec channel on the
//! simulated NVML (2× RTX A6000), and the host's `GuestChannels` reading
//! its reports; killing the exporter ages the figures out.

use anyhow::{bail, Context};
use gantry_agent::domain_xml::{Boot, DiskDef, DomainDef};
use gantry_agent::layout::Layout;
use gantry_agent::monitor::guest::GuestChannels;
use gantry_proto::InstanceId;
use gantry_tests::fixture::{require_rig, virsh, BOOT_TIMEOUT, EXEC_TIMEOUT};
use gantry_tests::guest::{exec_in_guest, guest_image, wait_for_marker_count};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const INTERVAL_SECS: u64 = 1;
/// What the collector would pass: a report older than a couple of
/// intervals is stale.
const MAX_AGE: Duration = Duration::from_secs(3 * INTERVAL_SECS);

/// A defined and started domain; destroyed, undefined and its directory
/// removed on drop.
struct Domain {
    name: String,
    dir: PathBuf,
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn qemu_img(args: &[&str], paths: &[&Path]) -> anyhow::Result<()> {
    let out = Command::new("qemu-img").args(args).args(paths).output()?;
    if !out.status.success() {
        bail!(
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn mkdir_0755(p: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(p)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Boots the test guest from a `DomainDef` whose state directory is a
/// fresh `/var/tmp` directory (QEMU must traverse it).
fn boot(id: InstanceId) -> anyhow::Result<(Domain, Layout)> {
    let image = guest_image()?;
    let suffix = &id.to_string()[4..16];
    let name = format!("gantry-gmctest-{suffix}");
    let dom = Domain {
        name: name.clone(),
        dir: PathBuf::from("/var/tmp").join(&name),
    };
    let layout = Layout::new(&dom.dir);
    mkdir_0755(&dom.dir)?;
    mkdir_0755(&layout.instances_dir())?;
    mkdir_0755(&layout.instance_dir(id))?;
    let (root, data) = (
        layout.instance_dir(id).join("root.qcow2"),
        layout.instance_dir(id).join("data.qcow2"),
    );
    qemu_img(
        &["create", "-q", "-f", "qcow2", "-F", "raw", "-b"],
        &[&image.disk, &root],
    )?;
    qemu_img(&["create", "-q", "-f", "qcow2"], &[&data, Path::new("1G")])?;
    let def = DomainDef {
        name: name.clone(),
        uuid: id.uuid(),
        domain_type: if std::env::var("GANTRY_DOMAIN_TYPE").as_deref() == Ok("kvm") {
            "kvm"
        } else {
            "qemu"
        },
        machine: "pc".into(),
        vcpus: 1,
        memory_mib: 256,
        boot: Boot::Kernel {
            kernel: image.kernel.clone(),
            initrd: Some(image.initrd.clone()),
            cmdline: image.cmdline.clone(),
        },
        disks: vec![
            DiskDef {
                path: root,
                target: "vda",
                serial: "root",
            },
            DiskDef {
                path: data,
                target: "vdb",
                serial: "data",
            },
        ],
        console_socket: layout.console_socket(id),
        console_log: layout.console_log(id),
        exec_socket: layout.exec_socket(id),
        passthrough: None,
        instance_id: id.to_string(),
        interface: None,
        group_interface: None,
        seed: None,
        guest_agent_socket: None,
        metrics_socket: layout.metrics_socket(id),
        share: None,
    };
    let xml = dom.dir.join("domain.xml");
    std::fs::write(&xml, def.to_xml())?;
    virsh(&["define", xml.to_str().context("non-UTF-8 path")?])?;
    virsh(&["start", &name])?;
    Ok((dom, layout))
}

fn sh(exec: &Path, cmd: &str) -> anyhow::Result<String> {
    let out = exec_in_guest(exec, cmd, EXEC_TIMEOUT)?;
    if out.status != 0 {
        bail!("`{cmd}` in the guest exited {}: {}", out.status, out.output);
    }
    Ok(out.output)
}

fn wait_until(what: &str, timeout: Duration, ok: impl Fn() -> bool) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !ok() {
        if t.elapsed() >= timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(t.elapsed())
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn guest_gpu_reports_reach_the_host_and_age_out() -> anyhow::Result<()> {
    require_rig("guest_gpu_reports_reach_the_host_and_age_out");
    let id = InstanceId::new();
    let (dom, layout) = boot(id)?;
    let channels = GuestChannels::new();
    channels.sync(&[(id, layout.metrics_socket(id))]);
    wait_for_marker_count(&layout.console_log(id), 1, BOOT_TIMEOUT)?;
    let exec = layout.exec_socket(id);

    // The port is there, and without a real NVML nothing started the
    // exporter at boot: no report.
    let names = sh(&exec, "cat /sys/class/virtio-ports/*/name")?;
    assert!(
        names.lines().any(|n| n == "org.gantry.metrics.0"),
        "{names}"
    );
    assert_eq!(
        sh(&exec, "pidof gantry-guest-exporter || echo none")?.trim(),
        "none"
    );
    assert!(channels
        .stats(&id)
        .is_some_and(|s| s.connected && s.reports == 0));

    let started = Instant::now();
    sh(
        &exec,
        &format!(
            "GANTRY_NVML_SIM_PROFILE=a6000x2 setsid /usr/bin/gantry-guest-exporter \
             --interval {INTERVAL_SECS} --nvml /usr/lib/gantry/libnvidia-ml-sim.so \
             </dev/null >/var/log/gantry-guest-exporter.log 2>&1 &"
        ),
    )?;
    let took = wait_until("a report with 2 GPUs", Duration::from_secs(10), || {
        channels.latest(&id, MAX_AGE).is_some_and(|g| g.len() == 2)
    })?;
    eprintln!(
        "exec + first report on the host: {:?} (from the exec call)",
        started.elapsed()
    );
    eprintln!("first report after the exec answered: {took:?}");
    let gpus = channels.latest(&id, MAX_AGE).context("report")?;
    for (i, g) in gpus.iter().enumerate() {
        assert_eq!(g.index, i as u32);
        assert_eq!(g.uuid, gantry_nvml_sim::profiles::uuid("a6000x2", i as u32));
        assert_eq!(g.model, "NVIDIA RTX A6000");
        assert_eq!((g.power_w, g.temperature_c), (Some(22.0), Some(30.0)));
        assert_eq!(g.mem_total_bytes, Some(49140 << 20));
        assert_eq!(g.last_xid, Some(0));
    }
    assert_eq!(gpus[0].pci_bus_id, "0000:17:00.0");
    assert_eq!(gpus[1].pci_bus_id, "0000:65:00.0");
    // It keeps reporting every interval.
    let before = channels.stats(&id).context("stats")?.reports;
    wait_until(
        "two more reports",
        Duration::from_secs(6 * INTERVAL_SECS),
        || channels.stats(&id).is_some_and(|s| s.reports >= before + 2),
    )?;

    sh(&exec, "kill $(pidof gantry-guest-exporter)")?;
    let aged = wait_until(
        "the figures to age out",
        MAX_AGE + Duration::from_secs(3),
        || channels.latest(&id, MAX_AGE).is_none(),
    )?;
    eprintln!("aged out {aged:?} after the kill");
    let st = channels.stats(&id).context("stats")?;
    assert_eq!((st.bad_lines, st.long_lines), (0, 0), "{st:?}");
    let log = sh(&exec, "cat /var/log/gantry-guest-exporter.log")?;
    assert!(log.contains("NVML sees 2 GPU(s)"), "{log}");
    drop(dom);
    Ok(())
}
