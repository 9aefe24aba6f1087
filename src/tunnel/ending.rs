//! How a tunnel ends: each reason the gateway ends one, and the close code and reason each
//! leg is sent for it. The offending leg learns what it did wrong; the other leg learns why
//! its peer is gone. (A close handshake started by a peer is relayed as it is.)

use actix_http::ws::{CloseCode, CloseReason};

use super::Leg;

/// Payload of the gateway's own pings, so their pongs can be told from the application's.
pub const HEARTBEAT_PAYLOAD: &[u8] = b"wsgate-hb";

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
    /// The leg broke the protocol (bad fragment order, reserved bits, ...).
    Protocol(Leg),
    /// The leg did not take what was sent to it for `slow_consumer_timeout`.
    Slow(Leg),
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
            Ending::Protocol(Leg::Client) => (
                reason(Protocol, "protocol error"),
                reason(Away, "client protocol error"),
            ),
            Ending::Protocol(Leg::Backend) => (
                reason(Other(1014), "backend protocol error"),
                reason(Protocol, "protocol error"),
            ),
            Ending::Slow(Leg::Client) => (
                reason(Policy, "too slow to read"),
                reason(Away, "client too slow"),
            ),
            Ending::Slow(Leg::Backend) => (
                reason(Away, "backend too slow"),
                reason(Policy, "too slow to read"),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(reason: &Option<CloseReason>) -> Option<u16> {
        reason.as_ref().map(|r| r.code.into())
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
    }
}
