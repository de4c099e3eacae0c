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
        let (out, err) = log_files(&log)?;
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

/// A client of `url` (one URL, or a comma-separated list of a cluster's) whose requests time out
/// after `request_timeout`.
pub async fn client(url: &str, request_timeout: Duration) -> async_nats::Client {
    let servers: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(|u| {
            u.trim()
                .parse()
                .unwrap_or_else(|e| panic!("NATS URL {u:?} in {url:?}: {e}"))
        })
        .collect();
    async_nats::ConnectOptions::new()
        .request_timeout(Some(request_timeout))
        .connect(servers)
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

/// The name of the cluster [`NatsCluster`] runs; its servers are `n0`, `n1`, `n2`.
pub const CLUSTER_NAME: &str = "ebb-test";
/// How long a cluster may take to elect its JetStream meta leader (2.9 takes a few seconds).
const META_LEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Three nats-servers on 127.0.0.1, routed into one cluster ([`CLUSTER_NAME`], servers `n0`,
/// `n1`, `n2`), JetStream on each with its own store (`DIR/nI/js`), a monitoring port each. Every
/// server is killed on drop (through its [`ChildGuard`]).
pub struct NatsCluster {
    servers: Vec<ClusterServer>,
}

/// One server of a [`NatsCluster`]: its ports are fixed for the cluster's life, so that a server
/// started again takes its old place in the routes.
struct ClusterServer {
    name: String,
    dir: PathBuf,
    port: u16,
    monitor_port: u16,
    child: Option<ChildGuard>,
}

impl ClusterServer {
    fn log_path(&self) -> PathBuf {
        self.dir.join("nats-server.log")
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.log_path();
        let (out, err) = log_files(&log)?;
        let mut cmd = Command::new(NatsServer::bin());
        cmd.arg("-c")
            .arg(self.dir.join("nats.conf"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        self.child = Some(ChildGuard::spawn(
            &format!("nats-server {}", self.name),
            &mut cmd,
        )?);
        Ok(())
    }

    /// Waits until the server greets clients; fails early when it exits.
    fn wait_greets(&mut self, deadline: Instant) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            let Some(child) = self.child.as_mut() else {
                bail!("nats-server {} is not running", self.name);
            };
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "nats-server {} (port {}) exited with {status} before accepting; log tail:\n{}",
                    self.name,
                    self.port,
                    tail(&self.log_path(), 20)
                );
            }
            if greets(addr) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nats-server {} (port {}) did not greet within {START_TIMEOUT:?}; log tail:\n{}",
                    self.name,
                    self.port,
                    tail(&self.log_path(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// `GET path` on the monitoring port, parsed as JSON.
    fn monitor(&self, path: &str) -> Result<serde_json::Value> {
        monitor_get(self.monitor_port, path)
    }
}

impl NatsCluster {
    /// Starts the three servers under `dir` and waits until the cluster has a JetStream meta
    /// leader that every server knows.
    pub fn start(dir: &Path) -> Result<NatsCluster> {
        // A free port may be taken by someone else before its server binds it: every server names
        // every other's route port, so a clash starts the whole cluster over on new ports.
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start(dir) {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn try_start(dir: &Path) -> Result<NatsCluster> {
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route, _)| format!("\"nats-route://127.0.0.1:{route}\""))
            .collect();
        let mut servers = Vec::with_capacity(3);
        for (i, (port, route, monitor_port)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let server_dir = dir.join(&name);
            fs::create_dir_all(&server_dir)
                .with_context(|| format!("create {}", server_dir.display()))?;
            let store = server_dir.join("js");
            let conf = format!(
                "server_name: {name}\n\
                 listen: \"127.0.0.1:{port}\"\n\
                 http: \"127.0.0.1:{monitor_port}\"\n\
                 jetstream {{ store_dir: {store:?} }}\n\
                 cluster {{\n  name: {CLUSTER_NAME}\n  listen: \"127.0.0.1:{route}\"\n  \
                 routes: [{}]\n}}\n",
                routes.join(", ")
            );
            write_config(&server_dir, "nats.conf", &conf)?;
            servers.push(ClusterServer {
                name,
                dir: server_dir,
                port: *port,
                monitor_port: *monitor_port,
                child: None,
            });
        }
        let mut cluster = NatsCluster { servers };
        for server in &mut cluster.servers {
            server.spawn()?;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for server in &mut cluster.servers {
            server.wait_greets(deadline)?;
        }
        cluster.wait_meta_leader()?;
        Ok(cluster)
    }

    /// Waits until every running server names the same JetStream meta leader, itself running.
    pub fn wait_meta_leader(&mut self) -> Result<String> {
        let deadline = Instant::now() + META_LEADER_TIMEOUT;
        loop {
            if let Some(leader) = self.meta_leader() {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                let views: Vec<String> = self
                    .servers
                    .iter()
                    .map(|s| match s.monitor("/jsz") {
                        Ok(jsz) => format!("{}: {}", s.name, jsz["meta_cluster"]),
                        Err(e) => format!("{}: {e:#}", s.name),
                    })
                    .collect();
                bail!(
                    "the cluster elected no JetStream meta leader within {META_LEADER_TIMEOUT:?}; \
                     what each server says: {}",
                    views.join("; ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The meta leader every running server agrees on, if any.
    fn meta_leader(&mut self) -> Option<String> {
        let mut leader: Option<String> = None;
        let running: Vec<usize> = (0..self.servers.len())
            .filter(|&i| self.servers[i].is_running())
            .collect();
        for &i in &running {
            let jsz = self.servers[i].monitor("/jsz").ok()?;
            let named = jsz["meta_cluster"]["leader"].as_str()?.to_owned();
            if named.is_empty() || leader.as_ref().is_some_and(|l| *l != named) {
                return None;
            }
            leader = Some(named);
        }
        let leader = leader?;
        running
            .iter()
            .any(|&i| self.servers[i].name == leader)
            .then_some(leader)
    }

    /// The client URLs, `n0` first.
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The client URLs, comma-joined, as `nats.url` takes them.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// Server `i`'s name (`n<i>`).
    pub fn name(&self, i: usize) -> &str {
        &self.servers[i].name
    }

    /// The index of the server named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.name == name)
    }

    pub fn monitor_port(&self, i: usize) -> u16 {
        self.servers[i].monitor_port
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.servers[i].log_path()
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.servers[i].is_running()
    }

    /// Kills server `i` at once (SIGKILL), like a crash. No-op when it is not running.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.servers[i].child.take() {
            child.kill()?;
        }
        Ok(())
    }

    /// Starts server `i` again on its ports and store, and waits until it greets clients and
    /// agrees with the others on a meta leader.
    pub fn start_again(&mut self, i: usize) -> Result<()> {
        if self.servers[i].is_running() {
            bail!("nats-server {} is still running", self.servers[i].name);
        }
        self.servers[i].spawn()?;
        self.servers[i].wait_greets(Instant::now() + START_TIMEOUT)?;
        self.wait_meta_leader()?;
        Ok(())
    }

    /// The running server that holds the most client connections whose name starts with
    /// `ebb-agent` (monitoring `/connz`), with that count; `None` when no server holds one.
    pub fn agent_server(&mut self) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        for i in 0..self.servers.len() {
            if !self.servers[i].is_running() {
                continue;
            }
            let Ok(connz) = self.servers[i].monitor("/connz?limit=4096") else {
                continue;
            };
            let count = connz["connections"].as_array().map_or(0, |conns| {
                conns
                    .iter()
                    .filter(|c| {
                        c["name"]
                            .as_str()
                            .is_some_and(|n| n.starts_with("ebb-agent"))
                    })
                    .count()
            });
            if count > 0 && best.is_none_or(|(_, most)| count > most) {
                best = Some((i, count));
            }
        }
        best
    }

    /// The index of the server that leads stream `stream` (of the global account), as a running
    /// server reports it (monitoring `/jsz`); `None` while it has no leader.
    pub fn stream_leader(&mut self, stream: &str) -> Option<usize> {
        for i in 0..self.servers.len() {
            if !self.servers[i].is_running() {
                continue;
            }
            let Ok(jsz) = self.servers[i].monitor("/jsz?accounts=true&streams=true") else {
                continue;
            };
            let accounts = jsz["account_details"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for account in &accounts {
                let streams = account["stream_detail"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for s in streams.iter().filter(|s| s["name"] == stream) {
                    if let Some(leader) = s["cluster"]["leader"].as_str() {
                        if let Some(index) = self.index_of(leader) {
                            return Some(index);
                        }
                    }
                }
            }
        }
        None
    }

    /// Waits until stream `stream` has a leader on a running server; returns its index.
    pub fn wait_stream_leader(&mut self, stream: &str, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.stream_leader(stream) {
                if self.servers[i].is_running() {
                    return Ok(i);
                }
            }
            if Instant::now() >= deadline {
                bail!("stream {stream} had no leader on a running server within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `GET path` on a nats-server's monitoring port at 127.0.0.1, parsed as JSON. Plain HTTP/1.0 on
/// a std socket: the fixture's waits are synchronous, like [`NatsServer::start`]'s.
pub fn monitor_get(port: u16, path: &str) -> Result<serde_json::Value> {
    use std::io::{Read, Write};
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .with_context(|| format!("connect to the monitoring port {port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("read GET {path} from the monitoring port {port}"))?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("GET {path} on port {port}: no HTTP body in {response:?}");
    };
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        bail!(
            "GET {path} on port {port}: {}",
            head.lines().next().unwrap_or(head)
        );
    }
    serde_json::from_str(body).with_context(|| format!("GET {path} on port {port}: not JSON"))
}

/// A server's log, opened for appending, once for its stdout and once for its stderr.
fn log_files(log: &Path) -> Result<(std::fs::File, std::fs::File)> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let err = out.try_clone()?;
    Ok((out, err))
}
