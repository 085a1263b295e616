//! One proxied request: find the upstream (by port, or by host name),
//! rewrite headers (Host kept, `X-Forwarded-*` added, hop-by-hop
//! stripped), send it over the pooled HTTP/1.1 client and stream both
//! bodies; WebSocket upgrades go to [`crate::upgrade`]. Errors become
//! short text answers: 404 for an unknown name, 502 for a silent upstream.

use crate::headers;
use crate::pool::PooledBody;
use crate::server::{Conn, Via};
use crate::stats::inc;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

/// What the proxy answers with: the upstream's streamed body, or its own
/// short text.
pub(crate) type ProxyBody = Either<PooledBody, Full<Bytes>>;

/// Serves one request from a client connection.
pub(crate) async fn handle(
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    inc(&conn.shared.stats.requests);
    let (mut parts, body) = req.into_parts();
    let authority = headers::authority(&parts);
    let Some(target) = route(&conn, authority.as_ref()) else {
        tracing::debug!(peer = %conn.peer, via = ?conn.via, path = parts.uri.path(), "no route");
        return Ok(not_found(conn.via));
    };
    if parts.version == Version::HTTP_11 && headers::is_websocket_upgrade(&parts.headers) {
        let req = Request::from_parts(parts, body);
        return Ok(crate::upgrade::forward(conn, req, target, authority).await);
    }
    if parts.version == Version::HTTP_2 {
        headers::join_cookies(&mut parts.headers);
    }
    headers::strip_hop_by_hop(&mut parts.headers, false);
    headers::add_forwarded(&mut parts.headers, &conn.client, authority);
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    let uri = parts.uri.clone();
    let upstream = &conn.shared.pools[conn.worker];
    match upstream
        .send(target, Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, false);
            Ok(Response::from_parts(parts, Either::Left(body)))
        }
        Err(e) => {
            inc(&conn.shared.stats.upstream_errors);
            // The path only: a query string may carry a token.
            tracing::debug!(%target, path = uri.path(), error = %e, "upstream failed");
            Ok(bad_gateway(target.port(), e.is_connect()))
        }
    }
}

/// The upstream for a request, from the routing table as it is now.
fn route(conn: &Conn, authority: Option<&HeaderValue>) -> Option<SocketAddr> {
    match conn.via {
        Via::Port(port) => conn.with_routes(|r| r.by_port.get(&port).copied()),
        Via::Name => {
            let name = headers::route_name(authority?.to_str().ok()?);
            conn.with_routes(|r| r.by_name.get(name.as_ref()).copied())
        }
    }
}

/// The request target in origin form (`/path?query`), as sent upstream.
fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    uri.path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()))
}

/// A short plain-text answer.
pub(crate) fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn not_found(via: Via) -> Response<ProxyBody> {
    let body = match via {
        Via::Name => "No instance answers to this host name.\n".to_owned(),
        Via::Port(port) => format!("No instance is routed to port {port}.\n"),
    };
    text(StatusCode::NOT_FOUND, body)
}

/// 502: the upstream did not accept the connection, or failed mid-way.
pub(crate) fn bad_gateway(port: u16, connect: bool) -> Response<ProxyBody> {
    let body = if connect {
        format!("The instance is not answering on port {port}.\n")
    } else {
        format!("The instance on port {port} closed the connection before answering.\n")
    };
    text(StatusCode::BAD_GATEWAY, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_sent_in_origin_form() {
        let cases = [
            ("/lab/tree?token=x", "/lab/tree?token=x"),
            ("https://a.example:8443/x?y=1", "/x?y=1"),
            ("https://a.example", "/"),
            ("*", "*"),
        ];
        for (from, to) in cases {
            assert_eq!(origin_form(&from.parse().unwrap()), to, "{from}");
        }
    }

    #[test]
    fn error_answers_are_one_sentence() {
        let r = bad_gateway(8888, true);
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        let r = not_found(Via::Name);
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }
}
