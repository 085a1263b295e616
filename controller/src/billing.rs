//! The usage ledger and credits: charging instance Running time from the
//! hosts' usage counters, and refusing work to accounts without credit.
//! Snapshot storage is metered in [`crate::meter`].
//!
//! Every charge is one `usage_records` row, subtracted from
//! `accounts.credit_micros` in the same transaction that moves the
//! instance's `usage_seq`/`billed_ms` (or the account's storage meter),
//! so a retry never charges twice. Ledger times come from the billing
//! clock (`crate::clock`).
//!
//! Money is bounded and checked: a balance stays within
//! `±MAX_CREDIT_MICROS` (2^53), an amount is computed with checked
//! arithmetic, and a change that would leave those bounds is refused
//! ([`BillingError::OutOfRange`], a 422 naming the field) with nothing
//! applied. The figures hosts report are range-checked before they get
//! here (`AgentHeartbeat::check_bounds`).

use crate::db::{col, parsed_opt, DbError, Tx};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use gantry_proto::api::agent::{UsageAck, UsageCounter};
use gantry_proto::api::v1::{UsageKind, MAX_CREDIT_MICROS};
use gantry_proto::ids::{AccountId, HostId, InstanceId};
use gantry_proto::InstanceState;
use sqlx::any::AnyRow;

/// 402 when the account has no credit left.
pub async fn require_credit(st: &AppState, account: &AccountId, what: &str) -> ApiResult<()> {
    let row = sqlx::query("SELECT name, credit_micros FROM accounts WHERE id = $1")
        .bind(account.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| ApiError::invalid("account", format!("no account {account}")))?;
    let credit: i64 = col(&row, "credit_micros")?;
    if credit <= 0 {
        let name: String = col(&row, "name")?;
        return Err(ApiError::PaymentRequired(format!(
            "account {name} has no credit left; add credit before {what}"
        )));
    }
    Ok(())
}

/// One charge against an account.
pub struct Charge {
    pub account: AccountId,
    pub instance: Option<InstanceId>,
    pub kind: UsageKind,
    pub quantity: i64,
    pub price_micros: i64,
    pub amount_micros: i64,
}

/// A charge or credit change that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// An amount, or the balance it would leave, is out of range; nothing
    /// was applied. `field` names what is to blame.
    #[error("{field}: {message}")]
    OutOfRange { field: String, message: String },
}

impl From<sqlx::Error> for BillingError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
    }
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::Db(e) => ApiError::Db(e),
            BillingError::OutOfRange { field, message } => ApiError::invalid(field, message),
        }
    }
}

fn out_of_range(field: &str, message: String) -> BillingError {
    BillingError::OutOfRange {
        field: field.to_string(),
        message,
    }
}

/// Moves the account's credit by `delta` (negative: a charge) in `tx`,
/// checked: the new balance must stay within `±MAX_CREDIT_MICROS`, else
/// nothing changes and the error blames `field`. Notes when the credit ran
/// out (at `now`) or came back. `Ok(false)`: no such account.
pub async fn move_credit(
    tx: &mut Tx,
    account: &AccountId,
    delta: i64,
    now: i64,
    field: &str,
) -> Result<bool, BillingError> {
    let Some(row) = sqlx::query("SELECT credit_micros FROM accounts WHERE id = $1")
        .bind(account.to_string())
        .fetch_optional(&mut **tx)
        .await?
    else {
        return Ok(false);
    };
    let have: i64 = col(&row, "credit_micros")?;
    let bound = -MAX_CREDIT_MICROS..=MAX_CREDIT_MICROS;
    let new = have
        .checked_add(delta)
        .filter(|v| bound.contains(v))
        .ok_or_else(|| {
            out_of_range(
                field,
                format!(
                    "would take the account's credit from {have} past its bounds (at most \
                     {MAX_CREDIT_MICROS} micro-units either way)"
                ),
            )
        })?;
    // The guard repeats the check in SQL: nothing outside the bounds is
    // ever written, whatever another writer did since the read.
    let done = sqlx::query(
        "UPDATE accounts SET credit_micros = credit_micros + $1, credit_exhausted_ms = CASE \
         WHEN credit_micros + $1 <= 0 THEN COALESCE(credit_exhausted_ms, $2) ELSE NULL END \
         WHERE id = $3 AND credit_micros + $1 >= $4 AND credit_micros + $1 <= $5",
    )
    .bind(delta)
    .bind(now)
    .bind(account.to_string())
    .bind(-MAX_CREDIT_MICROS)
    .bind(MAX_CREDIT_MICROS)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(out_of_range(
            field,
            format!("would take the account's credit beyond {new}"),
        ));
    }
    Ok(true)
}

/// Writes the ledger row (at `now`) and takes the amount from the
/// account's credit (checked, see [`move_credit`]), noting when the credit
/// ran out. A negative amount is refused: a charge never adds credit.
pub async fn charge(tx: &mut Tx, c: &Charge, now: i64) -> Result<(), BillingError> {
    charge_account(tx, std::slice::from_ref(c), now).await
}

/// A charge's amount is within `0..=2 * MAX_CREDIT_MICROS`.
fn check_amount(c: &Charge) -> Result<(), BillingError> {
    if !(0..=2 * MAX_CREDIT_MICROS).contains(&c.amount_micros) {
        return Err(out_of_range(
            "amount_micros",
            format!(
                "a charge of {} micro-units for account {} is out of range",
                c.amount_micros, c.account
            ),
        ));
    }
    Ok(())
}

/// Most ledger rows in one `INSERT`.
const LEDGER_CHUNK: usize = 64;

/// [`charge`] for charges of one account (`group`, none negative): the
/// credit moves once by their total, then their ledger rows are written in
/// order. Charges never add credit, so the balance only goes down and the
/// total leaves its bounds exactly when one of the charges one after the
/// other would have.
async fn charge_account(tx: &mut Tx, group: &[Charge], now: i64) -> Result<(), BillingError> {
    let Some(first) = group.first() else {
        return Ok(());
    };
    let mut total: i64 = 0;
    for c in group {
        check_amount(c)?;
        total = total.checked_add(c.amount_micros).ok_or_else(|| {
            out_of_range(
                "amount_micros",
                format!("the charges for account {} are out of range", c.account),
            )
        })?;
    }
    move_credit(tx, &first.account, -total, now, "amount_micros").await?;
    gantry_crashpoint::hit("controller.billing.credit_taken");
    for chunk in group.chunks(LEDGER_CHUNK) {
        let values: Vec<String> = (0..chunk.len())
            .map(|k| format!("({})", crate::db::placeholders(k * 8 + 1, 8)))
            .collect();
        let sql = format!(
            "INSERT INTO usage_records (id, account_id, instance_id, kind, quantity, \
             price_micros, amount_micros, at_ms) VALUES {}",
            values.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for c in chunk {
            q = q
                .bind(uuid::Uuid::now_v7().simple().to_string())
                .bind(c.account.to_string())
                .bind(c.instance.map(|i| i.to_string()))
                .bind(match c.kind {
                    UsageKind::Instance => "instance",
                    UsageKind::Snapshot => "snapshot",
                    UsageKind::Volume => "volume",
                })
                .bind(c.quantity)
                .bind(c.price_micros)
                .bind(c.amount_micros)
                .bind(now);
        }
        q.execute(&mut **tx).await?;
    }
    gantry_crashpoint::hit("controller.billing.ledger_inserted");
    Ok(())
}

/// The amount for Running seconds `[a_s, b_s)` at `price` per hour:
/// `floor(b*p/3600) - floor(a*p/3600)`, so consecutive charges telescope
/// to the exact total with no rounding drift. `None` when the interval is
/// backwards, the price negative, or the amount does not fit in 64 bits.
pub fn instance_amount(a_s: i64, b_s: i64, price: i64) -> Option<i64> {
    if a_s < 0 || b_s < a_s || price < 0 {
        return None;
    }
    let at = |s: i64| {
        i128::from(s)
            .checked_mul(i128::from(price))
            .map(|v| v / 3600)
    };
    i64::try_from(at(b_s)?.checked_sub(at(a_s)?)?).ok()
}

/// Applies charges in account id order, so that concurrent transactions
/// lock account rows in the same order and cannot deadlock.
pub async fn charge_all(
    tx: &mut Tx,
    mut charges: Vec<Charge>,
    now: i64,
) -> Result<(), BillingError> {
    // Stable: an account's charges keep their order (and their ledger
    // rows the order of their ids).
    charges.sort_by_key(|c| c.account);
    for group in charges.chunk_by(|a, b| a.account == b.account) {
        charge_account(tx, group, now).await?;
    }
    Ok(())
}

/// Locks account rows in id order (a write that changes nothing), for a
/// transaction that then updates them in any order.
pub async fn lock_accounts(tx: &mut Tx, accounts: &[AccountId]) -> Result<(), DbError> {
    let mut ids = accounts.to_vec();
    ids.sort();
    ids.dedup();
    for a in &ids {
        sqlx::query("UPDATE accounts SET credit_micros = credit_micros WHERE id = $1")
            .bind(a.to_string())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Bills one usage counter of `host` (see the contract in
/// `gantry_proto::api::agent`); the charge is added to `charges` for the
/// caller to apply with [`charge_all`] once every instance row is updated
/// (locks are taken host, then instances, then accounts). `None` when the
/// instance belongs to another host (nothing is acknowledged).
pub async fn bill_counter(
    tx: &mut Tx,
    host: &HostId,
    c: &UsageCounter,
    charges: &mut Vec<Charge>,
) -> Result<Option<UsageAck>, BillingError> {
    let row = sqlx::query(&format!("{COUNTER_SELECT} WHERE i.id = $1"))
        .bind(c.instance.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    bill_row(tx, host, c, row.as_ref(), charges).await
}

/// What billing reads of a counter's instance row.
const COUNTER_SELECT: &str = "SELECT i.id, i.account_id, i.host_id, i.observed_state, \
     i.usage_seq, i.billed_ms, i.billing_closed_ms, f.price_micros_per_hour FROM instances i \
     JOIN flavors f ON f.id = i.flavor_id";

/// Bills a heartbeat's usage counters (sorted by instance) exactly as
/// [`bill_counter`] one after the other, but reads their instance rows in
/// one statement first (a row is used once: a repeated counter reads its
/// row again, after the first one moved it). Returns the acks, in order.
pub async fn bill_counters(
    tx: &mut Tx,
    host: &HostId,
    counters: &[UsageCounter],
    charges: &mut Vec<Charge>,
) -> Result<Vec<UsageAck>, BillingError> {
    let mut rows = std::collections::HashMap::with_capacity(counters.len());
    for chunk in counters.chunks(crate::db::IN_LIST_MAX) {
        let sql = format!(
            "{COUNTER_SELECT} WHERE i.id IN ({})",
            crate::db::placeholders(1, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for c in chunk {
            q = q.bind(c.instance.to_string());
        }
        for r in q.fetch_all(&mut **tx).await? {
            rows.insert(col::<String>(&r, "id")?, r);
        }
    }
    let mut acks = Vec::with_capacity(counters.len());
    for c in counters {
        let ack = match rows.remove(&c.instance.to_string()) {
            Some(row) => bill_row(tx, host, c, Some(&row), charges).await?,
            None => bill_counter(tx, host, c, charges).await?,
        };
        acks.extend(ack);
    }
    Ok(acks)
}

/// [`bill_counter`] on the instance row already read (`None`: no such
/// instance).
async fn bill_row(
    tx: &mut Tx,
    host: &HostId,
    c: &UsageCounter,
    row: Option<&AnyRow>,
    charges: &mut Vec<Charge>,
) -> Result<Option<UsageAck>, BillingError> {
    let Some(row) = row else {
        return Ok(Some(UsageAck {
            instance: c.instance,
            seq: c.seq,
            done: true,
        }));
    };
    let owner: Option<HostId> = parsed_opt(row, "host_id", "instances")?;
    if owner.as_ref() != Some(host) {
        // Moved away: the host may forget its counter.
        if moved_away(tx, host, c.instance).await? {
            return Ok(Some(UsageAck {
                instance: c.instance,
                seq: c.seq,
                done: true,
            }));
        }
        tracing::warn!(instance = %c.instance, %host, "usage counter for another host's instance");
        return Ok(None);
    }
    let state: InstanceState = crate::db::parsed(row, "observed_state", "instances")?;
    let seq: i64 = col(row, "usage_seq")?;
    let billed: i64 = col(row, "billed_ms")?;
    // In range after `AgentHeartbeat::check_bounds`; checked all the same.
    let counter_seq = i64::try_from(c.seq)
        .map_err(|_| out_of_range("seq", format!("counter seq {} is out of range", c.seq)))?;
    let running = i64::try_from(c.running_ms).map_err(|_| {
        out_of_range(
            "running_ms",
            format!("counter running_ms {} is out of range", c.running_ms),
        )
    })?;
    if counter_seq > seq {
        let (new_billed, amount) = counter_amount(row, c, running, billed)?;
        let moved = sqlx::query(
            "UPDATE instances SET usage_seq = $1, billed_ms = $2, charged_micros = \
             charged_micros + $3 WHERE id = $4 AND usage_seq = $5",
        )
        .bind(counter_seq)
        .bind(new_billed)
        .bind(amount)
        .bind(c.instance.to_string())
        .bind(seq)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        gantry_crashpoint::hit("controller.billing.counter_moved");
        // Charged only by the transaction that moved the counter (another
        // replica may have billed it since it was read).
        if moved == 1 && new_billed > billed {
            let price: i64 = col(row, "price_micros_per_hour")?;
            let account = crate::db::parsed(row, "account_id", "instances")?;
            charges.push(Charge {
                account,
                instance: Some(c.instance),
                kind: UsageKind::Instance,
                quantity: new_billed - billed,
                price_micros: price,
                amount_micros: amount,
            });
        }
    }
    Ok(Some(UsageAck {
        instance: c.instance,
        seq: c.seq,
        done: state.is_final(),
    }))
}

/// Whether the instance moved off `host` (a move-out from it succeeded,
/// `crate::moves`): nothing more is charged from that host's counter.
async fn moved_away(
    tx: &mut Tx,
    host: &HostId,
    instance: InstanceId,
) -> Result<bool, BillingError> {
    Ok(sqlx::query(
        "SELECT 1 AS one FROM operations WHERE instance_id = $1 AND host_id = $2 \
         AND kind = 'move-out' AND state = 'succeeded'",
    )
    .bind(instance.to_string())
    .bind(host.to_string())
    .fetch_optional(&mut **tx)
    .await?
    .is_some())
}

/// What a counter that moved on bills: the new billed time and the amount
/// (nothing when it went backwards, or ran after the instance's billing
/// closed).
fn counter_amount(
    row: &AnyRow,
    c: &UsageCounter,
    running: i64,
    billed: i64,
) -> Result<(i64, i64), BillingError> {
    let closed: Option<i64> = col(row, "billing_closed_ms")?;
    if running < billed {
        tracing::warn!(instance = %c.instance, running, billed, "usage counter went backwards");
        return Ok((billed, 0));
    }
    if closed.is_some() {
        // Released while its host was down: what the host reports now
        // ran after the last heartbeat that proved it; not charged.
        return Ok((billed, 0));
    }
    let price: i64 = col(row, "price_micros_per_hour")?;
    let amount = instance_amount(billed / 1000, running / 1000, price).ok_or_else(|| {
        out_of_range(
            "running_ms",
            format!(
                "instance {}: {running} ms at {price} micro-units an hour is out of range",
                c.instance
            ),
        )
    })?;
    Ok((running, amount))
}

#[cfg(test)]
mod tests {
    use super::instance_amount;

    #[test]
    fn charges_telescope_without_drift() {
        let price = 2_000_001; // micros per hour, not a multiple of 3600
        let mut total = 0;
        let mut a = 0;
        for b in [1, 2, 7, 3599, 3600, 3601, 10_000, 86_401] {
            total += instance_amount(a, b, price).unwrap();
            a = b;
        }
        assert_eq!(Some(total), instance_amount(0, 86_401, price));
        assert_eq!(instance_amount(0, 3600, 3_600_000), Some(3_600_000));
        assert_eq!(instance_amount(5, 5, 3_600_000), Some(0));
    }

    #[test]
    fn amounts_never_wrap_or_go_negative() {
        assert_eq!(instance_amount(0, i64::MAX, i64::MAX), None);
        assert_eq!(instance_amount(10, 5, 3_600_000), None);
        assert_eq!(instance_amount(0, 5, -1), None);
        let big = instance_amount(0, i64::MAX / 1000, 1 << 40);
        assert!(big.is_none() || big > Some(0), "{big:?}");
    }
}
