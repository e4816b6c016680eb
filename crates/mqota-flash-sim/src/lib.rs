//! Host models for mqota: a NOR flash and the ESP-IDF bootloader.
#![deny(missing_docs)]
