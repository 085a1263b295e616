//! The real-guest fixture: a `gantry-agent` process on a private state
//! directory ([`TestAgent`]) and test VMs it runs ([`TestVm`]), with
//! `exec_in_guest` over the guest's exec channel. Everything is cleaned up
//! on drop, panics included: domains destroyed and undefined, state removed.
//!
//! Real-VM tests take a process-wide lock so that only one set of guests
//! runs at a time (TCG on two cores).

use crate::guest::{self, ExecOutput};
use anyhow::{bail, Context};
use gantry_proto::api::error::ErrorBody;
use gantry_proto::api::local::{
    ActionRequest, ImageInfo, ImportImage, InstanceInfo, OperationInfo, OperationState,
};
use gantry_proto::spec::{InstanceSpec, VolumeSpec};
use gantry_proto::{ImageId, InstanceId};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static VM_LOCK: Mutex<()> = Mutex::new(());

/// Boot, stop and operation timeouts under TCG.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
pub const OP_TIMEOUT: Duration = Duration::from_secs(180);
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// Fails the calling test with a sentence unless the real-VM rig is
/// configured (`LIBVIRT_DEFAULT_URI` and `GANTRY_GUEST_DIR`). Tests that
/// call it are `#[ignore = "needs the VM rig: ./scripts/test runs it"]`,
/// so a plain `cargo test` reports them as ignored, never as passed.
pub fn require_rig(test: &str) {
    let missing: Vec<&str> = ["LIBVIRT_DEFAULT_URI", "GANTRY_GUEST_DIR"]
        .into_iter()
        .filter(|v| std::env::var_os(v).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "{test}: needs the real-VM rig ({} unset): run ./scripts/test, or scripts/setup-host and \
         scripts/build-guest, then source .cache/env/*.env",
        missing.join(", ")
    );
}

/// [`require_rig`] for callers written as `if !rig_available(..) { return }`:
/// it never answers `false`, it fails the test instead.
pub fn rig_available(test: &str) -> bool {
    require_rig(test);
    true
}

/// Path of a workspace binary, next to the test executable's directory.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!(
        "GANTRY_{}_BIN",
        name.to_uppercase().replace('-', "_")
    )) {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from target/<profile>/deps, binaries from target/<profile>.
    let mut dir = exe.parent().expect("the executable's directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    dir.join(name)
}

/// A `gantry-agent serve` process with its own state directory.
pub struct TestAgent {
    pub state_dir: PathBuf,
    pub config: PathBuf,
    pub url: String,
    token: String,
    child: Option<Child>,
    http: reqwest::blocking::Client,
    /// Extra environment of the agent process (from the next spawn on).
    pub env: Vec<(String, String)>,
    /// None for a second agent of the same test ([`TestAgent::start_another`]).
    _lock: Option<MutexGuard<'static, ()>>,
}

impl TestAgent {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with("")
    }

    /// Starts an agent with extra TOML lines in its config.
    pub fn start_with(extra_config: &str) -> anyhow::Result<Self> {
        let lock = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        Self::launch(extra_config, Some(lock))
    }

    /// A second agent (another host) for a test that already holds the VM
    /// lock through its first [`TestAgent`]: its own state directory, API
    /// port and config.
    pub fn start_another(first: &TestAgent, extra_config: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            first._lock.is_some(),
            "start the first agent with start_with"
        );
        Self::launch(extra_config, None)
    }

    fn launch(extra_config: &str, lock: Option<MutexGuard<'static, ()>>) -> anyhow::Result<Self> {
        // Not a 0700 tempdir: QEMU runs as its own user and must traverse it.
        let state_dir = PathBuf::from(format!(
            "/var/tmp/gantry-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&state_dir)?;
        let config = state_dir.with_extension("toml");
        let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into());
        let dtype = std::env::var("GANTRY_DOMAIN_TYPE").unwrap_or_else(|_| "qemu".into());
        // No GPUs unless the test configures them (a `[gpu]` table).
        let no_gpus = if extra_config.contains("[gpu]") {
            ""
        } else {
            "gpu.source = \"none\"\n"
        };
        std::fs::write(
            &config,
            format!(
                "state_dir = {:?}\nlibvirt_uri = {uri:?}\ndomain_type = {dtype:?}\nlisten = \"127.0.0.1:0\"\nstop_timeout_secs = 30\nreserved_memory_mib = 256\n{no_gpus}{extra_config}\n",
                state_dir.display().to_string()
            ),
        )?;
        let mut agent = TestAgent {
            state_dir,
            config,
            url: String::new(),
            token: String::new(),
            child: None,
            // The agent closes a connection idle for 10 s
            // (`serve::HEADER_TIMEOUT`): a pooled one is dropped well
            // before, so a GET never races the agent's close.
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .pool_idle_timeout(Duration::from_secs(3))
                .build()?,
            env: Vec::new(),
            _lock: lock,
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts the agent process and waits until its API answers.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(workspace_bin("gantry-agent"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("GANTRY_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let (child, addr) = spawn_daemon(cmd, &self.state_dir, "gantry-agent")?;
        self.child = Some(child);
        self.url = format!("http://{addr}");
        self.token = std::fs::read_to_string(self.state_dir.join("agent-token"))?
            .trim()
            .to_string();
        Ok(())
    }

    /// SIGKILLs the agent (VMs keep running under libvirt).
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }

    /// Waits up to `timeout` for the agent to exit by itself; its exit
    /// status, or `None` while it still runs (or none was started).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, timeout)
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.state_dir)
    }

    fn call(
        &self,
        req: reqwest::blocking::RequestBuilder,
    ) -> Result<serde_json::Value, ApiFailure> {
        send(req, &self.token).map(|(_, v)| v)
    }

    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ApiFailure> {
        let v = self.call(self.http.get(format!("{}{path}", self.url)))?;
        Ok(serde_json::from_value(v).expect("response shape"))
    }

    pub fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiFailure> {
        let v = self.call(self.http.post(format!("{}{path}", self.url)).json(body))?;
        Ok(serde_json::from_value(v).expect("response shape"))
    }

    /// A plain-text GET without a token (`/healthz`, `/metrics`).
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}{path}", self.url))
            .send()?
            .error_for_status()?
            .text()?)
    }

    /// A raw request, for testing authentication.
    pub fn get_with_token(&self, path: &str, token: &str) -> u16 {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(token)
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Imports the rig's test guest image.
    pub fn import_guest_image(&self) -> anyhow::Result<ImageInfo> {
        let g = guest::guest_image()?;
        let req = ImportImage {
            id: None,
            name: "test-guest".into(),
            disk: g.disk.display().to_string(),
            kernel: Some(g.kernel.display().to_string()),
            initrd: Some(g.initrd.display().to_string()),
            cmdline: Some(g.cmdline.clone()),
        };
        Ok(self.post("/v1/images", &req)?)
    }

    /// Waits for an operation to end; returns it (failed ones too).
    pub fn wait_op(&self, op: OperationInfo) -> anyhow::Result<OperationInfo> {
        let start = Instant::now();
        let mut cur = op;
        while cur.state == OperationState::Running {
            if start.elapsed() > OP_TIMEOUT {
                bail!(
                    "operation {} ({}) still running after {OP_TIMEOUT:?}",
                    cur.id,
                    cur.kind
                );
            }
            std::thread::sleep(Duration::from_millis(100));
            cur = self.get(&format!("/v1/operations/{}", cur.id))?;
        }
        Ok(cur)
    }

    /// Runs an action to its end; an operation failure is an error.
    pub fn act(&self, id: InstanceId, req: ActionRequest) -> anyhow::Result<InstanceInfo> {
        let op: OperationInfo = self.post(&format!("/v1/instances/{id}/actions"), &req)?;
        let done = self.wait_op(op)?;
        if done.state == OperationState::Failed {
            bail!("{} failed: {}", done.kind, done.error.unwrap_or_default());
        }
        Ok(self.instance(id)?)
    }

    pub fn instance(&self, id: InstanceId) -> Result<InstanceInfo, ApiFailure> {
        self.get(&format!("/v1/instances/{id}"))
    }

    /// Every domain name in libvirt that belongs to this agent's instances.
    /// The libvirt domains of this agent's instances, whatever its
    /// `domain_prefix` (every domain name ends with its instance's id).
    fn own_domains(&self) -> Vec<String> {
        let ids: Vec<String> = std::fs::read_dir(self.state_dir.join("instances"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let all = virsh(&["list", "--all", "--name"]).unwrap_or_default();
        all.lines()
            .map(str::trim)
            .filter(|d| ids.iter().any(|id| d.ends_with(&format!("-{id}"))))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        terminate(&mut self.child);
        for d in self.own_domains() {
            let _ = virsh(&["destroy", &d]);
            let _ = virsh(&["undefine", &d]);
        }
        if std::env::var_os("GANTRY_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
            let _ = std::fs::remove_file(&self.config);
            let _ = std::fs::remove_file(self.state_dir.with_extension("log"));
        }
    }
}

/// Starts a daemon that writes `<state_dir>/listen-addr` once it listens,
/// logging to `<state_dir>.log`; returns it and the address it bound.
pub fn spawn_daemon(
    mut cmd: Command,
    state_dir: &Path,
    what: &str,
) -> anyhow::Result<(Child, String)> {
    let addr_file = state_dir.join("listen-addr");
    let _ = std::fs::remove_file(&addr_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.with_extension("log"))?;
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawn {what} (is it built? cargo build --workspace --bins)"))?;
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().ok().flatten() {
            bail!(
                "{what} exited at start ({st}); log:\n{}",
                log_tail(state_dir)
            );
        }
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            return Ok((child, a.trim().to_string()));
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            bail!("{what} did not start; log:\n{}", log_tail(state_dir));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last 40 lines of a daemon's log (`<state_dir>.log`).
pub fn log_tail(state_dir: &Path) -> String {
    let text = std::fs::read_to_string(state_dir.with_extension("log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// SIGKILLs a daemon.
pub fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits up to `timeout` for a daemon to exit by itself (it is then
/// forgotten); `None` while it still runs.
pub fn wait_exit(child: &mut Option<Child>, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        let st = child.as_mut()?.try_wait().ok().flatten();
        if st.is_some() {
            *child = None;
            return st;
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERMs a daemon and waits for it.
pub fn terminate(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = c.wait();
    }
}

/// Sends `req` with a bearer token; a 2xx answer gives its status and
/// JSON body (null when empty), anything else the API's error sentence.
pub fn send(
    req: reqwest::blocking::RequestBuilder,
    token: &str,
) -> Result<(u16, serde_json::Value), ApiFailure> {
    let resp = req.bearer_auth(token).send().map_err(|e| ApiFailure {
        status: 0,
        error: e.to_string(),
        field: None,
    })?;
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    if !(200..300).contains(&status) {
        let body: ErrorBody = serde_json::from_str(&text).unwrap_or(ErrorBody {
            error: text,
            field: None,
        });
        return Err(ApiFailure {
            status,
            error: body.error,
            field: body.field,
        });
    }
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    ))
}

/// An API error as a user sees it.
#[derive(Debug, Clone)]
pub struct ApiFailure {
    pub status: u16,
    pub error: String,
    pub field: Option<String>,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.error)
    }
}

impl std::error::Error for ApiFailure {}

/// Runs `virsh` against the rig's libvirt.
pub fn virsh(args: &[&str]) -> anyhow::Result<String> {
    let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into());
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rand_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}", t.as_nanos() & 0xffff_ffff)
}

/// What a test VM is made of.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub root_disk_gib: u64,
    pub volume: Option<VolumeSpec>,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            name: "test-vm".into(),
            vcpus: 1,
            memory_mib: 256,
            root_disk_gib: 1,
            volume: None,
        }
    }
}

/// A booted test VM; released through the agent on drop.
pub struct TestVm<'a> {
    pub agent: &'a TestAgent,
    pub id: InstanceId,
    pub console_log: PathBuf,
    pub exec_socket: PathBuf,
    boots: usize,
    /// Released through the agent's local API on drop (not when a
    /// controller owns the instance).
    release_on_drop: bool,
}

impl<'a> TestVm<'a> {
    pub fn spec(image: ImageId, opts: &VmOptions) -> InstanceSpec {
        InstanceSpec {
            id: InstanceId::new(),
            name: opts.name.clone(),
            vcpus: opts.vcpus,
            memory_mib: opts.memory_mib,
            root_disk_gib: opts.root_disk_gib,
            image,
            data_volume: opts.volume,
            gpus: vec![],
            nic: None,
            guest: None,
        }
    }

    /// Creates the instance and waits for its first boot marker.
    pub fn boot(agent: &'a TestAgent, image: ImageId, opts: &VmOptions) -> anyhow::Result<Self> {
        let spec = Self::spec(image, opts);
        let op: OperationInfo = agent.post("/v1/instances", &spec)?;
        let done = agent.wait_op(op)?;
        if done.state == OperationState::Failed {
            bail!("create failed: {}", done.error.unwrap_or_default());
        }
        let mut vm = Self::attach(agent, spec.id)?;
        vm.boots = 1;
        vm.wait_boot(1)?;
        Ok(vm)
    }

    /// A handle on an instance a controller owns: the test drives it
    /// through the controller, and dropping the handle leaves it alone.
    pub fn observe(agent: &'a TestAgent, id: InstanceId) -> anyhow::Result<Self> {
        let mut vm = Self::attach(agent, id)?;
        vm.release_on_drop = false;
        Ok(vm)
    }

    /// A handle on an existing instance (e.g. after an agent restart).
    pub fn attach(agent: &'a TestAgent, id: InstanceId) -> anyhow::Result<Self> {
        let info = agent.instance(id)?;
        let console_log = PathBuf::from(&info.console_log);
        let exec_socket = Path::new(&info.console_socket).with_file_name("exec.sock");
        let boots = guest::count_markers(&console_log);
        Ok(TestVm {
            agent,
            id,
            console_log,
            exec_socket,
            boots,
            release_on_drop: true,
        })
    }

    fn wait_boot(&self, n: usize) -> anyhow::Result<()> {
        guest::wait_for_marker_count(&self.console_log, n, BOOT_TIMEOUT)
    }

    /// Waits until the guest has booted at least once.
    pub fn wait_first_boot(&mut self) -> anyhow::Result<()> {
        if self.boots == 0 {
            self.wait_next_boot()?;
        }
        Ok(())
    }

    /// Waits for the next boot marker (after start, reboot or reset).
    pub fn wait_next_boot(&mut self) -> anyhow::Result<()> {
        self.boots += 1;
        self.wait_boot(self.boots)
    }

    pub fn exec(&self, cmd: &str) -> anyhow::Result<ExecOutput> {
        guest::exec_in_guest(&self.exec_socket, cmd, EXEC_TIMEOUT)
    }

    /// Runs a command that must succeed; returns its trimmed output.
    pub fn sh(&self, cmd: &str) -> anyhow::Result<String> {
        let out = self.exec(cmd)?;
        if out.status != 0 {
            bail!("`{cmd}` exited {}: {}", out.status, out.output);
        }
        Ok(out.output.trim().to_string())
    }

    pub fn act(&self, req: ActionRequest) -> anyhow::Result<InstanceInfo> {
        self.agent.act(self.id, req)
    }

    pub fn info(&self) -> anyhow::Result<InstanceInfo> {
        Ok(self.agent.instance(self.id)?)
    }
}

impl Drop for TestVm<'_> {
    fn drop(&mut self) {
        if !self.release_on_drop {
            return;
        }
        if let Ok(info) = self.agent.instance(self.id) {
            if !info.state.is_final() {
                let _ = self.agent.act(
                    self.id,
                    ActionRequest::Release {
                        delete_data_volume: true,
                    },
                );
            }
        }
    }
}
