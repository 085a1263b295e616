//! Work long-poll wakes across controller replicas (PostgreSQL only).
//!
//! A host's work long-poll waits on the replica it reached, but the
//! tenant's action that gives it work may land on another. Every wake
//! ([`crate::Wakers::wake`]) is therefore also published with
//! `pg_notify` on the channel `gantry_wake` (payload: this replica's
//! origin tag and the host id), and every replica listens on it and
//! wakes its own polls of that host. A replica's own notifications are
//! skipped. When the listening connection is lost, notifications may
//! have been missed, so every poll of this replica is woken (it looks at
//! the database again); a poll also ends by itself after its wait, so a
//! lost wake delays work, it never loses it.

use crate::AppState;
use gantry_proto::ids::HostId;
use sqlx::postgres::PgListener;
use std::time::Duration;
use tokio::sync::mpsc;

/// The notification channel.
const CHANNEL: &str = "gantry_wake";
/// Wait after a failure of the listening connection.
const RETRY: Duration = Duration::from_secs(1);

/// Publishes this replica's wakes and applies the others' until aborted.
/// `rx` receives the hosts woken here (see [`crate::Wakers::publish_to`]).
pub async fn run(st: AppState, url: String, rx: mpsc::UnboundedReceiver<HostId>) {
    let origin = uuid::Uuid::new_v4().simple().to_string();
    tokio::join!(publish(&st, &origin, rx), listen(&st, &origin, &url));
}

async fn publish(st: &AppState, origin: &str, mut rx: mpsc::UnboundedReceiver<HostId>) {
    while let Some(host) = rx.recv().await {
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(format!("{origin} {host}"))
            .execute(&st.db.pool)
            .await;
        if let Err(e) = sent {
            tracing::warn!(%host, error = %e, "cannot tell the other replicas about work for a host");
        }
    }
}

async fn listen(st: &AppState, origin: &str, url: &str) {
    loop {
        let mut l = match connect(url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other replicas' wakes; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        // Anything published before we listened again may be lost.
        st.wake.wake_all_local();
        loop {
            match l.try_recv().await {
                Ok(Some(n)) => {
                    let mut parts = n.payload().splitn(2, ' ');
                    let (from, host) = (parts.next(), parts.next());
                    if from == Some(origin) {
                        continue;
                    }
                    match host.and_then(|h| h.parse::<HostId>().ok()) {
                        Some(h) => st.wake.wake_local(&h),
                        None => tracing::warn!(
                            payload = n.payload(),
                            "ignoring a malformed wake notification"
                        ),
                    }
                }
                Ok(None) => {
                    tracing::warn!("lost the wake listener's connection; reconnected");
                    st.wake.wake_all_local();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the wake listener failed; reconnecting");
                    tokio::time::sleep(RETRY).await;
                    break;
                }
            }
        }
    }
}

async fn connect(url: &str) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect(url).await?;
    l.listen(CHANNEL).await?;
    Ok(l)
}
