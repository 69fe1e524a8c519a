//! Several simulated nodes routed to each other over an "underlay", plus an external client.
//!
//! The underlay is a network namespace holding a bridge; node K joins it with a veth (`ul0`,
//! address `198.19.200.K/24`, the node's "real" IP) and routes the other nodes' pod subnets
//! (`198.18.J.0/24`) through their underlay addresses, with forwarding on. The external client
//! (`198.19.200.100`, a network namespace on the underlay in a cgroup outside every node's
//! subtree) reaches node IPs only, as a client outside the cluster would. Nothing links to the
//! machine's own namespace; everything is named `pxt<pid>-…` and removed on drop.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::leftovers;
use crate::node::{Pod, SimNode};
use crate::proc::Place;
use crate::sys::{self, PREFIX, ip};

static NEXT_CLUSTER: AtomicUsize = AtomicUsize::new(0);

/// The external client's address on the underlay.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 100);

/// Node K's address on the underlay.
pub fn underlay_ip(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 200, k)
}

/// Nodes on an underlay, and a client outside the cluster.
pub struct SimCluster {
    /// The nodes; `nodes[i]` is node number `i + 1`.
    pub nodes: Vec<SimNode>,
    /// The client outside the cluster.
    pub external: Pod,
    name: String,
    underlay: String,
    external_ns: String,
    cgroup: PathBuf,
}

fn in_netns(netns: &str, cmd: &str) {
    let st = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "sh", "-c", cmd])
        .status()
        .unwrap_or_else(|e| panic!("ip netns exec {netns}: {e}"));
    assert!(st.success(), "in {netns}: `{cmd}` failed ({st})");
}

impl SimCluster {
    /// `n` nodes (1..=20) joined by the underlay, and the external client.
    pub fn new(n: u8) -> Self {
        assert!((1..=20).contains(&n), "1 to 20 nodes");
        sys::require_root();
        leftovers::remove_stale();
        let name = format!(
            "{PREFIX}{}-c{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::SeqCst)
        );
        let underlay = format!("{name}-ul");
        let external_ns = format!("{name}-ext");
        let cgroup = sys::cgroup2_root().join(&name);
        std::fs::create_dir(&cgroup)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", cgroup.display()));
        let ext_cgroup = cgroup.join("external");
        std::fs::create_dir(&ext_cgroup).expect("create the external client's cgroup");
        let logs = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&logs).expect("create the cluster's log dir");
        // From here on, Drop cleans up (nodes are pushed as they are made).
        let mut c = Self {
            nodes: Vec::new(),
            external: Pod {
                name: "external".into(),
                ip: EXTERNAL_IP,
                // The underlay is IPv4 only.
                ip6: std::net::Ipv6Addr::UNSPECIFIED,
                place: Place {
                    netns: PathBuf::from(format!("/run/netns/{external_ns}")),
                    cgroup: ext_cgroup,
                    logs,
                },
            },
            name,
            underlay,
            external_ns,
            cgroup,
        };
        ip(&["netns", "add", &c.underlay]);
        ip(&["-n", &c.underlay, "link", "set", "lo", "up"]);
        ip(&["-n", &c.underlay, "link", "add", "ul", "type", "bridge"]);
        ip(&["-n", &c.underlay, "link", "set", "ul", "up"]);
        for k in 1..=n {
            let node = SimNode::numbered(k);
            c.attach(&node.netns, &format!("u{k}"), "ul0", underlay_ip(k));
            in_netns(&node.netns, "echo 1 > /proc/sys/net/ipv4/ip_forward");
            c.nodes.push(node);
        }
        // Each node routes the other nodes' pod subnets through their underlay addresses.
        for a in 1..=n {
            for b in (1..=n).filter(|b| *b != a) {
                ip(&[
                    "-n",
                    &c.nodes[a as usize - 1].netns,
                    "route",
                    "add",
                    &format!("198.18.{b}.0/24"),
                    "via",
                    &underlay_ip(b).to_string(),
                ]);
            }
        }
        ip(&["netns", "add", &c.external_ns]);
        ip(&["-n", &c.external_ns, "link", "set", "lo", "up"]);
        c.attach(&c.external_ns.clone(), "uext", "eth0", EXTERNAL_IP);
        c
    }

    /// Joins `netns` to the underlay bridge: `outer` on the bridge, `inner` in `netns` with
    /// address `addr/24`.
    fn attach(&self, netns: &str, outer: &str, inner: &str, addr: Ipv4Addr) {
        ip(&[
            "-n",
            &self.underlay,
            "link",
            "add",
            outer,
            "type",
            "veth",
            "peer",
            "name",
            inner,
            "netns",
            netns,
        ]);
        ip(&[
            "-n",
            &self.underlay,
            "link",
            "set",
            outer,
            "master",
            "ul",
            "up",
        ]);
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            inner,
        ]);
        ip(&["-n", netns, "link", "set", inner, "up"]);
    }

    /// Node number `k` (1-based).
    pub fn node(&self, k: u8) -> &SimNode {
        &self.nodes[k as usize - 1]
    }

    /// Node number `k`, mutable (to add pods).
    pub fn node_mut(&mut self, k: u8) -> &mut SimNode {
        &mut self.nodes[k as usize - 1]
    }

    /// Routes `prefix` (LoadBalancer or external IPs) from the external client to node `k`, as a
    /// cloud load balancer or a BGP announcement would.
    pub fn route_external(&self, prefix: &str, k: u8) {
        ip(&[
            "-n",
            &self.external_ns,
            "route",
            "replace",
            prefix,
            "via",
            &underlay_ip(k).to_string(),
        ]);
    }

    /// Writes the same manifest into every node's manifests directory.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        for n in &self.nodes {
            n.write_manifest(file, yaml);
        }
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        // Nodes first (their processes, netns, cgroups, pins), then the external client and the
        // underlay.
        self.nodes.clear();
        let mut problems = Vec::new();
        if let Err(e) = leftovers::kill_cgroup_tree(&self.cgroup) {
            problems.push(e);
        }
        for ns in [&self.external_ns, &self.underlay] {
            if std::path::Path::new("/run/netns").join(ns).exists()
                && let Err(e) = leftovers::remove_netns(ns)
            {
                problems.push(e);
            }
        }
        if let Err(e) = leftovers::remove_cgroup_tree(&self.cgroup) {
            problems.push(e);
        }
        let _ = std::fs::remove_dir_all(&self.external.place.logs);
        if !problems.is_empty() && !std::thread::panicking() {
            panic!(
                "cleanup of cluster {} failed: {}",
                self.name,
                problems.join("; ")
            );
        }
    }
}
