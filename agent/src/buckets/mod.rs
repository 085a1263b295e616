//! Buckets connected to instances as directories (docs/buckets.md), this
//! host's side.
//!
//! The controller sends the host's whole bucket state ([`HostBuckets`],
//! revisioned) in the work answer; [`Buckets::set`] validates it, keeps it
//! in `buckets.json` (0600: it holds the key pairs) and applies it. Every
//! instance with a guest config has one virtiofs share in its domain (tag
//! [`SHARE_TAG`], directory `buckets/<instance>/share`), so attaching or
//! detaching never hot-plugs a device: each attachment is an `s3fs` mount
//! at `share/<connection>` (password file `buckets/<instance>/
//! <connection>.passwd`, 0600, outside the share), and the share's
//! manifest `.gantry-buckets` lists the mounted ones as `<connection>
//! <mount path> <ro|rw>` lines. A small loop in the guest (from the seed,
//! [`guest`]) bind-mounts each listed directory at its mount path and
//! unmounts what left the list.
//!
//! [`Buckets::apply`] is the one reconciliation, run on every new state,
//! at start-up (after a restart or a host reboot the mounts are rebuilt
//! from `buckets.json`) and periodically (a mount that went away is
//! mounted again; health is looked at): desired mounts of live instances
//! are mounted, everything else under `buckets/` is unmounted (lazily when
//! busy) and removed, except the share directories of live instances
//! (their domains point there). Health per attachment goes to the
//! controller in each heartbeat ([`Buckets::reports`]).
//!
//! The share lives outside the instance's disks, so a snapshot never holds
//! a bucket's bytes.

pub mod guest;
pub mod mounter;
#[cfg(test)]
mod tests;

use crate::fsutil::{self, FsError};
use gantry_proto::buckets::{BucketHealth, BucketMount, BucketReport, HostBuckets};
use gantry_proto::ids::{InstanceId, StorageConnectionId};
use mounter::{BucketMounter, Health};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The virtiofs tag of every instance's bucket share.
pub const SHARE_TAG: &str = "gantry-buckets";
/// The share's manifest file (not a connection id, so never a mount).
pub const MANIFEST: &str = ".gantry-buckets";
/// Where Debian's QEMU 7.2 ships virtiofsd.
pub const DEFAULT_VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
const STATE_MAGIC: &str = "gantry-buckets";
const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("bucket state refused: {0}")]
    Invalid(#[from] gantry_proto::ValidationError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Mount(#[from] mounter::MountError),
}

type Key = (InstanceId, StorageConnectionId);

#[derive(Default)]
struct State {
    desired: HostBuckets,
    seen_rev: Option<u64>,
    /// What each mount was made with (a change remounts it).
    mounted: BTreeMap<Key, u64>,
    health: BTreeMap<Key, (BucketHealth, Option<String>)>,
}

pub struct Buckets {
    root: PathBuf,
    file: PathBuf,
    mounter: Arc<dyn BucketMounter>,
    virtiofsd: Option<PathBuf>,
    state: Mutex<State>,
    applying: Mutex<()>,
    /// A background pass is running ([`Buckets::apply_in_background`]).
    background: AtomicBool,
}

/// What a mount is made with, as a number (secret included, so a rotated
/// key remounts; the number is never shown).
fn fingerprint(m: &BucketMount) -> u64 {
    let json = serde_json::to_vec(m).unwrap_or_default();
    let d = blake3::hash(&json);
    u64::from_le_bytes(d.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

impl Buckets {
    /// Opens the state under `state_dir` with `mounter`; `virtiofsd` is the
    /// share's server (`None`: this host gives guests no bucket share).
    pub fn open(
        state_dir: &Path,
        mounter: Arc<dyn BucketMounter>,
        virtiofsd: Option<PathBuf>,
    ) -> Result<Self, BucketError> {
        let root = state_dir.join("buckets");
        fsutil::create_dir(&root, 0o700)?;
        let file = state_dir.join("buckets.json");
        let mut st = State::default();
        if file.exists() {
            match fsutil::read_state::<HostBuckets>(&file, STATE_MAGIC, STATE_VERSION) {
                Ok(b) => st.desired = b,
                Err(e) => {
                    tracing::warn!(error = %e, "buckets.json unreadable; waiting for the controller")
                }
            }
        }
        Ok(Self {
            root,
            file,
            mounter,
            virtiofsd,
            state: Mutex::new(st),
            applying: Mutex::new(()),
            background: AtomicBool::new(false),
        })
    }

    /// [`Buckets::open`] with `s3fs` and Debian's virtiofsd when present.
    pub fn open_real(state_dir: &Path) -> Result<Self, BucketError> {
        let v = PathBuf::from(DEFAULT_VIRTIOFSD);
        let virtiofsd = v.exists().then_some(v);
        if virtiofsd.is_none() {
            tracing::warn!(
                path = DEFAULT_VIRTIOFSD,
                "no virtiofsd: guests get no bucket share"
            );
        }
        Self::open(state_dir, Arc::new(mounter::S3fs::default()), virtiofsd)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The revision last received (for `buckets_rev`).
    pub fn rev(&self) -> Option<u64> {
        let st = self.lock();
        st.seen_rev
            .or((st.desired.rev != 0).then_some(st.desired.rev))
    }

    /// The share's server, when guests get a share.
    pub fn virtiofsd(&self) -> Option<&Path> {
        self.virtiofsd.as_deref()
    }

    fn instance_dir(&self, id: InstanceId) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// The instance's share directory (made when missing), when this host
    /// gives guests a share.
    pub fn share_dir(&self, id: InstanceId) -> Result<Option<PathBuf>, BucketError> {
        if self.virtiofsd.is_none() {
            return Ok(None);
        }
        let dir = self.instance_dir(id).join("share");
        fsutil::create_dir(&self.instance_dir(id), 0o700)?;
        fsutil::create_dir(&dir, 0o755)?;
        Ok(Some(dir))
    }

    fn mount_dir(&self, k: Key) -> PathBuf {
        self.instance_dir(k.0).join("share").join(k.1.to_string())
    }

    fn passwd_file(&self, k: Key) -> PathBuf {
        self.instance_dir(k.0).join(format!("{}.passwd", k.1))
    }

    /// Takes a new state from the controller: validates, keeps it, applies
    /// it for `live` (the instances this host holds).
    pub fn set(&self, new: HostBuckets, live: &[InstanceId]) -> Result<(), BucketError> {
        self.lock().seen_rev = Some(new.rev);
        new.validate()?;
        fsutil::write_state(&self.file, STATE_MAGIC, STATE_VERSION, &new)?;
        tracing::info!(
            rev = new.rev,
            mounts = new.mounts.len(),
            "bucket state received"
        );
        self.lock().desired = new;
        self.apply(live);
        Ok(())
    }

    /// [`Buckets::apply`] on a thread of its own, unless one is running:
    /// the start-up and periodic passes, which a slow endpoint (a mount
    /// waits up to s3fs's timeouts) must not hold up.
    pub fn apply_in_background(self: &Arc<Self>, live: Vec<InstanceId>) {
        if self.background.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("buckets".into())
            .spawn(move || {
                me.apply(&live);
                me.background.store(false, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the bucket pass");
            self.background.store(false, Ordering::SeqCst);
        }
    }

    /// The reconciliation (see the module docs).
    pub fn apply(&self, live: &[InstanceId]) {
        let _one = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let live: BTreeSet<InstanceId> = live.iter().copied().collect();
        let want: Vec<BucketMount> = {
            let st = self.lock();
            st.desired
                .mounts
                .iter()
                .filter(|m| live.contains(&m.instance))
                .cloned()
                .collect()
        };
        let keys: BTreeSet<Key> = want.iter().map(|m| (m.instance, m.connection)).collect();
        self.remove_unwanted(&live, &keys);
        for m in &want {
            let k = (m.instance, m.connection);
            let h = match self.ensure(m) {
                Ok(Health::Ok) => (BucketHealth::Mounted, None),
                Ok(Health::NotMounted) => (BucketHealth::Failed, Some("not mounted".into())),
                // Left mounted: s3fs answers again when the endpoint does,
                // and the guest gets I/O errors meanwhile.
                Ok(Health::Bad(why)) => (BucketHealth::Failed, Some(why)),
                Err(e) => {
                    tracing::warn!(instance = %m.instance, connection = %m.connection,
                        bucket = %m.bucket, error = %e, "bucket not mounted");
                    (BucketHealth::Failed, Some(e.to_string()))
                }
            };
            self.lock().health.insert(k, h);
        }
        {
            let mut st = self.lock();
            st.health.retain(|k, _| keys.contains(k));
        }
        for id in &live {
            if let Err(e) = self.write_manifest(*id, &want) {
                tracing::warn!(instance = %id, error = %e, "cannot write the bucket manifest");
            }
        }
    }

    /// Mounts `m` unless it is mounted as asked; answers its health.
    fn ensure(&self, m: &BucketMount) -> Result<Health, BucketError> {
        let k = (m.instance, m.connection);
        let at = self.mount_dir(k);
        let fp = fingerprint(m);
        let known = self.lock().mounted.get(&k).copied();
        let health = self.mounter.health(&at);
        if health != Health::NotMounted {
            match known {
                Some(f) if f == fp => return Ok(health),
                // Found mounted after an agent restart: adopted as it is.
                None => {
                    self.lock().mounted.insert(k, fp);
                    return Ok(health);
                }
                // Asked differently now (read-only, a new key): remounted.
                Some(_) => {
                    self.mounter.unmount(&at)?;
                    self.lock().mounted.remove(&k);
                }
            }
        }
        if self.share_dir(m.instance)?.is_none() {
            // No share: mount beside where it would be, for health only.
            fsutil::create_dir(&self.instance_dir(m.instance).join("share"), 0o755)?;
        }
        fsutil::create_dir(&at, 0o755)?;
        let line = format!(
            "{}:{}:{}\n",
            m.bucket,
            m.access_key_id,
            m.secret_access_key.expose()
        );
        let passwd = self.passwd_file(k);
        fsutil::write_atomic(&passwd, line.as_bytes(), 0o600)?;
        self.mounter.mount(m, &passwd, &at)?;
        self.lock().mounted.insert(k, fp);
        tracing::info!(instance = %m.instance, connection = %m.connection, bucket = %m.bucket,
            read_only = m.read_only, "bucket mounted");
        Ok(self.mounter.health(&at))
    }

    /// Unmounts and removes every mount under `buckets/` that is not in
    /// `keys`, and the directories of instances not `live`.
    fn remove_unwanted(&self, live: &BTreeSet<InstanceId>, keys: &BTreeSet<Key>) {
        let Ok(dirs) = std::fs::read_dir(&self.root) else {
            return;
        };
        for d in dirs.flatten() {
            let Some(id) = d
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<InstanceId>().ok())
            else {
                continue;
            };
            let share = d.path().join("share");
            let mut clean = true;
            for e in std::fs::read_dir(&share).into_iter().flatten().flatten() {
                let Some(conn) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<StorageConnectionId>().ok())
                else {
                    continue;
                };
                if keys.contains(&(id, conn)) {
                    continue;
                }
                if let Err(e) = self.unmount_one((id, conn)) {
                    tracing::warn!(instance = %id, connection = %conn, error = %e,
                        "bucket not unmounted; retried later");
                    clean = false;
                }
            }
            if !live.contains(&id) && clean {
                if let Err(e) = std::fs::remove_dir_all(d.path()) {
                    tracing::warn!(instance = %id, error = %e, "cannot remove the bucket share");
                }
            }
        }
    }

    fn unmount_one(&self, k: Key) -> Result<(), BucketError> {
        let at = self.mount_dir(k);
        self.mounter.unmount(&at)?;
        self.lock().mounted.remove(&k);
        // Only an empty directory goes (never a mount's contents).
        let _ = std::fs::remove_dir(&at);
        let _ = std::fs::remove_file(self.passwd_file(k));
        let _ = std::fs::remove_file(mounter::log_file(&self.passwd_file(k)));
        tracing::info!(instance = %k.0, connection = %k.1, "bucket unmounted");
        Ok(())
    }

    /// Writes the share's manifest of `id`: its mounts (a mount that stops
    /// answering stays listed: the guest gets I/O errors, then the data
    /// again when the endpoint is back).
    fn write_manifest(&self, id: InstanceId, want: &[BucketMount]) -> Result<(), BucketError> {
        let share = self.instance_dir(id).join("share");
        if !share.is_dir() {
            return Ok(());
        }
        let text = {
            let st = self.lock();
            guest::manifest(want.iter().filter(|m| {
                m.instance == id && st.mounted.contains_key(&(m.instance, m.connection))
            }))
        };
        let path = share.join(MANIFEST);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        fsutil::write_atomic(&path, text.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Each attachment's health, for the heartbeat.
    pub fn reports(&self) -> Vec<BucketReport> {
        let st = self.lock();
        st.desired
            .mounts
            .iter()
            .filter_map(|m| {
                let (health, detail) = st.health.get(&(m.instance, m.connection))?.clone();
                Some(BucketReport {
                    instance: m.instance,
                    connection: m.connection,
                    health,
                    detail,
                })
            })
            .collect()
    }
}
