//! `GET /api/events`: the fleet live, as Server-Sent Events.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use tokio::sync::{broadcast, mpsc};

use super::Dashboard;
use crate::fleet::FleetEvent;

/// How often at most `/api/events` sends the changed devices: progress
/// events of a whole fleet are coalesced to one `change` event per period.
pub const EVENTS_COALESCE: Duration = Duration::from_millis(250);

/// How often at least `/api/events` looks for changed deployments and gaps;
/// after a device's status or progress changed it looks at the next
/// [`EVENTS_COALESCE`] tick, as that is when a rollout moves on.
pub const EVENTS_OVERVIEW: Duration = Duration::from_secs(1);

/// `GET /api/events`: the fleet live, as Server-Sent Events. Every event's
/// `id` is a number one higher than the one before, and its data is JSON
/// with that number as `seq`:
///
/// * `snapshot` `{seq, devices, deployments, gaps}`: everything, first on
///   every connection and again whenever this stream fell behind the
///   fleet's events (a client replaces what it has);
/// * `change` `{seq, devices, removed}`: the devices whose status,
///   availability or progress changed (each as in `/api/fleet`) and the ids
///   whose status was cleared, at most one per [`EVENTS_COALESCE`];
/// * `deployments` `{seq, deployments}`: every deployment as in
///   `/api/deployments`, when one changed (see [`EVENTS_OVERVIEW`]);
/// * `gaps` `{seq, gaps}`: why the picture may be incomplete, when that
///   changed (as `/api/fleet`'s `x-mqota-fleet-gaps`).
pub(super) async fn api_events(
    State(d): State<Dashboard>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Event>(16);
    // Subscribed before the snapshot is taken, so nothing falls between.
    let events = d.fleet.events();
    tokio::spawn(follow(d, events, tx));
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Deployments and gaps as JSON, read off the store on a blocking thread.
async fn overview(d: &Dashboard) -> (serde_json::Value, serde_json::Value) {
    let store = d.app.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        let deployments = store.deployments().ok();
        let recorded = store.device_ids().unwrap_or_default();
        (deployments, recorded)
    })
    .await;
    let (deployments, recorded) = read.unwrap_or_default();
    (
        serde_json::to_value(deployments.unwrap_or_default()).unwrap_or_default(),
        serde_json::to_value(d.fleet.gaps(&recorded)).unwrap_or_default(),
    )
}

fn sse(kind: &str, seq: u64, mut data: serde_json::Value) -> Event {
    data["seq"] = seq.into();
    Event::default()
        .event(kind)
        .id(seq.to_string())
        .data(data.to_string())
}

/// Feeds one `/api/events` stream until its client goes away.
async fn follow(
    d: Dashboard,
    mut events: broadcast::Receiver<FleetEvent>,
    tx: mpsc::Sender<Event>,
) {
    let mut seq = 1u64;
    let (mut deployments, mut gaps) = overview(&d).await;
    // Written straight to text: at 10,000 devices a JSON tree in between
    // doubled the time to the first byte.
    let snapshot = |seq: u64, deployments: &serde_json::Value, gaps: &serde_json::Value| {
        #[derive(serde::Serialize)]
        struct Snapshot<'a> {
            devices: Vec<crate::fleet::DeviceView>,
            deployments: &'a serde_json::Value,
            gaps: &'a serde_json::Value,
            seq: u64,
        }
        let data = serde_json::to_string(&Snapshot {
            devices: d.fleet.devices(),
            deployments,
            gaps,
            seq,
        })
        .unwrap_or_default();
        Event::default()
            .event("snapshot")
            .id(seq.to_string())
            .data(data)
    };
    if tx.send(snapshot(seq, &deployments, &gaps)).await.is_err() {
        return;
    }
    let mut dirty = BTreeSet::<String>::new();
    let mut flush = tokio::time::interval(EVENTS_COALESCE);
    let mut look = tokio::time::interval(EVENTS_COALESCE);
    // A slow store read or client delays the next tick; no burst follows.
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since_look = Duration::ZERO;
    // A status or progress event came since the last look at the store.
    let mut nudged = false;
    loop {
        let event = tokio::select! {
            ev = events.recv() => {
                match ev {
                    Ok(FleetEvent::Status(s)) => {
                        nudged = true;
                        dirty.insert(s.device.to_string());
                    }
                    Ok(FleetEvent::Progress(p)) => {
                        nudged = true;
                        dirty.insert(p.device.to_string());
                    }
                    Ok(FleetEvent::Removed(id) | FleetEvent::Availability { id, .. }) => {
                        dirty.insert(id);
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Changes were missed: start over from a snapshot.
                        dirty.clear();
                        seq += 1;
                        if tx.send(snapshot(seq, &deployments, &gaps)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                continue;
            }
            _ = flush.tick(), if !dirty.is_empty() => {
                let (mut changed, mut removed) = (Vec::new(), Vec::new());
                for id in std::mem::take(&mut dirty) {
                    match d.fleet.device(&id) {
                        Some(v) => changed.push(v),
                        None => removed.push(id),
                    }
                }
                seq += 1;
                sse("change", seq, serde_json::json!({"devices": changed, "removed": removed}))
            }
            _ = look.tick() => {
                since_look += EVENTS_COALESCE;
                if !nudged && since_look < EVENTS_OVERVIEW {
                    continue;
                }
                (nudged, since_look) = (false, Duration::ZERO);
                let (dep, gap) = overview(&d).await;
                if gap != gaps {
                    gaps = gap;
                    seq += 1;
                    let e = sse("gaps", seq, serde_json::json!({"gaps": gaps}));
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
                if dep == deployments {
                    continue;
                }
                deployments = dep;
                seq += 1;
                sse("deployments", seq, serde_json::json!({"deployments": deployments}))
            }
            _ = tx.closed() => return,
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}
