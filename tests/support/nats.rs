//! A real nats-server (with JetStream) on a free port, owned by one test.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::process::ChildGuard;
use super::{free_port, tail, Signal};

/// How long nats-server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a graceful stop may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A nats-server listening on 127.0.0.1, JetStream store in `DIR/js`, log in
/// `DIR/nats-server.log`. Killed on drop (through its [`ChildGuard`]).
pub struct NatsServer {
    bin: String,
    dir: PathBuf,
    port: u16,
    extra_args: Vec<String>,
    child: Option<ChildGuard>,
}

impl NatsServer {
    /// The binary: `$EBB_TEST_NATS_SERVER`, else `nats-server` on PATH.
    pub fn bin() -> String {
        std::env::var("EBB_TEST_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned())
    }

    /// Starts a server on a free port and waits until it greets clients.
    pub fn start(dir: &Path) -> Result<NatsServer> {
        Self::start_with_args(dir, &[])
    }

    /// Like [`NatsServer::start`], with a config file `DIR/nats.conf` holding `text` (auth,
    /// permissions, limits such as `max_payload`).
    pub fn start_with_config(dir: &Path, text: &str) -> Result<NatsServer> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let conf = write_config(dir, "nats.conf", text)?;
        let conf = conf
            .to_str()
            .with_context(|| format!("{} is not UTF-8", conf.display()))?
            .to_owned();
        Self::start_with_args(dir, &["-c", &conf])
    }

    /// Like [`NatsServer::start`], with extra arguments (such as `["-c", "auth.conf"]`: command-line
    /// flags, including the port, take precedence over the config file). They are kept for
    /// [`NatsServer::restart`].
    pub fn start_with_args(dir: &Path, extra_args: &[&str]) -> Result<NatsServer> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let mut server = NatsServer {
            bin: Self::bin(),
            dir: dir.to_owned(),
            port: 0,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        // The free port may be taken by someone else before the server binds it: try a few.
        let mut last_error = None;
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.join("js")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("nats-server.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// Stops gracefully (SIGTERM, then SIGKILL after 10 s). No-op when stopped.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.is_running() {
            child.signal(Signal::TERM)?;
            if child.wait_timeout(STOP_TIMEOUT)?.is_none() {
                child.kill()?;
            }
        }
        Ok(())
    }

    /// Kills the server at once (SIGKILL), like a crash. No-op when stopped.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
        }
        Ok(())
    }

    /// Starts the stopped server again on the same port, with the same store and arguments.
    pub fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("nats-server on port {} is still running", self.port);
        }
        self.spawn_and_wait()
    }

    /// [`NatsServer::stop`], then [`NatsServer::start_again`].
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let log = self.log_path();
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(self.store_dir())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let mut child = ChildGuard::spawn("nats-server", &mut cmd)?;

        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "nats-server on port {} exited with {status} before accepting; log tail:\n{}",
                    self.port,
                    tail(&log, 20)
                );
            }
            // Wait for the INFO greeting, not a mere accept: that proves a NATS server (ours,
            // since it is still running) owns the port.
            if greets(addr) {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "nats-server on port {} did not greet within {START_TIMEOUT:?}; log tail:\n{}",
                    self.port,
                    tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.child = Some(child);
        Ok(())
    }
}

/// Whether a NATS server at `addr` sends its `INFO` line.
fn greets(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .is_err()
    {
        return false;
    }
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ")
}

/// Writes a nats-server config file `DIR/NAME` (for auth, say) and returns its path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Sends `verb` with `body` to node `node` (subject prefix `ebb`) and returns the raw JSON reply;
/// panics, naming the subject, when no reply comes within `timeout` or it is not JSON.
pub async fn node_command(
    nc: &async_nats::Client,
    node: &str,
    verb: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> serde_json::Value {
    let subject = format!("ebb.node.{node}.{verb}");
    let reply = tokio::time::timeout(
        timeout,
        nc.request(subject.clone(), body.to_string().into()),
    )
    .await
    .unwrap_or_else(|_| panic!("no reply on {subject} within {timeout:?}"))
    .unwrap_or_else(|e| panic!("request on {subject}: {e}"));
    serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
        panic!(
            "reply on {subject} is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&reply.payload)
        )
    })
}

/// A client of `url` whose requests time out after `request_timeout`.
pub async fn client(url: &str, request_timeout: Duration) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .request_timeout(Some(request_timeout))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to nats at {url}: {e}"))
}

/// Every message of `stream`: subject, Msg-Id header, JSON body, in stream order.
pub async fn stream_messages(
    nc: &async_nats::Client,
    stream: &str,
) -> Vec<(String, Option<String>, serde_json::Value)> {
    let js = async_nats::jetstream::new(nc.clone());
    let mut s = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    let state = s
        .info()
        .await
        .unwrap_or_else(|e| panic!("stream {stream} info: {e}"))
        .state
        .clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(msg) = s.get_raw_message(seq).await else {
            continue;
        };
        let msg_id = msg
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string());
        let body = serde_json::from_slice(&msg.payload).unwrap_or(serde_json::Value::Null);
        out.push((msg.subject.to_string(), msg_id, body));
    }
    out
}
