//! Access end to end, through a real controller, a real agent (its data
//! plane in a network namespace the test made, see `Cloud`) and real TCG
//! guests: SSH with the initial password and with the account's key;
//! JupyterLab over HTTPS (by name and by port, the chain verified against
//! the controller's CA) and a WebSocket through the proxy; custom TCP and
//! UDP forwards added, edited and deleted with `gantryctl`; forwards after
//! the agent is killed and restarted and after a stop and start; the
//! client's real address seen by the guest; guests kept off the host's
//! services, denied networks and other accounts' guests, spoofing dropped;
//! a password reset at the next boot; a clone from a snapshot with its own
//! password; release frees the ports. One guest (and a second account's)
//! serve every assertion, to keep the suite short under TCG.

use anyhow::{bail, ensure, Context};
use gantry_proto::InstanceId;
use gantry_tests::cloud::{Cloud, CLIENT, DENIED, DOMAIN_SUFFIX, UPLINK};
use gantry_tests::controller::Database;
use gantry_tests::fixture::{require_rig, workspace_bin, TestVm, OP_TIMEOUT};
use gantry_tests::https;
use gantry_tests::netns::Netns;
use gantry_tests::ssh::{self, SshAuth, SshTarget};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(3);

/// Runs `gantryctl` as the tenant; its stdout, or an error with stderr.
fn gantryctl(cloud: &Cloud, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(workspace_bin("gantryctl"))
        .args(args)
        .env("GANTRY_URL", &cloud.ctl.url)
        .env("GANTRY_TOKEN", &cloud.tenant_token)
        .output()?;
    if !out.status.success() {
        bail!(
            "gantryctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn access(cloud: &Cloud, id: &str) -> anyhow::Result<Value> {
    Ok(cloud.tenant.get(&format!("/v1/instances/{id}/access"))?)
}

fn password(cloud: &Cloud, id: &str) -> anyhow::Result<String> {
    let v = cloud.tenant.get(&format!("/v1/instances/{id}/password"))?;
    Ok(v["password"].as_str().context("password")?.to_string())
}

/// The host port of the instance's forward of `guest_port`/`protocol`.
fn host_port(acc: &Value, guest_port: u16, protocol: &str) -> anyhow::Result<u16> {
    acc["forwards"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|f| f["guest_port"] == guest_port && f["protocol"] == protocol)
        })
        .and_then(|f| f["host_port"].as_u64())
        .map(|p| p as u16)
        .with_context(|| format!("no {protocol} forward of {guest_port} in {acc}"))
}

fn tcp_line(ns: &Netns, to: SocketAddr) -> std::io::Result<String> {
    ns.enter(move || {
        let s = TcpStream::connect_timeout(&to, T)?;
        s.set_read_timeout(Some(T))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim().to_string())
    })
    .map_err(std::io::Error::other)?
}

fn udp_ask(ns: &Netns, to: SocketAddr, payload: &str) -> std::io::Result<String> {
    let payload = payload.to_string();
    ns.enter(move || {
        let u = UdpSocket::bind("0.0.0.0:0")?;
        u.set_read_timeout(Some(T))?;
        u.send_to(payload.as_bytes(), to)?;
        let mut buf = [0u8; 1500];
        let n = u.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .map_err(std::io::Error::other)?
}

/// What the guest's echo services report, without the client's port:
/// `peer 10.79.0.2:41000 hi` -> `peer 10.79.0.2 hi`.
fn peer(line: &str) -> String {
    let mut w: Vec<String> = line.split(' ').map(str::to_string).collect();
    if let Some(a) = w.get_mut(1) {
        if let Some((ip, _)) = a.rsplit_once(':') {
            *a = ip.to_string();
        }
    }
    w.join(" ")
}

fn addr(port: u16) -> SocketAddr {
    format!("{UPLINK}:{port}").parse().expect("address")
}

/// What one instance offers, read from its Access view.
struct Reach {
    id: String,
    ssh_port: u16,
    password: String,
    private_ip: String,
}

impl Reach {
    /// `ssh -p <port> root@<host address>`, from the client namespace.
    fn ssh<'a>(&self, cloud: &'a Cloud) -> SshTarget<'a> {
        SshTarget::root(Some(&cloud.client_ns), UPLINK, self.ssh_port)
    }
}

fn reach(cloud: &Cloud, id: &str) -> anyhow::Result<Reach> {
    let acc = access(cloud, id)?;
    let port = host_port(&acc, 22, "tcp")?;
    assert_eq!(
        acc["ssh_command"].as_str(),
        Some(format!("ssh -p {port} root@{UPLINK}").as_str()),
        "{acc}"
    );
    assert_eq!(acc["password_set"], true, "{acc}");
    Ok(Reach {
        id: id.to_string(),
        ssh_port: port,
        password: password(cloud, id)?,
        private_ip: acc["private_ip"]
            .as_str()
            .context("private_ip")?
            .to_string(),
    })
}

fn boot(cloud: &Cloud, name: &str, image_or_snapshot: (&str, &str)) -> anyhow::Result<String> {
    let id = cloud.create(json!({
        "name": name, "flavor": cloud.flavor, image_or_snapshot.0: image_or_snapshot.1,
    }))?;
    cloud.wait_state(&id, "Running")?;
    let mut vm = TestVm::observe(&cloud.agent, id.parse::<InstanceId>()?)?;
    vm.wait_first_boot()
        .with_context(|| format!("{name}'s first boot"))?;
    Ok(id)
}

#[test]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
fn access_end_to_end_through_controller_agent_and_guest() -> anyhow::Result<()> {
    require_rig("access_end_to_end");
    let mut cloud = Cloud::start(&Database::Sqlite)?;
    let r = whole_access(&mut cloud);
    if r.is_err() {
        eprintln!("--- agent log ---\n{}", cloud.agent.log_tail());
        eprintln!("--- controller log ---\n{}", cloud.ctl.log_tail());
    }
    r
}

fn whole_access(cloud: &mut Cloud) -> anyhow::Result<()> {
    let keys = tempfile::tempdir()?;
    let (key, public) = ssh::keygen(keys.path(), "laptop")?;
    std::fs::write(keys.path().join("laptop.pub"), format!("{public}\n"))?;
    gantryctl(
        cloud,
        &[
            "ssh-key",
            "add",
            "--name",
            "laptop",
            "--file",
            &keys.path().join("laptop.pub").display().to_string(),
        ],
    )?;
    let ca = cloud.tenant.get_text("/v1/ca.pem")?;
    ensure!(ca.contains("BEGIN CERTIFICATE"), "{ca}");

    let id = boot(cloud, "web", ("image", &cloud.image))?;
    let web = reach(cloud, &id)?;
    ssh_logins(cloud, &web, &key)?;
    jupyter_over_https(cloud, &id, &ca)?;
    operator_certificate_without_restart(cloud, &id, &ca)?;
    custom_forwards(cloud, &id, &ca)?;
    isolation(cloud, &web)?;
    survives_agent_restart_and_stop_start(cloud, &web, &ca)?;
    let new_password = password_reset_at_next_boot(cloud, &web)?;
    clone_has_its_own_password(cloud, &id, &new_password)?;
    // Release frees the ports.
    cloud.act(&id, "release")?;
    cloud.wait_state(&id, "Released")?;
    let port = web.ssh_port;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tcp_line(&cloud.client_ns, addr(port)).is_ok() {
        ensure!(
            Instant::now() < deadline,
            "port {port} still answers after release"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

fn ssh_logins(cloud: &Cloud, web: &Reach, key: &std::path::Path) -> anyhow::Result<()> {
    let pw = SshAuth::Password(web.password.clone());
    let t = web.ssh(cloud);
    ssh::wait_ready(&t, &pw, Duration::from_secs(60))?;
    assert_eq!(ssh::run(&t, &pw, "cat /etc/hostname")?.trim(), "web");
    // The guest sees the client's own address.
    let who = ssh::run(&t, &pw, "echo $SSH_CLIENT")?;
    assert!(who.starts_with(&format!("{CLIENT} ")), "SSH_CLIENT={who}");
    assert_eq!(
        ssh::run(&t, &SshAuth::Key(key.into()), "echo key works")?.trim(),
        "key works"
    );
    // On the host itself, over loopback.
    let local = SshTarget::root(Some(&cloud.host_ns), "127.0.0.1", web.ssh_port);
    assert_eq!(ssh::run(&local, &pw, "echo loopback")?.trim(), "loopback");
    let wrong = ssh::output(&t, &SshAuth::Password("not-the-password".into()), "true")?;
    assert!(
        wrong.auth_refused(),
        "a wrong password was not refused: {wrong:?}"
    );
    Ok(())
}

fn jupyter_over_https(cloud: &Cloud, id: &str, ca: &str) -> anyhow::Result<()> {
    let acc = access(cloud, id)?;
    let url = acc["jupyter_url"]
        .as_str()
        .context("jupyter_url")?
        .to_string();
    let name = format!("8888-{id}.e2e-host.{DOMAIN_SUFFIX}");
    assert!(
        url.starts_with(&format!("https://{name}/lab?token=")),
        "{url}"
    );
    let token = url.rsplit_once("token=").context("token")?.1.to_string();
    let https_port = addr(443);
    let (status, body) = https::get(&cloud.client_ns, &url, ca, https_port)?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("JupyterLab stand-in on web"), "{body}");
    // The host's name and the client's address reach the guest.
    let (_, headers) = https::get(
        &cloud.client_ns,
        &format!("https://{name}/api/headers?token={token}"),
        ca,
        https_port,
    )?;
    assert!(headers.contains(&format!("host: {name}")), "{headers}");
    assert!(
        headers.contains(&format!("x-forwarded-for: {CLIENT}")),
        "{headers}"
    );
    // Without wildcard DNS: the same proxy on the forward's own port.
    let port = host_port(&acc, 8888, "tcp")?;
    let by_port = format!("https://{UPLINK}:{port}/lab?token={token}");
    let (status, body) = https::get(&cloud.client_ns, &by_port, ca, addr(port))?;
    assert_eq!(status, 200, "{body}");
    let (status, _) = https::get(
        &cloud.client_ns,
        &format!("https://{UPLINK}:{port}/lab"),
        ca,
        addr(port),
    )?;
    assert_eq!(status, 403, "the guest's own token check answers");
    // A WebSocket through the proxy, idle for a while in between.
    let echoed = https::websocket_echo(
        &cloud.client_ns,
        &name,
        https_port,
        &format!("/api/echo?token={token}"),
        ca,
        &["hello kernel", "still here"],
        Duration::from_secs(3),
    )?;
    assert_eq!(echoed, ["hello kernel", "still here"]);
    Ok(())
}

/// An operator's certificate replaces the CA's on the running proxy (no
/// restart), and going back works the same way.
fn operator_certificate_without_restart(cloud: &Cloud, id: &str, ca: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().display();
    let script = format!(
        "set -e; cd {d}; o='-pkeyopt ec_paramgen_curve:prime256v1 -nodes'; \
         openssl req -x509 -newkey ec $o -keyout ca.key -out ca.pem -days 2 -subj /CN=operator-ca 2>/dev/null; \
         openssl req -newkey ec $o -keyout leaf.key -out leaf.csr -subj /CN=e2e-host 2>/dev/null; \
         printf 'subjectAltName=IP:{UPLINK},DNS:*.e2e-host.{DOMAIN_SUFFIX}\\n' > ext; \
         openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
           -extfile ext -out leaf.pem 2>/dev/null"
    );
    let st = std::process::Command::new("sh")
        .args(["-c", &script])
        .status()?;
    ensure!(st.success(), "openssl failed");
    let op_ca = std::fs::read_to_string(dir.path().join("ca.pem"))?;
    let port = host_port(&access(cloud, id)?, 8888, "tcp")?;
    let url = format!("https://{UPLINK}:{port}/lab");
    let path = format!("/v1/admin/hosts/{}/certificate", cloud.host);
    cloud.admin.put(
        &path,
        &json!({
            "cert_chain_pem": std::fs::read_to_string(dir.path().join("leaf.pem"))?,
            "key_pem": std::fs::read_to_string(dir.path().join("leaf.key"))?,
        }),
    )?;
    // The proxy presents it within a work poll; the controller's CA no
    // longer verifies it.
    wait_until("the operator's certificate", || {
        https::get(&cloud.client_ns, &url, &op_ca, addr(port)).is_ok_and(|(s, _)| s == 403)
    })?;
    assert!(https::get(&cloud.client_ns, &url, ca, addr(port)).is_err());
    cloud.admin.delete(&path)?;
    wait_until("the CA's certificate again", || {
        https::get(&cloud.client_ns, &url, ca, addr(port)).is_ok_and(|(s, _)| s == 403)
    })?;
    Ok(())
}

/// Adds TCP and UDP forwards with gantryctl, edits one, deletes both; an
/// open UDP flow stops with the delete.
fn custom_forwards(cloud: &Cloud, id: &str, ca: &str) -> anyhow::Result<()> {
    let tcp: Value = serde_json::from_str(&gantryctl(
        cloud,
        &[
            "--json",
            "forward",
            "add",
            id,
            "--guest-port",
            "7000",
            "--label",
            "echo",
        ],
    )?)?;
    let udp: Value = serde_json::from_str(&gantryctl(
        cloud,
        &[
            "--json",
            "forward",
            "add",
            id,
            "--guest-port",
            "7001",
            "--protocol",
            "udp",
        ],
    )?)?;
    let tport = tcp["host_port"].as_u64().context("tcp host port")? as u16;
    let uport = udp["host_port"].as_u64().context("udp host port")? as u16;
    let listed = gantryctl(cloud, &["forward", "list", id])?;
    assert!(
        listed.contains("echo") && listed.contains(&uport.to_string()),
        "{listed}"
    );
    // The forwards reach the guest (the agent applies them within a poll).
    let deadline = Instant::now() + Duration::from_secs(30);
    let greeting = loop {
        match tcp_line(&cloud.client_ns, addr(tport)) {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => bail!("TCP forward {tport} never answered: {e}"),
        }
    };
    assert_eq!(peer(&greeting), format!("peer {CLIENT}"));
    let mut hi = String::new();
    wait_until("the UDP forward", || {
        udp_ask(&cloud.client_ns, addr(uport), "hi").is_ok_and(|r| {
            hi = r;
            true
        })
    })?;
    assert_eq!(peer(&hi), format!("peer {CLIENT} hi"));
    // An open UDP flow: one socket, one 5-tuple, kept across the delete.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (back, answers) = std::sync::mpsc::channel::<std::io::Result<String>>();
    let to = addr(uport);
    cloud.client_ns.spawn(move || {
        let u = UdpSocket::bind("0.0.0.0:0").expect("udp socket");
        u.set_read_timeout(Some(T)).ok();
        u.connect(to).expect("connect");
        for () in rx {
            let _ = u.send(b"flow");
            let mut buf = [0u8; 512];
            let r = u
                .recv(&mut buf)
                .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = back.send(r);
        }
    })?;
    tx.send(())?;
    assert_eq!(
        peer(&answers.recv()?.context("open UDP flow")?),
        format!("peer {CLIENT} flow")
    );
    // Edit: served over HTTPS now, by the proxy (the echo service speaks
    // no HTTP, so the proxy answers 502), then back to the kernel.
    let fid = tcp["id"].as_str().context("forward id")?;
    gantryctl(
        cloud,
        &[
            "forward", "edit", id, fid, "--https", "true", "--label", "echo-tls",
        ],
    )?;
    let url = format!("https://{UPLINK}:{tport}/");
    wait_until("the edited forward to be served over HTTPS", || {
        https::get(&cloud.client_ns, &url, ca, addr(tport)).is_ok_and(|(s, _)| s == 502)
    })?;
    let listed = gantryctl(cloud, &["forward", "list", id])?;
    assert!(listed.contains("echo-tls"), "{listed}");
    gantryctl(cloud, &["forward", "edit", id, fid, "--https", "false"])?;
    wait_until("the edited forward back in the kernel", || {
        tcp_line(&cloud.client_ns, addr(tport)).is_ok_and(|l| peer(&l) == format!("peer {CLIENT}"))
    })?;
    // UDP first: once the later TCP delete shows, the UDP one is applied.
    let uid = udp["id"].as_str().context("udp id")?;
    gantryctl(cloud, &["forward", "delete", id, uid])?;
    gantryctl(cloud, &["forward", "delete", id, fid])?;
    wait_until("the deleted TCP forward to refuse", || {
        tcp_line(&cloud.client_ns, addr(tport)).is_err()
    })?;
    tx.send(())?;
    assert!(
        answers.recv()?.is_err(),
        "the open UDP flow outlived its forward"
    );
    Ok(())
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

/// From inside the guest: `nc` to `ip port`; true when it connected.
fn guest_reaches(vm: &TestVm, ip: &str, port: u16) -> anyhow::Result<bool> {
    let out = vm.exec(&format!("echo | nc -w 3 {ip} {port} >/dev/null 2>&1"))?;
    Ok(out.status == 0)
}

fn isolation(cloud: &Cloud, web: &Reach) -> anyhow::Result<()> {
    let vm = TestVm::observe(&cloud.agent, web.id.parse()?)?;
    // A service on the host's own addresses (where an agent API would be)
    // and two outside: the controller (denied) and a neighbour.
    let token = tempfile::NamedTempFile::new()?;
    std::fs::write(token.path(), "00")?;
    for (ns, bind) in [
        (&cloud.host_ns, "0.0.0.0"),
        (&cloud.client_ns, DENIED),
        (&cloud.client_ns, CLIENT),
    ] {
        let cfg = gantry_guest_web::Config {
            bind: bind.parse()?,
            http_port: 0,
            tcp_echo_port: 7000,
            udp_echo_port: 0,
            token_file: token.path().into(),
            hostname: Some("outside".into()),
        };
        ns.spawn(move || {
            if let Ok(r) = gantry_guest_web::start(&cfg) {
                r.wait();
            }
        })?;
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        peer(&tcp_line(&cloud.client_ns, addr(7000))?),
        format!("peer {CLIENT}"),
        "the host service answers the outside"
    );
    let gw = web
        .private_ip
        .rsplit_once('.')
        .map(|(n, _)| format!("{n}.1"))
        .context("gateway")?;
    assert!(
        !guest_reaches(&vm, &gw, 7000)?,
        "a guest reached a host service on the gateway"
    );
    assert!(
        !guest_reaches(&vm, UPLINK, 7000)?,
        "a guest reached a host service on the uplink"
    );
    assert!(
        !guest_reaches(&vm, DENIED, 7000)?,
        "a guest reached the denied controller address"
    );
    assert!(
        guest_reaches(&vm, CLIENT, 7000)?,
        "a guest could not reach the outside"
    );
    // A second account's guest: not directly, only through its public ports.
    let other = second_account_guest(cloud)?;
    let other_acc = cloud.admin.get(&format!("/v1/instances/{other}/access"))?;
    let other_ip = other_acc["private_ip"].as_str().context("private_ip")?;
    assert!(
        !guest_reaches(&vm, other_ip, 22)?,
        "a guest reached another account's guest"
    );
    let other_ssh = host_port(&other_acc, 22, "tcp")?;
    let banner = vm.sh(&format!("echo | nc -w 3 {UPLINK} {other_ssh} | head -c 7"))?;
    assert_eq!(banner, "SSH-2.0", "the public forward of the other guest");
    // Spoofed source addresses and MACs are dropped.
    let spoof = web
        .private_ip
        .rsplit_once('.')
        .map(|(n, _)| format!("{n}.250"))
        .context("spoof")?;
    assert_eq!(
        vm.exec(&format!("ping -c1 -W2 {gw} >/dev/null"))?.status,
        0,
        "the gateway answers pings"
    );
    vm.sh(&format!("ip addr add {spoof}/32 dev eth0"))?;
    let spoofed = vm.exec(&format!("ping -c1 -W2 -I {spoof} {gw} >/dev/null"))?;
    vm.sh(&format!("ip addr del {spoof}/32 dev eth0"))?;
    assert_ne!(spoofed.status, 0, "a spoofed source address got through");
    let mac = vm.sh("cat /sys/class/net/eth0/address")?;
    vm.sh(
        "ip link set eth0 down; ip link set eth0 address 52:54:00:de:ad:01; ip link set eth0 up",
    )?;
    let spoofed_mac = vm.exec(&format!("ping -c1 -W2 {gw} >/dev/null"))?;
    vm.sh(&format!("ip link set eth0 down; ip link set eth0 address {mac}; ip link set eth0 up; ip route add default via {gw} 2>/dev/null; true"))?;
    assert_ne!(spoofed_mac.status, 0, "a spoofed MAC got through");
    assert_eq!(
        vm.exec(&format!("ping -c1 -W2 {gw} >/dev/null"))?.status,
        0,
        "back to normal"
    );
    let v = cloud.admin.post(
        &format!("/v1/instances/{other}/actions"),
        &json!({"action": "release"}),
    )?;
    cloud
        .admin
        .wait_op(v["operation"].as_str().context("operation")?, OP_TIMEOUT)?;
    Ok(())
}

fn second_account_guest(cloud: &Cloud) -> anyhow::Result<String> {
    let acct = cloud.admin.post(
        "/v1/admin/accounts",
        &json!({"name": "rival", "billing_profile_complete": true}),
    )?;
    let acct = acct["id"].as_str().context("account")?;
    cloud.admin.post(
        &format!("/v1/admin/accounts/{acct}/credits"),
        &json!({"amount_micros": 1_000_000_000_000i64, "note": "e2e"}),
    )?;
    let v = cloud.admin.post(
        "/v1/instances",
        &json!({"name": "rival", "flavor": cloud.flavor, "image": cloud.image, "account": acct}),
    )?;
    cloud
        .admin
        .wait_op(v["operation"].as_str().context("operation")?, OP_TIMEOUT)?;
    let id = v["id"].as_str().context("id")?.to_string();
    let mut vm = TestVm::observe(&cloud.agent, id.parse()?)?;
    vm.wait_first_boot()?;
    Ok(id)
}

fn survives_agent_restart_and_stop_start(
    cloud: &mut Cloud,
    web: &Reach,
    ca: &str,
) -> anyhow::Result<()> {
    let pw = SshAuth::Password(web.password.clone());
    let jupyter = access(cloud, &web.id)?["jupyter_url"]
        .as_str()
        .context("jupyter_url")?
        .to_string();
    // The kernel keeps forwarding while the agent is down ...
    cloud.agent.kill9();
    assert_eq!(ssh::run(&web.ssh(cloud), &pw, "echo up")?.trim(), "up");
    cloud.agent.spawn()?;
    let cloud: &Cloud = cloud;
    // ... and the HTTPS front comes back with its routes and certificate.
    wait_until("HTTPS after the agent restart", || {
        https::get(&cloud.client_ns, &jupyter, ca, addr(443)).is_ok_and(|(s, _)| s == 200)
    })?;
    assert_eq!(
        ssh::run(&web.ssh(cloud), &pw, "echo still")?.trim(),
        "still"
    );
    // Stop and start: a new tap, attached again.
    cloud.act(&web.id, "stop")?;
    cloud.wait_state(&web.id, "Stopped")?;
    cloud.act(&web.id, "start")?;
    cloud.wait_state(&web.id, "Running")?;
    let mut vm = TestVm::observe(&cloud.agent, web.id.parse()?)?;
    vm.wait_next_boot()?;
    ssh::wait_ready(&web.ssh(cloud), &pw, Duration::from_secs(60))?;
    wait_until("HTTPS after stop and start", || {
        https::get(&cloud.client_ns, &jupyter, ca, addr(443)).is_ok_and(|(s, _)| s == 200)
    })?;
    Ok(())
}

/// Resets the password: the guest runs no guest agent, so it applies at
/// the next boot. Returns the new password.
fn password_reset_at_next_boot(cloud: &Cloud, web: &Reach) -> anyhow::Result<String> {
    let v = cloud
        .tenant
        .post(&format!("/v1/instances/{}/password", web.id), &json!({}))?;
    let op = cloud.tenant.wait_op(
        v["id"]
            .as_str()
            .or(v["operation"].as_str())
            .context("operation")?,
        OP_TIMEOUT,
    )?;
    let note = op["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("next boot"), "{op}");
    let new = password(cloud, &web.id)?;
    assert_ne!(new, web.password);
    let mut vm = TestVm::observe(&cloud.agent, web.id.parse()?)?;
    cloud.act(&web.id, "reboot")?;
    vm.wait_next_boot()?;
    let new_auth = SshAuth::Password(new.clone());
    ssh::wait_ready(&web.ssh(cloud), &new_auth, Duration::from_secs(60))?;
    let old = ssh::output(
        &web.ssh(cloud),
        &SshAuth::Password(web.password.clone()),
        "true",
    )?;
    assert!(old.auth_refused(), "the old password still works: {old:?}");
    Ok(new)
}

fn clone_has_its_own_password(cloud: &Cloud, id: &str, current: &str) -> anyhow::Result<()> {
    let (sid, _) = cloud.snapshot(id, "with-password")?;
    let clone = boot(cloud, "clone", ("snapshot", &sid))?;
    let c = reach(cloud, &clone)?;
    assert_ne!(c.password, current);
    let t = c.ssh(cloud);
    let mine = SshAuth::Password(c.password.clone());
    ssh::wait_ready(&t, &mine, Duration::from_secs(60))?;
    assert_eq!(ssh::run(&t, &mine, "cat /etc/hostname")?.trim(), "clone");
    let inherited = ssh::output(&t, &SshAuth::Password(current.into()), "true")?;
    assert!(
        inherited.auth_refused(),
        "the clone took the original's password: {inherited:?}"
    );
    cloud.act(&clone, "release")?;
    cloud.wait_state(&clone, "Released")?;
    Ok(())
}
