//! The live monitor: socket translations from the eBPF programs, interleaved with the proxy's
//! request events. The kernel writes events only while a reader is attached: the first reader
//! turns the datapath's switch on, the last one to leave turns it off, so an idle monitor costs
//! nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use proxy_common::TraceEvent;
use serde::Serialize;
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::datapath::telemetry::{self, Monitor};
use crate::proxy::telemetry::{RequestEvent, Tap, TapReader};

struct Inner {
    kernel: Mutex<Option<Monitor>>,
    tx: broadcast::Sender<TraceEvent>,
    readers: AtomicUsize,
    reading: AtomicBool,
}

/// Fan-out of kernel and proxy events to monitor readers.
pub struct MonitorHub {
    inner: Arc<Inner>,
    tap: Arc<Tap>,
}

impl MonitorHub {
    /// A hub for the proxy's `tap`; kernel events start once the datapath is attached.
    pub fn new(tap: Arc<Tap>) -> Self {
        Self {
            inner: Arc::new(Inner {
                kernel: Mutex::new(None),
                tx: broadcast::channel(8192).0,
                readers: AtomicUsize::new(0),
                reading: AtomicBool::new(false),
            }),
            tap,
        }
    }

    /// Hands over the datapath's monitor maps.
    pub fn attach_kernel(&self, m: Monitor) {
        if let Ok(mut k) = self.inner.kernel.lock() {
            *k = Some(m);
        }
    }

    /// Attaches a reader; the kernel writes events until every reader is gone. Must be called
    /// from a tokio runtime (the ring buffer reader runs there).
    pub fn subscribe(&self) -> MonitorReader {
        let kernel = self.inner.tx.subscribe();
        if self.inner.readers.fetch_add(1, Relaxed) == 0 {
            self.switch(true);
        }
        self.start_reading();
        MonitorReader {
            kernel,
            l7: self.tap.subscribe(),
            inner: self.inner.clone(),
        }
    }

    fn switch(&self, on: bool) {
        switch(&self.inner, on);
    }

    fn start_reading(&self) {
        if self.inner.reading.swap(true, Relaxed) {
            return;
        }
        let ring = self
            .inner
            .kernel
            .lock()
            .ok()
            .and_then(|mut k| k.as_mut().and_then(Monitor::take_ring));
        let Some(ring) = ring else {
            self.inner.reading.store(false, Relaxed);
            return;
        };
        let tx = self.inner.tx.clone();
        tokio::spawn(async move {
            // SAFETY: the ring buffer owns its map fd until it is dropped, which only happens
            // with the AsyncFd that owns the ring buffer.
            let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(ring) } {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(error = %e, "cannot poll the monitor ring buffer");
                    return;
                }
            };
            loop {
                let mut guard = match fd.readable_mut().await {
                    Ok(g) => g,
                    Err(e) => {
                        warn!(error = %e, "monitor ring buffer failed");
                        return;
                    }
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(ev) = telemetry::decode(&item) {
                        let _ = tx.send(ev);
                    }
                }
                guard.clear_ready();
            }
        });
    }
}

fn switch(inner: &Inner, on: bool) {
    if let Ok(mut k) = inner.kernel.lock()
        && let Some(m) = k.as_mut()
        && let Err(e) = m.set_enabled(on)
    {
        warn!(error = %e, on, "cannot switch the datapath monitor");
    } else {
        debug!(on, "datapath monitor switched");
    }
}

/// One attached monitor reader.
pub struct MonitorReader {
    /// Socket translations.
    pub kernel: broadcast::Receiver<TraceEvent>,
    /// Proxy request events.
    pub l7: TapReader,
    inner: Arc<Inner>,
}

impl Drop for MonitorReader {
    fn drop(&mut self) {
        if self.inner.readers.fetch_sub(1, Relaxed) == 1 {
            switch(&self.inner, false);
        }
    }
}

/// A monitor line, kernel or proxy.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum MonitorEvent {
    /// A socket translation (`trace`) or refusal (`drop`).
    Trace(KernelEvent),
    /// A request through the proxy.
    L7(RequestEvent),
}

/// A socket translation, decoded.
#[derive(Clone, Debug, Serialize)]
pub struct KernelEvent {
    /// Wall clock, RFC 3339.
    pub time: String,
    /// The hook (`connect4`, `recvmsg4`, ...).
    pub hook: &'static str,
    /// `translated`, `l7-redirect`, `l7-fallback`, `refused`, `proxy-port-refused`, `reversed`.
    pub verdict: &'static str,
    /// `TCP` or `UDP`.
    pub proto: &'static str,
    /// What the application used.
    pub from: String,
    /// What the socket got.
    pub to: String,
    /// The Service (`namespace/name`), when known.
    pub service: String,
    /// Caller's process id and command.
    pub pid: u32,
    /// Caller's command name.
    pub comm: String,
    /// Socket cookie.
    pub cookie: u64,
    /// Network namespace cookie (one per pod).
    pub netns_cookie: u64,
    /// North-south events: the client outside the node.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub client: String,
}

const HOOKS: [&str; 10] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    "tc-ingress",
    "tc-egress",
];
const VERDICTS: [&str; 10] = [
    "translated",
    "l7-redirect",
    "l7-fallback",
    "refused",
    "proxy-port-refused",
    "reversed",
    "nodeport-local",
    "nodeport-snat",
    "nodeport-refused-no-backend",
    "nodeport-refused-source-range",
];

fn addr(a_be: u32, p_be: u16) -> String {
    format!(
        "{}:{}",
        std::net::Ipv4Addr::from(u32::from_be(a_be)),
        u16::from_be(p_be)
    )
}

/// Decodes a kernel event; `service` names the Service of a ClusterIP:port.
pub fn kernel_event(ev: &TraceEvent, service: impl Fn(&str) -> Option<String>) -> KernelEvent {
    let (from, to) = if ev.family == 6 {
        let at = |w: [u32; 4], p_be: u16| {
            std::net::SocketAddr::new(
                crate::datapath::maps::from_words(w).into(),
                u16::from_be(p_be),
            )
            .to_string()
        };
        (
            at(ev.orig_addr6_be, ev.orig_port_be),
            at(ev.new_addr6_be, ev.new_port_be),
        )
    } else {
        (
            addr(ev.orig_addr_be, ev.orig_port_be),
            addr(ev.new_addr_be, ev.new_port_be),
        )
    };
    // For reverse translations the ClusterIP is where the socket's peer went back to.
    let vip = if ev.verdict == proxy_common::VERDICT_REVERSED {
        &to
    } else {
        &from
    };
    let comm_len = ev
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(ev.comm.len());
    KernelEvent {
        time: wall_of_ktime(ev.ts_ns),
        hook: HOOKS.get(ev.hook as usize).copied().unwrap_or("?"),
        verdict: VERDICTS.get(ev.verdict as usize).copied().unwrap_or("?"),
        proto: if ev.proto == proxy_common::PROTO_UDP {
            "UDP"
        } else {
            "TCP"
        },
        service: service(vip).unwrap_or_else(|| "-".into()),
        from,
        to,
        pid: ev.pid,
        comm: String::from_utf8_lossy(&ev.comm[..comm_len]).into_owned(),
        cookie: ev.cookie,
        netns_cookie: ev.netns_cookie,
        client: if ev.client_addr_be == 0 {
            String::new()
        } else {
            std::net::Ipv4Addr::from(u32::from_be(ev.client_addr_be)).to_string()
        },
    }
}

/// The wall-clock time of a `bpf_ktime_get_ns` (CLOCK_MONOTONIC) timestamp.
fn wall_of_ktime(ts_ns: u64) -> String {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let mono = if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) } == 0 {
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    } else {
        ts_ns
    };
    let ago = std::time::Duration::from_nanos(mono.saturating_sub(ts_ns));
    let wall = std::time::SystemTime::now() - ago;
    jiff::Timestamp::try_from(wall).map_or_else(|_| "-".into(), |t| t.to_string())
}

impl MonitorEvent {
    /// Which `-t` filter shows it: `trace`, `drop` or `l7`.
    pub fn category(&self) -> &'static str {
        match self {
            MonitorEvent::Trace(k) if k.verdict.contains("refused") => "drop",
            MonitorEvent::Trace(_) => "trace",
            MonitorEvent::L7(_) => "l7",
        }
    }
}
