//! Proves the nested-virt rig end to end: a throwaway libvirt domain running the test
//! guest boots to its marker, runs commands over the exec channel (status, output, a
//! few hundred KB), keeps /datadrive across `virsh reboot`, and powers off on
//! `virsh shutdown`. Needs LIBVIRT_DEFAULT_URI and GANTRY_GUEST_DIR (scripts/setup-host,
//! scripts/build-guest).

use anyhow::{bail, Context};
use gantry_tests::guest::{
    count_markers, exec_in_guest, guest_image, wait_for_marker_count, GuestImage,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Generous: TCG boot is ~5 s alone but the CI box has 2 cores shared with cargo.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// The libvirt URI; fails the test with a sentence when the rig is not
/// set up (the test is ignored by a plain `cargo test`).
fn rig_env() -> String {
    let missing: Vec<&str> = ["LIBVIRT_DEFAULT_URI", "GANTRY_GUEST_DIR"]
        .into_iter()
        .filter(|v| std::env::var_os(v).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "{} not set: run ./scripts/test, or scripts/setup-host and scripts/build-guest, then \
         source .cache/env/*.env",
        missing.join(" and ")
    );
    std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_default()
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A defined + started domain; destroyed, undefined and its directory removed on drop.
struct RigDomain {
    uri: String,
    name: String,
    dir: PathBuf,
}

impl RigDomain {
    fn create(uri: &str, image: &GuestImage) -> anyhow::Result<Self> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let name = format!(
            "gantry-rigtest-{:x}{:x}",
            std::process::id(),
            nanos % (1 << 40)
        );
        // QEMU runs as libvirt-qemu: the directory must be traversable (0755, not a 0700 tempdir).
        let dir = PathBuf::from("/var/tmp").join(&name);
        std::fs::create_dir_all(&dir)?;
        let dom = RigDomain {
            uri: uri.to_string(),
            name,
            dir,
        };
        std::fs::set_permissions(
            &dom.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let (root, data) = (dom.dir.join("root.qcow2"), dom.dir.join("data.qcow2"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image.disk)
            .arg(&root)
            .arg("2G"))?;
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&data)
            .arg("1G"))?;
        let xml_path = dom.dir.join("domain.xml");
        std::fs::write(&xml_path, domain_xml(&dom.name, image, &dom.dir))?;
        dom.virsh(&["define", xml_path.to_str().context("non-UTF-8 path")?])?;
        dom.virsh(&["start", &dom.name])?;
        Ok(dom)
    }

    fn virsh(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args))
    }

    fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    fn exec_sock(&self) -> PathBuf {
        self.dir.join("exec.sock")
    }

    fn wait_state(&self, want: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.virsh(&["domstate", &self.name])?;
            if state.trim() == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "domain {} is {:?}, not {want:?}, after {timeout:?}",
                    self.name,
                    state.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for RigDomain {
    fn drop(&mut self) {
        let _ = self.virsh(&["destroy", &self.name]);
        let _ = self.virsh(&["undefine", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for_log(log: &Path, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !std::fs::read(log).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle)) {
        if Instant::now() >= deadline {
            bail!(
                "{needle:?} did not appear in {} within {timeout:?}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Same layout as the domains the agent generates (docs/rig.md).
fn domain_xml(name: &str, image: &GuestImage, dir: &Path) -> String {
    let domain_type = std::env::var("GANTRY_DOMAIN_TYPE").unwrap_or_else(|_| "qemu".into());
    let (d, k, i) = (
        dir.display(),
        image.kernel.display(),
        image.initrd.display(),
    );
    format!(
        r#"<domain type='{domain_type}'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{k}</kernel>
    <initrd>{i}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{d}/root.qcow2'/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{d}/data.qcow2'/><target dev='vdb' bus='virtio'/>
    </disk>
    <serial type='unix'>
      <source mode='bind' path='{d}/console.sock'/><log file='{d}/console.log' append='on'/><target port='0'/>
    </serial>
    <serial type='unix'><source mode='bind' path='{d}/exec.sock'/><target port='1'/></serial>
    <console type='unix'><source mode='bind' path='{d}/console.sock'/><target type='serial' port='0'/></console>
  </devices>
</domain>
"#,
        cmdline = image.cmdline
    )
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn guest_boots_execs_and_keeps_data_across_reboot() -> anyhow::Result<()> {
    let uri = rig_env();
    let image = guest_image()?;
    let dom = RigDomain::create(&uri, &image)?;
    let started = Instant::now();
    wait_for_marker_count(&dom.console_log(), 1, BOOT_TIMEOUT)?;
    eprintln!("boot to marker: {:?}", started.elapsed());

    let out = exec_in_guest(&dom.exec_sock(), "echo hi; exit 3", EXEC_TIMEOUT)?;
    assert_eq!((out.status, out.output.as_str()), (3, "hi\n"));
    let out = exec_in_guest(&dom.exec_sock(), "echo to-stderr >&2; false", EXEC_TIMEOUT)?;
    assert_eq!((out.status, out.output.as_str()), (1, "to-stderr\n"));

    // A few hundred KB of output arrives intact.
    let t = Instant::now();
    let out = exec_in_guest(&dom.exec_sock(), "seq 1 50000", EXEC_TIMEOUT)?;
    let want: String = (1..=50000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out.status, 0);
    assert!(
        out.output == want,
        "seq output differs: got {} bytes, want {}",
        out.output.len(),
        want.len()
    );
    eprintln!("{} bytes of output in {:?}", out.output.len(), t.elapsed());

    let out = exec_in_guest(
        &dom.exec_sock(),
        "grep ' /datadrive ext4 ' /proc/mounts >/dev/null && echo rig-data-42 > /datadrive/rigtest.txt && sync",
        EXEC_TIMEOUT,
    )?;
    assert_eq!(out.status, 0, "writing /datadrive failed: {}", out.output);

    let t = Instant::now();
    dom.virsh(&["reboot", &dom.name])?;
    // Once the old boot powered off, exec right away: the call must wait through the
    // boot (socket reconnects, HELLO retries) and only be answered once the guest is ready.
    wait_for_log(&dom.console_log(), "reboot: Power down", BOOT_TIMEOUT)?;
    let out = exec_in_guest(&dom.exec_sock(), "cat /datadrive/rigtest.txt", BOOT_TIMEOUT)?;
    assert_eq!((out.status, out.output.as_str()), (0, "rig-data-42\n"));
    assert_eq!(
        count_markers(&dom.console_log()),
        2,
        "exec answered before the second boot marker"
    );
    eprintln!("virsh reboot to first exec answered: {:?}", t.elapsed());

    let t = Instant::now();
    dom.virsh(&["shutdown", &dom.name])?;
    dom.wait_state("shut off", BOOT_TIMEOUT)?;
    eprintln!("virsh shutdown to shut off: {:?}", t.elapsed());
    let log = std::fs::read_to_string(dom.console_log())?;
    assert!(
        log.contains("gantry-guest: filesystems synced"),
        "guest did not shut down cleanly:\n{log}"
    );
    Ok(())
}
