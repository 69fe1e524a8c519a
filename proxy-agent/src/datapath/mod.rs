//! The kernel datapath: loading the eBPF object, pinning maps and links, keeping the maps in
//! sync with the desired state, the L7 redirect maps, and the datapath's own telemetry.

pub mod devices;
pub mod l7;
pub mod loader;
pub mod maps;
pub mod reconcile;
pub mod sockets;
pub mod telemetry;

pub use l7::{L7Maps, MapOrigDst, Publication};
pub use loader::{Datapath, DatapathError, Opened, cleanup};
pub use maps::{AyaMaps, LbMaps, MapError, MemMaps, dump};
pub use reconcile::{ApplyStats, Reconciler};
