//! The node-local L7 proxy: redirected pod connections are detected as HTTP/1.1, HTTP/2 or
//! opaque TCP; HTTP is balanced per request over pooled upstream connections with Istio's
//! retries, timeouts, outlier ejection, connection-pool limits and mirroring; upgrades and
//! opaque TCP are spliced to one backend.

pub mod body;
pub mod cluster;
pub mod config;
pub mod detect;
pub mod h1;
pub mod handler;
pub mod io;
pub mod limits;
pub mod pool;
pub mod record;
pub mod server;
pub mod tcp;
pub mod telemetry;
pub mod upgrade;
pub mod workers;

pub use config::{Registry, RouteTable};
pub use limits::ProxyConfig;
pub use server::{OrigDst, Proxy, serve};
