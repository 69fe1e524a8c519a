//! The `run` loop: desired state in, datapath writes out, until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info};

use crate::datapath::{Datapath, Reconciler};
use crate::manifests;
use crate::model::State;

/// Settings of `proxy-agent run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Directory of Kubernetes YAML to serve.
    pub manifests: PathBuf,
    /// cgroup v2 directory the programs attach to.
    pub cgroup: PathBuf,
    /// bpffs directory for pins.
    pub bpffs: PathBuf,
    /// How often the manifests directory is checked for changes.
    pub poll: Duration,
}

/// Runs the agent until SIGTERM or SIGINT; the datapath stays pinned and serving afterwards.
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (_datapath, maps, _l7) = Datapath::open(&cfg.cgroup, &cfg.bpffs)
        .with_context(|| format!("setting up the datapath on cgroup {}", cfg.cgroup.display()))?;
    let mut reconciler = Reconciler::restore(maps).context("reading the pinned maps back")?;
    info!(
        frontends = reconciler.frontend_count(),
        "restored datapath state from pinned maps"
    );

    // `None` until the directory was read once: an empty map must never be applied before the
    // source has spoken, or a restarted agent would flush the pinned state it just adopted.
    let (tx, mut rx) = watch::channel(None::<State>);
    tokio::spawn(manifests::watch(cfg.manifests.clone(), cfg.poll, tx));

    let mut generation = 0u64;
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        let retry_at =
            retry.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the manifests watcher stopped");
                }
            }
            _ = tokio::time::sleep_until(retry_at), if retry.is_some() => {}
            _ = term.recv() => { info!("SIGTERM: exiting, the datapath stays pinned and serving"); return Ok(()); }
            _ = int.recv() => { info!("SIGINT: exiting, the datapath stays pinned and serving"); return Ok(()); }
        }
        let Some(state) = rx.borrow_and_update().clone() else {
            continue;
        };
        let frontends = state.frontends();
        generation += 1;
        match reconciler.apply(&frontends) {
            Ok(stats) => {
                retry = None;
                info!(
                    generation,
                    services = state.services.len(),
                    frontends = stats.frontends,
                    backends = stats.backends,
                    writes = stats.writes,
                    "datapath synced"
                );
            }
            Err(e) => {
                error!(generation, error = %e, "datapath update failed; retrying in 1s (the maps keep their last consistent state)");
                retry = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
        }
    }
}
