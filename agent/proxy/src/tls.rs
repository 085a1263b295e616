//! TLS: the server configuration (ring provider, ALPN `h2` and
//! `http/1.1`) and [`CertStore`], the certificate cell behind a custom
//! [`ResolvesServerCert`]. A new certificate replaces the cell's content,
//! so the next handshake presents it without restarting anything; with an
//! empty cell handshakes fail (rustls sends an alert) and nothing panics.

use crate::error::ProxyError;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, ServerConfig};
use std::sync::{Arc, RwLock};

/// ALPN protocols offered, most preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The current certificate and key, swapped whole on rotation.
#[derive(Debug, Default)]
pub(crate) struct CertStore {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertStore {
    /// Replaces the certificate; handshakes from now on present it.
    pub(crate) fn set(&self, key: CertifiedKey) {
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        *slot = Some(Arc::new(key));
    }

    /// Whether a certificate is loaded.
    pub(crate) fn is_set(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The crypto provider every part of the proxy uses (ring).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server configuration: safe default protocol versions, no client
/// certificates, certificates from `store`, ALPN h2 then http/1.1.
pub(crate) fn server_config(
    provider: Arc<CryptoProvider>,
    store: Arc<CertStore>,
) -> Result<ServerConfig, ProxyError> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Certificate(format!("TLS configuration: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Reads a PEM chain (leaf first) and a PEM key (PKCS#8, SEC1 or PKCS#1)
/// into a [`CertifiedKey`], refusing a key that does not match the leaf.
pub(crate) fn certified_key(
    chain_pem: &str,
    key_pem: &str,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, ProxyError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProxyError::Certificate(format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(ProxyError::Certificate(
            "no CERTIFICATE block found".to_owned(),
        ));
    }
    // The PEM error could quote a line of the key: say only what failed.
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
        ProxyError::PrivateKey("no PKCS#8, SEC1 or PKCS#1 private key block found".to_owned())
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| ProxyError::PrivateKey(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(ProxyError::KeyMismatch)
        }
        Err(e) => Err(ProxyError::Certificate(format!(
            "cannot check the key against the leaf: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_garbage_input_is_refused() {
        let p = provider();
        let err = certified_key("", "", &p).unwrap_err();
        assert!(matches!(err, ProxyError::Certificate(_)), "{err}");
        let err = certified_key("not pem at all", "x", &p).unwrap_err();
        assert!(matches!(err, ProxyError::Certificate(_)), "{err}");
    }

    #[test]
    fn an_empty_store_resolves_nothing() {
        let store = CertStore::default();
        assert!(!store.is_set());
        assert!(store.current.read().unwrap().is_none());
    }
}
