//! Network namespaces for tests: the only places (besides loopback) test
//! traffic may go. A [`Netns`] is created with `ip netns add` under a
//! unique name and deleted on drop, with every process still in it killed.
//! [`veth`] joins two of them; [`Netns::cmd`] runs a program inside one and
//! [`Netns::enter`] runs a closure on a thread that joined it, so sockets the
//! closure opens (a tokio runtime built there included) live in it.
//!
//! Needs root (the README's test command runs as root).

use anyhow::{bail, Context};
use std::path::PathBuf;
use std::process::Command;

/// A named network namespace, removed on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

/// Whether this process may create network namespaces (root).
pub fn available() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Netns {
    /// Creates `gt<tag>-<random>` (at most 15 characters, so the name can
    /// also prefix interfaces) with its loopback up.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(available(), "network namespaces need root");
        let tag: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(4)
            .collect();
        let name = format!("gt{tag}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `argv` inside the namespace; its stdout, or an error with stderr.
    pub fn run(&self, argv: &[&str]) -> anyhow::Result<String> {
        let (p, rest) = argv.split_first().context("empty command")?;
        run_ok(self.cmd(p).args(rest))
    }

    /// Runs a shell script inside the namespace.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        self.run(&["sh", "-c", script])
    }

    /// Runs `f` on a new thread that joined the namespace and returns what
    /// it returns; sockets it opens live in the namespace.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let file = std::fs::File::open(self.path())
            .with_context(|| format!("cannot open {}", self.path().display()))?;
        std::thread::spawn(move || -> anyhow::Result<T> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in the namespace panicked"))?
    }

    /// Runs `f` on a new thread that joined the namespace and leaves it
    /// running (a server, say); it ends when the process does, or when `f`
    /// returns.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
        let file = std::fs::File::open(self.path())
            .with_context(|| format!("cannot open {}", self.path().display()))?;
        std::thread::spawn(move || {
            if nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                f();
            }
        });
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(pids) = run_ok(Command::new("ip").args(["netns", "pids", &self.name])) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Joins `a` and `b` with a veth pair: `a_if` in `a` with `a_addr`
/// (CIDR, e.g. `10.99.0.1/30`) and `b_if` in `b` with `b_addr`, both up.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
    b_addr: &str,
) -> anyhow::Result<()> {
    a.run(&[
        "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])?;
    a.run(&["ip", "addr", "add", a_addr, "dev", a_if])?;
    a.run(&["ip", "link", "set", a_if, "up"])?;
    b.run(&["ip", "addr", "add", b_addr, "dev", b_if])?;
    b.run(&["ip", "link", "set", b_if, "up"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs root and network namespaces: ./scripts/test runs it"]
    fn namespaces_are_joined_and_removed() {
        let a = Netns::new("a").unwrap();
        let b = Netns::new("b").unwrap();
        veth(&a, "va", "10.99.0.1/30", &b, "vb", "10.99.0.2/30").unwrap();
        a.run(&["ping", "-c1", "-W2", "10.99.0.2"]).unwrap();
        // A socket opened by a closure in `b` binds b's address.
        let bound = b
            .enter(|| std::net::TcpListener::bind("10.99.0.2:0").map(|l| l.local_addr().is_ok()))
            .unwrap()
            .unwrap();
        assert!(bound);
        // ... which does not exist outside it.
        assert!(std::net::TcpListener::bind("10.99.0.2:0").is_err());
        let path = a.path();
        drop(a);
        assert!(!path.exists(), "the namespace is deleted on drop");
    }
}
