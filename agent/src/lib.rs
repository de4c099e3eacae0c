//! ebb-agent: the node agent that runs beside HAProxy.
//!
//! It supervises HAProxy (seamless reloads without `-sf`, old workers tracked until they exit,
//! adoption across agent restarts), and takes commands over NATS. See docs/ARCHITECTURE.md for
//! the map of this crate; in short:
//!
//! - [`config`]: the agent's configuration, validated at load.
//! - [`haproxy`]: everything that touches HAProxy: config file, admin socket, processes.
//! - [`drain`], [`reload`], [`backoff`]: plain state machines that decide; no I/O.
//! - [`node`]: the one task that owns the node's state and carries decisions out.
//! - [`bus`]: NATS: commands in, replies and events out (through a durable outbox), KV node state.
//! - [`control`]: the local control socket: the bus's commands without NATS.
//! - [`plugins`]: the plugin host: loads `[[plugins]]`, asks them about idleness, delivers hooks.
//! - [`events`], [`state_file`]: what the node publishes and what it persists.
//! - [`metrics`]: `/metrics` and `/healthz`, from the node's events and its `status`.
//! - [`notify`]: systemd's `Type=notify`: readiness, status, the watchdog.

pub mod backoff;
pub mod bus;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod digest;
pub mod drain;
pub mod events;
pub mod haproxy;
pub mod inbox;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod plugins;
pub mod record;
pub mod reload;
pub mod state_file;
