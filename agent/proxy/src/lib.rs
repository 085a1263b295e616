//! gantry-proxy: the agent's per-host HTTPS front. It terminates TLS
//! (rustls, ring; ALPN h2 and http/1.1) and forwards plain HTTP/1.1 to
//! guests' ports, with WebSockets, on its own worker threads (one
//! single-threaded tokio runtime each), optionally inside a network
//! namespace.
//!
//! - [`Proxy::start`] starts the workers (every thread entering
//!   [`ProxyConfig::netns`] when set) and binds the shared listener
//!   ([`ProxyConfig::https_listen`]), which routes by host name
//!   ([`Routes::by_name`]).
//! - [`Proxy::set_routes`] swaps the routing table and opens or closes the
//!   per-port listeners ([`Routes::by_port`]).
//! - [`Proxy::set_certificate`] hot-swaps the one certificate every
//!   listener presents.
//!
//! Module map: `workers` (threads), `server` (listeners, connections),
//! `forward` (one request), `upgrade` (WebSockets), `pool` (upstream
//! connections), `headers` (header rules), `tls` (certificates), `netns`
//! (namespaces), `stats` (counters), `error`. Design and limits:
//! `docs/https-proxy.md`.

mod error;
mod forward;
mod headers;
mod netns;
mod pool;
mod server;
mod stats;
mod tls;
mod upgrade;
mod workers;

pub use error::ProxyError;
pub use stats::ProxyStats;

use rustls::crypto::CryptoProvider;
use server::{Listening, Shared, Via};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tls::CertStore;
use tokio_util::sync::CancellationToken;

/// How the proxy starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Shared listener answering by SNI/Host name (e.g. 0.0.0.0:443); None = none.
    pub https_listen: Option<SocketAddr>,
    /// Network namespace to run in (a path like /run/netns/NAME); None = the caller's.
    pub netns: Option<PathBuf>,
    /// Worker threads (default: number of CPUs; 0 means the default).
    pub workers: usize,
    /// Address per-port listeners bind (default 0.0.0.0).
    pub port_bind: IpAddr,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            https_listen: None,
            netns: None,
            workers: default_workers(),
            port_bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The routing table, replaced whole by [`Proxy::set_routes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    /// Lower-case host names (e.g. "8888-ins-0190....gpu1.example.com") -> upstream guest address.
    pub by_name: HashMap<String, SocketAddr>,
    /// Host port -> upstream: the proxy listens (TLS) on port_bind:port for each entry.
    pub by_port: HashMap<u16, SocketAddr>,
}

/// A running proxy; stops on [`Proxy::shutdown`] or drop.
pub struct Proxy {
    workers: workers::Workers,
    shared: Arc<Shared>,
    certs: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
    root: CancellationToken,
    /// The shared listener; the root token closes it on shutdown.
    https: Option<Listening>,
    /// Open per-port listeners; the lock also serialises `set_routes`.
    ports: Mutex<HashMap<u16, Listening>>,
    port_bind: IpAddr,
}

impl Proxy {
    /// Starts the workers (in the namespace, if any) and binds the shared
    /// listener. No certificate yet: handshakes fail until
    /// [`Proxy::set_certificate`].
    pub fn start(cfg: ProxyConfig) -> Result<Proxy, ProxyError> {
        let netns = cfg
            .netns
            .as_deref()
            .map(netns::Namespace::open)
            .transpose()?;
        let workers = if cfg.workers == 0 {
            default_workers()
        } else {
            cfg.workers
        };
        let workers = workers::Workers::start(workers, netns.as_ref())?;
        let provider = tls::provider();
        let certs = Arc::new(CertStore::default());
        let server_config = tls::server_config(Arc::clone(&provider), Arc::clone(&certs))?;
        let shared = Arc::new(Shared::new(
            Arc::new(server_config),
            netns,
            workers.handles().to_vec(),
        ));
        let root = CancellationToken::new();
        let mut proxy = Proxy {
            workers,
            shared,
            certs,
            provider,
            root,
            https: None,
            ports: Mutex::new(HashMap::new()),
            port_bind: cfg.port_bind,
        };
        for (pool, handle) in proxy.shared.pools.iter().zip(proxy.workers.handles()) {
            handle.spawn(Arc::clone(pool).sweep_until(proxy.root.clone()));
        }
        if let Some(addr) = cfg.https_listen {
            let open = Listening::open(
                Arc::clone(&proxy.shared),
                addr,
                Via::Name,
                proxy.root.child_token(),
            );
            proxy.https = Some(proxy.workers.run(open)??);
        }
        Ok(proxy)
    }

    /// The shared listener's bound port.
    pub fn https_port(&self) -> Option<u16> {
        self.https.as_ref().map(|l| l.local.port())
    }

    /// Replaces the routing table; opens TLS listeners for new `by_port`
    /// entries and closes removed ones (open connections on a removed port
    /// are closed too). Returns the ports it could not bind, with why; they
    /// stay in the table and are tried again on the next call. Blocks the
    /// calling thread while sockets are bound and closed.
    pub fn set_routes(&self, routes: Routes) -> Vec<(u16, ProxyError)> {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<u16> = ports
            .keys()
            .filter(|p| !routes.by_port.contains_key(p))
            .copied()
            .collect();
        let removed: Vec<Listening> = gone.iter().filter_map(|p| ports.remove(p)).collect();
        let mut wanted: Vec<u16> = routes
            .by_port
            .keys()
            .filter(|p| !ports.contains_key(p))
            .copied()
            .collect();
        wanted.sort_unstable();
        self.shared.set_routes(routes);
        let work = open_and_close(
            Arc::clone(&self.shared),
            self.root.clone(),
            self.port_bind,
            wanted.clone(),
            removed,
        );
        let Ok(results) = self.workers.run(work) else {
            return wanted
                .into_iter()
                .map(|p| (p, ProxyError::Stopped))
                .collect();
        };
        let mut failed = Vec::new();
        for (port, result) in results {
            match result {
                Ok(listening) => {
                    ports.insert(port, listening);
                }
                Err(e) => failed.push((port, e)),
            }
        }
        failed
    }

    /// Hot-swaps the certificate (PEM chain, leaf first; PEM key PKCS#8,
    /// SEC1 or PKCS#1); new handshakes use it at once. Refuses a key that
    /// does not match the leaf, keeping the current certificate.
    pub fn set_certificate(&self, chain_pem: &str, key_pem: &str) -> Result<(), ProxyError> {
        let key = tls::certified_key(chain_pem, key_pem, &self.provider)?;
        self.certs.set(key);
        Ok(())
    }

    /// Whether a certificate is loaded.
    pub fn has_certificate(&self) -> bool {
        self.certs.is_set()
    }

    /// The counters now.
    pub fn stats(&self) -> ProxyStats {
        self.shared.stats.snapshot()
    }

    /// Closes every listener and connection and stops and joins the
    /// worker threads (also done on drop).
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Listeners first; the workers stop (and are joined) when
        // `self.workers` drops right after.
        self.root.cancel();
    }
}

/// Closes `removed`, then binds each of `wanted` on `bind`.
async fn open_and_close(
    shared: Arc<Shared>,
    root: CancellationToken,
    bind: IpAddr,
    wanted: Vec<u16>,
    removed: Vec<Listening>,
) -> Vec<(u16, Result<Listening, ProxyError>)> {
    for listening in removed {
        listening.close().await;
    }
    let mut opened = Vec::with_capacity(wanted.len());
    for port in wanted {
        let result = if port == 0 {
            Err(ProxyError::PortZero)
        } else {
            let addr = SocketAddr::new(bind, port);
            Listening::open(
                Arc::clone(&shared),
                addr,
                Via::Port(port),
                root.child_token(),
            )
            .await
        };
        opened.push((port, result));
    }
    opened
}
