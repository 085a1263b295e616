//! Plain counters ([`Stats`]) and their snapshot ([`ProxyStats`]); the agent
//! exports them on its own `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the proxy's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client TCP connections accepted, on every listener.
    pub connections_total: u64,
    /// Requests received (any protocol), routed or not.
    pub requests_total: u64,
    /// Requests answered 502 because the upstream failed.
    pub upstream_errors_total: u64,
    /// WebSocket upgrades completed through the proxy.
    pub websocket_upgrades_total: u64,
    /// Client connections open now (upgraded ones included).
    pub active_connections: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) connections: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
    pub(crate) websocket_upgrades: AtomicU64,
    pub(crate) active: AtomicU64,
}

/// Adds one to `counter`.
pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    /// The counters now.
    pub(crate) fn snapshot(&self) -> ProxyStats {
        ProxyStats {
            connections_total: self.connections.load(Ordering::Relaxed),
            requests_total: self.requests.load(Ordering::Relaxed),
            upstream_errors_total: self.upstream_errors.load(Ordering::Relaxed),
            websocket_upgrades_total: self.websocket_upgrades.load(Ordering::Relaxed),
            active_connections: self.active.load(Ordering::Relaxed),
        }
    }

    /// Counts a new open connection.
    pub(crate) fn open_connection(&self) {
        inc(&self.connections);
        inc(&self.active);
    }

    /// Counts a connection closed.
    pub(crate) fn close_connection(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}
