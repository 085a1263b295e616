//! The HTTPS front as the data plane sees it ([`HttpsFront`]): routes and a
//! certificate. The real one is `gantry-proxy` running in the data plane's
//! namespace ([`ProxyFront`]); [`FakeFront`] records what it was given.

use super::NetError;
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
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
