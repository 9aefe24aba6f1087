//! One direction of a tunnel at the byte level, with no IO: bytes read from one leg go in,
//! the bytes to write to the other leg come out.
//!
//! Frames are forwarded as they came, header and payload untouched: a client's masked frame
//! is a valid masked frame for the backend, a backend's unmasked frame is valid for the
//! client, so data is never unmasked, re-masked or reassembled, and a payload streams
//! through in whatever pieces TCP delivers it. Only headers are parsed (limits, fragment
//! order, masking rules), and only control frames (at most 125 bytes) are looked into:
//! pongs to the gateway's own heartbeat pings are consumed, Close frames are noted.

use super::Leg;
use super::ending::{Ending, HEARTBEAT_PAYLOAD};
use super::wire::{self, Header, OP_CLOSE, OP_CONTINUATION, OP_PONG};

/// What the direction saw besides frames to forward.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// A data frame (text, binary, continuation) went through.
    pub data: bool,
    /// Frames whose header went through (data and control).
    pub frames: u32,
    /// The sending leg's Close frame went through (its close code, if any).
    pub close: Option<Option<u16>>,
}

/// Limits applied to what the sending leg sends.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frame_size: u64,
    pub max_message_size: u64,
}

/// Parser state of one direction.
#[derive(Debug)]
pub struct Direction {
    from: Leg,
    /// Bytes read but not yet forwarded: an incomplete header or control frame.
    partial: Vec<u8>,
    /// Payload bytes of the current data frame still to pass through.
    frame_left: u64,
    /// Inside a fragmented message, with this many payload bytes so far.
    fragment: Option<u64>,
    /// The sending leg's Close frame went through: it sends no more frames.
    closed: bool,
    /// The gateway is ending the tunnel: nothing new is forwarded, only the rest of the
    /// frame in flight (`owed`), so the other leg's stream ends on a frame boundary where
    /// the gateway's close frame can follow.
    cut: bool,
    owed: bool,
}

impl Direction {
    pub fn new(from: Leg) -> Direction {
        Direction {
            from,
            partial: Vec::new(),
            frame_left: 0,
            fragment: None,
            closed: false,
            cut: false,
            owed: false,
        }
    }

    /// Stop forwarding after the frame in flight.
    pub fn cut(&mut self) {
        if !self.cut {
            self.cut = true;
            self.owed = self.frame_left > 0;
        }
    }

    /// The leg sent its Close frame.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// In the middle of a frame toward the other leg: the gateway may not insert a frame
    /// of its own there.
    pub fn mid_frame(&self) -> bool {
        self.frame_left > 0 && (!self.cut || self.owed)
    }

    /// Takes `input` (bytes read from the leg) and appends what goes to the other leg to
    /// `out`. An `Err` ends the tunnel (the frames before the bad one are in `out`); bytes
    /// after a Close frame are dropped.
    pub fn process(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limits: &Limits,
    ) -> Result<Seen, Ending> {
        let mut seen = Seen::default();
        if self.partial.is_empty() {
            let used = self.frames(input, out, limits, &mut seen)?;
            if used < input.len() {
                self.partial.extend_from_slice(&input[used..]);
            }
        } else {
            let mut pending = std::mem::take(&mut self.partial);
            pending.extend_from_slice(input);
            let used = self.frames(&pending, out, limits, &mut seen)?;
            pending.drain(..used);
            // Keep the (small) allocation only while it holds something.
            if !pending.is_empty() {
                self.partial = pending;
            }
        }
        Ok(seen)
    }

    /// Forwards whole headers, payload pieces and whole control frames from `data`;
    /// returns how many bytes were used (the rest is an incomplete header or control frame).
    #[inline]
    fn frames(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        limits: &Limits,
        seen: &mut Seen,
    ) -> Result<usize, Ending> {
        let mut i = 0;
        while i < data.len() {
            if self.closed {
                // RFC 6455 §5.5.1: nothing follows a Close frame.
                return Ok(data.len());
            }
            if self.frame_left > 0 {
                let take = self.frame_left.min((data.len() - i) as u64) as usize;
                if !self.cut || self.owed {
                    out.extend_from_slice(&data[i..i + take]);
                }
                self.frame_left -= take as u64;
                if self.frame_left == 0 {
                    self.owed = false;
                }
                i += take;
                continue;
            }
            let header = match wire::parse(&data[i..]) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(_) => return Err(Ending::Protocol(self.from)),
            };
            // RFC 6455 §5.1: clients mask every frame, servers none.
            if header.mask.is_some() != (self.from == Leg::Client) {
                return Err(Ending::Protocol(self.from));
            }
            if header.is_control() {
                let whole = header.len + header.payload_len as usize;
                if data.len() - i < whole {
                    break;
                }
                seen.frames += 1;
                self.control(&header, &data[i..i + whole], out, seen);
                i += whole;
                continue;
            }
            self.data_header(&header, limits)?;
            seen.data = true;
            seen.frames += 1;
            if !self.cut {
                out.extend_from_slice(&data[i..i + header.len]);
            }
            self.frame_left = header.payload_len;
            i += header.len;
        }
        Ok(i)
    }

    fn data_header(&mut self, header: &Header, limits: &Limits) -> Result<(), Ending> {
        let continuation = header.opcode == OP_CONTINUATION;
        let so_far = match (self.fragment, continuation) {
            (None, false) => 0,
            (Some(so_far), true) => so_far,
            // A new message inside a fragmented one, or a continuation of nothing.
            _ => return Err(Ending::Protocol(self.from)),
        };
        let total = so_far.saturating_add(header.payload_len);
        if header.payload_len > limits.max_frame_size || total > limits.max_message_size {
            return Err(Ending::TooBig(self.from));
        }
        self.fragment = (!header.fin).then_some(total);
        Ok(())
    }

    fn control(&mut self, header: &Header, frame: &[u8], out: &mut Vec<u8>, seen: &mut Seen) {
        let mut payload = [0u8; wire::MAX_CONTROL_PAYLOAD];
        let len = header.payload_len as usize;
        payload[..len].copy_from_slice(&frame[header.len..]);
        if let Some(key) = header.mask {
            wire::apply_mask(&mut payload[..len], key, 0);
        }
        match header.opcode {
            OP_PONG if &payload[..len] == HEARTBEAT_PAYLOAD => return,
            OP_CLOSE => {
                self.closed = true;
                seen.close = Some((len >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])));
            }
            _ => {}
        }
        if !self.cut {
            out.extend_from_slice(frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::wire::{OP_BINARY, OP_PING, OP_TEXT, control_frame, write_header};

    const LIMITS: Limits = Limits {
        max_frame_size: 1000,
        max_message_size: 1500,
    };
    const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    /// A frame as `from` would send it (clients mask).
    fn frame(from: Leg, fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = (from == Leg::Client).then_some(KEY);
        let mut h = [0u8; wire::MAX_HEADER];
        let n = write_header(&mut h, opcode, mask, payload.len());
        if !fin {
            h[0] &= 0x7f;
        }
        let mut f = h[..n].to_vec();
        let start = f.len();
        f.extend_from_slice(payload);
        if let Some(key) = mask {
            wire::apply_mask(&mut f[start..], key, 0);
        }
        f
    }

    fn run(dir: &mut Direction, input: &[u8]) -> (Vec<u8>, Result<Seen, Ending>) {
        let mut out = Vec::new();
        let r = dir.process(input, &mut out, &LIMITS);
        (out, r)
    }

    #[test]
    fn frames_pass_through_byte_for_byte_in_any_split() {
        for from in [Leg::Client, Leg::Backend] {
            let mut stream = frame(from, true, OP_TEXT, b"hello");
            stream.extend(frame(from, false, OP_BINARY, &[7u8; 300]));
            stream.extend(frame(from, true, OP_PING, b"app"));
            stream.extend(frame(from, true, OP_CONTINUATION, &[8u8; 200]));
            for chunk in [1, 2, 3, 7, 64, 1000] {
                let mut dir = Direction::new(from);
                let mut out = Vec::new();
                for piece in stream.chunks(chunk) {
                    dir.process(piece, &mut out, &LIMITS).unwrap();
                }
                assert_eq!(out, stream, "{from:?} in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn heartbeat_pongs_are_consumed_others_pass() {
        let mut dir = Direction::new(Leg::Client);
        let hb = frame(Leg::Client, true, OP_PONG, HEARTBEAT_PAYLOAD);
        let app = frame(Leg::Client, true, OP_PONG, b"app-pong");
        let mut input = hb.clone();
        input.extend(&app);
        input.extend(&hb);
        let (out, seen) = run(&mut dir, &input);
        assert_eq!(out, app);
        assert_eq!(
            seen.unwrap(),
            Seen {
                frames: 3,
                ..Seen::default()
            }
        );
    }

    #[test]
    fn close_is_forwarded_noted_and_ends_the_direction() {
        let mut dir = Direction::new(Leg::Backend);
        let close = control_frame(OP_CLOSE, &wire::close_payload(4001, "bye"), None);
        let mut input = close.clone();
        input.extend(frame(Leg::Backend, true, OP_TEXT, b"after close"));
        let (out, seen) = run(&mut dir, &input);
        assert_eq!(out, close);
        assert_eq!(seen.unwrap().close, Some(Some(4001)));
        assert!(dir.closed());
    }

    #[test]
    fn masking_rules_and_fragment_order_are_enforced() {
        let unmasked_from_client = frame(Leg::Backend, true, OP_TEXT, b"x");
        assert_eq!(
            run(&mut Direction::new(Leg::Client), &unmasked_from_client).1,
            Err(Ending::Protocol(Leg::Client))
        );
        let masked_from_backend = frame(Leg::Client, true, OP_TEXT, b"x");
        assert_eq!(
            run(&mut Direction::new(Leg::Backend), &masked_from_backend).1,
            Err(Ending::Protocol(Leg::Backend))
        );
        let stray = frame(Leg::Client, true, OP_CONTINUATION, b"x");
        assert_eq!(
            run(&mut Direction::new(Leg::Client), &stray).1,
            Err(Ending::Protocol(Leg::Client))
        );
        let mut dir = Direction::new(Leg::Client);
        run(&mut dir, &frame(Leg::Client, false, OP_TEXT, b"a"))
            .1
            .unwrap();
        assert_eq!(
            run(&mut dir, &frame(Leg::Client, true, OP_BINARY, b"b")).1,
            Err(Ending::Protocol(Leg::Client))
        );
        assert_eq!(
            run(&mut Direction::new(Leg::Client), &[0xC2, 0x80, 0, 0, 0, 0]).1,
            Err(Ending::Protocol(Leg::Client)),
            "RSV bits"
        );
    }

    #[test]
    fn frame_and_message_limits_apply_before_any_payload_is_forwarded() {
        let (out, r) = run(
            &mut Direction::new(Leg::Client),
            &frame(Leg::Client, true, OP_BINARY, &[0; 1001]),
        );
        assert_eq!(r, Err(Ending::TooBig(Leg::Client)));
        assert!(out.is_empty());
        let mut dir = Direction::new(Leg::Backend);
        run(&mut dir, &frame(Leg::Backend, false, OP_BINARY, &[0; 800]))
            .1
            .unwrap();
        assert_eq!(
            run(
                &mut dir,
                &frame(Leg::Backend, true, OP_CONTINUATION, &[0; 800])
            )
            .1,
            Err(Ending::TooBig(Leg::Backend))
        );
    }

    #[test]
    fn a_partial_header_waits_for_its_bytes_without_holding_memory_after() {
        let mut dir = Direction::new(Leg::Client);
        let f = frame(Leg::Client, true, OP_BINARY, &[5; 10]);
        let (out, _) = run(&mut dir, &f[..3]);
        assert!(out.is_empty());
        let (out, _) = run(&mut dir, &f[3..]);
        assert_eq!(out, f);
        assert_eq!(dir.partial.capacity(), 0);
    }
}
