//! Reservation fencing for volumes on shared devices, through `tandem-fence`'s policy.
//!
//! A node's key is derived from the cluster name, its id and its incarnation, so it is
//! the same on every path and new in every life. Unfence registers it on every path of
//! every shared device (and reserves Write Exclusive – Registrants Only where nobody
//! holds a reservation); fence preempts a victim life's key and confirms it is gone; the
//! self-check notices within one period when this node's own key has been taken.

use super::config::Config;
use super::node::Fencer;
use super::types::{Incarnation, NodeId};
use super::volume::BoxFuture;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tandem_fence::PrKey;
use tandem_fence::policy::{FencePolicy, FenceSettings, SelfCheckEvent, SelfCheckTask};
use tandem_fence::transport::OpenOptions;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The reservation key of `node` in life `incarnation` of cluster `cluster`.
pub fn node_key(cluster: &str, node: NodeId, incarnation: Incarnation) -> PrKey {
    PrKey::derive(
        cluster,
        u16::try_from(node.0).unwrap_or(u16::MAX),
        u32::try_from(incarnation.0).unwrap_or(u32::MAX),
    )
}

/// Fencing with persistent reservations on this node's view of each shared volume.
#[derive(Debug, Clone)]
pub struct ReservationFencer {
    cluster: String,
    me: NodeId,
    /// Volume name → (devices on this node, settings).
    volumes: Vec<(String, Vec<String>, FenceSettings)>,
    /// The life whose key `unfence` registered last (0: none yet).
    incarnation: Arc<std::sync::atomic::AtomicU64>,
}

impl ReservationFencer {
    /// A fencer for node `node`'s shared volumes; `None` if it has none.
    pub fn from_config(config: &Config, node: &str) -> Option<Self> {
        let me = config.node_by_name(node)?.id;
        let volumes: Vec<(String, Vec<String>, FenceSettings)> = config
            .volumes
            .iter()
            .filter_map(|v| {
                let on = v.on_node(node)?;
                (!on.shared_devices.is_empty()).then(|| {
                    let devices = on
                        .shared_devices
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect();
                    let settings = FenceSettings {
                        preempt: v.preempt,
                        ..FenceSettings::default()
                    };
                    (v.name.clone(), devices, settings)
                })
            })
            .collect();
        (!volumes.is_empty()).then(|| Self {
            cluster: config.cluster.name.clone(),
            me,
            volumes,
            incarnation: Arc::default(),
        })
    }

    fn policy(&self, volume: &str, incarnation: Incarnation) -> Result<FencePolicy, String> {
        let (_, devices, settings) = self
            .volumes
            .iter()
            .find(|(name, _, _)| name == volume)
            .ok_or_else(|| format!("volume {volume} has no shared devices on this node"))?;
        let devices: Vec<&str> = devices.iter().map(String::as_str).collect();
        FencePolicy::open(
            node_key(&self.cluster, self.me, incarnation),
            &devices,
            &OpenOptions::default(),
            settings.clone(),
        )
        .map_err(|e| format!("opening the shared devices of {volume}: {e}"))
    }

    /// Starts a self-check per shared volume for life `incarnation`; `lost` is called
    /// with the volume's name when this node's key is gone from it.
    pub fn self_check(
        &self,
        incarnation: Incarnation,
        period: Duration,
        lost: Arc<dyn Fn(&str) + Send + Sync>,
    ) -> Vec<SelfCheckTask> {
        let mut tasks = Vec::new();
        for (volume, _, settings) in &self.volumes {
            let policy = match self.policy(volume, incarnation) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(%volume, error = %e, "no self-check");
                    continue;
                }
            };
            let name = volume.clone();
            let lost = Arc::clone(&lost);
            let sink = move |event: SelfCheckEvent| {
                if let SelfCheckEvent::KeyLost { .. } = event {
                    lost(&name);
                }
            };
            match SelfCheckTask::spawn(
                policy.paths().to_vec(),
                policy.key(),
                period,
                settings.retries,
                sink,
            ) {
                Ok(task) => tasks.push(task),
                Err(e) => tracing::error!(%volume, error = %e, "cannot start the self-check"),
            }
        }
        tasks
    }
}

impl Fencer for ReservationFencer {
    fn fence(
        &self,
        volume: &str,
        victim: NodeId,
        incarnation: Incarnation,
    ) -> BoxFuture<'_, Result<String, String>> {
        let volume = volume.to_owned();
        Box::pin(async move {
            // Our own current key: the one `unfence` registered for this life.
            let own_incarnation = self.current_incarnation()?;
            let victim_key = node_key(&self.cluster, victim, incarnation);
            // Opening the devices blocks (open(2), probing commands) like the fence
            // itself: both run off the async runtime, which must keep heartbeats going.
            let fencer = self.clone();
            let record = tokio::task::spawn_blocking(move || {
                let policy = fencer.policy(&volume, own_incarnation)?;
                policy
                    .fence(victim_key, now_ms())
                    .map_err(|e| format!("fencing {victim_key} on {volume}: {e}"))
            })
            .await
            .map_err(|e| e.to_string())??;
            Ok(serde_json::to_string(&record).unwrap_or_else(|_| format!("{record:?}")))
        })
    }

    fn unfence(&self, incarnation: Incarnation) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.set_incarnation(incarnation);
            for (volume, _, _) in &self.volumes {
                let fencer = self.clone();
                let name = volume.clone();
                let record = tokio::task::spawn_blocking(move || {
                    let policy = fencer.policy(&name, incarnation)?;
                    policy
                        .unfence(now_ms())
                        .map_err(|e| format!("unfencing {name}: {e}"))
                })
                .await
                .map_err(|e| e.to_string())??;
                if !record.is_complete() {
                    return Err(format!(
                        "registered on only some paths of {volume}: {:?}",
                        record.paths
                    ));
                }
                tracing::info!(%volume, pr_key = %record.key, reserved = record.reserved, "unfenced");
            }
            Ok(())
        })
    }
}

impl ReservationFencer {
    fn set_incarnation(&self, incarnation: Incarnation) {
        self.incarnation
            .store(incarnation.0, std::sync::atomic::Ordering::Release);
    }

    fn current_incarnation(&self) -> Result<Incarnation, String> {
        match self.incarnation.load(std::sync::atomic::Ordering::Acquire) {
            0 => Err("this node has not unfenced yet: it holds no key to fence with".into()),
            n => Ok(Incarnation(n)),
        }
    }
}
