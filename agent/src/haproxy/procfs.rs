//! Facts about processes read from /proc: identity (pid + start time), liveness, what a process
//! runs and as whom, and the TCP connections a worker holds.
//!
//! A pid alone is not an identity: pids are recycled. ebb identifies a worker by its pid and its
//! start time (field 22 of /proc/<pid>/stat, in clock ticks since boot) under one kernel boot id.
//!
//! The checks (`check`, `check_exe`, `check_uid`, `check_config`) are pure: they judge what
//! `observe` and `inspect` read, so that they can be tested with any observation.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use crate::record::ProcessId;

/// What /proc says about a pid right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub start_time: u64,
    /// The one-letter state of /proc/<pid>/stat (R, S, D, Z, …).
    pub state: char,
}

/// What adoption looks at, read in one go by [`inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// The start time is read last, after everything else: if it still matches, the rest was read
    /// from that same process and not from a later user of the pid.
    pub id: ProcessId,
    pub state: char,
    /// The target of /proc/<pid>/exe as the kernel gives it (absolute, symlinks resolved, with a
    /// " (deleted)" suffix once the file was removed or replaced), or why it could not be read.
    pub exe: Result<PathBuf, io::ErrorKind>,
    /// The real uid, from /proc/<pid>/status.
    pub real_uid: Option<u32>,
    /// The config files named on its command line (`-f FILE`, and the files after `--`), made
    /// absolute against its working directory and canonicalized where they exist.
    pub configs: Vec<PathBuf>,
    /// Its stderr, when that is a regular file that still has a name.
    pub stderr: Option<PathBuf>,
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
    #[error("process {pid} runs {}, not the configured haproxy binary {}", exe.display(), expected.display())]
    WrongBinary {
        pid: u32,
        exe: PathBuf,
        expected: PathBuf,
    },
    #[error(
        "cannot read /proc/{pid}/exe ({reason}), so which binary process {pid} runs is unknown; \
         run the agent as root or as HAProxy's user, without file capabilities on the haproxy \
         binary (they make /proc/<pid>/exe unreadable)"
    )]
    ExeUnreadable { pid: u32, reason: io::ErrorKind },
    #[error("process {pid} runs as uid {}, not as {}", uid.map_or("unknown".to_string(), |u| u.to_string()), uid_list(expected))]
    WrongUser {
        pid: u32,
        uid: Option<u32>,
        expected: Vec<u32>,
    },
    #[error("process {pid} was not started with -f {}", config.display())]
    WrongConfig { pid: u32, config: PathBuf },
}

fn uid_list(uids: &[u32]) -> String {
    match uids {
        [] => "any expected uid (none is known)".to_string(),
        [one] => format!("uid {one}"),
        many => format!(
            "uid {}",
            many.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" or ")
        ),
    }
}

/// The pure part of verifying a recorded process: is what /proc shows the same, live process?
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
    Ok(())
}

/// The kernel's mark on /proc/<pid>/exe for a binary whose file was unlinked, which is what a
/// package upgrade does to the binary of a running HAProxy.
const DELETED: &[u8] = b" (deleted)";

/// Does `exe` (the target of /proc/<pid>/exe) name `binary` (the configured binary,
/// canonicalized)? A binary replaced since the process started still counts: it is the same
/// install, one version older.
pub fn exe_matches(exe: &Path, binary: &Path) -> bool {
    let bytes = exe.as_os_str().as_bytes();
    let live = bytes.strip_suffix(DELETED).unwrap_or(bytes);
    Path::new(OsStr::from_bytes(live)) == binary
}

/// Checks that process `pid` runs the configured binary (`binary`, canonicalized).
pub fn check_exe(
    pid: u32,
    exe: &Result<PathBuf, io::ErrorKind>,
    binary: &Path,
) -> Result<(), Mismatch> {
    match exe {
        Ok(exe) if exe_matches(exe, binary) => Ok(()),
        Ok(exe) => Err(Mismatch::WrongBinary {
            pid,
            exe: exe.clone(),
            expected: binary.to_path_buf(),
        }),
        // Unknown is not a match: a process ebb cannot identify is never taken over.
        Err(reason) => Err(Mismatch::ExeUnreadable {
            pid,
            reason: *reason,
        }),
    }
}

/// Checks that process `pid` runs as one of `expected` (real uids).
pub fn check_uid(pid: u32, uid: Option<u32>, expected: &[u32]) -> Result<(), Mismatch> {
    match uid {
        Some(u) if expected.contains(&u) => Ok(()),
        _ => Err(Mismatch::WrongUser {
            pid,
            uid,
            expected: expected.to_vec(),
        }),
    }
}

/// Checks that process `pid` was started with `config` (canonicalized) among its config files.
pub fn check_config(pid: u32, configs: &[PathBuf], config: &Path) -> Result<(), Mismatch> {
    if configs.iter().any(|c| c == config) {
        Ok(())
    } else {
        Err(Mismatch::WrongConfig {
            pid,
            config: config.to_path_buf(),
        })
    }
}

fn proc_path(pid: u32, file: &str) -> PathBuf {
    Path::new("/proc").join(pid.to_string()).join(file)
}

/// Reads /proc/<pid>/stat; `None` when the process does not exist.
pub fn observe(pid: u32) -> Option<Observed> {
    let stat = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    let (state, start_time) = parse_stat(&stat)?;
    Some(Observed { start_time, state })
}

/// Reads what adoption judges a process by; `None` when it does not exist (or exited while being
/// read).
pub fn inspect(pid: u32) -> Option<Inspected> {
    let exe = std::fs::read_link(proc_path(pid, "exe")).map_err(|e| e.kind());
    let real_uid = std::fs::read_to_string(proc_path(pid, "status"))
        .ok()
        .and_then(|s| parse_real_uid(&s));
    let configs = config_files(pid);
    let stderr = stderr_path(pid);
    // Last, so that a pid recycled during the reads above shows up as a different start time.
    let observed = observe(pid)?;
    Some(Inspected {
        id: ProcessId {
            pid,
            start_time: observed.start_time,
        },
        state: observed.state,
        exe,
        real_uid,
        configs,
        stderr,
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

/// The real uid from the text of /proc/<pid>/status (`Uid: real effective saved fs`).
fn parse_real_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The config files HAProxy reads given these arguments: each `-f FILE`, and every argument after
/// `--`. As written: relative paths are relative to the process's working directory.
pub fn config_args(args: &[&OsStr]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        if *arg == "-f" {
            if let Some(file) = rest.next() {
                out.push(PathBuf::from(file));
            }
        } else if *arg == "--" {
            out.extend(rest.by_ref().map(PathBuf::from));
        }
    }
    out
}

/// The arguments in the text of /proc/<pid>/cmdline: NUL-terminated, and an empty one in the
/// middle is still an argument.
fn cmdline_args(cmdline: &[u8]) -> Vec<&OsStr> {
    cmdline
        .strip_suffix(&[0])
        .unwrap_or(cmdline)
        .split(|b| *b == 0)
        .map(OsStr::from_bytes)
        .collect()
}

/// The config files on process `pid`'s command line, absolute and canonicalized where possible.
pub fn config_files(pid: u32) -> Vec<PathBuf> {
    let Ok(cmdline) = std::fs::read(proc_path(pid, "cmdline")) else {
        return Vec::new();
    };
    let files = config_args(&cmdline_args(&cmdline));
    if files.is_empty() {
        return files;
    }
    let cwd = std::fs::read_link(proc_path(pid, "cwd")).ok();
    files
        .into_iter()
        .filter_map(|f| {
            let f = if f.is_absolute() {
                f
            } else {
                // Without its working directory a relative path means nothing here.
                cwd.as_ref()?.join(f)
            };
            Some(std::fs::canonicalize(&f).unwrap_or(f))
        })
        .collect()
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

/// Every pid in /proc right now.
pub fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// Live processes whose command line names `config` (canonicalized) as a config file: the only
/// ones worth a closer look when searching for workers nobody recorded. Nothing else is checked
/// here; see [`check_exe`], [`check_uid`].
pub fn running_config(config: &Path) -> Vec<u32> {
    pids()
        .into_iter()
        .filter(|&pid| config_files(pid).iter().any(|c| c == config))
        .collect()
}

/// Where a process's stderr goes, if it is a regular file that still has a name: a terminal, a
/// pipe, a socket or /dev/null is no log to read.
pub fn stderr_path(pid: u32) -> Option<PathBuf> {
    let fd = proc_path(pid, "fd/2");
    // metadata() follows the magic link to the open file itself, even if it was deleted.
    if !std::fs::metadata(&fd).is_ok_and(|m| m.is_file()) {
        return None;
    }
    std::fs::read_link(&fd)
        .ok()
        .filter(|p| p.is_absolute() && !p.as_os_str().as_bytes().ends_with(DELETED))
}

const TCP_LISTEN: u8 = 0x0A;
/// The read buffer for a TCP table: a few hundred lines per read call.
const TABLE_READ: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpEntry {
    local_port: u16,
    state: u8,
    inode: u64,
}

/// The entries of a TCP table (`/proc/<pid>/net/tcp` or `tcp6`, header line first) that `keep`
/// wants, read a line at a time: on a busy host the table lists every socket of the namespace,
/// TIME_WAIT included (tens of thousands, megabytes of text), of which a worker's are a few. A
/// line that is not one (not UTF-8, fields missing) is skipped.
fn parse_tcp_table(
    mut table: impl BufRead,
    mut keep: impl FnMut(&TcpEntry) -> bool,
) -> Vec<TcpEntry> {
    let mut kept = Vec::new();
    let mut line = Vec::new();
    let mut header = true;
    loop {
        line.clear();
        match table.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if std::mem::take(&mut header) {
            continue;
        }
        let entry = std::str::from_utf8(&line).ok().and_then(parse_tcp_line);
        if let Some(entry) = entry.filter(|e| keep(e)) {
            kept.push(entry);
        }
    }
    kept
}

fn parse_tcp_line(line: &str) -> Option<TcpEntry> {
    let mut f = line.split_whitespace();
    let local = f.nth(1)?;
    let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
    let state = u8::from_str_radix(f.nth(1)?, 16).ok()?;
    let inode = f.nth(5)?.parse().ok()?;
    Some(TcpEntry {
        local_port: port,
        state,
        inode,
    })
}

fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(proc_path(pid, "fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|link| socket_inode(link.to_str()?))
        .collect()
}

/// The inode of an fd link such as `socket:[12345]`; `None` for anything else.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The entries of the TCP tables of `pid`'s network namespace that `keep` wants; `None` when they
/// cannot be read (it exited).
fn tcp_tables(pid: u32, mut keep: impl FnMut(&TcpEntry) -> bool) -> Option<Vec<TcpEntry>> {
    let read = |table: &str| {
        std::fs::File::open(proc_path(pid, table)).map(|f| BufReader::with_capacity(TABLE_READ, f))
    };
    let mut entries = parse_tcp_table(read("net/tcp").ok()?, &mut keep);
    if let Ok(v6) = read("net/tcp6") {
        entries.extend(parse_tcp_table(v6, &mut keep));
    }
    Some(entries)
}

/// The TCP ports worker `pid` listens on.
pub fn listening_ports(pid: u32) -> HashSet<u16> {
    let inodes = socket_inodes(pid);
    tcp_tables(pid, |e| e.state == TCP_LISTEN && inodes.contains(&e.inode))
        .unwrap_or_default()
        .into_iter()
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
    let wanted = |e: &TcpEntry| {
        e.state != TCP_LISTEN
            && (client_ports.is_empty() || client_ports.contains(&e.local_port))
            && sockets.iter().any(|(_, inodes)| inodes.contains(&e.inode))
    };
    // Read through a worker that is still there (and has sockets, so it is not a zombie).
    let entries = sockets
        .iter()
        .filter(|(_, inodes)| !inodes.is_empty())
        .find_map(|&(pid, _)| tcp_tables(pid, wanted))
        .unwrap_or_default();
    sockets
        .into_iter()
        .map(|(pid, inodes)| {
            let count = entries.iter().filter(|e| inodes.contains(&e.inode)).count();
            (pid, count as u64)
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
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

    fn obs(start: u64, state: char) -> Observed {
        Observed {
            start_time: start,
            state,
        }
    }

    const REC: ProcessId = ProcessId {
        pid: 42,
        start_time: 1000,
    };

    #[test]
    fn verification_accepts_only_the_recorded_process() {
        assert_eq!(check(REC, Some(&obs(1000, 'S'))), Ok(()));
        assert_eq!(check(REC, None), Err(Mismatch::Gone(42)));
        assert!(matches!(
            check(REC, Some(&obs(1001, 'S'))),
            Err(Mismatch::Recycled { .. })
        ));
        assert_eq!(check(REC, Some(&obs(1000, 'Z'))), Err(Mismatch::Zombie(42)));
    }

    #[test]
    fn the_exe_must_be_the_configured_binary_even_after_an_upgrade_replaced_it() {
        let bin = Path::new("/usr/sbin/haproxy");
        let exe = |p: &str| Ok(PathBuf::from(p));
        assert_eq!(check_exe(1, &exe("/usr/sbin/haproxy"), bin), Ok(()));
        // The package manager replaced the file under the running process.
        assert_eq!(
            check_exe(1, &exe("/usr/sbin/haproxy (deleted)"), bin),
            Ok(())
        );
        // Another binary with the same name is another binary.
        for other in [
            "/tmp/haproxy",
            "/usr/sbin/haproxy2",
            "/usr/sbin/haproxy (deleted) (deleted)",
            "/usr/bin/bash",
        ] {
            let err = check_exe(1, &exe(other), bin).expect_err(other);
            assert!(
                matches!(err, Mismatch::WrongBinary { .. }),
                "{other}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.contains(other) && message.contains("/usr/sbin/haproxy"),
                "{message}"
            );
        }
        // Unknown is never taken for a match; the message says how to make it known.
        let err = check_exe(1, &Err(io::ErrorKind::PermissionDenied), bin).expect_err("unknown");
        assert!(matches!(err, Mismatch::ExeUnreadable { .. }), "{err:?}");
        assert!(err.to_string().contains("/proc/1/exe"), "{err}");
    }

    #[test]
    fn the_uid_must_be_an_expected_one() {
        assert_eq!(check_uid(1, Some(0), &[0, 99]), Ok(()));
        assert_eq!(check_uid(1, Some(99), &[0, 99]), Ok(()));
        let err = check_uid(1, Some(1000), &[0, 99]).expect_err("other user");
        assert_eq!(
            err.to_string(),
            "process 1 runs as uid 1000, not as uid 0 or 99"
        );
        assert!(check_uid(1, None, &[0]).is_err());
        assert!(check_uid(1, Some(0), &[]).is_err());
    }

    #[test]
    fn the_config_must_be_among_the_command_line_config_files() {
        let cfg = Path::new("/etc/haproxy/haproxy.cfg");
        let files = vec![PathBuf::from("/etc/haproxy/a.cfg"), cfg.to_path_buf()];
        assert_eq!(check_config(1, &files, cfg), Ok(()));
        assert!(matches!(
            check_config(1, &files[..1], cfg),
            Err(Mismatch::WrongConfig { .. })
        ));
        assert!(check_config(1, &[], cfg).is_err());
    }

    #[test]
    fn config_files_are_read_from_dash_f_and_after_double_dash() {
        let args = |a: &[&'static str]| -> Vec<PathBuf> {
            let a: Vec<&OsStr> = a.iter().map(OsStr::new).collect();
            config_args(&a)
        };
        assert_eq!(
            args(&["haproxy", "-db", "-f", "/a.cfg", "-x", "/s", "-f", "b.cfg"]),
            vec![PathBuf::from("/a.cfg"), PathBuf::from("b.cfg")]
        );
        assert_eq!(
            args(&["haproxy", "-db", "--", "/a.cfg", "-f"]),
            vec![PathBuf::from("/a.cfg"), PathBuf::from("-f")]
        );
        // The program name is not an argument, and a trailing -f names nothing.
        assert_eq!(args(&["-f", "x", "y"]), Vec::<PathBuf>::new());
        assert_eq!(args(&["haproxy", "-f"]), Vec::<PathBuf>::new());
        assert_eq!(args(&[]), Vec::<PathBuf>::new());
    }

    #[test]
    fn status_gives_the_real_uid() {
        let status = "Name:\thaproxy\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t99\t0\t0\t0\nGid:\t99\t99\t99\t99\n";
        assert_eq!(parse_real_uid(status), Some(99));
        assert_eq!(parse_real_uid("Name:\tx\n"), None);
    }

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let stat = "123 (we ird) (x)) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_inspected_as_it_is() {
        let me = std::process::id();
        let seen = inspect(me).expect("this process exists");
        assert_eq!(Some(seen.id.start_time), observe(me).map(|o| o.start_time));
        // The kernel's own path for this binary, less the mark a concurrent rebuild of the test
        // binary would add.
        let exe = std::env::current_exe().expect("current_exe");
        let exe = exe.as_os_str().as_bytes();
        let exe = Path::new(OsStr::from_bytes(exe.strip_suffix(DELETED).unwrap_or(exe)));
        assert_eq!(check_exe(me, &seen.exe, exe), Ok(()));
        let uid = rustix::process::getuid().as_raw();
        assert_eq!(seen.real_uid, Some(uid));
        assert_eq!(check_uid(me, seen.real_uid, &[uid]), Ok(()));
    }

    /// Waits until a process just spawned shows its arguments: the kernel lets the parent go on
    /// during the exec, a moment before /proc/<pid>/cmdline has anything to show.
    pub(crate) fn wait_for_argv(pid: u32) {
        for _ in 0..1000 {
            if std::fs::read(proc_path(pid, "cmdline")).is_ok_and(|c| !c.is_empty()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("process {pid} shows no command line");
    }

    #[test]
    fn a_live_process_is_observed_and_a_recycled_record_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, "global\n").expect("write cfg");
        let cfg = std::fs::canonicalize(&cfg).expect("canonical cfg");
        // A relative -f, resolved against the process's own working directory. The shell waits
        // on its stdin (a builtin), so killing it leaves nothing behind.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x", "sh", "-f", "haproxy.cfg"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("err.log")).expect("log"))
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        wait_for_argv(pid);
        let seen = inspect(pid).expect("inspected");
        let record = seen.id;
        assert_eq!(check(record, observe(pid).as_ref()), Ok(()));
        assert_eq!(seen.configs, vec![cfg.clone()]);
        assert_eq!(check_config(pid, &seen.configs, &cfg), Ok(()));
        assert!(running_config(&cfg).contains(&pid));
        assert_eq!(
            seen.stderr.as_deref(),
            std::fs::canonicalize(dir.path().join("err.log"))
                .ok()
                .as_deref()
        );
        let sh = std::fs::canonicalize("/bin/sh").expect("canonical sh");
        assert_eq!(check_exe(pid, &seen.exe, &sh), Ok(()));
        let stale = ProcessId {
            pid,
            start_time: seen.id.start_time.wrapping_sub(1),
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
        assert_eq!(inspect(pid), None);
        assert!(!running_config(&cfg).contains(&pid));
    }

    #[test]
    fn tcp_table_parsing() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6569 1 0 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0 100 0 0 10 0\n";
        assert_eq!(
            parse_tcp_table(t.as_bytes(), |_| true),
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

    mod garbage {
        //! Whatever /proc holds (a process that changes under the read, a kernel with other
        //! fields, a command line of any bytes), the parsers answer, and never panic.

        use proptest::prelude::*;

        use super::super::*;

        /// Tokens that look like /proc's, and some that break its rules.
        fn token() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(String::new()),
                Just("(".to_string()),
                Just(")".to_string()),
                Just(") S".to_string()),
                Just("Uid:".to_string()),
                Just("socket:[".to_string()),
                Just("]".to_string()),
                Just("0A".to_string()),
                Just(":".to_string()),
                Just("0100007F:1F90".to_string()),
                Just("18446744073709551616".to_string()),
                Just("-1".to_string()),
                Just("é".to_string()),
                Just("\n".to_string()),
                Just("\t".to_string()),
                Just(" ".to_string()),
                any::<u32>().prop_map(|n| format!("{n:X}")),
                any::<char>().prop_map(String::from),
            ]
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::collection::vec(token(), 0..24).prop_map(|t| t.concat()),
                prop::collection::vec(any::<u8>(), 0..256)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            #[test]
            fn stat_status_net_tcp_and_fd_links_never_panic(text in text()) {
                let _ = parse_stat(&text);
                let _ = parse_real_uid(&text);
                let _ = socket_inode(&text);
                prop_assert!(parse_tcp_table(text.as_bytes(), |_| true).len() <= text.lines().count());
            }

            #[test]
            fn a_cmdline_of_any_bytes_never_panics(
                bytes in prop::collection::vec(any::<u8>(), 0..256)
            ) {
                // Mostly NULs, dashes and `f`s: command lines with many (empty) `-f` arguments.
                let bytes: Vec<u8> = bytes
                    .into_iter()
                    .map(|b| match b % 8 {
                        0..=2 => 0,
                        3 => b'-',
                        4 => b'f',
                        _ => b,
                    })
                    .collect();
                let args = cmdline_args(&bytes);
                let files = config_args(&args);
                prop_assert!(files.len() <= args.len());
            }
        }
    }
}
