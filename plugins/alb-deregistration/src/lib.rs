//! ebb plugin `alb-deregistration`: a node behind an AWS ALB/NLB is not drained while its load balancer may
//! still send it requests.
//!
//! **Timer mode** (the default) needs no AWS access: the plugin is busy until `deregistration_delay` has
//! passed since the drain started ("212s of deregistration delay left"). Something else (an ASG lifecycle
//! hook, the orchestrator) deregisters the target; set the delay to the target group's.
//!
//! **API mode** deregisters the target itself when the drain starts (DeregisterTargets in every listed
//! target group), then polls DescribeTargetHealth until the target is `unused` or gone from each, and
//! registers it again on undrain. It uses the AWS SDK for Rust on a small tokio runtime of its own (never the
//! agent's), with the default credential chain (environment, profile, web identity, ECS, IMDS).
//!
//! ```toml
//! [[plugins]]
//! name = "alb"
//! path = "/usr/lib/ebb/plugins/libebb_plugin_alb.so"
//! timeout = "2s"
//! config = { deregistration_delay = "300s" }          # timer mode
//! # config = { mode = "api", target_group_arns = ["arn:aws:elasticloadbalancing:…"], target_id = "i-0abc", port = 80 }
//! ```
//! See docs/PLUGINS.md for every key.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_elasticloadbalancingv2 as elbv2;
use ebb_sdk::plugin::{CheckContext, DrainStarted, Plugin, PluginResult, Undrained, Verdict};
use elbv2::error::DisplayErrorContext;
use elbv2::types::{TargetDescription, TargetHealthStateEnum};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    Timer,
    Api,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    mode: Option<Mode>,
    /// Timer mode: how long after the drain starts the target counts as deregistered.
    #[serde(default)]
    deregistration_delay: Option<String>,
    #[serde(default)]
    target_group_arn: Option<String>,
    #[serde(default)]
    target_group_arns: Vec<String>,
    #[serde(default)]
    target_id: Option<String>,
    #[serde(default)]
    port: Option<i32>,
    #[serde(default)]
    availability_zone: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    poll_interval: Option<String>,
    #[serde(default)]
    api_timeout: Option<String>,
    #[serde(default)]
    register_on_undrain: Option<bool>,
    #[serde(default)]
    access_key_id: Option<String>,
    #[serde(default)]
    secret_access_key: Option<String>,
}

fn duration(key: &str, value: Option<&str>) -> Result<Option<Duration>, String> {
    value
        .map(|v| {
            humantime::parse_duration(v).map_err(|e| {
                format!("invalid config: {key} = {v:?} is not a duration like \"300s\": {e}")
            })
        })
        .transpose()
}

pub enum Alb {
    Timer(Timer),
    Api(Box<Api>),
}

impl Plugin for Alb {
    const NAME: &'static str = "alb-deregistration";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn create(config: serde_json::Value) -> PluginResult<Self> {
        if config.is_null() {
            return Err(
                "missing config: set config = { deregistration_delay = \"300s\" } (timer mode) or \
                        { mode = \"api\", target_group_arns = [\"arn:…\"], target_id = \"i-…\" }"
                    .into(),
            );
        }
        let config: Config =
            serde_json::from_value(config).map_err(|e| format!("invalid config: {e}"))?;
        let mode = config.mode.unwrap_or(Mode::Timer);
        Ok(match mode {
            Mode::Timer => Alb::Timer(Timer::from_config(&config)?),
            Mode::Api => Alb::Api(Box::new(Api::from_config(config)?)),
        })
    }

    fn check_idle(&mut self, ctx: &CheckContext) -> PluginResult<Verdict> {
        match self {
            Alb::Timer(t) => Ok(t.check(ctx, Instant::now())),
            Alb::Api(a) => Ok(a.check(ctx)?),
        }
    }

    fn drain_started(&mut self, event: &DrainStarted) -> PluginResult<()> {
        match self {
            Alb::Timer(t) => t.started = Some((event.drain_id.clone(), Instant::now())),
            Alb::Api(a) => a.start_drain(&event.drain_id),
        }
        Ok(())
    }

    fn undrained(&mut self, _event: &Undrained) -> PluginResult<()> {
        match self {
            Alb::Timer(t) => {
                t.started = None;
                Ok(())
            }
            Alb::Api(a) => Ok(a.undrain()?),
        }
    }
}

ebb_sdk::export_plugin!(Alb);

/// Timer mode.
pub struct Timer {
    delay: Duration,
    /// The drain id and when its `drain_started` arrived.
    started: Option<(String, Instant)>,
}

impl Timer {
    fn from_config(c: &Config) -> Result<Timer, String> {
        let api_keys = c.target_group_arn.is_some()
            || !c.target_group_arns.is_empty()
            || c.target_id.is_some()
            || c.endpoint.is_some();
        if api_keys {
            return Err(
                "invalid config: target_group_arns, target_id and endpoint are for API mode; \
                        set mode = \"api\", or remove them for timer mode"
                    .into(),
            );
        }
        let delay = duration("deregistration_delay", c.deregistration_delay.as_deref())?.ok_or(
            "invalid config: timer mode needs deregistration_delay (the target group's, e.g. \"300s\")",
        )?;
        Ok(Timer {
            delay,
            started: None,
        })
    }

    /// Busy until the delay has passed since the drain started. The agent's `elapsed_ms` comes first: it
    /// survives agent restarts, which do not send `drain_started` again.
    fn check(&self, ctx: &CheckContext, now: Instant) -> Verdict {
        let elapsed = match (ctx.elapsed_ms, &self.started) {
            (Some(ms), _) => Duration::from_millis(ms),
            (None, Some((_, at))) => now.saturating_duration_since(*at),
            (None, None) => return Verdict::Busy("waiting for the drain to start".into()),
        };
        match self.delay.checked_sub(elapsed) {
            Some(left) if !left.is_zero() => {
                let secs = left.as_millis().div_ceil(1000);
                Verdict::Busy(format!("{secs}s of deregistration delay left"))
            }
            _ => Verdict::Idle,
        }
    }
}

/// API mode.
pub struct Api {
    // Dropped last (after the client), off the agent's runtime: it is the plugin's own.
    client: elbv2::Client,
    target_groups: Vec<String>,
    target: TargetDescription,
    target_label: String,
    poll_interval: Duration,
    api_timeout: Duration,
    register_on_undrain: bool,
    state: Arc<Mutex<DrainState>>,
    task: Option<tokio::task::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

#[derive(Debug, Clone, Default)]
struct DrainState {
    drain_id: Option<String>,
    phase: Phase,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Serving,
    /// Working on it: the message says what is left.
    Busy(String),
    /// An API call failed; retried on the next poll.
    Failed(String),
    /// The target is unused or gone in every target group.
    Done,
}

impl Api {
    fn from_config(c: Config) -> Result<Api, String> {
        let mut target_groups = c.target_group_arns.clone();
        target_groups.extend(c.target_group_arn.clone());
        if target_groups.is_empty() {
            return Err("invalid config: API mode needs target_group_arns = [\"arn:aws:elasticloadbalancing:…\"]".into());
        }
        let target_id = c
            .target_id
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or("invalid config: API mode needs target_id (the instance id, IP address or Lambda ARN registered in the target groups)")?;
        if c.deregistration_delay.is_some() {
            return Err("invalid config: deregistration_delay is for timer mode; in API mode the plugin waits \
                        for the target group itself (remove it)"
                .into());
        }
        if c.access_key_id.is_some() != c.secret_access_key.is_some() {
            return Err("invalid config: set both access_key_id and secret_access_key, or neither (and use the \
                        default credential chain)"
                .into());
        }
        let poll_interval = duration("poll_interval", c.poll_interval.as_deref())?
            .unwrap_or(Duration::from_secs(5));
        let api_timeout =
            duration("api_timeout", c.api_timeout.as_deref())?.unwrap_or(Duration::from_secs(5));
        let target = TargetDescription::builder()
            .id(&target_id)
            .set_port(c.port)
            .set_availability_zone(c.availability_zone.clone())
            .build();
        let target_label = match c.port {
            Some(p) => format!("{target_id}:{p}"),
            None => target_id.clone(),
        };

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ebb-plugin-alb")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the plugin's runtime: {e}"))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_timeout(api_timeout)
                    .build(),
            );
        if let Some(region) = c.region.clone() {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some(endpoint) = c.endpoint.clone() {
            loader = loader.endpoint_url(endpoint);
        }
        if let (Some(id), Some(secret)) = (c.access_key_id.clone(), c.secret_access_key.clone()) {
            loader = loader.credentials_provider(elbv2::config::Credentials::new(
                id,
                secret,
                None,
                None,
                "ebb-config",
            ));
        }
        let sdk_config = runtime.block_on(loader.load());
        if sdk_config.region().is_none() {
            return Err("no AWS region: set region = \"eu-west-1\" in the plugin config, or AWS_REGION for the agent".into());
        }
        let client = elbv2::Client::new(&sdk_config);
        Ok(Api {
            client,
            target_groups,
            target,
            target_label,
            poll_interval,
            api_timeout,
            register_on_undrain: c.register_on_undrain.unwrap_or(true),
            state: Arc::new(Mutex::new(DrainState::default())),
            task: None,
            runtime: Some(runtime),
        })
    }

    fn check(&mut self, ctx: &CheckContext) -> Result<Verdict, String> {
        // A drain the plugin never heard of (the agent restarted mid-drain): start on it now.
        if let Some(id) = &ctx.drain_id {
            let known = self
                .state
                .lock()
                .map(|s| s.drain_id.clone())
                .unwrap_or_default();
            if known.as_deref() != Some(id.as_str()) {
                self.start_drain(id);
            }
        }
        let state = self.state.lock().map(|s| s.clone()).unwrap_or_default();
        match state.phase {
            Phase::Serving => Ok(Verdict::Busy("waiting for the drain to start".into())),
            Phase::Busy(message) => Ok(Verdict::Busy(message)),
            Phase::Failed(message) => Err(message),
            Phase::Done => Ok(Verdict::Idle),
        }
    }

    /// Starts deregistering and watching, in the background on the plugin's runtime.
    fn start_drain(&mut self, drain_id: &str) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Ok(mut s) = self.state.lock() {
            s.drain_id = Some(drain_id.to_string());
            s.phase = Phase::Busy(format!(
                "deregistering target {} from {} target group(s)",
                self.target_label,
                self.target_groups.len()
            ));
        }
        let Some(runtime) = &self.runtime else { return };
        let work = Drainer {
            client: self.client.clone(),
            target_groups: self.target_groups.clone(),
            target: self.target.clone(),
            label: self.target_label.clone(),
            poll_interval: self.poll_interval,
            state: self.state.clone(),
        };
        self.task = Some(runtime.spawn(work.run()));
    }

    /// Stops watching and registers the target again (waits for that, within `api_timeout` per group).
    fn undrain(&mut self) -> Result<(), String> {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Ok(mut s) = self.state.lock() {
            *s = DrainState::default();
        }
        if !self.register_on_undrain {
            return Ok(());
        }
        let Some(runtime) = &self.runtime else {
            return Ok(());
        };
        let mut failures = Vec::new();
        for tg in &self.target_groups {
            let call = self
                .client
                .register_targets()
                .target_group_arn(tg)
                .targets(self.target.clone())
                .send();
            match runtime.block_on(async { tokio::time::timeout(self.api_timeout, call).await }) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failures.push(format!("{tg}: {}", DisplayErrorContext(&e))),
                Err(_) => failures.push(format!("{tg}: no answer within {:?}", self.api_timeout)),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "RegisterTargets of {} failed in {}; register it by hand",
                self.target_label,
                failures.join("; ")
            ))
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_millis(500));
        }
    }
}

/// The background half of a drain.
struct Drainer {
    client: elbv2::Client,
    target_groups: Vec<String>,
    target: TargetDescription,
    label: String,
    poll_interval: Duration,
    state: Arc<Mutex<DrainState>>,
}

impl Drainer {
    fn set(&self, phase: Phase) {
        if let Ok(mut s) = self.state.lock() {
            s.phase = phase;
        }
    }

    async fn run(self) {
        // Deregister from every group, retrying until each has accepted.
        let mut pending: Vec<String> = self.target_groups.clone();
        while !pending.is_empty() {
            let mut failed = Vec::new();
            for tg in pending {
                let result = self
                    .client
                    .deregister_targets()
                    .target_group_arn(&tg)
                    .targets(self.target.clone())
                    .send()
                    .await;
                match result {
                    Ok(_) => {}
                    // Not registered there (any more): nothing to deregister.
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_invalid_target_exception()) => {}
                    Err(e) => {
                        self.set(Phase::Failed(format!(
                            "DeregisterTargets of {} in {tg} failed (retrying every {:?}): {}",
                            self.label,
                            self.poll_interval,
                            DisplayErrorContext(&e)
                        )));
                        failed.push(tg);
                    }
                }
            }
            pending = failed;
            if !pending.is_empty() {
                tokio::time::sleep(self.poll_interval).await;
            }
        }
        // Then watch until the target is unused or gone everywhere.
        loop {
            match self.describe().await {
                Ok(None) => {
                    self.set(Phase::Done);
                    return;
                }
                Ok(Some(message)) => self.set(Phase::Busy(message)),
                Err(message) => self.set(Phase::Failed(message)),
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// `None` when done; else what is left.
    async fn describe(&self) -> Result<Option<String>, String> {
        let mut left = Vec::new();
        for tg in &self.target_groups {
            let result = self
                .client
                .describe_target_health()
                .target_group_arn(tg)
                .targets(self.target.clone())
                .send()
                .await;
            let out = match result {
                Ok(out) => out,
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_invalid_target_exception()) =>
                {
                    continue
                }
                Err(e) => {
                    return Err(format!(
                        "DescribeTargetHealth of {} in {tg} failed (retrying every {:?}): {}",
                        self.label,
                        self.poll_interval,
                        DisplayErrorContext(&e)
                    ))
                }
            };
            for d in out.target_health_descriptions() {
                let Some(health) = d.target_health() else {
                    continue;
                };
                match health.state() {
                    Some(TargetHealthStateEnum::Unused) | None => {}
                    Some(state) => {
                        let reason = health
                            .reason()
                            .map(|r| format!(" ({})", r.as_str()))
                            .unwrap_or_default();
                        left.push(format!("{} in {}{reason}", state.as_str(), short_tg(tg)));
                    }
                }
            }
        }
        Ok((!left.is_empty()).then(|| format!("target {} is {}", self.label, left.join(", "))))
    }
}

/// `targetgroup/web/9185c8de71bbe204` from a target group ARN: enough to tell groups apart.
fn short_tg(arn: &str) -> &str {
    arn.rsplit_once(':').map(|(_, r)| r).unwrap_or(arn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn timer(delay_s: u64) -> Timer {
        Timer {
            delay: Duration::from_secs(delay_s),
            started: None,
        }
    }

    fn ctx(elapsed_ms: Option<u64>) -> CheckContext {
        CheckContext {
            elapsed_ms,
            timeout_ms: 2000,
            ..Default::default()
        }
    }

    #[test]
    fn timer_mode_counts_down_from_the_drain_start() {
        let t = timer(300);
        let now = Instant::now();
        assert_eq!(
            t.check(&ctx(Some(88_000)), now),
            Verdict::Busy("212s of deregistration delay left".into())
        );
        // Partial seconds round up: never "0s left" while still busy.
        assert_eq!(
            t.check(&ctx(Some(299_001)), now),
            Verdict::Busy("1s of deregistration delay left".into())
        );
        assert_eq!(t.check(&ctx(Some(300_000)), now), Verdict::Idle);
        assert_eq!(t.check(&ctx(Some(900_000)), now), Verdict::Idle);
    }

    #[test]
    fn timer_mode_falls_back_to_the_hook_time() {
        let mut t = timer(300);
        let now = Instant::now();
        assert_eq!(
            t.check(&ctx(None), now),
            Verdict::Busy("waiting for the drain to start".into())
        );
        t.started = Some(("d".into(), now));
        assert_eq!(
            t.check(&ctx(None), now + Duration::from_secs(100)),
            Verdict::Busy("200s of deregistration delay left".into())
        );
        assert_eq!(
            t.check(&ctx(None), now + Duration::from_secs(300)),
            Verdict::Idle
        );
    }

    #[test]
    fn configs_are_checked() {
        let err = |c: serde_json::Value| match Alb::create(c) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        };
        assert!(err(json!(null)).contains("missing config"));
        assert!(err(json!({})).contains("needs deregistration_delay"));
        assert!(err(json!({"deregistration_delay": "5 minutes-ish"})).contains("not a duration"));
        assert!(
            err(json!({"deregistration_delay": "300s", "target_id": "i-1"}))
                .contains("mode = \"api\"")
        );
        assert!(err(json!({"mode": "api", "target_id": "i-1"})).contains("target_group_arns"));
        assert!(err(json!({"mode": "api", "target_group_arns": ["arn"]})).contains("target_id"));
        assert!(err(json!({"mode": "api", "target_group_arns": ["arn"], "target_id": "i-1", "access_key_id": "a"}))
            .contains("both access_key_id and secret_access_key"));
        assert!(err(json!({"mode": "lambda"})).contains("invalid config"));
        assert!(err(json!({"deregistration_delay": "300s", "colour": 1}))
            .contains("unknown field `colour`"));
        assert!(matches!(
            Alb::create(json!({"deregistration_delay": "300s"})),
            Ok(Alb::Timer(_))
        ));
    }

    #[test]
    fn api_mode_builds_a_client_without_network() {
        let alb = Alb::create(json!({
            "mode": "api", "target_group_arns": ["arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/abc"],
            "target_id": "10.0.0.5", "port": 80, "region": "eu-west-1", "endpoint": "http://127.0.0.1:9",
            "access_key_id": "a", "secret_access_key": "b"
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let Alb::Api(mut api) = alb else {
            panic!("not API mode")
        };
        assert_eq!(api.target_label, "10.0.0.5:80");
        assert_eq!(
            api.check(&ctx(None)),
            Ok(Verdict::Busy("waiting for the drain to start".into()))
        );
        assert_eq!(
            short_tg("arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/abc"),
            "targetgroup/web/abc"
        );
    }
}
