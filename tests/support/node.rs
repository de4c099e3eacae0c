//! One node under test, whole: nats-server, backend, haproxy.cfg, agent.toml, a running `ebb
//! agent`, a NATS client and an [`EventTap`] on the node's events ([`NodeFixture`]); and a
//! [`Fleet`] of such nodes sharing one nats-server, one backend and one test dir.
//!
//! ```ignore
//! let node = NodeFixture::builder()
//!     .haproxy(|h| h.frontend_line("timeout http-keep-alive 3s"))
//!     .agent(|c| {
//!         c.set_str("drain", "idle", "connections");
//!     })
//!     .start()
//!     .await;
//! node.ok("drain", json!({"drain_id": "d"})).await;
//! node.events.drained("d").await;
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use serde_json::{json, Value};

use super::events::EventTap;
use super::{
    blocking, haproxy_pids_for, http_get, http_request, log_message, node_command, show_info,
    show_info_pid, try_wait_for_async, wait_until_async, Agent, AgentConfig, Backend, ClientError,
    HaproxyConfig, NatsServer, Signal, TestDir,
};

/// The node id a fixture gets unless told otherwise (also [`AgentConfig`]'s default).
pub const NODE_ID: &str = "node-1";
/// Default timeout of a fixture's commands and waits. Generous: the tests share a small machine.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(30);
/// The least time an agent gets to serve after it started: it connects to NATS, creates its
/// stream and bucket, and starts haproxy, all on a busy machine.
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);
/// One status request of a polling wait; an agent busy for longer is simply asked again.
const POLL_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The `ebb` binary cargo built for this test (or bench) target.
pub fn ebb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ebb")
}

type HaproxyTweak<'a> = Box<dyn FnOnce(HaproxyConfig) -> HaproxyConfig + 'a>;
type AgentTweak<'a> = Box<dyn FnOnce(&Path, &HaproxyConfig, &mut AgentConfig) + 'a>;

/// Builds a [`NodeFixture`]: see [`NodeFixture::builder`] for the defaults. Closures given to
/// [`haproxy`](Self::haproxy) run first, in the order given; then those given to
/// [`agent`](Self::agent), [`plugins_toml`](Self::plugins_toml), [`prepare`](Self::prepare),
/// [`prepare_with_haproxy`](Self::prepare_with_haproxy) and
/// [`haproxy_binary`](Self::haproxy_binary), in the order given.
#[must_use = "a builder does nothing until start() or spawn()"]
pub struct NodeFixtureBuilder<'a> {
    bin: PathBuf,
    node_id: String,
    timeout: Duration,
    nats_url: Option<String>,
    dir: Option<PathBuf>,
    client: Option<Client>,
    events_subject: Option<String>,
    backend: Option<SocketAddr>,
    env: Vec<(String, String)>,
    haproxy: Vec<HaproxyTweak<'a>>,
    agent: Vec<AgentTweak<'a>>,
}

impl<'a> NodeFixtureBuilder<'a> {
    /// The `ebb` binary to run (default: [`ebb_bin`]).
    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = bin.into();
        self
    }

    pub fn node_id(mut self, id: &str) -> Self {
        self.node_id = id.to_owned();
        self
    }

    /// Timeout of the fixture's commands and waits, and of its event tap's (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Joins a nats-server the caller owns (any URL the agent accepts, `tls://` included) instead
    /// of starting one. A server that needs credentials needs [`client`](Self::client) too.
    pub fn nats_url(mut self, url: &str) -> Self {
        self.nats_url = Some(url.to_owned());
        self
    }

    /// Writes the node's files into `dir` (created if missing) instead of a [`TestDir`] of its
    /// own. `dir` must lie inside a [`TestDir`] the caller keeps until the fixture is dropped: that
    /// is what reaps the haproxy processes of the node.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Talks to NATS through `client` (credentials, TLS, a shared connection) instead of a plain
    /// connection of its own.
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// The subject of the event tap (default `ebb.event.<node id>.>`).
    pub fn events_subject(mut self, subject: &str) -> Self {
        self.events_subject = Some(subject.to_owned());
        self
    }

    /// haproxy's backend: `Some(addr)` for a server the caller runs, `None` (the default) for the
    /// demo backend, which the fixture then runs.
    pub fn backend(mut self, backend: Option<SocketAddr>) -> Self {
        self.backend = backend;
        self
    }

    /// Adjusts haproxy.cfg (see [`HaproxyConfig`]) before it is written.
    pub fn haproxy(mut self, f: impl FnOnce(HaproxyConfig) -> HaproxyConfig + 'a) -> Self {
        self.haproxy.push(Box::new(f));
        self
    }

    /// Adjusts agent.toml (see [`AgentConfig`]) before it is written.
    pub fn agent(mut self, f: impl FnOnce(&mut AgentConfig) + 'a) -> Self {
        self.agent.push(Box::new(move |_, _, cfg| f(cfg)));
        self
    }

    /// Appends the `[[plugins]]` tables that `f` returns, given the node's dir (to build or copy
    /// plugin files into).
    pub fn plugins_toml(mut self, f: impl FnOnce(&Path) -> String + 'a) -> Self {
        self.agent.push(Box::new(move |dir, _, cfg| {
            cfg.raw(&f(dir));
        }));
        self
    }

    /// Runs `f` on the node's dir and agent config just before the agent starts, to leave
    /// something for it to find (a state file, say).
    pub fn prepare(mut self, f: impl FnOnce(&Path, &mut AgentConfig) + 'a) -> Self {
        self.agent.push(Box::new(move |dir, _, cfg| f(dir, cfg)));
        self
    }

    /// [`prepare`](Self::prepare), given haproxy.cfg as written too: to start something beside
    /// the node that names its files, say.
    pub fn prepare_with_haproxy(
        mut self,
        f: impl FnOnce(&Path, &HaproxyConfig, &mut AgentConfig) + 'a,
    ) -> Self {
        self.agent.push(Box::new(f));
        self
    }

    /// The haproxy the agent runs (`[haproxy] binary`).
    pub fn haproxy_binary(mut self, bin: impl AsRef<Path>) -> Self {
        let bin = bin.as_ref().to_owned();
        self.agent.push(Box::new(move |_, _, cfg| {
            cfg.set_path("haproxy", "binary", &bin);
        }));
        self
    }

    /// An environment variable for the agent (such as `EBB_NATS__URL`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts the node and returns once it answers `status` as serving.
    pub async fn start(self) -> NodeFixture {
        let node = self.spawn().await;
        node.wait_serving().await;
        node
    }

    /// Starts the node without waiting for it to serve ([`NodeFixture::wait_serving`] does). The
    /// event tap is in place before the agent starts, so it sees `agent_started`.
    pub async fn spawn(self) -> NodeFixture {
        let test_dir = match self.dir {
            Some(_) => None,
            None => Some(TestDir::new()),
        };
        let dir = match (&self.dir, &test_dir) {
            (Some(dir), _) => dir.clone(),
            (None, Some(test_dir)) => test_dir.path().to_owned(),
            (None, None) => unreachable!("a test dir is made when none is given"),
        };
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create the node dir {}: {e}", dir.display()));
        let nats = match self.nats_url {
            Some(_) => None,
            None => Some(NatsServer::start(&dir.join("nats")).expect("start nats-server")),
        };
        let nats_url = match (&self.nats_url, &nats) {
            (Some(url), _) => url.clone(),
            (None, Some(nats)) => nats.url(),
            (None, None) => unreachable!("a nats-server is started when no URL is given"),
        };
        let backend = match self.backend {
            Some(_) => None,
            None => Some(Backend::start().expect("start the demo backend")),
        };
        let backend_addr = match (self.backend, &backend) {
            (Some(addr), _) => addr,
            (None, Some(backend)) => backend.addr(),
            (None, None) => unreachable!("the demo backend runs when no address is given"),
        };

        let haproxy = self
            .haproxy
            .into_iter()
            .fold(HaproxyConfig::new(&dir, backend_addr), |h, f| f(h));
        haproxy.write().expect("write haproxy.cfg");
        let mut config = AgentConfig::new(&dir, &nats_url, &haproxy);
        config.node_id(&self.node_id);
        for f in self.agent {
            f(&dir, &haproxy, &mut config);
        }
        let config_path = config.write().expect("write agent.toml");

        let nc = match self.client {
            Some(nc) => nc,
            None => super::nats_client(&nats_url, self.timeout).await,
        };
        let subject = self
            .events_subject
            .unwrap_or_else(|| format!("ebb.event.{}.>", self.node_id));
        let events = EventTap::subscribe(&nc, &subject)
            .await
            .with_timeout(self.timeout);
        let agent = start_agent(&self.bin, &config_path, &self.env);
        NodeFixture {
            events,
            nc,
            agent,
            config,
            haproxy,
            backend,
            nats,
            test_dir,
            id: self.node_id,
            dir,
            nats_url,
            bin: self.bin,
            env: self.env,
            timeout: self.timeout,
        }
    }
}

fn start_agent(bin: &Path, config: &Path, env: &[(String, String)]) -> Agent {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Agent::start_with_env(bin, config, &env).expect("start the agent")
}

/// A running node and what it needs, all stopped on drop: the agent first, then the servers, the
/// test dir (which reaps every haproxy the agent left) last.
pub struct NodeFixture {
    // Field order is drop order.
    /// Every event of the node (or of [`NodeFixtureBuilder::events_subject`]) since before the
    /// agent started.
    pub events: EventTap,
    pub nc: Client,
    pub agent: Agent,
    pub config: AgentConfig,
    pub haproxy: HaproxyConfig,
    backend: Option<Backend>,
    nats: Option<NatsServer>,
    test_dir: Option<TestDir>,
    id: String,
    dir: PathBuf,
    nats_url: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    timeout: Duration,
}

impl NodeFixture {
    /// Defaults: node id [`NODE_ID`], a fresh [`TestDir`] holding the node's files (nats-server's
    /// in `nats/`), a nats-server of its own, the demo backend, [`HaproxyConfig`]'s and
    /// [`AgentConfig`]'s defaults, a plain NATS client, timeouts [`NODE_TIMEOUT`].
    pub fn builder<'a>() -> NodeFixtureBuilder<'a> {
        NodeFixtureBuilder {
            bin: PathBuf::from(ebb_bin()),
            node_id: NODE_ID.to_owned(),
            timeout: NODE_TIMEOUT,
            nats_url: None,
            dir: None,
            client: None,
            events_subject: None,
            backend: None,
            env: Vec::new(),
            haproxy: Vec::new(),
            agent: Vec::new(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node's dir: haproxy.cfg, agent.toml, logs, state; every haproxy of the node names a
    /// file in it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn config_path(&self) -> PathBuf {
        self.config.path()
    }

    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// The nats-server, when the fixture started it.
    pub fn nats(&mut self) -> Option<&mut NatsServer> {
        self.nats.as_mut()
    }

    /// The demo backend, when the fixture runs it.
    pub fn backend(&self) -> Option<&Backend> {
        self.backend.as_ref()
    }

    /// haproxy's frontend port.
    pub fn port(&self) -> u16 {
        self.haproxy.frontend_port()
    }

    /// The agent's `metrics.listen` port; panics when metrics are off.
    pub fn metrics_port(&self) -> u16 {
        self.config
            .metrics_port()
            .expect("metrics.listen is set to an address")
    }

    /// `http://127.0.0.1:PORT` of the agent's `/metrics` and `/healthz`.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port())
    }

    /// `GET /metrics` on the agent, parsed (see [`super::metrics::Scrape`]).
    pub async fn scrape(&self) -> super::metrics::Scrape {
        super::metrics::scrape(self.metrics_port(), self.timeout).await
    }

    /// The bytes of haproxy.cfg as they are on disk now.
    pub fn config_bytes(&self) -> Vec<u8> {
        std::fs::read(self.haproxy.path()).expect("read haproxy.cfg")
    }

    /// Starts another agent on the same agent.toml and environment (after the previous one died,
    /// was killed or handed over).
    pub fn restart_agent(&mut self) {
        self.agent = start_agent(&self.bin, &self.config.path(), &self.env);
    }

    /// Sends `signal` to the agent and returns once the node has acted on it: the agent logged a
    /// new `signal received` line, then a `status` round trip went through the node's input queue,
    /// which the signal shares with commands (so a launch it decided on has begun). Returns that
    /// status. For signals the agent keeps running after (SIGHUP).
    pub async fn signal_handled(&mut self, signal: Signal) -> Value {
        fn received(agent: &Agent) -> usize {
            agent
                .log_lines()
                .iter()
                .filter(|line| log_message(line).is_some_and(|m| m.contains("signal received")))
                .count()
        }
        let before = received(&self.agent);
        self.agent
            .signal(signal)
            .unwrap_or_else(|e| panic!("send {signal:?} to the agent: {e:#}"));
        let agent = &self.agent;
        wait_until_async(
            self.timeout,
            &format!("the agent's log line for {signal:?}"),
            || async { received(agent) > before },
        )
        .await;
        self.status().await
    }

    /// Moves the admin socket away (to `admin.sock.away` beside it), as a slow tmpfiles cleanup
    /// or an operator might; the guard puts it back ([`HiddenAdminSocket::restore`], or on drop).
    pub fn hide_admin_socket(&self) -> HiddenAdminSocket {
        let socket = self.haproxy.admin_socket();
        let away = socket.with_extension("sock.away");
        std::fs::rename(&socket, &away).unwrap_or_else(|e| {
            panic!(
                "move the admin socket {} to {}: {e}",
                socket.display(),
                away.display()
            )
        });
        HiddenAdminSocket {
            socket,
            away,
            restored: false,
        }
    }

    /// The raw reply to `verb` with `body`; panics when none comes within the timeout.
    pub async fn command(&self, verb: &str, body: Value) -> Value {
        node_command(&self.nc, &self.id, verb, &body, self.timeout).await
    }

    /// `verb` must succeed; returns its result.
    pub async fn ok(&self, verb: &str, body: Value) -> Value {
        let reply = self.command(verb, body.clone()).await;
        assert_eq!(reply["ok"], true, "{verb} {body} failed: {reply}");
        reply["result"].clone()
    }

    /// The result of `status`.
    pub async fn status(&self) -> Value {
        self.ok("status", json!({})).await
    }

    /// Polls `status` until `pred` holds for its result; returns that result. Panics after the
    /// timeout with the last status seen.
    pub async fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_status_for(what, self.timeout, pred).await
    }

    /// Polls `status` until the node is in `state`; returns that status.
    pub async fn wait_state(&self, state: &str) -> Value {
        self.wait_status(&format!("node state {state}"), |s| s["state"] == state)
            .await
    }

    /// Polls `status` until the node serves (a new agent may still be connecting); returns it.
    pub async fn wait_serving(&self) -> Value {
        self.wait_status_for(
            &format!("node {} to serve", self.id),
            self.timeout.max(SERVE_TIMEOUT),
            |s| s["state"] == "serving",
        )
        .await
    }

    async fn wait_status_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let subject = format!("ebb.node.{}.status", self.id);
        let last = std::sync::Mutex::new(None);
        let (nc, subject, pred, last_ref) = (&self.nc, &subject, &pred, &last);
        let found = try_wait_for_async(timeout, move || async move {
            let msg = tokio::time::timeout(
                POLL_REQUEST_TIMEOUT,
                nc.request(subject.clone(), Bytes::from_static(b"{}")),
            )
            .await
            .ok()?
            .ok()?;
            let reply: Value = serde_json::from_slice(&msg.payload).ok()?;
            assert_eq!(reply["ok"], true, "status failed: {reply}");
            let result = reply["result"].clone();
            if pred(&result) {
                return Some(result);
            }
            *last_ref.lock().expect("last status") = Some(result);
            None
        })
        .await;
        found.unwrap_or_else(|| {
            let last = last.lock().expect("last status").take();
            panic!(
                "timed out after {timeout:?} waiting for {what}; last status: {}",
                last.map_or_else(|| "none answered".to_owned(), |s| s.to_string())
            )
        })
    }

    /// Undrains and waits until the node serves again.
    pub async fn undrain(&self) {
        self.ok("undrain", json!({})).await;
        self.wait_status("serving again", |s| s["state"] == "serving")
            .await;
    }

    /// The pid that answers `show info` on the admin socket: the serving worker.
    pub async fn serving_pid(&self) -> Option<u32> {
        let sock = self.haproxy.admin_socket();
        blocking(move || show_info_pid(&sock)).await
    }

    /// `CurrConns` of the serving worker.
    pub async fn curr_conns(&self) -> Option<u64> {
        let sock = self.haproxy.admin_socket();
        blocking(move || show_info(&sock))
            .await
            .ok()?
            .get("CurrConns")?
            .parse()
            .ok()
    }

    /// Waits until the serving worker counts at least `n` client connections.
    pub async fn wait_conns(&self, n: u64) {
        wait_until_async(self.timeout, &format!("CurrConns >= {n}"), || async {
            self.curr_conns().await.is_some_and(|c| c >= n)
        })
        .await;
    }

    /// SIGTERM to the agent: it must stop HAProxy gracefully and exit 0 within the timeout.
    pub fn sigterm_agent(&mut self) {
        self.agent.signal(Signal::TERM).expect("SIGTERM the agent");
        let exit = self.agent.wait_exit(self.timeout);
        assert!(exit.success(), "the agent exits 0 after SIGTERM: {exit}");
    }

    /// Every live haproxy of this node, sorted.
    pub async fn haproxy_pids(&self) -> Vec<u32> {
        let dir = self.dir.clone();
        blocking(move || haproxy_pids_for(&dir)).await
    }

    /// `GET /` through haproxy must answer 200 `ok`.
    pub async fn assert_serves(&self) {
        let response = http_request(self.port(), "/", true, self.timeout)
            .await
            .unwrap_or_else(|e| panic!("GET / through haproxy failed: {e}"));
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "ok\n"),
            "{response:?}"
        );
    }

    /// The status code of `GET /healthz` through haproxy (503 while draining).
    pub async fn healthz(&self) -> u16 {
        self.try_healthz()
            .await
            .unwrap_or_else(|e| panic!("GET /healthz through haproxy failed: {e}"))
    }

    /// [`healthz`](Self::healthz), or why the request failed.
    pub async fn try_healthz(&self) -> Result<u16, ClientError> {
        http_get(self.port(), "/healthz", true)
            .await
            .map(|(status, _)| status)
    }
}

/// The admin socket of a node, moved away by [`NodeFixture::hide_admin_socket`]; put back by
/// [`restore`](Self::restore), or on drop (a failing test leaves no node without its socket).
pub struct HiddenAdminSocket {
    socket: PathBuf,
    away: PathBuf,
    restored: bool,
}

impl HiddenAdminSocket {
    /// Puts the admin socket back where haproxy and the agent expect it.
    pub fn restore(mut self) {
        self.restored = true;
        std::fs::rename(&self.away, &self.socket).unwrap_or_else(|e| {
            panic!(
                "put the admin socket {} back to {}: {e}",
                self.away.display(),
                self.socket.display()
            )
        });
    }
}

impl Drop for HiddenAdminSocket {
    fn drop(&mut self) {
        if !self.restored {
            let _ = std::fs::rename(&self.away, &self.socket);
        }
    }
}

/// Several nodes on one nats-server, with one demo backend behind all their haproxy, in one test
/// dir (each node in `DIR/<id>`); stopped on drop, agents first.
pub struct Fleet {
    // Field order is drop order.
    pub nodes: Vec<NodeFixture>,
    /// A client of the fleet's nats-server, which every node's fixture shares.
    pub nc: Client,
    backend: Backend,
    nats: NatsServer,
    dir: TestDir,
}

impl Fleet {
    /// What every node of a fleet shares: its dir, nats-server, demo backend and a client.
    async fn shared() -> (TestDir, NatsServer, Backend, Client) {
        let dir = TestDir::new();
        let nats = NatsServer::start(&dir.join("nats")).expect("start nats-server");
        let backend = Backend::start().expect("start the demo backend");
        let nc = super::nats_client(&nats.url(), NODE_TIMEOUT).await;
        (dir, nats, backend, nc)
    }

    /// A node's builder with its id, dir, and the fleet's nats-server, client and backend.
    fn member<'a>(
        id: &str,
        dir: &TestDir,
        nats: &NatsServer,
        nc: &Client,
        backend: &Backend,
    ) -> NodeFixtureBuilder<'a> {
        NodeFixture::builder()
            .node_id(id)
            .dir(dir.join(id))
            .nats_url(&nats.url())
            .client(nc.clone())
            .backend(Some(backend.addr()))
    }

    /// Starts the servers and one agent per id, each built by `configure` from a builder that
    /// already has its id, dir, nats-server, client and backend; does not wait for them to serve
    /// ([`Fleet::wait_serving`] does).
    pub async fn start<'a, S: AsRef<str>>(
        ids: &[S],
        mut configure: impl FnMut(&str, NodeFixtureBuilder<'a>) -> NodeFixtureBuilder<'a>,
    ) -> Fleet {
        let (dir, nats, backend, nc) = Fleet::shared().await;
        let mut nodes = Vec::with_capacity(ids.len());
        for id in ids {
            let id = id.as_ref();
            let builder = Fleet::member(id, &dir, &nats, &nc, &backend);
            nodes.push(configure(id, builder).spawn().await);
        }
        Fleet {
            nodes,
            nc,
            backend,
            nats,
            dir,
        }
    }

    /// Like [`Fleet::start`], but returns once every node serves, and never has more than
    /// `max_starting` agents starting at once: each one starts haproxy, connects to NATS and
    /// creates its stream and bucket, and a hundred of those at once on a small machine can push
    /// a start past its timeouts. A slot frees as soon as its node serves, so the fleet starts
    /// about as fast as the machine allows. Nodes keep the order of `ids`.
    pub async fn start_serving<'a, S: AsRef<str>>(
        ids: &[S],
        max_starting: usize,
        mut configure: impl FnMut(&str, NodeFixtureBuilder<'a>) -> NodeFixtureBuilder<'a>,
    ) -> Fleet {
        use futures::StreamExt;
        let (dir, nats, backend, nc) = Fleet::shared().await;
        let builders: Vec<NodeFixtureBuilder<'a>> = ids
            .iter()
            .map(|id| {
                let id = id.as_ref();
                configure(id, Fleet::member(id, &dir, &nats, &nc, &backend))
            })
            .collect();
        // A panic drops the stream, and with it every node started so far: their agents are
        // killed and the dir reaped on the way out, like every other fixture's.
        // Unordered: a slow start must not hold back the next ones.
        let mut nodes: Vec<NodeFixture> = futures::stream::iter(builders)
            .map(|builder| async move {
                let node = builder.spawn().await;
                node.wait_serving().await;
                node
            })
            .buffer_unordered(max_starting.max(1))
            .collect()
            .await;
        nodes.sort_by_key(|n| ids.iter().position(|id| id.as_ref() == n.id()));
        Fleet {
            nodes,
            nc,
            backend,
            nats,
            dir,
        }
    }

    /// Waits until every node serves, all at once.
    pub async fn wait_serving(&self) {
        futures::future::join_all(self.nodes.iter().map(NodeFixture::wait_serving)).await;
    }

    pub fn node(&self, id: &str) -> &NodeFixture {
        self.nodes
            .iter()
            .find(|n| n.id() == id)
            .unwrap_or_else(|| panic!("no node {id} in the fleet"))
    }

    pub fn node_mut(&mut self, id: &str) -> &mut NodeFixture {
        self.nodes
            .iter_mut()
            .find(|n| n.id() == id)
            .unwrap_or_else(|| panic!("no node {id} in the fleet"))
    }

    pub fn nats_url(&self) -> String {
        self.nats.url()
    }

    pub fn nats(&mut self) -> &mut NatsServer {
        &mut self.nats
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
