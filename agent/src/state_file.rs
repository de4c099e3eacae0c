//! The agent's state file in `state_dir`: what a restarted agent needs to adopt HAProxy instead of
//! starting a second one. It is only a hint: every record is verified against /proc and the admin
//! socket before it is trusted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::record::WorkerRecord;

pub const FILE_NAME: &str = "state.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The kernel boot the pids below belong to.
    pub kernel_boot_id: String,
    pub node: String,
    pub current: Option<WorkerRecord>,
    pub old: Vec<WorkerRecord>,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub last_reload: Option<ebb_sdk::status::LastReload>,
    /// The drain in progress (or drained), resumed with its original id and start time.
    #[serde(default)]
    pub drain: Option<crate::drain::Record>,
    /// The `drained` event of that drain, sent again after a restart in case it never left.
    #[serde(default)]
    pub drained_event: Option<ebb_sdk::event::Event>,
}

impl State {
    pub fn new(node: &str, kernel_boot_id: String) -> Self {
        State {
            version: VERSION,
            kernel_boot_id,
            node: node.to_string(),
            ..State::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}; check that state_dir is writable by the agent")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is unreadable ({source}); it is ignored and HAProxy is found through /proc and the admin socket")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Reads the state file; `Ok(None)` when there is none.
pub fn load(state_dir: &Path) -> Result<Option<State>, StateError> {
    let path = path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StateError::Corrupt { path, source })
}

/// Writes the state file atomically (temp file, fsync, rename), so a crash never leaves half a file.
pub fn save(state_dir: &Path, state: &State) -> Result<(), StateError> {
    use std::io::Write;
    let path = path(state_dir);
    let io = |source| StateError::Io {
        path: path.clone(),
        source,
    };
    let tmp = state_dir.join(format!(".{FILE_NAME}.tmp"));
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| io(std::io::Error::other(e)))?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ProcessId;

    #[test]
    fn round_trips_and_tolerates_absence_and_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()).expect("no file is fine"), None);
        let mut s = State::new("web-1", "boot".into());
        s.current = Some(WorkerRecord {
            id: ProcessId {
                pid: 7,
                start_time: 99,
            },
            started_at_ms: 1,
            log: "/x.log".into(),
            config_sha256: "ab".into(),
        });
        save(dir.path(), &s).expect("save");
        assert_eq!(load(dir.path()).expect("load"), Some(s));
        std::fs::write(path(dir.path()), b"{not json").expect("write");
        assert!(matches!(load(dir.path()), Err(StateError::Corrupt { .. })));
    }
}
