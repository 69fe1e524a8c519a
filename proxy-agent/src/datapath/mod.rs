//! The kernel datapath: loading the eBPF object, pinning maps and links, and keeping the maps in
//! sync with the desired state.

pub mod loader;
pub mod maps;
pub mod reconcile;

pub use loader::{Datapath, DatapathError, L7Maps, cleanup};
pub use maps::{AyaMaps, LbMaps, MapError, MemMaps, dump};
pub use reconcile::{ApplyStats, Reconciler};
