//! [`BucketMounter`], the narrow trait over the host's FUSE S3 filesystem:
//! mount one bucket at a directory, unmount it, say whether it answers.
//! [`S3fs`] is the real one (Debian's `s3fs`); [`FakeMounter`] keeps
//! mounts in memory and fails on request, for the failure-path tests.
//!
//! `s3fs` runs with path-style requests against the connection's `url=`,
//! short `connect_timeout`/`readwrite_timeout` and few `retries` (an
//! endpoint that goes away gives I/O errors in the guest within about
//! [`IO_ERROR_WITHIN_SECS`] seconds, not a hang), `allow_other` and a zero
//! umask (the share's server may act as the guest's users), a short stat
//! cache (objects put by others show up within seconds), and `ro` for a
//! read-only attachment. The key pair is in a 0600 password file the
//! caller writes; it is never on a command line.

use gantry_proto::buckets::BucketMount;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

/// s3fs's request timeouts, seconds (connect, read/write) and retries.
const CONNECT_TIMEOUT_SECS: u32 = 5;
const READWRITE_TIMEOUT_SECS: u32 = 10;
const RETRIES: u32 = 1;
/// About how long one call waits on a dead endpoint before EIO: s3fs may
/// make a few requests for one call (stat, then read), each tried
/// `RETRIES + 1` times with its timeouts (measured: tests/buckets_s3fs.rs).
pub const IO_ERROR_WITHIN_SECS: u32 =
    3 * (CONNECT_TIMEOUT_SECS + READWRITE_TIMEOUT_SECS) * (RETRIES + 1);
/// How long a health look may take before the mount counts as hung.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new mount may take to answer: s3fs checks the bucket after
/// it has daemonized (with its retries).
const MOUNT_TIMEOUT: Duration =
    Duration::from_secs(((CONNECT_TIMEOUT_SECS + 5) * (RETRIES + 1)) as u64);

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("s3fs could not mount bucket {bucket:?}: {message}")]
    Mount { bucket: String, message: String },
    #[error("cannot unmount {path}: {message}")]
    Unmount { path: PathBuf, message: String },
}

/// How a mount answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    NotMounted,
    /// Mounted, but not answering; why.
    Bad(String),
}

pub trait BucketMounter: Send + Sync {
    /// Mounts `m`'s bucket at `at` (an existing empty directory) with the
    /// key pair in `passwd_file`.
    fn mount(&self, m: &BucketMount, passwd_file: &Path, at: &Path) -> Result<(), MountError>;
    /// Unmounts `at` (lazily when busy); not mounted is fine.
    fn unmount(&self, at: &Path) -> Result<(), MountError>;
    /// Whether `at` is mounted and answers.
    fn health(&self, at: &Path) -> Health;
}

/// The real mounter: `s3fs`, `umount`.
pub struct S3fs {
    pub program: PathBuf,
}

impl Default for S3fs {
    fn default() -> Self {
        Self {
            program: PathBuf::from("s3fs"),
        }
    }
}

/// The `-o` options of one mount (no secret in them).
pub fn s3fs_options(m: &BucketMount, passwd_file: &Path) -> String {
    let mut o = vec![
        format!("passwd_file={}", passwd_file.display()),
        format!("logfile={}", log_file(passwd_file).display()),
        format!("url={}", m.endpoint),
        format!("endpoint={}", m.region),
        "use_path_request_style".into(),
        format!("connect_timeout={CONNECT_TIMEOUT_SECS}"),
        format!("readwrite_timeout={READWRITE_TIMEOUT_SECS}"),
        format!("retries={RETRIES}"),
        "allow_other".into(),
        "umask=0000".into(),
        "mp_umask=0000".into(),
        "stat_cache_expire=2".into(),
    ];
    if m.read_only {
        o.push("ro".into());
    }
    o.join(",")
}

/// s3fs's log (its critical lines: why a mount ended), beside the
/// password file.
pub fn log_file(passwd_file: &Path) -> PathBuf {
    passwd_file.with_extension("log")
}

/// The last critical or error line of s3fs's log, without its prefix.
fn last_complaint(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("[CRT]") || l.contains("[ERR]"))?;
    let msg = line.rsplit_once("): ").map_or(line, |(_, m)| m).trim();
    Some(msg.chars().take(300).collect())
}

/// Lists `at` on a thread of its own, waiting at most `timeout` (a hung
/// mount costs a thread, not the caller).
fn look(at: &Path, timeout: Duration) -> Health {
    let (tx, rx) = mpsc::channel();
    let path = at.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("bucket-look".into())
        .spawn(move || {
            // The first entry too: a listing that fails shows there.
            let r = std::fs::read_dir(&path).and_then(|mut d| d.next().transpose().map(|_| ()));
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
    if let Err(e) = spawned {
        return Health::Bad(format!("cannot look: {e}"));
    }
    match rx.recv_timeout(timeout) {
        Ok(Ok(_)) => Health::Ok,
        Ok(Err(e)) => Health::Bad(format!("the bucket does not answer: {e}")),
        Err(_) => Health::Bad(format!(
            "the bucket did not answer within {} s",
            timeout.as_secs()
        )),
    }
}

/// Whether `at` is a mount point, from `/proc/self/mountinfo` (never
/// touches the mount itself, so a hung one cannot block the look).
pub fn is_mounted(at: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = at.to_string_lossy();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|p| unescape_mountinfo(p) == want)
    })
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

impl BucketMounter for S3fs {
    fn mount(&self, m: &BucketMount, passwd_file: &Path, at: &Path) -> Result<(), MountError> {
        let out = Command::new(&self.program)
            .arg(&m.bucket)
            .arg(at)
            .arg("-o")
            .arg(s3fs_options(m, passwd_file))
            .output()
            .map_err(|source| MountError::Spawn {
                program: self.program.display().to_string(),
                source,
            })?;
        // Bad options end the command; the bucket itself is checked after
        // s3fs daemonized: a failed check ends the mount, and the first
        // listing says so (s3fs's log says why; never the key pair).
        let fail = |message: String| MountError::Mount {
            bucket: m.bucket.clone(),
            message: message.chars().take(400).collect(),
        };
        if !out.status.success() {
            let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(fail(if message.is_empty() {
                format!("s3fs exited with {}", out.status)
            } else {
                message
            }));
        }
        match look(at, MOUNT_TIMEOUT) {
            Health::Ok if is_mounted(at) => Ok(()),
            other => {
                let _ = self.unmount(at);
                let why = last_complaint(&log_file(passwd_file)).unwrap_or(match other {
                    Health::Bad(w) => w,
                    _ => "the mount went away".into(),
                });
                Err(fail(why))
            }
        }
    }

    fn unmount(&self, at: &Path) -> Result<(), MountError> {
        if !is_mounted(at) {
            return Ok(());
        }
        let plain = Command::new("umount").arg(at).output();
        if matches!(&plain, Ok(o) if o.status.success()) {
            return Ok(());
        }
        // Busy (the share's server holds it open): detach it lazily.
        let lazy = Command::new("umount")
            .arg("-l")
            .arg(at)
            .output()
            .map_err(|source| MountError::Spawn {
                program: "umount".into(),
                source,
            })?;
        if lazy.status.success() || !is_mounted(at) {
            return Ok(());
        }
        Err(MountError::Unmount {
            path: at.to_path_buf(),
            message: String::from_utf8_lossy(&lazy.stderr).trim().to_string(),
        })
    }

    fn health(&self, at: &Path) -> Health {
        if !is_mounted(at) {
            return Health::NotMounted;
        }
        // Listing the root asks the endpoint.
        look(at, HEALTH_TIMEOUT)
    }
}

/// A mounter in memory: mounts are directories it remembers; a mount
/// fails while `fail_mount` holds a message, a mount goes bad with
/// [`FakeMounter::break_mount`].
#[derive(Default)]
pub struct FakeMounter {
    pub state: Mutex<FakeState>,
}

#[derive(Default, Debug)]
pub struct FakeState {
    pub mounted: std::collections::BTreeMap<PathBuf, String>,
    pub broken: std::collections::BTreeSet<PathBuf>,
    pub fail_mount: Option<String>,
    pub fail_unmount: Option<String>,
    /// Every call, in order: `mount <bucket> <at>`, `unmount <at>`.
    pub calls: Vec<String>,
}

impl FakeMounter {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_fail_mount(&self, why: Option<&str>) {
        self.lock().fail_mount = why.map(str::to_string);
    }

    pub fn set_fail_unmount(&self, why: Option<&str>) {
        self.lock().fail_unmount = why.map(str::to_string);
    }

    pub fn break_mount(&self, at: &Path) {
        self.lock().broken.insert(at.to_path_buf());
    }

    pub fn mounted(&self) -> Vec<(PathBuf, String)> {
        self.lock()
            .mounted
            .iter()
            .map(|(p, b)| (p.clone(), b.clone()))
            .collect()
    }

    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }
}

impl BucketMounter for FakeMounter {
    fn mount(&self, m: &BucketMount, passwd_file: &Path, at: &Path) -> Result<(), MountError> {
        let mut st = self.lock();
        st.calls
            .push(format!("mount {} {}", m.bucket, at.display()));
        if let Some(why) = &st.fail_mount {
            return Err(MountError::Mount {
                bucket: m.bucket.clone(),
                message: why.clone(),
            });
        }
        assert!(passwd_file.exists(), "the password file is written first");
        st.broken.remove(at);
        st.mounted.insert(at.to_path_buf(), m.bucket.clone());
        Ok(())
    }

    fn unmount(&self, at: &Path) -> Result<(), MountError> {
        let mut st = self.lock();
        st.calls.push(format!("unmount {}", at.display()));
        if let Some(why) = &st.fail_unmount {
            return Err(MountError::Unmount {
                path: at.to_path_buf(),
                message: why.clone(),
            });
        }
        st.mounted.remove(at);
        st.broken.remove(at);
        Ok(())
    }

    fn health(&self, at: &Path) -> Health {
        let st = self.lock();
        if !st.mounted.contains_key(at) {
            Health::NotMounted
        } else if st.broken.contains(at) {
            Health::Bad("the bucket does not answer: Input/output error".into())
        } else {
            Health::Ok
        }
    }
}
