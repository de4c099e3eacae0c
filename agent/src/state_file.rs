//! The agent's state file in `state_dir`: what a restarted agent needs to adopt HAProxy instead of
//! starting a second one. It is only a hint: every record is verified against /proc and the admin
//! socket before it is trusted.
//!
//! Durability: a save replaces the file atomically and survives a power cut (temp file, fsync,
//! rename, fsync of the directory). Compatibility: a file from a newer format is never read as
//! this one nor overwritten; a file that cannot be parsed is set aside for the operator, and the
//! agent carries on as if there were none (HAProxy is then found through /proc and left running).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::record::WorkerRecord;

pub const FILE_NAME: &str = "state.json";
/// The format this agent writes and the newest it reads. Raise it when a change would make an
/// older agent misread the file, so that a downgrade stops instead of acting on a misread file.
pub const VERSION: u32 = 1;

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
    /// HAProxy was being stopped: the next agent finishes the stop instead of serving again.
    #[serde(default)]
    pub stopping: bool,
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

    /// The recorded workers, each with whether it was the current one: the form adoption takes.
    pub fn worker_records(&self) -> Vec<(WorkerRecord, bool)> {
        self.current
            .iter()
            .map(|r| (r.clone(), true))
            .chain(self.old.iter().map(|r| (r.clone(), false)))
            .collect()
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
    #[error(
        "state file {path} was written by a newer ebb (format version {found}; this agent reads \
         up to {supported}), so it is neither read nor overwritten; run the newer ebb, or, to \
         downgrade on purpose, move {path} away and start again (running HAProxy is then found \
         through /proc)"
    )]
    Newer {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "state file {path} is unreadable ({reason}); it was moved to {moved_to} and the agent \
         starts without it: running HAProxy is found through /proc and left running; keep \
         {moved_to} to report the problem, or delete it"
    )]
    Corrupt {
        path: PathBuf,
        moved_to: PathBuf,
        reason: String,
    },
    #[error(
        "state file {path} is unreadable ({reason}) and could not be moved aside to {moved_to} \
         ({source}); move or delete {path} yourself, and check that state_dir is writable by \
         the agent"
    )]
    CorruptStuck {
        path: PathBuf,
        moved_to: PathBuf,
        reason: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// What [`load_checked`] found.
#[derive(Debug)]
pub struct Loaded {
    /// `None` when there is no usable state file.
    pub state: Option<State>,
    /// A corrupt state file that was moved aside ([`StateError::Corrupt`]): worth an error in the
    /// log, but the agent starts as if there had been no file.
    pub set_aside: Option<StateError>,
}

/// Reads the state file; `Ok(None)` when there is none, or when it was corrupt: such a file is
/// moved aside and the error logged here. An `Err` means the agent must not go on: the file is
/// from a newer ebb, or it cannot be read or moved at all.
pub fn load(state_dir: &Path) -> Result<Option<State>, StateError> {
    let loaded = load_checked(state_dir)?;
    if let Some(e) = &loaded.set_aside {
        tracing::error!("{e}");
    }
    Ok(loaded.state)
}

/// [`load`], handing back the corrupt-file error instead of logging it.
pub fn load_checked(state_dir: &Path) -> Result<Loaded, StateError> {
    let path = path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded {
                state: None,
                set_aside: None,
            })
        }
        Err(source) => return Err(StateError::Io { path, source }),
    };
    match parse(&bytes) {
        Ok(state) => Ok(Loaded {
            state: Some(state),
            set_aside: None,
        }),
        Err(Unusable::Newer(found)) => Err(StateError::Newer {
            path,
            found,
            supported: VERSION,
        }),
        Err(Unusable::Corrupt(reason)) => {
            let moved_to = corrupt_path(&path, unix_ms());
            match std::fs::rename(&path, &moved_to) {
                Ok(()) => Ok(Loaded {
                    state: None,
                    set_aside: Some(StateError::Corrupt {
                        path,
                        moved_to,
                        reason,
                    }),
                }),
                Err(source) => Err(StateError::CorruptStuck {
                    path,
                    moved_to,
                    reason,
                    source,
                }),
            }
        }
    }
}

/// Only the version, read before the rest: a newer format may not parse as this one at all, and
/// must then be reported as newer, not set aside as corrupt.
#[derive(Deserialize)]
struct Header {
    version: u32,
}

enum Unusable {
    Newer(u32),
    Corrupt(String),
}

fn parse(bytes: &[u8]) -> Result<State, Unusable> {
    let header: Header =
        serde_json::from_slice(bytes).map_err(|e| Unusable::Corrupt(e.to_string()))?;
    if header.version > VERSION {
        return Err(Unusable::Newer(header.version));
    }
    if header.version == 0 {
        return Err(Unusable::Corrupt("format version 0 does not exist".into()));
    }
    serde_json::from_slice(bytes).map_err(|e| Unusable::Corrupt(e.to_string()))
}

fn corrupt_path(path: &Path, unix_ms: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{unix_ms}"));
    PathBuf::from(name)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Writes the state file so that a crash or power cut leaves either the old file or the new one,
/// whole: temp file, fsync, rename, then fsync of the directory (which makes the rename durable).
/// Refuses to replace a file written by a newer ebb.
pub fn save(state_dir: &Path, state: &State) -> Result<(), StateError> {
    use std::io::Write;
    let path = path(state_dir);
    // Checked on every save, not only at load: whatever the caller did with a `Newer` error from
    // `load`, that file must survive until the operator decides.
    if let Ok(bytes) = std::fs::read(&path) {
        if let Ok(Header { version }) = serde_json::from_slice::<Header>(&bytes) {
            if version > VERSION {
                return Err(StateError::Newer {
                    path,
                    found: version,
                    supported: VERSION,
                });
            }
        }
    }
    let io = |source| StateError::Io {
        path: path.clone(),
        source,
    };
    let tmp = state_dir.join(format!(".{FILE_NAME}.tmp"));
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| io(std::io::Error::other(e)))?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(state_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ProcessId;

    fn sample() -> State {
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
        s.old = vec![WorkerRecord {
            id: ProcessId {
                pid: 5,
                start_time: 50,
            },
            started_at_ms: 0,
            log: "/y.log".into(),
            config_sha256: "cd".into(),
        }];
        s
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn round_trips_and_an_absent_file_is_no_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()).expect("no file is fine"), None);
        let s = sample();
        save(dir.path(), &s).expect("save");
        assert_eq!(load(dir.path()).expect("load"), Some(s.clone()));
        // Saved again over itself, and no temp file is left behind.
        save(dir.path(), &s).expect("save again");
        assert_eq!(leftovers(dir.path()), vec![FILE_NAME.to_string()]);
        assert_eq!(
            s.worker_records()
                .iter()
                .map(|(r, current)| (r.id.pid, *current))
                .collect::<Vec<_>>(),
            vec![(7, true), (5, false)]
        );
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_loading_goes_on_without_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = path(dir.path());
        std::fs::write(&file, b"{not json").expect("write");
        let loaded = load_checked(dir.path()).expect("a corrupt file is not fatal");
        assert_eq!(loaded.state, None);
        let Some(StateError::Corrupt { moved_to, .. }) = &loaded.set_aside else {
            panic!("expected Corrupt, got {:?}", loaded.set_aside);
        };
        assert!(!file.exists(), "the corrupt file is no longer in the way");
        assert_eq!(std::fs::read(moved_to).expect("kept"), b"{not json");
        let name = moved_to.file_name().expect("name").to_string_lossy();
        assert!(name.starts_with("state.json.corrupt-"), "{name}");
        let message = loaded.set_aside.as_ref().expect("error").to_string();
        assert!(
            message.contains(&file.display().to_string())
                && message.contains(&moved_to.display().to_string()),
            "{message}"
        );
        // The next load finds no file, and a save starts afresh.
        assert_eq!(load(dir.path()).expect("load"), None);
        save(dir.path(), &sample()).expect("save");
        assert_eq!(load(dir.path()).expect("load"), Some(sample()));
    }

    #[test]
    fn a_file_that_parses_as_json_but_not_as_state_is_corrupt_too() {
        for text in [
            r#"{"version": 1}"#,
            r#"{"kernel_boot_id": "b"}"#,
            r#"{"version": 0, "kernel_boot_id": "b", "node": "n", "current": null, "old": []}"#,
            "",
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(path(dir.path()), text).expect("write");
            let loaded = load_checked(dir.path()).expect("not fatal");
            assert!(
                loaded.state.is_none()
                    && matches!(loaded.set_aside, Some(StateError::Corrupt { .. })),
                "{text}: {loaded:?}"
            );
        }
    }

    #[test]
    fn a_newer_format_is_an_error_and_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = path(dir.path());
        // A future format may not even look like this one: it must not be taken for corrupt.
        let newer = format!(r#"{{"version": {}, "workers": "elsewhere"}}"#, VERSION + 1);
        std::fs::write(&file, &newer).expect("write");
        let err = load(dir.path()).expect_err("newer is fatal");
        assert!(
            matches!(err, StateError::Newer { found, supported, .. } if found == VERSION + 1 && supported == VERSION),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&file.display().to_string()) && message.contains("newer ebb"),
            "{message}"
        );
        assert!(matches!(
            save(dir.path(), &sample()),
            Err(StateError::Newer { .. })
        ));
        assert_eq!(std::fs::read_to_string(&file).expect("still there"), newer);
        assert_eq!(leftovers(dir.path()), vec![FILE_NAME.to_string()]);
    }

    #[test]
    fn an_unwritable_state_dir_is_an_io_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("absent");
        let err = save(&missing, &sample()).expect_err("no such dir");
        assert!(matches!(err, StateError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("state.json"), "{err}");
    }

    mod garbage {
        //! Whatever is in the state file (a torn write on a filesystem without ordering, a file
        //! edited by hand, another program's JSON), reading it answers, and never panics.

        use proptest::prelude::*;

        use super::*;

        /// A state file as this agent writes it, with a current and an old worker.
        fn written() -> Vec<u8> {
            let mut s = sample();
            s.restarts = 3;
            s.stopping = true;
            serde_json::to_vec_pretty(&s).expect("serialize")
        }

        #[derive(Debug, Clone)]
        enum Edit {
            Truncate(usize),
            Flip(usize, u8),
            Insert(usize, Vec<u8>),
            Remove(usize, usize),
        }

        fn edit() -> impl Strategy<Value = Edit> {
            let snippet = prop_oneof![
                Just(b"{".to_vec()),
                Just(b"}".to_vec()),
                Just(b"\"version\": 4294967296,".to_vec()),
                Just(b"null".to_vec()),
                Just(b"-1".to_vec()),
                Just(b"\"\\u0000\"".to_vec()),
                Just(b"[[[[[[[[".to_vec()),
                prop::collection::vec(any::<u8>(), 0..8),
            ];
            prop_oneof![
                any::<usize>().prop_map(Edit::Truncate),
                (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
                (any::<usize>(), snippet).prop_map(|(i, s)| Edit::Insert(i, s)),
                (any::<usize>(), 0..16usize).prop_map(|(i, n)| Edit::Remove(i, n)),
            ]
        }

        fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
            for e in edits {
                let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
                match e {
                    Edit::Truncate(i) => bytes.truncate(at(*i, bytes.len())),
                    Edit::Flip(i, b) if !bytes.is_empty() => {
                        let i = i % bytes.len();
                        bytes[i] ^= b;
                    }
                    Edit::Flip(..) => {}
                    Edit::Insert(i, s) => {
                        let i = at(*i, bytes.len());
                        bytes.splice(i..i, s.iter().copied());
                    }
                    Edit::Remove(i, n) => {
                        let i = at(*i, bytes.len());
                        let end = (i + n).min(bytes.len());
                        bytes.drain(i..end);
                    }
                }
            }
            bytes
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            #[test]
            fn a_damaged_state_file_never_panics(edits in prop::collection::vec(edit(), 0..6)) {
                let bytes = apply(written(), &edits);
                if let Ok(state) = parse(&bytes) {
                    prop_assert!(state.version >= 1 && state.version <= VERSION);
                    let _ = state.worker_records();
                }
            }

            #[test]
            fn any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                let _ = parse(&bytes);
            }
        }
    }
}
