//! The node-local L7 proxy: HTTP/1.1 and HTTP/2 from redirected pod connections, balanced per
//! request over pooled upstream connections, with Istio's retries, timeouts, outlier ejection,
//! connection-pool limits and mirroring.

pub mod body;
pub mod cluster;
pub mod config;
pub mod handler;
pub mod pool;
pub mod server;

pub use config::{Registry, RouteTable};
pub use server::{OrigDst, serve};
