//! The kernel datapath: loading the eBPF object, pinning maps and links, and keeping the maps in
//! sync with the desired state.

pub mod loader;
pub mod maps;
pub mod reconcile;

pub use loader::{cleanup, Datapath, DatapathError};
pub use maps::{dump, AyaMaps, LbMaps, MapError, MemMaps};
pub use reconcile::{ApplyStats, Reconciler};
