//! One direction of a tunnel at the byte level, with no IO: bytes read from one leg go in,
//! the bytes to write to the other leg come out.
//!
//! Frames are forwarded as they came, header and payload untouched: a client's masked frame
//! is a valid masked frame for the backend, a backend's unmasked frame is valid for the
//! client, so data is never unmasked, re-masked or reassembled, and a payload streams
//! through in whatever pieces TCP delivers it. Only headers are parsed (limits, fragment
//! order, masking rules), and only control frames (at most 125 bytes) are looked into:
//! pongs to the gateway's own heartbeat pings are consumed, Close frames are noted.

use std::ops::Range;

use super::Leg;
use super::ending::{Ending, HEARTBEAT_PAYLOAD};
use super::wire::{
    self, FIN, Header, MASKED, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PONG, OP_TEXT, RSV1,
};

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

/// What [`Direction::process`] produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Processed {
    pub seen: Seen,
    /// The bytes for the other leg are exactly this range of the input, which is then
    /// written as it is (no copy; `out` stays empty). The common case: a batch of whole
    /// data frames with nothing consumed or cut.
    pub direct: Option<Range<usize>>,
}

/// Where forwarded bytes go while a batch is parsed: contiguous ranges of the input are
/// only remembered, and copied into `out` once something breaks the run.
struct Sink<'a> {
    out: &'a mut Vec<u8>,
    run: Option<Range<usize>>,
}

impl<'a> Sink<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Sink { out, run: None }
    }

    #[inline]
    fn pass(&mut self, data: &[u8], range: Range<usize>) {
        match &mut self.run {
            Some(run) if run.end == range.start => run.end = range.end,
            _ => {
                self.flush(data);
                self.run = Some(range);
            }
        }
    }

    fn flush(&mut self, data: &[u8]) {
        if let Some(run) = self.run.take() {
            self.out.extend_from_slice(&data[run]);
        }
    }

    /// The run itself if it is all there is to forward, else `None` with it in `out`.
    fn finish(mut self, data: &[u8]) -> Option<Range<usize>> {
        if self.out.is_empty() {
            self.run.take()
        } else {
            self.flush(data);
            None
        }
    }
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
    /// permessage-deflate was agreed: the first frame of a data message may set RSV1.
    compressed: bool,
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
    pub fn new(from: Leg, compressed: bool) -> Direction {
        Direction {
            from,
            compressed,
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

    /// permessage-deflate was agreed for the tunnel.
    pub fn compressed(&self) -> bool {
        self.compressed
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

    /// Takes `input` (bytes read from the leg); what goes to the other leg is either
    /// appended to `out` or, when it is one unchanged range of `input`, returned as
    /// [`Processed::direct`]. An `Err` ends the tunnel (the frames before the bad one are
    /// in `out`); bytes after a Close frame are dropped.
    pub fn process(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limits: &Limits,
    ) -> Result<Processed, Ending> {
        let mut seen = Seen::default();
        let mut sink = Sink::new(out);
        if self.partial.is_empty() {
            let used = match self.frames(input, &mut sink, limits, &mut seen) {
                Ok(used) => used,
                Err(ending) => {
                    sink.flush(input);
                    return Err(ending);
                }
            };
            if used < input.len() {
                self.partial.extend_from_slice(&input[used..]);
            }
            let direct = sink.finish(input);
            Ok(Processed { seen, direct })
        } else {
            let mut pending = std::mem::take(&mut self.partial);
            pending.extend_from_slice(input);
            let used = self.frames(&pending, &mut sink, limits, &mut seen);
            sink.flush(&pending);
            pending.drain(..used?);
            // Keep the (small) allocation only while it holds something.
            if !pending.is_empty() {
                self.partial = pending;
            }
            Ok(Processed { seen, direct: None })
        }
    }

    /// Forwards whole headers, payload pieces and whole control frames from `data`;
    /// returns how many bytes were used (the rest is an incomplete header or control frame).
    #[inline]
    fn frames(
        &mut self,
        data: &[u8],
        sink: &mut Sink<'_>,
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
                    sink.pass(data, i..i + take);
                }
                self.frame_left -= take as u64;
                if self.frame_left == 0 {
                    self.owed = false;
                }
                i += take;
                continue;
            }
            if !self.cut && self.fragment.is_none() {
                let (end, count) = self.whole_messages(&data[i..], limits);
                if count > 0 {
                    seen.data = true;
                    seen.frames += count;
                    sink.pass(data, i..i + end);
                    i += end;
                    if i == data.len() {
                        break;
                    }
                }
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
            // RFC 7692 §6: RSV1 marks a compressed message, so it is set only on the first
            // frame of a data message, and only where permessage-deflate was agreed.
            if header.rsv1
                && !(self.compressed && !header.is_control() && header.opcode != OP_CONTINUATION)
            {
                return Err(Ending::Protocol(self.from));
            }
            if header.is_control() {
                let whole = header.len + header.payload_len as usize;
                if data.len() - i < whole {
                    break;
                }
                seen.frames += 1;
                if self.control(&header, &data[i..i + whole], seen) {
                    sink.pass(data, i..i + whole);
                }
                i += whole;
                continue;
            }
            self.data_header(&header, limits)?;
            seen.data = true;
            seen.frames += 1;
            if !self.cut {
                sink.pass(data, i..i + header.len);
            }
            self.frame_left = header.payload_len;
            i += header.len;
        }
        Ok(i)
    }

    /// The common case in one step per frame: whole single-frame data messages (FIN, text
    /// or binary, masked as this leg must, a 7- or 16-bit length within the limits, header
    /// and payload all in `data`), which need no state and go on as they came. Returns
    /// the bytes and frames of the run at the start of `data`; anything else (a control
    /// frame, a fragment, a cut payload, a broken rule) ends it and gets the full walk,
    /// which also finds the error if there is one.
    #[inline]
    fn whole_messages(&self, data: &[u8], limits: &Limits) -> (usize, u32) {
        let max_payload = limits.max_frame_size.min(limits.max_message_size);
        // One loop per leg and extension, so that the header length, the MASK bit and the
        // RSV1 rule are constants in it rather than values it reloads per frame.
        match (self.from, self.compressed) {
            (Leg::Client, false) => whole_message_run::<true, false>(data, max_payload),
            (Leg::Client, true) => whole_message_run::<true, true>(data, max_payload),
            (Leg::Backend, false) => whole_message_run::<false, false>(data, max_payload),
            (Leg::Backend, true) => whole_message_run::<false, true>(data, max_payload),
        }
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

    /// Notes a control frame; returns whether it goes on to the other leg.
    fn control(&mut self, header: &Header, frame: &[u8], seen: &mut Seen) -> bool {
        let mut payload = [0u8; wire::MAX_CONTROL_PAYLOAD];
        let len = header.payload_len as usize;
        payload[..len].copy_from_slice(&frame[header.len..]);
        if let Some(key) = header.mask {
            wire::apply_mask(&mut payload[..len], key, 0);
        }
        match header.opcode {
            OP_PONG if &payload[..len] == HEARTBEAT_PAYLOAD => return false,
            OP_CLOSE => {
                self.closed = true;
                seen.close = Some((len >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])));
            }
            _ => {}
        }
        !self.cut
    }
}

/// [`Direction::whole_messages`] for a leg that must (`MASKED_LEG`) or must not mask its
/// frames, with or without permessage-deflate (`DEFLATE`, which allows RSV1). Each frame
/// costs two byte compares: the first byte against FIN with text or binary, the second,
/// less the MASK bit the leg must set, against the largest 7-bit length the limits allow.
fn whole_message_run<const MASKED_LEG: bool, const DEFLATE: bool>(
    data: &[u8],
    max_payload: u64,
) -> (usize, u32) {
    // Text and binary are adjacent opcodes: with FIN, the first byte is one of two
    // values, and a wrapping subtraction leaves 0 or 1 for exactly those.
    const { assert!(OP_BINARY == OP_TEXT + 1) };
    let first_byte_checked = if DEFLATE { !RSV1 } else { u8::MAX };
    let (mask_bit, header_len) = if MASKED_LEG { (MASKED, 2 + 4) } else { (0, 2) };
    // A 7-bit length up to this is within the limits (larger ones take the 16-bit arm).
    let max_short = max_payload.min(125) as u8;
    let (mut rest, mut count) = (data, 0);
    while let [b0, b1, after @ ..] = rest {
        if (b0 & first_byte_checked).wrapping_sub(FIN | OP_TEXT) > 1 {
            break;
        }
        // A MASK bit other than the leg's wraps this past 127: neither arm takes it.
        let short = b1.wrapping_sub(mask_bit);
        let whole = if short <= max_short {
            header_len + usize::from(short)
        } else if let (126, [hi, lo, ..]) = (short, after) {
            let payload = u16::from_be_bytes([*hi, *lo]);
            if u64::from(payload) > max_payload {
                break;
            }
            header_len + 2 + usize::from(payload)
        } else {
            break;
        };
        let Some(next) = rest.get(whole..) else {
            break;
        };
        rest = next;
        count += 1;
    }
    (data.len() - rest.len(), count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::wire::{OP_PING, control_frame, write_header};

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
        let r = forward(dir, input, &mut out);
        (out, r)
    }

    /// What goes to the other leg, appended to `out` whichever way `process` gave it.
    fn forward(dir: &mut Direction, input: &[u8], out: &mut Vec<u8>) -> Result<Seen, Ending> {
        let mut fresh = Vec::new();
        let processed = dir.process(input, &mut fresh, &LIMITS);
        match &processed {
            Ok(Processed {
                direct: Some(range),
                ..
            }) => {
                assert!(fresh.is_empty(), "direct output comes alone");
                out.extend_from_slice(&input[range.clone()]);
            }
            // On an error too: the frames before the bad one go through.
            _ => out.extend_from_slice(&fresh),
        }
        processed.map(|p| p.seen)
    }

    #[test]
    fn whole_data_frames_are_forwarded_without_a_copy() {
        let mut dir = Direction::new(Leg::Client, false);
        let mut input = frame(Leg::Client, true, OP_TEXT, b"one");
        input.extend(frame(Leg::Client, true, OP_BINARY, &[9u8; 200]));
        let mut out = Vec::new();
        let processed = dir.process(&input, &mut out, &LIMITS).unwrap();
        assert_eq!(processed.direct, Some(0..input.len()));
        assert!(out.is_empty());
        // A consumed heartbeat pong in the middle breaks the run: the rest is copied.
        let mut input = frame(Leg::Client, true, OP_TEXT, b"a");
        input.extend(frame(Leg::Client, true, OP_PONG, HEARTBEAT_PAYLOAD));
        input.extend(frame(Leg::Client, true, OP_TEXT, b"b"));
        let processed = dir.process(&input, &mut out, &LIMITS).unwrap();
        assert_eq!(processed.direct, None);
        let mut expected = frame(Leg::Client, true, OP_TEXT, b"a");
        expected.extend(frame(Leg::Client, true, OP_TEXT, b"b"));
        assert_eq!(out, expected);
    }

    #[test]
    fn runs_of_whole_messages_are_counted_and_checked_like_single_frames() {
        for (from, compressed) in [
            (Leg::Client, false),
            (Leg::Backend, false),
            (Leg::Client, true),
        ] {
            // Short and 16-bit lengths, a ping and a fragmented message inside the run.
            let mut stream = Vec::new();
            for size in [0, 1, 125, 126, 1000, 64] {
                stream.extend(frame(from, true, OP_BINARY, &vec![size as u8; size]));
            }
            stream.extend(frame(from, true, OP_PING, b"app"));
            stream.extend(frame(from, false, OP_TEXT, b"first half "));
            stream.extend(frame(from, true, OP_CONTINUATION, b"second half"));
            let mut compressed_message = frame(from, true, OP_TEXT, b"deflated");
            compressed_message[0] |= 0x40;
            if compressed {
                stream.extend(&compressed_message);
            }
            stream.extend(frame(from, true, OP_TEXT, b"last"));
            let frames = if compressed { 11 } else { 10 };
            let mut dir = Direction::new(from, compressed);
            let (out, seen) = run(&mut dir, &stream);
            assert_eq!(out, stream, "{from:?}");
            assert_eq!(seen.unwrap().frames, frames, "{from:?}");
            // The same rules hold inside a run: the frames before a bad one go on.
            let mut dir = Direction::new(from, false);
            let mut bad = frame(from, true, OP_TEXT, b"fine");
            let good_len = bad.len();
            bad.extend(&compressed_message);
            let (out, r) = run(&mut dir, &bad);
            assert_eq!(
                r,
                Err(Ending::Protocol(from)),
                "RSV1 without permessage-deflate"
            );
            assert_eq!(out, bad[..good_len]);
            let mut big = frame(from, true, OP_TEXT, b"fine");
            big.extend(frame(from, true, OP_BINARY, &[1; 1001]));
            let (out, r) = run(&mut Direction::new(from, compressed), &big);
            assert_eq!(r, Err(Ending::TooBig(from)), "over max_frame_size");
            assert_eq!(out, big[..good_len]);
        }
    }

    #[test]
    fn the_one_step_check_accepts_exactly_the_frames_the_header_walk_would_pass_whole() {
        let small = Limits {
            max_frame_size: 100,
            max_message_size: 1000,
        };
        for (from, compressed, limits) in [
            (Leg::Client, false, LIMITS),
            (Leg::Backend, false, LIMITS),
            (Leg::Client, true, LIMITS),
            (Leg::Backend, true, small),
        ] {
            let max_payload = limits.max_frame_size.min(limits.max_message_size);
            for b0 in 0..=u8::MAX {
                for b1 in 0..=u8::MAX {
                    // A complete frame with this start: extended length, key, payload.
                    let mut bytes = vec![b0, b1];
                    let payload_len = match b1 & 0x7f {
                        126 => {
                            bytes.extend(200u16.to_be_bytes());
                            200
                        }
                        127 => {
                            bytes.extend(200u64.to_be_bytes());
                            200
                        }
                        n => usize::from(n),
                    };
                    if b1 & MASKED != 0 {
                        bytes.extend(KEY);
                    }
                    let header_len = bytes.len();
                    bytes.resize(header_len + payload_len, 0x5a);
                    let passes_whole = matches!(wire::parse(&bytes), Ok(Some(h))
                        if h.fin
                            && matches!(h.opcode, OP_TEXT | OP_BINARY)
                            && h.mask.is_some() == (from == Leg::Client)
                            && (!h.rsv1 || compressed)
                            && h.payload_len <= max_payload);
                    let dir = Direction::new(from, compressed);
                    let (end, count) = dir.whole_messages(&bytes, &limits);
                    let case = format!("{from:?} deflate {compressed} {b0:#04x} {b1:#04x}");
                    if count > 0 {
                        assert!(passes_whole, "accepted a frame it must not: {case}");
                        assert_eq!((end, count), (bytes.len(), 1), "{case}");
                    } else {
                        // Only 64-bit lengths are left to the header walk when valid.
                        assert!(!passes_whole || b1 & 0x7f == 127, "missed {case}");
                    }
                    // Cut short (in the header, or by the payload's last byte), it is not taken.
                    for cut in [0, 1, header_len - 1, bytes.len() - 1] {
                        assert_eq!(dir.whole_messages(&bytes[..cut], &limits).1, 0, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn frames_pass_through_byte_for_byte_in_any_split() {
        for from in [Leg::Client, Leg::Backend] {
            let mut stream = frame(from, true, OP_TEXT, b"hello");
            stream.extend(frame(from, false, OP_BINARY, &[7u8; 300]));
            stream.extend(frame(from, true, OP_PING, b"app"));
            stream.extend(frame(from, true, OP_CONTINUATION, &[8u8; 200]));
            for chunk in [1, 2, 3, 7, 64, 1000] {
                let mut dir = Direction::new(from, false);
                let mut out = Vec::new();
                for piece in stream.chunks(chunk) {
                    forward(&mut dir, piece, &mut out).unwrap();
                }
                assert_eq!(out, stream, "{from:?} in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn heartbeat_pongs_are_consumed_others_pass() {
        let mut dir = Direction::new(Leg::Client, false);
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
        let mut dir = Direction::new(Leg::Backend, false);
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
            run(
                &mut Direction::new(Leg::Client, false),
                &unmasked_from_client
            )
            .1,
            Err(Ending::Protocol(Leg::Client))
        );
        let masked_from_backend = frame(Leg::Client, true, OP_TEXT, b"x");
        assert_eq!(
            run(
                &mut Direction::new(Leg::Backend, false),
                &masked_from_backend
            )
            .1,
            Err(Ending::Protocol(Leg::Backend))
        );
        let stray = frame(Leg::Client, true, OP_CONTINUATION, b"x");
        assert_eq!(
            run(&mut Direction::new(Leg::Client, false), &stray).1,
            Err(Ending::Protocol(Leg::Client))
        );
        let mut dir = Direction::new(Leg::Client, false);
        run(&mut dir, &frame(Leg::Client, false, OP_TEXT, b"a"))
            .1
            .unwrap();
        assert_eq!(
            run(&mut dir, &frame(Leg::Client, true, OP_BINARY, b"b")).1,
            Err(Ending::Protocol(Leg::Client))
        );
        assert_eq!(
            run(
                &mut Direction::new(Leg::Client, false),
                &[0xC2, 0x80, 0, 0, 0, 0]
            )
            .1,
            Err(Ending::Protocol(Leg::Client)),
            "RSV bits"
        );
    }

    #[test]
    fn rsv1_passes_on_first_data_frames_only_where_permessage_deflate_was_agreed() {
        // RFC 7692 §7.2.3.1: "Hello", compressed, in one unmasked frame.
        let hello = [0xC1, 0x07, 0xF2, 0x48, 0xCD, 0xC9, 0xC9, 0x07, 0x00];
        let mut dir = Direction::new(Leg::Backend, true);
        let (out, seen) = run(&mut dir, &hello);
        assert_eq!(out, hello, "forwarded as it came");
        assert!(seen.unwrap().data);
        // Fragmented: RSV1 on the first frame only.
        let mut first = hello;
        first[0] = 0x41;
        let mut dir = Direction::new(Leg::Backend, true);
        run(&mut dir, &first[..]).1.unwrap();
        let mut last = hello;
        last[0] = 0xC0;
        assert_eq!(
            run(&mut dir, &last[..]).1,
            Err(Ending::Protocol(Leg::Backend)),
            "RSV1 on a continuation frame"
        );
        assert_eq!(
            run(&mut Direction::new(Leg::Backend, true), &[0xC9, 0x00]).1,
            Err(Ending::Protocol(Leg::Backend)),
            "RSV1 on a ping"
        );
        assert_eq!(
            run(&mut Direction::new(Leg::Backend, false), &hello).1,
            Err(Ending::Protocol(Leg::Backend)),
            "RSV1 without permessage-deflate"
        );
        let mut masked = frame(Leg::Client, true, OP_TEXT, b"compressed bytes");
        masked[0] |= 0x40;
        let (out, seen) = run(&mut Direction::new(Leg::Client, true), &masked);
        assert_eq!(out, masked);
        assert!(seen.is_ok());
    }

    #[test]
    fn frame_and_message_limits_apply_before_any_payload_is_forwarded() {
        let (out, r) = run(
            &mut Direction::new(Leg::Client, false),
            &frame(Leg::Client, true, OP_BINARY, &[0; 1001]),
        );
        assert_eq!(r, Err(Ending::TooBig(Leg::Client)));
        assert!(out.is_empty());
        let mut dir = Direction::new(Leg::Backend, false);
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
        let mut dir = Direction::new(Leg::Client, false);
        let f = frame(Leg::Client, true, OP_BINARY, &[5; 10]);
        let (out, _) = run(&mut dir, &f[..3]);
        assert!(out.is_empty());
        let (out, _) = run(&mut dir, &f[3..]);
        assert_eq!(out, f);
        assert_eq!(dir.partial.capacity(), 0);
    }
}
