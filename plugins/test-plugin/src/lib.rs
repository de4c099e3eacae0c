//! ebb's test plugin: behaves, or misbehaves, as its config says, so the host's tests can exercise every
//! path (panics in each entry point, hangs, errors, bad configs) against a real cdylib.
//!
//! Config (every key optional):
//! - `verdict`: `"idle"` (default) | `"busy"` | `"error"`, with `message`;
//! - `busy_file`: busy while this file exists (overrides `verdict`);
//! - `echo_events`: busy with the list of hook events received so far (`events: drain_started:d1,…`);
//! - `panic_in`: `"create"` | `"check_idle"` | `"on_event"` | `"destroy"`;
//! - `sleep_in`: `"create"` | `"check_idle"` | `"on_event"`, for `sleep_ms`;
//! - `fail_event`: the hook event to fail with an error.
//!
//! Unknown keys are refused, as a real plugin should.

use std::path::PathBuf;
use std::time::Duration;

use ebb_sdk::plugin::{CheckContext, HookEvent, Plugin, PluginResult, Verdict};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    verdict: Option<String>,
    message: String,
    busy_file: Option<PathBuf>,
    echo_events: bool,
    panic_in: Option<String>,
    sleep_in: Option<String>,
    sleep_ms: u64,
    fail_event: Option<String>,
}

struct TestPlugin {
    config: Config,
    events: Vec<String>,
}

impl TestPlugin {
    fn misbehave(&self, at: &str) {
        if self.config.sleep_in.as_deref() == Some(at) {
            std::thread::sleep(Duration::from_millis(self.config.sleep_ms));
        }
        if self.config.panic_in.as_deref() == Some(at) {
            panic!("test plugin: panic in {at} as configured");
        }
    }
}

impl Plugin for TestPlugin {
    const NAME: &'static str = "test";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn create(config: serde_json::Value) -> PluginResult<Self> {
        let config: Config = if config.is_null() {
            Config::default()
        } else {
            serde_json::from_value(config).map_err(|e| format!("invalid config: {e}"))?
        };
        if let Some(v) = &config.verdict {
            if !["idle", "busy", "error"].contains(&v.as_str()) {
                return Err(
                    format!("invalid config: verdict {v:?} must be idle, busy or error").into(),
                );
            }
        }
        let plugin = TestPlugin {
            config,
            events: Vec::new(),
        };
        plugin.misbehave("create");
        Ok(plugin)
    }

    fn check_idle(&mut self, ctx: &CheckContext) -> PluginResult<Verdict> {
        self.misbehave("check_idle");
        if let Some(f) = &self.config.busy_file {
            return Ok(if f.exists() {
                Verdict::Busy(format!("{} exists", f.display()))
            } else {
                Verdict::Idle
            });
        }
        if self.config.echo_events {
            return Ok(Verdict::Busy(format!(
                "events: {} (timeout_ms {})",
                self.events.join(","),
                ctx.timeout_ms
            )));
        }
        match self.config.verdict.as_deref() {
            Some("busy") => Ok(Verdict::Busy(self.config.message.clone())),
            Some("error") => Err(self.config.message.clone().into()),
            _ => Ok(Verdict::Idle),
        }
    }

    fn on_event(&mut self, event: &HookEvent) -> PluginResult<()> {
        self.misbehave("on_event");
        let label = match event {
            HookEvent::DrainStarted(e) => format!("drain_started:{}", e.drain_id),
            HookEvent::Reloaded(e) => format!("reloaded:draining={}", e.draining),
            HookEvent::Drained(e) => format!("drained:{}", e.drain_id),
            HookEvent::Undrained(e) => format!("undrained:{}", e.drain_id),
            HookEvent::Stopping(_) => "stopping".to_string(),
            HookEvent::Unknown => "unknown".to_string(),
        };
        self.events.push(label);
        if self.config.fail_event.as_deref() == Some(event.name()) {
            return Err(format!("{} failed as configured", event.name()).into());
        }
        Ok(())
    }
}

impl Drop for TestPlugin {
    fn drop(&mut self) {
        if self.config.panic_in.as_deref() == Some("destroy") {
            panic!("test plugin: panic in destroy as configured");
        }
    }
}

ebb_sdk::export_plugin!(TestPlugin);
