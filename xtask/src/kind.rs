//! `cargo xtask kind`: the product in a real cluster, for machines with Docker and kind (this
//! suite cannot run where there is no Docker engine; it says so and fails at once).
//!
//! It creates a kind cluster without kube-proxy (`deploy/kind-config.yaml`), loads the image
//! of `cargo xtask image`, installs `deploy/` with the API server's address, waits for the
//! DaemonSet, and checks from inside the cluster: CoreDNS over UDP and TCP, the `kubernetes`
//! Service, a ClusterIP balanced over 3 pods, the seed experiment (ab against 2 pods, one
//! flipping to 500s: 0 failed), `proxy-agent explain` in the agent pod, a rolling restart of the
//! DaemonSet under load, and an uninstall that leaves no pins or programs on the nodes.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

const CLUSTER: &str = "proxy-agent";
const DNS_IMAGE: &str = "registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7";
const NETEXEC_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
const AB_IMAGE: &str = "docker.io/library/httpd:2.4";
use crate::image::FIXTURE_IMAGE;

fn run(program: &str, args: &[&str]) -> Result<String> {
    eprintln!("kind: {program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl(args: &[&str]) -> Result<String> {
    let mut all = vec!["--context", "kind-proxy-agent"];
    all.extend_from_slice(args);
    run("kubectl", &all)
}

/// Fails at once, naming what is missing, unless Docker (with a running engine) and kind exist.
fn preflight() -> Result<()> {
    preflight_with(|p: &str, a: &str| {
        Command::new(p)
            .arg(a)
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// [`preflight`] with `have(program, arg)` saying whether `program arg` succeeds.
fn preflight_with(have: impl Fn(&str, &str) -> bool) -> Result<()> {
    if !have("kind", "version") {
        bail!(
            "cargo xtask kind needs kind (https://kind.sigs.k8s.io) and Docker; `kind` was not found. \
             This suite runs where Docker exists; on machines without it the simulated-node suite \
             (cargo xtask test) is the proof"
        );
    }
    if !have("docker", "info") {
        bail!(
            "cargo xtask kind needs a running Docker engine (`docker info` failed). This suite runs \
             where Docker exists; on machines without it the simulated-node suite (cargo xtask test) \
             is the proof"
        );
    }
    Ok(())
}

fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A one-shot pod's output (`kubectl run --rm -i`).
fn in_pod(name: &str, image: &str, command: &[&str]) -> Result<String> {
    let mut args = vec![
        "run",
        name,
        "--rm",
        "-i",
        "--restart=Never",
        "--quiet",
        "--image",
        image,
        "--",
    ];
    args.extend_from_slice(command);
    kubectl(&args)
}

/// Runs the suite; the cluster is deleted at the end (also on failure).
pub fn run_suite() -> Result<()> {
    preflight()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = root.join("deploy/kind-config.yaml");
    let _ = run("kind", &["delete", "cluster", "--name", CLUSTER]);
    run(
        "kind",
        &[
            "create",
            "cluster",
            "--name",
            CLUSTER,
            "--config",
            config.to_str().context("utf-8")?,
            "--wait",
            "0s",
        ],
    )?;
    let result = checks(&root);
    let _ = std::fs::remove_dir_all(overlay_dir());
    if std::env::var_os("PXT_KEEP_KIND").is_none() {
        let _ = run("kind", &["delete", "cluster", "--name", CLUSTER]);
    }
    result
}

fn checks(root: &std::path::Path) -> Result<()> {
    // The images: the agent, and the fixtures (webapp) for the seed experiment.
    let archive = crate::image::build(crate::image::Build::Release)?;
    run(
        "kind",
        &[
            "load",
            "image-archive",
            archive.to_str().context("utf-8")?,
            "--name",
            CLUSTER,
        ],
    )?;
    let fixtures = crate::image::build_fixture()?;
    run(
        "kind",
        &[
            "load",
            "image-archive",
            fixtures.to_str().context("utf-8")?,
            "--name",
            CLUSTER,
        ],
    )?;

    // deploy/ with the API server's address (nothing translates the `kubernetes` Service
    // before the agent runs).
    let cp_ip = run(
        "docker",
        &[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            "proxy-agent-control-plane",
        ],
    )?;
    let overlay = overlay_dir();
    std::fs::create_dir_all(&overlay)?;
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- {}\nconfigMapGenerator:\n- name: proxy-agent-apiserver\n  namespace: proxy-agent\n  behavior: replace\n  literals:\n  - KUBERNETES_SERVICE_HOST={}\n  - KUBERNETES_SERVICE_PORT=6443\n",
            root.join("deploy").display(),
            cp_ip.trim()
        ),
    )?;
    kubectl(&[
        "apply",
        "-k",
        overlay.to_str().context("utf-8")?,
        "--server-side",
    ])?;
    kubectl(&[
        "-n",
        "proxy-agent",
        "rollout",
        "status",
        "ds/proxy-agent",
        "--timeout=300s",
    ])?;
    kubectl(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "deploy/coredns",
        "--timeout=300s",
    ])?;

    // CoreDNS through a ClusterIP, over UDP and TCP.
    for (name, flag) in [("dns-udp", "+notcp"), ("dns-tcp", "+tcp")] {
        let out = in_pod(
            name,
            DNS_IMAGE,
            &[
                "dig",
                flag,
                "+short",
                "kubernetes.default.svc.cluster.local",
            ],
        )?;
        ensure!(!out.trim().is_empty(), "{name}: no answer from CoreDNS");
    }
    // The kubernetes Service.
    let out = in_pod(
        "apiserver",
        NETEXEC_IMAGE,
        &[
            "sh",
            "-c",
            "wget -qO- --no-check-certificate https://kubernetes.default.svc/version || curl -sk https://kubernetes.default.svc/version",
        ],
    )?;
    ensure!(
        out.contains("gitVersion"),
        "the kubernetes Service did not answer: {out}"
    );

    // A ClusterIP balanced over 3 pods.
    kubectl(&[
        "create",
        "deployment",
        "netexec",
        "--image",
        NETEXEC_IMAGE,
        "--replicas",
        "3",
        "--",
        "/agnhost",
        "netexec",
        "--http-port=8080",
    ])?;
    kubectl(&[
        "expose",
        "deployment",
        "netexec",
        "--port",
        "80",
        "--target-port",
        "8080",
        "--name",
        "netexec",
    ])?;
    kubectl(&["rollout", "status", "deploy/netexec", "--timeout=180s"])?;
    let out = in_pod(
        "balance",
        NETEXEC_IMAGE,
        &[
            "sh",
            "-c",
            "for i in $(seq 60); do wget -qO- http://netexec/hostname; echo; done",
        ],
    )?;
    let hosts: std::collections::BTreeSet<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    ensure!(
        hosts.len() == 3,
        "60 requests reached {} pods: {hosts:?}",
        hosts.len()
    );

    // The seed experiment: ab against 2 webapp pods, one flips to 500s; 0 failed.
    kubectl(&[
        "create",
        "deployment",
        "webapp",
        "--image",
        FIXTURE_IMAGE,
        "--replicas",
        "2",
        "--",
        "/fixture",
        "webapp",
        "--listen",
        "0.0.0.0:8080",
    ])?;
    kubectl(&["rollout", "status", "deploy/webapp", "--timeout=180s"])?;
    std::fs::write(
        overlay.join("webapp.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: webapp, namespace: default}}\nspec:\n  selector: {{app: webapp}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n{}",
            tests::scenarios::seed_policy("webapp")
        ),
    )?;
    kubectl(&[
        "apply",
        "-f",
        overlay.join("webapp.yaml").to_str().context("utf-8")?,
    ])?;
    let pod_ip = kubectl(&[
        "get",
        "pods",
        "-l",
        "app=webapp",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ])?;
    let ab = std::thread::spawn(|| {
        in_pod(
            "ab",
            AB_IMAGE,
            &["ab", "-c", "50", "-n", "20000", "http://webapp/"],
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    in_pod(
        "flip",
        NETEXEC_IMAGE,
        &[
            "sh",
            "-c",
            &format!("wget -qO- http://{}:8080/err", pod_ip.trim()),
        ],
    )?;
    let out = ab
        .join()
        .map_err(|_| anyhow::anyhow!("ab thread panicked"))??;
    let r = tests::scenarios::parse_ab(&out).context("ab printed no summary")?;
    eprintln!("kind: seed experiment: {r:?}");
    ensure!(
        r.failed == 0 && r.non_2xx == 0,
        "the seed experiment failed requests: {r:?}"
    );

    // explain, from the agent pod of the client's node.
    let agent = kubectl(&[
        "-n",
        "proxy-agent",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=proxy-agent",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    let vip = kubectl(&["get", "svc", "webapp", "-o", "jsonpath={.spec.clusterIP}"])?;
    let out = kubectl(&[
        "-n",
        "proxy-agent",
        "exec",
        agent.trim(),
        "--",
        "/proxy-agent",
        "explain",
        "--from",
        pod_ip.trim(),
        "--to",
        &format!("{}:80", vip.trim()),
    ])?;
    ensure!(
        out.contains("=> L7 through the node proxy"),
        "explain: {out}"
    );

    // A rolling restart of the DaemonSet under load.
    let ab = std::thread::spawn(|| {
        in_pod(
            "ab-restart",
            AB_IMAGE,
            &["ab", "-c", "20", "-n", "30000", "http://webapp/"],
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    in_pod(
        "flop",
        NETEXEC_IMAGE,
        &[
            "sh",
            "-c",
            &format!("wget -qO- http://{}:8080/ok", pod_ip.trim()),
        ],
    )?;
    kubectl(&["-n", "proxy-agent", "rollout", "restart", "ds/proxy-agent"])?;
    kubectl(&[
        "-n",
        "proxy-agent",
        "rollout",
        "status",
        "ds/proxy-agent",
        "--timeout=300s",
    ])?;
    let out = ab
        .join()
        .map_err(|_| anyhow::anyhow!("ab thread panicked"))??;
    let r = tests::scenarios::parse_ab(&out).context("ab printed no summary")?;
    eprintln!("kind: under a rolling restart: {r:?}");
    ensure!(
        r.complete == 30000,
        "requests were lost during the rolling restart: {r:?}"
    );

    // Uninstall: delete, then clean every node's pins (the links go with them, so no program
    // stays attached).
    kubectl(&[
        "delete",
        "-k",
        overlay.to_str().context("utf-8")?,
        "--wait=true",
    ])?;
    kubectl(&[
        "apply",
        "-f",
        root.join("deploy/uninstall/cleanup.yaml")
            .to_str()
            .context("utf-8")?,
    ])?;
    poll(
        "the cleanup DaemonSet to finish on every node",
        Duration::from_secs(180),
        || {
            kubectl(&[
                "-n",
                "kube-system",
                "logs",
                "-l",
                "app.kubernetes.io/name=proxy-agent-cleanup",
                "--tail=-1",
            ])
            .ok()
            .filter(|l| l.matches("removed").count() >= 3)
        },
    )?;
    kubectl(&[
        "delete",
        "-f",
        root.join("deploy/uninstall/cleanup.yaml")
            .to_str()
            .context("utf-8")?,
    ])?;
    for node in [
        "proxy-agent-control-plane",
        "proxy-agent-worker",
        "proxy-agent-worker2",
    ] {
        let pins = run(
            "docker",
            &[
                "exec",
                node,
                "sh",
                "-c",
                "ls /sys/fs/bpf/proxy-agent 2>/dev/null | wc -l",
            ],
        )?;
        ensure!(
            pins.trim() == "0",
            "{node}: pins left under /sys/fs/bpf/proxy-agent"
        );
    }
    eprintln!("kind: every check passed");
    Ok(())
}

/// The kustomize overlay (deploy/ with the API server's address) and the test objects.
fn overlay_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("proxy-agent-kind-{}", std::process::id()))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn without_kind_or_docker_the_suite_fails_at_once_naming_what_is_missing() {
        let e = preflight_with(|_, _| false).unwrap_err().to_string();
        assert!(e.contains("`kind` was not found"), "{e}");
        let e = preflight_with(|p, _| p == "kind").unwrap_err().to_string();
        assert!(e.contains("running Docker engine"), "{e}");
        assert!(preflight_with(|_, _| true).is_ok());
    }
}
