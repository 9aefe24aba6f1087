//! WebSocket frame headers on the wire (RFC 6455 §5.2), with no IO: parse a header from
//! bytes, write one, mask a payload. The relay forwards frames as they came (a client's
//! masked frame is a valid masked frame for the backend too), so it only needs headers,
//! plus the payload of the small control frames it acts on.

/// Largest header: 2 bytes + 8-byte length + 4-byte mask key.
pub const MAX_HEADER: usize = 14;
/// Control frames carry at most 125 bytes (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Bits of a header's first byte: the frame ends its message; the message is compressed.
pub const FIN: u8 = 0x80;
pub const RSV1: u8 = 0x40;
/// Bit of a header's second byte: a mask key follows the length.
pub const MASKED: u8 = 0x80;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1 (permessage-deflate's "compressed" bit, RFC 7692 §6): whether it may be set
    /// depends on what the peers agreed, so the relay decides.
    pub rsv1: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header itself takes.
    pub len: usize,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Why a header is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// RSV2 or RSV3 set: no extension the gateway lets through uses them.
    ReservedBits,
    /// An opcode RFC 6455 does not define.
    UnknownOpcode(u8),
    /// A control frame that is fragmented or longer than 125 bytes.
    BadControlFrame,
    /// A 64-bit length with the top bit set.
    BadLength,
}

/// Parses the header at the start of `buf`; `Ok(None)` if more bytes are needed.
#[inline]
pub fn parse(buf: &[u8]) -> Result<Option<Header>, WireError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x30 != 0 {
        return Err(WireError::ReservedBits);
    }
    let rsv1 = b0 & RSV1 != 0;
    let fin = b0 & FIN != 0;
    let opcode = b0 & 0x0f;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(WireError::UnknownOpcode(opcode));
    }
    let masked = b1 & MASKED != 0;
    let (payload_len, mut len) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(n);
            if n >> 63 != 0 {
                return Err(WireError::BadLength);
            }
            (n, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode & 0x8 != 0 && (!fin || payload_len > MAX_CONTROL_PAYLOAD as u64) {
        return Err(WireError::BadControlFrame);
    }
    let mask = if masked {
        if buf.len() < len + 4 {
            return Ok(None);
        }
        let key = [buf[len], buf[len + 1], buf[len + 2], buf[len + 3]];
        len += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        rsv1,
        opcode,
        mask,
        payload_len,
        len,
    }))
}

/// Writes a final frame's header into `out`, returning its length.
pub fn write_header(
    out: &mut [u8; MAX_HEADER],
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload_len: usize,
) -> usize {
    out[0] = 0x80 | opcode;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut len = match payload_len {
        n if n < 126 => {
            out[1] = mask_bit | n as u8;
            2
        }
        n if n <= 0xffff => {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            4
        }
        n => {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&(n as u64).to_be_bytes());
            10
        }
    };
    if let Some(key) = mask {
        out[len..len + 4].copy_from_slice(&key);
        len += 4;
    }
    len
}

/// XORs `payload` with the mask key; `offset` is the payload position of `payload[0]`.
#[inline]
pub fn apply_mask(payload: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= key[(offset + i) & 3];
    }
}

/// A whole control frame, ready to send: header then (masked, if a key is given) payload.
pub fn control_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let mut header = [0u8; MAX_HEADER];
    let n = write_header(&mut header, opcode, mask, payload.len());
    let mut frame = Vec::with_capacity(n + payload.len());
    frame.extend_from_slice(&header[..n]);
    let start = frame.len();
    frame.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut frame[start..], key, 0);
    }
    frame
}

/// The payload of a Close frame: code (big-endian) then the UTF-8 reason, cut at a
/// character boundary to fit 125 bytes.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_short_medium_and_long_lengths_masked_or_not() {
        for (len, mask) in [
            (5usize, None),
            (300, Some([1, 2, 3, 4])),
            (70_000, Some([9, 8, 7, 6])),
            (0, None),
        ] {
            let mut h = [0u8; MAX_HEADER];
            let n = write_header(&mut h, OP_BINARY, mask, len);
            let parsed = parse(&h[..n]).unwrap().unwrap();
            assert_eq!(
                parsed,
                Header {
                    fin: true,
                    rsv1: false,
                    opcode: OP_BINARY,
                    mask,
                    payload_len: len as u64,
                    len: n
                }
            );
            // Every strict prefix asks for more bytes.
            for cut in 0..n {
                assert_eq!(parse(&h[..cut]), Ok(None), "len {len} cut {cut}");
            }
        }
    }

    #[test]
    fn rejects_what_rfc_6455_forbids() {
        assert_eq!(parse(&[0xA1, 0x00]), Err(WireError::ReservedBits), "RSV2");
        assert_eq!(parse(&[0x91, 0x00]), Err(WireError::ReservedBits), "RSV3");
        assert_eq!(
            parse(&[0xC1, 0x00]).map(|h| h.map(|h| h.rsv1)),
            Ok(Some(true))
        );
        assert_eq!(parse(&[0x83, 0x00]), Err(WireError::UnknownOpcode(3)));
        assert_eq!(
            parse(&[0x09, 0x00]),
            Err(WireError::BadControlFrame),
            "fragmented ping"
        );
        assert_eq!(
            parse(&[0x89, 126, 0, 126]),
            Err(WireError::BadControlFrame),
            "126-byte ping"
        );
        assert_eq!(
            parse(&[0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::BadLength)
        );
    }

    #[test]
    fn control_frames_round_trip_through_the_mask() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        let frame = control_frame(OP_CLOSE, &close_payload(1001, "going away"), Some(key));
        let h = parse(&frame).unwrap().unwrap();
        assert_eq!((h.opcode, h.mask, h.payload_len), (OP_CLOSE, Some(key), 12));
        let mut payload = frame[h.len..].to_vec();
        apply_mask(&mut payload, key, 0);
        assert_eq!(&payload[..2], &1001u16.to_be_bytes());
        assert_eq!(&payload[2..], b"going away");
    }

    #[test]
    fn close_reason_is_cut_at_a_character_boundary() {
        let payload = close_payload(1000, &"é".repeat(100));
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    #[test]
    fn mask_offset_continues_the_key_across_chunks() {
        let key = [1, 2, 3, 4];
        let mut whole = *b"abcdefghij";
        apply_mask(&mut whole, key, 0);
        let mut parts = *b"abcdefghij";
        let (a, b) = parts.split_at_mut(3);
        apply_mask(a, key, 0);
        apply_mask(b, key, 3);
        assert_eq!(whole, parts);
    }
}
