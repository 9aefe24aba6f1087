//! The tunnel actor: thin glue that feeds both legs' frames through [`Relay`] and
//! [`Timers`] and carries out what they decide.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::io::{SinkWrite, WriteHandler};
use actix::{
    Actor, ActorContext, Addr, AsyncContext, Context, Handler, Message as ActixMessage,
    SpawnHandle, StreamHandler,
};
use actix_http::ws::{Codec, Frame, Message, ProtocolError};
use actix_ws::{Closed, MessageStream, Session};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::SplitSink;

use super::gate::{Gate, GatedSink, GatedStream};
use super::heartbeat::{TimerEvent, Timers};
use super::relay::{Abort, Ending, HEARTBEAT_PAYLOAD, Relay, Step};
use super::{Leg, Registry, RegistryEntry};
use crate::config::TunnelSettings;
use crate::config::defaults::CLOSE_TIMEOUT;
use crate::pool::ServerLease;

type BackendFramed = actix_codec::Framed<awc::BoxedSocket, Codec>;
type BackendSink = SplitSink<BackendFramed, Message>;

/// The backend half of a tunnel, as the dialer hands it over.
pub struct BackendLeg {
    pub framed: BackendFramed,
    pub lease: ServerLease,
}

/// What a tunnel needs besides its two sockets.
pub struct TunnelParams {
    pub settings: TunnelSettings,
    pub registry: Arc<Registry>,
    /// The upstream the server was picked from (draining is per upstream).
    pub upstream: Arc<str>,
    /// For logs: who is on each end.
    pub client_addr: String,
    pub route: String,
}

/// Ends a tunnel from outside (shutdown, draining), at once or `after` a delay.
#[derive(ActixMessage, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct End {
    pub ending: Ending,
    pub after: Duration,
}

pub struct Tunnel {
    client: SinkWrite<Message, GatedSink<Session>>,
    backend: SinkWrite<Message, GatedSink<BackendSink>>,
    to_client: Gate,
    to_backend: Gate,
    relay: Relay,
    timers: Timers,
    timer: Option<SpawnHandle>,
    /// A Close frame has been queued toward the leg: nothing more may follow it.
    close_sent: [bool; 2],
    /// The leg's input stream has ended or failed.
    input_done: [bool; 2],
    /// The gateway itself is ending the tunnel: data frames are no longer relayed.
    aborting: bool,
    /// Both sinks were asked to flush and close.
    closing_sinks: bool,
    /// The leg's sink has finished (closed after flushing, or failed).
    sink_done: [bool; 2],
    close_deadline_armed: bool,
    lease: ServerLease,
    registry: Arc<Registry>,
    upstream: Arc<str>,
    entry: Option<RegistryEntry>,
    client_addr: String,
    route: String,
    ending: Option<Ending>,
}

impl Tunnel {
    /// Spawns the tunnel on the current worker and returns its address.
    pub fn start(
        session: Session,
        client_stream: MessageStream,
        backend: BackendLeg,
        params: TunnelParams,
    ) -> Addr<Tunnel> {
        let settings = params.settings;
        Tunnel::create(move |ctx| {
            let to_client = Gate::new(settings.max_buffer);
            let to_backend = Gate::new(settings.max_buffer);
            let (backend_sink, backend_stream) = backend.framed.split();
            ctx.add_stream(GatedStream::new(client_stream, to_backend.clone()));
            ctx.add_stream(GatedStream::new(backend_stream, to_client.clone()));
            Tunnel {
                client: SinkWrite::new(GatedSink::new(session, to_client.clone()), ctx),
                backend: SinkWrite::new(GatedSink::new(backend_sink, to_backend.clone()), ctx),
                to_client,
                to_backend,
                relay: Relay::new(settings.max_message_size),
                timers: Timers::new(
                    Instant::now(),
                    settings.ping_interval,
                    settings.pong_timeout,
                    settings.idle_timeout,
                ),
                timer: None,
                close_sent: [false; 2],
                input_done: [false; 2],
                aborting: false,
                closing_sinks: false,
                sink_done: [false; 2],
                close_deadline_armed: false,
                lease: backend.lease,
                registry: params.registry,
                upstream: params.upstream,
                entry: None,
                client_addr: params.client_addr,
                route: params.route,
                ending: None,
            }
        })
    }

    /// Queues `msg` toward `to`, unless that leg has already been sent its Close.
    #[inline]
    fn send(&mut self, to: Leg, msg: Message) {
        if self.close_sent[to as usize] || self.closing_sinks {
            return;
        }
        if matches!(msg, Message::Close(_)) {
            self.close_sent[to as usize] = true;
        }
        // `write` only fails once the sink is closing, when the frame has nowhere to go.
        match to {
            Leg::Client => {
                self.to_client.add(&msg);
                let _ = self.client.write(msg);
            }
            Leg::Backend => {
                self.to_backend.add(&msg);
                let _ = self.backend.write(msg);
            }
        }
    }

    #[inline]
    fn on_frame(&mut self, from: Leg, step: Step, ctx: &mut Context<Self>) {
        match step {
            Step::Forward(msg) => {
                if !self.aborting {
                    self.send(from.other(), msg);
                }
            }
            Step::Swallow => {}
            Step::Abort(abort) => self.abort(None, abort, ctx),
            Step::ForwardClose { close, finished } => {
                if !self.aborting {
                    self.send(from.other(), close);
                }
                self.arm_close_deadline(ctx);
                // `finished` says the handshake completed both ways; an aborting tunnel may
                // also settle here, when the last leg it waits for answers.
                let _ = finished;
                self.settle(ctx);
            }
        }
    }

    fn end(&mut self, ending: Ending, ctx: &mut Context<Self>) {
        self.abort(Some(ending), ending.abort(), ctx);
    }

    /// The gateway ends the tunnel: close frames to the legs that can take one, then wait
    /// for their replies at most [`CLOSE_TIMEOUT`].
    fn abort(&mut self, ending: Option<Ending>, abort: Abort, ctx: &mut Context<Self>) {
        if self.aborting {
            return;
        }
        self.aborting = true;
        if self.ending.is_none() {
            self.ending = ending;
        }
        tracing::debug!(client = %self.client_addr, route = %self.route,
            server = %self.lease.server().config, ?ending, "tunnel ending");
        for (leg, reason) in [
            (Leg::Client, abort.to_client),
            (Leg::Backend, abort.to_backend),
        ] {
            match reason {
                Some(reason) if !self.input_done[leg as usize] => {
                    self.send(leg, Message::Close(Some(reason)))
                }
                // A leg that is gone or gets no frame has nothing to wait for.
                _ => self.input_done[leg as usize] = true,
            }
        }
        // A leg that stopped answering gets its close frame as a courtesy, but nobody waits
        // for its reply.
        if let Some(Ending::Silent(leg)) = ending {
            self.input_done[leg as usize] = true;
        }
        self.arm_close_deadline(ctx);
        self.settle(ctx);
    }

    fn arm_close_deadline(&mut self, ctx: &mut Context<Self>) {
        if !self.close_deadline_armed {
            self.close_deadline_armed = true;
            ctx.run_later(CLOSE_TIMEOUT, |act, ctx| {
                tracing::debug!(client = %act.client_addr, "close handshake timed out");
                ctx.stop();
            });
        }
    }

    /// Once each leg has closed (or is gone), flush and close both sinks; the actor stops
    /// when both have finished.
    fn settle(&mut self, ctx: &mut Context<Self>) {
        if self.closing_sinks {
            return;
        }
        let settled = |leg: Leg| {
            self.input_done[leg as usize]
                || (self.relay.closed(leg) && self.close_sent[leg as usize])
        };
        if settled(Leg::Client) && settled(Leg::Backend) {
            if let Some(timer) = self.timer.take() {
                ctx.cancel_future(timer);
            }
            self.closing_sinks = true;
            self.client.close();
            self.backend.close();
            self.stop_when_flushed(ctx);
        }
    }

    fn sink_finished(&mut self, leg: Leg, ctx: &mut Context<Self>) {
        self.sink_done[leg as usize] = true;
        self.stop_when_flushed(ctx);
    }

    fn stop_when_flushed(&mut self, ctx: &mut Context<Self>) {
        if self.closing_sinks && self.sink_done == [true; 2] {
            ctx.stop();
        }
    }

    fn input_ended(&mut self, leg: Leg, ctx: &mut Context<Self>) {
        self.input_done[leg as usize] = true;
        if !self.relay.closed(leg) && !self.aborting {
            self.end(Ending::Vanished(leg), ctx);
        } else {
            self.settle(ctx);
        }
    }

    fn arm_timer(&mut self, ctx: &mut Context<Self>) {
        let delay = self
            .timers
            .next_wake()
            .saturating_duration_since(Instant::now());
        self.timer = Some(ctx.run_later(delay, |act, ctx| act.on_timer(ctx)));
    }

    fn on_timer(&mut self, ctx: &mut Context<Self>) {
        self.timer = None;
        if self.aborting || self.closing_sinks {
            return;
        }
        let now = Instant::now();
        while let Some(event) = self.timers.on_wake(now) {
            match event {
                TimerEvent::Ping => {
                    let ping = Bytes::from_static(HEARTBEAT_PAYLOAD);
                    self.send(Leg::Client, Message::Ping(ping.clone()));
                    self.send(Leg::Backend, Message::Ping(ping));
                }
                TimerEvent::Dead(leg) => return self.end(Ending::Silent(leg), ctx),
                TimerEvent::Idle => return self.end(Ending::Idle, ctx),
            }
        }
        self.arm_timer(ctx);
    }
}

impl Actor for Tunnel {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.entry = Some(self.registry.insert(
            Arc::clone(&self.upstream),
            Arc::clone(self.lease.server()),
            ctx.address().recipient(),
        ));
        self.arm_timer(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::debug!(client = %self.client_addr, route = %self.route,
            server = %self.lease.server().config, ending = ?self.ending, "tunnel closed");
    }
}

/// Frames from the client.
impl StreamHandler<Result<Message, ProtocolError>> for Tunnel {
    fn handle(&mut self, item: Result<Message, ProtocolError>, ctx: &mut Self::Context) {
        if self.input_done[Leg::Client as usize] {
            return;
        }
        match item {
            Ok(msg) => {
                self.timers.heard(Leg::Client);
                if matches!(
                    msg,
                    Message::Text(_) | Message::Binary(_) | Message::Continuation(_)
                ) {
                    self.timers.data();
                }
                let step = self.relay.from_client(msg);
                self.on_frame(Leg::Client, step, ctx);
            }
            Err(err) => {
                let ending = Ending::from_protocol_error(Leg::Client, &err);
                if matches!(ending, Ending::Vanished(_)) {
                    self.input_done[Leg::Client as usize] = true;
                }
                self.end(ending, ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        self.input_ended(Leg::Client, ctx);
    }
}

/// Frames from the backend.
impl StreamHandler<Result<Frame, ProtocolError>> for Tunnel {
    fn handle(&mut self, item: Result<Frame, ProtocolError>, ctx: &mut Self::Context) {
        if self.input_done[Leg::Backend as usize] {
            return;
        }
        match item {
            Ok(frame) => {
                self.timers.heard(Leg::Backend);
                if matches!(
                    frame,
                    Frame::Text(_) | Frame::Binary(_) | Frame::Continuation(_)
                ) {
                    self.timers.data();
                }
                let step = self.relay.from_backend(frame);
                self.on_frame(Leg::Backend, step, ctx);
            }
            Err(err) => {
                let ending = Ending::from_protocol_error(Leg::Backend, &err);
                if matches!(ending, Ending::Vanished(_)) {
                    self.input_done[Leg::Backend as usize] = true;
                }
                self.end(ending, ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        self.input_ended(Leg::Backend, ctx);
    }
}

/// The client sink: the actix-ws session.
impl WriteHandler<Closed> for Tunnel {
    fn error(&mut self, _: Closed, ctx: &mut Self::Context) -> actix::Running {
        // The client's connection is gone: nothing more can reach it.
        self.close_sent[Leg::Client as usize] = true;
        if !self.aborting {
            self.input_done[Leg::Client as usize] = true;
            self.end(Ending::Vanished(Leg::Client), ctx);
        }
        actix::Running::Stop
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        self.sink_finished(Leg::Client, ctx);
    }
}

/// The backend sink: awc's framed connection.
impl WriteHandler<ProtocolError> for Tunnel {
    fn error(&mut self, _: ProtocolError, ctx: &mut Self::Context) -> actix::Running {
        self.close_sent[Leg::Backend as usize] = true;
        if !self.aborting {
            self.input_done[Leg::Backend as usize] = true;
            self.end(Ending::Vanished(Leg::Backend), ctx);
        }
        actix::Running::Stop
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        self.sink_finished(Leg::Backend, ctx);
    }
}

impl Handler<End> for Tunnel {
    type Result = ();

    fn handle(&mut self, msg: End, ctx: &mut Self::Context) {
        if msg.after.is_zero() {
            self.end(msg.ending, ctx);
        } else {
            ctx.run_later(msg.after, move |act, ctx| act.end(msg.ending, ctx));
        }
    }
}
