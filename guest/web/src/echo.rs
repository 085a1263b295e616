//! The plain echo services, for testing port forwards and that the guest sees
//! the client's real address:
//! - TCP (7000): on connect writes `peer <ip>:<port>\n`, then echoes every byte.
//! - UDP (7001): answers each datagram with `peer <ip>:<port> <payload>`.

use crate::peer_string;
use std::io::{self, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};

/// Accepts TCP echo connections forever, one thread each.
pub fn tcp_accept_loop(listener: TcpListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || {
                    let _ = tcp_echo(stream);
                });
            }
            Err(e) => {
                eprintln!("gantry-guest-web: tcp echo accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

fn tcp_echo(stream: TcpStream) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    (&stream).write_all(format!("peer {}\n", peer_string(peer)).as_bytes())?;
    io::copy(&mut &stream, &mut &stream)?;
    stream.shutdown(Shutdown::Write)
}

/// Answers UDP datagrams forever.
pub fn udp_loop(socket: UdpSocket) {
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let mut reply = format!("peer {} ", peer_string(peer)).into_bytes();
                reply.extend_from_slice(&buf[..n]);
                // A reply too large for one datagram is dropped, like any lost datagram.
                let _ = socket.send_to(&reply, peer);
            }
            Err(e) => {
                eprintln!("gantry-guest-web: udp echo: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
