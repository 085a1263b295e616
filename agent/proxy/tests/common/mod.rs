//! Shared test rig: a throw-away CA and leaves (rcgen), an upstream HTTP
//! server that echoes what it received and streams large bodies, a
//! WebSocket echo upstream, a proxy started with a certificate, and a
//! reqwest client that trusts only the test CA. Everything listens on
//! 127.0.0.1:0 (or inside a test's own network namespace).
#![allow(dead_code)]
// tungstenite fixes the handshake callback's large error type.
#![allow(clippy::result_large_err)]

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use gantry_proxy::{Proxy, ProxyConfig, Routes};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// The name suffix the test leaves cover.
pub const DOMAIN: &str = "gpu1.test";

/// A test certificate authority.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `*.gpu1.test` and `gpu1.test`: (chain PEM, key PEM).
    pub fn leaf(&self) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let params = CertificateParams::new(vec![format!("*.{DOMAIN}"), DOMAIN.to_owned()])?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((
            format!("{}{}", cert.pem(), self.cert.pem()),
            key.serialize_pem(),
        ))
    }
}

/// Test logging (RUST_LOG=gantry_proxy=debug to see the proxy's).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A proxy on 127.0.0.1:0 with a leaf of `ca` loaded.
pub fn proxy(ca: &Ca) -> anyhow::Result<Proxy> {
    init_logs();
    let proxy = Proxy::start(ProxyConfig {
        https_listen: Some("127.0.0.1:0".parse()?),
        workers: 2,
        port_bind: "127.0.0.1".parse()?,
        ..ProxyConfig::default()
    })?;
    let (chain, key) = ca.leaf()?;
    proxy.set_certificate(&chain, &key)?;
    Ok(proxy)
}

/// Routes the given names (`<name>.gpu1.test`) to `upstream`.
pub fn name_routes(names: &[&str], upstream: SocketAddr) -> Routes {
    Routes {
        by_name: names
            .iter()
            .map(|n| (format!("{n}.{DOMAIN}"), upstream))
            .collect(),
        by_port: HashMap::new(),
    }
}

/// A client trusting only `ca_pem`, resolving every given name to `addr`.
pub fn client(ca_pem: &str, names: &[&str], addr: SocketAddr) -> anyhow::Result<reqwest::Client> {
    client_builder(ca_pem, names, addr)?
        .build()
        .context("client")
}

pub fn client_builder(
    ca_pem: &str,
    names: &[&str],
    addr: SocketAddr,
) -> anyhow::Result<reqwest::ClientBuilder> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .no_proxy();
    for n in names {
        b = b.resolve(&format!("{n}.{DOMAIN}"), addr);
    }
    b = b.resolve(DOMAIN, addr);
    Ok(b)
}

/// `https://<name>.gpu1.test:<port><path>`.
pub fn url(name: &str, port: u16, path: &str) -> String {
    if name.is_empty() {
        format!("https://{DOMAIN}:{port}{path}")
    } else {
        format!("https://{name}.{DOMAIN}:{port}{path}")
    }
}

/// Parses the echo upstream's `key: value` lines.
pub fn parse_echo(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Byte `i` of the test pattern streamed by `/download` and checked by `/upload`.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 13)) as u8
}

/// `len` pattern bytes starting at `offset`.
pub fn pattern_chunk(offset: u64, len: usize) -> Bytes {
    (0..len as u64)
        .map(|i| pattern(offset + i))
        .collect::<Vec<u8>>()
        .into()
}

type Body = BoxBody<Bytes, Infallible>;

/// What the upstream shares with the test.
#[derive(Default)]
pub struct Upstream {
    /// `/stream` sends its second part once this is notified.
    pub release: Notify,
    /// `/upload-slow` notifies this when the first chunk of the body arrived.
    pub first_chunk: Notify,
}

/// Starts the echo upstream on `listener`; returns its shared state.
pub fn spawn_upstream(listener: TcpListener) -> Arc<Upstream> {
    let state = Arc::new(Upstream::default());
    let st = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let st = Arc::clone(&st);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let st = Arc::clone(&st);
                    async move { Ok::<_, Infallible>(upstream_answer(st, peer, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    state
}

/// An echo upstream on 127.0.0.1:0.
pub async fn upstream() -> anyhow::Result<(SocketAddr, Arc<Upstream>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((addr, spawn_upstream(listener)))
}

fn full(s: String) -> Body {
    Full::new(Bytes::from(s)).boxed()
}

async fn upstream_answer(
    st: Arc<Upstream>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/download" => download(req.uri().query()),
        "/upload" | "/upload-slow" => upload(st, req, path == "/upload-slow").await,
        "/stream" => stream(st),
        _ => Response::new(full(echo(peer, &req))),
    }
}

fn echo(peer: SocketAddr, req: &Request<Incoming>) -> String {
    let h = |n: &str| {
        let all: Vec<&str> = req
            .headers()
            .get_all(n)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if all.is_empty() {
            "-".to_owned()
        } else {
            all.join(" | ")
        }
    };
    format!(
        "method: {}\ntarget: {}\nversion: {:?}\nhost: {}\nxff: {}\nxfp: {}\nxfh: {}\npeer: {}\ncookie: {}\nhop: {}\n",
        req.method(),
        req.uri(),
        req.version(),
        h("host"),
        h("x-forwarded-for"),
        h("x-forwarded-proto"),
        h("x-forwarded-host"),
        peer.ip(),
        h("cookie"),
        h("x-hop"),
    )
}

fn download(query: Option<&str>) -> Response<Body> {
    let total: u64 = query
        .and_then(|q| q.strip_prefix("bytes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    const CHUNK: u64 = 256 * 1024;
    let chunks = futures::stream::iter((0..total.div_ceil(CHUNK)).map(move |i| {
        let off = i * CHUNK;
        let len = CHUNK.min(total - off) as usize;
        Ok::<_, Infallible>(Frame::data(pattern_chunk(off, len)))
    }));
    Response::new(BodyExt::boxed(StreamBody::new(chunks)))
}

async fn upload(st: Arc<Upstream>, req: Request<Incoming>, slow: bool) -> Response<Body> {
    let mut body = req.into_body().into_data_stream();
    let (mut n, mut ok) = (0u64, true);
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return Response::new(full("error: body broke\n".to_owned()));
        };
        if slow && n == 0 {
            st.first_chunk.notify_one();
        }
        ok &= chunk
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern(n + i as u64));
        n += chunk.len() as u64;
    }
    Response::new(full(format!("bytes: {n}\nok: {ok}\n")))
}

fn stream(st: Arc<Upstream>) -> Response<Body> {
    let parts = futures::stream::unfold(0u8, move |step| {
        let st = Arc::clone(&st);
        async move {
            match step {
                0 => Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first\n"))),
                    1,
                )),
                1 => {
                    st.release.notified().await;
                    Some((Ok(Frame::data(Bytes::from_static(b"second\n"))), 2))
                }
                _ => None,
            }
        }
    });
    Response::new(BodyExt::boxed(StreamBody::new(parts)))
}

/// A WebSocket echo upstream on 127.0.0.1:0; the Host header of the last
/// handshake is kept in the returned cell.
pub async fn ws_upstream() -> anyhow::Result<(SocketAddr, Arc<Mutex<Option<String>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Mutex::new(None));
    let cell = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let cell = Arc::clone(&cell);
            tokio::spawn(async move {
                let cb = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                          resp| {
                    let host = req.headers().get("host").and_then(|h| h.to_str().ok());
                    *cell.lock().unwrap() = host.map(str::to_owned);
                    Ok(resp)
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, cb).await else {
                    return;
                };
                let (tx, rx) = ws.split();
                let _ = rx
                    .filter(|m| {
                        futures::future::ready(
                            m.as_ref().is_ok_and(|m| m.is_text() || m.is_binary()),
                        )
                    })
                    .forward(tx)
                    .await;
            });
        }
    });
    Ok((addr, seen))
}

/// A rustls client config trusting only `ca_pem` (for raw TLS clients).
pub fn tls_client(ca_pem: &str, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A TLS connection to `addr` presenting SNI `<name>.gpu1.test`.
pub async fn tls_connect(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let server_name = rustls::pki_types::ServerName::try_from(format!("{name}.{DOMAIN}"))?;
    Ok(tokio_rustls::TlsConnector::from(cfg)
        .connect(server_name, tcp)
        .await?)
}
