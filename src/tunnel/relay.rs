//! Frame translation and the close handshake, with no IO: what each incoming frame becomes
//! on the other leg. The actor feeds frames in and carries out the returned [`Step`].
//!
//! Rules (RFC 6455 §5.4, §5.5, §7):
//! - data frames and continuation fragments are forwarded as they come, boundaries kept;
//!   a message is only counted, never reassembled, to enforce `max_message_size`;
//! - application pings and pongs pass end to end; the gateway's own heartbeat pongs
//!   (payload [`HEARTBEAT_PAYLOAD`]) are consumed;
//! - every Close is forwarded once per direction; nothing is sent to a leg after its Close;
//!   the tunnel is finished once each leg has both sent and received a Close;
//! - errors and dead legs end the tunnel with a close code to each leg that can take one.

use actix_http::ws::{CloseCode, CloseReason, Frame, Item, Message, ProtocolError};
use bytes::Bytes;
use bytestring::ByteString;

use super::Leg;

/// Payload of the gateway's own pings, so their pongs can be told from the application's.
pub const HEARTBEAT_PAYLOAD: &[u8] = b"wsgate-hb";

/// What the actor does with one incoming frame.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Send this to the other leg.
    Forward(Message),
    /// Nothing to send.
    Swallow,
    /// The gateway ends the tunnel: send each leg the close frame given (if any), then wait
    /// for the replies only as long as the close timeout.
    Abort(Abort),
    /// The frame was a Close and is forwarded; `finished` when both directions are closed.
    ForwardClose { close: Message, finished: bool },
}

/// The close frames the gateway sends itself when it ends a tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct Abort {
    pub to_client: Option<CloseReason>,
    pub to_backend: Option<CloseReason>,
}

/// Why the gateway ends a tunnel; each maps to the close code each leg gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The leg closed its TCP connection without a Close frame, or it broke.
    Vanished(Leg),
    /// The leg did not answer a heartbeat ping in time.
    Silent(Leg),
    /// The leg sent a frame larger than `max_frame_size` or a message larger than
    /// `max_message_size`.
    TooBig(Leg),
    /// The leg sent text that is not UTF-8.
    BadUtf8(Leg),
    /// The leg broke the protocol (bad fragment order, reserved bits, ...).
    Protocol(Leg),
    /// No data either way for `idle_timeout`.
    Idle,
    /// The gateway is shutting down (1001 to both).
    Shutdown,
    /// The backend server left its pool and its drain timeout passed (1012 to both).
    Drained,
}

fn reason(code: CloseCode, text: &'static str) -> Option<CloseReason> {
    Some(CloseReason {
        code,
        description: Some(text.to_string()),
    })
}

impl Ending {
    /// The close frames for this ending: the offending leg learns what it did wrong, the
    /// other leg learns why its peer is gone.
    pub fn abort(self) -> Abort {
        use CloseCode::*;
        let (to_client, to_backend) = match self {
            Ending::Vanished(Leg::Backend) => (reason(Error, "backend connection lost"), None),
            Ending::Vanished(Leg::Client) => (None, reason(Away, "client connection lost")),
            Ending::Silent(Leg::Backend) => (
                reason(Error, "backend stopped answering"),
                reason(Away, "heartbeat timeout"),
            ),
            Ending::Silent(Leg::Client) => (
                reason(Away, "heartbeat timeout"),
                reason(Away, "client stopped answering"),
            ),
            Ending::TooBig(Leg::Client) => (
                reason(Size, "message too big"),
                reason(Away, "client sent a message too big"),
            ),
            Ending::TooBig(Leg::Backend) => (
                reason(Other(1014), "backend sent a message too big"),
                reason(Size, "message too big"),
            ),
            Ending::BadUtf8(Leg::Client) => (
                reason(Invalid, "invalid UTF-8 in text"),
                reason(Away, "client sent invalid data"),
            ),
            Ending::BadUtf8(Leg::Backend) => (
                reason(Other(1014), "backend sent invalid UTF-8"),
                reason(Invalid, "invalid UTF-8 in text"),
            ),
            Ending::Protocol(Leg::Client) => (
                reason(Protocol, "protocol error"),
                reason(Away, "client protocol error"),
            ),
            Ending::Protocol(Leg::Backend) => (
                reason(Other(1014), "backend protocol error"),
                reason(Protocol, "protocol error"),
            ),
            Ending::Idle => (reason(Away, "idle timeout"), reason(Away, "idle timeout")),
            Ending::Shutdown => (
                reason(Away, "gateway shutting down"),
                reason(Away, "gateway shutting down"),
            ),
            Ending::Drained => (
                reason(Restart, "backend removed, reconnect"),
                reason(Away, "server removed from pool"),
            ),
        };
        Abort {
            to_client,
            to_backend,
        }
    }

    /// The ending a codec error on `leg`'s input stands for.
    pub fn from_protocol_error(leg: Leg, err: &ProtocolError) -> Ending {
        match err {
            ProtocolError::Overflow => Ending::TooBig(leg),
            // actix-ws reports invalid UTF-8 as an I/O error wrapping the `Utf8Error`; other
            // `InvalidData` errors (reserved bits set, ...) are protocol errors.
            ProtocolError::Io(io)
                if io
                    .get_ref()
                    .is_some_and(|inner| inner.is::<std::str::Utf8Error>()) =>
            {
                Ending::BadUtf8(leg)
            }
            ProtocolError::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
                Ending::Protocol(leg)
            }
            ProtocolError::Io(_) => Ending::Vanished(leg),
            _ => Ending::Protocol(leg),
        }
    }
}

/// Per-direction state: fragment tracking and the close handshake.
#[derive(Debug, Default)]
struct Direction {
    /// Inside a fragmented message, with this many payload bytes so far.
    fragment: Option<usize>,
    /// This leg sent its Close.
    closed: bool,
}

/// The relay state of one tunnel.
#[derive(Debug)]
pub struct Relay {
    max_message_size: usize,
    dirs: [Direction; 2],
}

impl Relay {
    pub fn new(max_message_size: usize) -> Self {
        Relay {
            max_message_size,
            dirs: Default::default(),
        }
    }

    /// The leg has sent its Close frame (data from it is over).
    pub fn closed(&self, leg: Leg) -> bool {
        self.dirs[leg as usize].closed
    }

    /// A frame from the client, on its way to the backend.
    #[inline]
    pub fn from_client(&mut self, msg: Message) -> Step {
        match msg {
            // actix-ws has already checked the client's text is UTF-8.
            Message::Text(text) => match self.check_whole(Leg::Client, text.len()) {
                Some(abort) => abort,
                None => Step::Forward(Message::Text(text)),
            },
            Message::Binary(bytes) => self.binary(Leg::Client, bytes),
            Message::Continuation(item) => self.fragment(Leg::Client, item),
            Message::Ping(bytes) => Step::Forward(Message::Ping(bytes)),
            Message::Pong(bytes) => pong(bytes),
            Message::Close(reason) => self.close(Leg::Client, reason),
            Message::Nop => Step::Swallow,
        }
    }

    /// A frame from the backend, on its way to the client.
    #[inline]
    pub fn from_backend(&mut self, frame: Frame) -> Step {
        match frame {
            Frame::Text(bytes) => match self.check_whole(Leg::Backend, bytes.len()) {
                Some(abort) => abort,
                None => match ByteString::try_from(bytes) {
                    Ok(text) => Step::Forward(Message::Text(text)),
                    Err(_) => Step::Abort(Ending::BadUtf8(Leg::Backend).abort()),
                },
            },
            Frame::Binary(bytes) => self.binary(Leg::Backend, bytes),
            Frame::Continuation(item) => self.fragment(Leg::Backend, item),
            Frame::Ping(bytes) => Step::Forward(Message::Ping(bytes)),
            Frame::Pong(bytes) => pong(bytes),
            Frame::Close(reason) => self.close(Leg::Backend, reason),
        }
    }

    fn binary(&mut self, from: Leg, bytes: Bytes) -> Step {
        match self.check_whole(from, bytes.len()) {
            Some(abort) => abort,
            None => Step::Forward(Message::Binary(bytes)),
        }
    }

    /// The abort a whole (unfragmented) message of `len` bytes from `from` calls for.
    fn check_whole(&self, from: Leg, len: usize) -> Option<Step> {
        if self.dirs[from as usize].fragment.is_some() {
            // RFC 6455 §5.4: a new data message may not start inside a fragmented one.
            return Some(Step::Abort(Ending::Protocol(from).abort()));
        }
        (len > self.max_message_size).then(|| Step::Abort(Ending::TooBig(from).abort()))
    }

    fn fragment(&mut self, from: Leg, item: Item) -> Step {
        let dir = &mut self.dirs[from as usize];
        let (len, first, last) = match &item {
            Item::FirstText(b) | Item::FirstBinary(b) => (b.len(), true, false),
            Item::Continue(b) => (b.len(), false, false),
            Item::Last(b) => (b.len(), false, true),
        };
        let so_far = match (dir.fragment, first) {
            (None, true) => 0,
            (Some(so_far), false) => so_far,
            // A first fragment inside a message, or a continuation outside one.
            _ => return Step::Abort(Ending::Protocol(from).abort()),
        };
        let total = so_far.saturating_add(len);
        if total > self.max_message_size {
            return Step::Abort(Ending::TooBig(from).abort());
        }
        dir.fragment = (!last).then_some(total);
        Step::Forward(Message::Continuation(item))
    }

    fn close(&mut self, from: Leg, reason: Option<CloseReason>) -> Step {
        self.dirs[from as usize].closed = true;
        Step::ForwardClose {
            close: Message::Close(reason),
            finished: self.dirs[from.other() as usize].closed,
        }
    }
}

fn pong(bytes: Bytes) -> Step {
    if bytes.as_ref() == HEARTBEAT_PAYLOAD {
        Step::Swallow
    } else {
        Step::Forward(Message::Pong(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(reason: &Option<CloseReason>) -> Option<u16> {
        reason.as_ref().map(|r| r.code.into())
    }

    #[test]
    fn data_frames_pass_both_ways_unchanged() {
        let mut relay = Relay::new(1024);
        assert_eq!(
            relay.from_client(Message::Text("hi".into())),
            Step::Forward(Message::Text("hi".into()))
        );
        assert_eq!(
            relay.from_backend(Frame::Text(Bytes::from_static(b"yo"))),
            Step::Forward(Message::Text("yo".into()))
        );
        assert_eq!(
            relay.from_backend(Frame::Binary(Bytes::from_static(b"\x00\xff"))),
            Step::Forward(Message::Binary(Bytes::from_static(b"\x00\xff")))
        );
    }

    #[test]
    fn fragments_are_forwarded_one_by_one_and_counted_per_message() {
        let mut relay = Relay::new(10);
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        for item in [Item::FirstText(b("abcd")), Item::Continue(b("efg"))] {
            assert!(matches!(
                relay.from_client(Message::Continuation(item)),
                Step::Forward(Message::Continuation(_))
            ));
        }
        // 4 + 3 + 4 = 11 > 10
        let Step::Abort(abort) = relay.from_client(Message::Continuation(Item::Last(b("hijk"))))
        else {
            panic!("over-long message must abort");
        };
        assert_eq!(code(&abort.to_client), Some(1009));
        assert_eq!(code(&abort.to_backend), Some(1001));
    }

    #[test]
    fn limit_applies_again_after_a_message_ends() {
        let mut relay = Relay::new(8);
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        for _ in 0..3 {
            assert!(matches!(
                relay.from_backend(Frame::Continuation(Item::FirstBinary(b("1234")))),
                Step::Forward(_)
            ));
            assert!(matches!(
                relay.from_backend(Frame::Continuation(Item::Last(b("5678")))),
                Step::Forward(_)
            ));
        }
    }

    #[test]
    fn bad_fragment_order_is_a_protocol_error_of_the_sender() {
        let mut relay = Relay::new(100);
        let step = relay.from_backend(Frame::Continuation(Item::Continue(Bytes::new())));
        let Step::Abort(abort) = step else {
            panic!("{step:?}")
        };
        assert_eq!(code(&abort.to_backend), Some(1002));
        assert_eq!(code(&abort.to_client), Some(1014));

        let mut relay = Relay::new(100);
        relay.from_client(Message::Continuation(Item::FirstText(Bytes::new())));
        let step = relay.from_client(Message::Binary(Bytes::new()));
        let Step::Abort(abort) = step else {
            panic!("{step:?}")
        };
        assert_eq!(code(&abort.to_client), Some(1002));
    }

    #[test]
    fn heartbeat_pongs_are_consumed_application_pongs_pass() {
        let mut relay = Relay::new(100);
        let hb = Bytes::from_static(HEARTBEAT_PAYLOAD);
        assert_eq!(relay.from_client(Message::Pong(hb.clone())), Step::Swallow);
        assert_eq!(relay.from_backend(Frame::Pong(hb)), Step::Swallow);
        let app = Bytes::from_static(b"app");
        assert_eq!(
            relay.from_backend(Frame::Pong(app.clone())),
            Step::Forward(Message::Pong(app.clone()))
        );
        assert_eq!(
            relay.from_client(Message::Ping(app.clone())),
            Step::Forward(Message::Ping(app))
        );
    }

    #[test]
    fn close_is_forwarded_with_its_code_and_finishes_on_the_reply() {
        let mut relay = Relay::new(100);
        let bye = Some(CloseReason {
            code: CloseCode::Other(4001),
            description: Some("bye".into()),
        });
        assert_eq!(
            relay.from_client(Message::Close(bye.clone())),
            Step::ForwardClose {
                close: Message::Close(bye.clone()),
                finished: false
            }
        );
        // Data from the backend still reaches the client until the backend closes too.
        assert!(matches!(
            relay.from_backend(Frame::Binary(Bytes::new())),
            Step::Forward(_)
        ));
        assert_eq!(
            relay.from_backend(Frame::Close(bye.clone())),
            Step::ForwardClose {
                close: Message::Close(bye),
                finished: true
            }
        );
    }

    #[test]
    fn invalid_utf8_from_backend_is_caught_before_the_client_sees_it() {
        let mut relay = Relay::new(100);
        let Step::Abort(abort) = relay.from_backend(Frame::Text(Bytes::from_static(b"\xff")))
        else {
            panic!("invalid UTF-8 must abort");
        };
        assert_eq!(code(&abort.to_backend), Some(1007));
        assert_eq!(code(&abort.to_client), Some(1014));
    }

    #[test]
    fn each_ending_tells_each_leg_a_fitting_code() {
        let codes = |e: Ending| {
            let a = e.abort();
            (code(&a.to_client), code(&a.to_backend))
        };
        assert_eq!(
            codes(Ending::Silent(Leg::Backend)),
            (Some(1011), Some(1001))
        );
        assert_eq!(codes(Ending::Vanished(Leg::Backend)), (Some(1011), None));
        assert_eq!(codes(Ending::Vanished(Leg::Client)), (None, Some(1001)));
        assert_eq!(codes(Ending::Shutdown), (Some(1001), Some(1001)));
        assert_eq!(codes(Ending::Drained), (Some(1012), Some(1001)));
        assert_eq!(
            Ending::from_protocol_error(Leg::Client, &ProtocolError::Overflow),
            Ending::TooBig(Leg::Client)
        );
        let invalid = vec![0xffu8];
        let utf8 = std::str::from_utf8(&invalid).unwrap_err();
        let bad_text =
            ProtocolError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, utf8));
        assert_eq!(
            Ending::from_protocol_error(Leg::Client, &bad_text),
            Ending::BadUtf8(Leg::Client)
        );
        let rsv = ProtocolError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "Received a frame with non-zero reserved bits",
        ));
        assert_eq!(
            Ending::from_protocol_error(Leg::Client, &rsv),
            Ending::Protocol(Leg::Client)
        );
    }
}
