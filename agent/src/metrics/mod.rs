//! Prometheus metrics of the agent (`[metrics]`, README.md "Metrics"), served by [`server`].
//!
//! The node's facts have one owner, the node's task: nothing here reaches into it. Counters and
//! histograms are derived from the events the node already emits ([`Metrics::record`], fed by a
//! tee of the node's event channel in main.rs); gauges are set at scrape time from a `status`
//! probe ([`Metrics::observe`]), the publisher's report and the NATS connection. The plugin host
//! reports each idle check through [`crate::plugins::CheckObserver`], which [`Metrics`] implements.

pub mod server;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ebb_sdk::event::{Event, EventBody};
use ebb_sdk::status::{NodeState, StatusResult};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::plugins::{CheckObserver, CheckOutcome};

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every family the agent exports, as named in `# TYPE` lines. A family without samples yet (no
/// plugin checked, no event of a kind) is left out of a scrape.
pub const FAMILIES: &[&str] = &[
    "ebb_build",
    "ebb_events",
    "ebb_reload_duration_seconds",
    "ebb_reloads",
    "ebb_drain_duration_seconds",
    "ebb_drains",
    "ebb_connections_cut",
    "ebb_node_up",
    "ebb_node_state",
    "ebb_draining",
    "ebb_old_workers",
    "ebb_old_worker_connections",
    "ebb_haproxy_restarts",
    "ebb_outbox_depth",
    "ebb_nats_connected",
    "ebb_plugin_check_duration_seconds",
    "ebb_plugin_check_errors",
    "ebb_plugin_healthy",
];

/// Reloads take from tens of milliseconds (a small config) to the startup timeout (30 s default).
const RELOAD_BUCKETS: [f64; 11] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Drains last from the min period (30 s default) to the longest connections a node holds.
const DRAIN_BUCKETS: [f64; 11] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];
/// An idle check answers in microseconds to its timeout (2 s default).
const PLUGIN_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForcedLabel {
    forced: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

fn reload_histogram() -> Histogram {
    Histogram::new(RELOAD_BUCKETS)
}

fn drain_histogram() -> Histogram {
    Histogram::new(DRAIN_BUCKETS)
}

fn plugin_histogram() -> Histogram {
    Histogram::new(PLUGIN_BUCKETS)
}

/// The agent's metric families, all prefixed `ebb_`. Cheap to share (`Arc`); every method takes
/// `&self` and none blocks for long.
pub struct Metrics {
    registry: Registry,
    events: Family<KindLabel, Counter>,
    reload_seconds: Histogram,
    reloads: Family<ResultLabel, Counter>,
    drain_seconds: Histogram,
    drains: Family<ForcedLabel, Counter>,
    connections_cut: Counter,
    node_up: Gauge,
    node_state: Family<StateLabel, Gauge>,
    draining: Gauge,
    old_workers: Gauge,
    old_worker_connections: Gauge,
    haproxy_restarts: Counter,
    outbox_depth: Gauge,
    nats_connected: Gauge,
    plugin_check_seconds: Family<PluginLabel, Histogram, fn() -> Histogram>,
    plugin_check_errors: Family<PluginLabel, Counter>,
    plugin_healthy: Family<PluginLabel, Gauge>,
    /// The last `drained` counted: a drained node's `drained` goes out at least once, and a
    /// repeat within this agent must not count as a second drain.
    last_drained: Mutex<Option<String>>,
    /// Connections `worker_exited` reported cut since the last `stopped`: `stopped` counts them
    /// again (they were cut by its stop), so only the rest of its count is new.
    cut_since_stopped: AtomicU64,
    /// `status.haproxy.restarts` at the last probe, for the counter's increment.
    restarts_seen: AtomicU32,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ebb");
        let m = Metrics {
            registry: Registry::default(),
            events: Family::default(),
            reload_seconds: reload_histogram(),
            reloads: Family::default(),
            drain_seconds: drain_histogram(),
            drains: Family::default(),
            connections_cut: Counter::default(),
            node_up: Gauge::default(),
            node_state: Family::default(),
            draining: Gauge::default(),
            old_workers: Gauge::default(),
            old_worker_connections: Gauge::default(),
            haproxy_restarts: Counter::default(),
            outbox_depth: Gauge::default(),
            nats_connected: Gauge::default(),
            plugin_check_seconds: Family::new_with_constructor(plugin_histogram),
            plugin_check_errors: Family::default(),
            plugin_healthy: Family::default(),
            last_drained: Mutex::new(None),
            cut_since_stopped: AtomicU64::new(0),
            restarts_seen: AtomicU32::new(0),
        };
        registry.register(
            "build",
            "The agent's version",
            Info::new(VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        registry.register(
            "events",
            "Events the node emitted, by kind (docs/PROTOCOL.md)",
            m.events.clone(),
        );
        registry.register(
            "reload_duration_seconds",
            "Duration of successful reloads, from the request to the new worker answering (reloaded's duration_ms)",
            m.reload_seconds.clone(),
        );
        registry.register(
            "reloads",
            "Reloads by result: ok (reloaded) or failed (reload_failed; the running worker was left untouched)",
            m.reloads.clone(),
        );
        registry.register(
            "drain_duration_seconds",
            "Duration of finished drains, from drain_started to drained",
            m.drain_seconds.clone(),
        );
        registry.register(
            "drains",
            "Finished drains by outcome: forced=\"true\" when declared drained at the deadline despite blockers",
            m.drains.clone(),
        );
        registry.register(
            "connections_cut",
            "Client connections cut: old workers hard-stopped (worker_exited) and stops that had to kill (stopped)",
            m.connections_cut.clone(),
        );
        registry.register(
            "node_up",
            "1 when the node's task answered the last scrape's status probe within 1s; 0 and the gauges below keep their last values otherwise",
            m.node_up.clone(),
        );
        registry.register(
            "node_state",
            "The node's lifecycle state: 1 for the current one, 0 for the others",
            m.node_state.clone(),
        );
        registry.register(
            "draining",
            "1 while a drain is on (draining or drained), 0 otherwise",
            m.draining.clone(),
        );
        registry.register(
            "old_workers",
            "Displaced HAProxy workers still finishing their connections",
            m.old_workers.clone(),
        );
        registry.register(
            "old_worker_connections",
            "Open client connections held by old workers, all together",
            m.old_worker_connections.clone(),
        );
        registry.register(
            "haproxy_restarts",
            "Restarts of HAProxy after its current worker crashed (status haproxy.restarts)",
            m.haproxy_restarts.clone(),
        );
        registry.register(
            "outbox_depth",
            "Events in the outbox, waiting to be accepted by NATS",
            m.outbox_depth.clone(),
        );
        registry.register(
            "nats_connected",
            "1 while the agent is connected to NATS",
            m.nats_connected.clone(),
        );
        registry.register(
            "plugin_check_duration_seconds",
            "Duration of each plugin's idle checks, timeouts included",
            m.plugin_check_seconds.clone(),
        );
        registry.register(
            "plugin_check_errors",
            "Idle checks that gave no verdict: an error, a timeout, or a plugin not loaded or disabled",
            m.plugin_check_errors.clone(),
        );
        registry.register(
            "plugin_healthy",
            "1 when the plugin is loaded, not disabled, and its last call answered",
            m.plugin_healthy.clone(),
        );
        for state in NodeState::ALL {
            let _ = m.node_state.get_or_create(&StateLabel {
                state: state.as_str(),
            });
        }
        for result in ["ok", "failed"] {
            let _ = m.reloads.get_or_create(&ResultLabel { result });
        }
        for forced in ["true", "false"] {
            let _ = m.drains.get_or_create(&ForcedLabel { forced });
        }
        Metrics { registry, ..m }
    }

    /// Counts what one event of the node says. Pure bookkeeping: it never waits.
    pub fn record(&self, event: &Event) {
        self.events
            .get_or_create(&KindLabel {
                kind: event.body.kind(),
            })
            .inc();
        match &event.body {
            EventBody::Reloaded { duration_ms, .. } => {
                self.reload_seconds.observe(seconds(*duration_ms));
                self.reloads
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
            }
            EventBody::ReloadFailed { .. } => {
                self.reloads
                    .get_or_create(&ResultLabel { result: "failed" })
                    .inc();
            }
            EventBody::Drained {
                drain_id,
                duration_ms,
                forced,
                ..
            } => {
                let mut last = self
                    .last_drained
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if last.as_deref() == Some(drain_id.as_str()) {
                    return;
                }
                *last = Some(drain_id.clone());
                self.drain_seconds.observe(seconds(*duration_ms));
                self.drains
                    .get_or_create(&ForcedLabel {
                        forced: if *forced { "true" } else { "false" },
                    })
                    .inc();
            }
            EventBody::Undrained { .. } => {
                // The next drain may reuse the id: it is a new drain.
                *self
                    .last_drained
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
            }
            EventBody::WorkerExited {
                connections_cut, ..
            } => {
                self.connections_cut.inc_by(*connections_cut);
                self.cut_since_stopped
                    .fetch_add(*connections_cut, Ordering::Relaxed);
            }
            EventBody::Stopped { connections_cut } => {
                let seen = self.cut_since_stopped.swap(0, Ordering::Relaxed);
                self.connections_cut
                    .inc_by(connections_cut.saturating_sub(seen));
            }
            _ => {}
        }
    }

    /// Sets the gauges from a `status` result (`None`: the node did not answer, so the gauges
    /// keep their last values and `ebb_node_up` says 0).
    pub fn observe(&self, status: Option<&StatusResult>) {
        let Some(status) = status else {
            self.node_up.set(0);
            return;
        };
        self.node_up.set(1);
        for state in NodeState::ALL {
            self.node_state
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(i64::from(state == status.state));
        }
        self.draining.set(i64::from(matches!(
            status.state,
            NodeState::Draining | NodeState::Drained
        )));
        self.old_workers.set(gauge(status.old_workers.len() as u64));
        self.old_worker_connections.set(gauge(
            status.old_workers.iter().map(|w| w.connections).sum(),
        ));
        let restarts = status.haproxy.restarts;
        let before = self.restarts_seen.swap(restarts, Ordering::Relaxed);
        self.haproxy_restarts
            .inc_by(u64::from(restarts.saturating_sub(before)));
        for p in &status.plugins {
            self.plugin_healthy
                .get_or_create(&PluginLabel {
                    plugin: p.name.clone(),
                })
                .set(i64::from(p.healthy));
        }
        if let Some(depth) = status.outbox_depth {
            self.outbox_depth.set(gauge(depth));
        }
    }

    /// The publisher's outbox depth, newer than the one in a `status`.
    pub fn observe_outbox(&self, depth: u64) {
        self.outbox_depth.set(gauge(depth));
    }

    pub fn observe_nats(&self, connected: bool) {
        self.nats_connected.set(i64::from(connected));
    }

    /// The registry as OpenMetrics text, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String cannot fail; should an encoder ever refuse, say so and keep
            // the format valid.
            out.clear();
            let _ = writeln!(out, "# metrics could not be encoded: {e}\n# EOF");
        }
        out
    }
}

impl CheckObserver for Metrics {
    fn check_done(&self, plugin: &str, took: Duration, outcome: CheckOutcome) {
        let label = PluginLabel {
            plugin: plugin.to_string(),
        };
        self.plugin_check_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if outcome == CheckOutcome::Failed {
            self.plugin_check_errors.get_or_create(&label).inc();
        }
    }
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The metric families a scrape shows, by name as Prometheus queries them (a histogram `h` as
/// `h_bucket`, `h_count` and `h_sum`; a counter `c` as `c_total`), read from `text`'s `# TYPE`
/// lines. For checks of dashboards and alerts against what the agent exports.
pub fn sample_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#") || words.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

#[cfg(test)]
mod tests;
