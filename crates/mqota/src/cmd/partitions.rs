//! placeholder
/// placeholder
#[derive(clap::Args)]
pub struct PartitionsArgs {}
impl PartitionsArgs {
    /// Run it.
    pub fn run(self) -> anyhow::Result<()> {
        anyhow::bail!("not yet")
    }
}
