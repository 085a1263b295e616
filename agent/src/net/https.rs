//! The HTTPS front as the data plane sees it ([`HttpsFront`]): routes and a
//! certificate. The real one is `gantry-proxy` running in the data plane's
//! namespace ([`ProxyFront`]); [`FakeFront`] records what it was given.

use super::NetError;
use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Mutex;

/// The proxy's side of the data plane.
pub trait HttpsFront: Send + Sync {
    /// Replaces the routes: names (shared listener) and host ports (one TLS
    /// listener each). Returns the ports that could not be opened, with why.
    fn set_routes(
        &self,
        names: &BTreeMap<String, SocketAddrV4>,
        ports: &BTreeMap<u16, SocketAddrV4>,
    ) -> Vec<(u16, String)>;
    /// Hot-swaps the certificate.
    fn set_certificate(&self, chain_pem: &str, key_pem: &str) -> Result<(), NetError>;
    /// The shared listener's port.
    fn https_port(&self) -> Option<u16>;
    /// Counters for `/metrics`: connections, requests, upstream errors,
    /// WebSocket upgrades, and connections open now.
    fn stats(&self) -> gantry_proxy::ProxyStats {
        gantry_proxy::ProxyStats::default()
    }
}

/// `gantry-proxy`, in the data plane's namespace.
pub struct ProxyFront {
    proxy: gantry_proxy::Proxy,
}

impl ProxyFront {
    pub fn start(
        https_listen: Option<SocketAddr>,
        netns: Option<std::path::PathBuf>,
    ) -> Result<Self, NetError> {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let proxy = gantry_proxy::Proxy::start(gantry_proxy::ProxyConfig {
            https_listen,
            netns,
            workers,
            port_bind: std::net::Ipv4Addr::UNSPECIFIED.into(),
        })
        .map_err(|e| NetError::Https(e.to_string()))?;
        Ok(Self { proxy })
    }
}

impl HttpsFront for ProxyFront {
    fn set_routes(
        &self,
        names: &BTreeMap<String, SocketAddrV4>,
        ports: &BTreeMap<u16, SocketAddrV4>,
    ) -> Vec<(u16, String)> {
        let routes = gantry_proxy::Routes {
            by_name: names
                .iter()
                .map(|(n, a)| (n.clone(), SocketAddr::V4(*a)))
                .collect(),
            by_port: ports
                .iter()
                .map(|(p, a)| (*p, SocketAddr::V4(*a)))
                .collect(),
        };
        self.proxy
            .set_routes(routes)
            .into_iter()
            .map(|(p, e)| (p, e.to_string()))
            .collect()
    }

    fn set_certificate(&self, chain_pem: &str, key_pem: &str) -> Result<(), NetError> {
        self.proxy
            .set_certificate(chain_pem, key_pem)
            .map_err(|e| NetError::Https(e.to_string()))
    }

    fn https_port(&self) -> Option<u16> {
        self.proxy.https_port()
    }

    fn stats(&self) -> gantry_proxy::ProxyStats {
        self.proxy.stats()
    }
}

/// A front that records routes and certificates, for tests.
#[derive(Default)]
pub struct FakeFront {
    pub names: Mutex<BTreeMap<String, SocketAddrV4>>,
    pub ports: Mutex<BTreeMap<u16, SocketAddrV4>>,
    pub certs: Mutex<Vec<String>>,
}

impl HttpsFront for FakeFront {
    fn set_routes(
        &self,
        names: &BTreeMap<String, SocketAddrV4>,
        ports: &BTreeMap<u16, SocketAddrV4>,
    ) -> Vec<(u16, String)> {
        *self.names.lock().unwrap_or_else(|p| p.into_inner()) = names.clone();
        *self.ports.lock().unwrap_or_else(|p| p.into_inner()) = ports.clone();
        Vec::new()
    }

    fn set_certificate(&self, chain_pem: &str, _key_pem: &str) -> Result<(), NetError> {
        self.certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(chain_pem.to_string());
        Ok(())
    }

    fn https_port(&self) -> Option<u16> {
        Some(443)
    }
}
