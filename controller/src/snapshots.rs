//! Snapshot records beyond the routes (`api::snapshots`): the one setter
//! every change of a snapshot's status goes through, and the snapshot
//! quota with its reservations.
//!
//! **Status.** [`set_status`] reads the status in the caller's
//! transaction, applies [`SnapshotStatus::transition`] (`Creating ->
//! Success | Failed`) and writes it with a conditional update; a change
//! the machine refuses (a stale report that would turn Success into
//! Failed, say) is logged and ignored. A new snapshot is inserted as
//! Creating; nothing else writes the column.
//!
//! **Quota.** `snapshot_quota_gib` is checked against the account's
//! deduplicated compressed bytes as the hosts last reported them (the
//! figure storage is billed on, `accounts.snapshot_bytes`) plus what is
//! reserved for snapshots that figure does not hold yet:
//! - a snapshot still Creating reserves its instance's root disk size
//!   (`snapshots.reserved_bytes`): the most it can add to the store, since
//!   it holds at most the disk's guest-visible bytes and the protocol
//!   refuses a compressed size above that. The cost to the user: while a
//!   snapshot is being saved, the quota must have room for its whole root
//!   disk, even when the changes since the previous snapshot are small;
//! - a snapshot just saved reserves its compressed size until its host
//!   has sent two more store reports (`store_reports_due`; the first may
//!   have been measured before the snapshot was published).
//!
//! The check runs in the snapshot's write transaction under a lock on
//! the account row (taken after the instance row: host, instances,
//! accounts, then snapshots, as everywhere), so concurrent requests see
//! each other's reservations and together never exceed the quota.

use crate::db::{parsed, rows, DbError, Tx};
use gantry_proto::api::v1::AccountInfo;
use gantry_proto::ids::{AccountId, SnapshotId};
use gantry_proto::SnapshotStatus;

pub const GIB: u64 = 1 << 30;

/// Store reports of its host that a saved snapshot waits for before the
/// account's figure surely holds it.
pub const STORE_REPORTS_DUE: i64 = 2;

/// Moves snapshot `id` to `to` through [`SnapshotStatus::transition`].
/// Returns whether it moved: an unknown snapshot, a refused transition
/// (logged) or a concurrent change leave the row as it is.
pub async fn set_status(tx: &mut Tx, id: SnapshotId, to: SnapshotStatus) -> Result<bool, DbError> {
    let row = sqlx::query("SELECT status FROM snapshots WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else {
        tracing::warn!(snapshot = %id, to = %to, "no such snapshot; status not changed");
        return Ok(false);
    };
    let from: SnapshotStatus = parsed(&row, "status", "snapshots")?;
    if let Err(e) = from.transition(to) {
        tracing::warn!(snapshot = %id, error = %e, "ignoring a stale snapshot status");
        return Ok(false);
    }
    let done = sqlx::query("UPDATE snapshots SET status = $1 WHERE id = $2 AND status = $3")
        .bind(to.name())
        .bind(id.to_string())
        .bind(from.name())
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Snapshot `id` failed (its operation failed or timed out): Failed with
/// the reason, through [`set_status`].
pub async fn fail(tx: &mut Tx, id: SnapshotId, why: &str) -> Result<(), DbError> {
    if set_status(tx, id, SnapshotStatus::Failed).await? {
        sqlx::query("UPDATE snapshots SET error = $1 WHERE id = $2")
            .bind(why)
            .bind(id.to_string())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// What a snapshot of an instance with this root disk reserves while it
/// is Creating.
pub fn reservation(root_disk_gib: u64) -> u64 {
    root_disk_gib.saturating_mul(GIB)
}

/// Locks the account row (in the caller's write transaction) and reads
/// it with its stored and reserved snapshot bytes.
pub async fn lock_account(
    tx: &mut Tx,
    account: &AccountId,
) -> Result<Option<AccountInfo>, DbError> {
    sqlx::query("UPDATE accounts SET snapshot_quota_gib = snapshot_quota_gib WHERE id = $1")
        .bind(account.to_string())
        .execute(&mut **tx)
        .await?;
    let sql = format!("SELECT {} FROM accounts WHERE id = $1", rows::ACCOUNT_COLS);
    let row = sqlx::query(&sql)
        .bind(account.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(rows::account).transpose()
}

/// Whether `need` more bytes fit the account's quota; the refusal is a
/// sentence naming the quota and what holds it.
pub fn check_quota(a: &AccountInfo, need: u64) -> Result<(), String> {
    let quota = a.snapshot_quota_gib.saturating_mul(GIB);
    let held = a
        .snapshot_used_bytes
        .saturating_add(a.snapshot_reserved_bytes);
    if held.saturating_add(need) <= quota {
        return Ok(());
    }
    Err(format!(
        "account {} has no snapshot quota left for this snapshot: snapshot_quota_gib is {} GiB, \
         {} are stored and {} reserved by snapshots being saved, and this one reserves {} (the \
         instance's root disk) until it is saved; delete snapshots, wait for those being saved \
         or ask for a larger quota",
        a.name,
        a.snapshot_quota_gib,
        gib(a.snapshot_used_bytes),
        gib(a.snapshot_reserved_bytes),
        gib(need)
    ))
}

/// Bytes as GiB for sentences.
fn gib(bytes: u64) -> String {
    if bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acct(quota_gib: u64, used: u64, reserved: u64) -> AccountInfo {
        AccountInfo {
            id: AccountId::new(),
            name: "acme".into(),
            credit_micros: 1,
            billing_profile_complete: true,
            snapshot_quota_gib: quota_gib,
            snapshot_used_bytes: used,
            snapshot_reserved_bytes: reserved,
            created_at: chrono::Utc::now(),
            status: Default::default(),
        }
    }

    #[test]
    fn quota_holds_stored_and_reserved_bytes() {
        assert!(check_quota(&acct(100, 0, 0), reservation(100)).is_ok());
        assert!(check_quota(&acct(100, 1, 0), reservation(100)).is_err());
        assert!(check_quota(&acct(100, 30 * GIB, 20 * GIB), reservation(50)).is_ok());
        let e = check_quota(&acct(100, 30 * GIB, GIB / 2), reservation(70)).unwrap_err();
        assert!(e.contains("snapshot_quota_gib is 100 GiB"), "{e}");
        assert!(e.contains("30 GiB are stored and 0.50 GiB reserved"), "{e}");
        assert!(check_quota(&acct(0, 0, 0), 1).is_err());
    }
}
