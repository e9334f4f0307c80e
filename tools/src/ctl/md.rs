//! `tandemctl create-md` and `tandemctl dump-md`: a replicated volume's on-disk metadata.
//!
//! `create-md` writes fresh metadata (internal at the end of the backing device, or an
//! external file) with generation ids 0 ("no data yet"); both replicas of a volume need
//! the same `--volume` and different `--node-id`s (`--zeroed`: known-zero devices start
//! consistent at a shared generation, with no initial full sync). `dump-md` shows what is on disk, as
//! text or `--json`; a damaged superblock is reported with the reason.
//! `forget-cluster-log` makes a stopped replica forget the cluster log it followed (a
//! cluster whose state directory was created afresh has a new log, with new epochs); it
//! joins the cluster's log at its next start.

/// Writes a line to standard output (the tools' output; libraries never print).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

use anyhow::{Context, bail};
use clap::Args;
use std::path::PathBuf;
use tandem::replication::metadata_io;
use tandem::replication::types::{NodeId, VolumeId};
use tandem::store::metadata::{CreateParams, MetadataFile};

/// `tandemctl create-md`.
#[derive(Debug, Args)]
pub struct CreateMdArgs {
    /// Backing file or block device.
    #[arg(long)]
    pub backing: PathBuf,
    /// Put the metadata in this file instead of at the end of the backing device.
    #[arg(long)]
    pub external: Option<PathBuf>,
    /// Volume name (the volume id is derived from it) ...
    #[arg(long, conflicts_with = "volume_id")]
    pub volume: Option<String>,
    /// ... or an explicit volume id (32 hex digits).
    #[arg(long)]
    pub volume_id: Option<String>,
    /// This replica's node id (the two replicas must differ).
    #[arg(long)]
    pub node_id: u32,
    /// Bytes per dirty-bitmap bit (power of two >= 512).
    #[arg(long, default_value_t = 4096)]
    pub bitmap_granularity: u32,
    /// Activity-log extents kept hot (2..=1000; DRBD's al-extents): more means fewer
    /// metadata writes under scattered writes, fewer means less to resync after a crash.
    #[arg(long, default_value_t = 257)]
    pub al_extents: u32,
    /// The data area reads as zeros (a new sparse file, a new thin volume, a device
    /// discarded with zeroing): the replica starts consistent, and replicas created this
    /// way skip the initial full sync (DRBD's `new-current-uuid --clear-bitmap`). Give it
    /// on every replica of the volume, and only when true: data left on a device is not
    /// synced (`tandemctl verify` would find it).
    #[arg(long)]
    pub zeroed: bool,
    /// Overwrite existing metadata.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

/// `tandemctl dump-md`.
#[derive(Debug, Args)]
pub struct DumpMdArgs {
    /// Backing device (internal metadata) or external metadata file.
    pub path: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// Runs `create-md`.
pub fn create(args: CreateMdArgs) -> anyhow::Result<i32> {
    let volume_id = match (&args.volume, &args.volume_id) {
        (Some(name), None) => VolumeId::from_name(name),
        (None, Some(id)) => VolumeId::parse(id)
            .with_context(|| format!("--volume-id `{id}` is not 32 hex digits"))?,
        _ => bail!("give --volume NAME or --volume-id ID"),
    };
    let md_path = args
        .external
        .clone()
        .unwrap_or_else(|| args.backing.clone());
    if !args.force && MetadataFile::open(&md_path).is_ok() {
        bail!(
            "{} already holds tandem metadata (use --force to overwrite it)",
            md_path.display()
        );
    }
    let mut params = CreateParams::new(volume_id, NodeId(args.node_id));
    params.bitmap_granularity = args.bitmap_granularity;
    params.al_extents = args.al_extents;
    params.zeroed = args.zeroed;
    if args.external.is_some() {
        params.internal = false;
        let size = std::fs::File::open(&args.backing)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
            .with_context(|| format!("reading the size of {}", args.backing.display()))?;
        params.data_size_bytes = Some(size);
    }
    let md = MetadataFile::create(&md_path, &params)
        .with_context(|| format!("creating metadata on {}", md_path.display()))?;
    let dump = md.dump().context("reading back the new metadata")?;
    if args.json {
        say!("{}", serde_json::to_string_pretty(&dump)?);
    } else {
        say!("{dump}");
    }
    Ok(0)
}

/// `tandemctl forget-cluster-log`.
#[derive(Debug, Args)]
pub struct ForgetClusterLogArgs {
    /// Backing device (internal metadata) or external metadata file of a stopped replica.
    pub path: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// Runs `forget-cluster-log` ([`metadata_io::forget_cluster_log`], which the
/// replication simulator runs too).
pub fn forget_cluster_log(args: ForgetClusterLogArgs) -> anyhow::Result<i32> {
    let mut md = MetadataFile::open(&args.path)
        .with_context(|| format!("reading metadata from {}", args.path.display()))?;
    let before = metadata_io::forget_cluster_log(&mut md)
        .with_context(|| format!("writing the superblock of {}", args.path.display()))?;
    if args.json {
        say!(
            "{}",
            serde_json::json!({
                "path": args.path,
                "forgot_cluster_log": before.0.to_string(),
                "forgot_epoch": before.1.0,
            })
        );
    } else {
        say!(
            "{}: forgot cluster log {} (epoch {}); the replica joins its cluster's log at its next start",
            args.path.display(),
            before.0,
            before.1.0
        );
    }
    Ok(0)
}

/// Runs `dump-md`.
pub fn dump(args: DumpMdArgs) -> anyhow::Result<i32> {
    let md = MetadataFile::open(&args.path)
        .with_context(|| format!("reading metadata from {}", args.path.display()))?;
    let dump = md.dump().context("reading the bitmap and activity log")?;
    if args.json {
        say!("{}", serde_json::to_string_pretty(&dump)?);
    } else {
        say!("{dump}");
    }
    Ok(0)
}
