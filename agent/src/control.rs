//! The local control socket (`control.socket`): the bus's requests with no NATS at all, so that
//! someone on the node can see its state and drain it while NATS is down.
//!
//! One JSON object per line: the verb's request fields plus `"verb"`, e.g.
//! `{"verb":"drain","drain_id":"d-1"}`; each is answered by one line, the reply envelope the bus
//! sends. Requests go to the same command server as those from NATS (same checks, same memory of
//! request ids, same rules in the node), counted as coming on the node's own subject.
//!
//! The socket is mode 0600, and a peer must be the agent's own user or root: the mode alone
//! leaves a moment between `bind` and `chmod` in which anyone could connect.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use ebb_sdk::command::peek_request_id;
use ebb_sdk::reply::{ErrorCode, Reply};
use ebb_sdk::subject::Verb;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};

use crate::bus::commands::{local_subject, Request, Responder};

/// The longest request line: a push carries a whole haproxy.cfg.
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// Connections served at once; one more is told so and closed.
const MAX_CONNECTIONS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot create the directory of control.socket {}: {source}; create it, or set \
         control.socket elsewhere (\"\" turns it off)",
        .path.display()
    )]
    Directory { path: PathBuf, source: io::Error },
    #[error(
        "control.socket {} exists and is not a socket; remove it, or set control.socket elsewhere",
        .0.display()
    )]
    NotASocket(PathBuf),
    #[error(
        "control.socket {} is in use: another agent answers on it; stop that agent, or give this \
         one another control.socket",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("cannot serve control.socket {}: {source}", .path.display())]
    Bind { path: PathBuf, source: io::Error },
}

/// A bound control socket, not yet serving.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` (mode 0600), replacing a socket file nobody answers on: one a previous agent
    /// left.
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ControlError::Directory {
                path: path.to_owned(),
                source,
            })?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ControlError::NotASocket(path.to_owned()))
            }
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ControlError::InUse(path.to_owned()));
                }
                std::fs::remove_file(path).map_err(|source| ControlError::Bind {
                    path: path.to_owned(),
                    source,
                })?;
            }
            Err(_) => {}
        }
        let bind = |path: &Path| -> io::Result<UnixListener> {
            let listener = UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            Ok(listener)
        };
        let listener = bind(path).map_err(|source| ControlError::Bind {
            path: path.to_owned(),
            source,
        })?;
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until the command server is gone.
    pub async fn serve(self, prefix: String, node: String, requests: mpsc::Sender<Request>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let own = rustix::process::geteuid().as_raw();
        let local = Arc::new(Local {
            prefix,
            node,
            requests,
        });
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: a pause, not a busy loop.
                    tracing::warn!("control socket {}: accept: {e}", self.path.display());
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == own || cred.uid() == 0 => {}
                Ok(cred) => {
                    tracing::warn!(
                        "control socket {}: refused a connection from uid {}: only the agent's \
                         user and root may use it",
                        self.path.display(),
                        cred.uid()
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        "control socket {}: peer credentials: {e}",
                        self.path.display()
                    );
                    continue;
                }
            }
            if local.requests.is_closed() {
                return;
            }
            let local = local.clone();
            match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    tokio::spawn(async move {
                        local.connection(stream).await;
                        drop(slot);
                    });
                }
                Err(_) => {
                    tokio::spawn(async move {
                        let reply = local.refuse(
                            None,
                            ErrorCode::Conflict,
                            format!(
                                "{MAX_CONNECTIONS} control connections are open; retry once one \
                                 closes"
                            ),
                        );
                        let mut stream = stream;
                        let _ = stream.write_all(&reply).await;
                    });
                }
            }
        }
    }
}

struct Local {
    prefix: String,
    node: String,
    requests: mpsc::Sender<Request>,
}

impl Local {
    /// Answers each line in turn, until the client closes or sends a line too long to resync on.
    async fn connection(&self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut line = Vec::new();
        loop {
            line.clear();
            let limit = MAX_LINE_BYTES as u64 + 1;
            match (&mut read).take(limit).read_until(b'\n', &mut line).await {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("control connection: {e}");
                    return;
                }
            }
            if line.last() != Some(&b'\n') && line.len() > MAX_LINE_BYTES {
                let reply = self.refuse(
                    None,
                    ErrorCode::InvalidRequest,
                    format!(
                        "request line over the {MAX_LINE_BYTES}-byte limit; send less (the \
                         connection is closed)"
                    ),
                );
                let _ = write.write_all(&reply).await;
                return;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let reply = self.answer(&line).await;
            if write.write_all(&reply).await.is_err() {
                return;
            }
        }
    }

    /// The reply line to one request line.
    async fn answer(&self, line: &[u8]) -> Vec<u8> {
        let (verb, body) = match split(line) {
            Ok(split) => split,
            Err((code, message)) => return self.refuse(peek_request_id(line), code, message),
        };
        let (tx, mut rx) = mpsc::channel(1);
        let request = Request {
            subject: local_subject(&self.prefix, &self.node, verb.as_str()),
            body,
            responder: Responder::Local(tx),
        };
        if self.requests.send(request).await.is_err() {
            return self.refuse(
                peek_request_id(line),
                ErrorCode::Internal,
                "the agent is shutting down; retry on its successor".into(),
            );
        }
        match rx.recv().await {
            Some(reply) => {
                let mut reply = reply.to_vec();
                reply.push(b'\n');
                reply
            }
            None => self.refuse(
                peek_request_id(line),
                ErrorCode::Internal,
                "the agent is shutting down; retry on its successor".into(),
            ),
        }
    }

    fn refuse(&self, request_id: Option<String>, code: ErrorCode, message: String) -> Vec<u8> {
        let mut reply = Reply::failure(&self.node, request_id, code, message).to_vec();
        reply.push(b'\n');
        reply
    }
}

/// A request line split into its verb and the verb's request body (the object without `verb`).
fn split(line: &[u8]) -> Result<(Verb, Bytes), (ErrorCode, String)> {
    let invalid = |message: String| (ErrorCode::InvalidRequest, message);
    let mut object: Map<String, Value> = serde_json::from_slice(line).map_err(|e| {
        invalid(format!(
            "a request is one JSON object per line, such as {{\"verb\":\"status\"}}: {e}"
        ))
    })?;
    let verb = match object.remove("verb") {
        Some(Value::String(verb)) => verb,
        Some(_) => return Err(invalid("verb: expected a string such as \"status\"".into())),
        None => {
            return Err(invalid(
                "missing field `verb`: one of status, reload, drain, undrain, stop, push".into(),
            ))
        }
    };
    let verb = verb.parse::<Verb>().map_err(|e| {
        let mut message = e.to_string();
        message.truncate(1024);
        (ErrorCode::UnknownCommand, message)
    })?;
    let body = serde_json::to_vec(&object).map_err(|e| invalid(e.to_string()))?;
    Ok((verb, Bytes::from(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_split_into_its_verb_and_the_verbs_fields() {
        let (verb, body) = split(br#"{"verb":"drain","drain_id":"d-1"}"#).expect("valid");
        assert_eq!(verb, Verb::Drain);
        assert_eq!(&body[..], br#"{"drain_id":"d-1"}"#);
        let (verb, body) = split(br#"{"verb":"status"}"#).expect("valid");
        assert_eq!(verb, Verb::Status);
        assert_eq!(&body[..], b"{}");
    }

    #[test]
    fn a_line_that_is_not_a_request_says_what_one_looks_like() {
        let (code, message) = split(b"status").expect_err("not JSON");
        assert_eq!(code, ErrorCode::InvalidRequest);
        assert!(message.contains(r#"{"verb":"status"}"#), "{message}");
        let (code, _) = split(b"[1]").expect_err("not an object");
        assert_eq!(code, ErrorCode::InvalidRequest);
        let (code, message) = split(br#"{"drain_id":"d"}"#).expect_err("no verb");
        assert_eq!(code, ErrorCode::InvalidRequest);
        assert!(message.contains("verb"), "{message}");
        let (code, _) = split(br#"{"verb":1}"#).expect_err("verb not a string");
        assert_eq!(code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn a_verb_is_one_of_the_protocols_exactly() {
        // A dotted verb must not reach a subject, where its last token would be read as the verb.
        for verb in ["explode", "x.status", "Status", ""] {
            let line = format!(r#"{{"verb":"{verb}"}}"#);
            let (code, _) = split(line.as_bytes()).expect_err(verb);
            assert_eq!(code, ErrorCode::UnknownCommand, "{verb}");
        }
    }
}
