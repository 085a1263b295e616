//! Certificates: the chain verifies against the test CA (and only it), no
//! certificate means failed handshakes and no panic, a new certificate is
//! presented on the next handshake without a restart, and keys that do not
//! match the leaf are refused. Fixtures in `tests/data/` (made once with
//! openssl, test-only) cover SEC1 and PKCS#1 keys.

mod common;

use common::*;
use gantry_proxy::{Proxy, ProxyConfig, ProxyError};
use std::net::SocketAddr;

const NAME: &str = "8888-ins-c";

fn shared_addr(proxy: &Proxy) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], proxy.https_port().expect("shared listener")))
}

async fn get_status(client: &reqwest::Client, port: u16) -> reqwest::Result<u16> {
    Ok(client
        .get(url(NAME, port, "/"))
        .send()
        .await?
        .status()
        .as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_verifies_against_its_ca_only() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let other = Ca::new("other ca")?;
    let (up, _) = upstream().await?;
    let proxy = proxy(&ca)?;
    proxy.set_routes(name_routes(&[NAME], up));
    let port = proxy.https_port().unwrap();

    let tls = tls_connect(tls_client(&ca.pem(), &[b"h2"])?, shared_addr(&proxy), NAME).await?;
    let (_, session) = tls.get_ref();
    let chain = session.peer_certificates().expect("a chain");
    assert_eq!(chain.len(), 2, "leaf, then the CA");
    assert_eq!(chain[1].as_ref(), ca.cert.der().as_ref());
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));

    let trusting = client(&ca.pem(), &[NAME], shared_addr(&proxy))?;
    assert_eq!(get_status(&trusting, port).await?, 200);
    let stranger = client(&other.pem(), &[NAME], shared_addr(&proxy))?;
    assert!(get_status(&stranger, port).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_handshakes_fail_cleanly() -> anyhow::Result<()> {
    init_logs();
    let ca = Ca::new("test ca")?;
    let (up, _) = upstream().await?;
    let proxy = Proxy::start(ProxyConfig {
        https_listen: Some("127.0.0.1:0".parse()?),
        workers: 1,
        ..ProxyConfig::default()
    })?;
    proxy.set_routes(name_routes(&[NAME], up));
    assert!(!proxy.has_certificate());
    let cfg = tls_client(&ca.pem(), &[b"http/1.1"])?;
    assert!(tls_connect(cfg.clone(), shared_addr(&proxy), NAME)
        .await
        .is_err());

    let (chain, key) = ca.leaf()?;
    proxy.set_certificate(&chain, &key)?;
    assert!(proxy.has_certificate());
    tls_connect(cfg, shared_addr(&proxy), NAME).await?;
    let c = client(&ca.pem(), &[NAME], shared_addr(&proxy))?;
    assert_eq!(get_status(&c, proxy.https_port().unwrap()).await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_certificate_is_presented_without_restart() -> anyhow::Result<()> {
    let first = Ca::new("first ca")?;
    let second = Ca::new("second ca")?;
    let (up, _) = upstream().await?;
    let proxy = proxy(&first)?;
    proxy.set_routes(name_routes(&[NAME], up));
    let port = proxy.https_port().unwrap();
    let old_client = client(&first.pem(), &[NAME], shared_addr(&proxy))?;
    assert_eq!(get_status(&old_client, port).await?, 200);

    let (chain, key) = second.leaf()?;
    proxy.set_certificate(&chain, &key)?;
    let new_trust = client(&second.pem(), &[NAME], shared_addr(&proxy))?;
    assert_eq!(
        get_status(&new_trust, port).await?,
        200,
        "the second CA's leaf is presented"
    );
    let old_trust = client(&first.pem(), &[NAME], shared_addr(&proxy))?;
    assert!(
        get_status(&old_trust, port).await.is_err(),
        "the first leaf is gone"
    );
    // A connection made before the swap keeps working.
    assert_eq!(get_status(&old_client, port).await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_does_not_match_the_leaf_is_refused() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let (up, _) = upstream().await?;
    let proxy = proxy(&ca)?;
    proxy.set_routes(name_routes(&[NAME], up));
    let (chain, _) = ca.leaf()?;
    let (_, other_key) = ca.leaf()?;
    let err = proxy.set_certificate(&chain, &other_key).unwrap_err();
    assert!(matches!(err, ProxyError::KeyMismatch), "{err}");
    let err = proxy
        .set_certificate(&chain, "-----BEGIN NOTHING-----\n")
        .unwrap_err();
    assert!(matches!(err, ProxyError::PrivateKey(_)), "{err}");
    let err = proxy.set_certificate("", &other_key).unwrap_err();
    assert!(matches!(err, ProxyError::Certificate(_)), "{err}");
    // The loaded certificate is still served.
    let c = client(&ca.pem(), &[NAME], shared_addr(&proxy))?;
    assert_eq!(get_status(&c, proxy.https_port().unwrap()).await?, 200);
    Ok(())
}

#[test]
fn sec1_and_pkcs1_keys_are_read() -> anyhow::Result<()> {
    let data =
        |f: &str| std::fs::read_to_string(format!("{}/tests/data/{f}", env!("CARGO_MANIFEST_DIR")));
    let (ec_crt, ec_key) = (data("ec-sec1.crt")?, data("ec-sec1.key")?);
    let (rsa_crt, rsa_key) = (data("rsa-pkcs1.crt")?, data("rsa-pkcs1.key")?);
    assert!(ec_key.contains("BEGIN EC PRIVATE KEY") && rsa_key.contains("BEGIN RSA PRIVATE KEY"));
    let proxy = Proxy::start(ProxyConfig {
        workers: 1,
        ..ProxyConfig::default()
    })?;
    proxy.set_certificate(&ec_crt, &ec_key)?;
    proxy.set_certificate(&rsa_crt, &rsa_key)?;
    assert!(matches!(
        proxy.set_certificate(&ec_crt, &rsa_key),
        Err(ProxyError::KeyMismatch)
    ));
    assert!(matches!(
        proxy.set_certificate(&rsa_crt, &ec_key),
        Err(ProxyError::KeyMismatch)
    ));
    Ok(())
}
