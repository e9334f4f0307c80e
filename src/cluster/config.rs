//! The cluster configuration: one TOML file shared by every node.
//!
//! ```toml
//! [cluster]
//! name = "demo"
//! secret = "a long random string"     # or secret_file = "/etc/tandem/secret"
//! heartbeat_ms = 100                  # how often nodes say they are alive
//! failure_timeout_ms = 1000           # silence after which a node is declared dead
//! quorum_lease_ms = 600               # a primary without quorum suspends I/O after this
//! state_dir = "/var/lib/tandem/{node}"
//!
//! [[node]]
//! id = 1
//! name = "alpha"
//! address = "127.0.0.1:7790"          # the authenticated peer transport
//! [[node]]
//! id = 3
//! name = "witness"
//! address = "127.0.0.3:7790"
//! role = "witness"                    # votes, stores no data
//!
//! [[volume]]
//! name = "vol0"
//! size = "256M"
//! nodes = ["alpha", "beta"]
//! backing = "/var/lib/tandem/{node}/vol0.img"    # or a table: { alpha = "...", beta = "..." }
//! nbd = { alpha = "127.0.0.1:10809", beta = "127.0.0.2:10809" }
//! [[volume.resource]]
//! kind = "mount"
//! device = "/dev/ublkb0"
//! mountpoint = "/srv/data"
//! fstype = "ext4"
//! ```
//!
//! `{node}` in a path is replaced by the node's name. Validation happens at load; every
//! error names the file, the key and what is wrong.

use super::types::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
}

/// The whole configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cluster: ClusterSection,
    #[serde(rename = "node")]
    pub nodes: Vec<NodeConfig>,
    #[serde(rename = "volume", default)]
    pub volumes: Vec<VolumeConfig>,
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_failure_timeout_ms")]
    pub failure_timeout_ms: u64,
    #[serde(default = "default_quorum_lease_ms")]
    pub quorum_lease_ms: u64,
    #[serde(default = "default_state_dir")]
    pub state_dir: String,
    /// Where control sockets live (`{node}` expands); tandemctl finds them here.
    #[serde(default = "default_control_socket")]
    pub control_socket: String,
    /// The lock manager's client socket (`{node}` expands); a node's `dlm_socket`
    /// overrides it.
    #[serde(default = "default_dlm_socket")]
    pub dlm_socket: String,
}

fn default_heartbeat_ms() -> u64 {
    100
}
fn default_failure_timeout_ms() -> u64 {
    1000
}
fn default_quorum_lease_ms() -> u64 {
    600
}
fn default_state_dir() -> String {
    "/var/lib/tandem/{node}".into()
}
fn default_control_socket() -> String {
    "/run/tandem/{node}.sock".into()
}
fn default_dlm_socket() -> String {
    "/run/tandem/dlm.sock".into()
}

/// What a node does in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    /// Stores data and votes.
    #[default]
    Data,
    /// Votes only.
    Witness,
}

/// `[[node]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: NodeId,
    pub name: String,
    /// Address of the authenticated peer transport.
    pub address: SocketAddr,
    #[serde(default)]
    pub role: NodeRole,
    /// Prometheus metrics endpoint (HTTP), optional.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// The DLM client socket of this node, optional (`{node}` expands).
    #[serde(default)]
    pub dlm_socket: Option<String>,
}

/// Replication protocol: when a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Protocol {
    /// When it has been sent to the peer.
    A,
    /// When the peer has received it.
    B,
    /// When the write has completed on both nodes' disks (the default). Like a local
    /// disk's, a completed write may still sit in a disk cache: it is durable on both
    /// nodes once a FLUSH (or a FUA write) completes — the block layer's and DRBD's
    /// semantics.
    #[default]
    C,
}

/// A per-node value: one template with `{node}`, or a table by node name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerNode<T> {
    Template(T),
    Table(BTreeMap<String, T>),
}

/// `[[volume]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    /// Size with K/M/G/T suffix.
    pub size: String,
    /// The data nodes holding replicas (two).
    pub nodes: Vec<String>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Backing file or block device per node.
    pub backing: PerNode<String>,
    /// External metadata file per node; internal (end of the backing device) if absent.
    #[serde(default)]
    pub metadata: Option<PerNode<String>>,
    /// NBD export address per node (127.0.0.0/8 or a unix socket path).
    #[serde(default)]
    pub nbd: Option<PerNode<String>>,
    /// Export through ublk on the primary.
    #[serde(default)]
    pub ublk: bool,
    /// Shared devices (SAN/iSCSI LUN paths) per node, fenced with persistent reservations.
    #[serde(default)]
    pub shared_devices: Option<PerNode<Vec<String>>>,
    /// How a lost node's reservation is taken away: `preempt-and-abort` (default; falls
    /// back to plain PREEMPT where the target refuses it) or `preempt` (LIO tcm_loop).
    #[serde(default)]
    pub preempt: tandem_fence::policy::PreemptFlavour,
    /// Activity-log extents (4 MiB each) kept hot, like DRBD's `al-extents`: the most
    /// of the volume that can have writes in flight or unconfirmed by the peer at once,
    /// and so what a primary crash resyncs. More extents: fewer metadata writes under
    /// scattered writes (a write to an extent not in the log costs one); fewer: less to
    /// resync after a crash. A write that finds the log full waits for room. Applied when
    /// the metadata is created (`tandemctl create-md --al-extents` for existing devices);
    /// the metadata's own value is what runs.
    #[serde(default = "default_al_extents")]
    pub al_extents: u32,
    /// Resources started in order on the primary, stopped in reverse.
    #[serde(rename = "resource", default)]
    pub resources: Vec<ResourceConfig>,
}

fn default_al_extents() -> u32 {
    crate::store::activity_log::DEFAULT_EXTENTS
}

/// A resource on top of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ResourceConfig {
    /// Mount a filesystem.
    Mount {
        device: String,
        mountpoint: PathBuf,
        #[serde(default = "default_fstype")]
        fstype: String,
        #[serde(default)]
        options: Option<String>,
    },
    /// Export a directory over NFSv4.
    NfsExport {
        path: PathBuf,
        #[serde(default = "default_clients")]
        clients: String,
        #[serde(default)]
        options: Option<String>,
    },
    /// A floating IP address.
    Ip { address: String, interface: String },
    /// Any command: `start`/`stop` are run with `sh -c`.
    Exec { start: String, stop: String },
}

fn default_fstype() -> String {
    "ext4".into()
}
fn default_clients() -> String {
    "*".into()
}

/// A volume's values for one node, with templates expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOnNode {
    pub backing: PathBuf,
    pub metadata: Option<PathBuf>,
    pub nbd: Option<String>,
    pub shared_devices: Vec<PathBuf>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::parse(&file, &text)
    }

    /// Parses and validates configuration text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            file: file.into(),
            key: error_key(&e, text),
            problem: e.message().to_owned(),
        })?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |key: String, problem: String| ConfigError {
            file: file.into(),
            key,
            problem,
        };
        let c = &self.cluster;
        if c.name.is_empty()
            || !c
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            || c.name.len() > 32
        {
            return Err(err(
                "cluster.name".into(),
                format!("`{}` must be 1-32 letters, digits, - or _", c.name),
            ));
        }
        match (&c.secret, &c.secret_file) {
            (None, None) => {
                return Err(err(
                    "cluster.secret".into(),
                    "missing: set `secret` or `secret_file`".into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(err(
                    "cluster.secret".into(),
                    "set only one of `secret` and `secret_file`".into(),
                ));
            }
            (Some(s), None) if s.len() < 16 => {
                return Err(err(
                    "cluster.secret".into(),
                    format!("too short ({} bytes): use at least 16", s.len()),
                ));
            }
            _ => {}
        }
        if c.heartbeat_ms == 0 {
            return Err(err(
                "cluster.heartbeat_ms".into(),
                "must be positive".into(),
            ));
        }
        if c.failure_timeout_ms < 3 * c.heartbeat_ms {
            return Err(err(
                "cluster.failure_timeout_ms".into(),
                format!(
                    "{} ms is less than 3 heartbeats ({} ms)",
                    c.failure_timeout_ms,
                    3 * c.heartbeat_ms
                ),
            ));
        }
        if c.quorum_lease_ms >= c.failure_timeout_ms || c.quorum_lease_ms < c.heartbeat_ms {
            return Err(err(
                "cluster.quorum_lease_ms".into(),
                format!(
                    "{} ms must be at least one heartbeat ({} ms) and less than failure_timeout_ms ({} ms), so an isolated primary suspends before it is replaced",
                    c.quorum_lease_ms, c.heartbeat_ms, c.failure_timeout_ms
                ),
            ));
        }
        if self.nodes.is_empty() {
            return Err(err("node".into(), "no nodes configured".into()));
        }
        let mut ids = BTreeSet::new();
        let mut names = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let key = |field: &str| format!("node[{i}].{field}");
            if node.id.0 == 0 {
                return Err(err(key("id"), "0 is reserved; ids start at 1".into()));
            }
            if !ids.insert(node.id) {
                return Err(err(key("id"), format!("id {} is used twice", node.id)));
            }
            if node.name.is_empty()
                || !node
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            {
                return Err(err(
                    key("name"),
                    format!("`{}` must be letters, digits, - or _", node.name),
                ));
            }
            if !names.insert(node.name.as_str()) {
                return Err(err(
                    key("name"),
                    format!("name `{}` is used twice", node.name),
                ));
            }
            if !addresses.insert(node.address) {
                return Err(err(
                    key("address"),
                    format!("address {} is used twice", node.address),
                ));
            }
        }
        let data_nodes = self
            .nodes
            .iter()
            .filter(|n| n.role == NodeRole::Data)
            .count();
        if data_nodes == 0 {
            return Err(err(
                "node".into(),
                "no data node: at least one node needs role = \"data\"".into(),
            ));
        }
        let mut volume_names = BTreeSet::new();
        for (i, volume) in self.volumes.iter().enumerate() {
            let key = |field: &str| format!("volume[{i}].{field}");
            if volume.name.is_empty()
                || !volume
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            {
                return Err(err(
                    key("name"),
                    format!("`{}` must be letters, digits, - or _", volume.name),
                ));
            }
            if !volume_names.insert(volume.name.as_str()) {
                return Err(err(
                    key("name"),
                    format!("volume `{}` is defined twice", volume.name),
                ));
            }
            let size = crate::fixture::parse_size(&volume.size).map_err(|_| {
                err(
                    key("size"),
                    format!("`{}` is not a size such as 256M or 4G", volume.size),
                )
            })?;
            if size < (1 << 20) || size % 4096 != 0 {
                return Err(err(
                    key("size"),
                    format!("{size} bytes: must be at least 1 MiB and a multiple of 4 KiB"),
                ));
            }
            let al_range = crate::store::activity_log::EXTENTS;
            if !al_range.contains(&volume.al_extents) {
                return Err(err(
                    key("al_extents"),
                    format!(
                        "{} extents: must be {} to {} (the on-disk log holds at most {})",
                        volume.al_extents,
                        al_range.start(),
                        al_range.end(),
                        al_range.end()
                    ),
                ));
            }
            if volume.nodes.is_empty() || volume.nodes.len() > 2 {
                return Err(err(
                    key("nodes"),
                    format!(
                        "{} nodes listed: a volume has one or two replicas",
                        volume.nodes.len()
                    ),
                ));
            }
            for (j, name) in volume.nodes.iter().enumerate() {
                let Some(node) = self.node_by_name(name) else {
                    return Err(err(
                        format!("volume[{i}].nodes[{j}]"),
                        format!("unknown node `{name}`"),
                    ));
                };
                if node.role != NodeRole::Data {
                    return Err(err(
                        format!("volume[{i}].nodes[{j}]"),
                        format!("node `{name}` is a witness and stores no data"),
                    ));
                }
            }
            if volume.nodes.iter().collect::<BTreeSet<_>>().len() != volume.nodes.len() {
                return Err(err(key("nodes"), "a node is listed twice".into()));
            }
            check_per_node(&volume.backing, &volume.nodes, &key("backing"))
                .map_err(|p| err(key("backing"), p))?;
            if let Some(md) = &volume.metadata {
                check_per_node(md, &volume.nodes, &key("metadata"))
                    .map_err(|p| err(key("metadata"), p))?;
            }
            if let Some(nbd) = &volume.nbd {
                check_per_node(nbd, &volume.nodes, &key("nbd")).map_err(|p| err(key("nbd"), p))?;
                for node in &volume.nodes {
                    let address = nbd.for_node(node).unwrap_or_default();
                    if !address.starts_with('/') {
                        let parsed: SocketAddr = address.parse().map_err(|_| {
                            err(key("nbd"), format!("`{address}` for node `{node}` is neither ip:port nor a unix socket path"))
                        })?;
                        if !parsed.ip().is_loopback() {
                            return Err(err(
                                key("nbd"),
                                format!(
                                    "`{address}`: NBD exports listen on 127.0.0.0/8 or a unix socket only (NBD has no authentication)"
                                ),
                            ));
                        }
                    }
                }
            }
            if let Some(shared) = &volume.shared_devices {
                check_per_node(shared, &volume.nodes, &key("shared_devices"))
                    .map_err(|p| err(key("shared_devices"), p))?;
            }
            for (j, resource) in volume.resources.iter().enumerate() {
                let rkey = format!("volume[{i}].resource[{j}]");
                match resource {
                    ResourceConfig::Mount { mountpoint, .. } if !mountpoint.is_absolute() => {
                        return Err(err(
                            format!("{rkey}.mountpoint"),
                            "must be an absolute path".into(),
                        ));
                    }
                    ResourceConfig::NfsExport { path, .. } if !path.is_absolute() => {
                        return Err(err(
                            format!("{rkey}.path"),
                            "must be an absolute path".into(),
                        ));
                    }
                    ResourceConfig::Ip { address, .. }
                        if address.parse::<ipnet_like::Cidr>().is_err() =>
                    {
                        return Err(err(
                            format!("{rkey}.address"),
                            format!("`{address}` is not an address with prefix, e.g. 10.0.0.5/24"),
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The node called `name`.
    pub fn node_by_name(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node with id `id`.
    pub fn node(&self, id: NodeId) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The volume called `name`.
    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// The cluster secret (from `secret` or `secret_file`).
    pub fn secret(&self) -> Result<Vec<u8>, ConfigError> {
        match (&self.cluster.secret, &self.cluster.secret_file) {
            (Some(secret), _) => Ok(secret.as_bytes().to_vec()),
            (None, Some(path)) => {
                let bytes = std::fs::read(path).map_err(|e| ConfigError {
                    file: path.display().to_string(),
                    key: "cluster.secret_file".into(),
                    problem: format!("cannot read: {e}"),
                })?;
                let trimmed = bytes.trim_ascii().to_vec();
                if trimmed.len() < 16 {
                    return Err(ConfigError {
                        file: path.display().to_string(),
                        key: "cluster.secret_file".into(),
                        problem: "secret shorter than 16 bytes".into(),
                    });
                }
                Ok(trimmed)
            }
            (None, None) => Err(ConfigError {
                file: "(config)".into(),
                key: "cluster.secret".into(),
                problem: "missing".into(),
            }),
        }
    }

    /// The state directory of `node`.
    pub fn state_dir(&self, node: &str) -> PathBuf {
        PathBuf::from(expand(&self.cluster.state_dir, node))
    }

    /// The control socket of `node`.
    pub fn control_socket(&self, node: &str) -> PathBuf {
        PathBuf::from(expand(&self.cluster.control_socket, node))
    }

    /// The lock manager's client socket on `node`.
    pub fn dlm_socket(&self, node: &str) -> PathBuf {
        let template = self
            .node_by_name(node)
            .and_then(|n| n.dlm_socket.clone())
            .unwrap_or_else(|| self.cluster.dlm_socket.clone());
        PathBuf::from(expand(&template, node))
    }

    /// Number of voting members (data nodes and witnesses).
    pub fn voters(&self) -> usize {
        self.nodes.len()
    }
}

impl VolumeConfig {
    /// Size in bytes (validated at load).
    pub fn size_bytes(&self) -> u64 {
        crate::fixture::parse_size(&self.size).unwrap_or(0)
    }

    /// This volume's values for `node`.
    pub fn on_node(&self, node: &str) -> Option<VolumeOnNode> {
        if !self.nodes.iter().any(|n| n == node) {
            return None;
        }
        Some(VolumeOnNode {
            backing: PathBuf::from(self.backing.for_node(node)?),
            metadata: self
                .metadata
                .as_ref()
                .and_then(|m| m.for_node(node))
                .map(PathBuf::from),
            nbd: self.nbd.as_ref().and_then(|n| n.for_node(node)),
            shared_devices: self
                .shared_devices
                .as_ref()
                .and_then(|s| s.for_node_vec(node))
                .unwrap_or_default()
                .into_iter()
                .map(PathBuf::from)
                .collect(),
        })
    }
}

impl PerNode<String> {
    /// The value for `node`, `{node}` expanded.
    pub fn for_node(&self, node: &str) -> Option<String> {
        match self {
            PerNode::Template(t) => Some(expand(t, node)),
            PerNode::Table(table) => table.get(node).map(|v| expand(v, node)),
        }
    }
}

impl PerNode<Vec<String>> {
    fn for_node_vec(&self, node: &str) -> Option<Vec<String>> {
        match self {
            PerNode::Template(t) => Some(t.iter().map(|v| expand(v, node)).collect()),
            PerNode::Table(table) => table
                .get(node)
                .map(|v| v.iter().map(|s| expand(s, node)).collect()),
        }
    }
}

fn check_per_node<T>(value: &PerNode<T>, nodes: &[String], _key: &str) -> Result<(), String> {
    if let PerNode::Table(table) = value {
        for node in nodes {
            if !table.contains_key(node) {
                return Err(format!("no entry for node `{node}`"));
            }
        }
        for name in table.keys() {
            if !nodes.iter().any(|n| n == name) {
                return Err(format!(
                    "entry for `{name}`, which is not one of this volume's nodes"
                ));
            }
        }
    }
    Ok(())
}

fn expand(template: &str, node: &str) -> String {
    template.replace("{node}", node)
}

fn error_key(e: &toml::de::Error, text: &str) -> String {
    // toml reports a byte span; the message names the field. Give the line for context.
    match e.span() {
        Some(span) => {
            let line = text
                .get(..span.start)
                .map_or(0, |before| before.bytes().filter(|b| *b == b'\n').count())
                + 1;
            format!("line {line}")
        }
        None => "(document)".into(),
    }
}

/// A tiny address/prefix parser, so config validation needs no extra crate.
mod ipnet_like {
    /// `a.b.c.d/nn` or an IPv6 address with prefix.
    pub(super) struct Cidr;

    impl std::str::FromStr for Cidr {
        type Err = ();
        fn from_str(s: &str) -> Result<Self, ()> {
            let (addr, prefix) = s.split_once('/').ok_or(())?;
            let ip: std::net::IpAddr = addr.parse().map_err(|_| ())?;
            let prefix: u8 = prefix.parse().map_err(|_| ())?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if prefix > max { Err(()) } else { Ok(Cidr) }
        }
    }
}

/// The demo cluster's configuration: three nodes on 127.0.0.1-3, file-backed volume,
/// NBD exports, everything under `base` (no root needed). `{base}` is replaced.
pub const DEMO_CONFIG: &str = r#"
[cluster]
name = "demo"
secret = "tandem-demo-secret-not-for-production"
heartbeat_ms = 100
failure_timeout_ms = 800
quorum_lease_ms = 500
state_dir = "{base}/{node}"
control_socket = "{base}/{node}/control.sock"
dlm_socket = "{base}/{node}/dlm.sock"

[[node]]
id = 1
name = "alpha"
address = "127.0.0.1:7791"
metrics = "127.0.0.1:9791"

[[node]]
id = 2
name = "beta"
address = "127.0.0.2:7791"
metrics = "127.0.0.2:9791"

[[node]]
id = 3
name = "witness"
address = "127.0.0.3:7791"
role = "witness"

[[volume]]
name = "vol0"
size = "64M"
nodes = ["alpha", "beta"]
protocol = "C"
backing = "{base}/{node}/vol0.img"
nbd = { alpha = "127.0.0.1:10809", beta = "127.0.0.2:10809" }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> String {
        DEMO_CONFIG.replace("{base}", "/tmp/tandem-demo")
    }

    #[test]
    fn demo_config_is_valid_and_expands_templates() {
        let config = Config::parse("demo.toml", &demo()).unwrap();
        assert_eq!(config.nodes.len(), 3);
        assert_eq!(config.voters(), 3);
        let vol = config.volume("vol0").unwrap();
        assert_eq!(vol.size_bytes(), 64 << 20);
        assert_eq!(vol.al_extents, 257, "DRBD's default al-extents");
        let on_beta = vol.on_node("beta").unwrap();
        assert_eq!(
            on_beta.backing,
            PathBuf::from("/tmp/tandem-demo/beta/vol0.img")
        );
        assert_eq!(on_beta.nbd.as_deref(), Some("127.0.0.2:10809"));
        assert!(vol.on_node("witness").is_none());
        assert_eq!(
            config.state_dir("alpha"),
            PathBuf::from("/tmp/tandem-demo/alpha")
        );
        assert_eq!(config.secret().unwrap().len(), 37);
    }

    fn error_of(text: &str) -> ConfigError {
        Config::parse("t.toml", text).unwrap_err()
    }

    #[test]
    fn errors_name_the_file_key_and_problem() {
        let base = demo();
        let e = error_of(&base.replace(
            r#"nodes = ["alpha", "beta"]"#,
            r#"nodes = ["alpha", "gamma"]"#,
        ));
        assert_eq!(e.file, "t.toml");
        assert_eq!(e.key, "volume[0].nodes[1]");
        assert!(e.problem.contains("unknown node `gamma`"), "{e}");

        let e = error_of(&base.replace(
            r#"nodes = ["alpha", "beta"]"#,
            r#"nodes = ["alpha", "witness"]"#,
        ));
        assert!(e.problem.contains("witness"), "{e}");

        let e = error_of(&base.replace("size = \"64M\"", "size = \"lots\""));
        assert_eq!(e.key, "volume[0].size");

        let e = error_of(&base.replace("size = \"64M\"", "size = \"64M\"\nal_extents = 1"));
        assert_eq!(e.key, "volume[0].al_extents");
        assert!(e.problem.contains("must be 2 to 1000"), "{e}");
        let e = error_of(&base.replace("size = \"64M\"", "size = \"64M\"\nal_extents = 1001"));
        assert_eq!(e.key, "volume[0].al_extents");

        let e = error_of(&base.replace("id = 2\n", "id = 1\n"));
        assert_eq!(e.key, "node[1].id");

        let e = error_of(&base.replace("quorum_lease_ms = 500", "quorum_lease_ms = 900"));
        assert_eq!(e.key, "cluster.quorum_lease_ms");

        let e = error_of(&base.replace(
            r#"secret = "tandem-demo-secret-not-for-production""#,
            r#"secret = "short""#,
        ));
        assert_eq!(e.key, "cluster.secret");

        let e =
            error_of(&base.replace(r#"beta = "127.0.0.2:10809""#, r#"beta = "10.1.1.1:10809""#));
        assert!(e.problem.contains("127.0.0.0/8"), "{e}");

        let e = error_of(&base.replace(
            r#"nbd = { alpha = "127.0.0.1:10809", beta = "127.0.0.2:10809" }"#,
            r#"nbd = { alpha = "127.0.0.1:10809" }"#,
        ));
        assert!(e.problem.contains("no entry for node `beta`"), "{e}");

        let e =
            error_of(&base.replace("heartbeat_ms = 100", "heartbeat_ms = 100\ncolour = \"red\""));
        assert!(e.problem.contains("colour"), "{e}");

        let e = error_of("[cluster\nname=");
        assert_eq!(e.file, "t.toml");
    }

    #[test]
    fn resources_parse_in_order_and_are_checked() {
        let text = format!(
            "{}\n[[volume.resource]]\nkind = \"mount\"\ndevice = \"/dev/ublkb0\"\nmountpoint = \"/srv\"\n[[volume.resource]]\nkind = \"ip\"\naddress = \"10.0.0.5/24\"\ninterface = \"eth0\"\n",
            demo()
        );
        let config = Config::parse("r.toml", &text).unwrap();
        let resources = &config.volumes[0].resources;
        assert!(matches!(resources[0], ResourceConfig::Mount { .. }));
        assert!(matches!(resources[1], ResourceConfig::Ip { .. }));
        let bad = text.replace("10.0.0.5/24", "10.0.0.5");
        let e = Config::parse("r.toml", &bad).unwrap_err();
        assert_eq!(e.key, "volume[0].resource[1].address");
        let bad = text.replace("mountpoint = \"/srv\"", "mountpoint = \"srv\"");
        assert_eq!(
            Config::parse("r.toml", &bad).unwrap_err().key,
            "volume[0].resource[0].mountpoint"
        );
    }
}
