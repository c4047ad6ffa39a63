//! relaybox: the firmware of an office relay box.
//!
//! A local MQTT broker ([`gate`] in front of [`broker`]) keeps on flash ([`store`]) what is to go
//! upstream and bridges it to the organisation's NATS hub ([`uplink`]), and brings hub subjects
//! down to local subscribers ([`downlink`]). Frames from serial ports ([`serial`]) and the
//! registers of Modbus devices ([`modbus`]) join the same path. [`app`] wires them together. See
//! docs/ARCHITECTURE.md for the map and the invariants.

pub mod admin;
pub mod app;
pub mod broker;
pub mod config;
pub mod downlink;
pub mod gate;
pub mod liveness;
pub mod mapping;
pub mod modbus;
pub mod proto;
pub mod serial;
mod slots;
pub mod store;
pub mod systemd;
pub mod uplink;
pub mod warnings;
