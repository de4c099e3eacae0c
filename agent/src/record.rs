//! What ebb knows of a HAProxy worker process, apart from any handle on it: its identity and the
//! record kept in the state file. Plain data shared by the node core, the state file and the
//! HAProxy supervision code, so none of them has to import another for it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The identity of one process. A pid alone is not one (pids are recycled): ebb identifies a
/// worker by its pid and its start time (field 22 of /proc/<pid>/stat, in clock ticks since boot),
/// under one kernel boot id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

/// What the state file keeps of a worker, enough to find and verify it after an agent restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    #[serde(flatten)]
    pub id: ProcessId,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Where the worker's stdout and stderr go. Only a file ebb created itself (under
    /// `state_dir/logs`) is ever deleted.
    pub log: PathBuf,
    pub config_sha256: String,
}
