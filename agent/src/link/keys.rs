//! Snapshot-store chunk keys from the controller.
//!
//! A linked agent's keyring is *managed* (`gantry_store::Keyring::set_managed`):
//! it writes an account's snapshots only under the key the controller keeps
//! for that account, so every host sharing a store names chunks alike and
//! losing a host loses no key. Before work that reads or writes an
//! account's snapshots (Take Snapshot; Create from a snapshot or an image
//! made from one) the agent fetches the account's keys
//! (`GET /v1/agent/store-keys/{account}`, host credential; the controller
//! answers only while this host serves the account) and adopts them into
//! its keyring file (0600), which caches them: a restart while the
//! controller is unreachable still restores and compacts.
//!
//! Upgrade path: a key this host made itself (before it was linked, or
//! before controllers kept keys) is offered once
//! (`POST /v1/agent/store-keys/{account}`): the controller adopts it when
//! the account has no key yet, so the snapshots written under it stay
//! readable everywhere; else it keeps it as a previous (read-only) key. The
//! controller's key then wins here too; the local one is kept for reading.
//! Keys are never logged.

use super::Link;
use gantry_proto::api::agent::{OfferStoreKey, StoreKeys};
use gantry_proto::net::Secret;
use gantry_proto::SnapshotId;
use gantry_store::keys::{self, Adopted, KeySource, Keyring};
use std::sync::Arc;
use std::time::Duration;

/// Tries of a key fetch before falling back to the cached keys.
const TRIES: u32 = 4;

/// One writer of the keyring file at a time in this process.
static KEYRING: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot get the chunk key of account {account} from the controller: {reason}")]
    Fetch { account: String, reason: String },
    #[error("the controller's chunk keys of account {0} are malformed")]
    Malformed(String),
    #[error(transparent)]
    Keyring(#[from] keys::KeyError),
    #[error("snapshot store: {0}")]
    Store(String),
}

/// Adopts the controller's answer into the keyring file.
pub fn adopt(path: &std::path::Path, account: &str, k: &StoreKeys) -> Result<Adopted, KeysError> {
    let bad = || KeysError::Malformed(account.to_string());
    let current = keys::parse_key(k.current.expose()).map_err(|_| bad())?;
    let previous = k
        .previous
        .iter()
        .map(|p| keys::parse_key(p.expose()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad())?;
    let _one = KEYRING.lock().unwrap_or_else(|p| p.into_inner());
    let ring = Keyring::load(path)?;
    let outcome = ring.adopt(account, current, &previous)?;
    match outcome {
        Adopted::Replaced => tracing::warn!(
            account,
            "this host's own chunk key of the account differed from the controller's; the \
             controller's is used from now on, the host's is kept to read older snapshots"
        ),
        Adopted::Added | Adopted::Confirmed => {
            tracing::info!(account, "took the account's chunk keys from the controller")
        }
        Adopted::Unchanged => {}
    }
    Ok(outcome)
}

/// The host's own key of `account`, if its current key is one.
fn local_key(path: &std::path::Path, account: &str) -> Result<Option<Secret>, KeysError> {
    let ring = Keyring::load(path)?;
    Ok(ring
        .local_keys()
        .into_iter()
        .find(|(o, _)| o == account)
        .map(|(_, k)| Secret::new(keys::key_hex(&k))))
}

/// One fetch (or, with a local key, an offer) of `account`'s keys.
async fn fetch(link: &Link, account: &str) -> Result<StoreKeys, super::client::ClientError> {
    let path = link.manager.config().store_keyring_path();
    let own = local_key(&path, account).unwrap_or_else(|e| {
        tracing::warn!(account, error = %e, "cannot read the keyring");
        None
    });
    match own {
        Some(key) => {
            let offer = OfferStoreKey { key };
            link.client
                .offer_store_key(link.credential(), account, &offer)
                .await
        }
        None => link.client.store_keys(link.credential(), account).await,
    }
}

/// Makes sure the keyring holds the controller's keys of `account`
/// (fetched now; the cached ones when the controller does not answer).
pub async fn ensure(link: &Link, account: &str) -> Result<(), KeysError> {
    keys::validate_owner(account)?;
    let path = link.manager.config().store_keyring_path();
    let mut last = String::new();
    for attempt in 0..TRIES {
        match fetch(link, account).await {
            Ok(k) if k.account.to_string() == account => {
                let p = path.clone();
                let a = account.to_string();
                return tokio::task::spawn_blocking(move || adopt(&p, &a, &k).map(|_| ()))
                    .await
                    .map_err(|e| KeysError::Store(e.to_string()))?;
            }
            Ok(_) => return Err(KeysError::Malformed(account.to_string())),
            Err(e) if e.is_permanent() => {
                return Err(KeysError::Fetch {
                    account: account.into(),
                    reason: e.to_string(),
                })
            }
            Err(e) => {
                last = e.to_string();
                tracing::warn!(account, attempt, error = %e, "cannot fetch the account's chunk keys");
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
        }
    }
    // The controller keeps an account's current key for good: a cached one
    // is still right.
    if Keyring::load(&path)?.source(account) == Some(KeySource::Controller) {
        tracing::warn!(account, "using the cached chunk keys of the account");
        return Ok(());
    }
    Err(KeysError::Fetch {
        account: account.into(),
        reason: last,
    })
}

/// [`ensure`] for the account owning a snapshot in the host's store (read
/// from its manifest); public snapshots need no key.
pub async fn ensure_for_snapshot(link: &Link, snapshot: SnapshotId) -> Result<(), KeysError> {
    let m = link.manager.clone();
    let owner = tokio::task::spawn_blocking(move || -> Result<Option<String>, KeysError> {
        let store = m
            .open_existing_store()
            .map_err(|e| KeysError::Store(e.to_string()))?
            .ok_or_else(|| KeysError::Store("the host has no snapshot store".into()))?;
        let manifest = store
            .manifest(&snapshot.to_string())
            .map_err(|e| KeysError::Store(e.to_string()))?;
        Ok(manifest.meta.owner)
    })
    .await
    .map_err(|e| KeysError::Store(e.to_string()))??;
    match owner {
        Some(o) => ensure(link, &o).await,
        None => Ok(()),
    }
}

/// Offers every key this host made itself to the controller, once per
/// start (see the module docs); a refused offer (no work for the account
/// here) is left for the first work that needs the account's key.
pub async fn offer_local_keys(link: Arc<Link>) {
    let path = link.manager.config().store_keyring_path();
    let local = match Keyring::load(&path) {
        Ok(r) => r.local_keys(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the keyring to offer its keys");
            return;
        }
    };
    for (account, key) in local {
        let offer = OfferStoreKey {
            key: Secret::new(keys::key_hex(&key)),
        };
        let r = super::client::retry(
            "offer store key",
            || {
                link.client
                    .offer_store_key(link.credential(), &account, &offer)
            },
            |_| {},
        )
        .await;
        match r {
            Ok(k) => {
                if let Err(e) = adopt(&path, &account, &k) {
                    tracing::warn!(account, error = %e, "cannot keep the controller's chunk keys");
                }
            }
            Err(e) => {
                tracing::info!(account, error = %e, "the controller did not take this host's chunk key")
            }
        }
    }
}
