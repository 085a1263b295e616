//! Reading the guest-visible bytes of a disk image, touching only what is
//! allocated. Raw images (files or block devices) are mapped with
//! SEEK_DATA/SEEK_HOLE; qcow2 images (with any backing chain) are mapped with
//! `qemu-img map`, whose `offset` field lets us read data clusters straight
//! from the file of the layer that holds them. A qcow2 chain whose clusters
//! have no plain offset (compressed clusters) is first converted to a sparse
//! raw temp file by `qemu-img convert`.

use nix::unistd::{lseek, Whence};
use serde::Deserialize;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors opening or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    #[error("image {path} has unsupported format {format} (use raw or qcow2)")]
    Unsupported { path: PathBuf, format: String },
    #[error("qemu-img failed on {path}: {message}")]
    QemuImg { path: PathBuf, message: String },
    #[error("cannot read image {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The on-disk format of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// Lowercase name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// A run of allocated guest bytes and where to read it.
#[derive(Clone, Debug)]
struct Segment {
    start: u64,
    end: u64,
    layer: usize,
    offset: u64,
}

/// An opened image: its layers' files and the map of allocated data.
pub struct ImageSource {
    path: PathBuf,
    format: ImageFormat,
    virtual_size: u64,
    layers: Vec<File>,
    segments: Vec<Segment>,
    _converted: Option<tempfile::TempPath>,
}

const OTHER_FORMATS: &[(&[u8], &str)] = &[
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"<<< ", "vdi"),
    (b"QED\0", "qed"),
    (b"QFI\xfb", "qcow2"),
];

/// Detects the format from the first bytes of the file.
pub fn detect_format(path: &Path) -> Result<ImageFormat, ImageError> {
    let mut f = File::open(path).map_err(|source| ImageError::Open {
        path: path.into(),
        source,
    })?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(source) => {
                return Err(ImageError::Read {
                    path: path.into(),
                    source,
                })
            }
        }
    }
    for (magic, name) in OTHER_FORMATS {
        if head[..n].starts_with(magic) {
            if *name == "qcow2" {
                let version = u32::from_be_bytes(head[4..8].try_into().expect("4"));
                if version == 2 || version == 3 {
                    return Ok(ImageFormat::Qcow2);
                }
            }
            return Err(ImageError::Unsupported {
                path: path.into(),
                format: (*name).into(),
            });
        }
    }
    Ok(ImageFormat::Raw)
}

#[derive(Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: usize,
    data: bool,
    #[serde(default)]
    zero: bool,
    offset: Option<u64>,
}

#[derive(Deserialize)]
struct InfoEntry {
    filename: String,
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(default)]
    encrypted: bool,
    #[serde(rename = "format-specific", default)]
    format_specific: Option<serde_json::Value>,
}

fn qemu_img(path: &Path, args: &[&str]) -> Result<Vec<u8>, ImageError> {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| ImageError::QemuImg {
            path: path.into(),
            message: format!("cannot run qemu-img: {e}"),
        })?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(ImageError::QemuImg {
            path: path.into(),
            message,
        });
    }
    Ok(out.stdout)
}

fn open_file(path: &Path) -> Result<(File, u64, bool), ImageError> {
    let f = File::open(path).map_err(|source| ImageError::Open {
        path: path.into(),
        source,
    })?;
    let md = f.metadata().map_err(|source| ImageError::Open {
        path: path.into(),
        source,
    })?;
    if md.is_file() {
        return Ok((f, md.len(), false));
    }
    if md.file_type().is_block_device() {
        let size = lseek(&f, 0, Whence::SeekEnd).map_err(|e| ImageError::Read {
            path: path.into(),
            source: e.into(),
        })?;
        return Ok((f, size as u64, true));
    }
    Err(ImageError::NotAFile(path.into()))
}

/// Allocated extents of a raw file via SEEK_DATA/SEEK_HOLE.
fn raw_segments(f: &File, size: u64, whole: bool) -> Vec<Segment> {
    let mut segs = Vec::new();
    if whole {
        segs.push(Segment {
            start: 0,
            end: size,
            layer: 0,
            offset: 0,
        });
        return segs;
    }
    let mut pos = 0u64;
    while pos < size {
        let data = match lseek(f, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => {
                // No SEEK_DATA support: treat the rest as data.
                segs.push(Segment {
                    start: pos,
                    end: size,
                    layer: 0,
                    offset: pos,
                });
                break;
            }
        };
        let hole = lseek(f, data as i64, Whence::SeekHole)
            .map_or(size, |h| h as u64)
            .min(size);
        if hole > data {
            segs.push(Segment {
                start: data,
                end: hole,
                layer: 0,
                offset: data,
            });
        }
        pos = hole.max(data + 1);
    }
    segs
}

impl ImageSource {
    /// Opens an image and maps its allocated data.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let (file, size, is_blk) = open_file(path)?;
        let format = if is_blk {
            ImageFormat::Raw
        } else {
            detect_format(path)?
        };
        if format == ImageFormat::Raw {
            let segments = raw_segments(&file, size, is_blk);
            return Ok(Self {
                path: path.into(),
                format,
                virtual_size: size,
                layers: vec![file],
                segments,
                _converted: None,
            });
        }
        let canon = std::fs::canonicalize(path).map_err(|source| ImageError::Open {
            path: path.into(),
            source,
        })?;
        let bad_json = |e: serde_json::Error| ImageError::QemuImg {
            path: path.into(),
            message: format!("unexpected output: {e}"),
        };
        let info: Vec<InfoEntry> = serde_json::from_slice(&qemu_img(
            &canon,
            &["info", "-U", "--backing-chain", "--output=json"],
        )?)
        .map_err(bad_json)?;
        let map: Vec<MapEntry> =
            serde_json::from_slice(&qemu_img(&canon, &["map", "-U", "--output=json"])?)
                .map_err(bad_json)?;
        let virtual_size = info.first().map_or(0, |i| i.virtual_size);
        let mut layers = Vec::new();
        for layer in &info {
            let needs_convert = layer.encrypted
                || !matches!(layer.format.as_str(), "raw" | "qcow2")
                || layer
                    .format_specific
                    .as_ref()
                    .is_some_and(|f| f.pointer("/data/data-file").is_some());
            if needs_convert {
                return Self::open_converted(path, &canon);
            }
            layers.push(open_file(Path::new(&layer.filename))?.0);
        }
        let mut segments = Vec::new();
        for m in map.iter().filter(|m| m.data && !m.zero) {
            match m.offset {
                Some(offset) if m.depth < layers.len() => segments.push(Segment {
                    start: m.start,
                    end: m.start + m.length,
                    layer: m.depth,
                    offset,
                }),
                _ => return Self::open_converted(path, &canon),
            }
        }
        Ok(Self {
            path: path.into(),
            format,
            virtual_size,
            layers,
            segments,
            _converted: None,
        })
    }

    /// Fallback: let qemu-img flatten the chain into a sparse raw temp file.
    fn open_converted(path: &Path, canon: &Path) -> Result<Self, ImageError> {
        tracing::info!(image = %path.display(), "image has clusters without a plain offset; converting to raw first");
        let tmp = tempfile::Builder::new()
            .prefix("gantry-snapshot-")
            .tempfile()
            .map_err(|source| ImageError::Read {
                path: path.into(),
                source,
            })?
            .into_temp_path();
        let out = Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(canon)
            .arg(&tmp)
            .output()
            .map_err(|e| ImageError::QemuImg {
                path: path.into(),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(ImageError::QemuImg {
                path: path.into(),
                message,
            });
        }
        let (file, size, _) = open_file(&tmp)?;
        let segments = raw_segments(&file, size, false);
        Ok(Self {
            path: path.into(),
            format: ImageFormat::Qcow2,
            virtual_size: size,
            layers: vec![file],
            segments,
            _converted: Some(tmp),
        })
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The image's format.
    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// Bytes the allocation map says hold data.
    pub fn allocated_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.end - s.start).sum()
    }

    fn first_overlap(&self, start: u64) -> usize {
        self.segments.partition_point(|s| s.end <= start)
    }

    /// True when any allocated data lies in `[start, start+len)`.
    pub fn has_data(&self, start: u64, len: u64) -> bool {
        let i = self.first_overlap(start);
        self.segments.get(i).is_some_and(|s| s.start < start + len)
    }

    /// Fills `buf` with the guest bytes at `start`; unallocated parts are
    /// zero. Reads go through the page cache: `O_DIRECT` reads, tried on
    /// the benchmark VM, were slower with the image cached and no faster
    /// without it.
    pub fn read(&self, start: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let end = start + buf.len() as u64;
        let mut done = 0usize; // bytes of `buf` filled so far
        for s in &self.segments[self.first_overlap(start)..] {
            if s.start >= end {
                break;
            }
            let from = s.start.max(start);
            let to = s.end.min(end);
            let (a, b) = ((from - start) as usize, (to - start) as usize);
            buf[done.min(a)..a].fill(0);
            self.layers[s.layer]
                .read_exact_at(&mut buf[a..b], s.offset + (from - s.start))
                .map_err(|source| ImageError::Read {
                    path: self.path.clone(),
                    source,
                })?;
            done = b;
        }
        buf[done..].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_map_skips_holes_and_reads_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"abc", 3 << 20).unwrap();
        let img = ImageSource::open(&p).unwrap();
        assert_eq!(img.format(), ImageFormat::Raw);
        assert_eq!(img.virtual_size(), 8 << 20);
        assert!(!img.has_data(0, 1 << 20));
        assert!(img.has_data(3 << 20, 4096));
        assert!(img.allocated_bytes() < 1 << 20);
        let mut buf = vec![1u8; 8];
        img.read((3 << 20) - 2, &mut buf).unwrap();
        assert_eq!(&buf, b"\0\0abc\0\0\0");
    }

    #[test]
    fn foreign_formats_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vmdk");
        File::create(&p)
            .unwrap()
            .write_all(b"KDMV\x01\0\0\0 rest")
            .unwrap();
        let err = ImageSource::open(&p).err().unwrap();
        assert!(err.to_string().contains("unsupported format vmdk"), "{err}");
        let err = ImageSource::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
