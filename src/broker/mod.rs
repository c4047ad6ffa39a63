//! The local broker: relaybox's own MQTT broker core.
//!
//! - `codec`: MQTT 3.1.1 and 5 on the wire (decoding with mqtt-proto, encoding here);
//! - `topic`: topic names and filters, and how they match;
//! - `tree`: the subscription tree (shared subscriptions included);
//! - `retained`: retained messages by topic;
//! - `message`: a published message as the router carries it;
//! - `router`: sessions, fan-out to bounded per-session queues, wills, session expiry;
//! - `persist`: how persistent sessions are kept in the store's log;
//! - `local`: in-process clients (the downlink, serial ports);
//! - `sys`: the router's timers and its `$SYS` statistics.
//!
//! Nothing here touches a socket: client connections are the gate's (`crate::gate`), which
//! decodes, checks and drives each session's protocol state and calls the router.

pub mod codec;
pub mod local;
pub mod message;
mod persist;
pub mod retained;
pub mod router;
pub mod sys;
pub mod topic;
pub mod tree;
