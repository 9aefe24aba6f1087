//! The tunnel actor: owns one WebSocket connection's life, not its bytes.
//!
//! It is listed in the [`Registry`] (so shutdown and draining reach it with [`End`]),
//! pings both legs on its heartbeat timer, fails a leg that stops answering or a tunnel
//! that stays idle, and stops once the relay is done, writing the access log line. The
//! bytes themselves go through the [`Relay`], which shares the tunnel's state ([`Core`])
//! with the actor. Actor and relay are one future, [`TunnelTask`], run by the task that
//! accepted the connection: the actor's context is polled only when its own waker fired
//! (mailbox, timers), so the relay's wake-ups do not go through the actor's mailbox and
//! timers, and the actor's handlers change the state that the relay's poll, right after,
//! acts on.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use actix::dev::ContextFut;
use actix::{
    Actor, ActorContext, ActorFuture, AsyncContext, Context, Handler, Message as ActixMessage,
};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Sleep;

use super::ending::{Ending, HEARTBEAT_PAYLOAD};
use super::heartbeat::TimerEvent;
use super::relay::{ClientAddr, Core, FlagWaker, LegIo, Relay};
use super::wire::OP_PING;
use super::{Leg, Registry, RegistryEntry};

use crate::config::TunnelSettings;
use crate::limits::Permits;
use crate::pool::ServerLease;

/// What a tunnel needs besides its two sockets.
pub struct TunnelParams {
    pub settings: TunnelSettings,
    /// The tunnel's places under the connection limits, held for its life.
    pub permits: Permits,
    /// The gateway-wide count of bytes waiting toward slow legs.
    pub buffered: Arc<AtomicUsize>,
    /// Frame and byte counters per direction, `[from client, from backend]`.
    pub counters: [(Counter, Counter); 2],
    /// Where close frames are counted.
    pub shared: actix_web::web::Data<crate::proxy::Shared>,
    /// Write an access log line when the tunnel ends.
    pub access_log: bool,
    pub registry: Arc<Registry>,
    pub lease: ServerLease,
    /// The upstream the server was picked from (draining is per upstream).
    pub upstream: Arc<str>,
    /// For logs: who is on each end.
    pub client_addr: ClientAddr,
    pub route: Arc<str>,
    /// Client and backend agreed on permessage-deflate: the first frame of a data
    /// message may carry RSV1.
    pub permessage_deflate: bool,
}

/// Ends a tunnel from outside (shutdown, draining), at once or `after` a delay.
#[derive(ActixMessage, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct End {
    pub ending: Ending,
    pub after: Duration,
}

pub struct Tunnel {
    core: Rc<RefCell<Core>>,
    registry: Arc<Registry>,
    /// The upstream the server was picked from (draining is per upstream).
    upstream: Arc<str>,
    entry: Option<RegistryEntry>,
}

impl Tunnel {
    /// The tunnel, actor and relay, as the future that runs it on this worker: the
    /// connection's task runs it once the handshake's state is freed, an upgrade served
    /// by actix-http spawns it. The actor starts on its first poll.
    #[must_use = "the tunnel runs only while its task is polled: run it on this worker"]
    pub fn start(client: LegIo, backend: LegIo, params: TunnelParams) -> TunnelTask {
        let registry = Arc::clone(&params.registry);
        let upstream = Arc::clone(&params.upstream);
        let core = Rc::new(RefCell::new(Core::new(client, backend, params)));
        let tunnel = Tunnel {
            core: Rc::clone(&core),
            registry,
            upstream,
            entry: None,
        };
        TunnelTask {
            // Not `Actor::start`: that spawns a task of its own and makes an address
            // nobody keeps (the registry holds the tunnel's one address).
            actor: Some(Box::new(Context::new().into_future(tunnel))),
            actor_waker: None,
            relay: Relay::new(core),
        }
    }
}

/// One tunnel's actor and relay, polled by one task: a task less per tunnel than an actor
/// of its own (a spawn, two polls and a wake-up across tasks per tunnel).
pub struct TunnelTask {
    /// Gone once the actor stopped. Boxed: the context is large (384 bytes), and the
    /// tunnel is moved a few times on its way into the connection's task (callgrind: the
    /// copies cost more than the allocation).
    actor: Option<Box<ContextFut<Tunnel, Context<Tunnel>>>>,
    /// What the actor's context is polled with: it notes that the actor woke the task,
    /// so a wake-up of the relay's legs does not poll the actor.
    actor_waker: Option<(Arc<FlagWaker>, Waker)>,
    relay: Relay,
}

impl TunnelTask {
    /// Polls the actor's context if its waker fired, or `always`, or on the first poll
    /// (which starts the actor) and whenever the task's waker changed; drops the context
    /// once the actor stopped.
    #[inline(always)]
    fn poll_actor(
        actor: &mut Option<Box<ContextFut<Tunnel, Context<Tunnel>>>>,
        actor_waker: &mut Option<(Arc<FlagWaker>, Waker)>,
        task: &Waker,
        always: bool,
    ) {
        // The common case, a wake-up for the relay's legs, in two compares and a load.
        if let Some((flag, _)) = actor_waker
            && flag.wakes(task)
            && !flag.take()
            && !always
        {
            return;
        }
        Self::run_actor(actor, actor_waker, task);
    }

    #[inline(never)]
    fn run_actor(
        actor: &mut Option<Box<ContextFut<Tunnel, Context<Tunnel>>>>,
        actor_waker: &mut Option<(Arc<FlagWaker>, Waker)>,
        task: &Waker,
    ) {
        let Some(context) = actor else {
            return;
        };
        let waker = match actor_waker {
            Some((flag, waker)) if flag.wakes(task) => waker,
            _ => {
                let flag = FlagWaker::new(task);
                let waker = Waker::from(Arc::clone(&flag));
                &actor_waker.insert((flag, waker)).1
            }
        };
        if Pin::new(&mut **context)
            .poll(&mut TaskContext::from_waker(waker))
            .is_ready()
        {
            *actor = None;
        }
    }
}

impl Future for TunnelTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        // The actor first: what its handlers change (pings queued, the tunnel ended) the
        // relay acts on in this same poll.
        Self::poll_actor(&mut this.actor, &mut this.actor_waker, cx.waker(), false);
        if Pin::new(&mut this.relay).poll(cx).is_pending() {
            return Poll::Pending;
        }
        // The relay is done: the actor sees it and stops now (the access log line).
        Self::poll_actor(&mut this.actor, &mut this.actor_waker, cx.waker(), true);
        debug_assert!(this.actor.is_none(), "the actor outlived its relay");
        Poll::Ready(())
    }
}

/// What the heartbeat does when it is due: pings both legs, or ends the tunnel when a leg
/// did not answer the last ping or the tunnel has been idle too long.
fn beat(core: &mut Core) {
    let now = Instant::now();
    while let Some(event) = core.timers.on_wake(now) {
        match event {
            TimerEvent::Ping => {
                core.inject_frame(Leg::Client, OP_PING, HEARTBEAT_PAYLOAD);
                core.inject_frame(Leg::Backend, OP_PING, HEARTBEAT_PAYLOAD);
                core.turn_both_legs();
            }
            TimerEvent::Dead(leg) => return core.end(Ending::Silent(leg)),
            TimerEvent::Idle => return core.end(Ending::Idle),
        }
    }
}

pin_project_lite::pin_project! {
    /// The actor's own work, one future polled by its context: the heartbeat on one
    /// timer, re-armed in place, and stopping the actor once the relay is done. The timer
    /// is held inline: the context boxes this future anyway.
    struct Lifecycle {
        #[pin]
        heartbeat: Sleep,
    }
}

impl ActorFuture<Tunnel> for Lifecycle {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut Tunnel,
        ctx: &mut Context<Tunnel>,
        task: &mut TaskContext<'_>,
    ) -> Poll<()> {
        let mut heartbeat = self.project().heartbeat;
        let mut core = act.core.borrow_mut();
        if core.relay_done {
            ctx.stop();
            return Poll::Ready(());
        }
        // No pings into a close handshake: the heartbeat stops once the tunnel is closing
        // (which includes the gateway ending it, on a beat too).
        if !core.closing && heartbeat.as_mut().poll(task).is_ready() {
            beat(&mut core);
            if !core.closing {
                heartbeat.as_mut().reset(core.timers.next_wake().into());
                // Registers the timer; a deadline already past is taken on the next poll.
                if heartbeat.as_mut().poll(task).is_ready() {
                    task.waker().wake_by_ref();
                }
            }
        }
        Poll::Pending
    }
}

impl Actor for Tunnel {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let server = Arc::clone(self.core.borrow().lease.server());
        self.entry = Some(self.registry.insert(
            Arc::clone(&self.upstream),
            server,
            ctx.address().recipient(),
        ));
        let first_beat = self.core.borrow().timers.next_wake();
        ctx.spawn(Lifecycle {
            heartbeat: tokio::time::sleep_until(first_beat.into()),
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.core.borrow().log_end();
    }
}

impl Handler<End> for Tunnel {
    type Result = ();

    fn handle(&mut self, msg: End, ctx: &mut Self::Context) {
        if msg.after.is_zero() {
            self.core.borrow_mut().end(msg.ending);
        } else {
            ctx.run_later(msg.after, move |act, _| {
                act.core.borrow_mut().end(msg.ending)
            });
        }
    }
}
