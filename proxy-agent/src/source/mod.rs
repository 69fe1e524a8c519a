//! Where the desired state comes from: a directory of Kubernetes YAML ([`dir`]) or the API
//! server ([`kube`]). Both validate objects the same way ([`convert`]) and send every problem
//! to one sink ([`report`]); neither imports the other, and nothing source-specific passes the
//! [`crate::model::State`] they publish.

pub mod convert;
pub mod dir;
pub mod kube;
pub mod report;

pub use report::{Problem, Reporter};
