//! The services in-process on 127.0.0.1 (any free ports): HTTP with token,
//! cookie and keep-alive, the header echo, 431 on oversized heads, the
//! WebSocket echo over a real socket, TCP and UDP echo.

use gantry_guest_web::ws::{self, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use gantry_guest_web::{start, Config, Running};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream, UdpSocket};
use std::time::Duration;

const TOKEN: &str = "0123abcd";

fn serve() -> (Running, tempfile_lite::Dir) {
    let dir = tempfile_lite::Dir::new();
    let token_file = dir.path.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let cfg = Config {
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        http_port: 0,
        tcp_echo_port: 0,
        udp_echo_port: 0,
        token_file,
        hostname: Some("web-1".into()),
    };
    (start(&cfg).unwrap(), dir)
}

/// A tiny temp dir (the crate has no dependencies, dev ones included).
mod tempfile_lite {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new() -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let path = std::env::temp_dir().join(format!("ggw-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Reads one response: (status, headers lower-cased, body).
fn read_response(r: &mut impl BufRead) -> (u16, Vec<(String, String)>, String) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    (status, headers, String::from_utf8(body).unwrap())
}

fn connect(addr: std::net::SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

#[test]
fn http_with_token_cookie_and_keep_alive() {
    let (run, _dir) = serve();
    let (mut s, mut r) = connect(run.http);
    // Three requests on one connection: no token, ?token= (sets the cookie), the cookie.
    s.write_all(b"GET /lab HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (status, _, body) = read_response(&mut r);
    assert_eq!(status, 403, "{body}");
    s.write_all(format!("GET /lab?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let (status, headers, body) = read_response(&mut r);
    assert_eq!(status, 200);
    assert!(body.contains("JupyterLab stand-in on web-1"), "{body}");
    let cookie = headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.split(';').next().unwrap().to_string())
        .expect("a cookie");
    assert_eq!(cookie, format!("gantry-token={TOKEN}"));
    s.write_all(
        format!("GET /api/headers HTTP/1.1\r\nHost: h.test\r\nX-Forwarded-For: 1.2.3.4\r\nCookie: {cookie}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let (status, _, body) = read_response(&mut r);
    assert_eq!(status, 200);
    let local = s.local_addr().unwrap();
    assert_eq!(
        body,
        format!("host: h.test\nx-forwarded-for: 1.2.3.4\nx-forwarded-proto: \nx-forwarded-host: \npeer: 127.0.0.1:{}\n", local.port())
    );
    // Authorization header, then an oversized head: 431 and the connection closes.
    s.write_all(format!("GET / HTTP/1.1\r\nAuthorization: token {TOKEN}\r\n\r\n").as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut r).0, 200);
    let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(17 * 1024));
    s.write_all(big.as_bytes()).unwrap();
    let (status, headers, _) = read_response(&mut r);
    assert_eq!(status, 431);
    assert!(headers.contains(&("connection".into(), "close".into())));
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn websocket_echo_over_a_socket() {
    let (run, _dir) = serve();
    let (mut s, mut r) = connect(run.http);
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let mask = Some([0x11, 0x22, 0x33, 0x44]);
    let mut req = format!(
        "GET /api/echo?token={TOKEN} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    // A frame right behind the request (same write) must not be lost.
    ws::write_frame(&mut req, OP_TEXT, b"early", mask).unwrap();
    s.write_all(&req).unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 101 "), "{line}");
    let mut accept = None;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("Sec-WebSocket-Accept: ") {
            accept = Some(v.trim().to_string());
        }
    }
    assert_eq!(accept.as_deref(), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    let f = ws::read_frame(&mut r, 1 << 20).unwrap();
    assert_eq!(
        (f.opcode, f.payload.as_slice(), f.masked),
        (OP_TEXT, &b"early"[..], false)
    );
    let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    ws::write_frame(&mut s, OP_BINARY, &big, mask).unwrap();
    assert_eq!(ws::read_frame(&mut r, 1 << 20).unwrap().payload, big);
    ws::write_frame(&mut s, OP_PING, b"hb", mask).unwrap();
    let f = ws::read_frame(&mut r, 1 << 20).unwrap();
    assert_eq!((f.opcode, f.payload.as_slice()), (OP_PONG, &b"hb"[..]));
    ws::write_frame(&mut s, OP_CLOSE, &1000u16.to_be_bytes(), mask).unwrap();
    let f = ws::read_frame(&mut r, 1 << 20).unwrap();
    assert_eq!(
        (f.opcode, f.payload),
        (OP_CLOSE, 1000u16.to_be_bytes().to_vec())
    );
}

#[test]
fn websocket_needs_the_token_and_a_good_key() {
    let (run, _dir) = serve();
    for (query, key, want) in [
        ("", "dGhlIHNhbXBsZSBub25jZQ==", 403),
        ("?token=0123abcd", "short", 400),
    ] {
        let (mut s, mut r) = connect(run.http);
        s.write_all(format!("GET /api/echo{query} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes()).unwrap();
        assert_eq!(read_response(&mut r).0, want, "{query} {key}");
    }
}

#[test]
fn tcp_and_udp_echo_report_the_peer() {
    let (run, _dir) = serve();
    let (mut s, mut r) = connect(run.tcp_echo);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(
        line,
        format!("peer 127.0.0.1:{}\n", s.local_addr().unwrap().port())
    );
    s.write_all(b"hello\nworld").unwrap();
    let mut buf = [0u8; 11];
    r.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello\nworld");

    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    u.send_to(b"ping 1", run.udp_echo).unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = u.recv_from(&mut buf).unwrap();
    assert_eq!(from, run.udp_echo);
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        format!("peer 127.0.0.1:{} ping 1", u.local_addr().unwrap().port())
    );
}

#[test]
fn a_missing_token_file_is_an_error() {
    let cfg = Config {
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        http_port: 0,
        tcp_echo_port: 0,
        udp_echo_port: 0,
        token_file: "/nonexistent/gantry-token".into(),
        hostname: None,
    };
    let err = start(&cfg).err().expect("fails").to_string();
    assert!(err.contains("/nonexistent/gantry-token"), "{err}");
}
