//! SSH into guests from tests, without a TTY: the system `ssh` (OpenSSH
//! client), non-interactive, optionally inside a test's network namespace.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use gantry_tests::ssh::{self, SshAuth, SshTarget};
//! # let ns = gantry_tests::netns::Netns::new("doc")?;
//! let target = SshTarget::root(Some(&ns), "10.200.0.2", 22);
//! let out = ssh::run(&target, &SshAuth::Password("pw".into()), "cat /etc/hostname")?;
//! let refused = ssh::output(&target, &SshAuth::Password("wrong".into()), "true")?;
//! assert!(refused.auth_refused());
//! # Ok(()) }
//! ```
//!
//! Passwords reach `ssh` through `SSH_ASKPASS` (a 0700 script in a 0700
//! temp dir that prints the password, with `SSH_ASKPASS_REQUIRE=force`),
//! never on a command line. Host keys are neither checked nor remembered
//! (`StrictHostKeyChecking=no`, `UserKnownHostsFile=/dev/null`); the user's
//! `~/.ssh/config` and agent are not used. Only send traffic to loopback or
//! to addresses inside namespaces the test created.

use crate::netns::Netns;
use anyhow::{bail, Context};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `ConnectTimeout` passed to ssh.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A whole `ssh` call (connect, auth, command) is killed after this.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Where to connect: `user@host -p port`, from inside `netns` when given.
#[derive(Debug, Clone)]
pub struct SshTarget<'a> {
    pub netns: Option<&'a Netns>,
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl<'a> SshTarget<'a> {
    /// `root@host:port`, from `netns` (or this process's namespace).
    pub fn root(netns: Option<&'a Netns>, host: impl Into<String>, port: u16) -> Self {
        Self {
            netns,
            user: "root".into(),
            host: host.into(),
            port,
        }
    }
}

/// How to log in.
#[derive(Debug, Clone)]
pub enum SshAuth {
    /// Password authentication only.
    Password(String),
    /// Public-key authentication only, with this private key file (0600,
    /// no passphrase; see [`keygen`]).
    Key(PathBuf),
}

/// What one `ssh` call produced.
#[derive(Debug, Clone)]
pub struct SshOutput {
    /// The remote command's exit status; 255 when ssh itself failed.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl SshOutput {
    /// ssh connected but the server refused the credentials.
    pub fn auth_refused(&self) -> bool {
        self.status == 255 && self.stderr.contains("Permission denied")
    }
}

/// Runs `command` on the target; its stdout when it exits 0, otherwise an
/// error with the exit status and stderr (auth failures and connection
/// errors included).
pub fn run(target: &SshTarget, auth: &SshAuth, command: &str) -> anyhow::Result<String> {
    let out = output(target, auth, command)?;
    if out.status != 0 {
        bail!(
            "ssh {}@{} -p {} {command:?} exited {}: {}",
            target.user,
            target.host,
            target.port,
            out.status,
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

/// Runs `command` on the target and returns whatever happened; an error
/// only when ssh could not be started or ran past [`CALL_TIMEOUT`].
pub fn output(target: &SshTarget, auth: &SshAuth, command: &str) -> anyhow::Result<SshOutput> {
    // Holds the askpass script until ssh is done.
    let askpass_dir = tempfile::Builder::new().prefix("gantry-ssh-").tempdir()?;
    let mut cmd = match target.netns {
        Some(ns) => ns.cmd("ssh"),
        None => Command::new("ssh"),
    };
    cmd.args(["-F", "/dev/null", "-T"])
        .args(["-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .args(["-o", "LogLevel=ERROR"])
        .args(["-o", "IdentityAgent=none"])
        .args([
            "-o",
            &format!("ConnectTimeout={}", CONNECT_TIMEOUT.as_secs()),
        ])
        .env_remove("SSH_AUTH_SOCK");
    match auth {
        SshAuth::Password(pw) => {
            let askpass = write_askpass(askpass_dir.path(), pw)?;
            cmd.args(["-o", "PreferredAuthentications=password"])
                .args(["-o", "PubkeyAuthentication=no"])
                .args(["-o", "NumberOfPasswordPrompts=1"])
                .env("SSH_ASKPASS", askpass)
                .env("SSH_ASKPASS_REQUIRE", "force");
        }
        SshAuth::Key(key) => {
            cmd.arg("-i")
                .arg(key)
                .args(["-o", "IdentitiesOnly=yes"])
                .args(["-o", "PreferredAuthentications=publickey"])
                .args(["-o", "PasswordAuthentication=no"])
                .args(["-o", "BatchMode=yes"])
                .env_remove("SSH_ASKPASS")
                .env("SSH_ASKPASS_REQUIRE", "never");
        }
    }
    cmd.arg("-p")
        .arg(target.port.to_string())
        .arg(format!("{}@{}", target.user, target.host))
        .arg("--")
        .arg(command);
    run_with_timeout(&mut cmd, CALL_TIMEOUT)
}

/// Retries `true` over ssh until it succeeds (e.g. while a guest boots);
/// the last failure when `timeout` passes.
pub fn wait_ready(target: &SshTarget, auth: &SshAuth, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match run(target, auth, "true") {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context(format!("ssh not ready within {timeout:?}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Generates an ed25519 key pair without passphrase as `dir/name` and
/// `dir/name.pub`; returns the private key's path and the public key line.
pub fn keygen(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, String)> {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "gantry-test", "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ssh-keygen (apt install openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))?
        .trim()
        .to_string();
    Ok((key, public))
}

/// `dir/askpass` (0700) printing the password kept in `dir/password` (0600).
fn write_askpass(dir: &Path, password: &str) -> anyhow::Result<PathBuf> {
    let pw_file = dir.join("password");
    std::fs::write(&pw_file, format!("{password}\n"))?;
    std::fs::set_permissions(&pw_file, std::fs::Permissions::from_mode(0o600))?;
    let script = dir.join("askpass");
    let pw_path = pw_file.to_str().context("non-UTF-8 temp path")?;
    anyhow::ensure!(!pw_path.contains('\''), "temp path with a quote: {pw_path}");
    std::fs::write(&script, format!("#!/bin/sh\nexec cat '{pw_path}'\n"))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))?;
    Ok(script)
}

/// Runs `cmd` (stdin /dev/null) and collects its output; kills it after `timeout`.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<SshOutput> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?} (apt install openssh-client)"))?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still running after {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(SshOutput {
        status: status.code().unwrap_or(-1),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn askpass_prints_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let script = write_askpass(dir.path(), "it's $secret").unwrap();
        let mode = std::fs::metadata(&script).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let out = Command::new(&script).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $secret\n");
    }

    #[test]
    fn keys_are_generated() {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = keygen(dir.path(), "id_ed25519").unwrap();
        assert!(key.exists());
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
    }

    #[test]
    fn refusals_are_told_apart_from_other_failures() {
        let refused = SshOutput {
            status: 255,
            stdout: String::new(),
            stderr: "root@10.200.0.2: Permission denied (publickey,password).".into(),
        };
        assert!(refused.auth_refused());
        let unreachable = SshOutput {
            status: 255,
            stdout: String::new(),
            stderr: "ssh: connect to host 10.200.0.2 port 22: Connection refused".into(),
        };
        assert!(!unreachable.auth_refused());
    }

    #[test]
    fn slow_commands_are_killed() {
        let err = run_with_timeout(Command::new("sleep").arg("5"), Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains("killed"), "{err}");
        let out = run_with_timeout(
            Command::new("sh").args(["-c", "echo o; echo e >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(
            (out.status, out.stdout.as_str(), out.stderr.as_str()),
            (3, "o\n", "e\n")
        );
    }
}
