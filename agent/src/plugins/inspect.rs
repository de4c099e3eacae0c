//! `ebb plugin inspect PATH`: what a plugin file is, or why the agent would not load it. It runs the same
//! checks as the agent (owner, mode, ABI version), loads the library and reads its table, but makes no
//! instance.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use serde::Serialize;

use super::{file, library};

/// What `inspect` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    pub sha256: String,
    pub owner_uid: u32,
    /// Octal permission bits, e.g. `0644`.
    pub mode: String,
    pub abi_version: u32,
    pub name: String,
    pub version: String,
    pub capabilities: Vec<String>,
}

/// How long a library's initializers and entry function may take.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks and loads `path` (on a separate thread, so a hanging library cannot hang the command).
pub fn inspect(path: &Path) -> Result<Inspection, String> {
    let checked = file::open_checked(path, None, true)?;
    let (tx, rx) = mpsc::channel();
    let path = checked.path.clone();
    let sha256 = checked.sha256.clone().unwrap_or_default();
    let (owner_uid, mode) = (checked.uid, checked.mode);
    std::thread::Builder::new()
        .name("ebb-plugin-inspect".into())
        .spawn(move || {
            let _ = tx.send(library::load(checked));
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    let table = match rx.recv_timeout(LOAD_TIMEOUT) {
        Ok(r) => r?,
        Err(_) => {
            return Err(
                "loading it did not finish within 10s (its initializers or entry hang)".into(),
            )
        }
    };
    let mut capabilities = Vec::new();
    if table.capabilities & ebb_sdk::plugin::CAP_CHECK_IDLE != 0 {
        capabilities.push("check_idle".to_string());
    }
    if table.capabilities & ebb_sdk::plugin::CAP_EVENTS != 0 {
        capabilities.push("events".to_string());
    }
    let unknown = table.capabilities & !ebb_sdk::plugin::CAP_ALL;
    if unknown != 0 {
        capabilities.push(format!("unknown:{unknown:#x}"));
    }
    Ok(Inspection {
        path,
        sha256,
        owner_uid,
        mode: format!("{mode:04o}"),
        abi_version: table.abi_version,
        name: table.name,
        version: table.version,
        capabilities,
    })
}

/// Runs the command: prints the inspection (a table, or JSON), or why the file cannot be loaded on
/// stderr. Returns the exit code: 0 loadable, 1 not.
pub fn run(path: &Path, json: bool) -> u8 {
    match inspect(path) {
        Ok(i) => {
            let mut out = std::io::stdout().lock();
            let _ = if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&i).unwrap_or_default()
                )
            } else {
                writeln!(
                    out,
                    "path:         {}\nsha256:       {}\nowner:        uid {}, mode {}\nabi_version:  {}\nname:         {}\nversion:      {}\ncapabilities: {}",
                    i.path.display(),
                    i.sha256,
                    i.owner_uid,
                    i.mode,
                    i.abi_version,
                    i.name,
                    i.version,
                    if i.capabilities.is_empty() { "none".to_string() } else { i.capabilities.join(", ") },
                )
            };
            0
        }
        Err(e) => {
            eprintln!("ebb plugin inspect: cannot load {}: {e}", path.display());
            1
        }
    }
}
