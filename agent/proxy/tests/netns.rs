//! The proxy inside a network namespace this test creates: its shared and
//! per-port listeners bind, and its upstream connections reach, an address
//! that exists only in that namespace; the client runs there too. Needs
//! root (`./scripts/test` runs it).

mod common;

use common::*;
use gantry_proxy::{Proxy, ProxyConfig, Routes};
use gantry_tests::netns::Netns;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

const NAME: &str = "8888-ins-n";
/// Exists only inside the test's namespace.
const NS_ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 231, 0, 1));

/// Runs the client side inside the namespace: one request by name on the
/// shared listener, one on the per-port listener; their echo bodies.
fn requests_inside(
    ns: &Netns,
    ca_pem: String,
    shared: SocketAddr,
    port: u16,
) -> anyhow::Result<(String, String)> {
    ns.enter(move || -> anyhow::Result<(String, String)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let by_name = client(&ca_pem, &[NAME], shared)?
                .get(url(NAME, shared.port(), "/in-ns"))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            let by_port = client(&ca_pem, &[], SocketAddr::new(NS_ADDR, port))?
                .get(url("", port, "/in-ns-port"))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            Ok((by_name, by_port))
        })
    })?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and network namespaces: ./scripts/test runs it"]
async fn the_proxy_runs_inside_a_network_namespace() -> anyhow::Result<()> {
    init_logs();
    let ns = Netns::new("prx")?;
    ns.run(&["ip", "addr", "add", &format!("{NS_ADDR}/32"), "dev", "lo"])?;
    assert!(
        std::net::TcpListener::bind((NS_ADDR, 0)).is_err(),
        "the address does not exist outside the namespace"
    );
    // The upstream's socket is made inside; it is served from here.
    let std_listener = ns.enter(|| std::net::TcpListener::bind((NS_ADDR, 0)))??;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let upstream_addr = listener.local_addr()?;
    spawn_upstream(listener);

    let ca = Ca::new("test ca")?;
    let proxy = Proxy::start(ProxyConfig {
        https_listen: Some(SocketAddr::new(NS_ADDR, 0)),
        netns: Some(ns.path()),
        workers: 2,
        port_bind: NS_ADDR,
    })?;
    // Picked once the shared listener has its port, so the two differ.
    let free_port = ns
        .enter(|| std::net::TcpListener::bind((NS_ADDR, 0)).map(|l| l.local_addr()))???
        .port();
    let (chain, key) = ca.leaf()?;
    proxy.set_certificate(&chain, &key)?;
    let failed = proxy.set_routes(Routes {
        by_name: HashMap::from([(format!("{NAME}.{DOMAIN}"), upstream_addr)]),
        by_port: HashMap::from([(free_port, upstream_addr)]),
    });
    assert!(
        failed.is_empty(),
        "the per-port listener binds inside: {failed:?}"
    );
    let shared = SocketAddr::new(NS_ADDR, proxy.https_port().expect("shared listener"));

    let (by_name, by_port) = requests_inside(&ns, ca.pem(), shared, free_port)?;
    let by_name = parse_echo(&by_name);
    assert_eq!(by_name["target"], "/in-ns");
    assert_eq!(
        by_name["peer"],
        NS_ADDR.to_string(),
        "the upstream connection came from inside"
    );
    assert_eq!(by_name["xff"], NS_ADDR.to_string());
    let by_port = parse_echo(&by_port);
    assert_eq!(by_port["target"], "/in-ns-port");
    assert_eq!(proxy.stats().requests_total, 2);
    proxy.shutdown();
    Ok(())
}
