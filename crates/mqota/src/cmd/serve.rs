//! `mqota serve`: the firmware server and JSON API, the web page at `/` (which
//! also starts rollouts), the fleet recorder, and (without `--broker`) the
//! embedded broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use mqota_controller::access::{controller_login, password_path, Acl, Role, CONTROLLER_USER};
use mqota_controller::accounts::Auth;
use mqota_controller::broker::{Access, EmbeddedBroker, TlsListener};
use mqota_controller::catalogue::Catalogue;
use mqota_controller::dashboard;
use mqota_controller::fleet::{Fleet, FleetEvent};
use mqota_controller::http::{router, AppState};
use mqota_controller::store::Store;
use mqota_controller::url::BrokerUrl;

use super::settings::{apply_login, client_id, runtime, Common, Settings};

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
    /// A host (name or IP address, any port) a firmware URL given to the
    /// page or POST /api/deployments may point at although it is loopback,
    /// private or link-local (repeatable); serve's own address and
    /// --public-url (that host and port) always may.
    #[arg(long, value_name = "HOST")]
    allow_remote_firmware: Vec<String>,
    /// Let clients into the embedded broker without a login, with no topic
    /// rules (the door is open). Without this flag the door is open only
    /// while no device has credentials (`mqota device add`), --mqtt-listen
    /// is a loopback address and there is no --mqtts-listen.
    #[arg(long)]
    mqtt_anonymous: bool,
    /// Seconds serve's claim on a deployment it runs lasts without renewal
    /// (renewed every quarter of it): a `deploy --resume` (or another serve)
    /// takes a deployment over only once the claim has lapsed, e.g. after
    /// serve was killed.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    runner_lease: u64,
    /// Seconds a client has to send a whole request head; a slower one is
    /// disconnected (against slow-loris).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    http_header_timeout: u64,
    /// HTTP connections served at once; more are closed on arrival, so a
    /// flood cannot queue real downloads behind it.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    http_max_connections: u64,
    /// Largest request body in bytes (firmware uploads have their own 16 MiB
    /// limit); a deployment naming 10,000 devices is about 300 KiB.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=64 * 1024 * 1024))]
    http_max_body: u64,
    /// Days a device's history entries are kept.
    #[arg(long, value_name = "DAYS", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=36_500))]
    history_max_age: u64,
    /// History entries kept per device (the newest).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    history_max_entries: u64,
    /// Seconds an id may be known without ever a valid status (it announced
    /// only its availability) before it is forgotten and its retained
    /// availability cleared.
    #[arg(long, value_name = "SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    ghost_expiry: u64,
    /// Publish every device to Home Assistant as an MQTT `update` entity
    /// (discovery, installed and latest version, progress, an Install
    /// button that deploys the newest catalogue image to the device).
    #[arg(long)]
    home_assistant: bool,
    /// Home Assistant's MQTT discovery prefix.
    #[arg(long, default_value = mqota_controller::homeassistant::DEFAULT_DISCOVERY_PREFIX, requires = "home_assistant")]
    ha_discovery_prefix: String,
    /// The node id in discovery topics (letters, digits, _ and -); give each
    /// serve on one broker its own.
    #[arg(long, default_value = mqota_controller::homeassistant::DEFAULT_NODE_ID, requires = "home_assistant")]
    ha_node_id: String,
    /// Serve the page, the API and the firmware over HTTPS with this
    /// certificate (`mqota ca issue server --host NAME`); also the
    /// certificate of the embedded broker's --mqtts-listen.
    #[arg(long, value_name = "CERT.pem", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert.
    #[arg(long, value_name = "KEY.pem", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A TLS listener of the embedded broker (mqtts://): a client
    /// certificate of the fleet CA (--ca, default DATA_DIR/ca/ca.pem) is a
    /// login, its CN the identity; clients without one log in with a
    /// password. Needs --tls-cert and --tls-key.
    #[arg(long, value_name = "ADDR", requires = "tls_cert")]
    mqtts_listen: Option<SocketAddr>,
    #[command(flatten)]
    common: Common,
}

impl ServeArgs {
    /// Starts the embedded broker with the door the settings call for, and
    /// says which; returns the URL (with the controller's login) to follow
    /// the fleet on, and what `GET /api/broker` answers.
    fn start_embedded_broker(
        &self,
        s: &Settings,
        store: &Arc<Store>,
    ) -> Result<(BrokerUrl, serde_json::Value)> {
        let devices = store
            .identities()?
            .iter()
            .filter(|i| i.role == Role::Device)
            .count();
        let loopback = self.mqtt_listen.ip().is_loopback();
        // A TLS listener is for devices with certificates: never open.
        let open = self.mqtt_anonymous || (devices == 0 && loopback && self.mqtts_listen.is_none());
        let access = if open {
            Access::Open
        } else {
            Access::Login {
                store: store.clone(),
                acl: Acl::new(&s.prefix),
            }
        };
        let tls = match (&self.mqtts_listen, &self.tls_cert, &self.tls_key) {
            (Some(addr), Some(cert), Some(key)) => {
                let Some(ca) = &s.ca else {
                    anyhow::bail!(
                        "--mqtts-listen checks client certificates against the fleet CA: run `mqota ca init` (or name one with --ca)"
                    );
                };
                Some(TlsListener {
                    addr: *addr,
                    config: mqota_controller::tls::broker_server(cert, key, ca)
                        .context("--mqtts-listen")?,
                })
            }
            _ => None,
        };
        let b = EmbeddedBroker::start_with_tls(self.mqtt_listen, access, tls)?;
        // The broker lives as long as the process: rumqttd cannot be
        // stopped.
        let mut url: BrokerUrl = b.url().parse().expect("the embedded broker's URL parses");
        println!("mqtt broker listening on {}", b.url());
        if let Some(a) = b.tls_addr() {
            println!("mqtts broker listening on mqtts://{a}");
            println!("mqtts: a client certificate of the fleet CA is a login (its CN the identity); clients without one log in with a password");
        }
        if open {
            let why = if self.mqtt_anonymous {
                "--mqtt-anonymous".to_owned()
            } else {
                "no device has MQTT credentials yet and it listens on loopback only".to_owned()
            };
            println!(
                "mqtt door OPEN ({why}): any client may connect without a login and publish or \
                 subscribe anywhere; `mqota device add ID` gives a device its login and closes it at the next start"
            );
            tracing::warn!("embedded broker: anonymous access allowed ({why})");
            apply_login(&mut url, &s.login);
            let door = serde_json::json!({
                "broker": "embedded", "anonymous": true, "topic_rules": false, "why": why,
            });
            Ok((url, door))
        } else {
            let (password, new) = controller_login(store, &s.data_dir)?;
            if new {
                println!(
                    "controller login made: {}",
                    password_path(&s.data_dir, CONTROLLER_USER).display()
                );
            }
            url.username = Some(CONTROLLER_USER.to_owned());
            url.password = Some(password.expose().to_owned());
            println!(
                "mqtt logins required: {devices} device(s) and the controller; anonymous clients are refused, devices are held to their own topics"
            );
            if devices == 0 && self.mqtts_listen.is_none() {
                println!("no device has credentials yet: `mqota device add ID` makes them");
            }
            let door = serde_json::json!({
                "broker": "embedded", "anonymous": false, "topic_rules": true, "devices": devices,
            });
            Ok((url, door))
        }
    }

    /// The Home Assistant bridge's settings, devices downloading from `base`.
    fn ha_config(
        &self,
        s: &Settings,
        base: Option<String>,
    ) -> mqota_controller::homeassistant::HaConfig {
        let mut cfg = mqota_controller::homeassistant::HaConfig::new(&s.prefix, base);
        cfg.discovery_prefix = self.ha_discovery_prefix.clone();
        cfg.node_id = self.ha_node_id.clone();
        cfg.topic_base = format!("mqota/homeassistant/{}", self.ha_node_id);
        cfg
    }

    /// Starts the Home Assistant bridge on its own connection to the broker.
    async fn start_home_assistant(
        &self,
        s: &Settings,
        broker_url: &BrokerUrl,
        addr: SocketAddr,
        fleet: &Arc<Fleet>,
        store: &Arc<Store>,
        runner: &mqota_controller::rollout::Runner,
    ) -> Result<mqota_controller::homeassistant::Bridge> {
        use mqota_controller::homeassistant as ha;
        // Devices download what an Install deploys from --public-url, or
        // from the address serve listens on (unusable when that is
        // 0.0.0.0 or ::).
        let base = self
            .public_url
            .clone()
            .or_else(|| (!addr.ip().is_unspecified()).then(|| format!("http://{addr}")));
        if base.is_none() {
            println!(
                "home assistant: Install is refused until serve is started with --public-url (it listens on {addr})"
            );
        }
        let cfg = self.ha_config(s, base);
        let bridge = ha::start(
            cfg.clone(),
            broker_url,
            &client_id("serve-ha"),
            fleet.clone(),
            store.clone(),
            Catalogue::new(&self.firmware_dir),
            runner.clone(),
        )
        .await?;
        println!(
            "home assistant: discovery under {}/update/{}/, state and install under {}/, Home Assistant's birth on {}",
            cfg.discovery_prefix,
            cfg.node_id,
            cfg.topic_base,
            cfg.birth_topic()
        );
        Ok(bridge)
    }

    /// Run until Ctrl-C.
    pub fn run(self) -> Result<()> {
        let s = self.common.settings()?;
        if self.home_assistant {
            // Refused before anything starts.
            self.ha_config(&s, None).validate()?;
        }
        if !self.firmware_dir.is_dir() {
            anyhow::bail!(
                "--firmware-dir {} is not a directory",
                self.firmware_dir.display()
            );
        }
        // Deployments run here are recorded as serve's, so that the next
        // serve resumes them.
        mqota_controller::rollout::set_runner_name("serve");
        mqota_controller::lease::set_lease(std::time::Duration::from_secs(self.runner_lease));
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

        let (broker_url, door) = match s.broker.clone() {
            Some(b) => (
                b,
                serde_json::json!({
                    "broker": "external",
                    "why": "the external broker's own configuration decides who may connect",
                }),
            ),
            None => self.start_embedded_broker(&s, &store)?,
        };

        let https = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(
                mqota_controller::tls::http_server(cert, key).context("--tls-cert / --tls-key")?,
            ),
            _ => None,
        };
        let scheme = if https.is_some() { "https" } else { "http" };
        runtime()?.block_on(async move {
            let listener = tokio::net::TcpListener::bind(self.http)
                .await
                .with_context(|| format!("cannot listen on {}", self.http))?;
            let addr = listener.local_addr()?;
            println!("{scheme} listening on {scheme}://{addr}");

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

            let housekeeping = tokio::spawn(housekeeping(
                store.clone(),
                fleet.clone(),
                mqota_controller::store::Retention {
                    max_age: Duration::from_secs(self.history_max_age * 86_400),
                    max_entries: self.history_max_entries as usize,
                },
                Duration::from_secs(self.ghost_expiry),
            ));

            let runner = mqota_controller::rollout::spawn_runner(fleet.clone(), store.clone());
            for id in store.running_deployments_of("serve")? {
                println!("resuming deployment {id}, which was running when serve stopped");
                let now = mqota_controller::lease::now_ms();
                if let Some(c) = store.claim_in_force(&id, now)? {
                    // Most likely the serve that was killed: its claim
                    // lapses within one lease.
                    println!(
                        "deployment {id} is claimed by {} until {}: serve takes it over when that claim lapses",
                        c.holder,
                        c.expires_text()
                    );
                }
                runner.run(&id);
            }
            let bridge = if self.home_assistant {
                Some(
                    self.start_home_assistant(&s, &broker_url, addr, &fleet, &store, &runner)
                        .await?,
                )
            } else {
                None
            };

            // serve's own firmware URLs stay usable as URLs.
            let own = format!("{scheme}://{addr}");
            let mut remote_firmware =
                mqota_controller::remote::RemoteFirmware::allow(&self.allow_remote_firmware)
                    .and_origin_of(&own);
            if let Some(u) = &self.public_url {
                remote_firmware = remote_firmware.and_origin_of(u);
            }
            let state_store = store.clone();
            if let Some(ca) = &s.ca {
                remote_firmware = remote_firmware
                    .with_tls(mqota_controller::tls::https_client(ca).context("--ca")?);
            }
            let state = Arc::new(AppState {
                catalogue,
                store,
                public_url: self.public_url,
                remote_firmware,
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
            // Secure by default: reachable from other machines, the page and
            // API take logins only; on loopback, once an account exists.
            // The session cookie is `Secure` when serve speaks TLS itself or
            // sits behind an https:// public URL.
            let secure_cookie = https.is_some()
                || state
                    .public_url
                    .as_deref()
                    .is_some_and(|u| u.to_ascii_lowercase().starts_with("https://"));
            let auth = Auth::new(state.store.clone(), !addr.ip().is_loopback(), secure_cookie);
            announce_login(&state.store, addr)?;
            let app = mqota_controller::http::guard_hosts(
                auth.layer(
                    router(state.clone())
                        .merge(mqota_controller::http::control_router(
                            state.store.clone(),
                            runner.clone(),
                        ))
                        .merge(mqota_controller::http::catalogue_router(state.clone()))
                        .merge(mqota_controller::http::forget_router(
                            state.store.clone(),
                            fleet.clone(),
                        ))
                        .merge(dashboard::router(state, fleet.clone(), runner))
                        .merge(broker_door_router(door)),
                ),
                allowed,
            );
            // Header-read timeout, connection cap, body limit and JSON
            // errors under /api/: see mqota_controller::server.
            mqota_controller::server::serve_tls(
                listener,
                app,
                mqota_controller::server::HttpLimits {
                    header_read_timeout: std::time::Duration::from_secs(self.http_header_timeout),
                    max_connections: self.http_max_connections as usize,
                    max_body: self.http_max_body as usize,
                },
                https,
                async {
                    let _ = tokio::signal::ctrl_c().await;
                },
            )
            .await?;
            if let Some(b) = bridge {
                b.stop().await;
            }
            recorder.abort();
            housekeeping.abort();
            // Rollouts still running stop with the process: their claims
            // go now, so a `deploy --resume` need not wait for the lease.
            if let Err(e) = state_store.release_all(mqota_controller::lease::holder()) {
                tracing::warn!("releasing serve's claims on its deployments: {e}");
            }
            // Rollouts still running hold the connection; they stay
            // `running` in the store for `deploy --resume`.
            if let Ok(fleet) = Arc::try_unwrap(fleet) {
                let _ = fleet.close().await;
            }
            Ok(())
        })
    }
}

/// How often the device history is pruned to its retention.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// serve's upkeep, for as long as it runs: the device history is kept to
/// `retention` (at start, then every [`PRUNE_EVERY`]), and ghosts (ids
/// known for `ghost_age` without a valid status) are forgotten, their
/// retained availability cleared so that the next replay does not bring
/// them back.
async fn housekeeping(
    store: Arc<Store>,
    fleet: Arc<Fleet>,
    retention: mqota_controller::store::Retention,
    ghost_age: Duration,
) {
    // A ghost's clock starts at the first sweep that finds it: sweeping at
    // least twice per age keeps the expiry within half an age of its due.
    let sweep = (ghost_age / 2).clamp(Duration::from_millis(500), Duration::from_secs(60));
    let mut pruned_at: Option<tokio::time::Instant> = None;
    loop {
        if pruned_at.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            pruned_at = Some(tokio::time::Instant::now());
            let st = store.clone();
            let now = mqota_controller::unix_now();
            match tokio::task::spawn_blocking(move || st.prune_history(now, &retention)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!("device history: {n} entries past retention removed"),
                Ok(Err(e)) => tracing::error!("pruning the device history: {e}"),
                Err(e) => tracing::error!("pruning the device history: {e}"),
            }
        }
        // Only with the broker's picture in hand: while it is unreachable,
        // a missing status proves nothing.
        if fleet.connected() {
            for id in fleet.expire_ghosts(std::time::Instant::now(), ghost_age) {
                tracing::info!(
                    "forgetting {}: known for {} s without a valid status",
                    super::term::safe(&id),
                    ghost_age.as_secs()
                );
                if let Err(e) = fleet.clear_availability(&id).await {
                    tracing::warn!("clearing the availability of a forgotten id: {e}");
                }
            }
        }
        tokio::time::sleep(sweep).await;
    }
}

/// Says at start whether the page and API take logins, and how to make the
/// first account when one is needed and none exists.
fn announce_login(store: &Store, addr: SocketAddr) -> Result<()> {
    let users = store.web_users()?.len();
    let data = store
        .path()
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if users > 0 {
        println!("web login required: {users} account(s) (`mqota user list`)");
    } else if addr.ip().is_loopback() {
        println!(
            "web page and API open without login: loopback only and no account yet \
             (`mqota user add NAME --role admin` makes one, and login is required from then on)"
        );
    } else {
        println!(
            "web login required (http listens on {addr}, not loopback) and no account exists yet: \
             create the first with `mqota user add NAME --role admin --data-dir {data}` \
             (the password is asked for, or read from MQOTA_PASSWORD or stdin)"
        );
    }
    Ok(())
}

/// `GET /api/broker`: whether the embedded broker's door is open (anonymous
/// clients, no topic rules) or takes logins, so the open door shows in the
/// API and not only in `serve`'s first lines.
fn broker_door_router(door: serde_json::Value) -> axum::Router {
    let body = door.to_string();
    axum::Router::new().route(
        "/api/broker",
        axum::routing::get(move || {
            let body = body.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
        }),
    )
}
