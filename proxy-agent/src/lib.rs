//! `proxy-agent`: a node-level Kubernetes service proxy.
//!
//! Sources ([`source`]) produce the desired [`model::State`]; the [`datapath`] reconciler
//! programs the eBPF maps from it and the [`proxy`] serves HTTP from it; [`admin`] shows all
//! of it to operators (admin API, metrics, CLI). See ARCHITECTURE.md at the repository root for the whole
//! picture.

pub mod admin;
pub mod agent;
pub mod datapath;
pub mod gateway;
pub mod istio;
pub mod model;
pub mod proxy;
pub mod ratelog;
pub mod source;
