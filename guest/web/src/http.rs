//! The JupyterLab stand-in: plain HTTP/1.1 with keep-alive on port 8888.
//!
//! Token auth like Jupyter's: `?token=T`, `Authorization: token T` (or
//! `Bearer T`), or the `gantry-token` cookie that a good `?token=` sets.
//! Without a valid token every request gets 403. Routes (GET/HEAD):
//! - `/`, `/lab`: 200 `text/html` with `JupyterLab stand-in on <hostname>`;
//! - `/api/headers`: 200 `text/plain`, the `host`, `x-forwarded-*` headers as
//!   received and the TCP `peer` (for testing a reverse proxy in front);
//! - `/api/echo` with `Upgrade: websocket`: a WebSocket echo ([`crate::ws`]).
//!
//! A request line plus headers over [`MAX_HEAD`] bytes gets 431 and the
//! connection is closed; so are malformed requests (400).

use crate::{peer_string, ws};
use std::io::{self, Cursor, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Largest request line + headers accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// The cookie a good `?token=` sets.
pub const COOKIE: &str = "gantry-token";
/// Idle keep-alive connections are closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Request bodies (read and ignored) may be this large.
const MAX_BODY: u64 = 1 << 20;

/// What every connection shares.
#[derive(Debug)]
pub struct Site {
    /// The token clients must present; empty = nobody gets in.
    pub token: String,
    pub hostname: String,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query (absolute-form targets reduced to it).
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    pub http11: bool,
    /// Names lower-cased, in order of arrival.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// Parses a request line and headers (without the blank line).
    pub fn parse(head: &[u8]) -> Option<Request> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let mut parts = lines.next()?.split(' ');
        let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || method.is_empty() || target.is_empty() {
            return None;
        }
        let http11 = match version {
            "HTTP/1.1" => true,
            "HTTP/1.0" => false,
            _ => return None,
        };
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line.split_once(':')?;
            if name.is_empty() || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
                return None;
            }
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        // Absolute form (`http://host/path?q`) as a proxy may send it.
        let target = match target.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
            None => target,
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Some(Request {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            http11,
            headers,
        })
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header joined with `, ` (empty when absent).
    pub fn header_joined(&self, name: &str) -> String {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        values.join(", ")
    }

    /// Whether a comma-separated header lists `token` (case-insensitive).
    pub fn header_has(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// A query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| percent_decode(v))
    }

    /// Whether the connection stays open after the response.
    pub fn keep_alive(&self) -> bool {
        if self.http11 {
            !self.header_has("connection", "close")
        } else {
            self.header_has("connection", "keep-alive")
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a request proved it knows the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Query,
    Header,
    Cookie,
}

/// Checks the query, the `Authorization` header and the cookie, in that
/// order; an empty site token never matches.
pub fn authenticate(req: &Request, token: &str) -> Option<Credential> {
    if token.is_empty() {
        return None;
    }
    if req.query_param("token").is_some_and(|t| ct_eq(&t, token)) {
        return Some(Credential::Query);
    }
    let header_ok = req
        .headers
        .iter()
        .filter(|(n, _)| n == "authorization")
        .filter_map(|(_, v)| v.split_once(' '))
        .any(|(scheme, t)| {
            (scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer"))
                && ct_eq(t.trim(), token)
        });
    if header_ok {
        return Some(Credential::Header);
    }
    let cookie_ok = req
        .headers
        .iter()
        .filter(|(n, _)| n == "cookie")
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .any(|(k, v)| k == COOKIE && ct_eq(v, token));
    cookie_ok.then_some(Credential::Cookie)
}

/// Constant-time comparison (for equal lengths).
fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A response to write; `close` ends the connection after it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    pub close: bool,
}

impl Response {
    fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: vec![("Content-Type", content_type.to_string())],
            body: body.into(),
            close: false,
        }
    }

    fn text(status: u16, body: &str) -> Self {
        Self::new(status, "text/plain; charset=utf-8", format!("{body}\n"))
    }

    fn closing(mut self) -> Self {
        self.close = true;
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

fn write_response(w: &mut impl Write, r: &Response, head_only: bool) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
    for (k, v) in &r.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n", r.body.len()));
    out.push_str(if r.close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&r.body);
    }
    w.write_all(&bytes)?;
    w.flush()
}

/// The answer to an authenticated or unauthenticated plain request.
pub fn route(req: &Request, site: &Site, peer: SocketAddr) -> Response {
    let Some(cred) = authenticate(req, &site.token) else {
        return Response::text(
            403,
            "403 Forbidden: a valid token is required (?token=, Authorization: token, or the gantry-token cookie)",
        );
    };
    let mut resp = match (req.method.as_str(), req.path.as_str()) {
        ("GET" | "HEAD", "/" | "/lab" | "/lab/") => Response::new(
            200,
            "text/html; charset=utf-8",
            format!(
                "<!doctype html>\n<html><head><title>JupyterLab</title></head>\n<body><h1>JupyterLab stand-in on {}</h1></body></html>\n",
                html_escape(&site.hostname)
            ),
        ),
        ("GET" | "HEAD", "/api/headers") => {
            let body: String = ["host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"]
                .iter()
                .map(|h| format!("{h}: {}\n", req.header_joined(h)))
                .chain(std::iter::once(format!("peer: {}\n", peer_string(peer))))
                .collect();
            Response::new(200, "text/plain; charset=utf-8", body)
        }
        ("GET" | "HEAD", "/api/echo") => {
            Response::text(400, "400 Bad Request: /api/echo is a WebSocket endpoint")
        }
        ("GET" | "HEAD", _) => Response::text(404, "404 Not Found"),
        _ => {
            let mut r = Response::text(405, "405 Method Not Allowed");
            r.headers.push(("Allow", "GET, HEAD".into()));
            r
        }
    };
    if cred == Credential::Query {
        resp.headers.push((
            "Set-Cookie",
            format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Lax", site.token),
        ));
    }
    resp
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A request head read off a connection.
#[derive(Debug)]
enum Head {
    Request(Request),
    TooLarge,
    Bad,
    Closed,
}

/// End of the head in `buf`: (head length, length including the blank line).
fn head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Reads until a whole head is in `buf` and takes it out (leftover bytes
/// stay in `buf`).
fn read_head(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Head> {
    loop {
        // Empty lines before a request line are allowed (RFC 9112 §2.2).
        let skip = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        buf.drain(..skip);
        if let Some((len, total)) = head_end(buf) {
            if total > MAX_HEAD {
                return Ok(Head::TooLarge);
            }
            let head: Vec<u8> = buf.drain(..total).take(len).collect();
            return Ok(Request::parse(&head).map_or(Head::Bad, Head::Request));
        }
        if buf.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
        let mut chunk = [0u8; 4096];
        match r.read(&mut chunk) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Accepts connections forever, one thread each.
pub fn accept_loop(listener: TcpListener, site: Arc<Site>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let site = site.clone();
                std::thread::spawn(move || {
                    let _ = serve_conn(stream, &site);
                });
            }
            Err(e) => {
                eprintln!("gantry-guest-web: http accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_conn(mut stream: TcpStream, site: &Site) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut buf = Vec::new();
    loop {
        let req = match read_head(&mut stream, &mut buf)? {
            Head::Request(r) => r,
            Head::Closed => return Ok(()),
            Head::TooLarge => {
                let r = Response::text(431, "431 Request Header Fields Too Large").closing();
                return finish(stream, &r);
            }
            Head::Bad => return finish(stream, &Response::text(400, "400 Bad Request").closing()),
        };
        if let Some(r) = skip_body(&req, &mut stream, &mut buf)? {
            return finish(stream, &r);
        }
        if req.path == "/api/echo" && req.header_has("upgrade", "websocket") {
            return websocket(stream, &req, site, buf);
        }
        let mut resp = route(&req, site, peer);
        resp.close |= !req.keep_alive();
        write_response(&mut stream, &resp, req.method == "HEAD")?;
        if resp.close {
            return linger_close(stream);
        }
    }
}

/// Reads and drops a request body; an error response when it cannot.
fn skip_body(req: &Request, r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<Response>> {
    if req.header("transfer-encoding").is_some() {
        let resp = Response::text(
            400,
            "400 Bad Request: chunked request bodies are not supported",
        );
        return Ok(Some(resp.closing()));
    }
    let Some(len) = req.header("content-length") else {
        return Ok(None);
    };
    let Ok(len) = len.parse::<u64>() else {
        return Ok(Some(
            Response::text(400, "400 Bad Request: bad Content-Length").closing(),
        ));
    };
    if len > MAX_BODY {
        return Ok(Some(Response::text(413, "413 Payload Too Large").closing()));
    }
    let from_buf = (len as usize).min(buf.len());
    buf.drain(..from_buf);
    let rest = len - from_buf as u64;
    let copied = io::copy(&mut r.take(rest), &mut io::sink())?;
    if copied < rest {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(None)
}

fn finish(mut stream: TcpStream, resp: &Response) -> io::Result<()> {
    write_response(&mut stream, resp, false)?;
    linger_close(stream)
}

/// Closes after the client had a chance to read the response: closing with
/// unread input would reset the connection and could lose the response.
fn linger_close(stream: TcpStream) -> io::Result<()> {
    stream.shutdown(Shutdown::Write)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let _ = io::copy(&mut (&stream).take(1 << 20), &mut io::sink());
    Ok(())
}

/// The handshake on `/api/echo`, then the echo loop.
fn websocket(
    mut stream: TcpStream,
    req: &Request,
    site: &Site,
    leftover: Vec<u8>,
) -> io::Result<()> {
    if authenticate(req, &site.token).is_none() {
        let resp = route(req, site, stream.peer_addr()?).closing();
        return finish(stream, &resp);
    }
    let key = req.header("sec-websocket-key").unwrap_or("");
    let bad = if req.method != "GET" || !req.http11 || !req.header_has("connection", "upgrade") {
        Some(Response::text(
            400,
            "400 Bad Request: not a WebSocket upgrade",
        ))
    } else if !crate::sha1::is_base64_of_16_bytes(key) {
        Some(Response::text(
            400,
            "400 Bad Request: bad Sec-WebSocket-Key",
        ))
    } else if req.header("sec-websocket-version") != Some("13") {
        let mut r = Response::text(426, "426 Upgrade Required: WebSocket version 13 only");
        r.headers.push(("Sec-WebSocket-Version", "13".into()));
        Some(r)
    } else {
        None
    };
    if let Some(r) = bad {
        return finish(stream, &r.closing());
    }
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        ws::accept_key(key)
    );
    stream.write_all(head.as_bytes())?;
    stream.set_read_timeout(None)?;
    let mut reader = Cursor::new(leftover).chain(&stream);
    let mut writer = &stream;
    ws::echo(&mut reader, &mut writer)?;
    linger_close(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(head: &str) -> Request {
        Request::parse(head.as_bytes()).expect("parses")
    }

    #[test]
    fn requests_parse() {
        let r = req("GET /lab?token=ab%63d&x HTTP/1.1\r\nHost: h:1\r\nX-Forwarded-For: a\r\nx-forwarded-for: b");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/lab"));
        assert_eq!(r.query_param("token").as_deref(), Some("abcd"));
        assert_eq!(r.query_param("x").as_deref(), Some(""));
        assert_eq!(r.header("host"), Some("h:1"));
        assert_eq!(r.header_joined("x-forwarded-for"), "a, b");
        assert!(r.keep_alive());
        let r = req("GET http://example.test:8888/api/headers?q HTTP/1.0\nConnection: Keep-Alive");
        assert_eq!((r.path.as_str(), r.query.as_str()), ("/api/headers", "q"));
        assert!(r.keep_alive());
        assert!(!req("GET / HTTP/1.1\r\nConnection: close").keep_alive());
        assert!(!req("GET / HTTP/1.0").keep_alive());
        for bad in [
            "GET /",
            "GET / HTTP/2",
            "GET  / HTTP/1.1",
            "GET / HTTP/1.1\r\nno colon",
            "GET / HTTP/1.1\r\n folded: x",
        ] {
            assert!(Request::parse(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn tokens_are_checked_like_jupyter() {
        let t = "00ff";
        let auth = |head: &str| authenticate(&req(head), t);
        assert_eq!(
            auth("GET /lab?token=00ff HTTP/1.1"),
            Some(Credential::Query)
        );
        assert_eq!(
            auth("GET /lab?a=1&token=00ff HTTP/1.1"),
            Some(Credential::Query)
        );
        assert_eq!(
            auth("GET / HTTP/1.1\r\nAuthorization: token 00ff"),
            Some(Credential::Header)
        );
        assert_eq!(
            auth("GET / HTTP/1.1\r\nAuthorization: Bearer 00ff"),
            Some(Credential::Header)
        );
        assert_eq!(
            auth("GET / HTTP/1.1\r\nCookie: a=b; gantry-token=00ff"),
            Some(Credential::Cookie)
        );
        for bad in [
            "GET /lab HTTP/1.1",
            "GET /lab?token=00fe HTTP/1.1",
            "GET /lab?token=00ff0 HTTP/1.1",
            "GET /lab?token= HTTP/1.1",
            "GET / HTTP/1.1\r\nAuthorization: Basic 00ff",
            "GET / HTTP/1.1\r\nCookie: other-token=00ff",
            "GET / HTTP/1.1\r\nCookie: gantry-token=00FF",
        ] {
            assert_eq!(auth(bad), None, "{bad:?}");
        }
        // An empty site token lets nobody in.
        assert_eq!(authenticate(&req("GET /?token= HTTP/1.1"), ""), None);
    }

    #[test]
    fn heads_are_limited() {
        let mut buf = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /lab".to_vec();
        let head = read_head(&mut io::empty(), &mut buf).unwrap();
        assert!(matches!(head, Head::Request(r) if r.path == "/"));
        assert_eq!(buf, b"GET /lab");
        let mut big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD)).into_bytes();
        assert!(matches!(
            read_head(&mut io::empty(), &mut big).unwrap(),
            Head::TooLarge
        ));
        let mut endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD)).into_bytes();
        assert!(matches!(
            read_head(&mut io::empty(), &mut endless).unwrap(),
            Head::TooLarge
        ));
        let mut garbage = b"\x01\x02\r\n\r\n".to_vec();
        assert!(matches!(
            read_head(&mut io::empty(), &mut garbage).unwrap(),
            Head::Bad
        ));
    }

    #[test]
    fn routes_answer() {
        let site = Site {
            token: "t1".into(),
            hostname: "web-1".into(),
        };
        let peer: SocketAddr = "10.200.0.1:4242".parse().unwrap();
        let r = route(&req("GET /lab?token=t1 HTTP/1.1"), &site, peer);
        assert_eq!(r.status, 200);
        assert!(String::from_utf8_lossy(&r.body).contains("JupyterLab stand-in on web-1"));
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| *k == "Set-Cookie" && v.starts_with("gantry-token=t1;")));
        assert_eq!(route(&req("GET /lab HTTP/1.1"), &site, peer).status, 403);
        let r = route(&req("GET /api/headers HTTP/1.1\r\nAuthorization: token t1\r\nHost: a.test\r\nX-Forwarded-Proto: https"), &site, peer);
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            "host: a.test\nx-forwarded-for: \nx-forwarded-proto: https\nx-forwarded-host: \npeer: 10.200.0.1:4242\n"
        );
        assert!(!r.headers.iter().any(|(k, _)| *k == "Set-Cookie"));
        assert_eq!(
            route(&req("GET /nope?token=t1 HTTP/1.1"), &site, peer).status,
            404
        );
        assert_eq!(
            route(&req("POST /lab?token=t1 HTTP/1.1"), &site, peer).status,
            405
        );
    }
}
