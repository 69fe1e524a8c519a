//! A simulated node: its network namespace, bridge, pods, cgroup subtree, pins and scratch files.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use crate::leftovers;
use crate::proc::{Place, Proc};
use crate::sys::{self, PREFIX, ip};

static NEXT_NODE: AtomicUsize = AtomicUsize::new(0);

/// The node's address on its pod bridge.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// A simulated Kubernetes node. Dropping it removes everything it created.
pub struct SimNode {
    /// Unique name: `pxt<pid>-<n>`.
    pub name: String,
    /// Network namespace of the node (the agent's "host network").
    pub netns: String,
    /// The node's cgroup v2 subtree; the agent attaches here.
    pub cgroup: PathBuf,
    /// bpffs directory for the agent's pins.
    pub bpffs: PathBuf,
    /// Scratch directory (manifests, logs).
    pub dir: PathBuf,
    /// The node's address on its pod bridge (pods route through it).
    pub node_ip: Ipv4Addr,
    /// Pod subnet: `198.18.0.0/16` for a lone node, `198.18.K.0/24` for node K of a cluster.
    subnet: (u8, u8),
    pods: Vec<String>,
    next_ip: AtomicU32,
}

/// A pod: a network namespace on the node's bridge and a child cgroup of the node.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Pod address.
    pub ip: Ipv4Addr,
    /// Pod IPv6 address (every pod is dual-stack): `2001:2:0:K::N` (K the node number, N the
    /// host part of `ip`).
    pub ip6: Ipv6Addr,
    /// Where its processes run.
    pub place: Place,
}

impl SimNode {
    /// Creates a node (removing left-overs of crashed runs first). Panics without root.
    pub fn new() -> Self {
        Self::create(0)
    }

    /// Node `k` (1..=250) of a cluster: bridge `198.18.K.1/24`, pods `198.18.K.10` and up.
    pub fn numbered(k: u8) -> Self {
        assert!((1..=250).contains(&k), "node numbers are 1..=250");
        Self::create(k)
    }

    fn create(k: u8) -> Self {
        sys::require_root();
        leftovers::remove_stale();
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT_NODE.fetch_add(1, Ordering::SeqCst)
        );
        let node = Self {
            netns: format!("{name}-node"),
            cgroup: sys::cgroup2_root().join(&name),
            bpffs: sys::bpffs_root().join(&name),
            dir: std::env::temp_dir().join(&name),
            name,
            node_ip: if k == 0 {
                NODE_IP
            } else {
                Ipv4Addr::new(198, 18, k, 1)
            },
            subnet: if k == 0 { (0, 16) } else { (k, 24) },
            pods: Vec::new(),
            next_ip: AtomicU32::new(10),
        };
        // From here on, Drop cleans up whatever was created.
        std::fs::create_dir_all(node.dir.join("manifests")).expect("create scratch dir");
        std::fs::create_dir_all(node.dir.join("logs")).expect("create log dir");
        std::fs::create_dir(&node.cgroup)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", node.cgroup.display()));
        std::fs::create_dir(node.cgroup.join("system")).expect("create node system cgroup");
        ip(&["netns", "add", &node.netns]);
        ip(&["-n", &node.netns, "link", "set", "lo", "up"]);
        ip(&["-n", &node.netns, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &node.netns,
            "addr",
            "add",
            &format!("{}/{}", node.node_ip, node.subnet.1),
            "dev",
            "br0",
        ]);
        ip(&[
            "-n",
            &node.netns,
            "-6",
            "addr",
            "add",
            &format!("{}/64", node.node_ip6()),
            "dev",
            "br0",
            "nodad",
        ]);
        ip(&["-n", &node.netns, "link", "set", "br0", "up"]);
        node
    }

    /// The node's IPv6 address on its pod bridge: `2001:2:0:K::1`.
    pub fn node_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, self.subnet.0 as u16, 0, 0, 0, 1)
    }

    /// Where node-level processes (the agent) run: the node netns, cgroup `<node>/system`.
    pub fn host_place(&self) -> Place {
        Place {
            netns: PathBuf::from(format!("/run/netns/{}", self.netns)),
            cgroup: self.cgroup.join("system"),
            logs: self.dir.join("logs"),
        }
    }

    /// The manifests directory the agent reads.
    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Writes (atomically: temp file + rename) a manifest file.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let tmp = self.manifests().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).expect("write manifest");
        std::fs::rename(&tmp, self.manifests().join(file)).expect("rename manifest");
    }

    /// Removes a manifest file.
    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifests().join(file)).expect("remove manifest");
    }

    /// Adds a pod with the next free address.
    pub fn add_pod(&mut self, name: &str) -> Pod {
        let n = self.next_ip.fetch_add(1, Ordering::SeqCst);
        let addr = if self.subnet.1 == 16 {
            Ipv4Addr::new(198, 18, (n >> 8) as u8, n as u8)
        } else {
            assert!(n < 255, "a cluster node has room for 245 pods");
            Ipv4Addr::new(198, 18, self.subnet.0, n as u8)
        };
        let netns = format!("{}-{name}", self.name);
        let veth = format!("v{}", self.pods.len());
        ip(&["netns", "add", &netns]);
        self.pods.push(netns.clone());
        ip(&[
            "-n",
            &self.netns,
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ]);
        ip(&[
            "-n",
            &self.netns,
            "link",
            "set",
            &veth,
            "master",
            "br0",
            "up",
        ]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{addr}/{}", self.subnet.1),
            "dev",
            "eth0",
        ]);
        let addr6 = Ipv6Addr::new(
            0x2001,
            2,
            0,
            self.subnet.0 as u16,
            0,
            0,
            (n >> 16) as u16,
            n as u16,
        );
        // No duplicate address detection: the address is usable at once.
        ip(&[
            "-n",
            &netns,
            "-6",
            "addr",
            "add",
            &format!("{addr6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &self.node_ip.to_string(),
        ]);
        ip(&[
            "-n",
            &netns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.node_ip6().to_string(),
        ]);
        let cgroup = self.cgroup.join(format!("pod-{name}"));
        std::fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("create {}: {e}", cgroup.display()));
        Pod {
            name: name.to_string(),
            ip: addr,
            ip6: addr6,
            place: Place {
                netns: PathBuf::from(format!("/run/netns/{netns}")),
                cgroup,
                logs: self.dir.join("logs"),
            },
        }
    }

    /// Starts `proxy-agent run` on this node's manifests directory with `extra` arguments and
    /// waits until its `/ready` answers.
    pub fn start_agent(&self, extra: &[&str]) -> Proc {
        let manifests = self.manifests();
        let mut args = vec!["--manifests", manifests.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        self.start_agent_with(&args)
    }

    /// Starts `proxy-agent run` against an API server through `kubeconfig` (a file path) and
    /// waits until its `/ready` answers.
    pub fn start_agent_kube(&self, kubeconfig: &Path, extra: &[&str]) -> Proc {
        let mut args = vec![
            "--kubeconfig",
            kubeconfig.to_str().expect("utf-8 path"),
            "--node-name",
            "node1",
        ];
        args.extend_from_slice(extra);
        self.start_agent_with(&args)
    }

    /// Starts `proxy-agent run` on the manifests directory through a wrapper command (e.g.
    /// `prlimit --nofile=300:300 --`), and waits until its `/ready` answers.
    pub fn start_agent_wrapped(&self, wrapper: &[&str], agent: &str, extra: &[&str]) -> Proc {
        let manifests = self.manifests();
        let mut args = wrapper[1..].to_vec();
        args.extend_from_slice(&[
            agent,
            "run",
            "--cgroup",
            self.cgroup.to_str().expect("utf-8 path"),
            "--bpffs",
            self.bpffs.to_str().expect("utf-8 path"),
            "--manifests",
            manifests.to_str().expect("utf-8 path"),
        ]);
        args.extend_from_slice(extra);
        self.spawn_agent(self.host_place().command(wrapper[0], &args))
    }

    fn start_agent_with(&self, source: &[&str]) -> Proc {
        let mut args = vec![
            "run",
            "--cgroup",
            self.cgroup.to_str().expect("utf-8 path"),
            "--bpffs",
            self.bpffs.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(source);
        self.spawn_agent(self.host_place().command(sys::bin("proxy-agent"), &args))
    }

    /// The agent's `/status` (panics if it does not answer).
    pub fn status(&self) -> serde_json::Value {
        crate::admin::get_json(&self.netns_path(), "/status")
    }

    /// GETs a JSON document from the agent's admin API.
    pub fn admin_json(&self, path: &str) -> serde_json::Value {
        crate::admin::get_json(&self.netns_path(), path)
    }

    /// Waits until the agent's `/status` satisfies `f`; returns it.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let ns = self.netns_path();
        sys::poll(
            &format!("the agent's /status to show {what}"),
            timeout,
            || crate::admin::status(&ns).filter(|s| f(s)),
        )
    }

    /// Waits until the agent applied generation `n` (or a later one) successfully.
    pub fn wait_synced(&self, n: u64, timeout: Duration) -> serde_json::Value {
        self.wait_status(&format!("generation {n} applied"), timeout, |s| {
            s["last_apply"]["generation"].as_u64().unwrap_or(0) >= n
                && s["last_apply"]["ok"] == true
        })
    }

    /// Waits until the agent has `n` HTTP routes.
    pub fn wait_l7_routes(&self, n: usize, timeout: Duration) -> serde_json::Value {
        self.wait_status(&format!("{n} HTTP routes"), timeout, |s| {
            s["l7_routes"] == n && s["last_apply"]["ok"] == true
        })
    }

    /// Waits until the agent's `/ready` answers 200 (first sync done, proxy listening),
    /// failing at once if the agent exits.
    pub fn wait_ready(&self, agent: &mut Proc, timeout: Duration) {
        let ns = self.netns_path();
        sys::poll("the agent's /ready to answer 200", timeout, || {
            assert!(
                agent.running(),
                "the agent exited before it was ready: {}",
                agent.log_text()
            );
            crate::admin::ready(&ns).then_some(())
        });
    }

    fn spawn_agent(&self, mut cmd: std::process::Command) -> Proc {
        let place = self.host_place();
        cmd.env(
            "RUST_LOG",
            std::env::var("PXT_AGENT_LOG").unwrap_or_else(|_| "info".into()),
        );
        let n = std::fs::read_dir(&place.logs)
            .map(|d| d.count())
            .unwrap_or(0);
        let mut agent = Proc::spawn(
            "proxy-agent",
            cmd,
            place.logs.join(format!("agent-{n}.log")),
        );
        self.wait_ready(&mut agent, Duration::from_secs(30));
        agent
    }

    /// The node's network namespace file (for servers that must live on the node).
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.netns))
    }

    /// Runs a `proxy-agent` CLI command on the node (it reaches the agent's admin API on the
    /// node's loopback) and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        self.host_place()
            .run(sys::bin("proxy-agent"), args, Duration::from_secs(30))
    }

    /// Runs `proxy-agent dump` against this node's pins.
    pub fn dump(&self) -> String {
        let bpffs = self.bpffs.to_str().expect("utf-8").to_string();
        self.host_place().run(
            sys::bin("proxy-agent"),
            &["dump", "--bpffs", &bpffs],
            Duration::from_secs(10),
        )
    }
}

impl Default for SimNode {
    fn default() -> Self {
        Self::new()
    }
}

impl Pod {
    /// Starts a fixture server (`fixture KIND ARGS…`) in this pod and waits for `listening`.
    pub fn fixture_server(&self, kind: &str, args: &[&str]) -> Proc {
        let mut all = vec![kind, "--id", &self.name];
        all.extend_from_slice(args);
        let cmd = self.place.command(sys::bin("fixture"), &all);
        let log = self.place.logs.join(format!("{}-{kind}.log", self.name));
        let mut p = Proc::spawn(&format!("{kind}@{}", self.name), cmd, log);
        p.wait_stdout("listening", Duration::from_secs(10));
        p
    }

    /// Starts a fixture server that is restarted `delay` after it dies (a crashing container
    /// under a kubelet). Its stderr, across restarts, goes to `<logs>/<pod>-<kind>.log`.
    pub fn fixture_server_supervised(
        &self,
        kind: &str,
        args: &[&str],
        delay: Duration,
    ) -> crate::proc::Supervised {
        let mut all: Vec<String> = vec![kind.to_string(), "--id".into(), self.name.clone()];
        all.extend(args.iter().map(|s| s.to_string()));
        let place = self.place.clone();
        let log = self.place.logs.join(format!("{}-{kind}.log", self.name));
        crate::proc::Supervised::start(&format!("{kind}@{}", self.name), delay, log, move || {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            place.command(sys::bin("fixture"), &args)
        })
    }

    /// Runs a fixture probe (`fixture KIND ARGS…`) to completion and parses its JSON output.
    pub fn probe(&self, kind: &str, args: &[&str], timeout: Duration) -> serde_json::Value {
        let mut all = vec![kind];
        all.extend_from_slice(args);
        let out = self.place.run(sys::bin("fixture"), &all, timeout);
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("{kind} printed no JSON ({e}): {out}"))
    }

    /// Starts a fixture probe in the background; finish it with [`Pod::finish_probe`].
    pub fn spawn_probe(&self, kind: &str, args: &[&str]) -> Proc {
        let mut all = vec![kind];
        all.extend_from_slice(args);
        let cmd = self.place.command(sys::bin("fixture"), &all);
        let log = self
            .place
            .logs
            .join(format!("{}-{kind}-probe.log", self.name));
        Proc::spawn(&format!("{kind}@{}", self.name), cmd, log)
    }

    /// Waits for a background probe and parses its JSON output.
    pub fn finish_probe(mut probe: Proc, timeout: Duration) -> serde_json::Value {
        let st = probe.wait_exit(timeout);
        assert!(
            st.success(),
            "{} failed ({st}): {}",
            probe.name,
            probe.log_text()
        );
        let out = probe.all_stdout(timeout).join("\n");
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("{} printed no JSON ({e}): {out}", probe.name))
    }

    /// Runs any program in this pod to completion and returns its stdout.
    pub fn run(&self, program: impl AsRef<Path>, args: &[&str], timeout: Duration) -> String {
        self.place.run(program, args, timeout)
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        // Processes first (by PID, from the cgroups), then namespaces, cgroups, pins, files.
        if let Err(e) = leftovers::kill_cgroup_tree(&self.cgroup) {
            problems.push(e);
        }
        for ns in self.pods.iter().chain(std::iter::once(&self.netns)) {
            if let Err(e) = leftovers::remove_netns(ns) {
                problems.push(e);
            }
        }
        if let Err(e) = leftovers::remove_cgroup_tree(&self.cgroup) {
            problems.push(e);
        }
        if let Err(e) = leftovers::remove_pins(&self.bpffs) {
            problems.push(e);
        }
        if std::env::var_os("PXT_KEEP_LOGS").is_none() || !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if !problems.is_empty() && !std::thread::panicking() {
            panic!(
                "cleanup of node {} failed: {}",
                self.name,
                problems.join("; ")
            );
        }
    }
}

/// Returns the `pxt…` resources present now (for leak checks): netns, cgroups, pins, processes.
pub fn present_resources() -> Vec<String> {
    leftovers::list_all()
}
