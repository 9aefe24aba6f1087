//! The tunnel actor: owns one WebSocket connection's life, not its bytes.
//!
//! It is listed in the [`Registry`] (so shutdown and draining reach it with [`End`]),
//! pings both legs on its heartbeat timer, fails a leg that stops answering or a tunnel
//! that stays idle, and stops once the relay is done, writing the access log line. The
//! bytes themselves go through the [`Relay`], which shares the tunnel's state ([`Core`])
//! with the actor and runs the actor's context in the relay's task ([`TunnelTask`], run
//! by the task that accepted the connection): the context is polled only when its own waker
//! fired (mailbox, timers), so the relay's wake-ups do not go through the actor's mailbox
//! and timers, and the actor's handlers change the state that the relay's poll, right
//! after, acts on.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use actix::dev::ContextFut;
use actix::{
    Actor, ActorContext, ActorFuture, AsyncContext, Context, Handler, Message as ActixMessage,
};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Sleep;

use super::ending::{Ending, HEARTBEAT_PAYLOAD};
use super::heartbeat::TimerEvent;
use super::relay::{ClientAddr, Core, LegIo, Relay};
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
        // Not `Actor::start`: that spawns a task of its own and makes an address nobody
        // keeps (the registry holds the tunnel's one address). The relay runs the
        // actor's context in its own task instead: a spawn, two task polls and a wake-up
        // across tasks less per tunnel. Boxed: the context is large (384 bytes), and the
        // tunnel is moved a few times on its way into the connection's task (callgrind:
        // the copies cost more than the allocation).
        Relay::new(core, Box::new(Context::new().into_future(tunnel)))
    }
}

/// One tunnel as its task runs it: the relay, which runs the actor's context too.
pub type TunnelTask = Relay<Box<ContextFut<Tunnel, Context<Tunnel>>>>;

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
