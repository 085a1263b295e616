//! Data volume storage billed as an integral, like snapshot storage
//! (`crate::meter`): each account is charged for the GiB of its placed
//! volumes integrated over time, at `volume_price_micros_per_gib_hour`
//! (0, the default: volumes are not billed).
//!
//! The figure is what the controller's own rows say: the sum of
//! `volumes.settled_gib` (the size the host has confirmed) over the
//! account's volumes that have a host and are not being deleted. So a
//! volume is billed from the moment it is placed (first attached, or
//! created on a host) until its deletion is asked for; a grow is billed at
//! the new size once the host has carried it out.
//!
//! Per account the row keeps the figure (`volume_gib`), the time it has
//! been accrued up to, the GiB-ms accrued and not yet charged, the
//! remainder of the last charge below one micro-unit, and when it was
//! last charged (`volume_metered_ms`). A handler that changes the figure
//! calls [`sync`] in its transaction (after the host and instance rows'
//! locks): the old figure is accrued up to now, then the new one holds.
//! Changes made where no billing clock is at hand (an operation that ends
//! on its host's report) are picked up by the next [`tick`], which
//! charges at the figure it had accrued so far: a tenant is never charged
//! for a grow its host has not carried out. The amount is
//! `floor((rem + gib_ms x price) / 3.6e6)` with the remainder carried, so
//! charges telescope; the conditional move of `volume_metered_ms` makes a
//! tick exactly-once per account under retries and replicas.

use crate::billing::{charge, BillingError, Charge};
use crate::db::{col, parsed, DbError, Tx};
use crate::AppState;
use gantry_proto::api::v1::UsageKind;
use gantry_proto::ids::AccountId;

/// GiB-ms x micros-per-GiB-hour in one micro-unit (ms in an hour).
pub const PER_MICRO: i128 = 3_600_000;

/// An account's volume meter, as its row keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meter {
    /// The figure: GiB of placed volumes.
    pub gib: i64,
    /// Accrued up to here; `None` before the first figure.
    pub since_ms: Option<i64>,
    /// GiB-ms accrued and not yet charged.
    pub accrued: i64,
    /// GiB-ms x price below one micro-unit, carried to the next charge.
    pub rem: i64,
}

impl Meter {
    /// Accrues the figure up to `now` (a clock that went back accrues
    /// nothing and moves nothing back).
    pub fn accrue(&mut self, now: i64) {
        match self.since_ms {
            Some(since) => {
                let dt = (now - since).max(0);
                self.accrued = self
                    .accrued
                    .saturating_add(self.gib.max(0).saturating_mul(dt));
                self.since_ms = Some(since.max(now));
            }
            None => self.since_ms = Some(now),
        }
    }

    /// Accrues the old figure up to `now`, then holds `gib` from `now`.
    pub fn switch(&mut self, now: i64, gib: i64) {
        self.accrue(now);
        self.gib = gib;
    }

    /// Takes what has accrued as one charge at `price` (micros per
    /// GiB-hour): `(GiB-ms, amount)`, or `None` when nothing accrued.
    pub fn take(&mut self, price: i64) -> Option<(i64, i64)> {
        if self.accrued <= 0 {
            return None;
        }
        let v = i128::from(self.rem) + i128::from(self.accrued) * i128::from(price.max(0));
        self.rem = (v % PER_MICRO) as i64;
        let out = (
            self.accrued,
            i64::try_from(v / PER_MICRO).unwrap_or(i64::MAX),
        );
        self.accrued = 0;
        Some(out)
    }
}

const COLS: &str = "volume_gib, volume_gib_since_ms, volume_accrued_gib_ms, volume_charge_rem";

async fn load(tx: &mut Tx, account: &AccountId) -> Result<Option<Meter>, DbError> {
    let row = sqlx::query(&format!("SELECT {COLS} FROM accounts WHERE id = $1"))
        .bind(account.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    Ok(Some(Meter {
        gib: col(&r, "volume_gib")?,
        since_ms: col(&r, "volume_gib_since_ms")?,
        accrued: col(&r, "volume_accrued_gib_ms")?,
        rem: col(&r, "volume_charge_rem")?,
    }))
}

async fn store(tx: &mut Tx, account: &AccountId, m: &Meter) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE accounts SET volume_gib = $1, volume_gib_since_ms = $2, \
         volume_accrued_gib_ms = $3, volume_charge_rem = $4 WHERE id = $5",
    )
    .bind(m.gib)
    .bind(m.since_ms)
    .bind(m.accrued)
    .bind(m.rem)
    .bind(account.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The account's billed figure from its volumes: GiB confirmed on a host,
/// not being deleted.
pub async fn figure(tx: &mut Tx, account: &AccountId) -> Result<i64, DbError> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(settled_gib), 0) AS BIGINT) AS gib FROM volumes \
         WHERE account_id = $1 AND host_id IS NOT NULL AND deleting = 0",
    )
    .bind(account.to_string())
    .fetch_one(&mut **tx)
    .await?;
    col(&row, "gib")
}

/// Brings the account's figure in line with its volumes at `now` (the
/// billing clock), accruing the old one first. Called in the transaction
/// that changed the volumes, after the host and instance rows' locks.
pub async fn sync(tx: &mut Tx, account: &AccountId, now: i64) -> Result<(), DbError> {
    let gib = figure(tx, account).await?;
    let Some(mut m) = load(tx, account).await? else {
        return Ok(());
    };
    if m.gib != gib || m.since_ms.is_none() {
        m.switch(now, gib);
        store(tx, account, &m).await?;
    }
    Ok(())
}

/// The meter tick (every `snapshot_meter_secs`, from the reconcile loop):
/// for every account due that holds placed volumes or owes for them,
/// accrues up to now, charges, and takes up the figure its volumes show
/// now. Returns how many accounts were charged.
pub async fn tick(st: &AppState) -> Result<usize, DbError> {
    let now = st.clock.now_ms();
    let due = now - st.cfg.snapshot_meter_secs as i64 * 1000;
    let rows = sqlx::query(
        "SELECT id, volume_metered_ms FROM accounts a WHERE (volume_metered_ms IS NULL OR \
         volume_metered_ms <= $1) AND (volume_gib > 0 OR volume_accrued_gib_ms > 0 OR \
         EXISTS (SELECT 1 FROM volumes v WHERE v.account_id = a.id AND v.host_id IS NOT NULL \
         AND v.deleting = 0)) ORDER BY id",
    )
    .bind(due)
    .fetch_all(&st.db.pool)
    .await?;
    let mut charged = 0;
    for r in &rows {
        let account: AccountId = parsed(r, "id", "accounts")?;
        let from: Option<i64> = col(r, "volume_metered_ms")?;
        // One account's failure is logged; the others are still charged.
        match charge_account(st, &account, from, now).await {
            Ok(true) => charged += 1,
            Ok(false) => {}
            Err(e) => tracing::error!(%account, error = %e,
                "volume storage charge failed; nothing was applied, next tick tries again"),
        }
    }
    Ok(charged)
}

/// Charges one account in one transaction, unless another replica (or a
/// restart) metered it since `from` was read.
async fn charge_account(
    st: &AppState,
    account: &AccountId,
    from: Option<i64>,
    now: i64,
) -> Result<bool, BillingError> {
    let mut tx = st.db.begin_write().await?;
    let claimed =
        crate::meter::claim_window(&mut tx, "volume_metered_ms", account, from, now).await?;
    if !claimed {
        return Ok(false);
    }
    let Some(mut m) = load(&mut tx, account).await? else {
        return Ok(false);
    };
    m.accrue(now);
    let price = st.cfg.volume_price_micros_per_gib_hour;
    // Unpriced storage is not billed (and not owed later either).
    let taken = m.take(price).filter(|_| price > 0);
    let gib = figure(&mut tx, account).await?;
    m.switch(now, gib);
    store(&mut tx, account, &m).await?;
    if let Some((gib_ms, amount)) = taken {
        let c = Charge {
            account: *account,
            instance: None,
            kind: UsageKind::Volume,
            quantity: gib_ms,
            price_micros: price,
            amount_micros: amount,
        };
        charge(&mut tx, &c, now).await?;
    }
    tx.commit().await?;
    Ok(taken.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accrual_is_the_integral_of_the_figure() {
        let mut m = Meter::default();
        m.switch(1_000, 50); // the first figure: nothing before it
        m.switch(3_000, 80); // 50 GiB for 2 s
        m.accrue(4_000); // 80 GiB for 1 s
        assert_eq!(m.accrued, 50 * 2_000 + 80 * 1_000);
        m.accrue(3_500); // the clock went back: nothing moves back
        assert_eq!((m.accrued, m.since_ms), (180_000, Some(4_000)));
    }

    #[test]
    fn charges_telescope_without_drift() {
        let price = 137; // micros per GiB-hour
        let gib = 333;
        let mut m = Meter::default();
        let (mut t, mut total, mut amount) = (0i64, 0i128, 0i128);
        m.switch(t, gib);
        for dt in [1, 999, 1_000, 7_777, 3_600_000, 59, 86_400_000] {
            t += dt;
            m.accrue(t);
            total += i128::from(gib) * i128::from(dt);
            amount += m.take(price).map_or(0, |(_, a)| i128::from(a));
            assert_eq!(
                amount,
                total * i128::from(price) / PER_MICRO,
                "after {t} ms"
            );
        }
        assert_eq!(m.take(price), None);
    }
}
