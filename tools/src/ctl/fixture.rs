//! `tandemctl fixture`: PR-capable storage fixtures.

use anyhow::Context;
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use tandem::fixture::{self, Fixture, FixtureKind, FixtureSpec};

#[derive(Debug, Subcommand)]
pub enum FixtureCommand {
    /// Create a fixture (idempotent: the same request twice returns the same fixture).
    Create(CreateArgs),
    /// Destroy a fixture (succeeds if it does not exist).
    Destroy {
        /// Fixture name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List fixtures.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Kind: lio-loop, lio-iscsi, tgt or nvmet.
    pub kind: FixtureKind,
    /// Unique name (letters, digits, - and _).
    #[arg(long)]
    pub name: String,
    /// Size of a new backing file (K/M/G suffixes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub size: u64,
    /// Export this existing file or block device instead of a new file.
    #[arg(long)]
    pub backing: Option<PathBuf>,
    /// Initiator nexuses (simulated nodes). Default: 2, or 0 for tgt.
    #[arg(long)]
    pub nexuses: Option<u8>,
    /// iSCSI portal on 127.0.0.0/8.
    #[arg(long, default_value = "127.0.0.1:3260")]
    pub portal: String,
    /// LIO: direct command submission (submit_type 1). Note: on 6.12 it does NOT avoid
    /// the tcm_loop PREEMPT AND ABORT deadlock.
    #[arg(long)]
    pub direct_submit: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(text: &str) -> Result<u64, String> {
    fixture::parse_size(text).map_err(|e| e.to_string())
}

pub fn run(cmd: FixtureCommand) -> anyhow::Result<i32> {
    let mut out = std::io::stdout().lock();
    match cmd {
        FixtureCommand::Create(args) => {
            let mut spec = FixtureSpec::new(&args.name, args.kind);
            spec.size_bytes = args.size;
            spec.backing = args.backing;
            spec.nexuses =
                args.nexuses
                    .unwrap_or(if args.kind == FixtureKind::Tgt { 0 } else { 2 });
            spec.portal = args.portal;
            spec.direct_submit = args.direct_submit;
            let created = fixture::create(&spec)
                .with_context(|| format!("creating fixture `{}`", spec.name))?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&created)?)?;
            } else {
                print_fixture(&mut out, &created)?;
            }
        }
        FixtureCommand::Destroy { name, json } => {
            let removed =
                fixture::destroy(&name).with_context(|| format!("destroying fixture `{name}`"))?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "name": name, "removed": removed })
                )?;
            } else if removed {
                writeln!(out, "fixture {name} destroyed")?;
            } else {
                writeln!(out, "fixture {name} does not exist; nothing to do")?;
            }
        }
        FixtureCommand::List { json } => {
            let all = fixture::list()?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
            } else if all.is_empty() {
                writeln!(out, "no fixtures")?;
            } else {
                for f in &all {
                    print_fixture(&mut out, f)?;
                }
            }
        }
    }
    Ok(0)
}

fn print_fixture(out: &mut impl Write, f: &Fixture) -> std::io::Result<()> {
    let kind = serde_json::to_value(f.spec.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    writeln!(out, "fixture {} ({kind})", f.spec.name)?;
    writeln!(out, "  backing       {}", f.backing.display())?;
    if let Some(target) = &f.target_name {
        writeln!(out, "  target        {target}")?;
    }
    if let Some(url) = &f.url {
        writeln!(out, "  url           {url}")?;
    }
    let pr = if f.reservations.supported {
        "yes"
    } else {
        "no"
    };
    writeln!(out, "  reservations  {pr}: {}", f.reservations.note)?;
    for (i, n) in f.nexuses.iter().enumerate() {
        let show = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or("-".into())
        };
        writeln!(
            out,
            "  nexus {i}       {}  initiator {}  target {}  sg {}",
            show(&n.device),
            n.initiator,
            n.target,
            show(&n.sg)
        )?;
    }
    Ok(())
}
