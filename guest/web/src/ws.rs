//! A minimal RFC 6455 WebSocket: the server handshake, frames in both
//! directions (the client side is for tests) and the echo loop behind
//! `/api/echo`. Fragmented messages are reassembled and echoed as one frame;
//! ping gets pong, close gets close; protocol errors close with 1002,
//! invalid UTF-8 text with 1007, messages over [`MAX_MESSAGE`] with 1009.

use crate::sha1::{base64, sha1};
use std::io::{self, Read, Write};

/// RFC 6455 §1.3: appended to the client's key before hashing.
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The largest (reassembled) message the echo accepts.
pub const MAX_MESSAGE: usize = 16 << 20;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    base64(&sha1(format!("{}{GUID}", key.trim()).as_bytes()))
}

/// One frame as read from the wire (payload already unmasked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// Any of RSV1-3 set (no extension is negotiated, so an error).
    pub rsv: bool,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

/// Reads one frame; payloads over `max` are an `InvalidData` error.
pub fn read_frame(r: &mut impl Read, max: usize) -> io::Result<Frame> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    let (fin, rsv, opcode) = (h[0] & 0x80 != 0, h[0] & 0x70 != 0, h[0] & 0x0f);
    let masked = h[1] & 0x80 != 0;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if len > max as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over {max}"),
        ));
    }
    let mut mask = [0u8; 4];
    if masked {
        r.read_exact(&mut mask)?;
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    if masked {
        apply_mask(&mut payload, mask);
    }
    Ok(Frame {
        fin,
        rsv,
        opcode,
        masked,
        payload,
    })
}

/// Writes one final frame; `mask` is for clients (servers send unmasked).
pub fn write_frame(
    w: &mut impl Write,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> io::Result<()> {
    write_frame_fin(w, true, opcode, payload, mask)
}

/// Writes one frame with an explicit FIN bit (fragmented messages in tests).
pub fn write_frame_fin(
    w: &mut impl Write,
    fin: bool,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
    let body = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[body..], m);
    }
    w.write_all(&out)?;
    w.flush()
}

fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Why the echo loop closes the connection (the close code it sends).
fn fail(w: &mut impl Write, code: u16) -> io::Result<()> {
    write_frame(w, OP_CLOSE, &code.to_be_bytes(), None)
}

/// Echoes messages until the client closes or breaks the protocol.
pub fn echo(r: &mut impl Read, w: &mut impl Write) -> io::Result<()> {
    // The message being reassembled from fragments: (opcode, payload so far).
    let mut partial: Option<(u8, Vec<u8>)> = None;
    loop {
        let f = match read_frame(r, MAX_MESSAGE) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => return fail(w, 1009),
            Err(e) => return Err(e),
        };
        // Clients must mask; control frames are final and at most 125 bytes.
        if !f.masked || f.rsv || (f.opcode >= 8 && (!f.fin || f.payload.len() > 125)) {
            return fail(w, 1002);
        }
        match f.opcode {
            OP_CLOSE => {
                return match f.payload.len() {
                    0 => write_frame(w, OP_CLOSE, &[], None),
                    1 => fail(w, 1002),
                    _ => write_frame(w, OP_CLOSE, &f.payload[..2], None),
                };
            }
            OP_PING => write_frame(w, OP_PONG, &f.payload, None)?,
            OP_PONG => {}
            OP_TEXT | OP_BINARY if partial.is_none() => {
                if f.fin {
                    if !send_message(w, f.opcode, &f.payload)? {
                        return Ok(());
                    }
                } else {
                    partial = Some((f.opcode, f.payload));
                }
            }
            OP_CONT if partial.is_some() => {
                let (op, mut data) = partial.take().expect("checked");
                if data.len() + f.payload.len() > MAX_MESSAGE {
                    return fail(w, 1009);
                }
                data.extend_from_slice(&f.payload);
                if !f.fin {
                    partial = Some((op, data));
                } else if !send_message(w, op, &data)? {
                    return Ok(());
                }
            }
            _ => return fail(w, 1002),
        }
    }
}

/// Echoes one complete message; false when it was text that is not UTF-8
/// (the connection was then closed with 1007).
fn send_message(w: &mut impl Write, opcode: u8, data: &[u8]) -> io::Result<bool> {
    if opcode == OP_TEXT && std::str::from_utf8(data).is_err() {
        fail(w, 1007)?;
        return Ok(false);
    }
    write_frame(w, opcode, data, None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_matches_rfc6455_sample() {
        // RFC 6455 §1.3 (and `sha1sum | xxd -r -p | base64`).
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_round_trip_with_every_length_form() {
        for len in [0, 5, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut wire = Vec::new();
            write_frame(&mut wire, OP_BINARY, &payload, Some([1, 2, 3, 4])).unwrap();
            let f = read_frame(&mut wire.as_slice(), MAX_MESSAGE).unwrap();
            assert!(f.fin && f.masked && !f.rsv);
            assert_eq!((f.opcode, f.payload.len()), (OP_BINARY, len));
            assert_eq!(f.payload, payload);
        }
        // RFC 6455 §5.7: a masked "Hello".
        let wire = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let f = read_frame(&mut wire.as_slice(), 100).unwrap();
        assert_eq!(f.payload, b"Hello");
        let mut out = Vec::new();
        write_frame(&mut out, OP_TEXT, b"Hello", None).unwrap();
        assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    }

    fn run_echo(client: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        echo(&mut &client[..], &mut out).unwrap_or(());
        let mut frames = Vec::new();
        let mut rd = out.as_slice();
        while let Ok(f) = read_frame(&mut rd, MAX_MESSAGE) {
            frames.push(f);
        }
        frames
    }

    #[test]
    fn echo_handles_fragments_ping_and_close() {
        let m = Some([9, 8, 7, 6]);
        let mut c = Vec::new();
        write_frame(&mut c, OP_TEXT, "héllo".as_bytes(), m).unwrap();
        write_frame_fin(&mut c, false, OP_BINARY, b"ab", m).unwrap();
        write_frame(&mut c, OP_PING, b"p", m).unwrap();
        write_frame_fin(&mut c, false, OP_CONT, b"cd", m).unwrap();
        write_frame(&mut c, OP_CONT, b"ef", m).unwrap();
        write_frame(&mut c, OP_CLOSE, &1000u16.to_be_bytes(), m).unwrap();
        let got: Vec<(u8, Vec<u8>)> = run_echo(&c)
            .into_iter()
            .map(|f| (f.opcode, f.payload))
            .collect();
        assert_eq!(
            got,
            vec![
                (OP_TEXT, "héllo".as_bytes().to_vec()),
                (OP_PONG, b"p".to_vec()),
                (OP_BINARY, b"abcdef".to_vec()),
                (OP_CLOSE, 1000u16.to_be_bytes().to_vec()),
            ]
        );
    }

    #[test]
    fn protocol_errors_close_with_a_code() {
        let close_code = |c: &[u8]| {
            let f = run_echo(c).pop().expect("a close frame");
            assert_eq!(f.opcode, OP_CLOSE);
            u16::from_be_bytes([f.payload[0], f.payload[1]])
        };
        let mut unmasked = Vec::new();
        write_frame(&mut unmasked, OP_TEXT, b"x", None).unwrap();
        assert_eq!(close_code(&unmasked), 1002);
        let mut stray_cont = Vec::new();
        write_frame(&mut stray_cont, OP_CONT, b"x", Some([1; 4])).unwrap();
        assert_eq!(close_code(&stray_cont), 1002);
        let mut bad_text = Vec::new();
        write_frame(&mut bad_text, OP_TEXT, &[0xff, 0xfe], Some([1; 4])).unwrap();
        assert_eq!(close_code(&bad_text), 1007);
        let huge = [0x82, 0xff, 0, 0, 0, 0, 0x10, 0, 0, 0];
        assert_eq!(close_code(&huge), 1009);
    }
}
