//! Network namespaces: [`Namespace`] opens `/run/netns/NAME` (or any
//! namespace file) once, proves it can be entered on a probe thread, and
//! gives the runtime a thread-start hook that moves every worker and
//! blocking thread into it, so listeners and upstream sockets all live
//! there.

use crate::error::ProxyError;
use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// An opened network namespace.
#[derive(Debug, Clone)]
pub(crate) struct Namespace {
    file: Arc<File>,
    path: PathBuf,
    /// Set when a runtime thread failed to enter the namespace; sockets are
    /// then refused rather than opened in the wrong namespace.
    failed: Arc<AtomicBool>,
}

impl Namespace {
    /// Opens `path` and enters it once on a probe thread.
    pub(crate) fn open(path: &Path) -> Result<Self, ProxyError> {
        let err = |reason: String| ProxyError::Netns {
            path: path.to_owned(),
            reason,
        };
        let file = Arc::new(File::open(path).map_err(|e| err(e.to_string()))?);
        let probe = Arc::clone(&file);
        std::thread::Builder::new()
            .name("gantry-proxy-netns-probe".to_owned())
            .spawn(move || setns(&*probe, CloneFlags::CLONE_NEWNET))
            .map_err(|e| err(format!("cannot start the probe thread: {e}")))?
            .join()
            .map_err(|_| err("the probe thread panicked".to_owned()))?
            .map_err(|e| err(format!("setns: {e}")))?;
        Ok(Self {
            file,
            path: path.to_owned(),
            failed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The hook for `tokio::runtime::Builder::on_thread_start`.
    pub(crate) fn thread_start_hook(&self) -> impl Fn() + Send + Sync + 'static {
        let ns = self.clone();
        move || {
            if let Err(e) = setns(&*ns.file, CloneFlags::CLONE_NEWNET) {
                ns.failed.store(true, Ordering::SeqCst);
                tracing::error!(path = %ns.path.display(), error = %e, "a proxy thread cannot enter the network namespace");
            }
        }
    }

    /// An error if any runtime thread failed to enter the namespace.
    pub(crate) fn check(&self) -> Result<(), ProxyError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(ProxyError::Netns {
                path: self.path.clone(),
                reason: "a runtime thread could not enter it".to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_an_error() {
        let err = Namespace::open(Path::new("/run/netns/gantry-proxy-no-such-ns")).unwrap_err();
        assert!(matches!(err, ProxyError::Netns { .. }), "{err}");
    }

    #[test]
    fn a_file_that_is_no_namespace_is_an_error() {
        let err = Namespace::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(err.to_string().contains("setns"), "{err}");
    }
}
