//! The DaemonSet as a kubelet would run it, without a cluster: `kubectl kustomize deploy/`
//! renders the manifests; the agent runs from the image's root file system (the OCI archive of
//! `cargo xtask image`) in a private mount namespace with only the DaemonSet's hostPath mounts
//! (bound to the simulated node's bpffs directory and cgroup subtree) and a service-account
//! secret, with exactly the container's capabilities and its args and env; the API server
//! double serves TLS, checks the token and enforces the rendered ClusterRole. The agent must
//! serve a ClusterIP, answer its probes, and use every rule of the ClusterRole and nothing
//! else. Also real kubectl against the double: `kubectl apply -k deploy/ --server-side`.
//! Needs root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tests::apiserver::{ApiServer, Rule, Security};
use tests::k8s;
use tests::{Pod, Proc, SimNode};

const T: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kubectl kustomize deploy/`, one JSON value per document.
fn rendered() -> Vec<Value> {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join("deploy"))
        .output()
        .expect("running kubectl kustomize (kubectl is on every machine)");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/ failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("deploy/ renders no {kind}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

fn rules(docs: &[Value]) -> Vec<Rule> {
    find(docs, "ClusterRole")["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Rule {
            api_groups: strings(&r["apiGroups"]),
            resources: strings(&r["resources"]),
            verbs: strings(&r["verbs"]),
        })
        .collect()
}

/// The image's root file system, unpacked from the OCI archive into `dir`.
fn unpack_image(dir: &Path) -> PathBuf {
    let archive = tests::sys::bin_dir().join("../../proxy-agent-image.tar");
    assert!(
        archive.exists(),
        "{} is missing: build the image with `cargo xtask image` (`cargo xtask test` does)",
        archive.display()
    );
    let oci = dir.join("oci");
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&oci).unwrap();
    std::fs::create_dir_all(&rootfs).unwrap();
    let tar = |args: &[&str]| {
        let st = std::process::Command::new("tar")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "tar {args:?}");
    };
    tar(&[
        "-xf",
        archive.to_str().unwrap(),
        "-C",
        oci.to_str().unwrap(),
    ]);
    let blob = |digest: &str| {
        oci.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(oci.join("index.json")).unwrap()).unwrap();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let path = blob(layer["digest"].as_str().unwrap());
        tar(&[
            "-xf",
            path.to_str().unwrap(),
            "-C",
            rootfs.to_str().unwrap(),
        ]);
    }
    let config: Value = serde_json::from_slice(
        &std::fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/proxy-agent"]),
        "{config}"
    );
    let entries: Vec<_> = std::fs::read_dir(&rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        entries,
        ["proxy-agent"],
        "a scratch image holds the binary alone"
    );
    rootfs
}

/// The service-account secret a kubelet mounts.
fn service_account(dir: &Path, api: &ApiServer, token: &str) -> PathBuf {
    let sa = dir.join("serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), token).unwrap();
    std::fs::write(sa.join("ca.crt"), api.ca_pem().unwrap()).unwrap();
    std::fs::write(sa.join("namespace"), "proxy-agent").unwrap();
    sa
}

#[test]
fn the_rendered_daemonset_serves_a_clusterip_with_least_privilege() {
    let docs = rendered();
    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    // Surge updates: the new agent takes over before the old one drains.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    assert!(
        grace > 30,
        "terminationGracePeriodSeconds {grace} must exceed the 30 s drain timeout"
    );
    assert!(
        pod["containers"][0].get("ports").is_none(),
        "container ports become hostPorts under hostNetwork and block the surge pod"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_ne!(
        sc["privileged"], true,
        "the agent must not need privileged: true"
    );
    let caps = strings(&sc["capabilities"]["add"]);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let rules = rules(&docs);

    let mut node = SimNode::new();
    let webs: Vec<Pod> = (1..=2).map(|i| node.add_pod(&format!("web{i}"))).collect();
    let client = node.add_pod("client");
    let _servers: Vec<Proc> = webs
        .iter()
        .map(|p| p.fixture_server("tcp-id", &["--listen", "0.0.0.0:8080"]))
        .collect();
    let token = "deploy-test-token";
    let api = ApiServer::start_secure(
        Some(&node.netns_path()),
        Security {
            tls: true,
            token: Some(token.into()),
            rules: Some(rules.clone()),
        },
    );
    let ips: Vec<_> = webs.iter().map(|p| p.ip).collect();
    api.apply_yaml(&k8s::service_with_endpoints(
        "web",
        "198.19.0.10",
        80,
        "TCP",
        8080,
        &ips,
    ));
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: default}\nspec:\n  host: web\n  trafficPolicy: {outlierDetection: {interval: 5s}}\n";
    api.apply_yaml(dr);
    // Gateway API routes on web's (kernel-balanced) port: the agent writes their status
    // (Accepted False, UnsupportedValue), which exercises the status rules.
    api.apply_yaml(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: web, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n",
    );

    // The container, as the kubelet would start it.
    let rootfs = unpack_image(&node.dir);
    let sa = service_account(&node.dir, &api, token);
    // The node's own pieces stand in for the host paths: the bpffs and cgroup2 mounts are the
    // simulated node's (never the machine's root cgroup).
    std::fs::create_dir_all(&node.bpffs).unwrap();
    let host_path = |p: &str| -> PathBuf {
        match p {
            "/sys/fs/bpf" => node.bpffs.clone(),
            "/sys/fs/cgroup" => node.cgroup.clone(),
            other => panic!(
                "the DaemonSet mounts host path {other}: only bpffs and cgroup2 are expected"
            ),
        }
    };
    let mut args: Vec<String> = vec![
        "contain".into(),
        "--rootfs".into(),
        rootfs.display().to_string(),
    ];
    let volumes = pod["volumes"].as_array().unwrap();
    for m in c["volumeMounts"].as_array().unwrap() {
        let vol = volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
        let src = host_path(vol["hostPath"]["path"].as_str().unwrap());
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        args.push("--bind".into());
        args.push(format!(
            "{}:{}{ro}",
            src.display(),
            m["mountPath"].as_str().unwrap()
        ));
    }
    args.push("--bind".into());
    args.push(format!(
        "{}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
        sa.display()
    ));
    args.push("--caps".into());
    args.push(caps.join(","));
    // Env: the downward API, the API server ConfigMap (with this API server's address).
    let mut env: Vec<(String, String)> = vec![];
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("spec.nodeName") => "node1".to_string(),
            Some("status.hostIP") => tests::node::NODE_IP.to_string(),
            Some(other) => panic!("unexpected fieldRef {other}"),
            None => e["value"].as_str().unwrap_or_default().to_string(),
        };
        env.push((name, value));
    }
    for from in c["envFrom"].as_array().unwrap() {
        let cm_name = from["configMapRef"]["name"].as_str().unwrap();
        let cm = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm_name)
            .unwrap_or_else(|| {
                panic!("envFrom names ConfigMap {cm_name}, which deploy/ does not render")
            });
        for (k, v) in cm["data"].as_object().unwrap() {
            let v = match k.as_str() {
                "KUBERNETES_SERVICE_HOST" => "127.0.0.1".to_string(),
                "KUBERNETES_SERVICE_PORT" => api.port().to_string(),
                _ => v.as_str().unwrap().to_string(),
            };
            env.push((k.clone(), v));
        }
    }
    for (k, v) in &env {
        args.push("--env".into());
        args.push(format!("{k}={v}"));
    }
    args.push("--env".into());
    args.push("RUST_LOG=info".into());
    args.push("--".into());
    args.push(
        c["command"]
            .as_array()
            .and_then(|a| a[0].as_str())
            .unwrap_or("/proxy-agent")
            .into(),
    );
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    for a in c["args"].as_array().unwrap() {
        // Kubernetes expands $(VAR) from the container's env.
        let mut a = a.as_str().unwrap().to_string();
        for (k, _) in &env {
            a = a.replace(&format!("$({k})"), &lookup(k));
        }
        args.push(a);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Proc::spawn(
        "agent-in-container",
        node.host_place().command(tests::sys::bin("fixture"), &args),
        node.dir.join("logs/agent-container.log"),
    );
    node.wait_ready(&mut agent, T);

    // It serves the ClusterIP, and its probes answer where the DaemonSet says.
    let out = client.probe(
        "tcp-probe",
        &["--to", "198.19.0.10:80", "--count", "40", "--read"],
        T,
    );
    assert_eq!(out["ok"], 40, "{out}");
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        let addr = format!("127.0.0.1:{}", get["port"]);
        let (code, body) = tests::admin::request(
            &node.netns_path(),
            &addr,
            "GET",
            get["path"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(code, 200, "{probe}: {body}");
    }
    let (code, body) =
        tests::admin::request(&node.netns_path(), "127.0.0.1:10256", "GET", "/healthz").unwrap();
    assert_eq!(code, 200, "kube-proxy's healthz: {body}");
    assert!(body.contains("lastUpdated"), "{body}");

    // An invalid DestinationRule becomes an Event (create); fixed and broken again, the same
    // Event is patched.
    for (i, interval) in ["-5s", "5s", "-5s"].iter().enumerate() {
        api.apply_yaml(&dr.replace("interval: 5s", &format!("interval: {interval}")));
        if i != 1 {
            let verb = if i == 0 { "create" } else { "patch" };
            let deadline = std::time::Instant::now() + T;
            while !api
                .accesses()
                .iter()
                .any(|a| a.resource == "events" && a.verb == verb)
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no Event {verb} within {T:?}; requests: {:#?}\nagent log:\n{}",
                    api.accesses(),
                    agent.log_text()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            node.wait_status("the problem to clear", T, |s| s["problems"] == 0);
        }
    }

    // The routes' status is written (Accepted False: web's port is not HTTP).
    for kind in ["HTTPRoute", "GRPCRoute"] {
        let deadline = std::time::Instant::now() + T;
        loop {
            let r = api
                .get("gateway.networking.k8s.io/v1", kind, "default", "web")
                .unwrap();
            let accepted = &r["status"]["parents"][0]["conditions"][0];
            if accepted["type"] == "Accepted" {
                assert_eq!(
                    (&accepted["status"], &accepted["reason"]),
                    (&"False".into(), &"UnsupportedValue".into()),
                    "{r}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {kind} status within {T:?}: {r}\nagent log:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // Least privilege, both ways.
    let accesses = api.accesses();
    let denied: Vec<_> = accesses.iter().filter(|a| !a.allowed).collect();
    assert!(
        denied.is_empty(),
        "requests the ClusterRole does not allow: {denied:?}"
    );
    let used: BTreeSet<(String, String, String)> = accesses
        .iter()
        .map(|a| (a.group.clone(), a.resource.clone(), a.verb.clone()))
        .collect();
    for r in &rules {
        for g in &r.api_groups {
            for res in &r.resources {
                for v in &r.verbs {
                    assert!(
                        used.contains(&(g.clone(), res.clone(), v.clone())),
                        "the ClusterRole grants {v} on {res}.{g}, which the agent never uses: remove it (used: {used:?})"
                    );
                }
            }
        }
    }
    agent.terminate(T);
}

#[test]
fn kubectl_applies_deploy_server_side_to_the_api_server_double() {
    let node = SimNode::new();
    let api = ApiServer::start_secure(
        Some(&node.netns_path()),
        Security {
            tls: true,
            token: Some("admin".into()),
            rules: None,
        },
    );
    let kubeconfig = node.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kc = kubeconfig.to_str().unwrap();
    let deploy = repo().join("deploy");
    let kubectl = |args: &[&str]| -> String {
        let mut all = vec!["--kubeconfig", kc];
        all.extend_from_slice(args);
        node.host_place().run("kubectl", &all, T)
    };
    let out = kubectl(&[
        "apply",
        "-k",
        deploy.to_str().unwrap(),
        "--server-side",
        "--validate=false",
    ]);
    for what in [
        "namespace/proxy-agent serverside-applied",
        "customresourcedefinition.apiextensions.k8s.io/virtualservices.networking.istio.io serverside-applied",
        "serviceaccount/proxy-agent serverside-applied",
        "clusterrole.rbac.authorization.k8s.io/proxy-agent serverside-applied",
        "clusterrolebinding.rbac.authorization.k8s.io/proxy-agent serverside-applied",
        "daemonset.apps/proxy-agent serverside-applied",
    ] {
        assert!(
            out.contains(what),
            "kubectl apply did not report {what:?}:\n{out}"
        );
    }
    let ds = kubectl(&[
        "get",
        "daemonset",
        "-n",
        "proxy-agent",
        "proxy-agent",
        "-o",
        "json",
    ]);
    let ds: Value = serde_json::from_str(&ds).unwrap();
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true, "{ds}");
    let names = kubectl(&["get", "clusterrole", "proxy-agent", "-o", "name"]);
    assert_eq!(
        names.trim(),
        "clusterrole.rbac.authorization.k8s.io/proxy-agent"
    );
    // Applying again changes nothing and still succeeds.
    let again = kubectl(&[
        "apply",
        "-k",
        deploy.to_str().unwrap(),
        "--server-side",
        "--validate=false",
    ]);
    assert!(
        again.contains("daemonset.apps/proxy-agent serverside-applied"),
        "{again}"
    );
}

/// Without a capability, cgroup2 or bpffs the agent exits non-zero at once, naming the piece.
#[test]
fn the_agent_names_a_missing_capability_cgroup2_or_bpffs_and_exits() {
    let node = SimNode::new();
    std::fs::create_dir_all(node.manifests()).unwrap();
    std::fs::create_dir_all(&node.bpffs).unwrap();
    let plain = node.dir.join("plain-dir");
    std::fs::create_dir_all(&plain).unwrap();
    let agent = tests::sys::bin("proxy-agent");
    let (cgroup, bpffs, manifests) = (
        node.cgroup.display().to_string(),
        node.bpffs.display().to_string(),
        node.manifests().display().to_string(),
    );
    let plain = plain.display().to_string();
    let agent = agent.to_str().unwrap();
    let run = |name: &str, prefix: &[&str], cgroup: &str, bpffs: &str| -> String {
        let mut args: Vec<&str> = prefix.to_vec();
        args.extend_from_slice(&[
            agent,
            "run",
            "--cgroup",
            cgroup,
            "--bpffs",
            bpffs,
            "--manifests",
            &manifests,
        ]);
        let mut p = Proc::spawn(
            name,
            node.host_place().command(args[0], &args[1..]),
            node.dir.join(format!("logs/{name}.log")),
        );
        let st = p.wait_exit(T);
        let log = p.log_text();
        assert!(!st.success(), "{name}: the agent must fail: {log}");
        log
    };
    // Only NET_ADMIN (a securityContext that forgot BPF and PERFMON).
    let log = run(
        "no-bpf-caps",
        &["setpriv", "--bounding-set", "-all,+net_admin", "--"],
        &cgroup,
        &bpffs,
    );
    assert!(
        log.contains("missing capabilities CAP_BPF, CAP_PERFMON")
            && log.contains("securityContext"),
        "{log}"
    );
    let log = run("no-cgroup2", &[], &plain, &bpffs);
    assert!(
        log.contains(&format!("{plain} is not a cgroup v2 directory")),
        "{log}"
    );
    let log = run("no-bpffs", &[], &cgroup, &plain);
    assert!(
        log.contains("bpf filesystem") || log.contains("bpffs"),
        "{log}"
    );
    assert!(log.contains(&plain), "{log}");
}
