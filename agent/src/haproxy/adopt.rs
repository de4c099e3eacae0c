//! Adopting the HAProxy a previous agent left running, so that an agent restart never starts a
//! second HAProxy nor loses track of a draining old worker.
//!
//! Trust nothing on its own: the state file may be stale, pids may be recycled, and an agent may
//! have died between spawning a worker and recording it. Candidates are the recorded workers plus
//! every haproxy process running this node's config; each is verified against /proc (pid + start
//! time + binary), and the current worker is the one the admin socket names.

use std::path::Path;
use std::time::Duration;

use super::admin::AdminSocket;
use super::procfs;
use super::worker::{Worker, WorkerRecord};
use crate::state_file::State;

#[derive(Debug, Default)]
pub struct Adopted {
    pub current: Option<Worker>,
    pub old: Vec<Worker>,
    /// Why records were not trusted, for the log.
    pub refused: Vec<String>,
}

/// How many times the admin socket is asked who answers: every worker that has not been told to
/// stop shares it, so a few answers are needed to see the newest.
const ASKS: usize = 8;

pub async fn adopt(state: Option<&State>, config: &Path, admin: &AdminSocket) -> Adopted {
    let mut out = Adopted::default();
    let mut records: Vec<(WorkerRecord, bool)> = Vec::new();
    if let Some(state) = state {
        if state.kernel_boot_id == procfs::kernel_boot_id() {
            records.extend(state.current.iter().map(|r| (r.clone(), true)));
            records.extend(state.old.iter().map(|r| (r.clone(), false)));
        } else {
            out.refused.push(
                "the state file is from another boot of the kernel; its pids mean nothing now"
                    .into(),
            );
        }
    }
    // Workers nobody recorded (an agent that died mid-reload) are found by their command line.
    for id in procfs::find_haproxy(config) {
        if !records.iter().any(|(r, _)| r.id == id) {
            records.push((
                WorkerRecord {
                    id,
                    started_at_ms: now_ms(),
                    log: procfs::stderr_path(id.pid).unwrap_or_default(),
                    config_sha256: String::new(),
                },
                false,
            ));
        }
    }

    let mut verified: Vec<(Worker, bool)> = Vec::new();
    for (record, was_current) in records {
        match Worker::adopt(&record) {
            Ok(w) => verified.push((w, was_current)),
            Err(e) => out
                .refused
                .push(format!("not adopting pid {}: {e}", record.id.pid)),
        }
    }
    if verified.is_empty() {
        return out;
    }

    let mut answering: Vec<u32> = Vec::new();
    for _ in 0..ASKS {
        if let Ok(pid) = admin.pid().await {
            if !answering.contains(&pid) {
                answering.push(pid);
            }
        } else {
            break;
        }
    }
    let answers = |w: &Worker| answering.contains(&w.pid());
    let current_idx = verified
        .iter()
        .position(|(w, was_current)| *was_current && answers(w))
        .or_else(|| {
            verified
                .iter()
                .enumerate()
                .filter(|(_, (w, _))| answers(w))
                .max_by_key(|(_, (w, _))| w.id.start_time)
                .map(|(i, _)| i)
        });
    if let Some(i) = current_idx {
        out.current = Some(verified.remove(i).0);
    }
    out.old = verified.into_iter().map(|(w, _)| w).collect();
    out
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}
