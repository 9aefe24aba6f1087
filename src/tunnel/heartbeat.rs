//! The tunnel's clock, with no IO: when to ping both legs, when a leg that did not answer
//! is dead, and when the tunnel has been idle too long.
//!
//! The relay path only flips flags ([`Timers::heard`], [`Timers::data`]): no clock read,
//! no timer reset per frame. The actor asks [`Timers::next_wake`], sleeps until then and
//! feeds [`Timers::on_wake`] until it answers `None`.

use std::time::{Duration, Instant};

use super::Leg;

/// What the actor must do after a wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerEvent {
    /// Send the gateway's ping to both legs.
    Ping,
    /// This leg sent nothing within `pong_timeout` after a ping.
    Dead(Leg),
    /// No data frame either way for `idle_timeout`.
    Idle,
}

/// Idle detection works in quarters of `idle_timeout`, so a tunnel is closed between 1
/// and 1.25 times the timeout after its last data frame without a clock read per frame.
const IDLE_QUARTERS: u32 = 4;

#[derive(Debug)]
pub struct Timers {
    ping_interval: Duration,
    pong_timeout: Duration,
    next_ping: Instant,
    /// Set while the last ping awaits an answer.
    pong_deadline: Option<Instant>,
    heard: [bool; 2],
    idle_step: Option<Duration>,
    next_idle_check: Option<Instant>,
    quiet_quarters: u32,
    data_seen: bool,
}

impl Timers {
    pub fn new(
        now: Instant,
        ping_interval: Duration,
        pong_timeout: Duration,
        idle: Duration,
    ) -> Self {
        let idle_step = (!idle.is_zero()).then(|| idle / IDLE_QUARTERS);
        Timers {
            ping_interval,
            pong_timeout,
            next_ping: now + ping_interval,
            pong_deadline: None,
            heard: [false; 2],
            idle_step,
            next_idle_check: idle_step.map(|step| now + step),
            quiet_quarters: 0,
            data_seen: false,
        }
    }

    /// Any frame from `leg` proves it alive.
    #[inline]
    pub fn heard(&mut self, leg: Leg) {
        self.heard[leg as usize] = true;
    }

    /// A data frame (text, binary, continuation) went through.
    #[inline]
    pub fn data(&mut self) {
        self.data_seen = true;
    }

    pub fn next_wake(&self) -> Instant {
        let mut wake = self.pong_deadline.unwrap_or(self.next_ping);
        if let Some(idle) = self.next_idle_check {
            wake = wake.min(idle);
        }
        wake
    }

    /// The next event due at `now`, if any; call again until it returns `None`.
    pub fn on_wake(&mut self, now: Instant) -> Option<TimerEvent> {
        if let Some(deadline) = self.pong_deadline
            && now >= deadline
        {
            self.pong_deadline = None;
            // The backend is checked first: when both legs are silent, the client is the
            // one still worth a close frame telling it why.
            for leg in [Leg::Backend, Leg::Client] {
                if !self.heard[leg as usize] {
                    return Some(TimerEvent::Dead(leg));
                }
            }
        }
        if let (Some(check), Some(step)) = (self.next_idle_check, self.idle_step)
            && now >= check
        {
            self.next_idle_check = Some(now + step);
            if std::mem::take(&mut self.data_seen) {
                self.quiet_quarters = 0;
            } else {
                self.quiet_quarters += 1;
                if self.quiet_quarters >= IDLE_QUARTERS {
                    return Some(TimerEvent::Idle);
                }
            }
        }
        // A new ping waits until the previous one is settled, whatever the two settings.
        if self.pong_deadline.is_none() && now >= self.next_ping {
            self.heard = [false; 2];
            self.pong_deadline = Some(now + self.pong_timeout);
            self.next_ping = now + self.ping_interval;
            return Some(TimerEvent::Ping);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn drain(t: &mut Timers, now: Instant) -> Vec<TimerEvent> {
        let mut out = Vec::new();
        while let Some(e) = t.on_wake(now) {
            out.push(e);
            assert!(out.len() < 10, "on_wake never settles");
        }
        out
    }

    #[test]
    fn pings_every_interval_while_both_legs_answer() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, 20 * S, 10 * S, Duration::ZERO);
        assert_eq!(t.next_wake(), t0 + 20 * S);
        assert_eq!(drain(&mut t, t0 + 20 * S), [TimerEvent::Ping]);
        assert_eq!(t.next_wake(), t0 + 30 * S);
        t.heard(Leg::Client);
        t.heard(Leg::Backend);
        assert_eq!(drain(&mut t, t0 + 30 * S), []);
        assert_eq!(t.next_wake(), t0 + 40 * S);
        assert_eq!(drain(&mut t, t0 + 40 * S), [TimerEvent::Ping]);
    }

    #[test]
    fn silent_backend_is_dead_at_pong_deadline() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, 20 * S, 10 * S, Duration::ZERO);
        drain(&mut t, t0 + 20 * S);
        t.heard(Leg::Client);
        assert_eq!(drain(&mut t, t0 + 30 * S), [TimerEvent::Dead(Leg::Backend)]);
    }

    #[test]
    fn silent_client_is_dead_and_frames_before_the_ping_do_not_count() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, 20 * S, 10 * S, Duration::ZERO);
        t.heard(Leg::Client);
        drain(&mut t, t0 + 20 * S);
        t.heard(Leg::Backend);
        assert_eq!(drain(&mut t, t0 + 30 * S), [TimerEvent::Dead(Leg::Client)]);
    }

    #[test]
    fn pong_timeout_longer_than_interval_delays_the_next_ping() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, 5 * S, 8 * S, Duration::ZERO);
        assert_eq!(drain(&mut t, t0 + 5 * S), [TimerEvent::Ping]);
        assert_eq!(t.next_wake(), t0 + 13 * S);
        t.heard(Leg::Client);
        t.heard(Leg::Backend);
        assert_eq!(drain(&mut t, t0 + 13 * S), [TimerEvent::Ping]);
    }

    #[test]
    fn idle_fires_after_four_quiet_quarters_and_heartbeats_do_not_reset_it() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, 100 * S, 10 * S, 8 * S);
        for q in 1..4 {
            t.heard(Leg::Client);
            assert_eq!(drain(&mut t, t0 + 2 * q * S), []);
        }
        assert_eq!(drain(&mut t, t0 + 8 * S), [TimerEvent::Idle]);
    }

    #[test]
    fn data_keeps_the_tunnel_from_idling() {
        let t0 = Instant::now();
        let mut t = Timers::new(t0, 100 * S, 10 * S, 8 * S);
        for q in 1..20 {
            t.data();
            assert_eq!(drain(&mut t, t0 + 2 * q * S), []);
        }
    }
}
