//! The crate's one error type, [`ProxyError`]: what `Proxy::start`,
//! `Proxy::set_routes` and `Proxy::set_certificate` can refuse, and why.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the proxy could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy's own tokio runtime could not be built.
    #[error("cannot start the proxy's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The network namespace could not be opened or entered.
    #[error("cannot enter network namespace {path}: {reason}")]
    Netns { path: PathBuf, reason: String },
    /// A listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Port 0 was given as a per-port route.
    #[error("port 0 cannot carry a per-port route")]
    PortZero,
    /// The certificate chain could not be read.
    #[error("the certificate chain is not usable: {0}")]
    Certificate(String),
    /// The private key could not be read (its bytes are never quoted).
    #[error("the private key is not usable: {0}")]
    PrivateKey(String),
    /// The private key does not belong to the chain's first (leaf) certificate.
    #[error("the private key does not match the leaf certificate")]
    KeyMismatch,
    /// The proxy's runtime has stopped, so the request could not be carried out.
    #[error("the proxy has stopped")]
    Stopped,
}
