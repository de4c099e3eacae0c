//! The end-to-end test harness: real `nats-server`, real `haproxy`, the demo backend, the `ebb`
//! agent, and real TCP clients.
//!
//! Every test file does `mod support;` and uses what it needs. The rules it helps keep:
//! - hermetic and parallel-safe: free ports ([`free_port`]) and a temp dir per test ([`TestDir`]);
//! - no process outlives its test, even on a panic: every process sits behind a guard that kills it
//!   on drop ([`ChildGuard`]), and [`TestDir`] also kills every process whose command line names a
//!   file inside it (haproxy workers started by an agent that was `kill -9`ed, for example);
//! - waits are conditions polled with a timeout ([`wait_until`], [`wait_for`]) or notifications
//!   ([`EventTap`]), never bare sleeps.
//!
//! A test that needs a running node builds a [`NodeFixture`] (nats-server, backend, haproxy.cfg,
//! agent.toml, the agent, a NATS client and an [`EventTap`] on its events), or a [`Fleet`] of them
//! on one nats-server; the modules below are its parts, for tests that need something else.
//!
//! Binaries come from the environment when set: `EBB_TEST_NATS_SERVER` (else `nats-server`) and
//! `EBB_TEST_HAPROXY` (else `/usr/sbin/haproxy`, else `haproxy`).

// Each test binary uses a different part of the harness.
#![allow(dead_code, unused_imports)]

pub mod admin;
pub mod agent;
pub mod backend;
pub mod ctl;
pub mod events;
pub mod haproxy;
pub mod http;
pub mod master;
pub mod metrics;
pub mod nats;
pub mod node;
pub mod notify;
pub mod plugin;
pub mod process;

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use admin::{admin_command, haproxy_pids_for, kill_haproxy_for, show_info, show_info_pid};
pub use agent::{log_message, toml_string, Agent, AgentConfig};
pub use backend::Backend;
pub use ctl::{run_ctl, run_ebb, ControlClient, CtlRun};
pub use events::{Event, EventTap, EVENT_TIMEOUT};
pub use haproxy::{check_config, haproxy_bin, Haproxy, HaproxyConfig, READY_TIMEOUT};
pub use http::{
    full_200, http_get, http_request, partial_request, spawn_get, ClientError, FailureKind,
    KeepAliveClient, LoadGen, LoadGenBuilder, LoadMode, LoadReport, PartialRequest, Pending,
    Response, REQUEST_TIMEOUT,
};
pub use nats::{
    client as nats_client, monitor_get, node_command, stream_messages,
    write_config as write_nats_config, NatsCluster, NatsServer,
};
pub use node::{
    ebb_bin, Fleet, HiddenAdminSocket, NodeFixture, NodeFixtureBuilder, NODE_ID, NODE_TIMEOUT,
};
pub use notify::{Notification, NotifySocket};
pub use plugin::{cdylib, plugin_toml};
pub use process::{
    cmdline_mentions, is_alive, kill_processes_mentioning, pids_mentioning, proc_status_kib,
    rss_kib, ChildGuard, HaproxyReaper,
};
pub use rustix::process::Signal;

/// Runs blocking test code (a std socket, a wait on a process) off the async test's threads.
pub async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A pid from a JSON reply or event; panics on anything else.
pub fn as_pid(v: &serde_json::Value) -> u32 {
    v.as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("not a pid: {v}"))
}

/// A port on 127.0.0.1 that was free a moment ago (a bind succeeded), for servers to listen on.
///
/// Ports come from below the kernel's ephemeral range, so the many outgoing connections of
/// parallel tests (load generators churn through thousands) never take a port between this call
/// and the server's bind. Within one test binary no port is handed out twice; a random start keeps
/// concurrent test binaries apart. Falls back to a kernel-chosen port if that range is too small.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .min(u32::from(u16::MAX));
    if ephemeral_low > FIRST + 1_000 {
        let span = ephemeral_low - FIRST;
        // Seed once with something that differs between concurrent test processes.
        let seed = std::process::id().wrapping_mul(7_919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        let _ = NEXT.compare_exchange(u32::MAX, seed % span, Ordering::Relaxed, Ordering::Relaxed);
        for _ in 0..span {
            let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
            let port = u16::try_from(FIRST + offset).expect("below the ephemeral range");
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A test's own temp dir (`$TMPDIR/ebb-test-XXXXXX`). On drop it first SIGKILLs every process
/// whose command line mentions a path inside it (see [`HaproxyReaper`]), then removes it.
///
/// Set `EBB_TEST_KEEP_DIR=1` to keep the dir of a failed (panicking) test for inspection.
pub struct TestDir {
    // Field order is drop order: reap the processes before the directory goes.
    reaper: HaproxyReaper,
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("ebb-test-")
            .tempdir()
            .expect("create a temp dir");
        TestDir {
            reaper: HaproxyReaper::new(dir.path()),
            dir: Some(dir),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("dir present until drop").path()
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path().join(name)
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        self.reaper.reap();
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() {
                if std::env::var_os("EBB_TEST_KEEP_DIR").is_some_and(|v| v == "1") {
                    eprintln!("test dir kept: {}", dir.keep().display());
                } else {
                    eprintln!(
                        "test dir {} removed (set EBB_TEST_KEEP_DIR=1 to keep it)",
                        dir.path().display()
                    );
                }
            }
        }
    }
}

/// First poll interval of the wait helpers; it doubles up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(20);

/// Polls `cond` (1 ms, doubling up to 20 ms) until it holds; panics after `timeout`, naming `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()))
}

/// Polls `f` until it returns `Some`, and returns that value; panics after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    match try_wait_for(timeout, &mut f) {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Like [`wait_for`], but returns `None` on timeout instead of panicking.
pub fn try_wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_POLL;
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// Async [`wait_until`]: polls the future-returning `cond` without blocking the runtime.
pub async fn wait_until_async<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_async(timeout, what, || {
        let fut = cond();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Async [`wait_for`].
pub async fn wait_for_async<T, F, Fut>(timeout: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match try_wait_for_async(timeout, f).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Async [`try_wait_for`]: `None` on timeout instead of panicking.
pub async fn try_wait_for_async<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = FIRST_POLL;
    loop {
        // An attempt that hangs must not outlive the deadline either.
        if let Ok(Some(value)) = tokio::time::timeout_at(deadline, f()).await {
            return Some(value);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// The last `n` lines of a text file, for failure messages ("" when unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The `warnings` of a `status` result (absent when there are none).
pub fn warnings(status: &serde_json::Value) -> Vec<String> {
    status["warnings"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
