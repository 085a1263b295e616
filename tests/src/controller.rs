//! A real `gantry-controller` process for end-to-end tests
//! ([`TestController`]): its own state directory, SQLite by default or a
//! fresh PostgreSQL database, the admin token it generated, and a small
//! blocking HTTP client ([`Api`]) that calls it with any token. Killed and
//! cleaned up on drop.

use crate::fixture::{
    kill9, log_tail, send, spawn_daemon, terminate, wait_exit, workspace_bin, ApiFailure,
};
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A `gantry-controller` process.
pub struct TestController {
    pub state_dir: PathBuf,
    pub config: PathBuf,
    pub url: String,
    pub admin_token: String,
    /// The address it listens on; kept across restarts so agents find it.
    listen: String,
    child: Option<Child>,
    /// Extra environment of the controller process (from the next spawn on).
    pub env: Vec<(String, String)>,
}

/// Where the test database lives.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite,
    /// A fresh database on the PostgreSQL server at this URL.
    Postgres(String),
}

impl Database {
    /// PostgreSQL from `GANTRY_TEST_PG_URL`; without it the test fails
    /// with a sentence (tests that call it are `#[ignore = "needs
    /// PostgreSQL: ./scripts/test runs it"]`). Never `None`; the `Option`
    /// stays for existing callers.
    pub fn postgres(test: &str) -> Option<Self> {
        match std::env::var("GANTRY_TEST_PG_URL") {
            Ok(u) if !u.is_empty() => Some(Self::Postgres(u)),
            _ => panic!(
                "{test}: GANTRY_TEST_PG_URL is not set: run ./scripts/test, or \
                 scripts/setup-postgres and source .cache/env/postgres.env"
            ),
        }
    }
}

/// Creates a fresh database next to the one `url` names; returns its URL.
fn fresh_pg_database(url: &str) -> anyhow::Result<String> {
    let name = format!("gantry_e2e_{}_{}", std::process::id(), suffix());
    let out = Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .context("run psql (is PostgreSQL's client installed?)")?;
    if !out.status.success() {
        bail!(
            "cannot create database {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let (base, _) = url.rsplit_once('/').context("database URL has no path")?;
    Ok(format!("{base}/{name}"))
}

fn suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}", t.as_nanos() & 0xff_ffff_ffff)
}

impl TestController {
    /// Starts a controller; `extra_config` is appended to its TOML config.
    pub fn start(db: &Database, extra_config: &str) -> anyhow::Result<Self> {
        let state_dir = PathBuf::from(format!(
            "/var/tmp/gantry-ctl-{}-{}",
            std::process::id(),
            suffix()
        ));
        std::fs::create_dir_all(&state_dir)?;
        let config = state_dir.with_extension("toml");
        let mut text = String::from("rate_limit_per_second = 1000\nrate_limit_burst = 2000\n");
        if let Database::Postgres(url) = db {
            text.push_str(&format!("database_url = {:?}\n", fresh_pg_database(url)?));
        }
        text.push_str(extra_config);
        std::fs::write(&config, text)?;
        let mut ctl = TestController {
            state_dir,
            config,
            url: String::new(),
            admin_token: String::new(),
            listen: "127.0.0.1:0".into(),
            child: None,
            env: Vec::new(),
        };
        ctl.spawn()?;
        Ok(ctl)
    }

    /// Starts the process (again) on the same address and waits until it
    /// listens.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(workspace_bin("gantry-controller"));
        cmd.arg("--listen")
            .arg(&self.listen)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,sqlx=warn")
            .env_remove("GANTRY_ADMIN_TOKEN")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let (child, addr) = spawn_daemon(cmd, &self.state_dir, "gantry-controller")?;
        self.child = Some(child);
        self.url = format!("http://{addr}");
        self.listen = addr;
        self.admin_token = std::fs::read_to_string(self.state_dir.join("admin-token"))
            .context("read the generated admin token")?
            .trim()
            .to_string();
        Ok(())
    }

    /// Another replica on the same database (PostgreSQL): its own state
    /// directory with this one's secret key, CA and admin token, the same
    /// config; a fresh address.
    pub fn replica(&self) -> anyhow::Result<Self> {
        let state_dir = PathBuf::from(format!(
            "/var/tmp/gantry-ctl-{}-{}",
            std::process::id(),
            suffix()
        ));
        std::fs::create_dir_all(&state_dir)?;
        for f in ["secret.key", "ca.pem", "ca-key.pem", "admin-token"] {
            std::fs::copy(self.state_dir.join(f), state_dir.join(f))
                .with_context(|| format!("copy {f} to the replica"))?;
        }
        let config = state_dir.with_extension("toml");
        std::fs::copy(&self.config, &config)?;
        let mut ctl = TestController {
            state_dir,
            config,
            url: String::new(),
            admin_token: String::new(),
            listen: "127.0.0.1:0".into(),
            child: None,
            env: Vec::new(),
        };
        ctl.spawn()?;
        Ok(ctl)
    }

    /// Whether `/metrics` says this controller leads (runs the
    /// background work); `None` when it does not answer.
    pub fn leads(&self) -> Option<bool> {
        let text = self.admin().get_text("/metrics").ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("gantry_controller_leader "))?;
        Some(line.ends_with(" 1"))
    }

    /// SIGKILLs the controller.
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// Waits up to `timeout` for the controller to exit by itself; its
    /// exit status, or `None` while it still runs (or none was started).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, timeout)
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.state_dir)
    }

    /// A client calling with the admin token.
    pub fn admin(&self) -> Api {
        self.with_token(&self.admin_token)
    }

    /// A client calling with `token`.
    pub fn with_token(&self, token: &str) -> Api {
        Api {
            url: self.url.clone(),
            token: token.to_string(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("http client"),
        }
    }
}

impl Drop for TestController {
    fn drop(&mut self) {
        terminate(&mut self.child);
        if std::env::var_os("GANTRY_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
            let _ = std::fs::remove_file(&self.config);
            let _ = std::fs::remove_file(self.state_dir.with_extension("log"));
        }
    }
}

/// A blocking client of the controller's API with one token.
pub struct Api {
    pub url: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Api {
    fn call(
        &self,
        req: reqwest::blocking::RequestBuilder,
    ) -> Result<(u16, serde_json::Value), ApiFailure> {
        send(req, &self.token)
    }

    pub fn get(&self, path: &str) -> Result<serde_json::Value, ApiFailure> {
        Ok(self.call(self.http.get(format!("{}{path}", self.url)))?.1)
    }

    pub fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ApiFailure> {
        Ok(self
            .call(self.http.post(format!("{}{path}", self.url)).json(body))?
            .1)
    }

    pub fn put(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ApiFailure> {
        Ok(self
            .call(self.http.put(format!("{}{path}", self.url)).json(body))?
            .1)
    }

    pub fn delete(&self, path: &str) -> Result<serde_json::Value, ApiFailure> {
        Ok(self
            .call(self.http.delete(format!("{}{path}", self.url)))?
            .1)
    }

    /// `GET path` as text (for non-JSON answers such as `/v1/ca.pem`).
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()?;
        let status = resp.status();
        let text = resp.text()?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {text}");
        }
        Ok(text)
    }

    /// The status of a GET (for authorisation checks).
    pub fn status_of_get(&self, path: &str) -> u16 {
        match self.call(self.http.get(format!("{}{path}", self.url))) {
            Ok((s, _)) => s,
            Err(e) => e.status,
        }
    }

    /// The status of a POST (for authorisation checks).
    pub fn status_of_post(&self, path: &str, body: &serde_json::Value) -> u16 {
        match self.call(self.http.post(format!("{}{path}", self.url)).json(body)) {
            Ok((s, _)) => s,
            Err(e) => e.status,
        }
    }

    /// Polls `GET path` until `done` holds of the answer; returns it.
    pub fn wait_for(
        &self,
        path: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let start = Instant::now();
        let mut last = serde_json::Value::Null;
        while start.elapsed() < timeout {
            match self.get(path) {
                Ok(v) if done(&v) => return Ok(v),
                Ok(v) => last = v,
                Err(e) => last = serde_json::json!({ "error": e.to_string() }),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("timed out after {timeout:?} waiting for {what}; last answer of {path}: {last}")
    }

    /// Waits for an operation to end; fails unless it succeeded.
    pub fn wait_op(&self, op: &str, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let v = self.wait_for(
            &format!("/v1/operations/{op}"),
            timeout,
            &format!("operation {op}"),
            |v| matches!(v["state"].as_str(), Some("succeeded" | "failed")),
        )?;
        if v["state"] != "succeeded" {
            bail!("operation {op} failed: {}", v["error"]);
        }
        Ok(v)
    }
}
