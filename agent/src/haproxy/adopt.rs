//! Adopting the HAProxy a previous agent left running, so that an agent restart never starts a
//! second HAProxy nor loses track of a draining old worker.
//!
//! Trust nothing on its own: the state file may be stale, pids may be recycled, an agent may have
//! died between spawning a worker and recording it, and another HAProxy (or anything renamed
//! `haproxy`) may run with the same config. Candidates are the recorded workers plus the processes
//! found running this node's config; [`candidates`] verifies each against /proc. Which of them is
//! current is the node core's decision (the newest that answers the admin socket), never made here.
//!
//! - A recorded worker is adopted if its pid, start time and executable match.
//! - A process nobody recorded is adopted only if it runs the configured binary, as the expected
//!   user, with `-f <this config>`.
//!
//! A process that fails is left exactly as it is: never signalled, its files never touched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::procfs::{self, Inspected, Mismatch, Observed, ProcessId};
use super::worker::{AdoptError, Worker, WorkerRecord};

/// What a process must be for ebb to take it over.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// The configured haproxy binary.
    pub binary: &'a Path,
    /// This node's haproxy config.
    pub config: &'a Path,
    /// The real uids a worker of this node may run as (see [`expected_uids`]).
    pub uids: Vec<u32>,
    /// Where ebb keeps worker logs. A recorded log elsewhere is not trusted: the worker's actual
    /// stderr is used instead.
    pub log_dir: &'a Path,
}

impl<'a> Expect<'a> {
    /// With the uids of [`expected_uids`].
    pub fn new(binary: &'a Path, config: &'a Path, log_dir: &'a Path) -> Self {
        Expect {
            binary,
            config,
            uids: expected_uids(config),
            log_dir,
        }
    }
}

/// A process that passed verification, held by a pidfd opened before the checks.
#[derive(Debug)]
pub struct Candidate {
    /// For a process found by scanning, `log` is its stderr file (or empty): for reading only,
    /// since it may not be ebb's file (see `worker::remove_own_log`).
    pub worker: Worker,
    /// It was the current worker according to the state file.
    pub was_current: bool,
    /// It came from the state file (else it was found by scanning /proc).
    pub recorded: bool,
}

#[derive(Debug, Default)]
pub struct Candidates {
    pub verified: Vec<Candidate>,
    /// Why records and processes were not trusted, one line each, for the log.
    pub refused: Vec<String>,
}

/// Finds and verifies the workers to adopt: `records` (from the state file, each with whether it
/// was current) if the state file's `recorded_boot_id` is this boot's, plus the processes running
/// `expect.config` that nobody recorded. Reads /proc and opens pidfds; never signals anything.
pub fn candidates(
    records: &[(WorkerRecord, bool)],
    recorded_boot_id: Option<&str>,
    expect: &Expect<'_>,
) -> Candidates {
    let want = Want::of(expect);
    let mut out = Candidates::default();
    let trusted = match boot_refusal(recorded_boot_id, &procfs::kernel_boot_id(), records.len()) {
        None => records,
        Some(why) => {
            out.refused.push(why);
            &[]
        }
    };
    // Processes already judged as records: the scan does not judge them twice.
    let mut judged: Vec<u32> = Vec::new();

    for (record, was_current) in trusted {
        let pid = record.id.pid;
        let adopted = Worker::adopt(record).map_err(Refusal::from).and_then(|w| {
            let seen = procfs::inspect(pid);
            verify(record.id, seen.as_ref(), &want, true)?;
            Ok((w, seen))
        });
        match adopted {
            Ok((mut worker, seen)) => {
                worker.log = recorded_log(
                    &record.log,
                    seen.and_then(|s| s.stderr).as_deref(),
                    &want.log_dir,
                );
                judged.push(pid);
                out.verified.push(Candidate {
                    worker,
                    was_current: *was_current,
                    recorded: true,
                });
            }
            Err(refusal) => {
                if refusal.same_process() {
                    judged.push(pid);
                }
                out.refused.push(format!(
                    "not adopting pid {pid} from the state file: {}",
                    refusal.explain(pid, true)
                ));
            }
        }
    }

    // Workers nobody recorded: an agent that died mid-reload, or a state file that was lost.
    for pid in procfs::running_config(&want.config) {
        if judged.contains(&pid) {
            continue;
        }
        // A first look for the start time: the pidfd is opened on that identity, and everything
        // is read again once it is held.
        let Some(first) = procfs::inspect(pid) else {
            continue;
        };
        let record = WorkerRecord {
            id: first.id,
            started_at_ms: now_ms(),
            log: PathBuf::new(),
            config_sha256: String::new(),
        };
        let adopted = Worker::adopt(&record).map_err(Refusal::from).and_then(|w| {
            let seen = procfs::inspect(pid);
            verify(record.id, seen.as_ref(), &want, false)?;
            Ok((w, seen))
        });
        match adopted {
            Ok((mut worker, seen)) => {
                worker.log = seen.and_then(|s| s.stderr).unwrap_or_default();
                out.verified.push(Candidate {
                    worker,
                    was_current: false,
                    recorded: false,
                });
            }
            // It exited while being looked at: nothing to say.
            Err(Refusal::Mismatch(Mismatch::Gone(_) | Mismatch::Zombie(_))) => {}
            Err(refusal) => out.refused.push(format!(
                "not adopting pid {pid}, found running -f {}: {}",
                want.config.display(),
                refusal.explain(pid, false)
            )),
        }
    }
    out
}

/// The expectations with paths in the form the kernel shows them (canonical).
struct Want {
    binary: PathBuf,
    config: PathBuf,
    uids: Vec<u32>,
    log_dir: PathBuf,
}

impl Want {
    fn of(expect: &Expect<'_>) -> Want {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        Want {
            binary: canonical(expect.binary),
            config: canonical(expect.config),
            uids: expect.uids.clone(),
            log_dir: canonical(expect.log_dir),
        }
    }
}

#[derive(Debug)]
enum Refusal {
    Mismatch(Mismatch),
    Pidfd(AdoptError),
}

impl From<Mismatch> for Refusal {
    fn from(m: Mismatch) -> Self {
        Refusal::Mismatch(m)
    }
}

impl From<AdoptError> for Refusal {
    fn from(e: AdoptError) -> Self {
        match e {
            AdoptError::Mismatch(m) => Refusal::Mismatch(m),
            other => Refusal::Pidfd(other),
        }
    }
}

impl Refusal {
    /// The process at that pid is the one that was asked about, and it was refused for what it
    /// is (not for having ended).
    fn same_process(&self) -> bool {
        matches!(
            self,
            Refusal::Mismatch(
                Mismatch::WrongBinary { .. }
                    | Mismatch::ExeUnreadable { .. }
                    | Mismatch::WrongUser { .. }
                    | Mismatch::WrongConfig { .. }
            )
        )
    }

    /// The reason, and what (if anything) the operator should do about it.
    fn explain(&self, pid: u32, recorded: bool) -> String {
        let m = match self {
            Refusal::Pidfd(e) => {
                return format!("{e}; it is left running, unsupervised (ebb needs Linux 5.3 or later, and permission to open a pidfd on it)");
            }
            Refusal::Mismatch(m) => m,
        };
        let advice = match m {
            Mismatch::Gone(_) | Mismatch::Recycled { .. } | Mismatch::Zombie(_) => {
                if recorded {
                    "; the recorded worker has ended, nothing to do".to_string()
                } else {
                    String::new()
                }
            }
            Mismatch::WrongBinary { .. } if recorded => format!(
                "; it is left running, unsupervised: if it is a worker from before haproxy.binary \
                 changed, stop it yourself once its connections are done (kill -USR1 {pid})"
            ),
            Mismatch::WrongBinary { .. } | Mismatch::WrongConfig { .. } => {
                "; it is not this node's HAProxy and is left alone".to_string()
            }
            Mismatch::ExeUnreadable { .. } => "; it is left alone".to_string(),
            Mismatch::WrongUser { .. } => {
                "; it is left alone: if it is this node's HAProxy, name its user in the global \
                 section of the haproxy config (`user NAME` or `uid N`), or run the agent as that \
                 user"
                    .to_string()
            }
        };
        format!("{m}{advice}")
    }
}

/// The pure part of adoption: does what /proc showed (`seen`, read after the pidfd was opened)
/// qualify process `id`? A recorded worker must be the same process running the configured
/// binary; a process nobody recorded must also run as an expected user with this config.
fn verify(
    id: ProcessId,
    seen: Option<&Inspected>,
    want: &Want,
    recorded: bool,
) -> Result<(), Mismatch> {
    let Some(seen) = seen else {
        return Err(Mismatch::Gone(id.pid));
    };
    let observed = Observed {
        start_time: seen.id.start_time,
        state: seen.state,
    };
    procfs::check(id, Some(&observed))?;
    procfs::check_exe(id.pid, &seen.exe, &want.binary)?;
    if !recorded {
        procfs::check_uid(id.pid, seen.real_uid, &want.uids)?;
        procfs::check_config(id.pid, &seen.configs, &want.config)?;
    }
    Ok(())
}

/// Why the records of a state file are not to be trusted at all, if they are not: pids and start
/// times only mean something during the kernel boot they were read in.
fn boot_refusal(recorded: Option<&str>, now: &str, records: usize) -> Option<String> {
    if records == 0 {
        return None;
    }
    let why = match recorded {
        _ if now.is_empty() => {
            "this kernel's boot id cannot be read from /proc/sys/kernel/random/boot_id".to_string()
        }
        None | Some("") => "it records no kernel boot id".to_string(),
        Some(id) if id == now => return None,
        Some(id) => format!(
            "it was written during another boot of the kernel (boot id {id}, now {now}), so its \
             pids now name other processes"
        ),
    };
    Some(format!(
        "not adopting the {records} worker(s) recorded in the state file: {why}; running HAProxy \
         is looked for in /proc instead"
    ))
}

/// The log of a recorded worker: the recorded file if it lies in ebb's log directory (where ebb
/// puts every log it creates), else the worker's actual stderr file, for reading.
fn recorded_log(recorded: &Path, stderr: Option<&Path>, log_dir: &Path) -> PathBuf {
    let in_log_dir = recorded.parent().is_some_and(|p| {
        !p.as_os_str().is_empty()
            && (p == log_dir || std::fs::canonicalize(p).is_ok_and(|c| c == log_dir))
    });
    if in_log_dir {
        recorded.to_path_buf()
    } else {
        stderr.map(Path::to_path_buf).unwrap_or_default()
    }
}

/// The real uids a worker of this node may run as: the agent's own (HAProxy started by the agent
/// and staying as it), and the one HAProxy switches to when its config has `user NAME` or `uid N`
/// in the global section. A user name is looked up in /etc/passwd.
pub fn expected_uids(config: &Path) -> Vec<u32> {
    let mut uids = vec![rustix::process::getuid().as_raw()];
    let Ok(text) = std::fs::read_to_string(config) else {
        return uids;
    };
    let uid = match global_user(&text) {
        None => None,
        Some(RunAs::Uid(uid)) => Some(uid),
        Some(RunAs::User(name)) => {
            let found = std::fs::read_to_string("/etc/passwd")
                .ok()
                .and_then(|passwd| passwd_uid(&passwd, &name));
            if found.is_none() {
                tracing::warn!(
                    "haproxy config {} switches to user {name:?}, which is not in /etc/passwd: a \
                     running HAProxy of that user cannot be recognised as this node's and will not \
                     be adopted; use `uid N` in the global section instead",
                    config.display()
                );
            }
            found
        }
    };
    if let Some(uid) = uid {
        if !uids.contains(&uid) {
            uids.push(uid);
        }
    }
    uids
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RunAs {
    Uid(u32),
    User(String),
}

/// Sections of a haproxy config: a line starting with one of these ends the global section.
const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "peers",
    "resolvers",
    "userlist",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "log-forward",
    "fcgi-app",
    "crt-store",
    "traces",
    "acme",
];

/// The user HAProxy switches to: the last `user`/`uid` line of its global section(s). (`user`
/// lines elsewhere, as in a userlist, are something else.)
fn global_user(config: &str) -> Option<RunAs> {
    let mut in_global = false;
    let mut found = None;
    for line in config.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        if SECTIONS.contains(&keyword) {
            in_global = keyword == "global";
            continue;
        }
        if !in_global {
            continue;
        }
        let value = words
            .next()
            .map(|v| v.trim_matches(|c| c == '"' || c == '\''));
        match (keyword, value) {
            ("user", Some(name)) if !name.is_empty() => found = Some(RunAs::User(name.into())),
            ("uid", Some(n)) => {
                if let Ok(uid) = n.parse() {
                    found = Some(RunAs::Uid(uid));
                }
            }
            _ => {}
        }
    }
    found
}

/// The uid of user `name` in the text of /etc/passwd.
fn passwd_uid(passwd: &str, name: &str) -> Option<u32> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::process::{Child, Command, Stdio};

    fn want() -> Want {
        Want {
            binary: "/usr/sbin/haproxy".into(),
            config: "/etc/haproxy/haproxy.cfg".into(),
            uids: vec![0, 99],
            log_dir: "/var/lib/ebb/logs".into(),
        }
    }

    const ID: ProcessId = ProcessId {
        pid: 42,
        start_time: 1000,
    };

    /// A worker of this node as /proc shows it.
    fn seen() -> Inspected {
        Inspected {
            id: ID,
            state: 'S',
            exe: Ok("/usr/sbin/haproxy".into()),
            real_uid: Some(99),
            configs: vec!["/etc/haproxy/haproxy.cfg".into()],
            stderr: Some("/var/lib/ebb/logs/worker-42-1000.log".into()),
        }
    }

    #[test]
    fn a_worker_of_this_node_passes_recorded_or_not() {
        for recorded in [true, false] {
            assert_eq!(verify(ID, Some(&seen()), &want(), recorded), Ok(()));
            let upgraded = Inspected {
                exe: Ok("/usr/sbin/haproxy (deleted)".into()),
                ..seen()
            };
            assert_eq!(verify(ID, Some(&upgraded), &want(), recorded), Ok(()));
        }
    }

    #[test]
    fn identity_and_binary_are_checked_for_every_process() {
        for recorded in [true, false] {
            assert_eq!(verify(ID, None, &want(), recorded), Err(Mismatch::Gone(42)));
            let recycled = Inspected {
                id: ProcessId {
                    pid: 42,
                    start_time: 1001,
                },
                ..seen()
            };
            assert!(matches!(
                verify(ID, Some(&recycled), &want(), recorded),
                Err(Mismatch::Recycled { .. })
            ));
            let zombie = Inspected {
                state: 'Z',
                ..seen()
            };
            assert_eq!(
                verify(ID, Some(&zombie), &want(), recorded),
                Err(Mismatch::Zombie(42))
            );
            // A copy of haproxy (or anything) named haproxy is not the configured binary.
            let copy = Inspected {
                exe: Ok("/tmp/x/haproxy".into()),
                ..seen()
            };
            assert!(matches!(
                verify(ID, Some(&copy), &want(), recorded),
                Err(Mismatch::WrongBinary { .. })
            ));
            let unreadable = Inspected {
                exe: Err(io::ErrorKind::PermissionDenied),
                ..seen()
            };
            assert!(matches!(
                verify(ID, Some(&unreadable), &want(), recorded),
                Err(Mismatch::ExeUnreadable { .. })
            ));
        }
    }

    #[test]
    fn user_and_config_are_checked_for_a_process_nobody_recorded() {
        let other_user = Inspected {
            real_uid: Some(1000),
            ..seen()
        };
        let other_config = Inspected {
            configs: vec!["/etc/haproxy/other.cfg".into()],
            ..seen()
        };
        let no_uid = Inspected {
            real_uid: None,
            ..seen()
        };
        // Recorded: ebb started it itself, and pid + start time + binary identify it.
        for s in [&other_user, &other_config, &no_uid] {
            assert_eq!(verify(ID, Some(s), &want(), true), Ok(()));
        }
        assert!(matches!(
            verify(ID, Some(&other_user), &want(), false),
            Err(Mismatch::WrongUser { .. })
        ));
        assert!(matches!(
            verify(ID, Some(&no_uid), &want(), false),
            Err(Mismatch::WrongUser { .. })
        ));
        assert!(matches!(
            verify(ID, Some(&other_config), &want(), false),
            Err(Mismatch::WrongConfig { .. })
        ));
    }

    #[test]
    fn refusals_say_what_to_do() {
        let wrong = Refusal::Mismatch(Mismatch::WrongBinary {
            pid: 42,
            exe: "/opt/old/haproxy".into(),
            expected: "/usr/sbin/haproxy".into(),
        });
        let text = wrong.explain(42, true);
        assert!(
            text.contains("/opt/old/haproxy") && text.contains("kill -USR1 42"),
            "{text}"
        );
        assert!(wrong.explain(42, false).contains("left alone"));
        let user = Refusal::Mismatch(Mismatch::WrongUser {
            pid: 42,
            uid: Some(5),
            expected: vec![0],
        });
        assert!(user.explain(42, false).contains("`user NAME` or `uid N`"));
        assert!(Refusal::Mismatch(Mismatch::Gone(42))
            .explain(42, true)
            .contains("nothing to do"));
    }

    #[test]
    fn records_from_another_boot_are_refused_as_a_whole() {
        assert_eq!(boot_refusal(Some("b1"), "b1", 2), None);
        assert_eq!(boot_refusal(None, "b1", 0), None);
        let other = boot_refusal(Some("b0"), "b1", 2).expect("refused");
        assert!(
            other.contains("b0") && other.contains("b1") && other.contains("/proc"),
            "{other}"
        );
        assert!(boot_refusal(None, "b1", 1).is_some());
        assert!(boot_refusal(Some(""), "b1", 1).is_some());
        // Two unreadable boot ids are not a match.
        assert!(boot_refusal(Some(""), "", 1).is_some());
    }

    #[test]
    fn the_user_comes_from_the_global_section_only() {
        let cfg = "# user nobody\nglobal\n    daemon\n    user haproxy # drop root\n\ndefaults\n    mode http\n\nuserlist admins\n    user alice password x\n";
        assert_eq!(global_user(cfg), Some(RunAs::User("haproxy".into())));
        assert_eq!(
            global_user("global\n  user \"www\"\n  uid 99\n"),
            Some(RunAs::Uid(99))
        );
        assert_eq!(global_user("global\n  maxconn 10\n"), None);
        assert_eq!(
            global_user("userlist l\n  user alice password x\nfrontend fe\n  bind :80\n"),
            None
        );
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\n# comment\nhaproxy:x:99:99::/var/lib/haproxy:/usr/sbin/nologin\n";
        assert_eq!(passwd_uid(passwd, "haproxy"), Some(99));
        assert_eq!(passwd_uid(passwd, "root"), Some(0));
        assert_eq!(passwd_uid(passwd, "hap"), None);
        assert_eq!(passwd_uid("broken", "broken"), None);
    }

    #[test]
    fn expected_uids_are_the_agents_and_the_configs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = rustix::process::getuid().as_raw();
        let cfg = dir.path().join("haproxy.cfg");
        assert_eq!(expected_uids(&cfg), vec![me], "no config: the agent's uid");
        std::fs::write(&cfg, "global\n  uid 4242\n").expect("write");
        assert_eq!(expected_uids(&cfg), vec![me, 4242]);
        std::fs::write(&cfg, "global\n  user root\n").expect("write");
        let uids = expected_uids(&cfg);
        assert!(uids.contains(&me) && uids.contains(&0), "{uids:?}");
    }

    #[test]
    fn a_recorded_log_outside_the_log_dir_gives_way_to_stderr() {
        let dir = Path::new("/var/lib/ebb/logs");
        let stderr = Path::new("/var/log/haproxy.log");
        let own = dir.join("worker-1-2.log");
        assert_eq!(recorded_log(&own, Some(stderr), dir), own);
        assert_eq!(
            recorded_log(Path::new("/etc/passwd"), Some(stderr), dir),
            stderr
        );
        assert_eq!(recorded_log(Path::new(""), None, dir), PathBuf::new());
    }

    /// A stand-in for a worker of this node: `program` run as a shell waiting on its stdin, with
    /// `-f haproxy.cfg` on its command line and its stderr in `err.log`, in `dir`.
    struct Proc(Child);

    impl Proc {
        fn spawn(program: &Path, dir: &Path) -> Proc {
            let err = std::fs::File::create(dir.join("err.log")).expect("err.log");
            let mut tries = 0;
            loop {
                let spawned = Command::new(program)
                    .args(["-c", "read x", "haproxy", "-f", "haproxy.cfg"])
                    .current_dir(dir)
                    .stdin(Stdio::piped())
                    .stderr(err.try_clone().expect("clone"))
                    .spawn();
                match spawned {
                    Ok(child) => {
                        procfs::tests::wait_for_argv(child.id());
                        return Proc(child);
                    }
                    // A just-copied binary may still be open for writing in a child forked
                    // meanwhile by another test thread.
                    Err(e) if e.raw_os_error() == Some(26) && tries < 50 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("spawn {}: {e}", program.display()),
                }
            }
        }

        fn id(&self) -> ProcessId {
            let pid = self.0.id();
            ProcessId {
                pid,
                start_time: procfs::start_time(pid).expect("start time"),
            }
        }
    }

    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    struct Setup {
        dir: tempfile::TempDir,
        sh: PathBuf,
        uid: u32,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("haproxy.cfg"), "global\n").expect("write cfg");
        std::fs::create_dir(dir.path().join("logs")).expect("logs");
        Setup {
            dir,
            sh: std::fs::canonicalize("/bin/sh").expect("sh"),
            uid: rustix::process::getuid().as_raw(),
        }
    }

    impl Setup {
        fn cfg(&self) -> PathBuf {
            self.dir.path().join("haproxy.cfg")
        }
        fn logs(&self) -> PathBuf {
            self.dir.path().join("logs")
        }
        /// What this setup's processes must be: its shell as the binary, run by this user.
        fn expect<'a>(&'a self, cfg: &'a Path, logs: &'a Path) -> Expect<'a> {
            Expect {
                binary: &self.sh,
                config: cfg,
                uids: vec![self.uid],
                log_dir: logs,
            }
        }
        fn record(&self, id: ProcessId, log: PathBuf) -> WorkerRecord {
            WorkerRecord {
                id,
                started_at_ms: 5,
                log,
                config_sha256: "abc".into(),
            }
        }
    }

    fn pids(c: &Candidates) -> Vec<(u32, bool, bool)> {
        c.verified
            .iter()
            .map(|c| (c.worker.pid(), c.recorded, c.was_current))
            .collect()
    }

    #[test]
    fn a_process_of_this_node_is_found_through_proc_and_a_record_of_it_is_used() {
        let s = setup();
        let (cfg, logs) = (s.cfg(), s.logs());
        let p = Proc::spawn(&s.sh, s.dir.path());
        let id = p.id();
        let expect = s.expect(&cfg, &logs);
        let stderr = std::fs::canonicalize(s.dir.path().join("err.log")).expect("err.log");

        // Nobody recorded it: found by its config, its stderr kept for reading.
        let found = candidates(&[], None, &expect);
        assert_eq!(pids(&found), vec![(id.pid, false, false)], "{found:?}");
        assert_eq!(found.verified[0].worker.log, stderr);
        assert!(found.refused.is_empty(), "{:?}", found.refused);
        drop(found);

        // Recorded: adopted as such, once, with the recorded log when it is in the log dir.
        let boot = procfs::kernel_boot_id();
        let own_log = logs.join(format!("worker-{}-{}.log", id.pid, id.start_time));
        let records = [(s.record(id, own_log.clone()), true)];
        let recorded = candidates(&records, Some(&boot), &expect);
        assert_eq!(pids(&recorded), vec![(id.pid, true, true)], "{recorded:?}");
        assert_eq!(recorded.verified[0].worker.log, own_log);
        assert_eq!(recorded.verified[0].worker.config_sha256, "abc");
        drop(recorded);

        // A record from another boot is not trusted, but the process is still found.
        let other_boot = candidates(&records, Some("another-boot"), &expect);
        assert_eq!(pids(&other_boot), vec![(id.pid, false, false)]);
        assert!(
            other_boot.refused[0].contains("another boot"),
            "{:?}",
            other_boot.refused
        );
        drop(other_boot);

        // A record whose start time does not match is refused; the process is judged afresh.
        let stale = ProcessId {
            pid: id.pid,
            start_time: id.start_time + 1,
        };
        let records = [(s.record(stale, own_log), true)];
        let recycled = candidates(&records, Some(&boot), &expect);
        assert_eq!(pids(&recycled), vec![(id.pid, false, false)]);
        assert!(
            recycled.refused[0].contains(&format!("not adopting pid {}", id.pid))
                && recycled.refused[0].contains("recycled"),
            "{:?}",
            recycled.refused
        );
    }

    #[test]
    fn a_copy_of_the_binary_or_another_user_is_refused() {
        let s = setup();
        let (cfg, logs) = (s.cfg(), s.logs());
        // The same program, copied under the name haproxy: what used to be enough.
        let copy = s.dir.path().join("haproxy");
        std::fs::copy(&s.sh, &copy).expect("copy sh");
        let p = Proc::spawn(&copy, s.dir.path());
        let id = p.id();
        let expect = s.expect(&cfg, &logs);
        let c = candidates(&[], None, &expect);
        assert!(c.verified.is_empty(), "{c:?}");
        assert_eq!(c.refused.len(), 1, "{:?}", c.refused);
        assert!(
            c.refused[0].contains(&format!("not adopting pid {}", id.pid))
                && c.refused[0].contains("not the configured haproxy binary"),
            "{:?}",
            c.refused
        );
        // Recorded with its true identity, it is refused for its binary all the same, once.
        let boot = procfs::kernel_boot_id();
        let records = [(s.record(id, PathBuf::new()), false)];
        let c = candidates(&records, Some(&boot), &expect);
        assert!(c.verified.is_empty(), "{c:?}");
        assert_eq!(c.refused.len(), 1, "{:?}", c.refused);
        drop(p);

        // The right binary, but running as a user this node's HAProxy does not run as.
        let p = Proc::spawn(&s.sh, s.dir.path());
        let expect = Expect {
            uids: vec![s.uid.wrapping_add(1)],
            ..expect
        };
        let c = candidates(&[], None, &expect);
        assert!(c.verified.is_empty(), "{c:?}");
        assert!(
            c.refused.len() == 1 && c.refused[0].contains("runs as uid"),
            "{:?}",
            c.refused
        );
        drop(p);
    }
}
