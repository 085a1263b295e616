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

use crate::db::{col, parsed_opt, Db, DbError};
use crate::error::ApiError;
use gantry_proto::api::agent::{CREDENTIAL_REVOKED, HOST_CREDENTIAL_PREFIX, JOIN_TOKEN_PREFIX};
use gantry_proto::ids::{AccountId, HostId, JoinTokenId, TokenId};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::io::Write;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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
}

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

/// Checks tokens against the bootstrap hash and the `tokens` table.
pub struct Verifier {
    bootstrap: [u8; 32],
    /// Recently verified tokens, keyed by the blake3 hash of the token.
    cache: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
}

impl Verifier {
    pub fn new(bootstrap_token: &str) -> Self {
        Self {
            bootstrap: hash(bootstrap_token),
            cache: Mutex::default(),
        }
    }

    /// Forgets every cached verification (after a revocation).
    pub fn forget_all(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub async fn verify(&self, db: &Db, token: &str) -> Result<Identity, ApiError> {
        let presented = hash(token);
        if let Some((who, at)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&presented)
        {
            if at.elapsed() < CACHE_TTL {
                return Ok(who.clone());
            }
        }
        let who = self.verify_uncached(db, token, &presented).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(presented, (who.clone(), Instant::now()));
        Ok(who)
    }

    async fn verify_uncached(
        &self,
        db: &Db,
        token: &str,
        presented: &[u8; 32],
    ) -> Result<Identity, ApiError> {
        if let Some(id) = embedded::<TokenId>(token, "gty_", TokenId::PREFIX) {
            let sql = "SELECT hash, account_id FROM tokens WHERE id = $1 AND revoked = 0";
            let row = lookup(db, sql, &id.to_string(), presented).await?;
            let account: Option<AccountId> = parsed_opt(&row, "account_id", "tokens")?;
            let mut who = Identity::admin(id.to_string());
            who.account = account;
            return Ok(who);
        }
        if let Some(id) = embedded::<JoinTokenId>(token, JOIN_TOKEN_PREFIX, JoinTokenId::PREFIX) {
            let sql = "SELECT hash FROM join_tokens WHERE id = $1";
            lookup(db, sql, &id.to_string(), presented).await?;
            let mut who = Identity::admin(id.to_string());
            who.join = Some(id);
            return Ok(who);
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
            return Ok(who);
        }
        if bool::from(presented.ct_eq(&self.bootstrap)) {
            return Ok(Identity::admin("bootstrap-admin"));
        }
        Err(ApiError::Unauthorized)
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
        None => Err(ApiError::Unauthorized),
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
        .ok_or(ApiError::Unauthorized)?;
    let stored: String = col(&row, "hash")?;
    if hex(presented).as_bytes().ct_eq(stored.as_bytes()).into() {
        Ok(row)
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Per-token request rate limit.
pub struct Limiter(DefaultKeyedRateLimiter<String>);

impl Limiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let q = Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self(RateLimiter::keyed(q))
    }

    pub fn check(&self, actor: &str) -> Result<(), ApiError> {
        self.0
            .check_key(&actor.to_string())
            .map_err(|_| ApiError::RateLimited)
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

/// Stores a minted token's hash.
pub async fn store_token(
    db: &Db,
    id: TokenId,
    name: &str,
    hash_hex: &str,
    account: Option<AccountId>,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO tokens (id, name, hash, account_id, created_ms) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id.to_string())
    .bind(name)
    .bind(hash_hex)
    .bind(account.map(|a| a.to_string()))
    .bind(crate::db::now_ms())
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
    fn minted_tokens_differ_and_hash_matches() {
        let id = TokenId::new();
        let (a, ha) = mint(id);
        let (b, _) = mint(id);
        assert_ne!(a, b);
        assert_eq!(ha, hex(&hash(&a)));
        assert!(a.starts_with("gty_"));
    }
}
