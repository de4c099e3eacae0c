//! Facts about processes read from /proc: identity (pid + start time), liveness, and the TCP
//! connections a worker holds.
//!
//! A pid alone is not an identity: pids are recycled. ebb identifies a worker by its pid and its
//! start time (field 22 of /proc/<pid>/stat, in clock ticks since boot) under one kernel boot id.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

pub use crate::record::ProcessId;

/// What /proc says about a pid right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub start_time: u64,
    /// The one-letter state of /proc/<pid>/stat (R, S, D, Z, …).
    pub state: char,
    /// The file name of /proc/<pid>/exe, without a " (deleted)" suffix.
    pub exe_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("process {0} does not exist")]
    Gone(u32),
    #[error("process {pid} was started at tick {observed}, not {recorded}: the pid was recycled")]
    Recycled {
        pid: u32,
        recorded: u64,
        observed: u64,
    },
    #[error("process {0} has exited (zombie)")]
    Zombie(u32),
    #[error("process {pid} runs {exe:?}, not haproxy")]
    NotHaproxy { pid: u32, exe: String },
}

/// The pure part of verifying a recorded process: does what /proc shows match the record?
pub fn check(record: ProcessId, observed: Option<&Observed>) -> Result<(), Mismatch> {
    let Some(o) = observed else {
        return Err(Mismatch::Gone(record.pid));
    };
    if o.start_time != record.start_time {
        return Err(Mismatch::Recycled {
            pid: record.pid,
            recorded: record.start_time,
            observed: o.start_time,
        });
    }
    if o.state == 'Z' || o.state == 'X' {
        return Err(Mismatch::Zombie(record.pid));
    }
    match &o.exe_name {
        // Without permission to read the link, the start time match stands on its own.
        None => Ok(()),
        Some(exe) if exe.starts_with("haproxy") => Ok(()),
        Some(exe) => Err(Mismatch::NotHaproxy {
            pid: record.pid,
            exe: exe.clone(),
        }),
    }
}

fn proc_path(pid: u32, file: &str) -> PathBuf {
    Path::new("/proc").join(pid.to_string()).join(file)
}

/// Reads /proc/<pid>/stat; `None` when the process does not exist.
pub fn observe(pid: u32) -> Option<Observed> {
    let stat = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    let (state, start_time) = parse_stat(&stat)?;
    let exe_name = std::fs::read_link(proc_path(pid, "exe")).ok().map(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.trim_end_matches(" (deleted)").to_string()
    });
    Some(Observed {
        start_time,
        state,
        exe_name,
    })
}

/// Returns (state, start time) from the text of /proc/<pid>/stat.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 is the state; field 22 is the start time.
    let start_time = fields.get(22 - 3)?.parse().ok()?;
    Some((state, start_time))
}

pub fn start_time(pid: u32) -> io::Result<u64> {
    observe(pid)
        .map(|o| o.start_time)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("process {pid} is gone")))
}

/// True while the recorded process exists and has not exited (a zombie has exited).
pub fn is_alive(id: ProcessId) -> bool {
    observe(id.pid).is_some_and(|o| o.start_time == id.start_time && !matches!(o.state, 'Z' | 'X'))
}

/// Identifies this boot of the kernel, so that a state file from before a reboot is not trusted.
pub fn kernel_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Live haproxy processes started with `-f <config>`: the workers of this node, recorded or not.
pub fn find_haproxy(config: &Path) -> Vec<ProcessId> {
    let want = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(cmdline) = std::fs::read(proc_path(pid, "cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2).any(|w| {
                w[0] == b"-f" && {
                    let p = Path::new(std::str::from_utf8(w[1]).unwrap_or_default());
                    p == want || std::fs::canonicalize(p).is_ok_and(|c| c == want)
                }
            })
        })
        .filter_map(|pid| {
            let o = observe(pid)?;
            let haproxy = o
                .exe_name
                .as_deref()
                .is_none_or(|n| n.starts_with("haproxy"));
            (haproxy && !matches!(o.state, 'Z' | 'X')).then_some(ProcessId {
                pid,
                start_time: o.start_time,
            })
        })
        .collect()
}

/// Where a process's stderr goes, if it is a file.
pub fn stderr_path(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(proc_path(pid, "fd/2"))
        .ok()
        .filter(|p| p.is_absolute())
}

const TCP_LISTEN: u8 = 0x0A;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpEntry {
    local_port: u16,
    state: u8,
    inode: u64,
}

fn parse_tcp_table(text: &str) -> Vec<TcpEntry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let inode = f.get(9)?.parse().ok()?;
            Some(TcpEntry {
                local_port: port,
                state,
                inode,
            })
        })
        .collect()
}

fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(proc_path(pid, "fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|link| {
            let s = link.to_str()?;
            s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The TCP tables of `pid`'s network namespace; `None` when they cannot be read (it exited).
fn tcp_tables(pid: u32) -> Option<Vec<TcpEntry>> {
    let v4 = std::fs::read_to_string(proc_path(pid, "net/tcp")).ok()?;
    let v6 = std::fs::read_to_string(proc_path(pid, "net/tcp6")).unwrap_or_default();
    Some(
        parse_tcp_table(&v4)
            .into_iter()
            .chain(parse_tcp_table(&v6))
            .collect(),
    )
}

/// The TCP ports worker `pid` listens on.
pub fn listening_ports(pid: u32) -> HashSet<u16> {
    let inodes = socket_inodes(pid);
    tcp_tables(pid)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.state == TCP_LISTEN && inodes.contains(&e.inode))
        .map(|e| e.local_port)
        .collect()
}

/// Open client connections of worker `pid`: its non-listening TCP sockets whose local port is one
/// of `client_ports` (the ports HAProxy listens on). With no known ports, every non-listening TCP
/// socket counts, server-side ones included, which overcounts rather than hides a connection.
pub fn client_connections(pid: u32, client_ports: &HashSet<u16>) -> u64 {
    client_connections_of(&[pid], client_ports)
        .get(&pid)
        .copied()
        .unwrap_or(0)
}

/// [`client_connections`] of several workers, reading the TCP tables once: they are the network
/// namespace's, shared by every worker, and reading them is what costs (milliseconds on a busy host).
/// A worker that exited counts 0.
pub fn client_connections_of(
    pids: &[u32],
    client_ports: &HashSet<u16>,
) -> std::collections::HashMap<u32, u64> {
    let sockets: Vec<(u32, HashSet<u64>)> =
        pids.iter().map(|&pid| (pid, socket_inodes(pid))).collect();
    // Read through a worker that is still there (and has sockets, so it is not a zombie).
    let entries = sockets
        .iter()
        .filter(|(_, inodes)| !inodes.is_empty())
        .find_map(|&(pid, _)| tcp_tables(pid))
        .unwrap_or_default();
    sockets
        .into_iter()
        .map(|(pid, inodes)| {
            let count = entries
                .iter()
                .filter(|e| e.state != TCP_LISTEN && inodes.contains(&e.inode))
                .filter(|e| client_ports.is_empty() || client_ports.contains(&e.local_port))
                .count();
            (pid, count as u64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_per_process_with_one_read_and_an_exited_process_counts_zero() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_served, _) = listener.accept().unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let (me, gone) = (std::process::id(), gone.id());
        let ports = HashSet::from([port]);
        // The exited process comes first: the tables are read through one that is still there.
        let counts = client_connections_of(&[gone, me], &ports);
        // Only the accepted side has the listening port as its local port.
        assert_eq!(counts.get(&me), Some(&1), "{counts:?}");
        assert_eq!(counts.get(&gone), Some(&0), "{counts:?}");
        assert_eq!(client_connections(me, &ports), 1);
        assert!(listening_ports(me).contains(&port));
    }

    fn obs(start: u64, state: char, exe: Option<&str>) -> Observed {
        Observed {
            start_time: start,
            state,
            exe_name: exe.map(str::to_string),
        }
    }

    const REC: ProcessId = ProcessId {
        pid: 42,
        start_time: 1000,
    };

    #[test]
    fn verification_accepts_only_the_recorded_process() {
        assert_eq!(check(REC, Some(&obs(1000, 'S', Some("haproxy")))), Ok(()));
        assert_eq!(check(REC, None), Err(Mismatch::Gone(42)));
        assert!(matches!(
            check(REC, Some(&obs(1001, 'S', Some("haproxy")))),
            Err(Mismatch::Recycled { .. })
        ));
        assert_eq!(
            check(REC, Some(&obs(1000, 'Z', Some("haproxy")))),
            Err(Mismatch::Zombie(42))
        );
        assert!(matches!(
            check(REC, Some(&obs(1000, 'S', Some("bash")))),
            Err(Mismatch::NotHaproxy { .. })
        ));
        assert_eq!(check(REC, Some(&obs(1000, 'S', None))), Ok(()));
    }

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let stat = "123 (we ird) (x)) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_live_process_is_observed_and_a_recycled_record_refused() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let seen = observe(pid).expect("observed");
        let record = ProcessId {
            pid,
            start_time: seen.start_time,
        };
        // `sleep` is no haproxy: identity matches but the binary check refuses it.
        assert!(matches!(
            check(record, Some(&seen)),
            Err(Mismatch::NotHaproxy { .. })
        ));
        let stale = ProcessId {
            pid,
            start_time: seen.start_time.wrapping_sub(1),
        };
        assert!(matches!(
            check(stale, observe(pid).as_ref()),
            Err(Mismatch::Recycled { .. })
        ));
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert_eq!(
            check(record, observe(pid).as_ref()),
            Err(Mismatch::Gone(pid))
        );
    }

    #[test]
    fn tcp_table_parsing() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6569 1 0 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0 100 0 0 10 0\n";
        assert_eq!(
            parse_tcp_table(t),
            vec![
                TcpEntry {
                    local_port: 8080,
                    state: TCP_LISTEN,
                    inode: 6569
                },
                TcpEntry {
                    local_port: 8080,
                    state: 1,
                    inode: 777
                },
            ]
        );
    }
}
