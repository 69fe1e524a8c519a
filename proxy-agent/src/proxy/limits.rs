//! The node proxy's own limits and timeouts: what protects it (and every pod on the node) from
//! one client. Per-Service traffic policy (retries, pools, ejection) is in `config`; these are
//! node-wide, set by `proxy-agent run` flags, with the defaults documented here.

use std::time::Duration;

/// Node-wide proxy settings (`proxy-agent run --proxy-*` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Downstream connections open at once; beyond it a new connection is closed at accept and
    /// counted (`--max-connections`, default 16384).
    pub max_connections: usize,
    /// Idle HTTP connections one client pod may hold; when a client with more opens another,
    /// its longest-idle HTTP connections are closed (GOAWAY / close; clients reconnect on
    /// demand). Busy and opaque connections are never shed (`--max-idle-per-client`, 512; an
    /// idle HTTP/2 connection costs about 22 KiB).
    pub max_idle_per_client: usize,
    /// How long the proxy waits for a client's first bytes before treating the connection as
    /// opaque TCP (server-first protocols); per Service `proxy-agent.io/detect-timeout`
    /// (`--detect-timeout`, 1s).
    pub detect_timeout: Duration,
    /// An HTTP/1 request head must arrive within this time of its first byte, or the
    /// connection is closed (slowloris; `--header-read-timeout`, 10s).
    pub header_read_timeout: Duration,
    /// An HTTP connection without a request in flight for this long is closed (HTTP/2:
    /// GOAWAY) (`--http-idle-timeout`, 5m).
    pub http_idle_timeout: Duration,
    /// An opaque TCP or upgraded (WebSocket, CONNECT) connection with no byte in either
    /// direction for this long is closed (`--stream-idle-timeout`, 1h).
    pub stream_idle_timeout: Duration,
    /// A pooled upstream HTTP/1.1 connection idle for this long is closed
    /// (`--pool-idle-timeout`, 90s; a DestinationRule's `http.idleTimeout` overrides).
    pub pool_idle_timeout: Duration,
    /// Idle pooled upstream connections kept per backend and proxy worker (`--pool-max-idle`,
    /// 64).
    pub pool_max_idle: usize,
    /// Append the client pod's IP to `x-forwarded-for` (`--x-forwarded-for`, true). Through
    /// the proxy a backend sees the node IP as the source, not the pod IP as under kube-proxy.
    pub x_forwarded_for: bool,
    /// On SIGTERM the proxy stops accepting and lets requests in flight and busy keep-alive
    /// connections finish for at most this long, then exits (`--drain-timeout`, 30s; keep it
    /// below the DaemonSet's `terminationGracePeriodSeconds`).
    pub drain_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_idle_per_client: 512,
            detect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(300),
            stream_idle_timeout: Duration::from_secs(3600),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle: 64,
            x_forwarded_for: true,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Largest HTTP/1 request head (request line and headers); larger ones get 431. More than 100
/// headers (hyper's default, which keeps the header index on the stack) also get 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// HTTP/2: concurrent streams per downstream connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 1024;
/// HTTP/2: streams the client may reset before the proxy accepted them, before GOAWAY
/// (CVE-2023-44487, rapid reset).
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// HTTP/2: streams the proxy may reset for protocol errors, before GOAWAY.
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
/// HTTP/2: largest decoded header list (also bounds CONTINUATION floods).
pub const H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// HTTP/2: keep-alive PING interval on downstream connections.
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// HTTP/2: a keep-alive PING not answered within this closes the connection.
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2: non-ACK PING and SETTINGS frames a client may send per [`H2_CONTROL_WINDOW`]
/// before its connection is closed with GOAWAY (ping/settings floods).
pub const H2_CONTROL_FRAME_BUDGET: u32 = 1000;
/// HTTP/2: the window of [`H2_CONTROL_FRAME_BUDGET`].
pub const H2_CONTROL_WINDOW: Duration = Duration::from_secs(10);
/// HTTP/2: once a connection opened this many streams, it is closed with GOAWAY when more than
/// half of them were reset by the client before the proxy answered (rapid reset).
pub const H2_PREMATURE_RESET_MIN_STREAMS: u64 = 100;
/// After a GOAWAY for abuse, the connection is dropped this long later at most.
pub const GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// After a GOAWAY to an idle connection (nothing in flight), it is dropped this long later.
pub const GOAWAY_IDLE_GRACE: Duration = Duration::from_millis(10);
/// While draining, an HTTP/1 connection idle this long is closed (one that is busy gets
/// `Connection: close` on its next response instead).
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);
/// While draining, the listeners keep accepting this long after the proxy left the redirect
/// map (connects the datapath sent before that are still arriving), then close.
pub const DRAIN_ACCEPT_LINGER: Duration = Duration::from_millis(250);
/// First pause after a failed accept (EMFILE, ENFILE, ENOBUFS); doubles up to
/// [`ACCEPT_BACKOFF_MAX`] while accepts keep failing.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(1);
/// Longest pause between failed accepts.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Repeated warnings (accept failures, rejected connections) are logged at most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(1);

pub use crate::ratelog::RateLimitedLog;
/// Connect attempts for one opaque TCP connection (each to a different backend when possible).
pub const OPAQUE_CONNECT_ATTEMPTS: u32 = 3;

/// Raises this process's open-file soft limit to its hard limit (every proxied connection
/// holds two descriptors); returns the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}
