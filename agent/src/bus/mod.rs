//! The NATS bus (DESIGN §5): commands in, replies and events out, node state in KV.

pub mod commands;
pub mod connect;
pub mod dedupe;
pub mod jetstream;
pub mod outbox;
pub mod publisher;
