//! The node: the one owner of this node's state (its workers, reloads, drain, lifecycle).
//!
//! - [`core`]: every rule, as a state machine without I/O (`handle_*` in, effects out).
//! - [`shell`]: the task that feeds the core and carries out its effects.
//! - [`adoption`]: what an agent finds at start (state file, verified HAProxy processes).
//! - [`master`]: the shell's master-worker half: reloads through HAProxy's master CLI, the
//!   master's processes found and watched.
//! - [`launcher`], [`admin_queue`], [`sampler`], [`checker`]: the shell's workers — a launch,
//!   one ordered admin-command queue per worker, the stats sampler and the plugin checker.

pub mod admin_queue;
pub mod adoption;
pub mod checker;
pub mod core;
pub mod effect;
pub mod launcher;
pub mod master;
pub mod sampler;
pub mod shell;

pub use self::core::Outcome;
pub use self::shell::Shell;
