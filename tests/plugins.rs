//! Plugins end to end through the host (`ebb_agent::plugins::PluginHost`): real cdylibs (the test plugin,
//! exec-check, alb-deregistration), a C plugin built here with the system C compiler, and broken libraries
//! that must each give a clear error while the host keeps working. The ALB plugin's API mode runs against
//! moto's ELBv2 server.
//!
//! The Rust plugins are dev-dependencies of ebb-agent, so cargo builds their cdylibs (into
//! target/<profile>/deps) before this test runs.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ebb_agent::config::{Dur, OnError, PluginConfig};
use ebb_agent::plugins::{CheckContext, HookEvent, PluginHost, Verdict};
use ebb_sdk::plugin::{DrainStarted, Drained, Reloaded, Stopping, Undrained};
use serde_json::{json, Value};
use support::{
    cdylib, free_port, plugin_toml, toml_string, wait_for_async, ChildGuard, NodeFixture, TestDir,
};

/// Longest any host call may take in these tests: far above every plugin timeout used here.
const BOUND: Duration = Duration::from_secs(10);

fn test_plugin() -> PathBuf {
    cdylib("ebb_plugin_test")
}

/// A private copy of a plugin file, to change its mode or owner.
fn copy_plugin(dir: &TestDir, from: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(from, &to).unwrap();
    set_mode(&to, 0o755);
    to
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn plugin(name: &str, path: &Path, config: Value) -> PluginConfig {
    PluginConfig {
        name: name.into(),
        path: path.to_path_buf(),
        sha256: None,
        timeout: Dur(Duration::from_secs(2)),
        on_error: OnError::Busy,
        config,
    }
}

fn ctx() -> CheckContext {
    CheckContext {
        node: Some("web-1".into()),
        drain_id: Some("d1".into()),
        started_at_ms: Some(1_700_000_000_000),
        elapsed_ms: Some(1_000),
        timeout_ms: 0,
    }
}

async fn check(host: &PluginHost) -> Vec<(String, Verdict)> {
    tokio::time::timeout(BOUND, host.check_idle(&ctx()))
        .await
        .expect("check_idle is bounded by the plugin timeouts")
}

async fn verdict_of(host: &PluginHost, name: &str) -> Verdict {
    check(host)
        .await
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no verdict from {name}"))
        .1
}

fn busy(message: &str) -> Verdict {
    Verdict::Busy(message.into())
}

fn busy_message(v: &Verdict) -> &str {
    match v {
        Verdict::Busy(m) => m,
        Verdict::Idle => panic!("expected busy, got idle"),
    }
}

fn drain_started(id: &str) -> HookEvent {
    HookEvent::DrainStarted(DrainStarted {
        drain_id: id.into(),
        started_at_ms: 1_700_000_000_000,
        min_period_ms: 30_000,
        deadline_ms: None,
    })
}

/// Builds a C file into a shared library with the system C compiler, against sdk/include.
fn build_c(dir: &TestDir, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    build_c_file(dir.path(), name, &src)
}

fn build_c_file(dir: &Path, name: &str, src: &Path) -> PathBuf {
    let out = dir.join(format!("lib{name}.so"));
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/include");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let result = Command::new(&cc)
        .args([
            "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-I",
        ])
        .arg(&include)
        .arg(src)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the C compiler {cc:?} (scripts/test installs gcc): {e}")
        });
    assert!(
        result.status.success(),
        "{cc} failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    out
}

/// The one problem loading `configs` gives, as text.
fn load_error(configs: &[PluginConfig]) -> String {
    match PluginHost::load(configs) {
        Ok(_) => panic!("loaded, but should not have"),
        Err(e) => {
            assert_eq!(e.problems.len(), 1, "{e}");
            e.to_string()
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The happy path.

#[tokio::test]
async fn every_hook_reaches_the_plugin_in_order_before_the_next_check() {
    let host = PluginHost::load(&[plugin(
        "probe",
        &test_plugin(),
        json!({"echo_events": true}),
    )])
    .unwrap();
    assert_eq!(host.status().len(), 1);
    let s = &host.status()[0];
    assert_eq!(
        (s.name.as_str(), s.version.as_str(), s.healthy),
        ("probe", "0.1.0", true)
    );

    host.hook(&drain_started("d1"));
    host.hook(&HookEvent::Reloaded(Reloaded {
        draining: true,
        drain_id: Some("d1".into()),
        reload_id: Some("r1".into()),
        pid: Some(42),
    }));
    host.hook(&HookEvent::Drained(Drained {
        drain_id: "d1".into(),
        forced: false,
    }));
    host.hook(&HookEvent::Undrained(Undrained {
        drain_id: "d1".into(),
    }));
    host.hook(&HookEvent::Stopping(Stopping {}));
    // Hooks and checks share the plugin's thread, in order: the check sees every hook.
    assert_eq!(
        verdict_of(&host, "probe").await,
        busy("events: drain_started:d1,reloaded:draining=true,drained:d1,undrained:d1,stopping (timeout_ms 2000)")
    );
    // hook_wait reports each plugin's outcome.
    let outcomes = tokio::time::timeout(BOUND, host.hook_wait(&drain_started("d2")))
        .await
        .unwrap();
    assert_eq!(outcomes, vec![("probe".to_string(), Ok(()))]);
    tokio::time::timeout(BOUND, host.shutdown()).await.unwrap();
}

#[tokio::test]
async fn verdicts_and_errors_follow_on_error() {
    let p = test_plugin();
    let mut lenient = plugin(
        "lenient",
        &p,
        json!({"verdict": "error", "message": "cannot reach the API"}),
    );
    lenient.on_error = OnError::Idle;
    let host = PluginHost::load(&[
        plugin("idle", &p, json!({"verdict": "idle"})),
        plugin(
            "busy",
            &p,
            json!({"verdict": "busy", "message": "3 uploads left"}),
        ),
        plugin(
            "strict",
            &p,
            json!({"verdict": "error", "message": "cannot reach the API"}),
        ),
        lenient,
        plugin("quiet", &p, json!({"verdict": "busy"})),
    ])
    .unwrap();
    assert_eq!(
        check(&host).await,
        vec![
            ("idle".to_string(), Verdict::Idle),
            ("busy".to_string(), busy("3 uploads left")),
            // Fail closed: the error is the blocker's message.
            ("strict".to_string(), busy("error: cannot reach the API")),
            // on_error = "idle": ignored.
            ("lenient".to_string(), Verdict::Idle),
            // A busy answer without a message still says something.
            ("quiet".to_string(), busy("busy")),
        ]
    );
    let healthy: Vec<bool> = host.status().iter().map(|s| s.healthy).collect();
    assert_eq!(healthy, vec![true, true, false, false, true]);
}

#[tokio::test]
async fn hook_failures_are_reported() {
    let host = PluginHost::load(&[plugin(
        "p",
        &test_plugin(),
        json!({"fail_event": "undrained"}),
    )])
    .unwrap();
    let out = host
        .hook_wait(&HookEvent::Undrained(Undrained {
            drain_id: "d".into(),
        }))
        .await;
    assert_eq!(
        out,
        vec![(
            "p".to_string(),
            Err("its undrained hook failed: undrained failed as configured".to_string())
        )]
    );
    // A failing hook does not make the plugin unhealthy for idle checks.
    assert_eq!(verdict_of(&host, "p").await, Verdict::Idle);
}

// ---------------------------------------------------------------------------------------------------------
// Misbehaving plugins: each gives a clear error or event, and the host keeps working.

#[tokio::test]
async fn a_panic_in_every_entry_point_is_contained() {
    let p = test_plugin();
    // create: a load error that says so.
    let e = load_error(&[plugin("pc", &p, json!({"panic_in": "create"}))]);
    assert!(
        e.starts_with(&format!("plugin pc ({}): ", p.display())),
        "{e}"
    );
    assert!(
        e.contains("the plugin panicked: test plugin: panic in create as configured"),
        "{e}"
    );

    let host = PluginHost::load(&[
        plugin("check", &p, json!({"panic_in": "check_idle"})),
        plugin("event", &p, json!({"panic_in": "on_event"})),
        plugin("destroy", &p, json!({"panic_in": "destroy"})),
        plugin("fine", &p, json!({})),
    ])
    .unwrap();
    // check_idle: an error answer, per on_error (busy), naming the panic.
    let verdicts = check(&host).await;
    let m = busy_message(&verdicts[0].1);
    assert!(
        m.starts_with("error: the plugin panicked: test plugin: panic in check_idle"),
        "{m}"
    );
    assert_eq!(verdicts[1].1, Verdict::Idle);
    assert_eq!(verdicts[3].1, Verdict::Idle);
    // on_event: a hook error.
    let outcomes = host.hook_wait(&drain_started("d1")).await;
    let (name, result) = &outcomes[1];
    assert_eq!(name, "event");
    let e = result.as_ref().unwrap_err();
    assert!(
        e.contains("the plugin panicked: test plugin: panic in on_event"),
        "{e}"
    );
    // Fire-and-forget hooks into a panicking plugin, then everyone still answers.
    host.hook(&drain_started("d2"));
    let verdicts = check(&host).await;
    assert_eq!(verdicts.len(), 4);
    assert_eq!(verdicts[3].1, Verdict::Idle);
    // destroy: shutting down survives it.
    tokio::time::timeout(BOUND, host.shutdown()).await.unwrap();
    // After shutdown nothing is called; answers stay bounded.
    assert_eq!(verdict_of(&host, "fine").await, busy("shut down"));
}

#[tokio::test]
async fn a_plugin_that_hangs_is_disabled_with_an_event_and_others_keep_answering() {
    let p = test_plugin();
    let mut slow = plugin(
        "slow",
        &p,
        json!({"sleep_in": "check_idle", "sleep_ms": 600_000}),
    );
    slow.timeout = Dur(Duration::from_millis(100));
    let mut slow_lenient = slow.clone();
    slow_lenient.name = "slow-lenient".into();
    slow_lenient.on_error = OnError::Idle;
    let host = PluginHost::load(&[slow, slow_lenient, plugin("fine", &p, json!({}))]).unwrap();
    let mut disabled = host.take_disabled().expect("the receiver, once");
    assert!(host.take_disabled().is_none());

    for _ in 0..3 {
        let v = check(&host).await;
        assert_eq!(v[0].1, busy("no answer within 100ms"));
        assert_eq!(v[1].1, Verdict::Idle);
        assert_eq!(v[2].1, Verdict::Idle);
    }
    let mut notices = Vec::new();
    for _ in 0..2 {
        notices.push(
            tokio::time::timeout(BOUND, disabled.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    notices.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(notices[0].name, "slow");
    assert_eq!(
        notices[0].reason,
        "no answer within 100ms, 3 times in a row"
    );
    assert!(notices[0].blocks_drains);
    assert_eq!(
        notices[0].to_string(),
        format!(
            "plugin slow ({}) disabled: no answer within 100ms, 3 times in a row; it is not called again \
             until the agent restarts, and its idle check now counts as busy (on_error = \"busy\"); fix or \
             remove the plugin, then restart the agent",
            p.display()
        )
    );
    assert!(!notices[1].blocks_drains);
    // Disabled: answered at once, per on_error, without calling the plugin.
    let v = check(&host).await;
    assert_eq!(
        v[0].1,
        busy("disabled: no answer within 100ms, 3 times in a row")
    );
    assert_eq!(v[1].1, Verdict::Idle);
    assert_eq!(v[2].1, Verdict::Idle);
    host.hook(&drain_started("d1"));
    let healthy: Vec<bool> = host.status().iter().map(|s| s.healthy).collect();
    assert_eq!(healthy, vec![false, false, true]);
    // One notice per plugin.
    assert!(disabled.try_recv().is_err());
}

#[tokio::test]
async fn a_plugin_that_hangs_while_loading_is_refused_in_time() {
    let mut cfg = plugin(
        "slow-create",
        &test_plugin(),
        json!({"sleep_in": "create", "sleep_ms": 600_000}),
    );
    cfg.timeout = Dur(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let e = load_error(&[cfg]);
    assert!(e.contains("did not finish loading within 5s"), "{e}");
    assert!(started.elapsed() < BOUND);
}

#[tokio::test]
async fn a_bad_config_is_a_load_error_naming_the_plugin_and_key() {
    let p = test_plugin();
    let e = load_error(&[plugin("t", &p, json!({"verdict": 5}))]);
    assert!(
        e.starts_with(&format!(
            "plugin t ({}): its create rejected the config: invalid config",
            p.display()
        )),
        "{e}"
    );
    assert!(e.contains("invalid type: integer `5`"), "{e}");
    let e = load_error(&[plugin("t", &p, json!({"colour": "blue"}))]);
    assert!(e.contains("unknown field `colour`"), "{e}");
    // Two entries with one name.
    let e = load_error(&[plugin("t", &p, json!({})), plugin("t", &p, json!({}))]);
    assert!(e.contains("another plugin is named \"t\""), "{e}");
}

#[tokio::test]
async fn a_plugin_that_fails_to_load_blocks_drains_by_default_and_the_rest_work() {
    let dir = TestDir::new();
    let writable = copy_plugin(&dir, &test_plugin(), "libwritable.so");
    set_mode(&writable, 0o666);
    let mut lenient = plugin("lenient", &writable, json!({}));
    lenient.on_error = OnError::Idle;
    let (host, problems) = PluginHost::load_fail_closed(&[
        plugin("broken", &writable, json!({})),
        lenient,
        plugin("fine", &test_plugin(), json!({})),
    ]);
    assert_eq!(problems.len(), 2);
    let v = check(&host).await;
    let m = busy_message(&v[0].1);
    assert!(m.starts_with("not loaded: the plugin file"), "{m}");
    assert!(m.contains("chmod go-w"), "{m}");
    assert_eq!(v[1].1, Verdict::Idle);
    assert_eq!(v[2].1, Verdict::Idle);
    let status = host.status();
    assert_eq!((status[0].healthy, status[0].version.as_str()), (false, ""));
    assert!(status[2].healthy);
}

#[tokio::test]
async fn a_file_others_can_write_is_refused() {
    let dir = TestDir::new();
    let so = copy_plugin(&dir, &test_plugin(), "libebb_plugin_test.so");
    for mode in [0o666, 0o664, 0o646] {
        set_mode(&so, mode);
        let e = load_error(&[plugin("t", &so, json!({}))]);
        assert!(e.contains("is group- or world-writable"), "{e}");
        assert!(e.contains(&format!("chmod go-w {}", so.display())), "{e}");
    }
    set_mode(&so, 0o755);
    // A directory that others can write.
    set_mode(dir.path(), 0o777);
    let e = load_error(&[plugin("t", &so, json!({}))]);
    assert!(e.contains("its directory"), "{e}");
    set_mode(dir.path(), 0o700);
    PluginHost::load(&[plugin("t", &so, json!({}))]).unwrap();
}

#[tokio::test]
async fn a_file_owned_by_someone_else_is_refused() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("SKIPPED: changing a file's owner needs root");
        return;
    }
    let dir = TestDir::new();
    let so = copy_plugin(&dir, &test_plugin(), "libebb_plugin_test.so");
    std::os::unix::fs::chown(&so, Some(65534), None).unwrap();
    let e = load_error(&[plugin("t", &so, json!({}))]);
    assert!(e.contains("is owned by uid 65534"), "{e}");
    assert!(e.contains(&format!("chown root {}", so.display())), "{e}");
}

#[tokio::test]
async fn the_sha256_pin_is_enforced() {
    let dir = TestDir::new();
    let so = copy_plugin(&dir, &test_plugin(), "libebb_plugin_test.so");
    let actual = {
        use sha2::Digest;
        let bytes = std::fs::read(&so).unwrap();
        sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let mut cfg = plugin("t", &so, json!({}));
    cfg.sha256 = Some("ab".repeat(32));
    let e = load_error(std::slice::from_ref(&cfg));
    assert!(e.contains("sha256 mismatch"), "{e}");
    assert!(e.contains(&format!("set sha256 = \"{actual}\"")), "{e}");
    cfg.sha256 = Some(actual);
    PluginHost::load(&[cfg]).unwrap();
}

#[tokio::test]
async fn libraries_that_are_not_ebb_plugins_are_refused_clearly() {
    let dir = TestDir::new();
    let header = "#include \"ebb_plugin.h\"\n#include <stddef.h>\n";
    let table = |abi: &str, size: &str, check: &str| {
        format!(
            "{header}
static EbbPluginInstance *create(const char *c, char **e) {{ (void)c; *e = NULL; return (EbbPluginInstance *)1; }}
__attribute__((unused)) static char *check_idle(EbbPluginInstance *i, const char *c) {{ (void)i; (void)c; return NULL; }}
static char *on_event(EbbPluginInstance *i, const char *c) {{ (void)i; (void)c; return NULL; }}
static void free_string(char *s) {{ (void)s; }}
static void destroy(EbbPluginInstance *i) {{ (void)i; }}
static const EbbPluginV1 TABLE = {{ {abi}, {size}, EBB_CAP_CHECK_IDLE, 0, \"x\", \"1\", create, {check}, on_event, free_string, destroy }};
const EbbPluginV1 *ebb_plugin_entry(void) {{ return &TABLE; }}
"
        )
    };
    let cases = [
        (
            "wrong_abi",
            table("99", "sizeof(EbbPluginV1)", "check_idle"),
            "built for plugin ABI version 99, and this agent loads version 1; rebuild the plugin",
        ),
        (
            "small_table",
            table("EBB_PLUGIN_ABI_VERSION", "16", "check_idle"),
            "its table is 16 bytes",
        ),
        (
            "null_function",
            table("EBB_PLUGIN_ABI_VERSION", "sizeof(EbbPluginV1)", "NULL"),
            "its table has no `check_idle` function",
        ),
        (
            "no_symbol",
            "int not_a_plugin(void) { return 1; }\n".to_string(),
            "it does not export `ebb_plugin_entry`, so it is not an ebb plugin",
        ),
        (
            "null_entry",
            format!("{header}const EbbPluginV1 *ebb_plugin_entry(void) {{ return NULL; }}\n"),
            "`ebb_plugin_entry` returned NULL",
        ),
    ];
    let mut configs = Vec::new();
    for (name, source, _) in &cases {
        let so = build_c(&dir, name, source);
        configs.push(plugin(name, &so, json!({})));
    }
    // Not a shared library at all.
    let junk = dir.join("libjunk.so");
    std::fs::write(&junk, b"not an ELF file").unwrap();
    configs.push(plugin("junk", &junk, json!({})));
    // Not there.
    configs.push(plugin("missing", &dir.join("libmissing.so"), json!({})));
    configs.push(plugin("fine", &test_plugin(), json!({})));

    let (host, problems) = PluginHost::load_fail_closed(&configs);
    let expected: Vec<&str> = cases
        .iter()
        .map(|c| c.2)
        .chain(["cannot load the library", "cannot open the plugin file"])
        .collect();
    assert_eq!(problems.len(), expected.len(), "{problems:?}");
    for (problem, needle) in problems.iter().zip(expected) {
        let line = problem.to_string();
        assert!(
            line.starts_with(&format!("plugin {} (", problem.name)),
            "{line}"
        );
        assert!(line.contains(needle), "{line} should say {needle:?}");
    }
    // The one good plugin works beside them.
    assert_eq!(verdict_of(&host, "fine").await, Verdict::Idle);

    // ebb plugin inspect says the same.
    let out = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["plugin", "inspect"])
        .arg(dir.join("libwrong_abi.so"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot load") && stderr.contains("ABI version 99"),
        "{stderr}"
    );
}

#[test]
fn plugin_inspect_prints_the_table() {
    let so = test_plugin();
    let out = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["plugin", "inspect"])
        .arg(&so)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "abi_version:  1",
        "name:         test",
        "version:      0.1.0",
        "capabilities: check_idle, events",
        "sha256:       ",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["plugin", "inspect", "--json"])
        .arg(&so)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["abi_version"], 1);
    assert_eq!(v["capabilities"], json!(["check_idle", "events"]));
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
}

// ---------------------------------------------------------------------------------------------------------
// The first-party plugins and the C example.

#[tokio::test]
async fn exec_check_is_idle_when_its_command_exits_zero() {
    let dir = TestDir::new();
    let flag = dir.join("busy");
    std::fs::write(&flag, "").unwrap();
    let script = format!(
        "if [ -e {} ]; then echo 2 jobs running; exit 1; fi",
        flag.display()
    );
    let host = PluginHost::load(&[
        plugin(
            "jobs",
            &cdylib("ebb_plugin_exec"),
            json!({"command": ["sh", "-c", script], "interval": "0s"}),
        ),
        plugin(
            "no-shell",
            &cdylib("ebb_plugin_exec"),
            json!({"command": "true"}),
        ),
    ]);
    let e = host.err().unwrap().to_string();
    assert!(
        e.contains("plugin no-shell") && e.contains("set shell = true"),
        "{e}"
    );

    let host = PluginHost::load(&[plugin(
        "jobs",
        &cdylib("ebb_plugin_exec"),
        json!({"command": ["sh", "-c", script], "interval": "0s"}),
    )])
    .unwrap();
    let m = busy_message(&verdict_of(&host, "jobs").await).to_string();
    assert!(m.starts_with("2 jobs running (`sh -c if [ -e"), "{m}");
    assert!(m.ends_with("exited 1)"), "{m}");
    std::fs::remove_file(&flag).unwrap();
    assert_eq!(verdict_of(&host, "jobs").await, Verdict::Idle);
}

#[tokio::test]
async fn the_c_example_plugin_works() {
    let dir = TestDir::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/c-plugin/busy_file.c");
    let so = build_c_file(dir.path(), "ebb_busy_file", &src);
    let e = load_error(&[plugin("maint", &so, json!({}))]);
    assert!(
        e.contains("invalid config: set config = { busy_file"),
        "{e}"
    );

    let flag = dir.join("busy \"file\"");
    let host = PluginHost::load(&[plugin("maint", &so, json!({"busy_file": flag}))]).unwrap();
    assert_eq!(host.status()[0].version, "1.0.0");
    assert_eq!(verdict_of(&host, "maint").await, Verdict::Idle);
    std::fs::write(&flag, "").unwrap();
    assert_eq!(
        verdict_of(&host, "maint").await,
        busy(&format!("{} exists", flag.display()))
    );
    host.hook(&drain_started("d-7"));
    assert_eq!(
        verdict_of(&host, "maint").await,
        busy(&format!("{} exists (since drain d-7)", flag.display()))
    );
    std::fs::remove_file(&flag).unwrap();
    assert_eq!(verdict_of(&host, "maint").await, Verdict::Idle);
    tokio::time::timeout(BOUND, host.shutdown()).await.unwrap();

    // And `ebb plugin inspect` reads it.
    let out = Command::new(env!("CARGO_BIN_EXE_ebb"))
        .args(["plugin", "inspect"])
        .arg(&so)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("name:         busy-file"), "{stdout}");
}

#[tokio::test]
async fn alb_timer_mode_counts_down_the_deregistration_delay() {
    let host = PluginHost::load(&[plugin(
        "alb",
        &cdylib("ebb_plugin_alb"),
        json!({"deregistration_delay": "300s"}),
    )])
    .unwrap();
    host.hook(&drain_started("d1"));
    let mut c = ctx();
    c.elapsed_ms = Some(88_000);
    let v = host.check_idle(&c).await;
    assert_eq!(
        v,
        vec![("alb".to_string(), busy("212s of deregistration delay left"))]
    );
    c.elapsed_ms = Some(300_000);
    assert_eq!(host.check_idle(&c).await[0].1, Verdict::Idle);
}

/// moto's server (`pip install 'moto[server]'`): `moto_server` on PATH, or the module.
/// moto's ELBv2 server on a free port, killed on drop.
struct Moto {
    url: String,
    _server: ChildGuard,
    _dir: TestDir,
}

impl Moto {
    /// Fails the test when moto is missing: the test command installs it, so a missing moto is a
    /// broken setup, never a reason to skip.
    async fn start() -> Moto {
        let mut cmd = moto_command().expect(
            "moto's ELBv2 server is not installed: run scripts/test (it installs it) or pip install 'moto[server]'",
        );
        let dir = TestDir::new();
        let port = free_port();
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let server = ChildGuard::spawn(
            "moto_server",
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        )
        .unwrap();
        wait_for_async(Duration::from_secs(30), "moto to listen", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Moto {
            url: format!("http://127.0.0.1:{port}"),
            _server: server,
            _dir: dir,
        }
    }
}

fn moto_command() -> Option<Command> {
    let ok = |c: &mut Command| {
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if ok(Command::new("moto_server").arg("--help")) {
        return Some(Command::new("moto_server"));
    }
    if ok(Command::new("python3").args(["-c", "import moto.server, boto3"])) {
        let mut c = Command::new("python3");
        c.args(["-m", "moto.server"]);
        return Some(c);
    }
    None
}

/// Talks to moto with boto3 (installed with moto): sets up a target group, reads a target's state.
const MOTO_SCRIPT: &str = r#"
import sys, boto3
url, cmd = sys.argv[1], sys.argv[2]
kw = dict(region_name="us-east-1", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing")
elb = boto3.client("elbv2", **kw)
target = {"Id": "10.0.0.5", "Port": 8080}
if cmd == "setup":
    vpc = boto3.client("ec2", **kw).create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    tg = elb.create_target_group(Name="web", Protocol="HTTP", Port=8080, VpcId=vpc, TargetType="ip")
    arn = tg["TargetGroups"][0]["TargetGroupArn"]
    elb.register_targets(TargetGroupArn=arn, Targets=[target])
    print(arn)
elif cmd == "state":
    d = elb.describe_target_health(TargetGroupArn=sys.argv[3], Targets=[target])["TargetHealthDescriptions"]
    print(d[0]["TargetHealth"]["State"] if d else "gone")
"#;

fn moto(url: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .args(["-c", MOTO_SCRIPT, url])
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "boto3 against moto failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alb_api_mode_deregisters_waits_and_registers_again_against_moto() {
    let moto_server = Moto::start().await;
    let url = moto_server.url.clone();
    let arn = tokio::task::spawn_blocking({
        let url = url.clone();
        move || moto(&url, &["setup"])
    })
    .await
    .unwrap();
    assert_eq!(moto(&url, &["state", &arn]), "healthy");

    let api = |arns: Value| {
        json!({
            "mode": "api", "target_group_arns": arns, "target_id": "10.0.0.5", "port": 8080,
            "region": "us-east-1", "endpoint": url, "poll_interval": "50ms", "api_timeout": "5s",
            "access_key_id": "testing", "secret_access_key": "testing",
        })
    };
    let missing_tg =
        "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/nope/0123456789abcdef";
    let mut alb = plugin("alb", &cdylib("ebb_plugin_alb"), api(json!([arn])));
    alb.timeout = Dur(Duration::from_secs(5));
    let mut wrong = plugin(
        "alb-wrong",
        &cdylib("ebb_plugin_alb"),
        api(json!([missing_tg])),
    );
    wrong.timeout = Dur(Duration::from_secs(5));
    let host = PluginHost::load(&[alb, wrong]).unwrap();

    host.hook(&drain_started("d1"));
    // Busy until the target is unused in the group, then idle.
    wait_for_async(
        Duration::from_secs(30),
        "the ALB plugin to say idle",
        || async { (host.check_idle(&ctx()).await[0].1 == Verdict::Idle).then_some(()) },
    )
    .await;
    assert_eq!(moto(&url, &["state", &arn]), "unused");
    // A target group that does not exist: an error, shown as the blocker (fail closed).
    let m = wait_for_async(Duration::from_secs(30), "the API error", || async {
        match &host.check_idle(&ctx()).await[1].1 {
            Verdict::Busy(m) if m.starts_with("error: ") => Some(m.clone()),
            _ => None,
        }
    })
    .await;
    assert!(
        m.contains("DeregisterTargets of 10.0.0.5:8080 in arn:aws:elasticloadbalancing"),
        "{m}"
    );
    assert!(m.contains("TargetGroupNotFound"), "{m}");

    // Undrain registers it again.
    let out = host
        .hook_wait(&HookEvent::Undrained(Undrained {
            drain_id: "d1".into(),
        }))
        .await;
    assert_eq!(out[0], ("alb".to_string(), Ok(())));
    let e = out[1].1.as_ref().unwrap_err();
    assert!(e.contains("RegisterTargets of 10.0.0.5:8080 failed"), "{e}");
    assert_eq!(moto(&url, &["state", &arn]), "healthy");

    // A drain the plugin missed (agent restarted mid-drain): the check's drain id starts it.
    let mut c = ctx();
    c.drain_id = Some("d2".into());
    wait_for_async(
        Duration::from_secs(30),
        "the ALB plugin to deregister on its own",
        || async { (host.check_idle(&c).await[0].1 == Verdict::Idle).then_some(()) },
    )
    .await;
    assert_eq!(moto(&url, &["state", &arn]), "unused");
    tokio::time::timeout(BOUND, host.shutdown()).await.unwrap();
}

// ---------------------------------------------------------------------------------------------------------
// In a real drain: nats-server, `ebb agent` with its own haproxy, the demo backend. `drained` waits for
// every plugin, status shows their messages, and misbehaving plugins never stop the agent from serving.

const NODE: &str = support::NODE_ID;
const T: Duration = Duration::from_secs(30);

/// A serving node whose agent loads the `[[plugins]]` that `plugins` writes (given the node's dir).
async fn start_node(plugins: impl FnOnce(&Path) -> String) -> NodeFixture {
    NodeFixture::builder()
        .timeout(T)
        .plugins_toml(plugins)
        .start()
        .await
}

/// The message of plugin `name`'s blocker in a status, if it blocks.
fn blocker(status: &Value, name: &str) -> Option<String> {
    status["drain"]["blockers"]
        .as_array()?
        .iter()
        .find(|b| b["kind"] == "plugin" && b["name"] == name)
        .map(|b| b["message"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_drain_waits_for_every_plugin_and_status_shows_why() {
    let exec_flag = std::cell::RefCell::new(PathBuf::new());
    let c_flag = std::cell::RefCell::new(PathBuf::new());
    let node = start_node(|dir| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/c-plugin/busy_file.c");
        let c_so = build_c_file(dir, "ebb_busy_file", &src);
        *exec_flag.borrow_mut() = dir.join("exec-busy");
        *c_flag.borrow_mut() = dir.join("c-busy");
        let script = format!(
            "if [ -e {} ]; then echo 2 jobs running; exit 1; fi",
            exec_flag.borrow().display()
        );
        [
            plugin_toml(
                "jobs",
                &cdylib("ebb_plugin_exec"),
                "2s",
                &format!(
                    "{{ command = [\"sh\", \"-c\", {}], interval = \"0s\" }}",
                    toml_string(&script)
                ),
            ),
            plugin_toml(
                "maint",
                &c_so,
                "2s",
                &format!(
                    "{{ busy_file = {} }}",
                    toml_string(c_flag.borrow().to_string_lossy())
                ),
            ),
            plugin_toml(
                "alb",
                &cdylib("ebb_plugin_alb"),
                "2s",
                "{ deregistration_delay = \"3s\" }",
            ),
        ]
        .join("\n")
    })
    .await;
    let (exec_flag, c_flag) = (exec_flag.into_inner(), c_flag.into_inner());
    std::fs::write(&exec_flag, "").unwrap();
    std::fs::write(&c_flag, "").unwrap();

    let status = node.ok("status", json!({})).await;
    let plugins: Vec<(String, String, bool)> = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().into(),
                p["version"].as_str().unwrap().into(),
                p["healthy"] == true,
            )
        })
        .collect();
    assert_eq!(
        plugins,
        vec![
            ("jobs".into(), "0.1.0".into(), true),
            ("maint".into(), "1.0.0".into(), true),
            ("alb".into(), "0.1.0".into(), true),
        ]
    );

    let drain = node.ok("drain", json!({})).await;
    let id = drain["drain_id"].as_str().unwrap().to_string();
    // Every plugin's own message shows as its blocker.
    let status = node
        .wait_status("every plugin's blocker", |s| {
            blocker(s, "jobs").is_some_and(|m| m.starts_with("2 jobs running"))
                && blocker(s, "maint")
                    .is_some_and(|m| m.ends_with(&format!("exists (since drain {id})")))
                && blocker(s, "alb").is_some_and(|m| m.ends_with("s of deregistration delay left"))
        })
        .await;
    assert_eq!(status["state"], "draining", "{status}");

    // The timer runs out; the two flags still hold the drain.
    std::fs::remove_file(&exec_flag).unwrap();
    let status = node
        .wait_status("the alb and exec blockers to clear", |s| {
            blocker(s, "jobs").is_none() && blocker(s, "alb").is_none()
        })
        .await;
    assert_eq!(
        status["state"], "draining",
        "the C plugin still holds the drain: {status}"
    );
    assert!(blocker(&status, "maint").is_some(), "{status}");

    std::fs::remove_file(&c_flag).unwrap();
    let status = node
        .wait_status("drained", |s| s["state"] == "drained")
        .await;
    assert_eq!(status["drain"]["blockers"], json!([]), "{status}");
    assert_eq!(
        node.healthz().await,
        503,
        "a drained node fails its health check"
    );
    node.undrain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_and_panicking_plugins_block_the_drain_and_the_agent_keeps_serving() {
    let p = test_plugin();
    let mut node = start_node(|_| {
        [
            plugin_toml(
                "slow",
                &p,
                "200ms",
                "{ sleep_in = \"check_idle\", sleep_ms = 600000 }",
            ),
            plugin_toml("crashy", &p, "2s", "{ panic_in = \"check_idle\" }"),
            plugin_toml("hooks", &p, "2s", "{ panic_in = \"on_event\" }"),
        ]
        .join("\n")
    })
    .await;
    node.ok("drain", json!({})).await;
    let disabled = node
        .events
        .wait("a plugin_disabled event for the hung plugin", |e| {
            e.kind() == "plugin_disabled"
        })
        .await;
    assert_eq!(
        disabled.subject,
        format!("ebb.event.{NODE}.plugin_disabled")
    );
    let event = disabled.body;
    assert_eq!(event["kind"], "plugin_disabled", "{event}");
    assert_eq!(event["node"], NODE, "{event}");
    assert_eq!(event["name"], "slow", "{event}");
    assert_eq!(
        event["error"], "no answer within 200ms, 3 times in a row",
        "{event}"
    );
    assert_eq!(event["blocks_drains"], true, "{event}");
    let status = node
        .wait_status("the hung plugin to be disabled", |s| {
            blocker(s, "slow").is_some_and(|m| {
                m.starts_with("disabled: no answer within 200ms, 3 times in a row")
            })
        })
        .await;
    let crashy = blocker(&status, "crashy").unwrap();
    assert!(
        crashy.starts_with("error: the plugin panicked: test plugin: panic in check_idle"),
        "{crashy}"
    );
    // A panicking hook costs nothing: that plugin's checks still answer idle.
    assert_eq!(blocker(&status, "hooks"), None, "{status}");
    let healthy: Vec<bool> = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["healthy"] == true)
        .collect();
    assert_eq!(healthy, vec![false, false, true]);
    // The agent said so in its log, and it keeps serving: HTTP through haproxy, commands over NATS.
    let line = tokio::task::block_in_place(|| {
        node.agent.wait_for_log(T, |l| {
            support::log_message(l)
                .is_some_and(|m| m.starts_with("plugin slow (") && m.contains(") disabled: "))
        })
    });
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(
        node.healthz().await,
        503,
        "a draining node fails its health check, from haproxy"
    );
    node.undrain().await;
    assert_eq!(node.healthz().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_drain_waits_for_the_alb_target_to_leave_its_group_against_moto() {
    let moto_server = Moto::start().await;
    let url = moto_server.url.clone();
    let arn = tokio::task::block_in_place(|| moto(&url, &["setup"]));
    let node = start_node(|_| {
        plugin_toml(
            "alb",
            &cdylib("ebb_plugin_alb"),
            "5s",
            &format!(
                "{{ mode = \"api\", target_group_arns = [{}], target_id = \"10.0.0.5\", port = 8080, \
                 region = \"us-east-1\", endpoint = {}, poll_interval = \"100ms\", \
                 access_key_id = \"testing\", secret_access_key = \"testing\" }}",
                toml_string(&arn),
                toml_string(&url)
            ),
        )
    })
    .await;
    assert_eq!(
        tokio::task::block_in_place(|| moto(&url, &["state", &arn])),
        "healthy"
    );
    node.ok("drain", json!({})).await;
    node.wait_status("drained", |s| s["state"] == "drained")
        .await;
    assert_eq!(
        tokio::task::block_in_place(|| moto(&url, &["state", &arn])),
        "unused"
    );
    node.ok("undrain", json!({})).await;
    // The undrained hook registers the target again (delivered in the background).
    wait_for_async(T, "the target to be registered again", || {
        let url = url.clone();
        let arn = arn.clone();
        async move {
            let state = tokio::task::spawn_blocking(move || moto(&url, &["state", &arn]))
                .await
                .ok()?;
            (state == "healthy").then_some(())
        }
    })
    .await;
}
