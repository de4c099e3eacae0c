//! The NATS bus (docs/PROTOCOL.md): commands in, replies and events out, node state in KV.

pub mod commands;
pub mod connect;
pub mod dedupe;
pub mod intake;
pub mod jetstream;
pub mod limits;
pub mod outbox;
pub mod publisher;
pub mod push_auth;
pub mod refusals;
pub mod service;
