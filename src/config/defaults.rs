//! Every default of the configuration, each with the reason it has that value.

use std::time::Duration;

/// Time to open the TCP connection to a backend (nginx `proxy_connect_timeout`, also 5 s
/// there is 60 s): a backend that cannot accept within 5 s is better skipped for the next one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time for the backend to answer the WebSocket upgrade once connected; a healthy backend
/// answers in milliseconds, a wedged one should not hold the client for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for a plain HTTP backend to send its response head. 60 s like nginx
/// `proxy_read_timeout`, so long-polling transports (socket.io polls for 25 s) fit.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the gateway pings each leg of a tunnel. 20 s keeps NAT and L4 balancer
/// mappings alive (many drop idle flows after 30–60 s) at negligible cost.
pub const PING_INTERVAL: Duration = Duration::from_secs(20);

/// How long a leg may stay silent after a ping before it is declared dead. Half the ping
/// interval: a dead peer is found within 30 s, a slow but live one has 10 s to answer.
pub const PONG_TIMEOUT: Duration = Duration::from_secs(10);

/// Close a tunnel after this long without a data frame. Off (zero): heartbeats already find
/// dead peers, and cutting healthy idle sockets after 60 s is the nginx behaviour users fight.
pub const IDLE_TIMEOUT: Duration = Duration::ZERO;

/// Largest frame accepted on either leg. 16 MiB: Autobahn's largest cases and typical
/// file-over-WebSocket apps fit, while actix's 64 KiB default breaks ordinary apps.
pub const MAX_FRAME_SIZE: u64 = 16 * 1024 * 1024;

/// Largest message across continuation frames; the same reasoning as `MAX_FRAME_SIZE`.
pub const MAX_MESSAGE_SIZE: u64 = 16 * 1024 * 1024;

/// Frames queued toward one leg before the gateway stops reading from the other leg.
/// 1 MiB absorbs bursts without letting a slow reader pin much memory.
pub const MAX_BUFFER: u64 = 1024 * 1024;

/// Time a closing tunnel waits for the peer's Close reply before it drops both sockets.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Time graceful shutdown waits for tunnels to finish their close handshakes.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Tunnels to a server removed from its pool stay until they close by themselves (zero):
/// a reload never cuts users off unless the operator asks for it.
pub const DRAIN_TIMEOUT: Duration = Duration::ZERO;

/// Drained tunnels are closed all at once unless a spread is set.
pub const DRAIN_SPREAD: Duration = Duration::ZERO;

/// Editors write a file in several steps; events closer than this are one change.
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(100);

/// Points per unit of weight on the consistent-hash ring: nginx's value, so the ring is
/// the one nginx's `hash $remote_addr consistent` builds.
pub const KETAMA_POINTS_PER_WEIGHT: u32 = 160;

/// Weight of a server written without one.
pub const SERVER_WEIGHT: u32 = 1;

/// Tunnels the whole gateway holds at most (503 above it): a bound on memory and file
/// descriptors that a flood of upgrades cannot push past.
pub const MAX_CONNECTIONS: usize = 65_536;

/// Tunnels one client address may hold (429 above it); off, because whole offices and
/// mobile carriers share one address behind NAT.
pub const MAX_CONNECTIONS_PER_IP: usize = 0;

/// Time a client has to send its whole request head (nginx `client_header_timeout`): a
/// slowloris client trickling headers is answered 408 and dropped after this.
pub const CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connect failures within `FAIL_TIMEOUT` that take a server out (nginx `max_fails`).
pub const MAX_FAILS: u32 = 1;

/// The window for `MAX_FAILS` and how long a failed server stays out (nginx
/// `fail_timeout`).
pub const FAIL_TIMEOUT: Duration = Duration::from_secs(10);

/// Active health checks: how often each server is probed, and how long a probe may take.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Passes in a row that bring a server back, failures in a row that take it out (HAProxy's
/// defaults): one lost probe does not flap a server.
pub const HEALTH_RISE: u32 = 2;
pub const HEALTH_FALL: u32 = 3;

/// With `slow_consumer = "close"`: how long a leg may keep its buffer full.
pub const SLOW_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30);

/// The default configuration file, relative to the working directory.
pub const CONFIG_PATH: &str = "config/config.toml";
