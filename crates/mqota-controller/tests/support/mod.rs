//! Shared by the controller's HTTP tests: app images and the server state
//! over a firmware directory and a real store.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use mqota_controller::catalogue::Catalogue;
use mqota_controller::http::AppState;
use mqota_controller::store::Store;
use mqota_core::image::{Chip, ImageBuilder};

/// A valid ESP32-C3 app image of project `fleet`, `size` bytes long.
pub fn image(version: &str, size: u32) -> Vec<u8> {
    ImageBuilder::new(Chip::Esp32c3)
        .version(version)
        .project("fleet")
        .size(size)
        .build()
        .unwrap()
}

/// What `serve` gives its routes: the catalogue of `fw` and `store`, no
/// public URL (the request's `Host` is used), no remote firmware allowed.
pub fn app_state(fw: &Path, store: Arc<Store>) -> Arc<AppState> {
    Arc::new(AppState {
        catalogue: Catalogue::new(fw),
        store,
        public_url: None,
        remote_firmware: Default::default(),
    })
}
