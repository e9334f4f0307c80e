//! `mount.tandem`: mounts a tandem volume where it may be mounted.
//!
//! mount(8) runs it for `mount -t tandem VOLUME DIR -o OPTIONS`:
//!
//! ```text
//! mount.tandem VOLUME DIR [-sfnv] [-o fstype=ext4,config=FILE,node=NAME,device=DEV,other,...]
//! ```
//!
//! It asks the local `tandemd` whether this node is the volume's primary with quorum —
//! an exclusive filesystem (ext4, xfs, ...) on a replicated or shared volume must be mounted
//! by one node only, and tandem's cluster log says which one — and only then runs
//! `mount -i -t FSTYPE DEVICE DIR -o other,...` on the volume's local block device (the
//! ublk device tandemd reports, the configured shared device, or `device=`). Cluster
//! filesystems (gfs2, ocfs2) are mounted on every node that asks: their own lock manager
//! arbitrates.

use anyhow::{Context, bail};
use std::path::PathBuf;
use tandem::cluster::config::Config;

/// Filesystems that arbitrate concurrent mounts themselves.
const CLUSTER_FILESYSTEMS: [&str; 2] = ["gfs2", "ocfs2"];

/// A parsed mount.tandem invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub volume: String,
    pub dir: PathBuf,
    pub fstype: String,
    pub config: PathBuf,
    pub node: Option<String>,
    pub device: Option<String>,
    /// Options passed on to the real mount.
    pub options: Vec<String>,
    pub fake: bool,
    pub verbose: bool,
    pub no_mtab: bool,
    pub sloppy: bool,
}

/// Parses mount(8)'s helper calling convention.
pub fn parse(args: &[String]) -> anyhow::Result<Invocation> {
    let mut positional = Vec::new();
    let mut raw_options = Vec::new();
    let (mut fake, mut verbose, mut no_mtab, mut sloppy) = (false, false, false, false);
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        match arg.as_str() {
            "-o" => {
                i += 1;
                let value = args.get(i).context("-o needs an option list")?;
                raw_options.extend(
                    value
                        .split(',')
                        .filter(|o| !o.is_empty())
                        .map(str::to_owned),
                );
            }
            "-t" | "-N" => i += 1,
            flags if flags.starts_with('-') && flags.len() > 1 && !flags.starts_with("--") => {
                for flag in flags[1..].chars() {
                    match flag {
                        'f' => fake = true,
                        'v' => verbose = true,
                        'n' => no_mtab = true,
                        's' => sloppy = true,
                        other => bail!("unknown flag -{other}"),
                    }
                }
            }
            _ => positional.push(arg.clone()),
        }
        i += 1;
    }
    let [volume, dir] = positional.as_slice() else {
        bail!(
            "usage: mount.tandem VOLUME DIR [-sfnv] [-o fstype=TYPE,config=FILE,node=NAME,device=DEV,...]"
        );
    };
    let mut invocation = Invocation {
        volume: volume.clone(),
        dir: PathBuf::from(dir),
        fstype: "ext4".into(),
        config: PathBuf::from(crate::ctl::cluster::DEFAULT_CONFIG),
        node: None,
        device: None,
        options: Vec::new(),
        fake,
        verbose,
        no_mtab,
        sloppy,
    };
    for option in raw_options {
        match option.split_once('=') {
            Some(("fstype", v)) => invocation.fstype = v.to_owned(),
            Some(("config", v)) => invocation.config = PathBuf::from(v),
            Some(("node", v)) => invocation.node = Some(v.to_owned()),
            Some(("device", v)) => invocation.device = Some(v.to_owned()),
            _ => invocation.options.push(option),
        }
    }
    if invocation.fstype.is_empty() || invocation.fstype == "tandem" {
        bail!(
            "fstype=`{}` is not a filesystem to mount",
            invocation.fstype
        );
    }
    Ok(invocation)
}

/// Runs mount.tandem; returns mount(8)'s exit code convention (0 ok, 32 failure).
pub fn run(invocation: &Invocation) -> anyhow::Result<i32> {
    let config = Config::load(&invocation.config)?;
    let node = match &invocation.node {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let volume = config.volume(&invocation.volume).with_context(|| {
        format!(
            "no volume `{}` in {}",
            invocation.volume,
            invocation.config.display()
        )
    })?;
    let on_node = volume
        .on_node(&node)
        .with_context(|| format!("node `{node}` holds no replica of `{}`", invocation.volume))?;
    let target = crate::ctl::cluster::Target {
        socket: None,
        config: invocation.config.clone(),
        node: Some(node.clone()),
    };
    let status = crate::ctl::cluster::fetch_status(&target)?;
    let cluster_fs = CLUSTER_FILESYSTEMS.contains(&invocation.fstype.as_str());
    let record = status
        .volumes
        .iter()
        .find(|v| v.name == invocation.volume)
        .context("tandemd does not report this volume")?;
    if !status.quorate {
        bail!(
            "node {node} has no quorum: refusing to mount {}",
            invocation.volume
        );
    }
    if !cluster_fs && record.primary.as_deref() != Some(node.as_str()) {
        bail!(
            "{} is a {} filesystem on volume {} whose primary is {}, not {node}: mount it there \
             (or `tandemctl switchover {} --to {node}`)",
            invocation.dir.display(),
            invocation.fstype,
            invocation.volume,
            record.primary.as_deref().unwrap_or("nobody"),
            invocation.volume
        );
    }
    let device = invocation
        .device
        .clone()
        .or_else(|| {
            record
                .replicas
                .iter()
                .find(|r| r.node == node)
                .and_then(|r| r.report.as_ref())
                .and_then(|r| r.device.clone())
        })
        .or_else(|| on_node.shared_devices.first().map(|d| d.display().to_string()))
        .context("no local block device for this volume: export it with ublk, configure shared_devices, or pass -o device=")?;
    let mut command = std::process::Command::new("mount");
    command.arg("-i").args(["-t", &invocation.fstype]);
    if !invocation.options.is_empty() {
        command.args(["-o", &invocation.options.join(",")]);
    }
    if invocation.fake {
        command.arg("-f");
    }
    if invocation.no_mtab {
        command.arg("-n");
    }
    if invocation.sloppy {
        command.arg("-s");
    }
    command.arg(&device).arg(&invocation.dir);
    if invocation.verbose {
        eprintln!("mount.tandem: {command:?}");
    }
    let status = command.status().context("running mount")?;
    Ok(if status.success() { 0 } else { 32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn mount_helper_arguments_are_parsed_like_mount_passes_them() {
        let inv = parse(&args(&[
            "vol0",
            "/srv",
            "-v",
            "-o",
            "fstype=xfs,node=alpha,noatime,config=/x.toml",
        ]))
        .unwrap();
        assert_eq!(inv.volume, "vol0");
        assert_eq!(inv.dir, PathBuf::from("/srv"));
        assert_eq!(inv.fstype, "xfs");
        assert_eq!(inv.node.as_deref(), Some("alpha"));
        assert_eq!(inv.config, PathBuf::from("/x.toml"));
        assert_eq!(inv.options, vec!["noatime".to_owned()]);
        assert!(inv.verbose && !inv.fake);
        let inv = parse(&args(&["vol0", "/srv", "-fn", "-t", "tandem"])).unwrap();
        assert!(inv.fake && inv.no_mtab);
        assert_eq!(inv.fstype, "ext4");
    }

    #[test]
    fn bad_invocations_are_refused_with_a_reason() {
        assert!(
            parse(&args(&["vol0"]))
                .unwrap_err()
                .to_string()
                .contains("usage")
        );
        assert!(parse(&args(&["vol0", "/srv", "-o"])).is_err());
        assert!(
            parse(&args(&["vol0", "/srv", "-x"]))
                .unwrap_err()
                .to_string()
                .contains("-x")
        );
        assert!(parse(&args(&["vol0", "/srv", "-o", "fstype=tandem"])).is_err());
    }
}
