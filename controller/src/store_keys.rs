//! Snapshot-store chunk keys, owned by the controller, and which hosts can
//! read a snapshot.
//!
//! **Keys.** Every account has one *current* 32-byte key that names the
//! chunks its snapshots are written under (blake3 keyed hashing in the
//! store), made here on first need, and possibly *previous* keys: ones a
//! host made itself before the controller kept the account's key, offered
//! by that host (adopted as current when the account had none, else kept),
//! so that snapshots written under them stay restorable. Keys are sealed
//! at rest ([`crate::secrets`], context `store_keys.key:<account>:<fp>`),
//! never logged (only a one-way fingerprint is) and never in a tenant's
//! answer. A host gets an account's keys over the agent protocol only while
//! it serves that account ([`host_serves`]): an instance of the account
//! on it, an open operation of the account for it, or a snapshot of the
//! account it took.
//!
//! **Availability.** Hosts report the store they use (kind and id) in
//! heartbeats; a snapshot records its host's store. A snapshot can make
//! instances while a live host (not revoked, not down, heard from within
//! the heartbeat timeout) reports the same store id, and placement is
//! limited to such hosts: for a host-local store that is exactly the
//! snapshot's host; for a shared (S3) store every host configured alike.

use crate::db::{col, now_ms, DbError};
use crate::error::{ApiError, ApiResult};
use crate::secrets::SecretError;
use crate::AppState;
use gantry_proto::api::agent::{StoreIdentity, StoreKeys, StoreKind};
use gantry_proto::api::v1::SnapshotInfo;
use gantry_proto::ids::{AccountId, HostId, SnapshotId};
use gantry_proto::net::Secret;
use sqlx::any::AnyRow;
use std::collections::HashMap;

/// A chunk key's length.
pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum StoreKeyError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Sealed(#[from] SecretError),
    #[error("no account {0}")]
    NoAccount(AccountId),
    #[error("{field} must be 64 hex digits (a 32-byte chunk key)")]
    BadKey { field: &'static str },
}

impl From<sqlx::Error> for StoreKeyError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
    }
}

impl From<StoreKeyError> for ApiError {
    fn from(e: StoreKeyError) -> Self {
        match e {
            StoreKeyError::Db(e) => ApiError::Db(e),
            StoreKeyError::NoAccount(a) => ApiError::NotFound(format!("no account {a}")),
            e @ StoreKeyError::BadKey { field } => ApiError::invalid(field, e.to_string()),
            StoreKeyError::Sealed(e) => {
                // A key that does not open is the operator's to fix (a
                // replaced secret.key); say so without the value.
                tracing::error!(error = %e, "a stored chunk key does not open");
                ApiError::Conflict(format!(
                    "the account's chunk key cannot be opened with this controller's secret key: {e}"
                ))
            }
        }
    }
}

/// A 32-byte key from its 64 hex digits.
pub fn parse_key(hex: &str, field: &'static str) -> Result<[u8; KEY_LEN], StoreKeyError> {
    let ok = hex.len() == KEY_LEN * 2 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(StoreKeyError::BadKey { field });
    }
    blake3::Hash::from_hex(hex)
        .map(|h| *h.as_bytes())
        .map_err(|_| StoreKeyError::BadKey { field })
}

/// A one-way name for a key, safe to log and store in the clear.
pub fn fingerprint(key: &[u8; KEY_LEN]) -> String {
    blake3::derive_key("gantry store key fingerprint v1", key)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The sealing context of one key row.
pub fn context(account: &AccountId, fingerprint: &str) -> String {
    format!("store_keys.key:{account}:{fingerprint}")
}

fn hex(key: &[u8; KEY_LEN]) -> String {
    blake3::Hash::from_bytes(*key).to_hex().to_string()
}

/// Whether `host` serves `account` now: an instance of the account is on
/// it (not Released or Failed), an operation of the account for it is
/// open, or it took a snapshot of the account.
pub async fn host_serves(
    st: &AppState,
    host: &HostId,
    account: &AccountId,
) -> Result<bool, StoreKeyError> {
    let row = sqlx::query(
        "SELECT 1 AS yes FROM accounts a WHERE a.id = $2 AND (\
         EXISTS (SELECT 1 FROM instances i WHERE i.host_id = $1 AND i.account_id = $2 \
         AND i.observed_state NOT IN ('Released', 'Failed')) OR \
         EXISTS (SELECT 1 FROM operations o WHERE o.host_id = $1 AND o.account_id = $2 \
         AND o.state IN ('pending', 'running')) OR \
         EXISTS (SELECT 1 FROM snapshots s WHERE s.host_id = $1 AND s.account_id = $2))",
    )
    .bind(host.to_string())
    .bind(account.to_string())
    .fetch_optional(&st.db.pool)
    .await?;
    Ok(row.is_some())
}

async fn account_exists(st: &AppState, account: &AccountId) -> Result<(), StoreKeyError> {
    let row = sqlx::query("SELECT 1 AS yes FROM accounts WHERE id = $1")
        .bind(account.to_string())
        .fetch_optional(&st.db.pool)
        .await?;
    row.map(|_| ()).ok_or(StoreKeyError::NoAccount(*account))
}

/// Inserts a key row unless it (or, for a current key, any current key of
/// the account) exists already. Returns whether it was inserted.
async fn insert_key(
    st: &AppState,
    account: &AccountId,
    key: &[u8; KEY_LEN],
    current: bool,
    origin: &str,
) -> Result<bool, StoreKeyError> {
    let fp = fingerprint(key);
    let sealed = st.sealer.seal(&context(account, &fp), &hex(key));
    let done = sqlx::query(
        "INSERT INTO store_keys (account_id, fingerprint, key_sealed, is_current, origin, \
         created_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(account.to_string())
    .bind(&fp)
    .bind(sealed)
    .bind(i64::from(current))
    .bind(origin)
    .bind(now_ms())
    .execute(&st.db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The account's keys as stored: (current, previous), opened.
async fn load(st: &AppState, account: &AccountId) -> Result<Option<StoreKeys>, StoreKeyError> {
    let rows = sqlx::query(
        "SELECT fingerprint, key_sealed, is_current FROM store_keys WHERE account_id = $1 \
         ORDER BY created_ms, fingerprint",
    )
    .bind(account.to_string())
    .fetch_all(&st.db.pool)
    .await?;
    let mut current = None;
    let mut previous = Vec::new();
    for r in &rows {
        let fp: String = col(r, "fingerprint")?;
        let sealed: String = col(r, "key_sealed")?;
        let key = st.sealer.open(&context(account, &fp), &sealed)?;
        if col::<i64>(r, "is_current")? != 0 {
            current = Some(key);
        } else {
            previous.push(key);
        }
    }
    Ok(current.map(|current| StoreKeys {
        account: *account,
        current,
        previous,
    }))
}

/// The account's keys, its current key made now if it has none yet.
pub async fn keys_for(st: &AppState, account: &AccountId) -> Result<StoreKeys, StoreKeyError> {
    if let Some(k) = load(st, account).await? {
        return Ok(k);
    }
    account_exists(st, account).await?;
    let key: [u8; KEY_LEN] = rand::random();
    if insert_key(st, account, &key, true, "controller").await? {
        tracing::info!(%account, fingerprint = fingerprint(&key), "made the account's chunk key");
    }
    // Another request may have won the race: the stored one counts.
    load(st, account)
        .await?
        .ok_or(StoreKeyError::NoAccount(*account))
}

/// A host's own key for `account`: the account's current key when it has
/// none yet, else kept as a previous key (unless it is the current one).
pub async fn offer(
    st: &AppState,
    host: &HostId,
    account: &AccountId,
    key: &Secret,
) -> Result<StoreKeys, StoreKeyError> {
    let key = parse_key(key.expose(), "key")?;
    account_exists(st, account).await?;
    let origin = format!("host:{host}");
    let fp = fingerprint(&key);
    if insert_key(st, account, &key, true, &origin).await? {
        tracing::info!(%account, %host, fingerprint = fp, "adopted a host's chunk key as the account's");
    } else if insert_key(st, account, &key, false, &origin).await? {
        tracing::warn!(%account, %host, fingerprint = fp, "a host offered a chunk key other than the account's; kept as a previous key");
    }
    load(st, account)
        .await?
        .ok_or(StoreKeyError::NoAccount(*account))
}

/// Records the store a host reported (nothing when it reports none).
pub async fn record_host_store(
    tx: &mut crate::db::Tx,
    host: &HostId,
    store: Option<&StoreIdentity>,
) -> ApiResult<()> {
    let Some(s) = store else { return Ok(()) };
    sqlx::query(
        "UPDATE hosts SET store_kind = $1, store_id = $2 WHERE id = $3 AND \
         (store_id IS NULL OR store_id <> $2 OR store_kind <> $1)",
    )
    .bind(s.kind.name())
    .bind(&s.id)
    .bind(host.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Checks a reported store identity.
pub fn check_store_identity(store: Option<&StoreIdentity>) -> ApiResult<()> {
    if let Some(s) = store {
        s.validate("store_identity")?;
    }
    Ok(())
}

/// The SQL condition of a live host (alias `h`): not revoked, removed or
/// down, heard from since `$cutoff`.
fn live_host(cutoff: &str) -> String {
    format!(
        "h.revoked_ms IS NULL AND h.removed_ms IS NULL AND h.down_since_ms IS NULL AND \
         h.last_heartbeat_ms >= {cutoff}"
    )
}

/// The columns of a snapshots row that [`SnapStore::from_row`] reads.
pub const SNAPSHOT_STORE_COLS: &str = "host_id AS store_host_id, store_kind, store_id";

/// Where a snapshot's bytes are, for availability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapStore {
    pub host: Option<HostId>,
    pub kind: Option<StoreKind>,
    pub id: Option<String>,
}

impl SnapStore {
    /// Reads [`SNAPSHOT_STORE_COLS`] of a snapshots row.
    pub fn from_row(r: &AnyRow) -> Result<Self, DbError> {
        let kind: Option<String> = col(r, "store_kind")?;
        Ok(Self {
            host: crate::db::parsed_opt(r, "store_host_id", "snapshots")?,
            kind: kind.as_deref().and_then(StoreKind::parse),
            id: col(r, "store_id")?,
        })
    }
}

/// `None` when a snapshot can make instances, else why not. `store_read`:
/// whether a live host reads its store id; `host_live`: its host's row
/// (`None`: removed) and whether that host is live.
pub fn unavailable(
    snap: &SnapshotId,
    s: &SnapStore,
    shared: bool,
    store_read: bool,
    host_live: Option<bool>,
) -> Option<String> {
    match (&s.id, s.host) {
        (Some(_), _) if store_read => None,
        (Some(_), Some(h)) if s.kind == Some(StoreKind::Local) => Some(match host_live {
            Some(_) => format!(
                "snapshot {snap} is stored on host {h}'s local store and that host is down or \
                 revoked; it can be used again when the host is back"
            ),
            None => format!(
                "snapshot {snap} was stored on host {h}'s local store and that host was \
                 removed, so it can no longer be restored"
            ),
        }),
        (Some(_), _) => Some(format!(
            "snapshot {snap} is on a store no live host reads now"
        )),
        // Before hosts reported stores: the snapshot's host, or any host
        // with `snapshot_store_shared`.
        (None, Some(h)) if !shared && host_live != Some(true) => Some(format!(
            "snapshot {snap} is stored on host {h}, which is down, revoked or removed"
        )),
        (None, _) => None,
    }
}

/// Answers availability for many snapshots, one query per store id or
/// host looked at.
pub struct Availability<'a> {
    st: &'a AppState,
    cutoff: i64,
    stores: HashMap<String, bool>,
    hosts: HashMap<HostId, Option<bool>>,
}

impl<'a> Availability<'a> {
    pub fn new(st: &'a AppState) -> Self {
        Self {
            st,
            cutoff: now_ms() - st.cfg.heartbeat_timeout_secs as i64 * 1000,
            stores: HashMap::new(),
            hosts: HashMap::new(),
        }
    }

    async fn store_read(&mut self, id: &str) -> ApiResult<bool> {
        if let Some(r) = self.stores.get(id) {
            return Ok(*r);
        }
        let sql = format!(
            "SELECT 1 AS yes FROM hosts h WHERE h.store_id = $1 AND {} LIMIT 1",
            live_host("$2")
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(self.cutoff)
            .fetch_optional(&self.st.db.pool)
            .await?;
        self.stores.insert(id.to_string(), row.is_some());
        Ok(row.is_some())
    }

    async fn host_live(&mut self, h: HostId) -> ApiResult<Option<bool>> {
        if let Some(r) = self.hosts.get(&h) {
            return Ok(*r);
        }
        let sql = format!(
            "SELECT CAST(CASE WHEN {} THEN 1 ELSE 0 END AS BIGINT) AS live FROM hosts h \
             WHERE h.id = $2 AND h.removed_ms IS NULL",
            live_host("$1")
        );
        let row = sqlx::query(&sql)
            .bind(self.cutoff)
            .bind(h.to_string())
            .fetch_optional(&self.st.db.pool)
            .await?;
        let live = match row {
            Some(r) => Some(col::<i64>(&r, "live")? != 0),
            None => None,
        };
        self.hosts.insert(h, live);
        Ok(live)
    }

    /// `None` when the snapshot can make instances, else why not.
    pub async fn check(&mut self, snap: &SnapshotId, s: &SnapStore) -> ApiResult<Option<String>> {
        let shared = self.st.cfg.snapshot_store_shared;
        let store_read = match &s.id {
            Some(id) => self.store_read(id).await?,
            None => false,
        };
        let host_live = match s.host {
            Some(h) if !store_read => self.host_live(h).await?,
            _ => Some(true),
        };
        Ok(unavailable(snap, s, shared, store_read, host_live))
    }

    /// Sets `available` and `unavailable_reason` of a snapshot read with
    /// [`SNAPSHOT_STORE_COLS`] (only a Success one can be available).
    pub async fn mark(&mut self, snap: &mut SnapshotInfo, row: &AnyRow) -> ApiResult<()> {
        let why = match snap.status {
            gantry_proto::SnapshotStatus::Success => {
                self.check(&snap.id, &SnapStore::from_row(row)?).await?
            }
            other => Some(format!(
                "snapshot {} is {}, not Success",
                snap.id,
                other.name()
            )),
        };
        snap.available = why.is_none();
        snap.unavailable_reason = why;
        Ok(())
    }
}

/// What an instance made from a snapshot needs of its host.
#[derive(Debug, Clone, Copy)]
pub struct Room {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub gpus: u32,
}

/// Live, uncordoned hosts reading store `id`, those with the most free
/// vCPUs first; with `room`, only those with that much free capacity.
async fn reading_hosts(st: &AppState, id: &str, room: Option<Room>) -> ApiResult<Vec<HostId>> {
    let cutoff = now_ms() - st.cfg.heartbeat_timeout_secs as i64 * 1000;
    let fits = if room.is_some() {
        " AND h.vcpus - h.used_vcpus >= $3 AND h.memory_mib - h.used_memory_mib >= $4 \
         AND h.disk_gib - h.used_disk_gib >= $5 AND h.gpu_free >= $6"
    } else {
        " AND $3 >= 0 AND $4 >= 0 AND $5 >= 0 AND $6 >= 0"
    };
    let sql = format!(
        "SELECT h.id FROM hosts h WHERE h.store_id = $1 AND h.cordoned = 0 AND {}{fits} \
         ORDER BY h.vcpus - h.used_vcpus DESC, h.id LIMIT 1",
        live_host("$2")
    );
    let r = room.unwrap_or(Room {
        vcpus: 0,
        memory_mib: 0,
        disk_gib: 0,
        gpus: 0,
    });
    let rows = sqlx::query(&sql)
        .bind(id)
        .bind(cutoff)
        .bind(i64::from(r.vcpus))
        .bind(r.memory_mib.min(i64::MAX as u64) as i64)
        .bind(r.disk_gib.min(i64::MAX as u64) as i64)
        .bind(i64::from(r.gpus))
        .fetch_all(&st.db.pool)
        .await?;
    rows.iter()
        .map(|r| crate::db::parsed(r, "id", "hosts").map_err(ApiError::from))
        .collect()
}

/// Whether every live, uncordoned host reads store `id` (then placement
/// needs no limit).
async fn all_hosts_read(st: &AppState, id: &str) -> ApiResult<bool> {
    let cutoff = now_ms() - st.cfg.heartbeat_timeout_secs as i64 * 1000;
    let sql = format!(
        "SELECT 1 AS yes FROM hosts h WHERE h.cordoned = 0 AND {} AND \
         (h.store_id IS NULL OR h.store_id <> $2) LIMIT 1",
        live_host("$1")
    );
    let other = sqlx::query(&sql)
        .bind(cutoff)
        .bind(id)
        .fetch_optional(&st.db.pool)
        .await?;
    Ok(other.is_none())
}

/// Where an instance made from `snap` may be placed: refused (409, with
/// the reason) when no live host reads its store; `None` when any host
/// may; else the one host to place it on (among those reading its store,
/// one with room, the one with the most free vCPUs; for a host-local
/// store, the snapshot's host).
pub async fn restore_pin(st: &AppState, snap: SnapshotId, room: Room) -> ApiResult<Option<HostId>> {
    let row = sqlx::query(&format!(
        "SELECT {SNAPSHOT_STORE_COLS} FROM snapshots WHERE id = $1"
    ))
    .bind(snap.to_string())
    .fetch_optional(&st.db.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no snapshot {snap}")))?;
    let s = SnapStore::from_row(&row)?;
    if let Some(why) = Availability::new(st).check(&snap, &s).await? {
        return Err(ApiError::Conflict(why));
    }
    let Some(id) = &s.id else {
        return Ok(s.host.filter(|_| !st.cfg.snapshot_store_shared));
    };
    if all_hosts_read(st, id).await? {
        return Ok(None);
    }
    let fitting = reading_hosts(st, id, Some(room)).await?;
    let any = match fitting.first() {
        Some(h) => return Ok(Some(*h)),
        // None has room: the scheduler says what is missing on one.
        None => reading_hosts(st, id, None).await?,
    };
    Ok(any.first().copied().or(s.host))
}

/// Records with a new snapshot the store of the host taking it.
pub async fn record_snapshot_store(
    tx: &mut crate::db::Tx,
    snapshot: SnapshotId,
    host: Option<&HostId>,
) -> ApiResult<()> {
    let Some(host) = host else { return Ok(()) };
    sqlx::query(
        "UPDATE snapshots SET store_kind = (SELECT h.store_kind FROM hosts h WHERE h.id = $1), \
         store_id = (SELECT h.store_id FROM hosts h WHERE h.id = $1) WHERE id = $2",
    )
    .bind(host.to_string())
    .bind(snapshot.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_fingerprints_do_not_show_them() {
        let k = [0xabu8; KEY_LEN];
        let h = hex(&k);
        assert_eq!(parse_key(&h, "key").unwrap(), k);
        let fp = fingerprint(&k);
        assert_eq!(fp.len(), 32);
        assert!(!h.contains(&fp));
        assert_ne!(fp, fingerprint(&[0xac; KEY_LEN]));
        for bad in ["", "xyz", &h[..62], &format!("{h}00"), &"g".repeat(64)] {
            assert!(parse_key(bad, "key").is_err(), "{bad}");
        }
    }

    #[test]
    fn availability_follows_the_stores_live_hosts() {
        let b = HostId::new();
        let snap = SnapshotId::new();
        let s3 = SnapStore {
            host: Some(b),
            kind: Some(StoreKind::S3),
            id: Some("s3-1".into()),
        };
        assert_eq!(unavailable(&snap, &s3, false, true, Some(false)), None);
        let why = unavailable(&snap, &s3, false, false, Some(false)).unwrap();
        assert!(why.contains("no live host reads"), "{why}");
        let local = SnapStore {
            host: Some(b),
            kind: Some(StoreKind::Local),
            id: Some("local-b".into()),
        };
        assert_eq!(unavailable(&snap, &local, false, true, Some(true)), None);
        let why = unavailable(&snap, &local, false, false, Some(false)).unwrap();
        assert!(why.contains("down or revoked"), "{why}");
        let why = unavailable(&snap, &local, false, false, None).unwrap();
        assert!(why.contains("removed"), "{why}");
        let old = SnapStore {
            host: Some(b),
            kind: None,
            id: None,
        };
        assert!(unavailable(&snap, &old, false, false, Some(false)).is_some());
        assert_eq!(unavailable(&snap, &old, false, false, Some(true)), None);
        assert_eq!(unavailable(&snap, &old, true, false, None), None);
    }
}
