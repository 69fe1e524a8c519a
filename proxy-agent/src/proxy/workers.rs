//! The proxy's worker threads: one single-threaded runtime per core, each accepting on its own
//! `SO_REUSEPORT` listener, so a connection, its requests and its upstream connections live on
//! one thread (nginx's and Envoy's model: no work stealing, no cross-thread wakeups). Upstream
//! pools are kept per worker for the same reason. The agent's own work runs elsewhere.

use std::cell::Cell;
use std::net::SocketAddrV4;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use anyhow::Context as _;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

static COUNT: AtomicUsize = AtomicUsize::new(1);

/// Index of the worker running the caller (0 outside workers).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Number of workers (1 until the workers start).
pub fn count() -> usize {
    COUNT.load(Relaxed)
}

/// Running worker threads.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Workers({})", self.handles.len())
    }
}

impl Workers {
    /// Starts `n` workers.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let n = n.max(1);
        COUNT.store(n, Relaxed);
        let mut w = Self {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a proxy worker runtime")?;
            w.handles.push(rt.handle().clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            w.stops.push(tx);
            let t = std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    WORKER.with(|c| c.set(i));
                    rt.block_on(async {
                        let _ = rx.await;
                    });
                    rt.shutdown_background();
                })
                .context("starting a proxy worker thread")?;
            w.threads.push(t);
        }
        Ok(w)
    }

    /// The workers' runtimes.
    pub fn handles(&self) -> &[tokio::runtime::Handle] {
        &self.handles
    }

    /// Stops the workers (their connections are dropped).
    pub fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// `n` listeners on `addr` in one `SO_REUSEPORT` group: the kernel spreads new connections
/// over them (and over those of another agent taking over the node).
pub fn listeners(addr: SocketAddrV4, n: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    (0..n.max(1))
        .map(|_| {
            reuseport_listener(addr.into(), 4096).with_context(|| {
                format!("binding the L7 proxy to {addr} (is --node-ip an address of this node, and the port free?)")
            })
        })
        .collect()
}

/// A non-blocking listener on `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`: a second agent
/// on the node (a surge rollout) can listen next to this one.
pub fn reuseport_listener(
    addr: std::net::SocketAddr,
    backlog: i32,
) -> anyhow::Result<std::net::TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt,
        socket, sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a listening socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    setsockopt(&fd, sockopt::ReusePort, &true).context("SO_REUSEPORT")?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .with_context(|| format!("binding {addr}"))?;
    listen(&fd, Backlog::new(backlog).unwrap_or(Backlog::MAXCONN)).context("listen")?;
    Ok(std::net::TcpListener::from(fd))
}
