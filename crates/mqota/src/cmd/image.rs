//! placeholder
/// placeholder
#[derive(clap::Subcommand)]
pub enum ImageCommand {}
impl ImageCommand {
    /// Run it.
    pub fn run(self) -> anyhow::Result<()> {
        match self {}
    }
}
