//! No library: this crate holds mqota's end-to-end tests (`tests/`), the
//! ones that need two sides at once, so that no crate of the workspace
//! depends on another only through its tests:
//!
//! - `core_*`: the core's boot guard and flash contract against the NOR
//!   model with power cuts and the ESP-IDF bootloader model
//!   (`mqota-flash-sim`, itself built on the core). The core's own tests run
//!   on its in-crate `mock_flash`.
//! - `controller_*`: the controller's fleet view, rollouts and embedded
//!   broker against virtual devices (`mqota-virtual`).
//! - `device_*`: virtual devices through whole updates against Mosquitto and
//!   the embedded broker.
//!
//! Run them with `cargo test -p mqota-e2e`.
