//! `mqota sim`: virtual devices, and the power-cut sweep over the device logic.

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use mqota_flash_sim::sweep::{sweep, Scenario, SweepConfig};
use mqota_flash_sim::BootConfig;

/// Which ESP-IDF bootloader build a virtual device boots with.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BootloaderArg {
    /// What espflash ships: no app rollback.
    Stock,
    /// Built with CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE.
    Rollback,
}

impl From<BootloaderArg> for BootConfig {
    fn from(b: BootloaderArg) -> Self {
        match b {
            BootloaderArg::Stock => BootConfig::Stock,
            BootloaderArg::Rollback => BootConfig::Rollback,
        }
    }
}

/// Which update the sweep performs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScenarioArg {
    /// A healthy image: the update must end confirmed.
    Update,
    /// A `+unhealthy` image: the device must end on the old image.
    FailedTrial,
}

/// `mqota sim`.
#[derive(Args)]
pub struct SimArgs {
    #[command(subcommand)]
    command: SimCommand,
}

#[derive(Subcommand)]
enum SimCommand {
    /// Cut the power at every flash operation of an update (before it and in
    /// its middle), boot again through the bootloader model, and check that
    /// the old or the new image always boots and the update completes.
    /// Prints a JSON summary; exits non-zero if any cut bricked the device,
    /// booted a wrong image or left the update unfinishable.
    PowerCutSweep {
        /// Size of the new image in bytes.
        #[arg(long, default_value_t = 256 * 1024)]
        image_size: u32,
        /// Bootloader build of the device.
        #[arg(long, value_enum, default_value = "stock")]
        bootloader: BootloaderArg,
        /// What is installed.
        #[arg(long, value_enum, default_value = "update")]
        scenario: ScenarioArg,
    },
}

impl SimArgs {
    /// Run it.
    pub fn run(self) -> Result<()> {
        match self.command {
            SimCommand::PowerCutSweep {
                image_size,
                bootloader,
                scenario,
            } => {
                if !(4096..=0x1e0000 - 4096).contains(&image_size) {
                    bail!("--image-size must be between 4096 and {} bytes (the OTA slot less its journal sector)", 0x1e0000 - 4096);
                }
                let cfg = SweepConfig {
                    image_size,
                    bootloader: bootloader.into(),
                    scenario: match scenario {
                        ScenarioArg::Update => Scenario::Update,
                        ScenarioArg::FailedTrial => Scenario::FailedTrial,
                    },
                    ..SweepConfig::default()
                };
                let summary = sweep(&cfg);
                println!("{}", serde_json::to_string_pretty(&summary)?);
                if summary.bricked + summary.wrong_image + summary.incomplete > 0 {
                    bail!(
                        "power-cut sweep failed: {} bricked, {} wrong image, {} incomplete",
                        summary.bricked,
                        summary.wrong_image,
                        summary.incomplete
                    );
                }
                Ok(())
            }
        }
    }
}
