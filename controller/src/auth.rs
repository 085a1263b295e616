//! Bearer tokens: minting, hashing, checking (constant time), the
//! bootstrap admin token, and the per-token rate limit.
//!
//! A minted token reads `gty_<token id hex>_<64 hex secret>`; only the
//! blake3 hash of the whole string is stored. The bootstrap admin token
//! (from `GANTRY_ADMIN_TOKEN`, the config, or generated into
//! `<state-dir>/admin-token`) is kept only as a hash in memory. Hosts
//! present a join token (`gjt_<id>_<64 hex>`, table `join_tokens`) once,
//! then their own credential (`ghc_<host id>_<64 hex>`, `hosts.
//! credential_hash`); both are checked the same way.
//!
//! Refusals say why, without revealing anything to a caller who lacks the
//! secret: no token, an unknown token or wrong secret, and (only to the
//! holder of the right secret) a revoked or expired token, a disabled
//! account, or an account being deleted (`404`). An account token may carry
//! an expiry (`tokens.expires_ms`, read on the controller's clock); a
//! cached verification is not honoured past it. Refused requests without a valid token
//! are counted (`gantry_api_refused_total{reason}`), logged at most every
//! [`REFUSAL_LOG_EVERY`], and rate-limited per source address
//! ([`SOURCE_PER_SECOND`], burst [`SOURCE_BURST`]).

use crate::clock::Clock;
use crate::db::{col, parsed_opt, Db, DbError};
use crate::error::ApiError;
use gantry_proto::api::agent::{CREDENTIAL_REVOKED, HOST_CREDENTIAL_PREFIX, JOIN_TOKEN_PREFIX};
use gantry_proto::ids::{AccountId, HostId, JoinTokenId, TokenId};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot write admin token file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read admin token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the admin token (GANTRY_ADMIN_TOKEN or admin_token) must be at least \
         {MIN_ADMIN_TOKEN_LEN} characters; this one has {0}"
    )]
    AdminTokenTooShort(usize),
}

/// The shortest bootstrap admin token accepted (env var and config alike).
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Who is calling: an admin (none of account, host, join set), an
/// account's token, a host (its credential) or a host about to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Token id, host id, join token id, or `bootstrap-admin`.
    pub actor: String,
    /// Set for account tokens.
    pub account: Option<AccountId>,
    /// Set for host credentials.
    pub host: Option<HostId>,
    /// Set for join tokens.
    pub join: Option<JoinTokenId>,
}

impl Identity {
    pub fn admin(actor: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            account: None,
            host: None,
            join: None,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.account.is_none() && self.host.is_none() && self.join.is_none()
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// Whether this caller may see an object owned by `owner`.
    pub fn can_see(&self, owner: &AccountId) -> bool {
        if self.host.is_some() || self.join.is_some() {
            return false;
        }
        self.account.as_ref().is_none_or(|a| a == owner)
    }
}

pub fn hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh token for `id`: the secret string (shown once) and its hash.
pub fn mint(id: TokenId) -> (String, String) {
    mint_with("gty_", id.uuid())
}

/// A fresh `<prefix><uuid simple>_<64 hex>` secret and its hash.
pub fn mint_with(prefix: &str, id: uuid::Uuid) -> (String, String) {
    let secret: [u8; 32] = rand::random();
    let token = format!("{prefix}{}_{}", id.simple(), hex(&secret));
    let h = hex(&hash(&token));
    (token, h)
}

/// The id embedded in a `<prefix><uuid simple>_<hex>` token.
fn embedded<T: std::str::FromStr>(token: &str, prefix: &str, id_prefix: &str) -> Option<T> {
    token
        .strip_prefix(prefix)
        .and_then(|r| r.split_once('_'))
        .and_then(|(id, _)| format!("{id_prefix}-{id}").parse::<T>().ok())
}

/// How long a verified token is trusted without asking the database again.
/// A revocation on this controller takes effect at once; on other replicas
/// sharing a PostgreSQL database, within this time.
const CACHE_TTL: Duration = Duration::from_secs(5);
const CACHE_MAX: usize = 10_000;

/// A verified token as cached: who it is, when it was verified, and when
/// it expires (Unix ms on the controller's clock), if ever.
struct Verified {
    who: Identity,
    at: Instant,
    expires_ms: Option<i64>,
}

/// Checks tokens against the bootstrap hash and the `tokens` table.
pub struct Verifier {
    bootstrap: [u8; 32],
    /// Recently verified tokens, keyed by the blake3 hash of the token.
    cache: Mutex<HashMap<[u8; 32], Verified>>,
    /// The controller's clock, which token expiry is read on.
    clock: Arc<dyn Clock>,
}

impl Verifier {
    pub fn new(bootstrap_token: &str, clock: Arc<dyn Clock>) -> Self {
        Self {
            bootstrap: hash(bootstrap_token),
            cache: Mutex::default(),
            clock,
        }
    }

    /// Forgets every cached verification (after a revocation).
    pub fn forget_all(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub async fn verify(&self, db: &Db, token: &str) -> Result<Identity, ApiError> {
        let presented = hash(token);
        if let Some(v) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&presented)
        {
            // Past its expiry a cached token is asked about again, so the
            // caller hears that it expired.
            let live = v.expires_ms.is_none_or(|e| self.clock.now_ms() < e);
            if v.at.elapsed() < CACHE_TTL && live {
                return Ok(v.who.clone());
            }
        }
        let (who, expires_ms) = self.verify_uncached(db, token, &presented).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        let v = Verified {
            who: who.clone(),
            at: Instant::now(),
            expires_ms,
        };
        cache.insert(presented, v);
        Ok(who)
    }

    /// Checks an account or admin token (`gty_`): its secret, then (told
    /// only to its holder) its account's deletion, revocation, expiry and
    /// its account's disabling. Returns the caller and the expiry.
    async fn verify_api_token(
        &self,
        db: &Db,
        id: TokenId,
        presented: &[u8; 32],
    ) -> Result<(Identity, Option<i64>), ApiError> {
        let sql = "SELECT t.hash, t.account_id, t.revoked, t.expires_ms, \
                   a.status AS account_status \
                   FROM tokens t LEFT JOIN accounts a ON a.id = t.account_id WHERE t.id = $1";
        let row = lookup(db, sql, &id.to_string(), presented).await?;
        let account: Option<AccountId> = parsed_opt(&row, "account_id", "tokens")?;
        let status: Option<String> = col(&row, "account_status")?;
        if let (Some(a), Some("deleting" | "deleted")) = (&account, status.as_deref()) {
            return Err(ApiError::NotFound(format!("account {a} no longer exists")));
        }
        if col::<i64>(&row, "revoked")? != 0 {
            return Err(ApiError::RevokedToken);
        }
        let expires_ms: Option<i64> = col(&row, "expires_ms")?;
        if expires_ms.is_some_and(|e| e <= self.clock.now_ms()) {
            return Err(ApiError::BadToken(format!(
                "token {id} has expired; ask an admin for a new one"
            )));
        }
        if let (Some(a), Some("disabled")) = (&account, status.as_deref()) {
            return Err(ApiError::AccountDisabled(a.to_string()));
        }
        let mut who = Identity::admin(id.to_string());
        who.account = account;
        Ok((who, expires_ms))
    }

    async fn verify_uncached(
        &self,
        db: &Db,
        token: &str,
        presented: &[u8; 32],
    ) -> Result<(Identity, Option<i64>), ApiError> {
        if let Some(id) = embedded::<TokenId>(token, "gty_", TokenId::PREFIX) {
            return self.verify_api_token(db, id, presented).await;
        }
        if let Some(id) = embedded::<JoinTokenId>(token, JOIN_TOKEN_PREFIX, JoinTokenId::PREFIX) {
            let sql = "SELECT hash, expires_ms FROM join_tokens WHERE id = $1";
            let row = lookup(db, sql, &id.to_string(), presented).await?;
            // An expired join token is refused on every path (401), not
            // only on the join it was for.
            if col::<i64>(&row, "expires_ms")? <= crate::db::now_ms() {
                return Err(ApiError::BadToken(format!(
                    "join token {id} has expired; ask an admin for a new one"
                )));
            }
            let mut who = Identity::admin(id.to_string());
            who.join = Some(id);
            return Ok((who, None));
        }
        if let Some(id) = embedded::<HostId>(token, HOST_CREDENTIAL_PREFIX, HostId::PREFIX) {
            let sql = "SELECT credential_hash AS hash, revoked_ms FROM hosts WHERE id = $1 \
                       AND credential_hash IS NOT NULL";
            let row = lookup(db, sql, &id.to_string(), presented).await?;
            // Said only to the holder of the right credential.
            if col::<Option<i64>>(&row, "revoked_ms")?.is_some() {
                return Err(revoked(&id));
            }
            let mut who = Identity::admin(id.to_string());
            who.host = Some(id);
            return Ok((who, None));
        }
        if bool::from(presented.ct_eq(&self.bootstrap)) {
            return Ok((Identity::admin("bootstrap-admin"), None));
        }
        Err(ApiError::UnknownToken)
    }
}

/// The 401 a host gets once an admin revoked its credential (the words
/// [`CREDENTIAL_REVOKED`] are what the agent looks for).
pub fn revoked(host: &HostId) -> ApiError {
    ApiError::BadToken(format!(
        "host {host}: its {CREDENTIAL_REVOKED} by an admin; ask an admin for a new join token \
         and join the host again"
    ))
}

/// Refuses a host whose credential was revoked (a check for calls that
/// outlive the credential check, like a work long-poll).
pub async fn check_not_revoked(db: &Db, host: &HostId) -> Result<(), ApiError> {
    let revoked_ms: Option<Option<i64>> =
        sqlx::query_scalar("SELECT revoked_ms FROM hosts WHERE id = $1")
            .bind(host.to_string())
            .fetch_optional(&db.pool)
            .await?;
    match revoked_ms {
        Some(None) => Ok(()),
        Some(Some(_)) => Err(revoked(host)),
        None => Err(ApiError::UnknownToken),
    }
}

/// Loads the row holding a stored hash (column `hash`) and compares it with
/// the presented token's hash in constant time.
async fn lookup(
    db: &Db,
    sql: &str,
    id: &str,
    presented: &[u8; 32],
) -> Result<sqlx::any::AnyRow, ApiError> {
    let row = sqlx::query(sql)
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .ok_or(ApiError::UnknownToken)?;
    let stored: String = col(&row, "hash")?;
    if hex(presented).as_bytes().ct_eq(stored.as_bytes()).into() {
        Ok(row)
    } else {
        Err(ApiError::UnknownToken)
    }
}

/// Refused requests per second one source address may send before it is
/// answered `429` (and its burst).
pub const SOURCE_PER_SECOND: u32 = 10;
pub const SOURCE_BURST: u32 = 50;
/// How often refusals without a valid token are logged (as a count).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The per-token request rate limit, and for requests without a valid
/// token: the per-source-address limit, the refusal counts (metrics) and
/// the rate-limited refusal log.
pub struct Limiter {
    tokens: DefaultKeyedRateLimiter<String>,
    sources: DefaultKeyedRateLimiter<IpAddr>,
    refused: Mutex<Refusals>,
}

#[derive(Default)]
struct Refusals {
    /// Totals by reason, since start.
    total: std::collections::BTreeMap<&'static str, u64>,
    /// Refusals since the last log line, and when that was.
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl Limiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            tokens: RateLimiter::keyed(quota(per_second, burst)),
            sources: RateLimiter::keyed(quota(SOURCE_PER_SECOND, SOURCE_BURST)),
            refused: Mutex::default(),
        }
    }

    pub fn check(&self, actor: &str) -> Result<(), ApiError> {
        self.tokens
            .check_key(&actor.to_string())
            .map_err(|_| ApiError::RateLimited)
    }

    /// Notes a request refused without a valid token (`reason` is the
    /// metric label) from `source` (when known), and returns the answer:
    /// `refusal` itself, or a `429` once the source sent too many.
    pub fn refuse(
        &self,
        reason: &'static str,
        source: Option<IpAddr>,
        refusal: ApiError,
    ) -> ApiError {
        let limited = source.and_then(|ip| {
            self.sources.check_key(&bucket(ip)).err().map(|nu| {
                let wait = nu.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                wait.as_secs() + 1
            })
        });
        let reason = if limited.is_some() {
            "source_limited"
        } else {
            reason
        };
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        *r.total.entry(reason).or_default() += 1;
        r.unlogged += 1;
        if r.logged_at.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
            tracing::warn!(
                refused = r.unlogged,
                last_reason = reason,
                "requests without a valid token were refused (logged at most every 10 s)"
            );
            r.unlogged = 0;
            r.logged_at = Some(Instant::now());
            self.sources.retain_recent();
        }
        match limited {
            Some(secs) => ApiError::SourceLimited(secs),
            None => refusal,
        }
    }

    /// `gantry_api_refused_total{reason}` in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::from(
            "# HELP gantry_api_refused_total Requests refused without a valid token, by reason.\n\
             # TYPE gantry_api_refused_total counter\n",
        );
        for (reason, n) in &r.total {
            out.push_str(&format!(
                "gantry_api_refused_total{{reason=\"{reason}\"}} {n}\n"
            ));
        }
        out
    }
}

fn quota(per_second: u32, burst: u32) -> Quota {
    Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

/// The rate-limit key of an address: IPv4 as is, IPv6 by its /64 (one
/// client usually holds a whole /64).
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// The bootstrap admin token: the given one, else the one in
/// `<state_dir>/admin-token`, else a new one written there (mode 0600,
/// atomically). Returns the token and the file it came from, if any.
pub fn bootstrap_token(
    given: Option<String>,
    state_dir: &Path,
) -> Result<(String, Option<PathBuf>), AuthError> {
    if let Some(t) = given {
        if t.chars().count() < MIN_ADMIN_TOKEN_LEN {
            return Err(AuthError::AdminTokenTooShort(t.chars().count()));
        }
        return Ok((t, None));
    }
    let path = state_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_string(), Some(path))),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(AuthError::Read { path, source }),
    }
    let secret: [u8; 32] = rand::random();
    let token = format!("gty_admin_{}", hex(&secret));
    write_secret(&path, &token).map_err(|source| AuthError::Write {
        path: path.clone(),
        source,
    })?;
    Ok((token, Some(path)))
}

/// Temp file (0600), fsync, rename, fsync dir.
fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(".admin-token.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// A token to store: its id, name, hash, account (none: admin), when it
/// was made and when it expires (Unix ms; none: never).
pub struct NewToken<'a> {
    pub id: TokenId,
    pub name: &'a str,
    pub hash_hex: &'a str,
    pub account: Option<AccountId>,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
}

/// Stores a minted token's hash (a token that never expires).
pub async fn store_token(
    db: &Db,
    id: TokenId,
    name: &str,
    hash_hex: &str,
    account: Option<AccountId>,
) -> Result<(), DbError> {
    let t = NewToken {
        id,
        name,
        hash_hex,
        account,
        created_ms: crate::db::now_ms(),
        expires_ms: None,
    };
    insert_token(db, t).await
}

/// Stores a minted token's hash, with its times.
pub async fn insert_token(db: &Db, t: NewToken<'_>) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO tokens (id, name, hash, account_id, created_ms, expires_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(t.id.to_string())
    .bind(t.name)
    .bind(t.hash_hex)
    .bind(t.account.map(|a| a.to_string()))
    .bind(t.created_ms)
    .bind(t.expires_ms)
    .execute(&db.pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_admin_token_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let (t1, p) = bootstrap_token(None, dir.path()).unwrap();
        let p = p.unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (t2, _) = bootstrap_token(None, dir.path()).unwrap();
        assert_eq!(t1, t2);
        let (t3, p3) = bootstrap_token(Some("given-token-000000".into()), dir.path()).unwrap();
        assert_eq!(t3, "given-token-000000");
        assert!(p3.is_none());
    }

    #[test]
    fn short_given_admin_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = bootstrap_token(Some("x".into()), dir.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the admin token (GANTRY_ADMIN_TOKEN or admin_token) must be at least 16 characters; \
             this one has 1"
        );
    }

    #[test]
    fn refusals_are_counted_and_limited_per_source() {
        let l = Limiter::new(1, 1);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let codes: Vec<u16> = (0..SOURCE_BURST + 5)
            .map(|_| {
                l.refuse("unknown", Some(ip), ApiError::UnknownToken)
                    .status()
                    .as_u16()
            })
            .collect();
        assert!(
            codes[..SOURCE_BURST as usize].iter().all(|c| *c == 401),
            "{codes:?}"
        );
        assert_eq!(codes.last(), Some(&429));
        // Another address is not affected; an unknown one is never limited.
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(
            l.refuse("missing", Some(other), ApiError::Unauthorized)
                .status(),
            401
        );
        assert_eq!(
            l.refuse("missing", None, ApiError::Unauthorized).status(),
            401
        );
        let m = l.render_metrics();
        assert!(
            m.contains("gantry_api_refused_total{reason=\"missing\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("gantry_api_refused_total{reason=\"source_limited\"} 5"),
            "{m}"
        );
    }

    #[test]
    fn minted_tokens_differ_and_hash_matches() {
        let id = TokenId::new();
        let (a, ha) = mint(id);
        let (b, _) = mint(id);
        assert_ne!(a, b);
        assert_eq!(ha, hex(&hash(&a)));
        assert!(a.starts_with("gty_"));
    }
}
