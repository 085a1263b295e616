//! Header rules, pure and unit-tested: the routing name of a request
//! (Host or `:authority`, lower-cased, port stripped), hop-by-hop headers
//! stripped (kept for WebSocket upgrades), and `X-Forwarded-For/Proto/Host`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use std::borrow::Cow;
use std::net::IpAddr;

/// `X-Forwarded-For`, `-Proto` and `-Host`.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Hop-by-hop headers (RFC 9110 7.6.1), besides those `Connection` lists
/// and every `Proxy-*`.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The authority the client asked for, as sent: the URI's (HTTP/2
/// `:authority`, or an absolute-form HTTP/1.1 target), else `Host`.
pub(crate) fn authority(parts: &Parts) -> Option<HeaderValue> {
    if let Some(a) = parts.uri.authority() {
        return HeaderValue::from_str(a.as_str()).ok();
    }
    parts.headers.get(header::HOST).cloned()
}

/// The routing name of an authority: port stripped, lower-cased, without a
/// trailing dot; `[v6]` keeps its brackets off. Borrows when it can.
pub(crate) fn route_name(authority: &str) -> Cow<'_, str> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Whether `headers` ask for a WebSocket upgrade (`Upgrade: websocket`
/// with `Connection: upgrade`).
pub(crate) fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, &header::UPGRADE, "websocket")
        && has_token(headers, &header::CONNECTION, "upgrade")
}

/// Whether any comma-separated value of `name` equals `token` (ASCII case
/// insensitive).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers: those `Connection` lists, `Keep-Alive`,
/// every `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding` and `Upgrade`.
/// With `upgrade`, `Upgrade` stays and `Connection` becomes `upgrade`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
    }
    for name in &HOP_BY_HOP {
        if !(upgrade && *name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    headers.remove(&KEEP_ALIVE);
    if headers.keys().any(|k| k.as_str().starts_with("proxy-")) {
        let proxy: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy {
            headers.remove(&name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Adds `X-Forwarded-For` (the client's address appended to what came
/// in), `X-Forwarded-Proto: https` and `X-Forwarded-Host` (the authority
/// as sent), and `Host` from the authority when the request had none
/// (HTTP/2).
pub(crate) fn add_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    authority: Option<HeaderValue>,
) {
    if headers.contains_key(&X_FORWARDED_FOR) {
        let mut xff = Vec::new();
        for v in headers.get_all(&X_FORWARDED_FOR) {
            xff.extend_from_slice(v.as_bytes());
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(client.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&xff) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
    } else {
        headers.insert(X_FORWARDED_FOR.clone(), client.clone());
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    match authority {
        Some(v) => {
            if !headers.contains_key(header::HOST) {
                headers.insert(header::HOST, v.clone());
            }
            headers.insert(X_FORWARDED_HOST.clone(), v);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// A client address as an `X-Forwarded-For` entry (IPv4-mapped IPv6
/// addresses written as IPv4).
pub(crate) fn client_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Joins the `Cookie` fields an HTTP/2 client may split (RFC 9113 8.2.3)
/// into the one field HTTP/1.1 servers expect.
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn route_names_are_lower_case_without_port() {
        assert_eq!(
            route_name("8888-Ins-1.GPU1.example.com:443"),
            "8888-ins-1.gpu1.example.com"
        );
        assert_eq!(route_name("a.example.com"), "a.example.com");
        assert_eq!(route_name("a.example.com."), "a.example.com");
        assert_eq!(route_name("[::1]:8443"), "::1");
        assert_eq!(route_name("[::1]"), "::1");
        assert_eq!(route_name("127.0.0.1:1"), "127.0.0.1");
        assert!(matches!(route_name("lower:1"), Cow::Borrowed(_)));
    }

    #[test]
    fn authority_prefers_the_uri_then_host() {
        let (p, ()) = http::Request::get("https://H2.example:8443/x")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(authority(&p).unwrap(), "H2.example:8443");
        let (p, ()) = http::Request::get("/x")
            .header("host", "one.example")
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(authority(&p).unwrap(), "one.example");
        let (p, ()) = http::Request::get("/x").body(()).unwrap().into_parts();
        assert!(authority(&p).is_none());
    }

    #[test]
    fn websocket_upgrades_are_recognised() {
        assert!(is_websocket_upgrade(&map(&[
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade")
        ])));
        assert!(!is_websocket_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!is_websocket_upgrade(&map(&[
            ("upgrade", "h2c"),
            ("connection", "upgrade")
        ])));
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("authorization", "Bearer t"),
            ("cookie", "a=b"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "cookie"]);
    }

    #[test]
    fn upgrades_keep_upgrade_and_connection() {
        let mut h = map(&[
            ("connection", "Upgrade, x-hop"),
            ("x-hop", "1"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
            ("keep-alive", "1"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "k");
        assert!(!h.contains_key("x-hop") && !h.contains_key("keep-alive"));
    }

    #[test]
    fn forwarded_headers_are_added_and_host_kept() {
        let mut h = map(&[
            ("host", "Name.example:8443"),
            ("x-forwarded-for", "10.0.0.1"),
        ]);
        add_forwarded(
            &mut h,
            &client_value("192.0.2.7".parse().unwrap()),
            Some(HeaderValue::from_static("Name.example:8443")),
        );
        assert_eq!(h["host"], "Name.example:8443");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "Name.example:8443");

        let mut h = map(&[("x-forwarded-host", "spoofed")]);
        add_forwarded(
            &mut h,
            &client_value("::1".parse().unwrap()),
            Some(HeaderValue::from_static("h2.example")),
        );
        assert_eq!(h["host"], "h2.example", "HTTP/2: Host from :authority");
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-host"], "h2.example");

        let mut h = map(&[("x-forwarded-host", "spoofed")]);
        add_forwarded(
            &mut h,
            &client_value("::ffff:10.1.2.3".parse().unwrap()),
            None,
        );
        assert_eq!(
            h["x-forwarded-for"], "10.1.2.3",
            "mapped IPv4 is written as IPv4"
        );
        assert!(!h.contains_key("x-forwarded-host"));
    }

    #[test]
    fn split_cookies_are_joined() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
        let mut h = map(&[("cookie", "a=1")]);
        join_cookies(&mut h);
        assert_eq!(h["cookie"], "a=1");
    }
}
