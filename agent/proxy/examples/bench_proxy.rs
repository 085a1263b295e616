//! A stand-alone gantry-proxy for `scripts/bench-proxy`: terminates TLS
//! with the given certificate and routes by name and/or port, until
//! killed.
//!
//! ```text
//! bench_proxy --cert CHAIN.pem --key KEY.pem [--listen ADDR] [--workers N]
//!             [--name NAME=UPSTREAM]... [--port PORT=UPSTREAM]... [--port-bind IP]
//! ```

use anyhow::{bail, Context};
use gantry_proxy::{Proxy, ProxyConfig, Routes};

fn main() -> anyhow::Result<()> {
    let mut cfg = ProxyConfig::default();
    let mut routes = Routes::default();
    let (mut cert, mut key) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--cert" => cert = Some(std::fs::read_to_string(&value).context("--cert")?),
            "--key" => key = Some(std::fs::read_to_string(&value).context("--key")?),
            "--listen" => cfg.https_listen = Some(value.parse().context("--listen")?),
            "--workers" => cfg.workers = value.parse().context("--workers")?,
            "--port-bind" => cfg.port_bind = value.parse().context("--port-bind")?,
            "--name" => {
                let (name, up) = value.split_once('=').context("--name NAME=UPSTREAM")?;
                routes
                    .by_name
                    .insert(name.to_ascii_lowercase(), up.parse().context("--name")?);
            }
            "--port" => {
                let (port, up) = value.split_once('=').context("--port PORT=UPSTREAM")?;
                routes
                    .by_port
                    .insert(port.parse()?, up.parse().context("--port")?);
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    let proxy = Proxy::start(cfg)?;
    proxy.set_certificate(
        &cert.context("--cert is required")?,
        &key.context("--key is required")?,
    )?;
    let failed = proxy.set_routes(routes);
    if let Some((port, e)) = failed.first() {
        bail!("port {port}: {e}");
    }
    println!("ready https_port={:?}", proxy.https_port());
    loop {
        std::thread::park();
    }
}
