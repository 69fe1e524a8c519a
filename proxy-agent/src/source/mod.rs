//! Where the desired state comes from: a directory of Kubernetes YAML ([`dir`]) or the API
//! server ([`kube`]). Both validate objects the same way ([`convert`]) and send every problem
//! to one sink ([`report`]); neither imports the other, and nothing source-specific passes the
//! [`crate::model::State`] they publish.

pub mod convert;
pub mod dir;
pub mod kube;
pub mod report;

pub use report::{Problem, Reporter};

/// How far a source got: how many times it read its input and published a state.
#[derive(Debug, Default)]
pub struct Progress {
    reads: std::sync::atomic::AtomicU64,
}

impl Progress {
    /// Counts one complete read (every changed file parsed, or a batch of watch events).
    pub fn read_done(&self) {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Complete reads so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }
}
