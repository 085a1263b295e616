//! Time from `gantryctl instance create` to a working SSH login on the
//! test guest (scripts/bench-access): a real controller and agent (`Cloud`,
//! the data plane in a namespace), N creates one after another; for each,
//! the time until the controller says Running and until `ssh -p <port>
//! root@<address> true` with the initial password succeeds from the
//! client namespace. Prints JSON. Usage: `gantry-bench-ssh [N]`.

use anyhow::Context;
use gantry_tests::cloud::{Cloud, UPLINK};
use gantry_tests::controller::Database;
use gantry_tests::fixture::workspace_bin;
use gantry_tests::ssh::{self, SshAuth, SshTarget};
use std::time::{Duration, Instant};

fn gantryctl(cloud: &Cloud, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(workspace_bin("gantryctl"))
        .arg("--json")
        .args(args)
        .env("GANTRY_URL", &cloud.ctl.url)
        .env("GANTRY_TOKEN", &cloud.tenant_token)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "gantryctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Whether the SSH server answers on the forward with its banner.
fn banner(cloud: &Cloud, port: u16) -> bool {
    let to: std::net::SocketAddr = format!("{UPLINK}:{port}").parse().expect("address");
    cloud
        .client_ns
        .enter(move || -> std::io::Result<bool> {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_millis(300))?;
            s.set_read_timeout(Some(Duration::from_millis(1000)))?;
            let mut b = [0u8; 7];
            s.read_exact(&mut b)?;
            Ok(&b == b"SSH-2.0")
        })
        .ok()
        .and_then(Result::ok)
        .unwrap_or(false)
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map_or(Ok(5), |a| a.parse())?;
    let cloud = Cloud::start(&Database::Sqlite)?;
    let (mut running, mut login) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t0 = Instant::now();
        let created = gantryctl(
            &cloud,
            &[
                "instance",
                "create",
                "--name",
                &format!("bench-{i}"),
                "--flavor",
                &cloud.flavor,
                "--image",
                &cloud.image,
            ],
        )?;
        let id = created["id"].as_str().context("id")?.to_string();
        cloud.wait_state(&id, "Running")?;
        running.push(t0.elapsed().as_secs_f64());
        let acc = cloud.tenant.get(&format!("/v1/instances/{id}/access"))?;
        let port = acc["forwards"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["guest_port"] == 22))
            .and_then(|f| f["host_port"].as_u64())
            .context("ssh forward")? as u16;
        let pw = cloud.tenant.get(&format!("/v1/instances/{id}/password"))?;
        let auth = SshAuth::Password(pw["password"].as_str().context("password")?.into());
        let target = SshTarget::root(Some(&cloud.client_ns), UPLINK, port);
        loop {
            // Wait for dropbear's banner with short timeouts (a guest not
            // up yet is an ARP timeout, seconds, for a plain connect).
            if banner(&cloud, port) && ssh::run(&target, &auth, "true").is_ok() {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(180),
                "no SSH login in 180 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        login.push(t0.elapsed().as_secs_f64());
        cloud.act(&id, "release")?;
        cloud.wait_state(&id, "Released")?;
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        serde_json::json!({"min": v[0], "median": v[v.len() / 2], "max": v[v.len() - 1], "all": v})
    };
    let out = serde_json::json!({
        "runs": n,
        "create_to_running_s": stats(&mut running),
        "create_to_ssh_login_s": stats(&mut login),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
