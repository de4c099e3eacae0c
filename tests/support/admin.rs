//! HAProxy admin socket and /proc helpers.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// How long one admin socket exchange may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one command line to the admin socket and returns the whole answer.
///
/// A non-interactive CLI connection answers one line and closes, so this reads to EOF.
pub fn admin_command(sock: &Path, command: &str) -> Result<String> {
    let mut stream = UnixStream::connect(sock)
        .with_context(|| format!("connect to admin socket {}", sock.display()))?;
    stream.set_read_timeout(Some(ADMIN_TIMEOUT))?;
    stream.set_write_timeout(Some(ADMIN_TIMEOUT))?;
    stream
        .write_all(format!("{}\n", command.trim_end()).as_bytes())
        .with_context(|| format!("send {command:?} to {}", sock.display()))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("read the answer to {command:?} from {}", sock.display()))?;
    Ok(answer)
}

/// `show info` as a map of its `Name: value` lines.
pub fn show_info(sock: &Path) -> Result<BTreeMap<String, String>> {
    let answer = admin_command(sock, "show info")?;
    let info: BTreeMap<String, String> = answer
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect();
    anyhow::ensure!(
        info.contains_key("Pid"),
        "`show info` on {} has no Pid: {answer:?}",
        sock.display()
    );
    Ok(info)
}

/// The `Pid:` of the worker that answers on the admin socket, or `None` if none answers.
pub fn show_info_pid(sock: &Path) -> Option<u32> {
    show_info(sock).ok()?.get("Pid")?.parse().ok()
}

/// Live (non-zombie) haproxy processes whose command line mentions `dir` or a path inside it.
pub fn haproxy_pids_for(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = super::process::pids_mentioning(dir)
        .into_iter()
        .filter(|&pid| {
            // A zombie has no exe link, so it is left out here as well as by is_alive.
            fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
                exe.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("haproxy"))
            }) && super::process::is_alive(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGKILLs every live haproxy whose command line mentions `dir` (a crash, or cleanup); returns
/// their pids.
pub fn kill_haproxy_for(dir: &Path) -> Vec<u32> {
    let pids = haproxy_pids_for(dir);
    for &pid in &pids {
        // Gone since the scan is fine too.
        let _ = rustix::process::kill_process(super::process::pid(pid), super::Signal::KILL);
    }
    pids
}
