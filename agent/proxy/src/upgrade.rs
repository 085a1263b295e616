//! WebSocket upgrades: the request goes upstream on a connection of its
//! own with `Upgrade`/`Connection` kept; when the upstream answers 101,
//! both sides are upgraded and spliced with `copy_bidirectional`, with no
//! idle timeout (notebook kernels stay quiet for hours). The splice ends
//! when either side closes or the connection's listener is closed.

use crate::forward::{bad_gateway, ProxyBody};
use crate::headers;
use crate::pool::{dial, PooledBody, UpstreamError};
use crate::server::Conn;
use crate::stats::inc;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;

/// Forwards an upgrade request and, on 101, splices the two connections.
pub(crate) async fn forward(
    conn: Arc<Conn>,
    mut req: Request<Incoming>,
    target: SocketAddr,
    authority: Option<HeaderValue>,
) -> Response<ProxyBody> {
    let client_side = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, true);
    headers::add_forwarded(&mut parts.headers, &conn.client, authority);
    // Origin form on a connection of our own.
    let path = parts.uri.path().to_owned();
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    let mut resp = match send(&conn, target, Request::from_parts(parts, body)).await {
        Ok(resp) => resp,
        Err(e) => {
            inc(&conn.shared.stats.upstream_errors);
            tracing::debug!(%target, %path, error = %e, "upstream failed the upgrade");
            return bad_gateway(target.port(), e.is_connect());
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        return Response::from_parts(parts, Either::Left(PooledBody::unpooled(body)));
    }
    let upstream_side = hyper::upgrade::on(&mut resp);
    inc(&conn.shared.stats.websocket_upgrades);
    let splice_conn = Arc::clone(&conn);
    conn.tracker.spawn(async move {
        tokio::select! {
            () = splice_conn.token.cancelled() => {}
            r = splice(client_side, upstream_side) => match r {
                Ok((up, down)) => tracing::debug!(%target, up, down, "websocket closed"),
                Err(e) => tracing::debug!(%target, error = %e, "websocket ended"),
            }
        }
        drop(splice_conn);
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, Either::Right(Full::default()))
}

/// Connects to `target`, sends `req` with upgrades enabled, and returns
/// the answer's head.
async fn send(
    conn: &Conn,
    target: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, UpstreamError> {
    let stream = dial(target).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let token = conn.token.clone();
    conn.tracker.spawn(async move {
        tokio::select! {
            () = token.cancelled() => {}
            r = connection.with_upgrades() => if let Err(e) = r {
                tracing::debug!(%target, error = %e, "upstream upgrade connection failed");
            }
        }
    });
    Ok(sender.send_request(req).await?)
}

/// Copies both ways between the two upgraded connections until one ends.
async fn splice(client: OnUpgrade, upstream: OnUpgrade) -> std::io::Result<(u64, u64)> {
    let (client, upstream) = tokio::try_join!(client, upstream).map_err(std::io::Error::other)?;
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await
}
