//! `proxy-agent`: a node-level Kubernetes service proxy.
//!
//! Sources ([`manifests`]) produce the desired [`model::State`]; the [`datapath`] reconciler
//! programs the eBPF maps from it. See ARCHITECTURE.md at the repository root for the whole
//! picture.

pub mod agent;
pub mod datapath;
pub mod istio;
pub mod kube_source;
pub mod manifests;
pub mod model;
pub mod proxy;
pub mod ratelog;
