//! Bodies of the controller's account and token calls (`/v1/account`,
//! `/v1/admin/accounts...`, `/v1/admin/tokens...`), re-exported by
//! [`super::v1`]: accounts, credit, the account lifecycle, API tokens and
//! their expiry.

use crate::ids::{AccountId, OperationId, TokenId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `POST /v1/admin/accounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    pub name: String,
    #[serde(default)]
    pub billing_profile_complete: bool,
    /// Snapshot storage quota in GiB (compressed bytes count against it).
    #[serde(default)]
    pub snapshot_quota_gib: Option<u64>,
}

/// `PATCH /v1/admin/accounts/{id}`: fields left out stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateAccount {
    #[serde(default)]
    pub billing_profile_complete: Option<bool>,
    #[serde(default)]
    pub snapshot_quota_gib: Option<u64>,
}

/// Largest credit an account can hold, in micro-units either way (2^53:
/// exact in every JSON number). A change that would take the balance
/// past it is refused (`amount_micros`, 422).
pub const MAX_CREDIT_MICROS: i64 = 1 << 53;
/// Largest size of one `AddCredit::amount_micros`.
pub const MAX_CREDIT_CHANGE_MICROS: i64 = 1 << 50;

/// `POST /v1/admin/accounts/{id}/credits`: a ledger entry; negative debits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AddCredit {
    pub amount_micros: i64,
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccountInfo {
    pub id: AccountId,
    pub name: String,
    pub credit_micros: i64,
    pub billing_profile_complete: bool,
    pub snapshot_quota_gib: u64,
    /// Deduplicated compressed bytes the account holds in the snapshot
    /// stores, as the hosts last reported them: the figure storage is
    /// billed on and the quota is checked against.
    pub snapshot_used_bytes: u64,
    /// Quota held for snapshots not yet in `snapshot_used_bytes`: the root
    /// disk size of each snapshot still Creating, and the compressed size
    /// of each one just saved, until its host's store reports include it.
    #[serde(default)]
    pub snapshot_reserved_bytes: u64,
    pub created_at: DateTime<Utc>,
    /// Where the account is in its life (deleted accounts stay listed).
    #[serde(default)]
    pub status: AccountStatus,
}

/// Where an account is in its life: `active`; `disabled` (its tokens are
/// refused, its instances stopped, its data kept); `deleting` (its
/// instances, snapshots and volumes are being removed); `deleted` (only its
/// ledger and audit rows remain).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    #[default]
    Active,
    Disabled,
    Deleting,
    Deleted,
}

/// The answer to `POST /v1/admin/accounts/{id}/disable`, `.../enable` and
/// `DELETE /v1/admin/accounts/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccountLifecycle {
    pub id: AccountId,
    pub status: AccountStatus,
    /// When the account entered this status.
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    /// Operations this call started: stops (disable), releases and
    /// deletions (delete).
    #[serde(default)]
    pub operations: Vec<OperationId>,
    /// What a deletion still waits for, one sentence each (empty once the
    /// account is deleted).
    #[serde(default)]
    pub waiting_for: Vec<String>,
}

/// `POST /v1/admin/tokens`: an admin token when `account` is absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    #[serde(default)]
    pub account: Option<AccountId>,
    /// Seconds until the token stops working
    /// ([`MIN_TOKEN_LIFETIME_SECS`]..=[`MAX_TOKEN_LIFETIME_SECS`]);
    /// absent: it never expires.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// Shortest lifetime a token with an expiry may be given (one minute).
pub const MIN_TOKEN_LIFETIME_SECS: u64 = 60;
/// Longest lifetime a token with an expiry may be given (five years).
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 5 * 365 * 24 * 3600;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    pub id: TokenId,
    pub name: String,
    pub account: Option<AccountId>,
    pub created_at: DateTime<Utc>,
    pub revoked: bool,
    /// When the token stops working; absent: never.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// The answer to token creation: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}
