//! One ordered queue of admin commands per worker. A drain's start commands and an undrain's stop
//! commands for the same worker run one after the other, in the order the node decided them, so
//! a drain quickly followed by an undrain always ends with the worker serving.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::effect::CommandJob;
use crate::haproxy::worker_cli::{CliError, WorkerCli};
use crate::record::ProcessId;

/// Attempts per command for errors that may pass (the socket busy with a reload, a worker not yet
/// reached); HAProxy refusing the command is final at once.
const ATTEMPTS: u32 = 6;
const FIRST_RETRY: Duration = Duration::from_millis(20);

/// Where each job's result goes.
pub type Done = Arc<dyn Fn(CommandJob, Result<(), String>) + Send + Sync>;

/// The queues, one task per worker that has jobs. Dropping a worker's queue (it exited) ends its
/// task after the job in hand.
pub struct AdminQueues {
    admin: WorkerCli,
    done: Done,
    queues: HashMap<ProcessId, mpsc::UnboundedSender<CommandJob>>,
}

impl AdminQueues {
    pub fn new(admin: WorkerCli, done: Done) -> Self {
        AdminQueues {
            admin,
            done,
            queues: HashMap::new(),
        }
    }

    /// Queues `job` behind the worker's earlier jobs.
    pub fn push(&mut self, job: CommandJob) {
        let worker = job.worker;
        let tx = self.queues.entry(worker).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(self.admin.clone(), worker.pid, rx, self.done.clone()));
            tx
        });
        if let Err(mpsc::error::SendError(job)) = tx.send(job) {
            // The task is gone only if the runtime is shutting down: nothing will run anymore.
            (self.done)(job, Err("the agent is shutting down".into()));
        }
    }

    /// The worker exited: its queue goes.
    pub fn forget(&mut self, worker: ProcessId) {
        self.queues.remove(&worker);
    }
}

async fn run(
    admin: WorkerCli,
    pid: u32,
    mut jobs: mpsc::UnboundedReceiver<CommandJob>,
    done: Done,
) {
    while let Some(job) = jobs.recv().await {
        let mut result = Ok(());
        for command in &job.commands {
            if let Err(e) = run_one(&admin, pid, command).await {
                result = Err(format!("{command:?}: {e}"));
                break;
            }
            tracing::debug!(pid, "ran {command:?} on worker {pid}");
        }
        done(job, result);
    }
}

async fn run_one(admin: &WorkerCli, pid: u32, command: &str) -> Result<(), CliError> {
    let mut wait = FIRST_RETRY;
    let mut attempt = 1;
    loop {
        match admin.command_on(pid, command).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_refused() => return Err(e),
            Err(e) if attempt >= ATTEMPTS => return Err(e),
            Err(e) => {
                tracing::debug!(
                    pid,
                    "admin command {command:?} failed ({e}); retrying in {wait:?}"
                );
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
        }
    }
}
