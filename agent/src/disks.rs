//! Disk images through `qemu-img`: overlays on base images, blank data
//! volumes, size queries, growth and conversion; the layers of a root disk's
//! chain (what one layer changed, committing layers down, re-pointing a
//! layer's backing file).
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

/// The guest-visible byte ranges a qcow2 layer itself holds (data or
/// zeroed clusters), not those it reads from its backing chain: what was
/// written while it was the active layer. Adjacent ranges are merged.
pub fn layer_extents(layer: &Path) -> Result<Vec<(u64, u64)>, DiskError> {
    #[derive(Deserialize)]
    struct MapEntry {
        start: u64,
        length: u64,
        depth: u32,
        #[serde(default)]
        data: bool,
        #[serde(default)]
        zero: bool,
    }
    let out = qemu_img(
        "map",
        &["--output=json", "-U", "-f", "qcow2"],
        &[layer],
        &[],
    )?;
    let entries: Vec<MapEntry> =
        serde_json::from_slice(&out).map_err(|source| DiskError::Info {
            path: layer.into(),
            source,
        })?;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in entries
        .iter()
        .filter(|e| e.depth == 0 && (e.data || e.zero))
    {
        match ranges.last_mut() {
            Some((start, len)) if *start + *len == e.start => *len += e.length,
            _ => ranges.push((e.start, e.length)),
        }
    }
    Ok(ranges)
}

/// The files of a qcow2 chain, from `top` down to the base.
pub fn backing_chain(top: &Path) -> Result<Vec<PathBuf>, DiskError> {
    #[derive(Deserialize)]
    struct Layer {
        filename: String,
    }
    let out = qemu_img(
        "info",
        &["--output=json", "-U", "--backing-chain", "-f", "qcow2"],
        &[top],
        &[],
    )?;
    let layers: Vec<Layer> = serde_json::from_slice(&out).map_err(|source| DiskError::Info {
        path: top.into(),
        source,
    })?;
    Ok(layers
        .into_iter()
        .map(|l| PathBuf::from(l.filename))
        .collect())
}

/// Commits `top` (and every layer between it and `base`) into `base`,
/// offline.
pub fn commit(top: &Path, base: &Path) -> Result<(), DiskError> {
    abs(base)?;
    let b = base.to_string_lossy();
    qemu_img("commit", &["-q", "-f", "qcow2", "-b", &b], &[top], &[]).map(drop)
}

/// Points `image` at `backing` without copying data (`rebase -u`): for a
/// layer whose old backing file was committed into `backing`.
pub fn rebase_unsafe(image: &Path, backing: &Path) -> Result<(), DiskError> {
    abs(backing)?;
    let b = backing.to_string_lossy();
    qemu_img(
        "rebase",
        &["-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", &b],
        &[image],
        &[],
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

    fn write_at(img: &Path, offset: u64, len: u64) {
        let cmd = format!("write -P 7 {offset} {len}");
        let st = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &cmd])
            .arg(img)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
    }

    #[test]
    fn layers_extents_commit_and_rebase() {
        let dir = tempfile::tempdir().unwrap();
        let (base, mid, top) = (
            dir.path().join("base.qcow2"),
            dir.path().join("mid.qcow2"),
            dir.path().join("top.qcow2"),
        );
        create_blank(&base, GIB).unwrap();
        write_at(&base, 0, 1 << 20);
        create_overlay(&base, &mid, GIB).unwrap();
        write_at(&mid, 4 << 20, 128 << 10);
        write_at(&mid, (4 << 20) + (128 << 10), 64 << 10);
        create_overlay(&mid, &top, GIB).unwrap();
        write_at(&top, 8 << 20, 64 << 10);
        // Only what each layer itself holds, merged when adjacent.
        assert_eq!(layer_extents(&mid).unwrap(), vec![(4 << 20, 192 << 10)]);
        assert_eq!(layer_extents(&top).unwrap(), vec![(8 << 20, 64 << 10)]);
        assert_eq!(
            backing_chain(&top).unwrap(),
            vec![top.clone(), mid.clone(), base.clone()]
        );
        // Commit mid into base, point top at base: same guest view.
        commit(&mid, &base).unwrap();
        rebase_unsafe(&top, &base).unwrap();
        assert_eq!(
            backing_chain(&top).unwrap(),
            vec![top.clone(), base.clone()]
        );
        assert_eq!(layer_extents(&top).unwrap(), vec![(8 << 20, 64 << 10)]);
    }
}
