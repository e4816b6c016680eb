//! placeholder
/// placeholder
#[derive(clap::Subcommand)]
pub enum FlashCommand {}
impl FlashCommand {
    /// Run it.
    pub fn run(self) -> anyhow::Result<()> {
        match self {}
    }
}
