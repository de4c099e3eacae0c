//! The plugin host (docs/PLUGINS.md): loads the `[[plugins]]` libraries at start, asks them whether the node is
//! idle while it drains, and delivers the drain hooks.
//!
//! - **Before any plugin code runs**, the file must be owned by root or the agent's user, must not be
//!   group- or world-writable (nor its directory, unless sticky), and must match its `sha256` pin. The
//!   library is loaded through the descriptor that was checked. Then the ABI version is checked.
//! - **Every call runs on the plugin's own thread** (one per plugin), never on the async runtime, and the
//!   caller waits at most the plugin's `timeout`. A hung plugin holds only its own thread.
//! - **Errors, timeouts and panics** (the SDK turns a panic into an error answer) count per `on_error`:
//!   `busy` (the default) fails closed and shows the reason as the plugin's blocker; `idle` ignores the
//!   plugin and logs. A plugin that times out [`DISABLE_AFTER`] times in a row is disabled: it is not called
//!   again, it answers per `on_error`, and a [`PluginDisabled`] notice goes out once.
//! - **Libraries are never unloaded**, so every pointer into them stays valid for the life of the process.
//!
//! A plugin that fails to load is kept as a failed entry by [`PluginHost::load_fail_closed`]: it shows as
//! unhealthy in the status, and (with `on_error = "busy"`) blocks drains with the reason, so that a broken
//! ALB plugin cannot let a node look drained while its load balancer still sends traffic.

mod file;
pub mod inspect;
pub mod library;
mod worker;

use std::ffi::CString;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use ebb_sdk::plugin::{CheckContext, HookEvent, Verdict};
use ebb_sdk::plugin::{CAP_CHECK_IDLE, CAP_EVENTS};
use ebb_sdk::status::PluginStatus;
use tokio::sync::{mpsc, oneshot};

use crate::config::{OnError, PluginConfig};
pub use file::{open_checked, CheckedFile};
use worker::Job;

/// Timeouts in a row after which a plugin is disabled.
pub const DISABLE_AFTER: u32 = 3;

/// The shortest time a plugin gets to load and create its instance (its `timeout` when longer).
pub const MIN_LOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest message kept from a plugin's answer.
const MAX_MESSAGE: usize = 512;

/// Plugins that could not be loaded: one problem per plugin, each naming it, its path and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PluginError {
    pub problems: Vec<LoadProblem>,
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Why one plugin was not loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProblem {
    pub name: String,
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plugin {} ({}): {}",
            self.name,
            self.path.display(),
            self.message
        )
    }
}

/// A plugin was disabled after hanging again and again. Sent once per plugin; [`fmt::Display`] is the
/// message to log and publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginDisabled {
    pub name: String,
    pub path: PathBuf,
    /// Why, e.g. "no answer within 2s, 3 times in a row".
    pub reason: String,
    /// What its idle check counts as from now on: true = busy (`on_error = "busy"`).
    pub blocks_drains: bool,
}

impl fmt::Display for PluginDisabled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plugin {} ({}) disabled: {}; it is not called again until the agent restarts, and its idle \
             check now counts as {} (on_error = \"{}\"); fix or remove the plugin, then restart the agent",
            self.name,
            self.path.display(),
            self.reason,
            if self.blocks_drains { "busy" } else { "idle" },
            if self.blocks_drains { "busy" } else { "idle" },
        )
    }
}

/// How one idle check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    Idle,
    Busy,
    /// No verdict: an error, a timeout, or a plugin not loaded, disabled or shut down.
    Failed,
}

/// Told of every idle check as it ends (the metrics), so that the host needs to know nothing of
/// who watches. Called on the runtime: it must not block.
pub trait CheckObserver: Send + Sync {
    fn check_done(&self, plugin: &str, took: Duration, outcome: CheckOutcome);
}

/// The loaded plugins. Cheap to clone (shared); every method takes `&self`.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<Inner>,
}

struct Inner {
    plugins: Vec<Entry>,
    disabled_rx: Mutex<Option<mpsc::UnboundedReceiver<PluginDisabled>>>,
    observer: OnceLock<Arc<dyn CheckObserver>>,
}

struct Entry {
    name: String,
    path: PathBuf,
    timeout: Duration,
    on_error: OnError,
    state: State,
}

enum State {
    Failed(String),
    Loaded(Loaded),
}

struct Loaded {
    version: String,
    capabilities: u32,
    jobs: SyncSender<Job>,
    health: Health,
    disabled_tx: mpsc::UnboundedSender<PluginDisabled>,
}

#[derive(Default)]
struct Health {
    timeouts_in_a_row: AtomicU32,
    /// The last call answered (idle or busy, not an error).
    healthy: AtomicBool,
    disabled: OnceLock<String>,
    shut_down: AtomicBool,
}

/// Why a call did not give a verdict.
enum Failure {
    Error(String),
    Timeout,
}

impl PluginHost {
    /// A host without plugins.
    pub fn empty() -> PluginHost {
        PluginHost::build(Vec::new(), None)
    }

    /// Loads every plugin, or fails with one line per plugin that cannot be loaded (the ones that loaded
    /// are let go). For `ebb config check`-like strictness; the agent uses [`PluginHost::load_fail_closed`].
    pub fn load(configs: &[PluginConfig]) -> Result<PluginHost, PluginError> {
        let (host, problems) = PluginHost::load_fail_closed(configs);
        if problems.is_empty() {
            Ok(host)
        } else {
            Err(PluginError { problems })
        }
    }

    /// Loads every plugin it can. One that cannot be loaded stays in the host as failed: unhealthy in
    /// [`status`](Self::status), and answering idle checks per its `on_error` with the reason (so by
    /// default it blocks drains rather than letting them finish without it). Returns the problems too, one
    /// per failed plugin, for the log.
    pub fn load_fail_closed(configs: &[PluginConfig]) -> (PluginHost, Vec<LoadProblem>) {
        let (disabled_tx, disabled_rx) = mpsc::unbounded_channel();
        let mut plugins = Vec::new();
        let mut problems = Vec::new();
        for (i, cfg) in configs.iter().enumerate() {
            let state = if configs[..i].iter().any(|c| c.name == cfg.name) {
                State::Failed(format!(
                    "another plugin is named {:?}; give each [[plugins]] entry its own name",
                    cfg.name
                ))
            } else {
                match load_one(cfg) {
                    Ok((jobs, table)) => State::Loaded(Loaded {
                        version: table.version,
                        capabilities: table.capabilities,
                        jobs,
                        health: Health {
                            healthy: AtomicBool::new(true),
                            ..Health::default()
                        },
                        disabled_tx: disabled_tx.clone(),
                    }),
                    Err(message) => State::Failed(message),
                }
            };
            if let State::Failed(message) = &state {
                problems.push(LoadProblem {
                    name: cfg.name.clone(),
                    path: cfg.path.clone(),
                    message: message.clone(),
                });
            }
            plugins.push(Entry {
                name: cfg.name.clone(),
                path: cfg.path.clone(),
                timeout: cfg.timeout.0,
                on_error: cfg.on_error,
                state,
            });
        }
        (PluginHost::build(plugins, Some(disabled_rx)), problems)
    }

    fn build(
        plugins: Vec<Entry>,
        disabled_rx: Option<mpsc::UnboundedReceiver<PluginDisabled>>,
    ) -> PluginHost {
        PluginHost {
            inner: Arc::new(Inner {
                plugins,
                disabled_rx: Mutex::new(disabled_rx),
                observer: OnceLock::new(),
            }),
        }
    }

    /// True when no plugin is configured.
    pub fn is_empty(&self) -> bool {
        self.inner.plugins.is_empty()
    }

    /// The plugins whose idle check a drain waits for, in config order (a plugin that failed to
    /// load is one: it fails closed).
    pub fn idle_checkers(&self) -> Vec<String> {
        self.inner
            .plugins
            .iter()
            .filter(|p| p.checks_idle())
            .map(|p| p.name.clone())
            .collect()
    }

    /// Tells `observer` of every idle check from now on. One observer per host: false (and
    /// `observer` left out) when one was set already.
    pub fn observe_checks(&self, observer: Arc<dyn CheckObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// The notices of plugins being disabled. Returns the receiver once; `None` afterwards.
    pub fn take_disabled(&self) -> Option<mpsc::UnboundedReceiver<PluginDisabled>> {
        self.inner.disabled_rx.lock().ok()?.take()
    }

    /// Every configured plugin: its version (empty when it failed to load) and whether it is healthy
    /// (loaded, not disabled, and its last call answered).
    pub fn status(&self) -> Vec<PluginStatus> {
        self.inner
            .plugins
            .iter()
            .map(|p| match &p.state {
                State::Failed(_) => PluginStatus {
                    name: p.name.clone(),
                    version: String::new(),
                    healthy: false,
                },
                State::Loaded(l) => PluginStatus {
                    name: p.name.clone(),
                    version: l.version.clone(),
                    healthy: l.health.disabled.get().is_none()
                        && !l.health.shut_down.load(Ordering::Relaxed)
                        && l.health.healthy.load(Ordering::Relaxed),
                },
            })
            .collect()
    }

    /// Asks every idle-checking plugin, concurrently, each within its own timeout: the verdict of each, by
    /// config name, in config order. Failures are already mapped per `on_error` (busy with the reason, or
    /// idle). Never waits longer than the longest plugin timeout; never blocks the runtime.
    ///
    /// `ctx.timeout_ms` is set per plugin. Plugins without the `check_idle` capability are left out.
    pub async fn check_idle(&self, ctx: &CheckContext) -> Vec<(String, Verdict)> {
        let observer = self.inner.observer.get();
        let checks = self
            .inner
            .plugins
            .iter()
            .filter(|p| p.checks_idle())
            .map(|p| async move {
                let started = Instant::now();
                let (verdict, outcome) = p.check(ctx).await;
                if let Some(observer) = observer {
                    observer.check_done(&p.name, started.elapsed(), outcome);
                }
                (p.name.clone(), verdict)
            });
        futures::future::join_all(checks).await
    }

    /// Delivers a hook event to every plugin that wants events, without waiting: each plugin gets it on its
    /// own thread, in order with its other calls. Failures are logged.
    pub fn hook(&self, event: &HookEvent) {
        let json = Arc::new(event_json(event));
        for p in &self.inner.plugins {
            if let Some(l) = p.callable(CAP_EVENTS) {
                let job = Job::Event {
                    name: event.name(),
                    json: json.clone(),
                    reply: None,
                };
                if let Err(e) = l.jobs.try_send(job) {
                    tracing::warn!(
                        plugin = %p.name,
                        "plugin {}: {} hook not delivered: {}",
                        p.name,
                        event.name(),
                        queue_error(&e)
                    );
                }
            }
        }
    }

    /// Delivers a hook event and waits for every plugin to handle it, each within its timeout (e.g. for
    /// `stopping`, before HAProxy is stopped). Returns each plugin's outcome; a timeout counts toward
    /// disabling the plugin like an idle check's.
    pub async fn hook_wait(&self, event: &HookEvent) -> Vec<(String, Result<(), String>)> {
        let json = Arc::new(event_json(event));
        let calls = self.inner.plugins.iter().filter_map(|p| {
            let l = p.callable(CAP_EVENTS)?;
            let json = json.clone();
            Some(async move {
                let (tx, rx) = oneshot::channel();
                let job = Job::Event {
                    name: event.name(),
                    json,
                    reply: Some(tx),
                };
                let result = match p.call(l, job, rx).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("its {} hook failed: {e}", event.name())),
                    Err(Failure::Error(e)) => Err(e),
                    Err(Failure::Timeout) => Err(format!(
                        "its {} hook did not return within {}",
                        event.name(),
                        humantime::format_duration(p.timeout)
                    )),
                };
                (p.name.clone(), result)
            })
        });
        futures::future::join_all(calls).await
    }

    /// Destroys every instance (each on its thread, each within its timeout); afterwards plugins are not
    /// called again. For a clean exit; a plugin stuck in a call is left alone.
    pub async fn shutdown(&self) {
        let waits = self.inner.plugins.iter().filter_map(|p| {
            let State::Loaded(l) = &p.state else {
                return None;
            };
            if l.health.shut_down.swap(true, Ordering::Relaxed) {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            l.jobs.try_send(Job::Shutdown { reply: tx }).ok()?;
            Some(async move {
                if tokio::time::timeout(p.timeout, rx).await.is_err() {
                    tracing::warn!(plugin = %p.name, "plugin {}: not destroyed within its timeout", p.name);
                }
            })
        });
        futures::future::join_all(waits).await;
    }
}

impl Entry {
    fn checks_idle(&self) -> bool {
        match &self.state {
            State::Failed(_) => true,
            State::Loaded(l) => l.capabilities & CAP_CHECK_IDLE != 0,
        }
    }

    /// The loaded plugin, if it has the capability and may be called.
    fn callable(&self, capability: u32) -> Option<&Loaded> {
        match &self.state {
            State::Loaded(l)
                if l.capabilities & capability != 0
                    && l.health.disabled.get().is_none()
                    && !l.health.shut_down.load(Ordering::Relaxed) =>
            {
                Some(l)
            }
            _ => None,
        }
    }

    async fn check(&self, ctx: &CheckContext) -> (Verdict, CheckOutcome) {
        let failed = |verdict| (verdict, CheckOutcome::Failed);
        let l = match &self.state {
            State::Failed(reason) => return failed(self.failed(format!("not loaded: {reason}"))),
            State::Loaded(l) => l,
        };
        if let Some(reason) = l.health.disabled.get() {
            return failed(self.failed(format!("disabled: {reason}")));
        }
        if l.health.shut_down.load(Ordering::Relaxed) {
            return failed(self.failed("shut down".into()));
        }
        let mut ctx = ctx.clone();
        ctx.timeout_ms = self.timeout.as_millis() as u64;
        let ctx = match serde_json::to_string(&ctx).map(CString::new) {
            Ok(Ok(c)) => c,
            _ => return failed(self.failed("cannot encode the check context".into())),
        };
        let (tx, rx) = oneshot::channel();
        match self.call(l, Job::Check { ctx, reply: tx }, rx).await {
            Ok(Ok(verdict)) => {
                if !l.health.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(plugin = %self.name, "plugin {} answers again", self.name);
                }
                match verdict {
                    Verdict::Busy(m) if m.trim().is_empty() => {
                        (Verdict::Busy("busy".into()), CheckOutcome::Busy)
                    }
                    Verdict::Busy(m) => (Verdict::Busy(clip(m)), CheckOutcome::Busy),
                    Verdict::Idle => (Verdict::Idle, CheckOutcome::Idle),
                }
            }
            Ok(Err(e)) => failed(self.unhealthy(l, format!("error: {}", clip(e)))),
            Err(Failure::Error(e)) => failed(self.unhealthy(l, e)),
            Err(Failure::Timeout) => failed(self.unhealthy(
                l,
                format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                ),
            )),
        }
    }

    /// Sends a job and waits for its answer within the timeout, counting timeouts in a row.
    async fn call<T>(&self, l: &Loaded, job: Job, rx: oneshot::Receiver<T>) -> Result<T, Failure> {
        if let Err(e) = l.jobs.try_send(job) {
            if matches!(e, TrySendError::Full(_)) {
                // Still stuck in an earlier call, with a queue behind it: as good as a timeout.
                self.timed_out(l);
                return Err(Failure::Timeout);
            }
            return Err(Failure::Error(queue_error(&e)));
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(answer)) => {
                l.health.timeouts_in_a_row.store(0, Ordering::Relaxed);
                Ok(answer)
            }
            Ok(Err(_)) => Err(Failure::Error("its thread is gone".into())),
            Err(_) => {
                self.timed_out(l);
                Err(Failure::Timeout)
            }
        }
    }

    fn timed_out(&self, l: &Loaded) {
        let n = l.health.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= DISABLE_AFTER {
            let reason = format!(
                "no answer within {}, {n} times in a row",
                humantime::format_duration(self.timeout)
            );
            if l.health.disabled.set(reason.clone()).is_ok() {
                let notice = PluginDisabled {
                    name: self.name.clone(),
                    path: self.path.clone(),
                    reason,
                    blocks_drains: self.on_error == OnError::Busy,
                };
                tracing::error!(plugin = %self.name, "{notice}");
                let _ = l.disabled_tx.send(notice);
            }
        }
    }

    fn unhealthy(&self, l: &Loaded, message: String) -> Verdict {
        if l.health.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(plugin = %self.name, "plugin {}: {message}", self.name);
        }
        self.per_on_error(message)
    }

    fn failed(&self, message: String) -> Verdict {
        self.per_on_error(message)
    }

    fn per_on_error(&self, message: String) -> Verdict {
        match self.on_error {
            OnError::Busy => Verdict::Busy(message),
            OnError::Idle => Verdict::Idle,
        }
    }
}

fn load_one(cfg: &PluginConfig) -> Result<(SyncSender<Job>, library::Table), String> {
    let checked = file::open_checked(&cfg.path, cfg.sha256.as_deref(), false)?;
    let config_json =
        serde_json::to_string(&cfg.config).map_err(|e| format!("cannot encode its config: {e}"))?;
    let (jobs, table) = worker::start(
        &cfg.name,
        checked,
        config_json,
        cfg.timeout.0.max(MIN_LOAD_TIMEOUT),
        cfg.timeout.0,
    )?;
    tracing::info!(
        plugin = %cfg.name,
        "plugin {} loaded: {} {} (ABI {}, {})",
        cfg.name,
        table.name,
        table.version,
        table.abi_version,
        ebb_sdk::plugin::capability_names(table.capabilities)
    );
    Ok((jobs, table))
}

fn event_json(event: &HookEvent) -> CString {
    // JSON escapes NUL, so this cannot fail.
    CString::new(event.to_json()).unwrap_or_default()
}

fn queue_error<T>(e: &TrySendError<T>) -> String {
    match e {
        TrySendError::Full(_) => "it is still busy with earlier calls".into(),
        TrySendError::Disconnected(_) => "its thread is gone".into(),
    }
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}
