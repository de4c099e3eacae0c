//! ebb plugin `exec-check`: the node is idle (for this plugin) when a command exits 0.
//!
//! ```toml
//! [[plugins]]
//! name = "jobs"
//! path = "/usr/lib/ebb/plugins/libebb_plugin_exec.so"
//! timeout = "2s"
//! config = { command = ["/usr/local/bin/no-jobs-running", "--queue", "default"], timeout = "1s", interval = "1s" }
//! ```
//!
//! - `command`: the program and its arguments, run directly (no shell). A single string is refused unless
//!   `shell = true`, which runs it with `/bin/sh -c`.
//! - `timeout` (default: three quarters of the plugin's `timeout`): past it, the command's whole process
//!   group is killed and the check is an error (the agent then applies `on_error`).
//! - `interval` (default `1s`): the command runs at most this often; checks in between repeat the last
//!   answer. `0s` runs it on every check.
//!
//! Busy (non-zero exit) shows the command's last line of output, e.g. "3 jobs still running", so make
//! the command print why it is busy. It runs with the agent's environment plus `EBB_DRAIN_ID` and
//! `EBB_DRAIN_ELAPSED_MS` when a drain is in progress, stdin from /dev/null.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ebb_sdk::plugin::{CheckContext, DrainStarted, Plugin, PluginResult, Verdict};
use serde::Deserialize;

/// Output kept from each stream.
const OUTPUT_LIMIT: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CommandSpec {
    Argv(Vec<String>),
    Line(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    command: CommandSpec,
    #[serde(default)]
    shell: bool,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    interval: Option<String>,
}

pub struct ExecCheck {
    argv: Vec<String>,
    display: String,
    timeout: Option<Duration>,
    interval: Duration,
    last: Option<(Instant, Result<Verdict, String>)>,
}

fn duration(key: &str, value: &Option<String>) -> Result<Option<Duration>, String> {
    value
        .as_deref()
        .map(|v| {
            humantime::parse_duration(v).map_err(|e| {
                format!(
                    "invalid config: {key} = {v:?} is not a duration like \"500ms\" or \"2s\": {e}"
                )
            })
        })
        .transpose()
}

impl ExecCheck {
    pub fn from_config(config: serde_json::Value) -> Result<ExecCheck, String> {
        if config.is_null() {
            return Err(
                "missing config: set config = { command = [\"/path/to/check\", \"arg\"] }".into(),
            );
        }
        let config: Config = serde_json::from_value(config).map_err(|e| {
            format!("invalid config: {e}; expected {{ command = [\"program\", \"arg\", …], shell = false, timeout = \"1s\", interval = \"1s\" }}")
        })?;
        let argv = match (config.command, config.shell) {
            (CommandSpec::Argv(argv), false) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err("invalid config: command is empty; give the program and its arguments".into());
                }
                argv
            }
            (CommandSpec::Line(line), true) => vec!["/bin/sh".into(), "-c".into(), line],
            (CommandSpec::Line(line), false) => {
                return Err(format!(
                    "invalid config: command {line:?} is a string, which would need a shell; give a list \
                     such as [\"/usr/bin/test\", \"-e\", \"/run/idle\"], or set shell = true to run it with /bin/sh -c"
                ))
            }
            (CommandSpec::Argv(_), true) => {
                return Err(
                    "invalid config: shell = true takes command as one string (a shell command line)".into(),
                )
            }
        };
        let display = if config.shell {
            argv[2].clone()
        } else {
            argv.join(" ")
        };
        Ok(ExecCheck {
            display: clip(&display, 80),
            argv,
            timeout: duration("timeout", &config.timeout)?,
            interval: duration("interval", &config.interval)?.unwrap_or(Duration::from_secs(1)),
            last: None,
        })
    }

    /// Runs the command once: idle on exit 0, busy otherwise, error when it cannot run or times out.
    pub fn run(&self, ctx: &CheckContext) -> Result<Verdict, String> {
        let timeout = self.timeout.unwrap_or_else(|| {
            let host = Duration::from_millis(ctx.timeout_ms.max(1));
            (host * 3 / 4).max(Duration::from_millis(50))
        });
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills everything it started.
            .process_group(0);
        if let Some(id) = &ctx.drain_id {
            cmd.env("EBB_DRAIN_ID", id);
        }
        if let Some(ms) = ctx.elapsed_ms {
            cmd.env("EBB_DRAIN_ELAPSED_MS", ms.to_string());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run `{}`: {e}", self.display))?;
        let pid = child.id();
        let stdout = collect(child.stdout.take());
        let stderr = collect(child.stderr.take());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(timeout) {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(format!("cannot wait for `{}`: {e}", self.display)),
            Err(_) => {
                if let Some(pgid) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ =
                        rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
                }
                return Err(format!(
                    "`{}` did not finish within {}; killed it",
                    self.display,
                    humantime::format_duration(timeout)
                ));
            }
        };
        if status.success() {
            return Ok(Verdict::Idle);
        }
        // Output of a process that exited; a grandchild holding the pipe open is not waited for long.
        let grace = Duration::from_millis(100);
        let out = stdout.recv_timeout(grace).unwrap_or_default();
        let err = stderr.recv_timeout(grace).unwrap_or_default();
        let why = last_line(&out).or_else(|| last_line(&err));
        let how = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "failed".to_string(),
        };
        Ok(Verdict::Busy(match why {
            Some(line) => format!("{line} (`{}` {how})", self.display),
            None => format!("`{}` {how}", self.display),
        }))
    }
}

/// Reads a stream to its end on a thread (so the child never blocks on a full pipe), keeping the start.
fn collect<R: Read + Send + 'static>(stream: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut stream) = stream {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = OUTPUT_LIMIT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            let _ = tx.send(kept);
        });
    }
    rx
}

fn last_line(bytes: &[u8]) -> Option<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(|l| clip(l, 200))
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

impl Plugin for ExecCheck {
    const NAME: &'static str = "exec-check";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn create(config: serde_json::Value) -> PluginResult<Self> {
        Ok(ExecCheck::from_config(config)?)
    }

    fn check_idle(&mut self, ctx: &CheckContext) -> PluginResult<Verdict> {
        if let Some((at, result)) = &self.last {
            if at.elapsed() < self.interval {
                return Ok(result.clone()?);
            }
        }
        let result = self.run(ctx);
        self.last = Some((Instant::now(), result.clone()));
        Ok(result?)
    }

    fn drain_started(&mut self, _event: &DrainStarted) -> PluginResult<()> {
        // A new drain starts from a fresh answer.
        self.last = None;
        Ok(())
    }
}

ebb_sdk::export_plugin!(ExecCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> CheckContext {
        CheckContext {
            timeout_ms: 2000,
            ..Default::default()
        }
    }

    fn check(config: serde_json::Value) -> Result<Verdict, String> {
        ExecCheck::from_config(config)?.run(&ctx())
    }

    #[test]
    fn exit_zero_is_idle_and_anything_else_is_busy_with_the_last_line() {
        assert_eq!(check(json!({"command": ["true"]})), Ok(Verdict::Idle));
        assert_eq!(
            check(json!({"command": ["sh", "-c", "echo starting; echo 3 jobs running; exit 2"]})),
            Ok(Verdict::Busy(
                "3 jobs running (`sh -c echo starting; echo 3 jobs running; exit 2` exited 2)"
                    .into()
            ))
        );
        assert_eq!(
            check(json!({"command": ["false"]})),
            Ok(Verdict::Busy("`false` exited 1".into()))
        );
        // stderr when stdout is silent.
        let v = check(json!({"command": "echo nope >&2; exit 1", "shell": true})).unwrap();
        assert_eq!(
            v,
            Verdict::Busy("nope (`echo nope >&2; exit 1` exited 1)".into())
        );
    }

    #[test]
    fn no_shell_unless_asked() {
        let e = ExecCheck::from_config(json!({"command": "true"}))
            .err()
            .unwrap();
        assert!(e.contains("set shell = true"), "{e}");
        // Without a shell, metacharacters are plain arguments.
        assert_eq!(
            check(json!({"command": ["sh", "-c", "exit 0", "; exit 1"]})),
            Ok(Verdict::Idle)
        );
        assert_eq!(
            check(json!({"command": "exit 0", "shell": true})),
            Ok(Verdict::Idle)
        );
        let e = ExecCheck::from_config(json!({"command": ["true"], "shell": true}))
            .err()
            .unwrap();
        assert!(e.contains("one string"), "{e}");
    }

    #[test]
    fn bad_configs_say_what_to_fix() {
        for (config, needle) in [
            (json!(null), "missing config"),
            (json!({}), "invalid config"),
            (json!({"command": []}), "command is empty"),
            (
                json!({"command": ["true"], "timeout": "soon"}),
                "timeout = \"soon\"",
            ),
            (
                json!({"command": ["true"], "colour": 1}),
                "unknown field `colour`",
            ),
        ] {
            let e = ExecCheck::from_config(config).err().unwrap();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let e = check(json!({"command": ["/nonexistent/program"]})).unwrap_err();
        assert!(e.contains("cannot run `/nonexistent/program`"), "{e}");
    }

    #[test]
    fn a_slow_command_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let e = check(json!({"command": script, "shell": true, "timeout": "300ms"})).unwrap_err();
        assert!(e.contains("did not finish within 300ms; killed it"), "{e}");
        // The background child was in the group and dies with it (then init reaps it).
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for init.
            if stat.is_empty()
                || stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a child of the timed-out command survived: {stat}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_interval_repeats_the_last_answer() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("busy");
        std::fs::write(&flag, "").unwrap();
        let mut p = ExecCheck::from_config(
            json!({"command": ["sh", "-c", format!("test ! -e {}", flag.display())], "interval": "1h"}),
        )
        .unwrap();
        assert!(matches!(p.check_idle(&ctx()).unwrap(), Verdict::Busy(_)));
        std::fs::remove_file(&flag).unwrap();
        assert!(matches!(p.check_idle(&ctx()).unwrap(), Verdict::Busy(_)));
        // A new drain asks again.
        p.drain_started(&DrainStarted::default()).unwrap();
        assert_eq!(p.check_idle(&ctx()).unwrap(), Verdict::Idle);
    }

    #[test]
    fn the_drain_is_in_the_environment() {
        let c = CheckContext {
            drain_id: Some("d-42".into()),
            elapsed_ms: Some(7),
            timeout_ms: 2000,
            ..Default::default()
        };
        let p = ExecCheck::from_config(
            json!({"command": ["sh", "-c", "echo $EBB_DRAIN_ID $EBB_DRAIN_ELAPSED_MS; exit 1"]}),
        )
        .unwrap();
        match p.run(&c).unwrap() {
            Verdict::Busy(m) => assert!(m.starts_with("d-42 7 "), "{m}"),
            v => panic!("{v:?}"),
        }
    }
}
