//! Routing through the proxy: by host name on the shared listener (HTTP/1.1
//! and HTTP/2), by port on per-port listeners opened and closed by
//! `set_routes`, the headers the upstream sees, 404 and 502 answers, the
//! counters, and shutdown.

mod common;

use common::*;
use gantry_proxy::{Proxy, ProxyConfig, ProxyError, Routes};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "8888-ins-a";

fn shared_addr(proxy: &Proxy) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], proxy.https_port().expect("shared listener")))
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A port that refuses connections for as long as the socket lives: bound
/// but never listening, so neither another test's listener nor a client's
/// ephemeral port (a TCP self-connect) can take it meanwhile.
fn dead_port() -> (tokio::net::TcpSocket, u16) {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_by_name_keeps_host_and_sets_forwarded_headers() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let (up, _) = upstream().await?;
    let proxy = proxy(&ca)?;
    assert!(proxy.set_routes(name_routes(&[NAME], up)).is_empty());
    let port = proxy.https_port().unwrap();
    let client = client_builder(&ca.pem(), &[NAME], shared_addr(&proxy))?
        .http1_only()
        .build()?;
    let host = format!("8888-INS-A.{DOMAIN}:{port}");
    let resp = client
        .post(url(NAME, port, "/lab/tree?token=secret"))
        .header("host", &host)
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-host", "spoofed.example")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .body("hello")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    let echo = parse_echo(&resp.text().await?);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["target"], "/lab/tree?token=secret");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["host"], host, "the Host the browser sent is kept");
    assert_eq!(echo["xff"], "203.0.113.9, 127.0.0.1");
    assert_eq!(echo["xfp"], "https");
    assert_eq!(echo["xfh"], host);
    assert_eq!(echo["peer"], "127.0.0.1");
    assert_eq!(
        echo["hop"], "-",
        "headers named by Connection are not forwarded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_from_the_client_reaches_an_http1_upstream() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let (up, _) = upstream().await?;
    let proxy = proxy(&ca)?;
    proxy.set_routes(name_routes(&[NAME], up));
    let port = proxy.https_port().unwrap();
    let client = client(&ca.pem(), &[NAME], shared_addr(&proxy))?;
    for i in 0..3 {
        let resp = client
            .get(url(NAME, port, &format!("/api/{i}")))
            .send()
            .await?;
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let echo = parse_echo(&resp.text().await?);
        assert_eq!(echo["version"], "HTTP/1.1");
        assert_eq!(echo["target"], format!("/api/{i}"));
        assert_eq!(
            echo["host"],
            format!("{NAME}.{DOMAIN}:{port}"),
            ":authority becomes Host"
        );
        assert_eq!(echo["xfh"], format!("{NAME}.{DOMAIN}:{port}"));
    }
    let stats = proxy.stats();
    assert_eq!(
        stats.connections_total, 1,
        "one HTTP/2 connection carried every request"
    );
    assert_eq!(stats.requests_total, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_get_404_and_dead_upstreams_502() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let (_held, dead) = dead_port();
    let proxy = proxy(&ca)?;
    proxy.set_routes(name_routes(
        &["dead"],
        SocketAddr::from(([127, 0, 0, 1], dead)),
    ));
    let port = proxy.https_port().unwrap();
    let client = client(&ca.pem(), &["nobody", "dead"], shared_addr(&proxy))?;

    let resp = client.get(url("nobody", port, "/")).send().await?;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.text().await?,
        "No instance answers to this host name.\n"
    );

    let resp = client.get(url("dead", port, "/x?token=t")).send().await?;
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.text().await?,
        format!("The instance is not answering on port {dead}.\n")
    );
    let stats = proxy.stats();
    assert_eq!(stats.upstream_errors_total, 1);
    assert_eq!(stats.requests_total, 2);
    Ok(())
}

/// Sends one keep-alive HTTP/1.1 request on a raw TLS connection and reads
/// the answer's head.
async fn raw_request(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> anyhow::Result<String> {
    tls.write_all(format!("GET /raw HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 4096];
    let n = tls.read(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_port_listeners_follow_set_routes() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let (up, _) = upstream().await?;
    let proxy = proxy(&ca)?;
    let port = free_port();
    let routes = Routes {
        by_name: HashMap::new(),
        by_port: HashMap::from([(port, up)]),
    };
    let failed = proxy.set_routes(routes);
    assert!(failed.is_empty(), "{failed:?}");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let client = client(&ca.pem(), &[], addr)?;

    let resp = client.get(url("", port, "/by-port")).send().await?;
    assert_eq!(resp.status(), 200);
    let echo = parse_echo(&resp.text().await?);
    assert_eq!(echo["target"], "/by-port");
    assert_eq!(echo["host"], format!("{DOMAIN}:{port}"));

    // An edited route applies to the next request on the same listener.
    let (_held, dead) = dead_port();
    let dead = SocketAddr::from(([127, 0, 0, 1], dead));
    assert!(proxy
        .set_routes(Routes {
            by_port: HashMap::from([(port, dead)]),
            ..Routes::default()
        })
        .is_empty());
    let resp = client.get(url("", port, "/")).send().await?;
    assert_eq!(resp.status(), 502);

    // Removing the port closes the listener and the connections on it.
    proxy.set_routes(Routes {
        by_port: HashMap::from([(port, up)]),
        ..Routes::default()
    });
    let cfg = tls_client(&ca.pem(), &[b"http/1.1"])?;
    let mut open = tls_connect(cfg, addr, "any").await?;
    assert!(raw_request(&mut open).await?.starts_with("HTTP/1.1 200"));
    assert!(proxy.set_routes(Routes::default()).is_empty());
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf)).await?;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the open connection is closed: {read:?}"
    );
    let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_that_cannot_be_bound_are_reported() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let proxy = proxy(&ca)?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken_port = taken.local_addr()?.port();
    let up = SocketAddr::from(([127, 0, 0, 1], 9));
    let mut failed = proxy.set_routes(Routes {
        by_port: HashMap::from([(taken_port, up), (0, up)]),
        ..Routes::default()
    });
    failed.sort_by_key(|(p, _)| *p);
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(matches!(failed[0], (0, ProxyError::PortZero)));
    assert!(matches!(&failed[1], (p, ProxyError::Bind { .. }) if *p == taken_port));
    // Once the port is free, the next set_routes binds it.
    drop(taken);
    let failed = proxy.set_routes(Routes {
        by_port: HashMap::from([(taken_port, up)]),
        ..Routes::default()
    });
    assert!(failed.is_empty(), "{failed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_shared_listener() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let proxy = proxy(&ca)?;
    let addr = shared_addr(&proxy);
    tokio::net::TcpStream::connect(addr).await?;
    proxy.shutdown();
    let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    Ok(())
}

#[test]
fn a_proxy_without_listeners_starts_and_stops() -> anyhow::Result<()> {
    let proxy = Proxy::start(ProxyConfig::default())?;
    assert_eq!(proxy.https_port(), None);
    assert!(!proxy.has_certificate());
    assert_eq!(proxy.stats(), gantry_proxy::ProxyStats::default());
    drop(proxy);
    Ok(())
}
