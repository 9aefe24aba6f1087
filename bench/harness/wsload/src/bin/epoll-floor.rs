//! epoll-floor: the least a frame-checking WebSocket relay can cost without an async
//! runtime, to measure how far a relay on its own event loop could go beside nginx.
//!
//! One thread, one edge-triggered epoll, plain `recv`/`send` calls (through socket2's
//! `Socket`, which owns each descriptor), nginx's shape: the listening socket
//! level-triggered with one `accept4` per event, both legs registered once for
//! reading and writing, no `epoll_ctl` after that, `close` without deregistering. Each
//! direction's bytes pass through as they came, after the HTTP head, checked frame by
//! frame as wsgate's relay checks them (FIN with text or binary, the MASK bit the leg
//! must set, a 7- or 16-bit length; other frames by their header): the same loop as
//! wsgate's `whole_message_run`, and a header split over two reads carried to the next.
//!
//! With `--nested` the same relay loop runs inside tokio's current-thread runtime, as it
//! would inside a wsgate worker (module `on_tokio`): tokio accepts and dials, then the
//! sockets move to the relay's epoll, which tokio watches. With `--threaded` tokio
//! accepts and dials the same way and hands the sockets to a relay thread that blocks in
//! its own `epoll_wait`.
//!
//! It is not a gateway: no routing, limits, heartbeats, close codes or timeouts. A frame
//! that breaks a rule ends the connection without a close frame.
//!
//!   epoll-floor [--nested | --threaded] --listen 127.0.0.1:8097 --backends 127.0.0.1:9001,127.0.0.1:9002
//!   bench/run.sh "epoll-floor=bench/harness/wsload/target/release/epoll-floor --listen 127.0.0.1:{PORT} --backends {BACKENDS},8097"

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};

use clap::Parser;
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Parser, Debug)]
#[command(about = "A frame-checking WebSocket relay on one raw epoll loop (a relay's floor)")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Backends, comma-separated, taken in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    backends: Vec<SocketAddr>,
    /// Run the relay loop nested in tokio, as it would run inside a wsgate worker: the
    /// connections are accepted and dialled on tokio's current-thread runtime (registered
    /// with its reactor, as a handshake leaves them), then moved to the relay's own epoll,
    /// whose descriptor tokio watches; one task drains it when it is readable.
    #[arg(long)]
    nested: bool,
    /// Run the relay loop on a thread of its own beside tokio's: tokio accepts and dials
    /// on the main thread and hands each connection's sockets over (a channel and an
    /// `eventfd`); the relay thread blocks in its own `epoll_wait`.
    #[arg(long, conflicts_with = "nested")]
    threaded: bool,
}

/// The epoll token of the loop's own descriptor: the listening socket, or with
/// `--threaded` the hand-over `eventfd`. A leg's token is its slot plus one.
const OWN: u64 = 0;
/// Bytes read per `recv`, as wsgate's relay reads.
const READ_CHUNK: usize = 16 * 1024;
/// A leg stops being read while this much waits toward its peer.
const MAX_PENDING: usize = 1 << 20;
const MAX_PAYLOAD: u64 = 64 * 1024 * 1024;

const FIN: u8 = 0x80;
const RSV: u8 = 0x70;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const MASKED: u8 = 0x80;

/// What one direction has seen of its byte stream.
#[derive(Default)]
struct Frames {
    /// The HTTP head is over (its `\r\n\r\n` seen); `head_tail` counts the bytes of that
    /// terminator matched so far.
    head_done: bool,
    head_tail: u8,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// A frame header split over reads.
    carry: [u8; 14],
    carry_len: usize,
}

/// The length of a frame header whose second byte is `b1` (the MASK bit and the length
/// code).
fn header_len(b1: u8) -> usize {
    let mask = if b1 & MASKED != 0 { 4 } else { 0 };
    mask + match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    }
}

impl Frames {
    /// Checks `data`, the next bytes of this direction; false if a frame breaks a rule.
    fn check(&mut self, mut data: &[u8], masked_leg: bool) -> bool {
        if !self.head_done {
            for (i, &b) in data.iter().enumerate() {
                let want = b"\r\n\r\n"[usize::from(self.head_tail)];
                self.head_tail = if b == want {
                    self.head_tail + 1
                } else {
                    u8::from(b == b'\r')
                };
                if self.head_tail == 4 {
                    self.head_done = true;
                    data = &data[i + 1..];
                    break;
                }
            }
            if !self.head_done {
                return true;
            }
        }
        while !data.is_empty() {
            if self.left > 0 {
                let take = self.left.min(data.len() as u64);
                self.left -= take;
                data = &data[take as usize..];
                continue;
            }
            if self.carry_len > 0 {
                let have = self.carry_len;
                let need = if have >= 2 {
                    header_len(self.carry[1])
                } else {
                    2
                };
                let take = (need - have).min(data.len());
                self.carry[have..have + take].copy_from_slice(&data[..take]);
                self.carry_len += take;
                data = &data[take..];
                if self.carry_len == 2 && header_len(self.carry[1]) > 2 {
                    continue;
                }
                if self.carry_len < need {
                    return true;
                }
                let carry = self.carry;
                self.carry_len = 0;
                match header(&carry[..need], masked_leg) {
                    Some((_, payload)) => self.left = payload,
                    None => return false,
                }
                continue;
            }
            data = if masked_leg {
                whole_message_run::<true>(data)
            } else {
                whole_message_run::<false>(data)
            };
            if data.is_empty() {
                break;
            }
            if data.len() < 2 || data.len() < header_len(data[1]) {
                self.carry[..data.len()].copy_from_slice(data);
                self.carry_len = data.len();
                return true;
            }
            match header(data, masked_leg) {
                Some((len, payload)) => {
                    self.left = payload;
                    data = &data[len..];
                }
                None => return false,
            }
        }
        true
    }
}

/// A whole header at the start of `data`: its length and its payload's, if it keeps the
/// rules (no RSV bits, the leg's MASK bit, a known opcode, control frames short and whole).
fn header(data: &[u8], masked_leg: bool) -> Option<(usize, u64)> {
    let (b0, b1) = (data[0], data[1]);
    let opcode = b0 & 0x0f;
    if b0 & RSV != 0 || (b1 & MASKED != 0) != masked_leg || matches!(opcode, 3..=7 | 0xb..) {
        return None;
    }
    let len = header_len(b1);
    let payload = match b1 & 0x7f {
        126 => u64::from(u16::from_be_bytes([data[2], data[3]])),
        127 => u64::from_be_bytes(data[2..10].try_into().ok()?),
        short => u64::from(short),
    };
    let control = opcode >= 8;
    if payload > MAX_PAYLOAD || (control && (payload > 125 || b0 & FIN == 0)) {
        return None;
    }
    Some((len, payload))
}

/// wsgate's loop over whole single-frame text or binary messages; returns what follows
/// the run.
fn whole_message_run<const MASKED_LEG: bool>(data: &[u8]) -> &[u8] {
    let (mask_bit, header_len) = if MASKED_LEG { (MASKED, 2 + 4) } else { (0, 2) };
    let mut rest = data;
    while let [b0, b1, after @ ..] = rest {
        if b0.wrapping_sub(FIN | OP_TEXT) > OP_BINARY - OP_TEXT {
            break;
        }
        let short = b1.wrapping_sub(mask_bit);
        let whole = if short <= 125 {
            header_len + usize::from(short)
        } else if let (126, [hi, lo, ..]) = (short, after) {
            header_len + 2 + usize::from(u16::from_be_bytes([*hi, *lo]))
        } else {
            break;
        };
        let Some(next) = rest.get(whole..) else {
            break;
        };
        rest = next;
    }
    rest
}

/// One side of a tunnel: its socket (closed when the leg is dropped, without
/// `EPOLL_CTL_DEL`: closing removes it), what it has sent (checked), what waits toward it.
struct Leg {
    socket: Socket,
    peer: usize,
    /// Clients mask their frames.
    masked: bool,
    frames: Frames,
    pending: Vec<u8>,
    read_eof: bool,
    /// Its peer's EOF was passed on (`shutdown(SHUT_WR)`).
    write_shut: bool,
    /// Not read while its peer has `MAX_PENDING` waiting.
    throttled: bool,
}

struct Floor {
    epoll: RawFd,
    legs: Vec<Option<Leg>>,
    free: Vec<usize>,
    /// Slots closed in this batch of events, free after it (a later event of the batch
    /// may name them).
    closed: Vec<usize>,
    buf: Vec<u8>,
}

/// A non-blocking socket with Nagle off, its connect to `backend` started.
fn dial(backend: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&backend.into()) {
        Err(err) if err.raw_os_error() != Some(libc::EINPROGRESS) => Err(err),
        _ => Ok(socket),
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Sends what the socket takes of `bytes` now: 0 when it takes nothing (`EAGAIN`).
fn send_some(socket: &Socket, bytes: &[u8]) -> io::Result<usize> {
    match socket.send_with_flags(bytes, libc::MSG_NOSIGNAL) {
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(0),
        sent => sent,
    }
}

impl Floor {
    fn new() -> io::Result<Floor> {
        Ok(Floor {
            epoll: check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?,
            legs: Vec::new(),
            free: Vec::new(),
            closed: Vec::new(),
            buf: vec![0; READ_CHUNK],
        })
    }

    /// Handles up to `events.len()` ready events, waiting at most `timeout_ms`; returns
    /// how many there were. `on_own` takes the events of the loop's own descriptor
    /// ([`OWN`]).
    fn turn(
        &mut self,
        events: &mut [libc::epoll_event],
        timeout_ms: libc::c_int,
        mut on_own: impl FnMut(&mut Floor),
    ) -> io::Result<usize> {
        let n = unsafe {
            libc::epoll_wait(
                self.epoll,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::EINTR) {
                Ok(0)
            } else {
                Err(err)
            };
        }
        for event in &events[..n as usize] {
            let (token, bits) = (event.u64, event.events);
            if token == OWN {
                on_own(self);
            } else {
                self.event(token as usize - 1, bits);
            }
        }
        self.free.append(&mut self.closed);
        Ok(n as usize)
    }

    fn register(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        check(unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) })?;
        Ok(())
    }

    fn slot(&mut self, leg: Leg) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.legs[i] = Some(leg);
                i
            }
            None => {
                self.legs.push(Some(leg));
                self.legs.len() - 1
            }
        }
    }

    /// Accepts one client and starts connecting it to `backend`.
    fn accept(&mut self, listener: &Socket, backend: SocketAddr) {
        let Ok((client, _)) = listener.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) else {
            return;
        };
        let Ok(server) = dial(backend) else {
            return;
        };
        let _ = client.set_tcp_nodelay(true);
        self.add(client, server);
    }

    /// Takes over a client's and its backend's sockets (non-blocking, the backend's
    /// connect started) as one tunnel.
    fn add(&mut self, client: Socket, server: Socket) {
        let (client_fd, server_fd) = (client.as_raw_fd(), server.as_raw_fd());
        let leg = |socket, masked| Leg {
            socket,
            peer: 0,
            masked,
            frames: Frames::default(),
            pending: Vec::new(),
            read_eof: false,
            write_shut: false,
            throttled: false,
        };
        let c = self.slot(leg(client, true));
        let s = self.slot(leg(server, false));
        self.leg(c).peer = s;
        self.leg(s).peer = c;
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if self.register(client_fd, c as u64 + 1, events).is_err()
            || self.register(server_fd, s as u64 + 1, events).is_err()
        {
            self.close(c);
        }
    }

    fn leg(&mut self, i: usize) -> &mut Leg {
        self.legs[i].as_mut().expect("a live leg")
    }

    /// Closes both legs of `i`'s tunnel.
    fn close(&mut self, i: usize) {
        for j in [i, self.leg(i).peer] {
            if self.legs[j].take().is_some() {
                self.closed.push(j);
            }
        }
    }

    /// Sends what waits toward `i`; false if the leg failed.
    fn flush(&mut self, i: usize) -> bool {
        let leg = self.leg(i);
        let mut sent = 0;
        while sent < leg.pending.len() {
            match send_some(&leg.socket, &leg.pending[sent..]) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(_) => return false,
            }
        }
        leg.pending.drain(..sent);
        true
    }

    /// Reads leg `i` until it has nothing more (or its peer is backed up), checking and
    /// passing on what it reads; false if the tunnel is over. `eof_pending`: the event
    /// said the peer ended (`EPOLLRDHUP`), so a short read is not the end: the EOF behind
    /// it comes with no further edge (nginx's `pending_eof`).
    fn read(&mut self, i: usize, eof_pending: bool) -> bool {
        loop {
            let peer = self.leg(i).peer;
            if self.leg(peer).pending.len() >= MAX_PENDING {
                self.leg(i).throttled = true;
                return true;
            }
            let Floor { legs, buf, .. } = &mut *self;
            let read = legs[i].as_ref().map(|leg| (&leg.socket).read(buf));
            let n = match read.expect("a live leg") {
                Ok(0) => {
                    self.leg(i).read_eof = true;
                    return self.pass_eof(i);
                }
                Ok(n) => n,
                Err(err) => return err.kind() == io::ErrorKind::WouldBlock,
            };
            let buf = std::mem::take(&mut self.buf);
            let ok = self.forward(i, peer, &buf[..n]);
            self.buf = buf;
            if !ok {
                return false;
            }
            if n < READ_CHUNK && !eof_pending {
                // A short read: the socket is drained, as nginx assumes (edge-triggered,
                // the next edge comes with the next bytes).
                return true;
            }
        }
    }

    /// Checks `data` read from `from` and sends it to `to`, queueing what the socket
    /// does not take.
    fn forward(&mut self, from: usize, to: usize, data: &[u8]) -> bool {
        let leg = self.leg(from);
        let masked = leg.masked;
        if !leg.frames.check(data, masked) {
            return false;
        }
        let out = self.leg(to);
        if !out.pending.is_empty() {
            out.pending.extend_from_slice(data);
            return true;
        }
        let Ok(sent) = send_some(&out.socket, data) else {
            return false;
        };
        out.pending.extend_from_slice(&data[sent..]);
        true
    }

    /// Passes `i`'s EOF on once what waits toward its peer is sent; false when both
    /// directions are over.
    fn pass_eof(&mut self, i: usize) -> bool {
        let peer = self.leg(i).peer;
        let (eof, out) = (self.leg(i).read_eof, self.leg(peer));
        if eof && out.pending.is_empty() && !out.write_shut {
            out.write_shut = true;
            let _ = out.socket.shutdown(Shutdown::Write);
        }
        !(self.leg(i).read_eof
            && self.leg(peer).read_eof
            && self.leg(i).write_shut
            && self.leg(peer).write_shut)
    }

    fn event(&mut self, i: usize, events: u32) {
        if self.legs.get(i).is_none_or(Option::is_none) {
            return;
        }
        let peer = self.leg(i).peer;
        let failed = events & libc::EPOLLERR as u32 != 0;
        let mut alive = !failed;
        if alive && events & libc::EPOLLOUT as u32 != 0 && !self.leg(i).pending.is_empty() {
            alive = self.flush(i);
            if alive && self.leg(i).pending.is_empty() {
                alive = self.pass_eof(peer);
                if alive && std::mem::take(&mut self.leg(peer).throttled) {
                    alive = self.read(peer, false);
                }
            }
        }
        if alive
            && events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0
            && !self.leg(i).read_eof
        {
            let eof_pending = events & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0;
            alive = self.read(i, eof_pending);
        }
        if !alive {
            self.close(i);
        }
    }
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    if args.nested || args.threaded {
        return on_tokio::run(args);
    }
    let listener = Socket::from(TcpListener::bind(args.listen)?);
    listener.set_nonblocking(true)?;
    let mut floor = Floor::new()?;
    // Level-triggered, one accept per event, as nginx without `multi_accept`.
    floor.register(listener.as_raw_fd(), OWN, libc::EPOLLIN as u32)?;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut backends = args.backends.iter().copied().cycle();
    loop {
        floor.turn(&mut events, -1, |floor| {
            if let Some(backend) = backends.next() {
                floor.accept(&listener, backend);
            }
        })?;
    }
}

/// `--nested` and `--threaded`: tokio accepts and dials, as a wsgate worker's handshake
/// does, and hands the sockets to the relay loop, inside tokio or on a thread of its own.
mod on_tokio {
    use std::cell::RefCell;
    use std::os::fd::{AsRawFd, RawFd};
    use std::rc::Rc;
    use std::sync::mpsc;

    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;
    use tokio::net::{TcpListener, TcpStream};

    use super::{check, io, Args, Floor, Socket, OWN};

    /// The relay's epoll descriptor, as tokio's reactor watches it.
    struct EpollFd(RawFd);

    impl AsRawFd for EpollFd {
        fn as_raw_fd(&self) -> RawFd {
            self.0
        }
    }

    pub fn run(args: Args) -> io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let hand_over: Box<dyn Fn(Socket, Socket)> = if args.threaded {
                let wake =
                    check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
                let (handed, taken) = mpsc::channel::<(Socket, Socket)>();
                std::thread::spawn(move || relay_thread(wake, taken));
                Box::new(move |client, server| {
                    if handed.send((client, server)).is_ok() {
                        let one = 1u64;
                        unsafe { libc::write(wake, &one as *const u64 as *const libc::c_void, 8) };
                    }
                })
            } else {
                let floor = Rc::new(RefCell::new(Floor::new()?));
                // SAFETY: the descriptor is the floor's epoll, open for the whole run.
                let watched = unsafe {
                    AsyncFd::register_with_interest(
                        EpollFd(floor.borrow().epoll),
                        Interest::READABLE,
                    )?
                };
                let relay = Rc::clone(&floor);
                tokio::task::spawn_local(async move {
                    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
                    loop {
                        let Ok(mut ready) = watched.readable().await else {
                            return;
                        };
                        // Fewer events than room for them: the ready list is empty now. A
                        // later event re-arms tokio's readiness past this clear (its tick).
                        match relay.borrow_mut().turn(&mut events, 0, |_| {}) {
                            Ok(n) if n < events.len() => ready.clear_ready(),
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                });
                Box::new(move |client, server| floor.borrow_mut().add(client, server))
            };
            let hand_over = Rc::new(hand_over);
            let listener = TcpListener::bind(args.listen).await?;
            let mut backends = args.backends.iter().copied().cycle();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let Some(backend) = backends.next() else {
                    continue;
                };
                let hand_over = Rc::clone(&hand_over);
                tokio::task::spawn_local(async move {
                    let _ = client.set_nodelay(true);
                    let Ok(server) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    // Leaving tokio's reactor deregisters each socket (one epoll_ctl).
                    let (Ok(client), Ok(server)) = (client.into_std(), server.into_std()) else {
                        return;
                    };
                    hand_over(Socket::from(client), Socket::from(server));
                });
            }
        })
    }

    /// `--threaded`: the relay's own loop, blocking in its `epoll_wait`; the hand-over
    /// `eventfd` wakes it for new connections.
    fn relay_thread(wake: RawFd, taken: mpsc::Receiver<(Socket, Socket)>) {
        let Ok(mut floor) = Floor::new() else {
            return;
        };
        let edge = (libc::EPOLLIN | libc::EPOLLET) as u32;
        if floor.register(wake, OWN, edge).is_err() {
            return;
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        let take_handed = |floor: &mut Floor| {
            let mut count = 0u64;
            unsafe { libc::read(wake, &mut count as *mut u64 as *mut libc::c_void, 8) };
            while let Ok((client, server)) = taken.try_recv() {
                floor.add(client, server);
            }
        };
        while floor.turn(&mut events, -1, take_handed).is_ok() {}
    }
}
