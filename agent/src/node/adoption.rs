//! What an agent finds when it starts: the state file a previous agent left, the HAProxy
//! processes that pass verification, and who answers the admin socket. The core decides what to
//! make of it ([`NodeCore::new`](super::core::NodeCore::new)); this only gathers.

use std::time::Duration;

use super::core::Boot;
use crate::config::Settings;
use crate::haproxy::admin::AdminSocket;
use crate::haproxy::adopt::{self, Expect};
use crate::haproxy::launch::LaunchSpec;
use crate::haproxy::worker::Worker;
use crate::state_file;

/// How many times the admin socket is asked who answers: every worker that has not been told to
/// stop shares it, so a few answers are needed to see the newest.
const ASKS: usize = 8;
/// How long adoption waits for the admin socket at start before leaving it to the node's
/// background retries.
const FIRST_ASK_TIMEOUT: Duration = Duration::from_millis(500);

pub struct Found {
    pub boot: Boot,
    /// The handles of the verified workers, in `boot.workers` order.
    pub workers: Vec<Worker>,
}

/// Reads the state file and verifies every candidate process. Fails only when the state file
/// must not be touched (written by a newer ebb) or cannot be read.
pub async fn find(
    settings: &Settings,
    spec: &LaunchSpec,
    admin: &AdminSocket,
) -> anyhow::Result<Found> {
    let state = state_file::load(&settings.config.haproxy.state_dir)?;
    let mut boot = Boot::default();
    let mut records = Vec::new();
    let mut recorded_boot_id = None;
    if let Some(s) = state {
        boot = recorded(&s);
        records = s.worker_records();
        recorded_boot_id = Some(s.kernel_boot_id.clone());
    }
    let expect = Expect::new(&spec.binary, &spec.config, &spec.log_dir);
    let found = adopt::candidates(&records, recorded_boot_id.as_deref(), &expect);
    for why in &found.refused {
        tracing::info!("{why}");
    }
    let mut workers = Vec::new();
    for c in found.verified {
        boot.workers.push((c.worker.record(), c.was_current));
        workers.push(c.worker);
    }
    if !workers.is_empty() {
        let asked = tokio::time::timeout(FIRST_ASK_TIMEOUT, answering(admin)).await;
        boot.answering = asked.ok().filter(|pids| !pids.is_empty());
    }
    Ok(Found { boot, workers })
}

/// What the state file says beyond the processes: restarts, the last reload, the drain, and a
/// stop in progress. In master-worker mode it is all a start takes from it: the master says which
/// processes run.
pub fn recorded(s: &state_file::State) -> Boot {
    Boot {
        restarts: s.restarts,
        last_reload: s.last_reload.clone(),
        drain: s.drain.clone(),
        drained_event: s.drained_event.clone(),
        stopping: s.stopping,
        ..Boot::default()
    }
}

/// The pids that answer `show info` on the admin socket, asked a few times; empty when nobody
/// answers.
pub async fn answering(admin: &AdminSocket) -> Vec<u32> {
    let mut pids = Vec::new();
    for _ in 0..ASKS {
        match admin.pid().await {
            Ok(pid) if !pids.contains(&pid) => pids.push(pid),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    pids
}
