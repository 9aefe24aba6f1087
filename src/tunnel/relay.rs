//! The relay: a tunnel's hot path, a future run by the task that accepted the connection.
//! It reads whichever leg has bytes, passes them through [`Direction::process`] and writes
//! the result to the other leg: one read and one write per batch of frames, no mailbox hop,
//! no per-frame allocation, no lock. Bytes a slow leg cannot take yet wait in that leg's
//! `pending` buffer, and while they wait the other leg is not read, so TCP
//! back-pressure reaches the sender.
//!
//! The relay state ([`Core`]) is shared with the tunnel's actor ([`super::actor`]), which
//! owns the lifecycle: its heartbeat timer and `End` messages change the state, and it
//! stops once the relay is done. The relay runs the actor's context in its own task, as
//! its `lifecycle` future: polled first, and only when the lifecycle's own waker fired,
//! so the relay acts in that same poll on what the actor's handlers changed, and a
//! wake-up for the legs does not go through the actor's mailbox and timers. A wake-up
//! turns only the legs whose readiness can have changed: each leg's IO registers a waker
//! of its own ([`TaskWakers`]).

use std::cell::RefCell;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::Leg;
use super::actor::TunnelParams;
use super::ending::Ending;
use super::heartbeat::Timers;
use super::pump::{Direction, Limits, Processed};
use super::wire::{self, OP_CLOSE};

use crate::config::defaults::CLOSE_TIMEOUT;
use crate::limits::Permits;
use crate::pool::ServerLease;

/// A leg's byte stream: a TCP connection (behind a PROXY protocol header or not), or TLS
/// on top of one. Each kind is named with an impl of its own, so that plain TCP can send a
/// leg's last bytes and its FIN in one segment.
pub trait Io: AsyncRead + AsyncWrite + Unpin + 'static {
    /// Writes bytes after which the stream ends at once, in the same poll (a shutdown, or
    /// the close of a finished tunnel): a close handshake's last Close frame. Plain TCP
    /// sends them with `MSG_MORE`, so they wait in the socket for the FIN that follows and
    /// leave in one segment with it, as HAProxy sends them, instead of two. A caller must
    /// end the stream right after a complete write; after a partial one the socket is full,
    /// and the ACKs that free it push the held bytes out. TLS sends its close_notify with
    /// them, the same way ([`write_last_tls`]).
    fn poll_write_last(&mut self, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write(cx, buf)
    }

    /// Ends the stream (a shutdown of its sending side). TLS first sends its close_notify
    /// as last bytes, so that it leaves with the FIN in one segment, where tokio-rustls's
    /// own shutdown sends the two apart.
    fn poll_end(&mut self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }
}

impl Io for TcpStream {
    fn poll_write_last(&mut self, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.poll_write_ready(cx))?;
            let sent = self.try_io(Interest::WRITABLE, || {
                socket2::SockRef::from(&*self)
                    .send_with_flags(buf, libc::MSG_MORE | libc::MSG_NOSIGNAL)
            });
            match sent {
                // The readiness was stale; `try_io` cleared it, so the next check waits.
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                sent => return Poll::Ready(sent),
            }
        }
    }
}

impl Io for proxy_header::io::ProxiedStream<TcpStream> {
    fn poll_write_last(&mut self, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // The header is only read: writes go straight to the socket.
        self.get_mut().poll_write_last(cx, buf)
    }
}

/// The gateway as the TLS server: the client's leg of a `wss://` listener.
impl Io for tokio_rustls::server::TlsStream<Box<dyn Io>> {
    fn poll_write_last(&mut self, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let (io, tls) = self.get_mut();
        write_last_tls(&mut **io, tls, cx, buf)
    }

    fn poll_end(&mut self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let (io, tls) = self.get_mut();
        // Sent once: a close_notify that went with the last bytes is not sent again.
        tls.send_close_notify();
        std::task::ready!(send_records_as_last(&mut **io, tls, cx))?;
        Pin::new(self).poll_shutdown(cx)
    }
}

/// The gateway as the TLS client: the backend's leg toward a `wss://` server.
impl Io for tokio_rustls::client::TlsStream<TcpStream> {
    fn poll_write_last(&mut self, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let (io, tls) = self.get_mut();
        write_last_tls(io, tls, cx, buf)
    }
}

/// A TLS stream's last bytes: their record and TLS's close_notify after them, both
/// written to the socket beneath as its last bytes ([`Io::poll_write_last`]), so that
/// they leave with the FIN in one segment (tokio-rustls writes each record by itself, and
/// each went in a segment of its own). The close_notify goes with the last bytes because
/// the stream ends right after them, whether by a shutdown (whose close_notify rustls
/// then sends no second time) or by the close of a finished tunnel, which without it
/// would end TLS with a bare FIN: a truncation to a TLS client ("peer closed connection
/// without sending TLS close_notify").
fn write_last_tls<S: Io + ?Sized, D>(
    io: &mut S,
    tls: &mut rustls::ConnectionCommon<D>,
    cx: &mut TaskContext<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    // Records still waiting from earlier writes go first; until they are out, rustls may
    // have no room for these bytes.
    std::task::ready!(send_records_as_last(io, tls, cx))?;
    let written = io::Write::write(&mut tls.writer(), buf)?;
    if written == buf.len() {
        tls.send_close_notify();
    }
    // A socket that is full now takes the rest as the ACKs come: the records wait in
    // rustls, and the shutdown's flush (or the next write) sends them.
    match send_records_as_last(io, tls, cx) {
        Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
        _ => Poll::Ready(Ok(written)),
    }
}

/// Writes the records rustls has ready to `io` as last bytes, until none is left or the
/// socket is full (`Pending`, with the waker registered by `io`).
fn send_records_as_last<S: Io + ?Sized, D>(
    io: &mut S,
    tls: &mut rustls::ConnectionCommon<D>,
    cx: &mut TaskContext<'_>,
) -> Poll<io::Result<()>> {
    /// `io::Write` over [`Io::poll_write_last`], for rustls's `write_tls`.
    struct LastBytes<'a, 'b, S: ?Sized> {
        io: &'a mut S,
        cx: &'a mut TaskContext<'b>,
    }
    impl<S: Io + ?Sized> io::Write for LastBytes<'_, '_, S> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self.io.poll_write_last(self.cx, buf) {
                Poll::Ready(result) => result,
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    while tls.wants_write() {
        match tls.write_tls(&mut LastBytes {
            io: &mut *io,
            cx: &mut *cx,
        }) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(err) => return Poll::Ready(Err(err)),
        }
    }
    Poll::Ready(Ok(()))
}

#[cfg(test)]
impl Io for tokio::io::DuplexStream {}

/// One leg as the handshake hands it over: the stream, and bytes already read from it
/// (frames that arrived together with the handshake).
pub struct LegIo {
    pub io: Box<dyn Io>,
    pub early: bytes::Bytes,
}

/// The client's address for logs, formatted only when a log line is written (a string
/// per tunnel cost a formatting pass and an allocation on every handshake).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<std::net::SocketAddr>);

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => Ok(()),
        }
    }
}

/// Bytes read in one go; also the most a leg can have waiting toward a slow peer
/// (`max_buffer` lowers it).
const READ_CHUNK: usize = 64 * 1024;

/// Reads per leg and wake-up before yielding to the worker's other tunnels.
const READS_PER_WAKE: usize = 16;

/// Turns of both legs per wake-up when one turn changed what the other leg has to do
/// (the tunnel started ending, a leg went away).
const REVISITS_PER_WAKE: usize = 4;

/// How a leg's turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// Nothing more until a registered waker fires (or another turn changes the state).
    Waiting,
    /// The read bound was reached with the leg still readable.
    Unfinished,
}

/// Wakes the relay's task for one of its parts (a leg's IO, the lifecycle), noting first
/// that this part woke it: the task then polls only what can have work.
struct FlagWaker {
    woke: AtomicBool,
    task: Waker,
}

impl FlagWaker {
    fn new(task: &Waker) -> Arc<FlagWaker> {
        Arc::new(FlagWaker {
            woke: AtomicBool::new(false),
            task: task.clone(),
        })
    }

    /// Whether this wakes `task`.
    fn wakes(&self, task: &Waker) -> bool {
        self.task.will_wake(task)
    }

    /// Whether it fired since the last call. A load, and a store only where it found one,
    /// rather than a locked swap per poll: a wake landing in between is not lost, as
    /// what it stands for is polled after this anyway.
    fn take(&self) -> bool {
        let woke = self.woke.load(Ordering::Acquire);
        if woke {
            self.woke.store(false, Ordering::Relaxed);
        }
        woke
    }
}

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

/// The wakers the task polls its parts with: each leg's IO, and the lifecycle (the
/// actor's context), at [`LIFECYCLE`]. A wake-up then knows which parts can have work:
/// the relay does not poll the socket of a leg that did not wake (one readiness check, a
/// mutex in tokio, per wake-up for nothing), nor the actor's mailbox and timers.
struct TaskWakers {
    /// Read for the flags.
    flags: [Arc<FlagWaker>; 3],
    /// The same three as `Waker`s, made once: making one per poll would change the
    /// `Arc`'s count (a locked instruction) twice per part and poll.
    wakers: [Waker; 3],
}

/// The lifecycle's place in [`TaskWakers`], after the legs'.
const LIFECYCLE: usize = 2;

impl TaskWakers {
    fn new(task: &Waker) -> TaskWakers {
        let flags = [(); 3].map(|()| FlagWaker::new(task));
        let wakers = flags.each_ref().map(|flag| Waker::from(Arc::clone(flag)));
        TaskWakers { flags, wakers }
    }

    /// The context a leg's IO is polled in.
    fn cx(&self, leg: Leg) -> TaskContext<'_> {
        TaskContext::from_waker(&self.wakers[leg as usize])
    }

    /// Whether these wakers wake `task`.
    fn wakes(&self, task: &Waker) -> bool {
        self.flags[0].wakes(task)
    }

    /// Which parts woke the task since the last call: the two legs, then the lifecycle.
    fn take_woke(&self) -> [bool; 3] {
        self.flags.each_ref().map(|flag| flag.take())
    }
}

thread_local! {
    /// Per-worker scratch buffers for reading and for building the batch to write: an idle
    /// tunnel holds no buffer of its own.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = RefCell::new((vec![0u8; READ_CHUNK], Vec::with_capacity(READ_CHUNK + 1024)));
}

/// A tunnel's relay state, shared by the relay and the actor (one thread, never borrowed
/// by both at once: each borrows it only inside its own poll).
pub struct Core {
    io: [Box<dyn Io>; 2],
    /// Parser state of the bytes coming *from* each leg.
    dirs: [Direction; 2],
    /// Bytes waiting to be written *to* each leg.
    pending: [Vec<u8>; 2],
    /// The gateway's own frames for each leg, sent at the next frame boundary.
    inject: [Vec<u8>; 2],
    /// Nothing more is read from the leg: its input ended, or it is being failed.
    eof: [bool; 2],
    /// Nothing more can be written to the leg: a write failed, or it was cut mid-frame.
    dead: [bool; 2],
    /// A Close frame went to the leg: nothing more may follow it.
    close_sent: [bool; 2],
    /// The gateway ended the client's TCP (shutdown) while waiting for the backend's end.
    client_tcp_ended: bool,
    /// The gateway is ending the tunnel: data is no longer relayed.
    aborting: bool,
    limits: Limits,
    read_chunk: usize,
    /// Heartbeat and idle clock: the relay flips its flags, the actor's timer reads them.
    pub(super) timers: Timers,
    /// The close handshake started (a Close went through, or the gateway is ending the
    /// tunnel): the relay's close deadline runs, and the heartbeat stops.
    pub(super) closing: bool,
    /// Something besides a leg's IO changed the relay's work (the actor queued frames or
    /// ended the tunnel, the relay yielded): the next poll turns both legs.
    turn_both: bool,
    /// The relay is done: the actor stops when it sees this.
    pub(super) relay_done: bool,
    /// Set when a leg's turn changed what the other leg has to do (close frames queued,
    /// a leg gone), so the relay turns both legs again before it waits.
    revisit: bool,
    pub(super) lease: ServerLease,
    pub(super) client_addr: ClientAddr,
    route: Arc<str>,
    ending: Option<Ending>,
    _permits: Permits,
    buffered: Arc<AtomicUsize>,
    /// What this tunnel last added to `buffered`.
    accounted: usize,
    /// Since when bytes have been waiting toward each leg (for `slow_consumer = "close"`).
    backlog_since: [Option<Instant>; 2],
    slow_consumer_timeout: Option<Duration>,
    counters: [(Counter, Counter); 2],
    shared: actix_web::web::Data<crate::proxy::Shared>,
    access_log: bool,
    started: Instant,
    /// Frames and bytes from each leg, for the access log.
    frames: [u64; 2],
    bytes: [u64; 2],
    /// The first close frame that went through, with the side that sent it.
    first_close: Option<(&'static str, Option<u16>)>,
}

impl Core {
    pub(super) fn new(client: LegIo, backend: LegIo, params: TunnelParams) -> Core {
        let s = params.settings;
        let compressed = params.permessage_deflate;
        let mut core = Core {
            io: [client.io, backend.io],
            dirs: [
                Direction::new(Leg::Client, compressed),
                Direction::new(Leg::Backend, compressed),
            ],
            pending: [Vec::new(), Vec::new()],
            inject: [Vec::new(), Vec::new()],
            eof: [false; 2],
            dead: [false; 2],
            close_sent: [false; 2],
            client_tcp_ended: false,
            aborting: false,
            limits: Limits {
                max_frame_size: s.max_frame_size as u64,
                max_message_size: s.max_message_size as u64,
            },
            read_chunk: s.max_buffer.clamp(1024, READ_CHUNK),
            timers: Timers::new(
                Instant::now(),
                s.ping_interval,
                s.pong_timeout,
                s.idle_timeout,
            ),
            closing: false,
            turn_both: true,
            relay_done: false,
            revisit: false,
            lease: params.lease,
            client_addr: params.client_addr,
            route: params.route,
            ending: None,
            _permits: params.permits,
            buffered: params.buffered,
            accounted: 0,
            backlog_since: [None, None],
            slow_consumer_timeout: s.slow_consumer_timeout,
            counters: params.counters,
            shared: params.shared,
            access_log: params.access_log,
            started: Instant::now(),
            frames: [0; 2],
            bytes: [0; 2],
            first_close: None,
        };
        // Frames that came in with the handshakes go through now, queued toward the other
        // leg, so the tunnel keeps no handle on the handshakes' read buffers.
        core.forward_early(Leg::Client, &client.early);
        core.forward_early(Leg::Backend, &backend.early);
        core
    }

    /// Checks the bytes that arrived from `from` together with its handshake and queues
    /// what goes on toward the other leg; the relay's first turn writes them.
    fn forward_early(&mut self, from: Leg, early: &[u8]) {
        if early.is_empty() {
            return;
        }
        let mut out = Vec::new();
        let forwarded = match self.ingest(from, early, &mut out) {
            Some(direct) => &early[direct],
            None => &out[..],
        };
        self.pending[from.other() as usize].extend_from_slice(forwarded);
    }

    /// Processes bytes read from `from`; what goes to the other leg is either in `out` or,
    /// when it is one unchanged range of `input`, that range (written without a copy).
    fn ingest(&mut self, from: Leg, input: &[u8], out: &mut Vec<u8>) -> Option<Range<usize>> {
        let to = from.other();
        self.timers.heard(from);
        // The direction itself stops after a Close it forwarded, and after the frame in
        // flight once the gateway ends the tunnel (its own close follows that frame).
        let forward = !self.dead[to as usize];
        out.clear();
        match self.dirs[from as usize].process(input, out, &self.limits) {
            Err(ending) => {
                // The frames before the bad one are delivered; then the tunnel ends.
                if !forward {
                    out.clear();
                }
                self.end(ending);
                None
            }
            Ok(Processed { seen, direct }) => {
                if seen.data {
                    self.timers.data();
                }
                let i = from as usize;
                self.frames[i] += u64::from(seen.frames);
                self.bytes[i] += input.len() as u64;
                self.counters[i].0.inc_by(u64::from(seen.frames));
                self.counters[i].1.inc_by(input.len() as u64);
                if let Some(code) = seen.close {
                    let side = if from == Leg::Client {
                        "client"
                    } else {
                        "backend"
                    };
                    self.shared.metrics.close(side, code);
                    self.first_close.get_or_insert((side, code));
                }
                if !forward {
                    out.clear();
                } else if seen.close.is_some() {
                    self.close_sent[to as usize] = true;
                }
                if seen.close.is_some() {
                    self.closing = true;
                }
                direct.filter(|_| forward)
            }
        }
    }

    /// Writes `pending[to]`; true once it is empty.
    fn flush(&mut self, to: Leg, legs: &TaskWakers) -> bool {
        let i = to as usize;
        if self.pending[i].is_empty() {
            // Nothing waits: no flush, no buffer to release.
            return true;
        }
        let cx = &mut legs.cx(to);
        let last = self.ends_after_write(to);
        while !self.pending[i].is_empty() {
            match write(&mut self.io[i], cx, &self.pending[i], last) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.pending[i].drain(..n);
                }
                Poll::Pending => return false,
                Poll::Ready(_) => {
                    self.leg_gone(to);
                    return true;
                }
            }
        }
        // Release what a burst grew; an idle tunnel keeps no buffer.
        self.pending[i] = Vec::new();
        let _ = Pin::new(&mut self.io[i]).poll_flush(cx);
        true
    }

    /// Writes `out` to `to` now if it can; queues what it cannot.
    fn write_or_queue(&mut self, to: Leg, out: &[u8], legs: &TaskWakers) {
        let i = to as usize;
        let mut written = 0;
        if self.pending[i].is_empty() && !self.dead[to as usize] {
            let cx = &mut legs.cx(to);
            let last = self.ends_after_write(to);
            while written < out.len() {
                match write(&mut self.io[i], cx, &out[written..], last) {
                    Poll::Ready(Ok(n)) if n > 0 => written += n,
                    Poll::Pending => break,
                    Poll::Ready(_) => {
                        self.leg_gone(to);
                        return;
                    }
                }
            }
            if written == out.len() {
                let _ = Pin::new(&mut self.io[i]).poll_flush(cx);
                return;
            }
        }
        self.pending[i].extend_from_slice(&out[written..]);
    }

    /// Whether the bytes written to `to` now are the last it gets before its TCP ends in
    /// this same poll: once they are written the leg is done, and then the client's leg is
    /// shut down ([`Core::end_client_tcp`], right after the legs' turns) and a finished
    /// tunnel's legs are closed (the backend's needs its end of TCP first). Such bytes go
    /// out with the FIN in one segment ([`Io::poll_write_last`]). Saying so wrongly would
    /// hold them back until the socket closes: every condition here is one that
    /// [`Core::leg_done`] and [`Core::finished`] check. Under load the close is the usual
    /// end (`bench/syscalls.sh`: 0.02 shutdowns per handshake cycle), so the held bytes
    /// leave with the close's FIN; a client that sent bytes after its own Close (which
    /// RFC 6455 forbids) and has them unread then gets a reset without the held Close,
    /// where it got the Close and the reset before.
    fn ends_after_write(&self, to: Leg) -> bool {
        let i = to as usize;
        let done_once_written = (self.eof[i] || (self.close_sent[i] && self.dirs[i].closed()))
            && self.inject[i].is_empty();
        done_once_written
            && match to {
                Leg::Client => !self.client_tcp_ended,
                Leg::Backend => self.eof[i] && self.leg_done(Leg::Client),
            }
    }

    fn leg_gone(&mut self, leg: Leg) {
        let i = leg as usize;
        self.revisit = true;
        self.eof[i] = true;
        self.dead[i] = true;
        self.close_sent[i] = true;
        self.pending[i] = Vec::new();
        self.inject[i] = Vec::new();
        if !self.aborting {
            self.end(Ending::Vanished(leg));
        }
    }

    /// One leg's turn: flush what waits toward the other leg, then read this leg until it
    /// has nothing more, so that the turn ends with the leg's wakers registered (a read or
    /// a write that is pending) or with nothing left to do on it.
    fn drive(&mut self, from: Leg, legs: &TaskWakers) -> Turn {
        let to = from.other();
        for _ in 0..READS_PER_WAKE {
            if !self.flush(to, legs) {
                return Turn::Waiting;
            }
            if !self.inject[to as usize].is_empty() && !self.dirs[from as usize].mid_frame() {
                let frames = std::mem::take(&mut self.inject[to as usize]);
                self.pending[to as usize].extend_from_slice(&frames);
                continue;
            }
            if self.eof[from as usize] {
                return Turn::Waiting;
            }
            let read = SCRATCH.with(|scratch| {
                let (read_buf, out) = &mut *scratch.borrow_mut();
                let mut buf = ReadBuf::new(&mut read_buf[..self.read_chunk]);
                let read =
                    Pin::new(&mut self.io[from as usize]).poll_read(&mut legs.cx(from), &mut buf);
                let n = buf.filled().len();
                if let Poll::Ready(Ok(())) = read
                    && n > 0
                {
                    match self.ingest(from, &read_buf[..n], out) {
                        Some(direct) => self.write_or_queue(to, &read_buf[direct], legs),
                        None if !out.is_empty() => {
                            let batch = std::mem::take(out);
                            self.write_or_queue(to, &batch, legs);
                            *out = batch;
                        }
                        None => {}
                    }
                }
                read.map_ok(|()| n)
            });
            match read {
                Poll::Pending => return Turn::Waiting,
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(_) => {
                    self.eof[from as usize] = true;
                    if !self.dirs[from as usize].closed() && !self.aborting {
                        self.end(Ending::Vanished(from));
                    }
                }
            }
        }
        Turn::Unfinished
    }

    /// Everything for the leg is written and it has nothing more to say (its close
    /// handshake is over, or it is no longer read), or it is gone.
    fn leg_done(&self, leg: Leg) -> bool {
        let i = leg as usize;
        self.dead[i]
            || (self.pending[i].is_empty()
                && self.inject[i].is_empty()
                && (self.eof[i] || (self.dirs[i].closed() && self.close_sent[i])))
    }

    /// Both legs are done, and the backend has ended TCP unless it is gone or being failed.
    /// Toward the backend the gateway is the WebSocket client, which leaves ending TCP
    /// to the server (RFC 6455 §7.1.1) so that the server holds TIME_WAIT: a gateway that
    /// closed first would keep one of its own ports toward the backend unusable for a
    /// minute per tunnel. The close deadline bounds the wait.
    fn finished(&self) -> bool {
        let backend = Leg::Backend as usize;
        self.leg_done(Leg::Client)
            && self.leg_done(Leg::Backend)
            && (self.dead[backend] || self.eof[backend])
    }

    /// Ends the client's TCP as soon as its leg is done, while the backend's end is still
    /// awaited: toward the client the gateway is the server, which closes first.
    fn end_client_tcp(&mut self, legs: &TaskWakers) {
        let client = Leg::Client as usize;
        if !self.client_tcp_ended && !self.dead[client] && self.leg_done(Leg::Client) {
            self.client_tcp_ended = self.io[client]
                .poll_end(&mut legs.cx(Leg::Client))
                .is_ready();
        }
    }

    /// `woke`: the legs whose IO woke the task since the last poll.
    fn poll_relay(
        &mut self,
        cx: &mut TaskContext<'_>,
        legs: &TaskWakers,
        woke: [bool; 2],
    ) -> Poll<()> {
        let mut turn = self.legs_to_turn(woke);
        for _ in 0..REVISITS_PER_WAKE {
            self.revisit = false;
            let [client, backend] = [Leg::Client, Leg::Backend].map(|leg| {
                if turn[leg as usize] {
                    self.drive(leg, legs)
                } else {
                    Turn::Waiting
                }
            });
            self.account();
            if self.finished() {
                return Poll::Ready(());
            }
            self.end_client_tcp(legs);
            if client == Turn::Unfinished || backend == Turn::Unfinished {
                break;
            }
            if !self.revisit {
                return Poll::Pending;
            }
            turn = [true, true];
        }
        // More to read than one wake-up's share: yield to the worker's other tunnels.
        self.turn_both = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The legs a wake-up turns: each leg whose IO woke the task, and the other leg too
    /// when bytes wait toward one that woke (it may have become writable; the other leg's
    /// turn writes them). Both when the wake-up came from anywhere else.
    fn legs_to_turn(&mut self, woke: [bool; 2]) -> [bool; 2] {
        if std::mem::take(&mut self.turn_both) || woke == [false, false] {
            return [true, true];
        }
        let waits_toward = |leg: Leg| {
            !self.pending[leg as usize].is_empty() || !self.inject[leg as usize].is_empty()
        };
        [
            woke[0] || (woke[1] && waits_toward(Leg::Backend)),
            woke[1] || (woke[0] && waits_toward(Leg::Client)),
        ]
    }

    /// Brings the gateway-wide buffered count up to date (an atomic operation only when
    /// this tunnel's backlog changed, which happens only while a leg is slow), and notes
    /// since when each leg has had bytes waiting.
    fn account(&mut self) {
        if self.slow_consumer_timeout.is_some() {
            for i in 0..2 {
                match (self.pending[i].is_empty(), self.backlog_since[i]) {
                    (true, _) => self.backlog_since[i] = None,
                    (false, None) => self.backlog_since[i] = Some(Instant::now()),
                    (false, Some(_)) => {}
                }
            }
        }
        let now = self.pending[0].len() + self.pending[1].len();
        if now != self.accounted {
            if now > self.accounted {
                self.buffered
                    .fetch_add(now - self.accounted, Ordering::Relaxed);
            } else {
                self.buffered
                    .fetch_sub(self.accounted - now, Ordering::Relaxed);
            }
            self.accounted = now;
        }
    }

    /// The relay's next poll turns both legs. No wake-up is needed: the actor, whose
    /// handlers call this, runs in the relay's task, which polls the relay right after it.
    pub(super) fn turn_both_legs(&mut self) {
        self.turn_both = true;
    }

    /// Queues one of the gateway's own frames toward `leg` (masked toward the backend, as
    /// a client must).
    pub(super) fn inject_frame(&mut self, leg: Leg, opcode: u8, payload: &[u8]) {
        let i = leg as usize;
        if self.close_sent[i] || self.dead[leg as usize] {
            return;
        }
        if opcode == OP_CLOSE {
            self.close_sent[i] = true;
        }
        let mask = (leg == Leg::Backend).then(|| fastrand::u32(..).to_ne_bytes());
        self.revisit = true;
        self.inject[i].extend_from_slice(&wire::control_frame(opcode, payload, mask));
    }

    /// The gateway ends the tunnel: close frames to the legs that can take one, then wait
    /// for their replies at most [`CLOSE_TIMEOUT`].
    pub(super) fn end(&mut self, ending: Ending) {
        if self.aborting {
            return;
        }
        self.aborting = true;
        self.ending = Some(ending);
        tracing::debug!(client = %self.client_addr, route = %self.route,
            server = %self.lease.server().config, ?ending, "tunnel ending");
        let abort = ending.abort();
        for (leg, reason) in [
            (Leg::Client, abort.to_client),
            (Leg::Backend, abort.to_backend),
        ] {
            let i = leg as usize;
            // Toward this leg: finish the frame in flight, then nothing but our close.
            self.dirs[leg.other() as usize].cut();
            match reason {
                Some(reason) if !self.dead[i] && !self.eof[i] => {
                    let code: u16 = reason.code.into();
                    self.shared.metrics.close("gateway", Some(code));
                    if leg == Leg::Client {
                        self.first_close.get_or_insert(("gateway", Some(code)));
                    }
                    let text = reason.description.as_deref().unwrap_or("");
                    self.inject_frame(leg, OP_CLOSE, &wire::close_payload(code, text));
                }
                _ => self.eof[i] = true,
            }
        }
        // A leg that stopped answering or broke the protocol is failed (RFC 6455 §7.1.7):
        // it gets its close frame, but nobody waits for its reply.
        if let Ending::Silent(leg)
        | Ending::Protocol(leg)
        | Ending::TooBig(leg)
        | Ending::Slow(leg) = ending
        {
            self.eof[leg as usize] = true;
        }
        self.closing = true;
        self.turn_both_legs();
    }

    /// The access log line and the debug line of a tunnel that ended.
    pub(super) fn log_end(&self) {
        if self.access_log {
            let (closed_by, code) = self.first_close.unwrap_or(("none", None));
            tracing::info!(target: "wsgate::access",
                client = %self.client_addr, route = %self.route, server = %self.lease.server().config,
                duration_ms = self.started.elapsed().as_millis() as u64,
                frames_in = self.frames[0], bytes_in = self.bytes[0],
                frames_out = self.frames[1], bytes_out = self.bytes[1],
                close_code = code.map_or(0, u64::from), closed_by,
                permessage_deflate = self.dirs[0].compressed(),
                ending = ?self.ending, "tunnel");
        }
        tracing::debug!(client = %self.client_addr, route = %self.route,
            server = %self.lease.server().config, ending = ?self.ending, "tunnel closed");
    }
}

impl Drop for Core {
    /// Bytes that waited toward a leg no longer count against the gateway-wide limit.
    fn drop(&mut self) {
        self.buffered.fetch_sub(self.accounted, Ordering::Relaxed);
    }
}

/// The relay of one tunnel, as a future that also runs the tunnel's lifecycle `L` (the
/// actor's context): ready when the tunnel is over (both legs done, or the close deadline
/// passed) and the lifecycle, told so, finished too.
pub struct Relay<L> {
    core: Rc<RefCell<Core>>,
    /// Gone once it finished.
    lifecycle: Option<L>,
    /// Armed when the close handshake starts: the tunnel ends at the latest then. Boxed,
    /// only then: inline, every idle tunnel would carry the timer's 112 bytes.
    close_deadline: Option<Pin<Box<Sleep>>>,
    slow_deadline: [Option<SlowDeadline>; 2],
    /// Built at the first poll, for the task that polls the relay.
    wakers: Option<TaskWakers>,
}

/// Armed while bytes wait toward a leg and `slow_consumer = "close"` is set: the leg is
/// failed if the backlog that started at that instant is still there.
type SlowDeadline = (Pin<Box<Sleep>>, Instant);

impl<L: Future<Output = ()> + Unpin> Relay<L> {
    pub(super) fn new(core: Rc<RefCell<Core>>, lifecycle: L) -> Relay<L> {
        Relay {
            core,
            lifecycle: Some(lifecycle),
            close_deadline: None,
            slow_deadline: [None, None],
            wakers: None,
        }
    }
}

/// One write to a leg: `last` for the bytes before its TCP ends ([`Core::ends_after_write`]).
fn write(
    io: &mut Box<dyn Io>,
    cx: &mut TaskContext<'_>,
    buf: &[u8],
    last: bool,
) -> Poll<io::Result<usize>> {
    if last {
        io.poll_write_last(cx, buf)
    } else {
        Pin::new(io).poll_write(cx, buf)
    }
}

/// Polls the lifecycle with its own waker; drops it once it finished.
fn poll_lifecycle<L: Future<Output = ()> + Unpin>(lifecycle: &mut Option<L>, wakers: &TaskWakers) {
    if let Some(future) = lifecycle
        && Pin::new(future)
            .poll(&mut TaskContext::from_waker(&wakers.wakers[LIFECYCLE]))
            .is_ready()
    {
        *lifecycle = None;
    }
}

/// Arms, disarms and checks the slow-consumer deadlines; true if one failed a leg.
/// `timeout` is the tunnel's `slow_consumer_timeout`; the caller checks it is set, so a
/// tunnel without one makes no call per poll.
fn check_slow_legs(
    slow_deadline: &mut [Option<SlowDeadline>; 2],
    core: &mut Core,
    timeout: Duration,
    cx: &mut TaskContext<'_>,
) -> bool {
    let mut failed = false;
    for leg in [Leg::Client, Leg::Backend] {
        let i = leg as usize;
        let slot = &mut slow_deadline[i];
        match (core.backlog_since[i], &slot) {
            (None, _) => *slot = None,
            (Some(since), Some((_, armed))) if *armed == since => {}
            (Some(since), _) => {
                *slot = Some((
                    Box::pin(tokio::time::sleep_until((since + timeout).into())),
                    since,
                ));
            }
        }
        if let Some((deadline, _)) = slot
            && deadline.as_mut().poll(cx).is_ready()
        {
            *slot = None;
            core.end(Ending::Slow(leg));
            failed = true;
        }
    }
    failed
}

impl<L: Future<Output = ()> + Unpin> Future for Relay<L> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let Relay {
            core,
            lifecycle,
            close_deadline,
            slow_deadline,
            wakers,
        } = self.get_mut();
        let (wakers, [client, backend, lifecycle_woke]) = match wakers {
            Some(wakers) if wakers.wakes(cx.waker()) => {
                let woke = wakers.take_woke();
                (&*wakers, woke)
            }
            // First poll (which starts the lifecycle), or another task polls the relay
            // now: every part is polled again, registering the new wakers.
            _ => {
                core.borrow_mut().turn_both = true;
                (
                    &*wakers.insert(TaskWakers::new(cx.waker())),
                    [false, false, true],
                )
            }
        };
        // The lifecycle first: what it changes (pings queued, the tunnel ended) the relay
        // acts on in this same poll. Its handlers borrow the core themselves.
        if lifecycle_woke {
            poll_lifecycle(lifecycle, wakers);
        }
        let mut core = core.borrow_mut();
        let mut done = core.poll_relay(cx, wakers, [client, backend]).is_ready();
        if !done {
            if core.closing && close_deadline.is_none() {
                *close_deadline = Some(Box::pin(tokio::time::sleep(CLOSE_TIMEOUT)));
            }
            if let Some(deadline) = close_deadline
                && deadline.as_mut().poll(cx).is_ready()
            {
                tracing::debug!(client = %core.client_addr, "close handshake timed out");
                done = true;
            } else if let Some(timeout) = core.slow_consumer_timeout
                && check_slow_legs(slow_deadline, &mut core, timeout, cx)
            {
                // The failed leg's close frame goes out on the next poll.
                cx.waker().wake_by_ref();
            }
        }
        if !done {
            return Poll::Pending;
        }
        core.relay_done = true;
        drop(core);
        // The lifecycle sees the relay done and finishes now (the actor's access log line).
        poll_lifecycle(lifecycle, wakers);
        debug_assert!(lifecycle.is_none(), "the lifecycle outlived its relay");
        Poll::Ready(())
    }
}
