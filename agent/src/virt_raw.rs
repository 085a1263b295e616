//! Safe wrappers over the few libvirt calls the `virt` crate leaves raw:
//! active and non-active block commits, block job progress, pivot and
//! abort, and guest filesystem freeze and thaw. Live snapshots (an external overlay, then a
//! block commit back into the base) are built on these.
//!
//! This is the only module with `unsafe` in the agent. Each function checks
//! its inputs, converts strings to C strings, calls libvirt once and turns
//! a negative return into libvirt's last error.

use std::ffi::CString;
use std::ptr;
use virt::domain::Domain;

/// Errors of the raw calls.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("disk name {0:?} contains a NUL byte")]
    Nul(String),
    #[error("libvirt: {}", .0.message())]
    Libvirt(virt::error::Error),
}

type Error = RawError;

/// Progress of a block job on one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockJob {
    /// libvirt's job type (`VIR_DOMAIN_BLOCK_JOB_TYPE_*`).
    pub kind: i32,
    pub cur: u64,
    pub end: u64,
}

impl BlockJob {
    /// Whether the job has copied everything (an active commit is then
    /// ready to pivot).
    pub fn ready(&self) -> bool {
        self.end > 0 && self.cur == self.end
    }
}

fn c_string(s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| RawError::Nul(s.to_string()))
}

fn check(rc: i32) -> Result<i32, Error> {
    if rc < 0 {
        Err(RawError::Libvirt(virt::error::Error::last_error()))
    } else {
        Ok(rc)
    }
}

/// Starts an active commit of `disk`'s top image into its backing file
/// (`VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | SHALLOW`): the guest keeps running.
pub fn block_commit_active(dom: &Domain, disk: &str) -> Result<(), Error> {
    let disk = c_string(disk)?;
    let flags =
        virt::sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | virt::sys::VIR_DOMAIN_BLOCK_COMMIT_SHALLOW;
    // SAFETY: the domain pointer is valid for `dom`'s lifetime; `disk` is a
    // NUL-terminated string that outlives the call; NULL base and top mean
    // "the backing file" and "the active layer".
    let rc = unsafe {
        virt::sys::virDomainBlockCommit(
            dom.as_ptr(),
            disk.as_ptr(),
            ptr::null(),
            ptr::null(),
            0,
            flags,
        )
    };
    check(rc).map(drop)
}

/// Starts a commit of every layer of `disk`'s chain from `top` down to just
/// above `base` into `base` (a non-active commit: the guest writes on above
/// `top`; the job ends by itself and the layer above `top` is then backed
/// by `base`).
pub fn block_commit(
    dom: &Domain,
    disk: &str,
    base: &std::path::Path,
    top: &std::path::Path,
) -> Result<(), Error> {
    let disk = c_string(disk)?;
    let base = c_string(&base.to_string_lossy())?;
    let top = c_string(&top.to_string_lossy())?;
    // SAFETY: valid domain; three NUL-terminated strings that outlive the
    // call; 0 bandwidth is unlimited; no flags.
    let rc = unsafe {
        virt::sys::virDomainBlockCommit(
            dom.as_ptr(),
            disk.as_ptr(),
            base.as_ptr(),
            top.as_ptr(),
            0,
            0,
        )
    };
    check(rc).map(drop)
}

/// The block job running on `disk`, if any.
pub fn block_job(dom: &Domain, disk: &str) -> Result<Option<BlockJob>, Error> {
    let disk = c_string(disk)?;
    let mut info = virt::sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: valid domain and C string; `info` is a plain struct libvirt
    // fills in and that outlives the call.
    let rc =
        unsafe { virt::sys::virDomainGetBlockJobInfo(dom.as_ptr(), disk.as_ptr(), &mut info, 0) };
    Ok((check(rc)? == 1).then_some(BlockJob {
        kind: info.type_,
        cur: info.cur,
        end: info.end,
    }))
}

/// Ends the block job on `disk`; with `pivot`, switches the guest to the
/// job's target first (finishing an active commit).
pub fn block_job_finish(dom: &Domain, disk: &str, pivot: bool) -> Result<(), Error> {
    let disk = c_string(disk)?;
    let flags = if pivot {
        virt::sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    } else {
        0
    };
    // SAFETY: valid domain and C string.
    let rc = unsafe { virt::sys::virDomainBlockJobAbort(dom.as_ptr(), disk.as_ptr(), flags) };
    check(rc).map(drop)
}

/// Pivots `disk` onto its active commit's target once libvirt agrees the
/// job is ready, retrying until `deadline`.
///
/// QEMU can report a job as fully copied (`cur == end`) before libvirt has
/// handled QEMU's READY event on its worker thread; a pivot in that window
/// fails with `VIR_ERR_BLOCK_COPY_ACTIVE` ("not ready for pivot yet"). The
/// window is short on an idle host and long under load, so the pivot is
/// retried while that is the answer.
pub fn pivot_when_ready(
    dom: &Domain,
    disk: &str,
    deadline: std::time::Instant,
) -> Result<(), Error> {
    loop {
        match block_job_finish(dom, disk, true) {
            Err(RawError::Libvirt(e))
                if e.code()
                    == virt::enumutil::Enum::Known(virt::error::ErrorNumber::BlockCopyActive)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Freezes every guest filesystem through the QEMU guest agent; returns how
/// many were frozen. Fails with libvirt's sentence when there is no agent.
pub fn fs_freeze(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: valid domain; NULL/0 mountpoints means "all".
    let rc = unsafe { virt::sys::virDomainFSFreeze(dom.as_ptr(), ptr::null_mut(), 0, 0) };
    check(rc).map(|n| n as u32)
}

/// Thaws what [`fs_freeze`] froze.
pub fn fs_thaw(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: as for fs_freeze.
    let rc = unsafe { virt::sys::virDomainFSThaw(dom.as_ptr(), ptr::null_mut(), 0, 0) };
    check(rc).map(|n| n as u32)
}
