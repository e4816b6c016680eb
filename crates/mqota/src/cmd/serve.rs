//! `mqota serve`: the firmware server and JSON API, the web page at `/` (which
//! also starts rollouts), the fleet recorder, and (without `--broker`) the
//! embedded broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::Args;
use mqota_controller::broker::EmbeddedBroker;
use mqota_controller::catalogue::Catalogue;
use mqota_controller::dashboard;
use mqota_controller::fleet::{Fleet, FleetEvent};
use mqota_controller::http::{router, AppState};
use mqota_controller::store::Store;
use mqota_controller::url::BrokerUrl;

use super::fleet::{client_id, runtime, Common};

/// `mqota serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Directory of firmware images, served under /firmware/NAME.
    #[arg(long)]
    firmware_dir: PathBuf,
    /// HTTP listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Where the embedded broker listens when no --broker is given (MQTT
    /// 3.1.1 and 5 on the same port).
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: SocketAddr,
    /// Base URL devices download from, e.g. http://10.0.0.2:8080 (default:
    /// the Host of each API request).
    #[arg(long)]
    public_url: Option<String>,
    /// A host name the web page and API may be reached by (repeatable); IP
    /// addresses, localhost and --public-url's host always may. Other names
    /// are refused, against DNS rebinding.
    #[arg(long, value_name = "NAME")]
    allow_host: Vec<String>,
    #[command(flatten)]
    common: Common,
}

impl ServeArgs {
    /// Run until Ctrl-C.
    pub fn run(self) -> Result<()> {
        let s = self.common.settings()?;
        if !self.firmware_dir.is_dir() {
            anyhow::bail!(
                "--firmware-dir {} is not a directory",
                self.firmware_dir.display()
            );
        }
        // Deployments run here are recorded as serve's, so that the next
        // serve resumes them.
        mqota_controller::rollout::set_runner_name("serve");
        let store = Arc::new(Store::open(&s.data_dir)?);
        println!("data in {}", store.path().display());
        let catalogue = Catalogue::new(&self.firmware_dir);
        let list = catalogue
            .scan()
            .with_context(|| format!("reading {}", self.firmware_dir.display()))?;
        store.replace_firmware(&list)?;
        for f in &list {
            match &f.error {
                None => println!(
                    "firmware {} ({} {} {}, {} bytes)",
                    f.name,
                    f.chip.as_deref().unwrap_or("?"),
                    f.project.as_deref().unwrap_or("?"),
                    f.version.as_deref().unwrap_or("?"),
                    f.size
                ),
                Some(e) => println!("skipping {}: {e}", f.name),
            }
        }

        let broker_url: BrokerUrl = match s.broker.clone() {
            Some(b) => b,
            None => {
                let b = EmbeddedBroker::start(self.mqtt_listen)?;
                println!("mqtt broker listening on {}", b.url());
                // The broker lives as long as the process: rumqttd cannot
                // be stopped.
                b.url().parse().expect("the embedded broker's URL parses")
            }
        };

        runtime()?.block_on(async move {
            let listener = tokio::net::TcpListener::bind(self.http)
                .await
                .with_context(|| format!("cannot listen on {}", self.http))?;
            let addr = listener.local_addr()?;
            println!("http listening on http://{addr}");

            let fleet = Arc::new(
                s.signing(Fleet::connect(&broker_url, &s.prefix, &client_id("serve")).await?)?,
            );
            println!("following the fleet on {broker_url} (prefix {})", s.prefix);
            let recorder_store = store.clone();
            let mut events = fleet.events();
            // Record what is already known, then every change.
            for d in fleet.devices() {
                if let Some(st) = &d.status {
                    recorder_store.record_status(&d.id, &serde_json::to_value(st)?)?;
                }
            }
            let recorder_fleet = fleet.clone();
            let recorder = tokio::spawn(async move {
                loop {
                    match events.recv().await {
                        Ok(FleetEvent::Status(st)) => {
                            let v = serde_json::to_value(&st).expect("status serialises");
                            if let Err(e) = recorder_store.record_status(st.device.as_str(), &v) {
                                tracing::error!("recording a status: {e}");
                            }
                        }
                        Ok(FleetEvent::Progress(p)) if p.phase.is_terminal() => {
                            let v = serde_json::to_value(&p).expect("progress serialises");
                            if let Err(e) = recorder_store.record_progress(p.device.as_str(), &v) {
                                tracing::error!("recording a progress event: {e}");
                            }
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            // A burst (the retained replay of a large fleet)
                            // outran the recorder: record the current picture
                            // so no status is missing from the store.
                            tracing::info!(
                                "recorder fell behind by {n} events; recording the whole fleet"
                            );
                            for d in recorder_fleet.devices() {
                                let Some(st) = &d.status else { continue };
                                let v = serde_json::to_value(st).expect("status serialises");
                                if let Err(e) = recorder_store.record_status(&d.id, &v) {
                                    tracing::error!("recording a status: {e}");
                                }
                            }
                        }
                        Err(_) => return,
                    }
                }
            });

            let runner = mqota_controller::rollout::spawn_runner(fleet.clone(), store.clone());
            for id in store.running_deployments_of("serve")? {
                println!("resuming deployment {id}, which was running when serve stopped");
                runner.run(&id);
            }

            let state = Arc::new(AppState {
                catalogue,
                store,
                public_url: self.public_url,
            });
            let mut allowed = self.allow_host.clone();
            if let Some(host) = state
                .public_url
                .as_deref()
                .and_then(|u| u.split_once("://"))
                .map(|(_, rest)| rest.split('/').next().unwrap_or(rest))
            {
                let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
                allowed.push(host.to_owned());
            }
            let app = mqota_controller::http::guard_hosts(
                router(state.clone())
                    .merge(mqota_controller::http::control_router(
                        state.store.clone(),
                        runner.clone(),
                    ))
                    .merge(mqota_controller::http::catalogue_router(state.clone()))
                    .merge(dashboard::router(state, fleet.clone(), runner)),
                allowed,
            );
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
            recorder.abort();
            // Rollouts still running hold the connection; they stay
            // `running` in the store for `deploy --resume`.
            if let Ok(fleet) = Arc::try_unwrap(fleet) {
                let _ = fleet.close().await;
            }
            Ok(())
        })
    }
}
