//! The HAProxy admin socket (the CLI over a unix socket).
//!
//! In direct mode the listening admin socket is shared by every worker that took it over with `-x`,
//! so any connection may land on an old worker. Commands that must reach one worker are therefore
//! sent as `show info;<command>` on one line: HAProxy runs the whole line in the process that
//! accepted it, and the `Pid:` in the answer says which process that was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket {path}: no answer within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("admin socket {path}: the answer has no `Pid:` line")]
    NoPid { path: PathBuf },
    #[error("admin socket {path}: answered by pid {got}, not by worker {want}")]
    WrongWorker { path: PathBuf, want: u32, got: u32 },
    #[error("admin socket {path}: HAProxy refused {command:?}: {answer}")]
    Refused {
        path: PathBuf,
        command: String,
        answer: String,
    },
}

/// Answers longer than this are cut: a stats dump of a large config fits well within it.
const MAX_ANSWER: u64 = 16 << 20;

#[derive(Debug, Clone)]
pub struct AdminSocket {
    path: PathBuf,
    timeout: Duration,
}

impl AdminSocket {
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        AdminSocket {
            path: path.into(),
            timeout,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one command line and reads the answer to EOF (a non-interactive CLI connection answers
    /// one line, then closes).
    pub async fn command(&self, line: &str) -> Result<String, AdminError> {
        let io = |source| AdminError::Io {
            path: self.path.clone(),
            source,
        };
        let exchange = async {
            let mut stream = UnixStream::connect(&self.path).await.map_err(io)?;
            let mut request = String::with_capacity(line.len() + 1);
            request.push_str(line.trim_end());
            request.push('\n');
            stream.write_all(request.as_bytes()).await.map_err(io)?;
            let mut answer = Vec::with_capacity(4096);
            (&mut stream)
                .take(MAX_ANSWER)
                .read_to_end(&mut answer)
                .await
                .map_err(io)?;
            Ok(String::from_utf8_lossy(&answer).into_owned())
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| AdminError::Timeout {
                path: self.path.clone(),
                timeout: self.timeout,
            })?
    }

    /// The pid of the worker that answered.
    pub async fn pid(&self) -> Result<u32, AdminError> {
        let answer = self.command("show info").await?;
        parse_pid(&answer).ok_or_else(|| AdminError::NoPid {
            path: self.path.clone(),
        })
    }

    /// Runs `line` in worker `pid` only. Returns the command's own answer, or `WrongWorker` when
    /// another worker accepted the connection (the caller retries).
    pub async fn command_on(&self, pid: u32, line: &str) -> Result<String, AdminError> {
        let answer = self.command(&format!("show info;{line}")).await?;
        let got = parse_pid(&answer).ok_or_else(|| AdminError::NoPid {
            path: self.path.clone(),
        })?;
        if got != pid {
            return Err(AdminError::WrongWorker {
                path: self.path.clone(),
                want: pid,
                got,
            });
        }
        // `show info` ends with a blank line; what follows is the command's answer.
        let own = answer
            .split_once("\n\n")
            .map(|(_, rest)| rest)
            .unwrap_or("");
        let own = own.trim();
        if looks_refused(own) {
            return Err(AdminError::Refused {
                path: self.path.clone(),
                command: line.to_string(),
                answer: own.to_string(),
            });
        }
        Ok(own.to_string())
    }
}

impl AdminSocket {
    /// `show info` of worker `pid` and, when `rows` asks for any, those `show stat` rows, taken in
    /// one exchange with that worker. The rows are `None` when none were asked for, or when the
    /// answer had no `show stat` CSV ebb can read.
    pub async fn sample(
        &self,
        pid: u32,
        rows: StatRows,
    ) -> Result<(String, Option<Vec<StatRow>>), AdminError> {
        let line = match rows.command() {
            Some(stat) => format!("show info;{stat}"),
            None => "show info".to_string(),
        };
        let answer = self.command(&line).await?;
        let got = parse_pid(&answer).ok_or_else(|| AdminError::NoPid {
            path: self.path.clone(),
        })?;
        if got != pid {
            return Err(AdminError::WrongWorker {
                path: self.path.clone(),
                want: pid,
                got,
            });
        }
        Ok(split_sample(&answer, rows))
    }

    /// Runs `line` in worker `pid`, retrying while other workers (that have not yet processed
    /// their soft-stop) accept the connection.
    pub async fn command_on_retrying(&self, pid: u32, line: &str) -> Result<String, AdminError> {
        let mut last = None;
        for _ in 0..100 {
            match self.command_on(pid, line).await {
                Err(e @ AdminError::WrongWorker { .. }) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                other => return other,
            }
        }
        Err(last.unwrap_or(AdminError::NoPid {
            path: self.path.clone(),
        }))
    }
}

/// HAProxy answers a failed CLI command with text instead of an error code.
fn looks_refused(answer: &str) -> bool {
    const MARKERS: [&str; 5] = [
        "Unknown command",
        "restricted to experimental mode",
        "Permission denied",
        "Missing",
        "failed",
    ];
    MARKERS.iter().any(|m| answer.contains(m))
}

pub fn parse_pid(answer: &str) -> Option<u32> {
    answer
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The answer to a sample's `show info[;show stat -1 <types> -1]`: `show info` ends with a blank
/// line, the CSV follows. The rows are `None` unless `rows` asked for some and the CSV is readable.
pub fn split_sample(answer: &str, rows: StatRows) -> (String, Option<Vec<StatRow>>) {
    let (info, stat) = answer.split_once("\n\n").unwrap_or((answer, ""));
    let rows = if rows.is_empty() {
        None
    } else {
        parse_stat(stat)
    };
    (info.to_string(), rows)
}

/// Which `show stat` rows a drain sample reads: HAProxy's row types, as the bitfield of
/// `show stat -1 <types> -1` (1 frontends, 2 backends, 4 servers). Server rows cannot be asked
/// for: no idle rule needs them, and on a config with thousands of servers they are nearly all of
/// the dump HAProxy would build and ebb would parse at every poll.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatRows {
    pub frontends: bool,
    pub backends: bool,
}

impl StatRows {
    /// No rows: the sample is `show info` alone.
    pub const NONE: StatRows = StatRows {
        frontends: false,
        backends: false,
    };

    pub fn is_empty(self) -> bool {
        self.types() == 0
    }

    /// The type bitfield of `show stat -1 <types> -1`.
    pub fn types(self) -> u8 {
        u8::from(self.frontends) | (u8::from(self.backends) << 1)
    }

    /// `show stat -1 <types> -1` (every proxy, these row types, every server id), or `None` when
    /// no rows are needed. Never a bare `show stat`, which dumps every server too. The syntax is
    /// the same in HAProxy 2.6 and 2.8, on the admin socket and behind the master CLI's `@!<pid>`.
    pub fn command(self) -> Option<String> {
        let types = self.types();
        (types != 0).then(|| format!("show stat -1 {types} -1"))
    }
}

/// One row of `show stat` that ebb cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatRow {
    pub proxy: String,
    pub kind: RowKind,
    pub qcur: u64,
    pub scur: u64,
    pub stot: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    Frontend,
    Backend,
    Server,
    Listener,
}

/// Parses the CSV of `show stat`, locating columns by the header so that versions may add columns.
/// `None` when there is no header with the columns ebb reads (an error message, a cut answer): an
/// unreadable answer must never pass for an empty, and so idle, worker.
pub fn parse_stat(csv: &str) -> Option<Vec<StatRow>> {
    let mut lines = csv.lines();
    let header = lines.find_map(|l| l.strip_prefix("# "))?;
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let (px, qcur, scur, stot, ty) = (
        col("pxname")?,
        col("qcur")?,
        col("scur")?,
        col("stot")?,
        col("type")?,
    );
    let num = |f: &[&str], i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
    let rows = lines
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let kind = match *f.get(ty)? {
                "0" => RowKind::Frontend,
                "1" => RowKind::Backend,
                "2" => RowKind::Server,
                "3" => RowKind::Listener,
                _ => return None,
            };
            Some(StatRow {
                proxy: f.get(px)?.to_string(),
                kind,
                qcur: num(&f, qcur),
                scur: num(&f, scur),
                stot: num(&f, stot),
            })
        })
        .collect();
    Some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pid() {
        assert_eq!(
            parse_pid("Name: HAProxy\nVersion: 2.6\nPid: 4242\nUptime: 0\n"),
            Some(4242)
        );
        assert_eq!(parse_pid("Unknown command\n"), None);
    }

    #[test]
    fn parses_stat_rows_by_header() {
        let csv = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,type,x\nfe,FRONTEND,,,3,5,100,17,0,\nbe,s1,2,,1,,,9,2,\nbe,BACKEND,4,,1,,,9,1,\nweird,row\n\n";
        let rows = parse_stat(csv);
        assert_eq!(
            rows,
            Some(vec![
                StatRow {
                    proxy: "fe".into(),
                    kind: RowKind::Frontend,
                    qcur: 0,
                    scur: 3,
                    stot: 17
                },
                StatRow {
                    proxy: "be".into(),
                    kind: RowKind::Server,
                    qcur: 2,
                    scur: 1,
                    stot: 9
                },
                StatRow {
                    proxy: "be".into(),
                    kind: RowKind::Backend,
                    qcur: 4,
                    scur: 1,
                    stot: 9
                },
            ])
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("Unknown command.\n"), None);
        assert_eq!(parse_stat("# pxname,svname,scur\nfe,FRONTEND,3\n"), None);
        assert_eq!(parse_stat("# pxname,qcur,scur,stot,type\n"), Some(vec![]));
    }

    #[test]
    fn a_sample_never_asks_for_server_rows_or_a_full_dump() {
        assert_eq!(StatRows::NONE.command(), None);
        let frontends = StatRows {
            frontends: true,
            backends: false,
        };
        let backends = StatRows {
            frontends: false,
            backends: true,
        };
        let both = StatRows {
            frontends: true,
            backends: true,
        };
        assert_eq!(frontends.command().as_deref(), Some("show stat -1 1 -1"));
        assert_eq!(backends.command().as_deref(), Some("show stat -1 2 -1"));
        assert_eq!(both.command().as_deref(), Some("show stat -1 3 -1"));
        for rows in [StatRows::NONE, frontends, backends, both] {
            assert_eq!(rows.types() & 4, 0, "{rows:?} asks for server rows");
        }
    }

    #[test]
    fn a_sample_answer_without_readable_rows_is_not_an_empty_worker() {
        let info = "Name: HAProxy\nPid: 7\nCurrConns: 2\n";
        let csv = "# pxname,svname,qcur,scur,stot,type\nfe,FRONTEND,,2,9,0\n";
        let frontends = StatRows {
            frontends: true,
            backends: false,
        };
        // `show info` alone: no rows, whatever follows.
        let (got, rows) = split_sample(&format!("{info}\n"), StatRows::NONE);
        assert_eq!((got.as_str(), rows), (info.trim_end(), None));
        let (got, rows) = split_sample(&format!("{info}\n{csv}\n"), frontends);
        assert_eq!(got, info.trim_end());
        assert_eq!(rows.map(|r| r.len()), Some(1));
        // HAProxy refused the `show stat`, or the answer was cut after `show info`.
        for tail in ["Unknown command.\n", "", "# pxname,svn"] {
            let (_, rows) = split_sample(&format!("{info}\n{tail}"), frontends);
            assert_eq!(rows, None, "{tail:?}");
        }
    }

    #[test]
    fn refusals_are_recognised() {
        assert!(looks_refused(
            "This command is restricted to experimental mode only."
        ));
        assert!(!looks_refused(""));
        assert!(!looks_refused("proc.x: type=sint value=<1>"));
    }

    mod garbage {
        //! Whatever the admin socket answers (another program on the socket, a newer HAProxy, a
        //! truncated read), the parsers answer, and never panic.

        use proptest::prelude::*;

        use super::super::*;

        fn field() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(String::new()),
                Just("0".to_string()),
                Just("1".to_string()),
                Just("2".to_string()),
                Just("3".to_string()),
                Just("-1".to_string()),
                Just("18446744073709551616".to_string()),
                Just("pxname".to_string()),
                Just("type".to_string()),
                Just("scur".to_string()),
                Just("qcur".to_string()),
                Just("stot".to_string()),
                Just("# ".to_string()),
                Just("Pid:".to_string()),
                Just("CurrConns:".to_string()),
                any::<char>().prop_map(String::from),
            ]
        }

        fn answer() -> impl Strategy<Value = String> {
            let line = prop::collection::vec(field(), 0..8).prop_map(|f| f.join(","));
            prop_oneof![
                prop::collection::vec(line, 0..5).prop_map(|l| l.join("\n")),
                // A header ebb knows, then rows of anything.
                prop::collection::vec(prop::collection::vec(field(), 0..8), 0..5).prop_map(
                    |rows| {
                        let mut csv = "# pxname,svname,qcur,scur,stot,type\n".to_string();
                        for r in rows {
                            csv.push_str(&r.join(","));
                            csv.push('\n');
                        }
                        csv
                    }
                ),
                prop::collection::vec(any::<u8>(), 0..256)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            #[test]
            fn show_info_and_show_stat_answers_never_panic(text in answer()) {
                let _ = parse_pid(&text);
                let _ = looks_refused(&text);
                let rows = parse_stat(&text).unwrap_or_default();
                prop_assert!(rows.len() <= text.lines().count());
                for types in [StatRows::NONE, StatRows { frontends: true, backends: false },
                              StatRows { frontends: true, backends: true }] {
                    let (info, rows) = split_sample(&text, types);
                    prop_assert!(info.len() <= text.len());
                    prop_assert!(types.is_empty() <= rows.is_none());
                }
            }
        }
    }
}
