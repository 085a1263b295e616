//! The test guest's network side, end to end, without the agent: a domain
//! defined by hand (the layout of guest_rig.rs plus an access NIC and a
//! NoCloud seed disk, serial `cidata`) boots, its tap is moved into a
//! namespace this test creates (research experiment 17), which gets the
//! gateway address. From that namespace: SSH with the seed's password and
//! key (a wrong password is refused), the JupyterLab stand-in on 8888
//! (token, 403 without, WebSocket echo), TCP echo 7000 (reports our address)
//! and UDP echo 7001. Then the domain is stopped, the seed regenerated with a
//! new password, no keys and a new token, and started again: only the new
//! credentials work. A second test gives the guest a network group NIC
//! (`gantry/group.env`, a second `<interface>` with an MTU): it is `eth1`
//! with the seed's address and MTU at boot (pinged at full size from the
//! namespace its tap is moved into), goes away when unplugged live, and a
//! NIC hot-plugged later is configured by the guest's watcher from the seed
//! rewritten in place. All traffic stays inside the test's namespaces.

use anyhow::{bail, ensure, Context};
use gantry_tests::fixture::require_rig;
use gantry_tests::guest::{exec_in_guest, guest_image, wait_for_marker_count, GuestImage};
use gantry_tests::netns::{self, Netns};
use gantry_tests::ssh::{self, SshAuth, SshTarget};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const GUEST_IP: &str = "10.200.0.2";
const GATEWAY: &str = "10.200.0.1";
const MAC: &str = "52:54:00:c8:00:02";
const HOSTNAME: &str = "web-1";
/// The RFC 6455 §1.3 sample key and the accept value it must produce.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

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

fn virsh(args: &[&str]) -> anyhow::Result<String> {
    let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into());
    run(Command::new("virsh").args(["-q", "-c", &uri]).args(args))
}

/// What the seed carries (the agent writes the same layout).
struct Seed {
    password: String,
    authorized_keys: Vec<String>,
    token: String,
}

/// SHA-512 crypt of `password` (busybox-static is part of the rig).
fn sha512_crypt(password: &str) -> anyhow::Result<String> {
    let mut child = Command::new("busybox")
        .args(["mkpasswd", "-m", "sha512"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("busybox mkpasswd")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(password.as_bytes())?;
    let out = child.wait_with_output()?;
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(hash.starts_with("$6$"), "mkpasswd gave {hash:?}");
    Ok(hash)
}

/// A network group NIC as the seed and the domain carry it.
struct GroupNic {
    mac: &'static str,
    ip: &'static str,
    prefix: u8,
    mtu: u16,
}

/// The seed's fixed size (the agent's `net::seed::SEED_SIZE`): a rewrite in
/// place never changes what QEMU sees.
const SEED_SIZE: u64 = 2 << 20;

/// A hand-made domain with an access NIC and a seed disk, its run directory
/// and the namespace its tap is moved into; all removed on drop.
struct NetVm {
    name: String,
    dir: PathBuf,
    tap: String,
    /// The group NIC's tap name (when the domain has one, or one is plugged).
    group_tap: String,
    ns: Netns,
}

impl NetVm {
    fn create(image: &GuestImage) -> anyhow::Result<Self> {
        Self::create_with(image, None)
    }

    fn create_with(image: &GuestImage, group: Option<&GroupNic>) -> anyhow::Result<Self> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let id = format!(
            "{:x}",
            (u128::from(std::process::id()) << 20 ^ nanos) & 0xff_ffff
        );
        let name = format!("gantry-nettest-{id}");
        // QEMU runs as libvirt-qemu: the directory must be traversable (0755).
        let dir = PathBuf::from("/var/tmp").join(&name);
        std::fs::create_dir_all(dir.join("seed/gantry"))?;
        let vm = NetVm {
            name,
            tap: format!("gtt-{id}"),
            group_tap: format!("ggt-{id}"),
            ns: Netns::new("net")?,
            dir,
        };
        std::fs::set_permissions(&vm.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image.disk)
            .arg(vm.dir.join("root.qcow2"))
            .arg("2G"))?;
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(vm.dir.join("data.qcow2"))
            .arg("1G"))?;
        let xml = vm.dir.join("domain.xml");
        let group = group.map(|g| group_interface_xml(g, &vm.group_tap));
        std::fs::write(
            &xml,
            domain_xml(&vm.name, image, &vm.dir, &vm.tap, group.as_deref()),
        )?;
        virsh(&["define", xml.to_str().context("non-UTF-8 path")?])?;
        Ok(vm)
    }

    fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Writes the seed files and (re)builds `seed.iso` atomically.
    fn write_seed(&self, seed: &Seed) -> anyhow::Result<()> {
        self.write_seed_with(seed, None, false)
    }

    /// Writes the seed files (with `gantry/group.env` when `group` is
    /// given) and builds `seed.iso`, padded to [`SEED_SIZE`]: atomically,
    /// or `in_place` over the file QEMU holds open (a running guest).
    fn write_seed_with(
        &self,
        seed: &Seed,
        group: Option<&GroupNic>,
        in_place: bool,
    ) -> anyhow::Result<()> {
        let s = self.dir.join("seed");
        let group_env = s.join("gantry/group.env");
        match group {
            Some(g) => std::fs::write(
                &group_env,
                format!(
                    "GROUP_MAC={}\nGROUP_IP={}\nGROUP_PREFIX={}\nGROUP_MTU={}\n",
                    g.mac, g.ip, g.prefix, g.mtu
                ),
            )?,
            None => {
                let _ = std::fs::remove_file(&group_env);
            }
        }
        std::fs::write(
            s.join("meta-data"),
            format!("instance-id: {}\nlocal-hostname: {HOSTNAME}\n", self.name),
        )?;
        std::fs::write(s.join("user-data"), "#cloud-config\n")?;
        std::fs::write(s.join("network-config"), "version: 2\n")?;
        std::fs::write(s.join("gantry/format"), "1\n")?;
        std::fs::write(
            s.join("gantry/guest.env"),
            format!("HOSTNAME={HOSTNAME}\nMAC={MAC}\nADDRESS={GUEST_IP}\nPREFIX=24\nGATEWAY={GATEWAY}\nDNS=\"1.1.1.1 8.8.8.8\"\n"),
        )?;
        std::fs::write(
            s.join("gantry/root-password-hash"),
            format!("{}\n", sha512_crypt(&seed.password)?),
        )?;
        let keys: String = seed
            .authorized_keys
            .iter()
            .map(|k| format!("{k}\n"))
            .collect();
        std::fs::write(s.join("gantry/authorized_keys"), keys)?;
        std::fs::write(s.join("gantry/jupyter-token"), format!("{}\n", seed.token))?;
        let tmp = self.dir.join("seed.iso.tmp");
        run(Command::new("genisoimage")
            .args(["-quiet", "-V", "cidata", "-J", "-r", "-o"])
            .arg(&tmp)
            .arg(&s))?;
        let mut image = std::fs::read(&tmp)?;
        ensure!(
            image.len() as u64 <= SEED_SIZE,
            "the seed grew past {SEED_SIZE}"
        );
        image.resize(SEED_SIZE as usize, 0);
        let iso = self.dir.join("seed.iso");
        if in_place {
            let mut f = std::fs::OpenOptions::new().write(true).open(&iso)?;
            f.write_all(&image)?;
            f.sync_all()?;
            std::fs::remove_file(&tmp)?;
        } else {
            std::fs::write(&tmp, &image)?;
            std::fs::rename(&tmp, iso)?;
        }
        Ok(())
    }

    /// Runs `cmd` in the guest (exec channel); its output.
    fn exec(&self, cmd: &str) -> anyhow::Result<String> {
        let out = exec_in_guest(&self.dir.join("exec.sock"), cmd, IO_TIMEOUT)?;
        ensure!(
            out.status == 0,
            "{cmd:?} exited {}: {}",
            out.status,
            out.output
        );
        Ok(out.output)
    }

    /// `NAME MTU inet ADDR/PREFIX` of the guest's NIC with `mac` (empty
    /// when there is none; no `inet` while it has no address).
    fn guest_nic(&self, mac: &str) -> anyhow::Result<String> {
        self.exec(&format!(
            "for n in /sys/class/net/*; do [ \"$(cat $n/address)\" = {mac} ] || continue; \
             i=${{n##*/}}; echo $i $(cat $n/mtu) $(ip addr show dev $i | grep -o 'inet [0-9./]*'); done"
        ))
        .map(|s| s.trim().to_string())
    }

    /// Waits (up to `timeout`) until [`NetVm::guest_nic`] says `want`;
    /// how long it took.
    fn wait_guest_nic(&self, mac: &str, want: &str, timeout: Duration) -> anyhow::Result<Duration> {
        let t = Instant::now();
        loop {
            let got = self.guest_nic(mac)?;
            if got == want {
                return Ok(t.elapsed());
            }
            ensure!(
                t.elapsed() < timeout,
                "after {timeout:?} the guest's NIC {mac} is {got:?}, not {want:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Starts the domain, moves its tap into our namespace (where it gets
    /// the gateway address) and waits for the `boot`-th boot marker.
    fn start(&self, boot: usize) -> anyhow::Result<Duration> {
        let t = Instant::now();
        virsh(&["start", &self.name])?;
        run(Command::new("ip").args(["link", "set", "dev", &self.tap, "netns", &self.ns.name]))?;
        self.ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{GATEWAY}/24"),
            "dev",
            &self.tap,
        ])?;
        self.ns
            .run(&["ip", "link", "set", "dev", &self.tap, "up"])?;
        wait_for_marker_count(&self.console_log(), boot, BOOT_TIMEOUT)?;
        Ok(t.elapsed())
    }

    /// ACPI shutdown; waits until libvirt reports the domain shut off.
    fn shutdown(&self) -> anyhow::Result<()> {
        virsh(&["shutdown", &self.name])?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while virsh(&["domstate", &self.name])?.trim() != "shut off" {
            ensure!(Instant::now() < deadline, "{} did not shut off", self.name);
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// `e` followed by the console tail and the guest's service logs.
    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        anyhow::anyhow!("{e:#}\n{}", self.diagnostics())
    }

    fn diagnostics(&self) -> String {
        let console = std::fs::read(self.console_log()).unwrap_or_default();
        let console = String::from_utf8_lossy(&console);
        let lines: Vec<&str> = console.lines().collect();
        let guest = exec_in_guest(
            &self.dir.join("exec.sock"),
            "ip addr; tail -n 20 /var/log/dropbear.log /var/log/gantry-guest-web.log",
            Duration::from_secs(20),
        )
        .map(|o| o.output)
        .unwrap_or_else(|e| format!("(exec failed: {e:#})"));
        format!(
            "console.log (tail):\n{}\nin the guest:\n{guest}",
            lines[lines.len().saturating_sub(25)..].join("\n")
        )
    }
}

impl Drop for NetVm {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
        // A tap still in the root namespace (start failed half-way) goes with QEMU.
        let _ = std::fs::remove_dir_all(&self.dir);
        // self.ns is deleted after this, by its own Drop.
    }
}

/// A group NIC's `<interface>`, as the agent writes it in a named data-plane
/// namespace (`type='ethernet'`, the MTU for the tap and virtio-net).
fn group_interface_xml(g: &GroupNic, tap: &str) -> String {
    format!(
        "<interface type='ethernet'><mac address='{}'/><target dev='{tap}' managed='yes'/>\
         <model type='virtio'/><mtu size='{}'/></interface>\n",
        g.mac, g.mtu
    )
}

/// guest_rig.rs's layout (the agent's) plus disk serials, the seed disk, the
/// NIC and the group NIC when given.
fn domain_xml(
    name: &str,
    image: &GuestImage,
    dir: &Path,
    tap: &str,
    group: Option<&str>,
) -> String {
    let group = group.unwrap_or("");
    let domain_type = std::env::var("GANTRY_DOMAIN_TYPE").unwrap_or_else(|_| "qemu".into());
    let (d, k, i, c) = (
        dir.display(),
        image.kernel.display(),
        image.initrd.display(),
        &image.cmdline,
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
    <cmdline>{c}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{d}/root.qcow2'/><target dev='vda' bus='virtio'/><serial>root</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{d}/data.qcow2'/><target dev='vdb' bus='virtio'/><serial>data</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/><source file='{d}/seed.iso'/><target dev='vdz' bus='virtio'/><serial>cidata</serial><readonly/>
    </disk>
    <interface type='ethernet'>
      <mac address='{MAC}'/><target dev='{tap}' managed='yes'/><model type='virtio'/>
    </interface>
    {group}
    <serial type='unix'>
      <source mode='bind' path='{d}/console.sock'/><log file='{d}/console.log' append='on'/><target port='0'/>
    </serial>
    <serial type='unix'><source mode='bind' path='{d}/exec.sock'/><target port='1'/></serial>
    <console type='unix'><source mode='bind' path='{d}/console.sock'/><target type='serial' port='0'/></console>
  </devices>
</domain>
"#
    )
}

/// Status line and body of `GET path` on the guest's 8888 (from `ns`).
fn http_get(ns: &Netns, path: &str) -> anyhow::Result<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {GUEST_IP}:8888\r\nConnection: close\r\n\r\n");
    let resp = ns.enter(move || -> anyhow::Result<String> {
        let mut s = TcpStream::connect((GUEST_IP, 8888))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.write_all(req.as_bytes())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf)
    })??;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad response {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// One masked client frame (RFC 6455 §5.2), FIN set.
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x17, 0xc3, 0x08];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one unmasked server frame: (opcode, payload).
fn ws_read(r: &mut impl Read) -> anyhow::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    ensure!(h[1] & 0x80 == 0, "the server masked its frame");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            usize::from(u16::from_be_bytes(b))
        }
        127 => bail!("unexpectedly large frame"),
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok((h[0] & 0x0f, payload))
}

/// Handshake on /api/echo, a text and a binary message echoed, then close.
fn websocket_echo(ns: &Netns, token: &str) -> anyhow::Result<()> {
    let req = format!(
        "GET /api/echo?token={token} HTTP/1.1\r\nHost: {GUEST_IP}:8888\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    ns.enter(move || -> anyhow::Result<()> {
        let mut s = TcpStream::connect((GUEST_IP, 8888))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.write_all(req.as_bytes())?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            ensure!(
                r.read_line(&mut head)? > 0,
                "connection closed in the handshake: {head:?}"
            );
        }
        ensure!(head.starts_with("HTTP/1.1 101 "), "no upgrade: {head:?}");
        ensure!(
            head.contains(&format!("Sec-WebSocket-Accept: {WS_ACCEPT}\r\n")),
            "bad accept: {head:?}"
        );
        let binary: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        for (op, payload) in [(0x1, b"hello gantry".to_vec()), (0x2, binary)] {
            s.write_all(&ws_frame(op, &payload))?;
            ensure!(
                ws_read(&mut r)? == (op, payload),
                "echo differs (opcode {op})"
            );
        }
        s.write_all(&ws_frame(0x8, &1000u16.to_be_bytes()))?;
        ensure!(ws_read(&mut r)?.0 == 0x8, "no close frame back");
        Ok(())
    })?
}

/// TCP 7000 reports our address and echoes; UDP 7001 answers with the peer.
fn echo_services(ns: &Netns) -> anyhow::Result<()> {
    ns.enter(|| -> anyhow::Result<()> {
        let s = TcpStream::connect((GUEST_IP, 7000))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        r.read_line(&mut line)?;
        ensure!(
            line == format!("peer {GATEWAY}:{}\n", s.local_addr()?.port()),
            "tcp 7000 said {line:?}"
        );
        (&s).write_all(b"echo me")?;
        let mut back = [0u8; 7];
        r.read_exact(&mut back)?;
        ensure!(&back == b"echo me", "tcp echo gave {back:?}");

        let u = UdpSocket::bind((GATEWAY, 0))?;
        u.set_read_timeout(Some(Duration::from_secs(2)))?;
        let want = format!("peer {GATEWAY}:{} ping", u.local_addr()?.port());
        let mut buf = [0u8; 512];
        for _ in 0..10 {
            u.send_to(b"ping", (GUEST_IP, 7001))?;
            if let Ok((n, _)) = u.recv_from(&mut buf) {
                let got = String::from_utf8_lossy(&buf[..n]).into_owned();
                ensure!(got == want, "udp 7001 said {got:?}");
                return Ok(());
            }
        }
        bail!("no answer from udp 7001")
    })?
}

/// First boot: everything from the seed works, wrong credentials do not.
fn check_first_boot(vm: &NetVm, seed: &Seed, key: &Path) -> anyhow::Result<()> {
    let target = SshTarget::root(Some(&vm.ns), GUEST_IP, 22);
    let t = Instant::now();
    let out = ssh::run(
        &target,
        &SshAuth::Password(seed.password.clone()),
        "cat /etc/hostname; grep -c ' /datadrive ext4 ' /proc/mounts",
    )?;
    ensure!(
        out == format!("{HOSTNAME}\n1\n"),
        "ssh with the password printed {out:?}"
    );
    eprintln!(
        "first ssh (password, host key generated): {:?}",
        t.elapsed()
    );
    let out = ssh::run(&target, &SshAuth::Key(key.to_path_buf()), "hostname")?;
    ensure!(
        out == format!("{HOSTNAME}\n"),
        "ssh with the key printed {out:?}"
    );
    let wrong = ssh::output(
        &target,
        &SshAuth::Password("not-the-password".into()),
        "true",
    )?;
    ensure!(
        wrong.auth_refused(),
        "a wrong password was not refused: {wrong:?}"
    );

    let (status, body) = http_get(&vm.ns, &format!("/lab?token={}", seed.token))?;
    ensure!(
        status == 200 && body.contains(&format!("JupyterLab stand-in on {HOSTNAME}")),
        "GET /lab?token: {status} {body:?}"
    );
    let (status, _) = http_get(&vm.ns, "/lab")?;
    ensure!(status == 403, "GET /lab without a token: {status}");
    websocket_echo(&vm.ns, &seed.token)?;
    echo_services(&vm.ns)
}

/// After the seed was regenerated: only the new credentials work.
fn check_second_boot(vm: &NetVm, old: &Seed, new: &Seed, key: &Path) -> anyhow::Result<()> {
    let target = SshTarget::root(Some(&vm.ns), GUEST_IP, 22);
    let out = ssh::run(
        &target,
        &SshAuth::Password(new.password.clone()),
        "cat /etc/hostname",
    )?;
    ensure!(
        out == format!("{HOSTNAME}\n"),
        "ssh with the new password printed {out:?}"
    );
    let old_pw = ssh::output(&target, &SshAuth::Password(old.password.clone()), "true")?;
    ensure!(
        old_pw.auth_refused(),
        "the old password still works: {old_pw:?}"
    );
    let old_key = ssh::output(&target, &SshAuth::Key(key.to_path_buf()), "true")?;
    ensure!(
        old_key.auth_refused(),
        "authorized_keys was not replaced: {old_key:?}"
    );
    let (status, _) = http_get(&vm.ns, &format!("/lab?token={}", new.token))?;
    ensure!(status == 200, "GET /lab with the new token: {status}");
    let (status, _) = http_get(&vm.ns, &format!("/lab?token={}", old.token))?;
    ensure!(status == 403, "GET /lab with the old token: {status}");
    Ok(())
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn seed_gives_ssh_web_and_echo_and_is_reapplied_at_boot() -> anyhow::Result<()> {
    require_rig("guest_net");
    ensure!(
        netns::available(),
        "guest_net needs root (network namespaces, libvirt)"
    );
    let image = guest_image()?;
    let keys = tempfile::tempdir()?;
    let (key, public) = ssh::keygen(keys.path(), "id_ed25519")?;
    let first = Seed {
        password: "first-Pa55word".into(),
        authorized_keys: vec![public],
        token: "0123456789abcdef0123456789abcdef".into(),
    };
    let vm = NetVm::create(&image)?;
    vm.write_seed(&first)?;
    let took = vm.start(1)?;
    eprintln!("start to boot marker (seed applied): {took:?}");
    check_first_boot(&vm, &first, &key).map_err(|e| vm.explain(e))?;

    // "Reset password at next boot": a new seed while the instance is stopped.
    vm.shutdown()?;
    let second = Seed {
        password: "second-Pa55word".into(),
        authorized_keys: vec![],
        token: "fedcba9876543210fedcba9876543210".into(),
    };
    vm.write_seed(&second)?;
    let took = vm.start(2)?;
    eprintln!("start to second boot marker: {took:?}");
    check_second_boot(&vm, &first, &second, &key).map_err(|e| vm.explain(e))?;
    Ok(())
}

/// The group NIC at boot, unplugged live, and another hot-plugged later.
#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn group_nic_from_the_seed_and_hot_plugged() -> anyhow::Result<()> {
    require_rig("guest_net");
    ensure!(
        netns::available(),
        "guest_net needs root (network namespaces, libvirt)"
    );
    let image = guest_image()?;
    let seed = Seed {
        password: "group-Pa55word".into(),
        authorized_keys: vec![],
        token: "0123456789abcdef0123456789abcdef".into(),
    };
    let first = GroupNic {
        mac: "52:54:01:10:00:02",
        ip: "172.16.0.2",
        prefix: 24,
        mtu: 1400,
    };
    let vm = NetVm::create_with(&image, Some(&first))?;
    vm.write_seed_with(&seed, Some(&first), false)?;
    vm.start(1)?;
    let check = || -> anyhow::Result<()> {
        // At boot: eth1, the seed's MTU and address.
        let got = vm.guest_nic(first.mac)?;
        ensure!(
            got == "eth1 1400 inet 172.16.0.2/24",
            "the group NIC at boot: {got:?}"
        );
        // libvirt gave the tap the MTU too; a full-size unfragmentable
        // ping crosses (IPv4 20 + ICMP 8 + 1372 = 1400).
        let tap = &vm.group_tap;
        run(Command::new("ip").args(["link", "set", "dev", tap, "netns", &vm.ns.name]))?;
        vm.ns
            .run(&["ip", "addr", "add", "172.16.0.1/24", "dev", tap])?;
        vm.ns.run(&["ip", "link", "set", "dev", tap, "up"])?;
        let mtu = vm.ns.run(&["cat", &format!("/sys/class/net/{tap}/mtu")])?;
        ensure!(mtu.trim() == "1400", "the group tap's MTU is {mtu:?}");
        vm.ns.run(&[
            "ping", "-c", "3", "-W", "5", "-M", "do", "-s", "1372", first.ip,
        ])?;

        // Leave while running: the seed loses group.env. A guest whose NIC
        // stays (an unplug it ignored) drops the address at its next look
        // at the seed (every 10 s); then the NIC is unplugged.
        vm.write_seed_with(&seed, None, true)?;
        let took = vm.wait_guest_nic(first.mac, "eth1 1400", Duration::from_secs(30))?;
        eprintln!("group address removed from a NIC that stayed after {took:?}");
        let dev = vm.dir.join("group-nic.xml");
        std::fs::write(&dev, group_interface_xml(&first, tap))?;
        let path = dev.to_str().context("non-UTF-8 path")?;
        virsh(&["detach-device", &vm.name, path, "--live", "--config"])?;
        let took = vm.wait_guest_nic(first.mac, "", Duration::from_secs(30))?;
        eprintln!("group NIC unplugged from the guest after {took:?}");

        // Join another group while running: the seed first, then the NIC.
        let second = GroupNic {
            mac: "52:54:01:10:00:05",
            ip: "172.16.0.5",
            prefix: 24,
            mtu: 1450,
        };
        vm.write_seed_with(&seed, Some(&second), true)?;
        std::fs::write(&dev, group_interface_xml(&second, &format!("{tap}b")))?;
        let t = Instant::now();
        virsh(&["attach-device", &vm.name, path, "--live", "--config"])?;
        let plugged = t.elapsed();
        vm.wait_guest_nic(
            second.mac,
            "eth1 1450 inet 172.16.0.5/24",
            Duration::from_secs(30),
        )?;
        eprintln!(
            "group NIC hot-plugged: attach {plugged:?}, configured in the guest after {:?}",
            t.elapsed()
        );
        let inactive = virsh(&["dumpxml", "--inactive", &vm.name])?;
        ensure!(
            inactive.contains(second.mac) && !inactive.contains(first.mac),
            "the definition did not follow: {inactive}"
        );
        Ok(())
    };
    check().map_err(|e| vm.explain(e))
}
