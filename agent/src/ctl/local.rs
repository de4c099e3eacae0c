//! `ebb ctl --local`: the same commands, to the agent on this machine through its control socket
//! (one JSON request per line, one reply line each), with no NATS at all. It prints what a NATS
//! command to that one node prints, and exits with the same codes.

use std::path::Path;
use std::time::{Duration, Instant};

use ebb_sdk::command::{Command, StatusRequest};
use ebb_sdk::reply::Reply;
use ebb_sdk::status::{NodeState, StatusResult};
use ebb_sdk::subject::Verb;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::args::{ConnArgs, CtlVerb};
use super::exit::{self, Failure};
use super::output;
use super::preflight;
use super::reply_wait::{self, Limits, Work};

/// How often `drain --wait` asks for the node's status.
const POLL: Duration = Duration::from_millis(500);

pub async fn run(conn: &ConnArgs, verb: &CtlVerb, files: &preflight::Local) -> Result<u8, Failure> {
    let mut socket = Socket::connect(&conn.socket).await?;
    let (mut command, work) = super::command_of(verb, files);
    let margin = conn.timeout.0;
    // Work with limits, and a push to sign for the node's subject, need the node's status first.
    let learnt = match (&work, &command) {
        (Work::None, Command::Drain(_) | Command::Undrain(_) | Command::Status(_)) => None,
        _ => Some(socket.status(margin).await?),
    };
    if let (Command::Push(req), Some((node, _))) = (&mut command, &learnt) {
        let subject = ebb_sdk::subject::node_subject(&conn.prefix, node, Verb::Push.as_str());
        super::sign(req, files, &subject)?;
    }
    let limits = Limits::Answered(learnt.and_then(|(_, status)| status.timeouts));
    let wait = reply_wait::for_node(work, limits, margin);
    let reply = socket.send(&command, wait).await?;
    let verb_name = command.verb().as_str();
    if let (
        CtlVerb::Drain {
            wait: Some(wait_for),
            ..
        },
        true,
    ) = (verb, reply.ok)
    {
        return wait_drained(&mut socket, conn, reply, wait_for.0).await;
    }
    output::print_replies(
        conn.json,
        verb_name,
        std::slice::from_ref(&reply),
        &[],
        wait,
    );
    Ok(exit::for_replies(&[reply], &[]))
}

/// `drain --wait` without events: the node's status, every [`POLL`], until it is drained (or
/// stopped by `stop_when_drained`), stops draining, or `wait_for` is up.
async fn wait_drained(
    socket: &mut Socket,
    conn: &ConnArgs,
    drain_reply: Reply,
    wait_for: Duration,
) -> Result<u8, Failure> {
    let deadline = Instant::now() + wait_for;
    loop {
        let (_, status) = socket.status(conn.timeout.0).await?;
        let blockers = status
            .drain
            .as_ref()
            .map(|d| output::blockers(&d.blockers))
            .unwrap_or_default();
        let outcome = match status.state {
            NodeState::Drained | NodeState::Stopped => Some(exit::OK),
            NodeState::Draining | NodeState::Stopping => None,
            _ => Some(exit::FAILED),
        };
        if let Some(code) = outcome {
            let state = status.state.to_string();
            if conn.json {
                let out = serde_json::json!({"drain": drain_reply, "state": state});
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else if code == exit::OK {
                println!("{}: {state}", status.node);
            } else {
                println!(
                    "{}: {state}: the drain ended before the node drained",
                    status.node
                );
            }
            return Ok(code);
        }
        if Instant::now() >= deadline {
            if conn.json {
                let out = serde_json::json!({
                    "drain": drain_reply, "state": status.state.to_string(), "blockers": blockers,
                });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else {
                println!(
                    "{}: still draining after {}: {blockers}",
                    status.node,
                    humantime::format_duration(wait_for)
                );
            }
            return Ok(exit::TIMEOUT);
        }
        if !conn.json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!("{}: draining: {blockers}", status.node);
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// One connection to the control socket.
struct Socket {
    lines: BufReader<UnixStream>,
    path: String,
}

impl Socket {
    async fn connect(path: &Path) -> Result<Socket, Failure> {
        let stream = UnixStream::connect(path).await.map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    "only root and the agent's user may use it: run as one of them"
                }
                _ => "is the agent running, with this control.socket? (--socket names another)",
            };
            Failure::Unreachable(format!(
                "cannot reach the agent's control socket {}: {e}; {hint}",
                path.display()
            ))
        })?;
        Ok(Socket {
            lines: BufReader::new(stream),
            path: path.display().to_string(),
        })
    }

    /// Sends `command` and waits at most `wait` for its reply.
    async fn send(&mut self, command: &Command, wait: Duration) -> Result<Reply, Failure> {
        let mut line = match serde_json::from_slice::<Value>(&command.to_vec()) {
            Ok(Value::Object(fields)) => fields,
            _ => serde_json::Map::new(),
        };
        line.insert("verb".into(), Value::from(command.verb().as_str()));
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        let lost = |e: std::io::Error| {
            Failure::Unreachable(format!(
                "the control socket {} closed: {e}; the agent may be restarting, retry (with the \
                 same --request-id, a retry acts once)",
                self.path
            ))
        };
        self.lines.get_mut().write_all(&bytes).await.map_err(lost)?;
        let mut reply = String::new();
        match tokio::time::timeout(wait, self.lines.read_line(&mut reply)).await {
            Err(_) => Err(Failure::Unreachable(format!(
                "no reply from the agent within {}; it may still act on the {}; raise --timeout",
                humantime::format_duration(wait),
                command.verb()
            ))),
            Ok(Err(e)) => Err(lost(e)),
            Ok(Ok(0)) => Err(lost(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(Ok(_)) => serde_json::from_str(&reply).map_err(|e| {
                Failure::Unreachable(format!(
                    "the control socket {} answered what is not a reply ({e}): is it ebb's?",
                    self.path
                ))
            }),
        }
    }

    /// The node's id and status.
    async fn status(&mut self, wait: Duration) -> Result<(String, StatusResult), Failure> {
        let reply = self
            .send(&Command::Status(StatusRequest::default()), wait)
            .await?;
        match reply.result_as::<StatusResult>() {
            Some(Ok(status)) => Ok((reply.node, status)),
            _ => Err(Failure::Unreachable(format!(
                "the agent did not answer status: {}",
                reply
                    .error
                    .map(|e| e.message)
                    .unwrap_or_else(|| "no result".into())
            ))),
        }
    }
}
