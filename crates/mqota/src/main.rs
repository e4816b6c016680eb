//! `mqota`: the command-line face of mqota.
//!
//! Every subcommand lives in its own module under `cmd/`; this file only
//! parses the command line and reports errors as one line with a non-zero exit.

use clap::{Parser, Subcommand};

mod cmd;

/// Over-the-air firmware updates for ESP32 devices, driven over MQTT.
#[derive(Parser)]
#[command(name = "mqota", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and build ESP-IDF app images.
    #[command(subcommand)]
    Image(cmd::image::ImageCommand),
    /// Make signing keys and print their digests.
    #[command(subcommand)]
    Keys(cmd::keys::KeysCommand),
    /// Show an ESP-IDF partition table (binary or CSV) or convert it.
    Partitions(cmd::partitions::PartitionsArgs),
    /// Inspect whole flash dumps.
    #[command(subcommand)]
    Flash(cmd::flash::FlashCommand),
    /// Run virtual devices; sweep power cuts over the device logic.
    Sim(cmd::sim::SimArgs),
    /// Serve firmware and the JSON API; record the fleet (starts an embedded
    /// MQTT broker unless --broker is given).
    Serve(cmd::serve::ServeArgs),
    /// Roll firmware out to devices in stages.
    Deploy(Box<cmd::deploy::DeployArgs>),
    /// The fleet from the devices' retained status.
    Status(cmd::fleet::StatusArgs),
    /// A live table of devices, phases and percentages.
    Watch(cmd::fleet::WatchArgs),
    /// Boot the previous firmware again on these devices.
    Rollback(cmd::fleet::DeviceCommandArgs),
    /// Stop the update in flight on these devices.
    Cancel(cmd::fleet::DeviceCommandArgs),
    /// Forget devices that are gone: their record and history in the store,
    /// their retained status and availability on the broker.
    Forget(cmd::fleet::ForgetArgs),
    /// A device's field log (boots, job phases, connection losses, ...).
    Logs(cmd::logs::LogsArgs),
    /// MQTT logins of devices: add, remove, list.
    #[command(subcommand)]
    Device(cmd::access::DeviceCommand),
    /// Accounts of serve's web page and API: add, list, remove.
    #[command(subcommand)]
    User(cmd::users::UserCommand),
    /// API tokens for the CLI and scripts: add, list, revoke.
    #[command(subcommand)]
    Token(cmd::users::TokenCommand),
    /// The fleet CA: make it, issue device and server certificates.
    #[command(subcommand)]
    Ca(cmd::ca::CaCommand),
    /// Configuration for an external broker (Mosquitto).
    #[command(subcommand)]
    Broker(cmd::access::BrokerCommand),
    /// Try it all on this machine: a broker, a firmware server and virtual
    /// devices; a good update, then a bad one that every device rolls back.
    Demo(cmd::demo::DemoArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Image(c) => c.run(),
        Command::Keys(c) => c.run(),
        Command::Partitions(c) => c.run(),
        Command::Flash(c) => c.run(),
        Command::Sim(c) => c.run(),
        Command::Serve(c) => c.run(),
        Command::Deploy(c) => c.run(),
        Command::Status(c) => c.run(),
        Command::Watch(c) => c.run(),
        Command::Rollback(c) => c.run(true),
        Command::Cancel(c) => c.run(false),
        Command::Forget(c) => c.run(),
        Command::Logs(c) => c.run(),
        Command::Demo(c) => c.run(),
        Command::Device(c) => c.run(),
        Command::Broker(c) => c.run(),
        Command::User(c) => c.run(),
        Command::Token(c) => c.run(),
        Command::Ca(c) => c.run(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined, never a panic or a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
