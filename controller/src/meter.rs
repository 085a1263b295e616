//! Snapshot storage billed as an integral: each account is charged for
//! its own deduplicated compressed bytes (as the hosts report them in
//! `AgentHeartbeat::store`) integrated over time.
//!
//! Per account the row keeps the current figure (`snapshot_bytes`), the
//! time it has been accrued up to (`snapshot_bytes_since_ms`), the
//! byte-ms accrued and not yet charged, and the remainder of the last
//! charge below one micro-unit. A store report that changes an account's
//! figure first accrues `old bytes x (now - since)` and then switches to
//! the new figure ([`Meter::switch`]); the meter tick ([`tick`], every
//! `snapshot_meter_secs` from the reconcile loop) accrues up to now too
//! and charges what has accrued at `snapshot_price_micros_per_tb_hour`.
//! The amount is `floor((rem + byte_ms x price) / 3.6e18)` with the new
//! remainder carried, so charges telescope: an interval charged in pieces
//! costs exactly what it costs charged whole. A charge above `i64::MAX`
//! byte-ms is written as several ledger rows (kind `snapshot`, quantity
//! byte-ms), each telescoping the same way.
//!
//! The figure: with host-local stores, the sum over hosts of their last
//! report; with a shared store (`snapshot_store_shared`) every host
//! reports the same store, so the account counts once: the figure is the
//! newest report's (an account absent from it holds nothing).
//!
//! A host bills only what it holds: a store report's entry for an account
//! the host serves nothing of (no instance or open operation of the
//! account on it, no snapshot of the account it took or whose store it
//! uses) is ignored and logged ([`take_report`]). Figures are range-checked
//! at the edge (`AgentHeartbeat::check_bounds`) and summed with checked
//! arithmetic; one account's failed charge is logged and never stops the
//! tick for the others.
//!
//! Times come from the billing clock (`crate::clock`); every change
//! happens under the account row's lock (taken after host and instance
//! rows), so two heartbeats or a heartbeat and a tick never accrue the
//! same interval twice.

use crate::billing::{charge, BillingError, Charge};
use crate::db::{col, parsed, DbError, Tx};
use crate::AppState;
use gantry_proto::api::agent::StoreUsage;
use gantry_proto::api::v1::UsageKind;
use gantry_proto::ids::{AccountId, HostId};
use std::collections::{BTreeMap, BTreeSet};

/// Byte-ms in one TB-ms (the unit the accrued byte-ms are stored in).
const TB: i128 = 1_000_000_000_000;
/// Byte-ms x micros-per-TB-hour in one micro-unit: 10^12 bytes x 3.6e6 ms.
pub const PER_MICRO: i128 = TB * 3_600_000;

/// An account's storage meter, as its row keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meter {
    /// The current figure: deduplicated compressed bytes.
    pub bytes: i64,
    /// Accrued up to here; `None` before the first figure.
    pub since_ms: Option<i64>,
    /// Byte-ms accrued and not yet charged.
    pub accrued: i128,
    /// byte-ms x price below one micro-unit, carried to the next charge.
    pub rem: i64,
}

/// One ledger row's worth of a storage charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub byte_ms: i64,
    pub amount_micros: i64,
}

impl Meter {
    /// Accrues the figure up to `now` (a clock that went back accrues
    /// nothing and moves nothing back).
    pub fn accrue(&mut self, now: i64) {
        match self.since_ms {
            Some(since) => {
                let dt = (now - since).max(0);
                self.accrued += i128::from(self.bytes.max(0)) * i128::from(dt);
                self.since_ms = Some(since.max(now));
            }
            None => self.since_ms = Some(now),
        }
    }

    /// Accrues the old figure up to `now`, then holds `bytes` from `now`.
    pub fn switch(&mut self, now: i64, bytes: i64) {
        self.accrue(now);
        self.bytes = bytes;
    }

    /// Takes everything accrued as charges at `price` (micros per
    /// TB-hour), in pieces of at most `i64::MAX` byte-ms.
    pub fn take(&mut self, price: i64) -> Vec<Piece> {
        let price = i128::from(price.max(0));
        let mut out = Vec::new();
        let mut rem = i128::from(self.rem);
        while self.accrued > 0 {
            let piece = self.accrued.min(i128::from(i64::MAX));
            let v = rem + piece * price;
            rem = v % PER_MICRO;
            out.push(Piece {
                byte_ms: piece as i64,
                amount_micros: i64::try_from(v / PER_MICRO).unwrap_or(i64::MAX),
            });
            self.accrued -= piece;
        }
        self.rem = rem as i64;
        out
    }
}

const METER_COLS: &str = "snapshot_bytes, snapshot_bytes_since_ms, snapshot_accrued_tb_ms, \
     snapshot_accrued_byte_ms, snapshot_charge_rem";

/// Reads an account's meter (the caller holds the row's lock).
async fn load(tx: &mut Tx, account: &AccountId) -> Result<Option<Meter>, DbError> {
    let row = sqlx::query(&format!("SELECT {METER_COLS} FROM accounts WHERE id = $1"))
        .bind(account.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let tb: i64 = col(&r, "snapshot_accrued_tb_ms")?;
    let b: i64 = col(&r, "snapshot_accrued_byte_ms")?;
    Ok(Some(Meter {
        bytes: col(&r, "snapshot_bytes")?,
        since_ms: col(&r, "snapshot_bytes_since_ms")?,
        accrued: i128::from(tb) * TB + i128::from(b),
        rem: col(&r, "snapshot_charge_rem")?,
    }))
}

async fn store(tx: &mut Tx, account: &AccountId, m: &Meter) -> Result<(), DbError> {
    let tb = i64::try_from(m.accrued / TB).unwrap_or(i64::MAX);
    sqlx::query(
        "UPDATE accounts SET snapshot_bytes = $1, snapshot_bytes_since_ms = $2, \
         snapshot_accrued_tb_ms = $3, snapshot_accrued_byte_ms = $4, snapshot_charge_rem = $5 \
         WHERE id = $6",
    )
    .bind(m.bytes)
    .bind(m.since_ms)
    .bind(tb)
    .bind((m.accrued % TB) as i64)
    .bind(m.rem)
    .bind(account.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn clamp(bytes: u64) -> i64 {
    bytes.min(i64::MAX as u64) as i64
}

/// Whether `host` holds anything of `account` it may bill storage for: an
/// instance of the account on it (not Released or Failed), an open
/// operation of the account on it, or a snapshot of the account it took
/// or that lies in the store it uses.
async fn holds(tx: &mut Tx, host: &HostId, account: &AccountId) -> Result<bool, DbError> {
    let row = sqlx::query(
        "SELECT 1 AS yes FROM accounts a WHERE a.id = $2 AND (\
         EXISTS (SELECT 1 FROM instances i WHERE i.host_id = $1 AND i.account_id = $2 \
         AND i.observed_state NOT IN ('Released', 'Failed')) OR \
         EXISTS (SELECT 1 FROM operations o WHERE o.host_id = $1 AND o.account_id = $2 \
         AND o.state IN ('pending', 'running')) OR \
         EXISTS (SELECT 1 FROM snapshots s WHERE s.account_id = $2 AND (s.host_id = $1 OR \
         s.store_id = (SELECT h.store_id FROM hosts h WHERE h.id = $1))))",
    )
    .bind(host.to_string())
    .bind(account.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.is_some())
}

/// Applies a host's store report in its heartbeat's transaction (after
/// the host row's lock): replaces the host's rows in `host_store_usage`
/// and returns the accounts whose figure may change, in id order, for
/// the caller to lock and pass to [`apply_figures`] (then
/// [`count_report`]). `store` lists each account once.
pub async fn take_report(
    tx: &mut Tx,
    host: &HostId,
    store: &[StoreUsage],
    shared: bool,
    now: i64,
) -> Result<Vec<AccountId>, DbError> {
    let found =
        sqlx::query("SELECT account_id, billed_bytes FROM host_store_usage WHERE host_id = $1")
            .bind(host.to_string())
            .fetch_all(&mut **tx)
            .await?;
    let mut old = BTreeMap::new();
    for r in &found {
        let a: AccountId = parsed(r, "account_id", "host_store_usage")?;
        old.insert(a, col::<i64>(r, "billed_bytes")?);
    }
    sqlx::query("DELETE FROM host_store_usage WHERE host_id = $1")
        .bind(host.to_string())
        .execute(&mut **tx)
        .await?;
    let mut new = BTreeMap::new();
    for u in store {
        if !holds(tx, host, &u.account).await? {
            tracing::warn!(%host, account = %u.account, billed_bytes = u.billed_bytes,
                "ignored a store report for an account this host holds nothing of");
            continue;
        }
        new.insert(u.account, clamp(u.billed_bytes));
        sqlx::query(
            "INSERT INTO host_store_usage (host_id, account_id, billed_bytes, at_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(host.to_string())
        .bind(u.account.to_string())
        .bind(clamp(u.billed_bytes))
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    let mut changed: BTreeSet<AccountId> = BTreeSet::new();
    if shared {
        // The newest report is the whole store: compare with every figure.
        let found = sqlx::query("SELECT id, snapshot_bytes FROM accounts WHERE snapshot_bytes > 0")
            .fetch_all(&mut **tx)
            .await?;
        let mut figures = BTreeMap::new();
        for r in &found {
            let a: AccountId = parsed(r, "id", "accounts")?;
            figures.insert(a, col::<i64>(r, "snapshot_bytes")?);
        }
        for a in figures.keys().chain(new.keys()) {
            if figures.get(a).copied().unwrap_or(0) != new.get(a).copied().unwrap_or(0) {
                changed.insert(*a);
            }
        }
    } else {
        for a in old.keys().chain(new.keys()) {
            if old.get(a) != new.get(a) {
                changed.insert(*a);
            }
        }
    }
    Ok(changed.into_iter().collect())
}

/// Sets the figure of each of `accounts` (whose rows the caller has
/// locked, in id order) from the store reports, accruing the old one up
/// to `now` first.
pub async fn apply_figures(
    tx: &mut Tx,
    host: &HostId,
    accounts: &[AccountId],
    shared: bool,
    now: i64,
) -> Result<(), DbError> {
    for a in accounts {
        // Shared: this host's report is the newest; else every host's,
        // summed here with checked arithmetic (each is at most
        // `MAX_STORE_BYTES`; past 63 bits the figure saturates, logged).
        let sql = if shared {
            "SELECT billed_bytes FROM host_store_usage WHERE account_id = $1 AND host_id = $2"
        } else {
            "SELECT billed_bytes FROM host_store_usage WHERE account_id = $1"
        };
        let mut q = sqlx::query(sql).bind(a.to_string());
        if shared {
            q = q.bind(host.to_string());
        }
        let mut figure: i64 = 0;
        for row in q.fetch_all(&mut **tx).await? {
            let b: i64 = col(&row, "billed_bytes")?;
            figure = figure.checked_add(b.max(0)).unwrap_or_else(|| {
                tracing::error!(account = %a, "store figure past 63 bits; held at the largest");
                i64::MAX
            });
        }
        let Some(mut m) = load(tx, a).await? else {
            continue;
        };
        if m.bytes != figure || m.since_ms.is_none() {
            m.switch(now, figure);
            store(tx, a, &m).await?;
        }
    }
    Ok(())
}

/// Counts a store report of `host` toward the quota reservations of the
/// snapshots it saved (`crate::snapshots`); after the account rows' locks
/// (host, instances, accounts, then snapshots).
pub async fn count_report(tx: &mut Tx, host: &HostId) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE snapshots SET store_reports_due = store_reports_due - 1 WHERE host_id = $1 \
         AND store_reports_due > 0",
    )
    .bind(host.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The meter tick: for every account due (`snapshot_meter_secs` since its
/// last charge) holding or owing storage, accrues up to now and charges
/// what has accrued. Returns how many accounts were charged.
pub async fn tick(st: &AppState) -> Result<usize, DbError> {
    let now = st.clock.now_ms();
    let due = now - st.cfg.snapshot_meter_secs as i64 * 1000;
    let rows = sqlx::query(
        "SELECT id, snapshot_metered_ms FROM accounts WHERE (snapshot_metered_ms IS NULL OR \
         snapshot_metered_ms <= $1) AND (snapshot_bytes > 0 OR snapshot_accrued_tb_ms > 0 OR \
         snapshot_accrued_byte_ms > 0) ORDER BY id",
    )
    .bind(due)
    .fetch_all(&st.db.pool)
    .await?;
    let mut charged = 0;
    for r in &rows {
        let account: AccountId = parsed(r, "id", "accounts")?;
        let from: Option<i64> = col(r, "snapshot_metered_ms")?;
        // One account's failure is logged; the others are still charged.
        match charge_account(st, &account, from, now).await {
            Ok(true) => charged += 1,
            Ok(false) => {}
            Err(e) => tracing::error!(%account, error = %e,
                "snapshot storage charge failed; nothing was applied, next tick tries again"),
        }
    }
    Ok(charged)
}

/// Moves an account's meter (`column`, one of the accounts table's
/// `*_metered_ms` columns) from `from` (None: never metered) to `now`,
/// unless another replica (or a restart) moved it since `from` was read.
/// The conditional move is also the account row's lock for the charge
/// that follows in `tx`. Shared by this meter and `crate::volume_meter`.
pub(crate) async fn claim_window(
    tx: &mut Tx,
    column: &'static str,
    account: &AccountId,
    from: Option<i64>,
    now: i64,
) -> Result<bool, DbError> {
    let moved = sqlx::query(&format!(
        "UPDATE accounts SET {column} = $1 WHERE id = $2 AND \
         ({column} = $3 OR ({column} IS NULL AND $3 = -1))"
    ))
    .bind(now)
    .bind(account.to_string())
    .bind(from.unwrap_or(-1))
    .execute(&mut **tx)
    .await?;
    Ok(moved.rows_affected() == 1)
}

/// Charges one account's accrued storage in one transaction, unless
/// another replica (or a restart) metered it since `from` was read.
async fn charge_account(
    st: &AppState,
    account: &AccountId,
    from: Option<i64>,
    now: i64,
) -> Result<bool, BillingError> {
    let mut tx = st.db.begin_write().await?;
    if !claim_window(&mut tx, "snapshot_metered_ms", account, from, now).await? {
        return Ok(false);
    }
    gantry_crashpoint::hit("controller.meter.window_claimed");
    let Some(mut m) = load(&mut tx, account).await? else {
        return Ok(false);
    };
    m.accrue(now);
    let price = st.cfg.snapshot_price_micros_per_tb_hour;
    let pieces = m.take(price);
    store(&mut tx, account, &m).await?;
    for p in &pieces {
        let c = Charge {
            account: *account,
            instance: None,
            kind: UsageKind::Snapshot,
            quantity: p.byte_ms,
            price_micros: price,
            amount_micros: p.amount_micros,
        };
        charge(&mut tx, &c, now).await?;
    }
    gantry_crashpoint::hit("controller.meter.before_commit");
    tx.commit().await?;
    gantry_crashpoint::hit("controller.meter.after_commit");
    Ok(!pieces.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// floor(byte_ms x price / PER_MICRO): the whole interval charged at once.
    fn whole(byte_ms: i128, price: i64) -> i128 {
        byte_ms * i128::from(price) / PER_MICRO
    }

    #[test]
    fn accrual_is_the_integral_of_the_figure() {
        let mut m = Meter::default();
        m.switch(1_000, 5); // first figure: nothing accrued before it
        m.switch(3_000, 7); // 5 bytes for 2 s
        m.accrue(4_000); // 7 bytes for 1 s
        assert_eq!(m.accrued, 5 * 2_000 + 7 * 1_000);
        m.accrue(3_500); // the clock went back: nothing, nothing moves back
        assert_eq!((m.accrued, m.since_ms), (17_000, Some(4_000)));
    }

    #[test]
    fn charges_telescope_without_drift() {
        let price = 123_457; // micros per TB-hour
        let bytes: i64 = 3_333_333_333_333;
        let spans = [1, 999, 1_000, 7_777, 3_600_000, 59, 86_400_000];
        let mut m = Meter::default();
        let (mut t, mut total, mut amount) = (0i64, 0i128, 0i128);
        m.switch(t, bytes);
        for dt in spans {
            t += dt;
            m.accrue(t);
            total += i128::from(bytes) * i128::from(dt);
            amount += m
                .take(price)
                .iter()
                .map(|p| i128::from(p.amount_micros))
                .sum::<i128>();
            assert_eq!(amount, whole(total, price), "after {t} ms");
        }
        assert_eq!(m.accrued, 0);
    }

    #[test]
    fn huge_charges_are_split_into_rows_that_telescope() {
        let mut m = Meter {
            accrued: 3 * i128::from(i64::MAX) + 12_345,
            ..Meter::default()
        };
        let all = m.accrued;
        let pieces = m.take(100_000);
        assert_eq!(pieces.len(), 4);
        assert_eq!(
            pieces.iter().map(|p| i128::from(p.byte_ms)).sum::<i128>(),
            all
        );
        let sum: i128 = pieces.iter().map(|p| i128::from(p.amount_micros)).sum();
        assert_eq!(sum, whole(all, 100_000));
        assert!(m.take(100_000).is_empty());
    }
}
