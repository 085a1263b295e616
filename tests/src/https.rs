//! HTTPS and WebSockets from a test's network namespace, trusting only a
//! given CA (the controller's): plain GETs with reqwest, and a WebSocket
//! echo over rustls with the test guest's own frame code
//! (`gantry_guest_web::ws`). Names are resolved by the caller (SNI and Host
//! carry the name; the connection goes to the address given), so no DNS is
//! ever asked.

use crate::netns::Netns;
use anyhow::{bail, Context};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(20);

/// `GET url` from inside `ns`, trusting only `ca_pem`, with the URL's host
/// name resolved to `addr` (an address inside a test namespace). Returns
/// the status and the body.
pub fn get(ns: &Netns, url: &str, ca_pem: &str, addr: SocketAddr) -> anyhow::Result<(u16, String)> {
    let (url, ca) = (url.to_string(), ca_pem.to_string());
    ns.enter(move || -> anyhow::Result<(u16, String)> {
        let parsed = reqwest::Url::parse(&url)?;
        let host = parsed.host_str().context("no host in the URL")?.to_string();
        let ca = reqwest::Certificate::from_pem(ca.as_bytes())?;
        let client = reqwest::blocking::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .resolve(&host, addr)
            .timeout(TIMEOUT)
            .build()?;
        let resp = client.get(&url).send().map_err(|e| {
            let mut chain = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                chain.push_str(&format!(": {s}"));
                src = s.source();
            }
            anyhow::anyhow!(chain)
        })?;
        let status = resp.status().as_u16();
        Ok((status, resp.text()?))
    })?
}

fn tls_config(ca_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.context("CA PEM")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Opens a WebSocket to `wss://<host><path>` (TLS to `addr`, SNI and Host
/// `host`) from inside `ns`, sends each of `messages` as a text frame and
/// returns the texts echoed back, waiting `idle` between messages.
pub fn websocket_echo(
    ns: &Netns,
    host: &str,
    addr: SocketAddr,
    path: &str,
    ca_pem: &str,
    messages: &[&str],
    idle: Duration,
) -> anyhow::Result<Vec<String>> {
    let cfg = tls_config(ca_pem)?;
    let (host, path) = (host.to_string(), path.to_string());
    let messages: Vec<String> = messages.iter().map(|m| m.to_string()).collect();
    ns.enter(move || -> anyhow::Result<Vec<String>> {
        use gantry_guest_web::ws;
        let name = rustls::pki_types::ServerName::try_from(host.clone())?;
        let conn = rustls::ClientConnection::new(cfg, name)?;
        let sock = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        sock.set_read_timeout(Some(TIMEOUT + idle))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        write!(
            tls,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )?;
        tls.flush()?;
        let mut rd = BufReader::new(tls);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if rd.read_line(&mut line)? == 0 {
                bail!("the connection closed during the handshake: {head}");
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        if !head.starts_with("HTTP/1.1 101") {
            bail!("no upgrade: {head}");
        }
        let accept = ws::accept_key(key);
        if !head
            .to_ascii_lowercase()
            .contains(&accept.to_ascii_lowercase())
        {
            bail!("wrong Sec-WebSocket-Accept (want {accept}): {head}");
        }
        let mut out = Vec::new();
        for m in &messages {
            std::thread::sleep(idle);
            ws::write_frame(rd.get_mut(), 1, m.as_bytes(), Some([1, 2, 3, 4]))?;
            rd.get_mut().flush()?;
            let f = ws::read_frame(&mut rd, 1 << 20)?;
            out.push(String::from_utf8_lossy(&f.payload).into_owned());
        }
        Ok(out)
    })?
}
