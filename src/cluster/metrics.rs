//! Prometheus metrics: a text exposition rendered from the status snapshot, served over
//! plain HTTP on the node's `metrics` address.

use super::orchestrator::{DiskState, ReplicaRole};
use super::status::ClusterStatus;
use std::fmt::Write as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Write latency histogram of a local volume, for the metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyHistogram {
    /// (upper bound in seconds, cumulative count)
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

fn disk_name(d: DiskState) -> &'static str {
    match d {
        DiskState::Diskless => "diskless",
        DiskState::Inconsistent => "inconsistent",
        DiskState::Outdated => "outdated",
        DiskState::Consistent => "consistent",
        DiskState::UpToDate => "up_to_date",
        DiskState::Failed => "failed",
    }
}

/// Renders the Prometheus text exposition for this node.
pub fn render(status: &ClusterStatus, latency: &[(String, LatencyHistogram)]) -> String {
    let mut out = String::new();
    let node = &status.node;
    let _ = writeln!(
        out,
        "# HELP tandem_quorate Whether this node hears a majority.\n# TYPE tandem_quorate gauge"
    );
    let _ = writeln!(
        out,
        "tandem_quorate{{node=\"{node}\"}} {}",
        u8::from(status.quorate)
    );
    let _ = writeln!(
        out,
        "# HELP tandem_membership_epoch Membership epoch of the cluster log.\n# TYPE tandem_membership_epoch gauge"
    );
    let _ = writeln!(
        out,
        "tandem_membership_epoch{{node=\"{node}\"}} {}",
        status.membership_epoch.0
    );
    let _ = writeln!(
        out,
        "# HELP tandem_node_up Whether a member is up in the cluster log.\n# TYPE tandem_node_up gauge"
    );
    for n in &status.nodes {
        let _ = writeln!(
            out,
            "tandem_node_up{{node=\"{node}\",member=\"{}\"}} {}",
            n.name,
            u8::from(n.up)
        );
    }
    let _ = writeln!(
        out,
        "# HELP tandem_volume_primary Which node is primary of a volume.\n# TYPE tandem_volume_primary gauge"
    );
    let _ = writeln!(
        out,
        "# HELP tandem_volume_role Role of the local replica (1 = primary).\n# TYPE tandem_volume_role gauge"
    );
    let _ = writeln!(
        out,
        "# HELP tandem_volume_disk_state Disk state of each replica.\n# TYPE tandem_volume_disk_state gauge"
    );
    let _ = writeln!(
        out,
        "# HELP tandem_volume_out_of_sync_bytes Bytes known out of sync with the peer.\n# TYPE tandem_volume_out_of_sync_bytes gauge"
    );
    let _ = writeln!(
        out,
        "# HELP tandem_volume_connected Whether the replica is connected to its peer.\n# TYPE tandem_volume_connected gauge"
    );
    let _ = writeln!(
        out,
        "# HELP tandem_volume_io_suspended Whether the replica's I/O is suspended (no quorum, or waiting for fencing): writes are held, not acknowledged.\n# TYPE tandem_volume_io_suspended gauge"
    );
    for v in &status.volumes {
        if let Some(p) = &v.primary {
            let _ = writeln!(
                out,
                "tandem_volume_primary{{node=\"{node}\",volume=\"{}\",primary=\"{p}\"}} 1",
                v.name
            );
        }
        for r in &v.replicas {
            let Some(report) = &r.report else { continue };
            let labels = format!(
                "node=\"{node}\",volume=\"{}\",replica=\"{}\"",
                v.name, r.node
            );
            let _ = writeln!(
                out,
                "tandem_volume_role{{{labels}}} {}",
                u8::from(report.role == ReplicaRole::Primary)
            );
            let _ = writeln!(
                out,
                "tandem_volume_disk_state{{{labels},state=\"{}\"}} 1",
                disk_name(report.disk)
            );
            let _ = writeln!(
                out,
                "tandem_volume_out_of_sync_bytes{{{labels}}} {}",
                report.out_of_sync_bytes
            );
            let _ = writeln!(
                out,
                "tandem_volume_connected{{{labels}}} {}",
                u8::from(report.connected)
            );
            let _ = writeln!(
                out,
                "tandem_volume_io_suspended{{{labels}}} {}",
                u8::from(report.suspended)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP tandem_failovers_total Failovers recorded in the cluster log.\n# TYPE tandem_failovers_total counter"
    );
    let _ = writeln!(
        out,
        "tandem_failovers_total{{node=\"{node}\"}} {}",
        status.failovers
    );
    let _ = writeln!(
        out,
        "# HELP tandem_switchovers_total Planned switchovers completed.\n# TYPE tandem_switchovers_total counter"
    );
    let _ = writeln!(
        out,
        "tandem_switchovers_total{{node=\"{node}\"}} {}",
        status.switchovers
    );
    let _ = writeln!(
        out,
        "# HELP tandem_fence_operations_total Fencings this node carried out.\n# TYPE tandem_fence_operations_total counter"
    );
    let _ = writeln!(
        out,
        "tandem_fence_operations_total{{node=\"{node}\"}} {}",
        status.fence_operations
    );
    let _ = writeln!(
        out,
        "# HELP tandem_write_latency_seconds Write latency of the local primary (acknowledged writes).\n# TYPE tandem_write_latency_seconds histogram"
    );
    for (volume, h) in latency {
        for (le, count) in &h.buckets {
            let _ = writeln!(
                out,
                "tandem_write_latency_seconds_bucket{{node=\"{node}\",volume=\"{volume}\",le=\"{le}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "tandem_write_latency_seconds_bucket{{node=\"{node}\",volume=\"{volume}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "tandem_write_latency_seconds_sum{{node=\"{node}\",volume=\"{volume}\"}} {}",
            h.sum_seconds
        );
        let _ = writeln!(
            out,
            "tandem_write_latency_seconds_count{{node=\"{node}\",volume=\"{volume}\"}} {}",
            h.count
        );
    }
    out
}

/// Serves `GET /metrics` (any path) with what `page` renders.
pub async fn serve(
    address: std::net::SocketAddr,
    page: impl Fn() -> String + Send + Sync + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let page = std::sync::Arc::new(page);
    loop {
        let (mut stream, _) = listener.accept().await?;
        let page = std::sync::Arc::clone(&page);
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            // Read the request head (we answer every request the same way).
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut buf))
                .await;
            let body = page();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::config::NodeRole;
    use crate::cluster::orchestrator::ReplicaReport;
    use crate::cluster::status::{NodeStatus, ReplicaStatus, VolumeStatus};
    use crate::cluster::types::{Epoch, Incarnation, NodeId};

    #[test]
    fn exposition_has_roles_states_counters_and_histograms() {
        let status = ClusterStatus {
            cluster: "demo".into(),
            node: "alpha".into(),
            node_id: NodeId(1),
            incarnation: Incarnation(2),
            leader: Some("alpha".into()),
            quorate: true,
            membership_epoch: Epoch(5),
            nodes: vec![NodeStatus {
                id: NodeId(1),
                name: "alpha".into(),
                role: NodeRole::Data,
                up: true,
                alive: true,
                incarnation: Incarnation(2),
                silence_ms: Some(0),
                leader: true,
            }],
            volumes: vec![VolumeStatus {
                name: "vol0".into(),
                primary: Some("alpha".into()),
                epoch: Epoch(3),
                pending_fence: None,
                switchover_to: None,
                replicas: vec![ReplicaStatus {
                    node: "alpha".into(),
                    outdated: false,
                    report: Some(ReplicaReport {
                        disk: DiskState::UpToDate,
                        role: ReplicaRole::Primary,
                        out_of_sync_bytes: 4096,
                        suspended: true,
                        ..ReplicaReport::default()
                    }),
                }],
            }],
            fencing: vec![],
            failovers: 2,
            switchovers: 1,
            fence_operations: 3,
        };
        let hist = LatencyHistogram {
            buckets: vec![(0.001, 5), (0.01, 9)],
            sum_seconds: 0.02,
            count: 10,
        };
        let text = render(&status, &[("vol0".into(), hist)]);
        for needle in [
            "tandem_quorate{node=\"alpha\"} 1",
            "tandem_volume_role{node=\"alpha\",volume=\"vol0\",replica=\"alpha\"} 1",
            "state=\"up_to_date\"} 1",
            "tandem_volume_out_of_sync_bytes{node=\"alpha\",volume=\"vol0\",replica=\"alpha\"} 4096",
            "tandem_volume_io_suspended{node=\"alpha\",volume=\"vol0\",replica=\"alpha\"} 1",
            "tandem_failovers_total{node=\"alpha\"} 2",
            "tandem_fence_operations_total{node=\"alpha\"} 3",
            "tandem_write_latency_seconds_bucket{node=\"alpha\",volume=\"vol0\",le=\"0.01\"} 9",
            "tandem_write_latency_seconds_count{node=\"alpha\",volume=\"vol0\"} 10",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn every_metric_the_dashboard_queries_is_exported() {
        let dashboard = include_str!("../../dist/grafana-dashboard.json");
        let status = ClusterStatus {
            cluster: "c".into(),
            node: "n".into(),
            node_id: NodeId(1),
            incarnation: Incarnation(1),
            leader: None,
            quorate: true,
            membership_epoch: Epoch(1),
            nodes: vec![NodeStatus {
                id: NodeId(1),
                name: "n".into(),
                role: NodeRole::Data,
                up: true,
                alive: true,
                incarnation: Incarnation(1),
                silence_ms: Some(0),
                leader: true,
            }],
            volumes: vec![VolumeStatus {
                name: "v".into(),
                primary: Some("n".into()),
                epoch: Epoch(1),
                pending_fence: None,
                switchover_to: None,
                replicas: vec![ReplicaStatus {
                    node: "n".into(),
                    outdated: false,
                    report: Some(ReplicaReport::default()),
                }],
            }],
            fencing: vec![],
            failovers: 0,
            switchovers: 0,
            fence_operations: 0,
        };
        let hist = LatencyHistogram {
            buckets: vec![(0.001, 1)],
            sum_seconds: 0.001,
            count: 1,
        };
        let text = render(&status, &[("v".into(), hist)]);
        let mut checked = 0;
        for word in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("tandem_") && word.len() > "tandem_".len() {
                assert!(
                    text.contains(word),
                    "the dashboard queries {word}, which tandemd does not export"
                );
                checked += 1;
            }
        }
        assert!(checked >= 10, "only {checked} metric references found");
    }
}
