//! WebSockets through the proxy: echo with the Host header kept, still
//! working after idleness, closed when the route's port is removed, and a
//! dead upstream answered 502.

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use gantry_proxy::Routes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const NAME: &str = "8888-ins-w";
const WAIT: Duration = Duration::from_secs(10);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn ws_connect(ca: &Ca, addr: SocketAddr, port: u16) -> Result<Ws, WsError> {
    let cfg = tls_client(&ca.pem(), &[b"http/1.1"]).expect("tls config");
    let tls = tls_connect(cfg, addr, NAME).await.expect("tls");
    let url = format!("wss://{NAME}.{DOMAIN}:{port}/api/kernels/k1/channels?token=secret");
    Ok(tokio_tungstenite::client_async(url, tls).await?.0)
}

async fn echo(ws: &mut Ws, msg: Message) -> anyhow::Result<()> {
    ws.send(msg.clone()).await?;
    let back = tokio::time::timeout(WAIT, ws.next())
        .await?
        .expect("an answer")?;
    assert_eq!(back, msg);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_survives_idleness_and_keeps_host() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let (up, seen_host) = ws_upstream().await?;
    let proxy = proxy(&ca)?;
    proxy.set_routes(name_routes(&[NAME], up));
    let port = proxy.https_port().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    let mut ws = ws_connect(&ca, addr, port).await?;
    assert_eq!(
        seen_host.lock().unwrap().as_deref(),
        Some(format!("{NAME}.{DOMAIN}:{port}").as_str())
    );
    echo(&mut ws, Message::text("hello kernel")).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    echo(&mut ws, Message::text("still there")).await?;
    echo(&mut ws, Message::binary(vec![0u8, 1, 2, 255])).await?;
    let stats = proxy.stats();
    assert_eq!(stats.websocket_upgrades_total, 1);
    assert_eq!(stats.active_connections, 1);

    ws.close(None).await?;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);
    let deadline = tokio::time::Instant::now() + WAIT;
    while proxy.stats().active_connections != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed websocket is no longer counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_port_closes_its_websockets() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let (up, _) = ws_upstream().await?;
    let proxy = proxy(&ca)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let failed = proxy.set_routes(Routes {
        by_port: HashMap::from([(port, up)]),
        ..Routes::default()
    });
    assert!(failed.is_empty(), "{failed:?}");
    let mut ws = ws_connect(&ca, SocketAddr::from(([127, 0, 0, 1], port)), port).await?;
    echo(&mut ws, Message::text("before")).await?;
    assert!(proxy.set_routes(Routes::default()).is_empty());
    let next = tokio::time::timeout(WAIT, ws.next()).await?;
    assert!(
        !matches!(next, Some(Ok(Message::Text(_)))),
        "closed: {next:?}"
    );
    assert!(
        ws.send(Message::text("after")).await.is_err()
            || ws.next().await.is_none_or(|m| m.is_err())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_dead_upstream_is_502() -> anyhow::Result<()> {
    let ca = Ca::new("test ca")?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let proxy = proxy(&ca)?;
    proxy.set_routes(name_routes(&[NAME], dead));
    let port = proxy.https_port().unwrap();
    let err = ws_connect(&ca, SocketAddr::from(([127, 0, 0, 1], port)), port)
        .await
        .unwrap_err();
    match err {
        WsError::Http(resp) => assert_eq!(resp.status(), 502),
        other => panic!("expected a 502 answer, got {other}"),
    }
    assert_eq!(proxy.stats().upstream_errors_total, 1);
    assert_eq!(proxy.stats().websocket_upgrades_total, 0);
    Ok(())
}
