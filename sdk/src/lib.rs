//! Protocol types of ebb's NATS bus, shared by the agent, by orchestrators written in Rust and (later) by
//! plugin authors.
//!
//! The wire format is a contract that clients in other languages rely on; `docs/PROTOCOL.md` describes it
//! and `docs/schemas/` holds JSON Schemas generated from these types (feature `schema`). In short:
//!
//! - [`subject`]: subject names (`ebb.node.<id>.<verb>`, `ebb.event.<node>.<kind>`, …) and id validation.
//! - [`command`]: request bodies, one struct per verb, and [`Command::parse`] which turns a verb and a body
//!   into a typed command. Unknown fields are rejected, so a typo never passes silently.
//! - [`reply`]: the reply envelope (`{"ok":…,"node":…,"request_id":…,"result"|"error":…}`), the error codes
//!   and the result of each verb except `status`.
//! - [`status`]: node states, the `status` result with its drain blockers, and the KV node record.
//! - [`event`]: the event envelope and every event kind.
//! - [`push`]: push signatures: the signed payload, signing with an nkey seed, verifying against
//!   configured public keys.
//! - [`time`]: the RFC 3339 timestamps used on the wire.
//! - [`plugin`]: the plugin ABI (a versioned C table, JSON in and out), the safe [`plugin::Plugin`] trait and
//!   [`export_plugin!`].
//! - `client` (feature `client`): an async fleet client over async-nats.
//!
//! Reading is tolerant where it must be and strict where it helps: requests reject unknown fields, while
//! replies, results and events ignore fields they do not know, so newer agents can add fields without
//! breaking older clients.

#[cfg(feature = "client")]
pub mod client;
pub mod command;
pub mod event;
pub mod plugin;
pub mod push;
pub mod reply;
pub mod status;
pub mod subject;
pub mod time;

pub use command::{
    Command, CommandError, DrainRequest, PushRequest, ReloadRequest, Request, StatusRequest,
    StopRequest, UndrainRequest,
};
pub use event::{Event, EventBody, ExitStatus, WorkerRole};
pub use reply::{
    DrainResult, ErrorCode, ReloadResult, Reply, ReplyError, StopResult, UndrainResult,
};
pub use status::{
    Blocker, DrainStatus, HaproxyStatus, LastReload, NodeRecord, NodeState, OldWorker,
    PluginStatus, StatusResult,
};
pub use subject::{UnknownVerb, Verb};

/// Version of the bus protocol, carried as `v` in every event. It changes only on an incompatible change;
/// compatible additions (new optional fields, new event kinds) keep it.
pub const PROTOCOL_VERSION: u32 = 1;
