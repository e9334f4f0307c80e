//! `tandemd`: the tandem daemon.
fn main() -> anyhow::Result<()> {
    anyhow::bail!("tandemd: the cluster daemon is not built yet")
}
