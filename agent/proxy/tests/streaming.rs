//! Bodies are streamed both ways, not buffered: 64 MiB downloads and
//! uploads arrive byte-exact over HTTP/1.1 and HTTP/2, and a response's
//! (request's) first part reaches the client (upstream) before the rest
//! exists.

mod common;

use common::*;
use futures::StreamExt;
use std::net::SocketAddr;
use std::time::Duration;

const NAME: &str = "8888-ins-s";
const SIZE: u64 = 64 << 20;
const WAIT: Duration = Duration::from_secs(10);

async fn setup() -> anyhow::Result<(
    Ca,
    gantry_proxy::Proxy,
    std::sync::Arc<Upstream>,
    SocketAddr,
)> {
    let ca = Ca::new("test ca")?;
    let (up, state) = upstream().await?;
    let proxy = proxy(&ca)?;
    proxy.set_routes(name_routes(&[NAME], up));
    let addr = SocketAddr::from(([127, 0, 0, 1], proxy.https_port().unwrap()));
    Ok((ca, proxy, state, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_downloads_and_uploads_are_byte_exact() -> anyhow::Result<()> {
    let (ca, proxy, _, addr) = setup().await?;
    let port = addr.port();
    let h1 = client_builder(&ca.pem(), &[NAME], addr)?
        .http1_only()
        .build()?;
    let h2 = client(&ca.pem(), &[NAME], addr)?;
    for (client, version) in [
        (h1, reqwest::Version::HTTP_11),
        (h2, reqwest::Version::HTTP_2),
    ] {
        let resp = client
            .get(url(NAME, port, &format!("/download?bytes={SIZE}")))
            .send()
            .await?;
        assert_eq!(resp.version(), version);
        let mut body = resp.bytes_stream();
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            assert!(
                chunk
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == pattern(n + i as u64)),
                "{version:?}: byte mismatch in the chunk at {n}"
            );
            n += chunk.len() as u64;
        }
        assert_eq!(n, SIZE, "{version:?} download length");

        const CHUNK: u64 = 1 << 20;
        let chunks = futures::stream::iter(
            (0..SIZE / CHUNK)
                .map(|i| Ok::<_, std::io::Error>(pattern_chunk(i * CHUNK, CHUNK as usize))),
        );
        let resp = client
            .put(url(NAME, port, "/upload"))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await?;
        assert_eq!(resp.version(), version);
        let echo = parse_echo(&resp.text().await?);
        assert_eq!(echo["bytes"], SIZE.to_string(), "{version:?} upload length");
        assert_eq!(echo["ok"], "true", "{version:?} upload bytes");
    }
    assert_eq!(proxy.stats().upstream_errors_total, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_flow_before_they_are_complete() -> anyhow::Result<()> {
    let (ca, _proxy, state, addr) = setup().await?;
    let client = client(&ca.pem(), &[NAME], addr)?;

    // Response: "first" arrives while the upstream still holds "second".
    let resp = client.get(url(NAME, addr.port(), "/stream")).send().await?;
    let mut body = resp.bytes_stream();
    let first = tokio::time::timeout(WAIT, body.next())
        .await?
        .expect("a first part")?;
    assert_eq!(&first[..], b"first\n");
    state.release.notify_one();
    let second = tokio::time::timeout(WAIT, body.next())
        .await?
        .expect("a second part")?;
    assert_eq!(&second[..], b"second\n");

    // Request: the upstream sees the first chunk while the rest is unsent.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<bytes::Bytes, std::io::Error>>();
    tx.unbounded_send(Ok(pattern_chunk(0, 1000)))?;
    let send = tokio::spawn(
        client
            .post(url(NAME, addr.port(), "/upload-slow"))
            .body(reqwest::Body::wrap_stream(rx))
            .send(),
    );
    tokio::time::timeout(WAIT, state.first_chunk.notified()).await?;
    tx.unbounded_send(Ok(pattern_chunk(1000, 500)))?;
    drop(tx);
    let resp = tokio::time::timeout(WAIT, send).await???;
    let echo = parse_echo(&resp.text().await?);
    assert_eq!(echo["bytes"], "1500");
    assert_eq!(echo["ok"], "true");
    Ok(())
}
