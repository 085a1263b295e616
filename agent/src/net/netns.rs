//! The data plane's network namespace: the agent's own (the host's) or a
//! named one (`/run/netns/<name>`) that holds the bridge, the rules and the
//! HTTPS listeners. Commands are run inside it by `setns` between fork and
//! exec; closures by a thread that joined it.

use super::NetError;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

/// Where the data plane lives.
#[derive(Debug, Clone, Default)]
pub struct Netns {
    name: Option<String>,
    file: Option<Arc<File>>,
}

impl Netns {
    /// The host's own namespace.
    pub fn host() -> Self {
        Self::default()
    }

    /// Opens `/run/netns/<name>`; it must exist (the operator, or a test,
    /// created it with `ip netns add`).
    pub fn named(name: &str) -> Result<Self, NetError> {
        let path = PathBuf::from("/run/netns").join(name);
        let file = File::open(&path).map_err(|e| NetError::Netns {
            name: name.to_string(),
            message: format!("cannot open {}: {e}", path.display()),
        })?;
        let me = Self {
            name: Some(name.to_string()),
            file: Some(Arc::new(file)),
        };
        // Entering it once now turns a bad namespace into a start-up error.
        me.run(|| ())?;
        Ok(me)
    }

    /// The namespace's name; `None` for the host's.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Its path, for those who enter it themselves (the HTTPS proxy).
    pub fn path(&self) -> Option<PathBuf> {
        self.name
            .as_ref()
            .map(|n| PathBuf::from("/run/netns").join(n))
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        if let Some(f) = &self.file {
            let f = Arc::clone(f);
            // SAFETY: setns(2) is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(f.as_ref(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
        cmd
    }

    /// Runs `f` inside the namespace (on a thread that joined it), or
    /// right here for the host's.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetError> {
        let Some(file) = self.file.clone() else {
            return Ok(f());
        };
        let name = self.name.clone().unwrap_or_default();
        std::thread::spawn(move || {
            nix::sched::setns(file.as_ref(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map(|()| f())
                .map_err(|e| NetError::Netns {
                    name,
                    message: format!("setns: {e}"),
                })
        })
        .join()
        .map_err(|_| NetError::Netns {
            name: self.name.clone().unwrap_or_default(),
            message: "a thread in the namespace panicked".into(),
        })?
    }
}
