//! What other tasks may ask of the node's task, and what it tells them about itself. Shared by the
//! bus, the signal handler and the node, so that none of them imports another for it.

use ebb_sdk::command::Command;
use ebb_sdk::reply::Reply;
use ebb_sdk::status::NodeState;
use tokio::sync::oneshot;

/// One request to the node's task.
#[derive(Debug)]
pub enum Input {
    Command {
        command: Command,
        reply: oneshot::Sender<Reply>,
    },
    Signal(AgentSignal),
}

/// The agent's own signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentSignal {
    /// SIGHUP: reload.
    Reload,
    /// SIGTERM or SIGINT: stop HAProxy gracefully, then exit.
    Stop,
    /// SIGUSR2: exit and leave HAProxy running for the next agent to adopt.
    Detach,
}

/// What the node tells the bus about itself, for the KV node record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub state: NodeState,
    pub drain_id: Option<String>,
}

/// Asks the node for its `status`, as a local observer does (the watchdog, `/metrics`,
/// `/healthz`): `None` when the node's task is gone or does not answer within `timeout`. An answer
/// proves that the node's loop is turning, not just that the process lives.
pub async fn ask_status(
    inputs: &tokio::sync::mpsc::Sender<Input>,
    timeout: std::time::Duration,
) -> Option<Reply> {
    let (reply, answer) = oneshot::channel();
    let command = Command::Status(ebb_sdk::command::StatusRequest::default());
    let asked = async {
        inputs.send(Input::Command { command, reply }).await.ok()?;
        answer.await.ok()
    };
    tokio::time::timeout(timeout, asked).await.ok().flatten()
}
