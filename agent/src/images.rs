//! The host's image cache: base disks (converted to standalone qcow2),
//! optional kernel and initrd for direct boot, each checksummed with blake3
//! at import and verified again before first use after the agent starts.

use crate::disks::{self, DiskError, Format};
use crate::fsutil::{self, FsError};
use crate::layout::{ImageRecord, Layout, IMAGE_MAGIC, IMAGE_VERSION};
use gantry_proto::api::local::{ImageInfo, ImportImage};
use gantry_proto::validate::{self, ValidationError};
use gantry_proto::ImageId;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("image {0} is not in this host's cache")]
    NotFound(ImageId),
    #[error("image {0} already exists")]
    Exists(ImageId),
    #[error("image {id}: {file} is corrupt (checksum mismatch)")]
    Corrupt { id: ImageId, file: &'static str },
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Files of a cached image, resolved to paths.
#[derive(Debug, Clone)]
pub struct CachedImage {
    pub record: ImageRecord,
    pub disk: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

fn checked_file(field: &str, p: &str) -> Result<PathBuf, ValidationError> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(ValidationError::new(field, "must be an absolute path"));
    }
    if !path.is_file() {
        return Err(ValidationError::new(
            field,
            format!("{p} is not a readable file"),
        ));
    }
    Ok(path.to_path_buf())
}

pub(crate) fn hash_file(path: &Path) -> Result<String, FsError> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).map_err(fsutil::io_err("open", path))?;
    std::io::copy(&mut f, &mut h).map_err(fsutil::io_err("hash", path))?;
    Ok(h.finalize().to_hex().to_string())
}

pub(crate) fn copy_into(src: &Path, dst: &Path) -> Result<(), FsError> {
    std::fs::copy(src, dst).map_err(fsutil::io_err("copy", src))?;
    std::fs::File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(fsutil::io_err("fsync", dst))
}

/// Imports an operator's image file into the cache. On any failure the
/// partly built image directory is removed.
pub fn import(layout: &Layout, req: &ImportImage) -> Result<ImageInfo, ImageError> {
    validate::object_name("name", &req.name)?;
    let disk_src = checked_file("disk", &req.disk)?;
    let kernel = req
        .kernel
        .as_deref()
        .map(|k| checked_file("kernel", k))
        .transpose()?;
    let initrd = req
        .initrd
        .as_deref()
        .map(|k| checked_file("initrd", k))
        .transpose()?;
    if let Some(c) = &req.cmdline {
        validate::free_text("cmdline", c, 1024)?;
    }
    if kernel.is_none() && (initrd.is_some() || req.cmdline.is_some()) {
        return Err(ValidationError::new("kernel", "initrd and cmdline need a kernel").into());
    }
    let id = req.id.unwrap_or_default();
    publish(layout, id, |tmp| {
        build(
            tmp,
            id,
            req,
            &disk_src,
            kernel.as_deref(),
            initrd.as_deref(),
        )
    })
}

/// Builds a cache entry in a temporary directory and publishes it whole:
/// `build` writes the files and returns the record; `image.json` is written,
/// the directory fsynced and renamed into place. On failure nothing of it
/// remains.
pub(crate) fn publish<E: From<ImageError> + From<FsError>>(
    layout: &Layout,
    id: ImageId,
    build: impl FnOnce(&Path) -> Result<ImageRecord, E>,
) -> Result<ImageInfo, E> {
    let dir = layout.image_dir(id);
    if dir.exists() {
        return Err(ImageError::Exists(id).into());
    }
    let tmp = layout.images_dir().join(format!(".build-{id}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let built = fsutil::create_dir(&tmp, 0o711)
        .map_err(E::from)
        .and_then(|()| build(&tmp))
        .and_then(|rec| {
            fsutil::write_state(&tmp.join("image.json"), IMAGE_MAGIC, IMAGE_VERSION, &rec)?;
            fsutil::sync_dir(&tmp)?;
            Ok(rec)
        });
    match built {
        Ok(rec) => {
            std::fs::rename(&tmp, &dir).map_err(fsutil::io_err("rename", &dir))?;
            fsutil::sync_dir(&layout.images_dir())?;
            Ok(info(&rec))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn build(
    tmp: &Path,
    id: ImageId,
    req: &ImportImage,
    disk_src: &Path,
    kernel: Option<&Path>,
    initrd: Option<&Path>,
) -> Result<ImageRecord, ImageError> {
    let probed = disks::info(disk_src, None)?;
    let format = if probed.format == "qcow2" {
        Format::Qcow2
    } else {
        Format::Raw
    };
    let disk = tmp.join("disk.qcow2");
    disks::convert_to_qcow2(disk_src, format, &disk)?;
    if let Some(k) = kernel {
        copy_into(k, &tmp.join("vmlinuz"))?;
    }
    if let Some(i) = initrd {
        copy_into(i, &tmp.join("initrd.img"))?;
    }
    Ok(ImageRecord {
        id,
        name: req.name.clone(),
        virtual_size: probed.virtual_size,
        checksum: hash_file(&disk)?,
        has_kernel: kernel.is_some(),
        has_initrd: initrd.is_some(),
        cmdline: req.cmdline.clone(),
    })
}

pub fn info(r: &ImageRecord) -> ImageInfo {
    ImageInfo {
        id: r.id,
        name: r.name.clone(),
        virtual_size: r.virtual_size,
        direct_boot: r.has_kernel,
        checksum: r.checksum.clone(),
    }
}

/// Resolves a cached image; with `verify`, re-hashes its disk first.
pub fn open(layout: &Layout, id: ImageId, verify: bool) -> Result<CachedImage, ImageError> {
    let dir = layout.image_dir(id);
    let rec_path = dir.join("image.json");
    if !rec_path.exists() {
        return Err(ImageError::NotFound(id));
    }
    let record: ImageRecord = fsutil::read_state(&rec_path, IMAGE_MAGIC, IMAGE_VERSION)?;
    let disk = dir.join("disk.qcow2");
    if verify && hash_file(&disk)? != record.checksum {
        return Err(ImageError::Corrupt {
            id,
            file: "disk.qcow2",
        });
    }
    Ok(CachedImage {
        kernel: record.has_kernel.then(|| dir.join("vmlinuz")),
        initrd: record.has_initrd.then(|| dir.join("initrd.img")),
        disk,
        record,
    })
}
