//! Running a node as a daemon: the node, its control socket, its metrics endpoint,
//! systemd notification (READY, STATUS, WATCHDOG) and graceful SIGTERM.

use super::config::Config;
use super::control;
use super::fencing::ReservationFencer;
use super::metrics::{self, LatencyHistogram};
use super::node::{Fencer, Node, NodeError, NodeOptions};
use super::volume::VolumeDriver;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Supplies a volume's write-latency histogram to the metrics endpoint.
pub type LatencySource = Arc<dyn Fn() -> Vec<(String, LatencyHistogram)> + Send + Sync>;

/// What the daemon runs.
pub struct DaemonOptions {
    pub config: Config,
    pub node: String,
    /// Extra volume drivers (tests); the configured volumes are started by `run`.
    pub drivers: BTreeMap<String, Arc<dyn VolumeDriver>>,
    pub latency: Option<LatencySource>,
}

impl std::fmt::Debug for DaemonOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonOptions")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    let _ = sd_notify::notify(false, state);
}

/// Starts the node and serves until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(options: DaemonOptions) -> Result<(), NodeError> {
    let DaemonOptions {
        config,
        node: name,
        mut drivers,
        latency,
    } = options;
    let volumes_for_metrics: Arc<std::sync::Mutex<Vec<super::replica::ClusterVolume>>> =
        Arc::default();
    let fencer = ReservationFencer::from_config(&config, &name).map(Arc::new);
    let latency = latency.or_else(|| Some(volume_latency(Arc::clone(&volumes_for_metrics))));
    // Volumes first (the node needs their drivers); they reach the node through `slot`.
    let slot: super::replica::NodeSlot = Arc::default();
    let replicated = super::replica::start_volumes(&config, &name, &slot).await?;
    *volumes_for_metrics
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = replicated.clone();
    for volume in &replicated {
        drivers.insert(volume.volume().name().to_owned(), Arc::new(volume.clone()));
    }
    for volume in &config.volumes {
        if let Some(on_node) = volume.on_node(&name)
            && let Some(device) = on_node.shared_devices.first()
        {
            drivers.insert(
                volume.name.clone(),
                Arc::new(super::shared::SharedDisk::new(device.clone())),
            );
        }
    }
    let metrics_address = config.node_by_name(&name).and_then(|n| n.metrics);
    let control_path = config.control_socket(&name);
    let self_check_period = Duration::from_millis(config.cluster.quorum_lease_ms);
    let config_copy = config.clone();
    let node = Node::start(NodeOptions {
        config,
        node: name.clone(),
        drivers,
        fencer: fencer.clone().map(|f| f as Arc<dyn Fencer>),
    })
    .await?;
    if slot.set(node.clone()).is_err() {
        tracing::error!("the node was started twice");
    }
    let _exports = start_frontends(&config_copy, &name, &replicated).await?;
    // The self-check: if our key disappears from a shared device we were fenced — stop
    // writing there at once, before anything else. It watches the current life's key:
    // when the node rejoins as a new incarnation, the check moves to the new key.
    let self_checks: Arc<std::sync::Mutex<Vec<tandem_fence::policy::SelfCheckTask>>> =
        Arc::default();
    if let Some(fencer) = &fencer {
        let (lost_tx, mut lost_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let lost: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(move |volume: &str| {
            let _ = lost_tx.send(volume.to_owned());
        });
        *self_checks.lock().unwrap_or_else(|e| e.into_inner()) =
            fencer.self_check(node.incarnation(), self_check_period, Arc::clone(&lost));
        let fenced_node = node.clone();
        tokio::spawn(async move {
            while let Some(volume) = lost_rx.recv().await {
                fenced_node.lost_reservation(&volume).await;
            }
        });
        let (checks, fencer, watched) =
            (Arc::clone(&self_checks), Arc::clone(fencer), node.clone());
        tokio::spawn(async move {
            let mut incarnation = watched.incarnation();
            loop {
                tokio::time::sleep(self_check_period).await;
                if watched.incarnation() == incarnation {
                    continue;
                }
                incarnation = watched.incarnation();
                let fresh = fencer.self_check(incarnation, self_check_period, Arc::clone(&lost));
                let old = std::mem::replace(
                    &mut *checks.lock().unwrap_or_else(|e| e.into_inner()),
                    fresh,
                );
                tokio::task::spawn_blocking(move || {
                    old.into_iter()
                        .for_each(tandem_fence::policy::SelfCheckTask::stop)
                });
            }
        });
    }
    let dlm_socket = node.config().dlm_socket(&name);
    let _dlm = super::dlm::DlmService::start(&node, dlm_socket.clone()).await?;
    tracing::info!(socket = %dlm_socket.display(), "lock manager serving");
    let span = tracing::info_span!("node", node = %name, node_id = %node.id(), incarnation = %node.incarnation());
    let _guard = span.enter();

    let control_node = node.clone();
    let control_path_shown = control_path.display().to_string();
    tokio::spawn(async move {
        if let Err(e) = control::serve(control_node, control_path).await {
            tracing::error!(path = %control_path_shown, error = %e, "control socket failed");
        }
    });
    if let Some(address) = metrics_address {
        let metrics_node = node.clone();
        tokio::spawn(async move {
            let page = move || {
                let histograms = latency.as_ref().map(|l| l()).unwrap_or_default();
                metrics::render(&metrics_node.status(), &histograms)
            };
            if let Err(e) = metrics::serve(address, page).await {
                tracing::error!(%address, error = %e, "metrics endpoint failed");
            }
        });
    }
    notify(&[sd_notify::NotifyState::Ready]);
    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let status_node = node.clone();
    tokio::spawn(async move {
        let period = if watchdog {
            Duration::from_micros(watchdog_usec / 2)
        } else {
            Duration::from_secs(2)
        };
        loop {
            tokio::time::sleep(period).await;
            let s = status_node.status();
            let primaries: Vec<String> = s
                .volumes
                .iter()
                .filter(|v| v.primary.as_deref() == Some(s.node.as_str()))
                .map(|v| v.name.clone())
                .collect();
            let line = format!(
                "{}; leader {}; primary of [{}]",
                if s.quorate { "quorate" } else { "NO QUORUM" },
                s.leader.as_deref().unwrap_or("none"),
                primaries.join(", ")
            );
            notify(&[sd_notify::NotifyState::Status(&line)]);
            if watchdog {
                notify(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| NodeError::Propose(format!("cannot install the SIGTERM handler: {e}")))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    let checks = std::mem::take(&mut *self_checks.lock().unwrap_or_else(|e| e.into_inner()));
    for task in checks {
        task.stop();
    }
    node.shutdown().await;
    for volume in &replicated {
        if let Err(e) = volume.volume().shutdown().await {
            tracing::warn!(volume = %volume.volume().name(), error = %e, "volume shutdown");
        }
    }
    Ok(())
}

/// What keeps the frontends running (dropping it does not stop them; the process does).
#[derive(Debug, Default)]
pub struct Frontends {
    pub nbd: Vec<String>,
    pub ublk: Vec<crate::frontend::ublk::UblkDevice>,
}

/// Starts the NBD exports and ublk devices the configuration asks for on this node.
async fn start_frontends(
    config: &Config,
    name: &str,
    volumes: &[super::replica::ClusterVolume],
) -> Result<Frontends, NodeError> {
    let mut frontends = Frontends::default();
    for volume in volumes {
        let Some(vc) = config.volume(volume.volume().name()) else {
            continue;
        };
        let exports = crate::frontend::nbd::Exports::new(vec![volume.volume().clone()]);
        if let Some(address) = vc.on_node(name).and_then(|o| o.nbd) {
            if address.starts_with('/') {
                crate::frontend::nbd::serve_unix(std::path::Path::new(&address), exports)
                    .await
                    .map_err(|e| {
                        NodeError::Propose(format!("NBD export of {} on {address}: {e}", vc.name))
                    })?;
            } else {
                let addr: std::net::SocketAddr = address.parse().map_err(|_| {
                    NodeError::Propose(format!("NBD address `{address}` of {}", vc.name))
                })?;
                crate::frontend::nbd::serve_tcp(addr, exports)
                    .await
                    .map_err(|e| {
                        NodeError::Propose(format!("NBD export of {} on {address}: {e}", vc.name))
                    })?;
            }
            tracing::info!(volume = %vc.name, nbd = %address, "NBD export ready");
            frontends.nbd.push(address);
        }
        if vc.ublk {
            let device = volume.start_ublk().await?;
            tracing::info!(volume = %vc.name, device = %device.path(), "ublk device ready");
            frontends.ublk.push(device);
        }
    }
    Ok(frontends)
}

/// The write-latency histograms of this node's replicated volumes, for the metrics page.
fn volume_latency(
    volumes: Arc<std::sync::Mutex<Vec<super::replica::ClusterVolume>>>,
) -> LatencySource {
    Arc::new(move || {
        volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|v| {
                let s = v.volume().write_latency();
                (
                    v.volume().name().to_owned(),
                    LatencyHistogram {
                        buckets: s.buckets,
                        sum_seconds: s.sum_seconds,
                        count: s.count,
                    },
                )
            })
            .collect()
    })
}
