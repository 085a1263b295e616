//! Disk images through `qemu-img`: overlays on base images, blank data
//! volumes, size queries, growth and conversion.
//!
//! Every path handed to `qemu-img` is absolute (so it can never be read as
//! a `protocol:` or `json:` filename) and passed as its own argument, never
//! through a shell; formats are always given explicitly, never probed, except
//! when inspecting an operator's file at import.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const GIB: u64 = 1024 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk path {0} is not absolute")]
    NotAbsolute(PathBuf),
    #[error("cannot run qemu-img: {0}")]
    Spawn(std::io::Error),
    #[error("qemu-img {op} {path} failed: {stderr}")]
    Failed {
        op: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("qemu-img info {path}: unreadable output: {source}")]
    Info {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is in format {format:?}; only raw and qcow2 are supported")]
    UnsupportedFormat { path: PathBuf, format: String },
    #[error("cannot shrink {what} from {from} to {to} bytes")]
    Shrink { what: String, from: u64, to: u64 },
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

fn abs(path: &Path) -> Result<&Path, DiskError> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(DiskError::NotAbsolute(path.into()))
    }
}

/// Runs `qemu-img OP FLAGS... PATHS... TAIL...`.
fn qemu_img(
    op: &'static str,
    flags: &[&str],
    paths: &[&Path],
    tail: &[&str],
) -> Result<Vec<u8>, DiskError> {
    for p in paths {
        abs(p)?;
    }
    let out = Command::new("qemu-img")
        .arg(op)
        .args(flags)
        .args(paths)
        .args(tail)
        .output()
        .map_err(DiskError::Spawn)?;
    if !out.status.success() {
        return Err(DiskError::Failed {
            op,
            path: paths.last().map(|p| p.to_path_buf()).unwrap_or_default(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Inspects an image. `format` None lets qemu-img probe (operator files at
/// import only); the result must be raw or qcow2.
pub fn info(path: &Path, format: Option<Format>) -> Result<ImageInfo, DiskError> {
    let mut flags = vec!["--output=json", "-U"];
    if let Some(f) = format {
        flags.extend(["-f", f.as_str()]);
    }
    let out = qemu_img("info", &flags, &[path], &[])?;
    let info: ImageInfo = serde_json::from_slice(&out).map_err(|source| DiskError::Info {
        path: path.into(),
        source,
    })?;
    if info.format != "raw" && info.format != "qcow2" {
        return Err(DiskError::UnsupportedFormat {
            path: path.into(),
            format: info.format,
        });
    }
    Ok(info)
}

/// Creates a qcow2 overlay on a qcow2 base, `size` bytes virtual.
pub fn create_overlay(base: &Path, overlay: &Path, size: u64) -> Result<(), DiskError> {
    let flags = ["-q", "-f", "qcow2", "-F", "qcow2", "-b"];
    qemu_img("create", &flags, &[base, overlay], &[&size.to_string()]).map(drop)
}

/// Creates a blank qcow2 image of `size` bytes.
pub fn create_blank(path: &Path, size: u64) -> Result<(), DiskError> {
    qemu_img(
        "create",
        &["-q", "-f", "qcow2"],
        &[path],
        &[&size.to_string()],
    )
    .map(drop)
}

/// Grows a qcow2 image (offline) to `size` bytes; never shrinks.
pub fn grow(path: &Path, size: u64) -> Result<(), DiskError> {
    let current = info(path, Some(Format::Qcow2))?.virtual_size;
    if size < current {
        return Err(DiskError::Shrink {
            what: path.display().to_string(),
            from: current,
            to: size,
        });
    }
    if size == current {
        return Ok(());
    }
    qemu_img(
        "resize",
        &["-q", "-f", "qcow2"],
        &[path],
        &[&size.to_string()],
    )
    .map(drop)
}

/// Converts `src` (of format `from`) to a standalone qcow2 at `dst`.
pub fn convert_to_qcow2(src: &Path, from: Format, dst: &Path) -> Result<(), DiskError> {
    let flags = ["-q", "-f", from.as_str(), "-O", "qcow2"];
    qemu_img("convert", &flags, &[src, dst], &[]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_qemu_img() -> bool {
        Command::new("qemu-img").arg("--version").output().is_ok()
    }

    #[test]
    fn overlay_grow_and_refuse_shrink() {
        if !have_qemu_img() {
            eprintln!("skipped: qemu-img not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let ov = dir.path().join("ov.qcow2");
        create_blank(&base, GIB).unwrap();
        create_overlay(&base, &ov, 2 * GIB).unwrap();
        let i = info(&ov, Some(Format::Qcow2)).unwrap();
        assert_eq!(i.virtual_size, 2 * GIB);
        assert_eq!(i.backing_filename.as_deref(), base.to_str());
        grow(&ov, 3 * GIB).unwrap();
        assert_eq!(
            info(&ov, Some(Format::Qcow2)).unwrap().virtual_size,
            3 * GIB
        );
        let e = grow(&ov, GIB).unwrap_err();
        assert!(e.to_string().starts_with("cannot shrink"), "{e}");
        assert!(matches!(
            info(Path::new("rel.qcow2"), None),
            Err(DiskError::NotAbsolute(_))
        ));
        let e = info(&dir.path().join("missing"), None).unwrap_err();
        assert!(e.to_string().contains("failed"), "{e}");
    }
}
