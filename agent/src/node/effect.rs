//! What the node core hands the shell to carry out, and the inputs it takes that are more than a
//! bare value. Plain data: no handles, no channels.

use std::time::Duration;

use ebb_sdk::event::Event;
use ebb_sdk::plugin::{CheckContext, HookEvent};
use ebb_sdk::reply::Reply;

use crate::record::{ProcessId, WorkerRecord};
use crate::reload::PushedConfig;

/// Names one request that waits for its reply; the shell keeps the reply channel behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyTo(pub u64);

/// A signal to one recorded worker. The shell sends it through the worker's pidfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerSignal {
    /// SIGUSR1: stop accepting, finish what is in flight, then exit.
    SoftStop,
    /// SIGTERM at the stop deadline: close what is left. The shell counts the worker's open client
    /// connections first and reports them with `handle_connections_cut`.
    HardStop,
    /// SIGKILL: it ignored SIGTERM.
    Kill,
}

/// Which of the drain's admin commands a job carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// `start_commands`: the worker answers as draining (503 on /healthz).
    Start,
    /// `stop_commands`: the worker answers as serving again.
    Stop,
}

/// Admin commands for one worker. The shell runs the jobs of a worker in order, one at a time, and
/// reports each with `handle_commands_done`, tagged as it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandJob {
    pub worker: ProcessId,
    pub drain_id: String,
    pub kind: CommandKind,
    pub commands: Vec<String>,
}

/// Why the node's task ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// HAProxy is stopped for good.
    Stopped { connections_cut: u64 },
    /// The agent leaves HAProxy running for the next agent to adopt.
    Detached,
}

/// One thing for the shell to do. Effects come out in the order they must be carried out: a
/// `Persist` before a `Publish` means the state is durable before the event leaves.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Start a worker (`-x` when `takeover`), exporting `EBB_DRAINING` when `draining`; report
    /// with `handle_launched(reload_id, …)`.
    Launch {
        reload_id: String,
        takeover: bool,
        draining: bool,
        config: Option<PushedConfig>,
    },
    Signal {
        worker: ProcessId,
        signal: WorkerSignal,
    },
    /// master-worker mode, a master ebb owns: the signal goes to the master, which passes it on
    /// to every worker (SIGUSR1 to a worker behind the master's back would make it exit as a
    /// failed current worker). For `HardStop`, the shell counts the workers' open client
    /// connections first, as for `Signal`.
    SignalMaster {
        master: ProcessId,
        signal: WorkerSignal,
    },
    /// Queue admin commands on the worker's own queue.
    Commands(CommandJob),
    /// Write the state file durably (temp file, fsync, rename, fsync of the directory).
    Persist(Box<crate::state_file::State>),
    /// Hand an event to the publisher.
    Publish(Box<Event>),
    Reply {
        to: ReplyTo,
        reply: Box<Reply>,
    },
    /// Deliver a hook to the plugins, without waiting.
    Hook(Box<HookEvent>),
    /// Deliver the `stopping` hook and wait for it (within the plugins' timeouts); then report
    /// with `handle_stopping_hook_done`.
    StoppingHook,
    /// Sample this worker's stats from now on (`None`: stop sampling).
    Sample(Option<u32>),
    /// Ask the plugins' idle checks about this drain from now on (`None`: stop asking).
    Check(Option<Box<CheckContext>>),
    /// Ask the admin socket which workers answer, retrying with backoff until one does; report
    /// with `handle_admin_answers`.
    ConfirmCurrent,
    /// The node's task ends.
    Exit(Outcome),
}

/// One stats sample of worker `pid`, by the idle rule: what the sampler reads and the core keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub pid: u32,
    /// `None` when the answer could not be read by the rule.
    pub busy: Option<u64>,
    /// Connections the watched frontends accepted so far (for `quiet_period`).
    pub accepted: u64,
}

/// What a launch came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launched {
    /// The new worker answered the admin socket with its own pid.
    Ready {
        worker: WorkerRecord,
        /// From spawn to ready.
        launch: Duration,
    },
    /// It never became ready; the running worker was not touched.
    Failed {
        /// The config was refused before anything started (a pushed config `haproxy -c` refused).
        config_invalid: bool,
        message: String,
    },
}

/// master-worker mode: what the master CLI's `show proc` said, with each process verified by its
/// start time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterView {
    pub master: ProcessId,
    /// HAProxy's version, as the master reports it.
    pub version: String,
    /// The newest worker under `# workers`: the one the master forked last.
    pub current: Option<WorkerRecord>,
}
