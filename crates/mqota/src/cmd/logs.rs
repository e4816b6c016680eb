//! `mqota logs ID`: a device's field log, fetched over MQTT
//! (`{prefix}/{id}/logs/get`, answered on `{prefix}/{id}/logs`).

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use mqota_controller::logs::{format_record_at, LogReader};
use mqota_core::protocol::LogsGet;

use super::settings::{runtime, Common};

/// `mqota logs`.
#[derive(Args)]
pub struct LogsArgs {
    /// The device id.
    id: String,
    /// Only records numbered N or later (record numbers run on across boots).
    #[arg(long, value_name = "N")]
    since: Option<u32>,
    /// Only records of boot B or later.
    #[arg(long, value_name = "B")]
    boot: Option<u32>,
    /// At most this many records.
    #[arg(long, default_value_t = 512)]
    max: u16,
    /// Keep asking for new records every two seconds until interrupted.
    #[arg(long)]
    follow: bool,
    /// Print one JSON object per record instead of lines of text.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the device's answer.
    #[arg(long, default_value_t = 5)]
    wait: u64,
    #[command(flatten)]
    common: Common,
}

impl LogsArgs {
    /// Run it.
    pub fn run(self) -> Result<()> {
        let s = self.common.settings()?;
        runtime()?.block_on(async {
            let mut reader =
                LogReader::connect(&s.broker_or_default(), &s.prefix, &self.id).await?;
            let mut req = LogsGet {
                since: self.since,
                boot: self.boot,
                max: Some(self.max),
                id: None,
            };
            loop {
                let got = reader
                    .fetch(&req, Duration::from_secs(self.wait.max(1)))
                    .await?;
                if got.lost_chunks > 0 {
                    eprintln!(
                        "warning: {} chunk(s) of the answer never arrived; records may be missing",
                        got.lost_chunks
                    );
                }
                for r in &got.records {
                    if self.json {
                        println!("{}", serde_json::to_string(r)?);
                    } else {
                        println!("{}", format_record_at(r, got.clock.as_ref()));
                    }
                }
                if !self.follow {
                    return Ok(());
                }
                if let Some(last) = got.records.last() {
                    req.since = Some(last.n + 1);
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    }
}
