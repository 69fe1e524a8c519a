//! The simulated Kubernetes node on which every capability is proven.
//!
//! A node is a network namespace with no link to the machine's own namespace; pods are network
//! namespaces joined to the node's bridge by veth pairs (pods in 198.18.0.0/16, ClusterIPs in
//! 198.19.0.0/16). Each node owns a cgroup v2 subtree (pods are child cgroups, the agent attaches
//! to the subtree), a bpffs pin directory and a scratch directory. Everything is named
//! `pxt<owner pid>-<n>…`, removed on drop (even on panic), and left-overs of a crashed run (owner
//! pid gone) are removed when the next run starts. Processes are ended by PID only.

pub mod admin;
pub mod apiserver;
pub mod cluster;
pub mod k8s;
pub mod leftovers;
pub mod node;
pub mod proc;
pub mod scenarios;
pub mod soak;
pub mod sys;

pub use cluster::SimCluster;
pub use node::{Pod, SimNode};
pub use proc::Proc;
