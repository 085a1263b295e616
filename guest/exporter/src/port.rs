//! The virtio-serial port to the host: found by its name under
//! `/sys/class/virtio-ports/*/name` (the device is `/dev/<vportNpM>`),
//! opened non-blocking, written one whole line at a time.
//!
//! Non-blocking because the kernel blocks a writer while no host process
//! has the other end open (the agent connects to QEMU's socket): a
//! blocking write would hold a stale report and hand it over, stamped as
//! new, whenever the host reconnects. Here a line nobody reads is dropped.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a line did not reach the port.
#[derive(Debug)]
pub enum PortError {
    /// No port with that name (the domain has no such channel).
    NotFound(String),
    Open(PathBuf, std::io::Error),
    Write(PathBuf, std::io::Error),
}

impl fmt::Display for PortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortError::NotFound(name) => write!(
                f,
                "no virtio-serial port named {name} under /sys/class/virtio-ports (is the virtio_console module loaded, and does the instance have the channel?)"
            ),
            PortError::Open(p, e) => write!(f, "cannot open {}: {e}", p.display()),
            PortError::Write(p, e) => write!(f, "cannot write to {}: {e}", p.display()),
        }
    }
}

/// The device of the virtio-serial port named `name`, looked up under
/// `<sys>/class/virtio-ports` (`sys` is `/sys` outside tests).
pub fn find(sys: &Path, name: &str) -> Option<PathBuf> {
    let dir = sys.join("class/virtio-ports");
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim_end_matches('\n') == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Where lines go.
pub enum Target {
    /// The port of this name, looked up again after every failure.
    Named(String),
    /// A path given on the command line (a port, or a file in tests).
    Path(PathBuf),
    Stdout,
}

/// What happened to a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Whole,
    /// Nobody reads the other end (or it is full): dropped.
    Dropped,
}

/// The open port, reopened after an error.
pub struct Port {
    target: Target,
    file: Option<(PathBuf, File)>,
    /// The previous line was cut: the next one starts with `\n` so that
    /// the host drops the piece (an unparsable line) and reads the rest.
    cut: bool,
}

impl Port {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            file: None,
            cut: false,
        }
    }

    fn open(&mut self) -> Result<&mut (PathBuf, File), PortError> {
        if self.file.is_none() {
            let path = match &self.target {
                Target::Named(name) => find(Path::new("/sys"), name)
                    .ok_or_else(|| PortError::NotFound(name.clone()))?,
                Target::Path(p) => p.clone(),
                Target::Stdout => PathBuf::from("/dev/stdout"),
            };
            let mut o = OpenOptions::new();
            o.append(true);
            if !matches!(self.target, Target::Stdout) {
                o.custom_flags(libc::O_NONBLOCK);
            }
            let f = o
                .open(&path)
                .map_err(|e| PortError::Open(path.clone(), e))?;
            self.file = Some((path, f));
        }
        Ok(self.file.as_mut().expect("just opened"))
    }

    /// Writes one line (ending in `\n`). An error closes the port; the
    /// next call opens it again.
    pub fn send(&mut self, line: &[u8]) -> Result<Sent, PortError> {
        let cut = self.cut;
        let (path, f) = self.open()?;
        let mut buf = Vec::with_capacity(line.len() + 1);
        if cut {
            buf.push(b'\n');
        }
        buf.extend_from_slice(line);
        match f.write(&buf) {
            Ok(n) if n == buf.len() => {
                self.cut = false;
                Ok(Sent::Whole)
            }
            Ok(0) => Ok(Sent::Dropped),
            Ok(_) => {
                self.cut = true;
                Ok(Sent::Dropped)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(Sent::Dropped),
            Err(e) => {
                let err = PortError::Write(path.clone(), e);
                self.file = None;
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_found_by_its_name() {
        let sys = tempfile::tempdir().unwrap();
        let ports = sys.path().join("class/virtio-ports");
        for (dir, name) in [
            ("vport0p1", "org.qemu.guest_agent.0"),
            ("vport1p1", "org.gantry.metrics.0"),
        ] {
            std::fs::create_dir_all(ports.join(dir)).unwrap();
            std::fs::write(ports.join(dir).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find(sys.path(), "org.gantry.metrics.0"),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find(sys.path(), "org.gantry.metrics.1"), None);
        assert_eq!(find(&sys.path().join("none"), "org.gantry.metrics.0"), None);
    }

    #[test]
    fn lines_are_appended_and_a_missing_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("port");
        let mut port = Port::new(Target::Path(p.clone()));
        assert!(matches!(port.send(b"x\n"), Err(PortError::Open(..))));
        std::fs::write(&p, b"").unwrap();
        assert_eq!(port.send(b"{\"v\":1}\n").unwrap(), Sent::Whole);
        assert_eq!(port.send(b"{\"v\":2}\n").unwrap(), Sent::Whole);
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"v\":1}\n{\"v\":2}\n");
    }
}
