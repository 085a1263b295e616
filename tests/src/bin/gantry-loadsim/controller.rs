//! The controller under load: a `gantry-controller` child process on an
//! ephemeral port with its own state directory (or a running one given by
//! URL), and the admin setup every run needs: flavors, an image, accounts
//! with credit, tenant tokens.

use crate::api::Api;
use crate::tenant::Tenant;
use anyhow::{bail, Context};
use gantry_proto::api::v1::{AccountInfo, CreatedToken, FlavorInfo, ImageInfo};
use gantry_proto::ids::{FlavorId, ImageId};
use reqwest::Method;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A controller process started by the simulator; stopped on drop.
pub struct Child {
    child: Option<tokio::process::Child>,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub admin_token: String,
}

/// Config of the child: generous rate limit (1,000 hosts share one client
/// address; the limit is per token anyway), heartbeat every `hb_secs`, an
/// access network with a /24 for each of 4,096 hosts (the default /16 has
/// 256: the other hosts could take no instance).
fn config(db_url: Option<&str>, hb_secs: u64, db_connections: Option<u32>) -> String {
    let mut c = format!(
        "rate_limit_per_second = 100000\nrate_limit_burst = 100000\nheartbeat_secs = {hb_secs}\n\
         access_network = \"10.192.0.0/12\"\n"
    );
    if let Some(u) = db_url {
        c.push_str(&format!("database_url = {u:?}\n"));
    }
    if let Some(n) = db_connections {
        c.push_str(&format!("max_db_connections = {n}\n"));
    }
    c
}

impl Child {
    pub async fn start(
        bin: &Path,
        db_url: Option<&str>,
        hb_secs: u64,
        db_connections: Option<u32>,
    ) -> anyhow::Result<Child> {
        let dir = tempfile::Builder::new()
            .prefix("gantry-loadsim-")
            .tempdir()
            .context("create the controller's state dir")?;
        let state = dir.path().join("state");
        let cfg = dir.path().join("controller.toml");
        std::fs::write(&cfg, config(db_url, hb_secs, db_connections))?;
        let log = std::fs::File::create(dir.path().join("controller.log"))?;
        let child = tokio::process::Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .arg("--config")
            .arg(&cfg)
            .env_remove("GANTRY_ADMIN_TOKEN")
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut me = Child {
            child: Some(child),
            dir,
            url: String::new(),
            admin_token: String::new(),
        };
        let addr = me.wait_for(&state.join("listen-addr")).await?;
        me.url = format!("http://{}", addr.trim());
        me.admin_token = std::fs::read_to_string(state.join("admin-token"))
            .context("read the controller's admin token")?
            .trim()
            .to_string();
        Ok(me)
    }

    async fn wait_for(&mut self, file: &Path) -> anyhow::Result<String> {
        for _ in 0..600 {
            if let Ok(s) = std::fs::read_to_string(file) {
                if !s.trim().is_empty() {
                    return Ok(s);
                }
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "gantry-controller exited at start ({st}); log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "gantry-controller did not write {} within 60 s; log:\n{}",
            file.display(),
            self.log_tail()
        )
    }

    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Copies the controller's log out of the state dir (removed on exit)
    /// and returns where it is now.
    pub fn save_log(&self) -> Option<PathBuf> {
        let to = std::env::temp_dir().join(format!(
            "gantry-loadsim-controller-{}.log",
            chrono::Utc::now().format("%Y%m%dT%H%M%S")
        ));
        std::fs::copy(self.dir.path().join("controller.log"), &to).ok()?;
        Some(to)
    }

    /// SIGTERM, then waits (up to 10 s) for a clean exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(Duration::from_secs(10), c.wait()).await {
            Ok(Ok(st)) if st.success() => Ok(()),
            Ok(Ok(st)) => bail!("gantry-controller exited with {st}"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let _ = c.kill().await;
                bail!("gantry-controller did not stop within 10 s of SIGTERM")
            }
        }
    }
}

/// The default controller binary: next to this one.
pub fn default_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("gantry-controller")))
        .unwrap_or_else(|| PathBuf::from("gantry-controller"))
}

/// What setup made.
pub struct Setup {
    pub cpu_flavor: FlavorInfo,
    pub gpu_flavor: FlavorInfo,
    pub image: ImageId,
    pub tenants: Vec<Tenant>,
}

/// Credit each tenant account starts with (a million units).
pub const INITIAL_CREDIT: i64 = 1_000_000_000_000;

pub async fn setup(api: &Api, admin: &str, tenants: usize) -> anyhow::Result<Setup> {
    let t = Duration::from_secs(30);
    let post = |what: &'static str, path: &'static str, body: serde_json::Value| {
        let api = api.clone();
        async move {
            api.call::<_, serde_json::Value>(what, Method::POST, path, admin, Some(&body), t)
                .await
                .map_err(|e| anyhow::anyhow!("{what}: {e}"))
        }
    };
    let suffix = chrono::Utc::now().timestamp_millis();
    // Prices that do not divide an hour evenly, so rounding shows.
    let cpu: FlavorInfo = serde_json::from_value(
        post(
            "admin: flavor",
            "/v1/admin/flavors",
            json!({
                "name": format!("sim-cpu4-{suffix}"), "vcpus": 4, "memory_mib": 8192,
                "root_disk_gib": 50, "price_micros_per_hour": 250_000,
            }),
        )
        .await?,
    )?;
    let gpu: FlavorInfo = serde_json::from_value(
        post(
            "admin: flavor",
            "/v1/admin/flavors",
            json!({
                "name": format!("sim-h100x1-{suffix}"), "vcpus": 16, "memory_mib": 131072,
                "root_disk_gib": 200, "gpu_model": crate::host::GPU_MODEL, "gpu_count": 1,
                "price_micros_per_hour": 2_490_001,
            }),
        )
        .await?,
    )?;
    let image: ImageInfo = serde_json::from_value(
        post(
            "admin: image",
            "/v1/admin/images",
            json!({
                "name": format!("sim-image-{suffix}"), "size_gib": 10,
                "origin": {"from": "file", "disk": "/srv/gantry/images/sim.qcow2"},
            }),
        )
        .await?,
    )?;
    let mut out = Vec::new();
    for index in 0..tenants {
        let acct: AccountInfo = serde_json::from_value(post("admin: account", "/v1/admin/accounts", json!({
            "name": format!("sim-tenant-{index}-{suffix}"), "billing_profile_complete": true,
        })).await?)?;
        let path = format!("/v1/admin/accounts/{}/credits", acct.id);
        let body = json!({"amount_micros": INITIAL_CREDIT, "note": "gantry-loadsim"});
        let after: AccountInfo = api
            .call("admin: credit", Method::POST, &path, admin, Some(&body), t)
            .await
            .map_err(|e| anyhow::anyhow!("add credit: {e}"))?;
        let tok: CreatedToken = serde_json::from_value(
            post(
                "admin: token",
                "/v1/admin/tokens",
                json!({
                    "name": format!("sim-tenant-{index}"), "account": acct.id,
                }),
            )
            .await?,
        )?;
        out.push(Tenant {
            index,
            account: acct.id,
            token: tok.token,
            initial_credit: after.credit_micros,
        });
    }
    Ok(Setup {
        cpu_flavor: cpu,
        gpu_flavor: gpu,
        image: image.id,
        tenants: out,
    })
}

/// The flavor's price by id, for the ledger check.
pub fn price_of(s: &Setup, f: FlavorId) -> Option<i64> {
    [&s.cpu_flavor, &s.gpu_flavor]
        .into_iter()
        .find(|x| x.id == f)
        .map(|x| x.price_micros_per_hour)
}
