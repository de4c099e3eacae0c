//! The plugin checker: a background service that asks the plugins' idle checks about the current
//! drain, again and again while there is one, and reports each round tagged with the drain it
//! was asked for (a late answer about an ended drain is then dropped by the node).

use std::time::{Duration, SystemTime};

use ebb_sdk::plugin::{CheckContext, Verdict};
use tokio::sync::watch;

use crate::drain::unix_ms;
use crate::plugins::PluginHost;

/// One round of verdicts, for drain `drain_id`.
#[derive(Debug, Clone)]
pub struct Verdicts {
    pub drain_id: String,
    pub verdicts: Vec<(String, Verdict)>,
}

/// The running checker. Dropping it stops it.
pub struct Checker {
    target: watch::Sender<Option<CheckContext>>,
}

impl Checker {
    /// Starts the service (a no-op without plugins); it asks nothing until it has a target.
    pub fn spawn<F>(plugins: PluginHost, interval: Duration, report: F) -> Checker
    where
        F: Fn(Verdicts) -> bool + Send + 'static,
    {
        let (target, rx) = watch::channel(None);
        if !plugins.is_empty() {
            tokio::spawn(run(plugins, interval, rx, report));
        }
        Checker { target }
    }

    /// Asks about this drain from now on (`None`: stop asking).
    pub fn target(&self, ctx: Option<CheckContext>) {
        self.target.send_replace(ctx);
    }
}

async fn run<F>(
    plugins: PluginHost,
    interval: Duration,
    mut target: watch::Receiver<Option<CheckContext>>,
    report: F,
) where
    F: Fn(Verdicts) -> bool,
{
    // Plugin calls cross threads and may do real work: no need to ask 100 times a second.
    let interval = interval.max(Duration::from_millis(100));
    loop {
        let ctx = target.borrow_and_update().clone();
        let Some(mut ctx) = ctx else {
            if target.changed().await.is_err() {
                return;
            }
            continue;
        };
        if let Some(started) = ctx.started_at_ms {
            ctx.elapsed_ms = Some(unix_ms(SystemTime::now()).saturating_sub(started));
        }
        // The host runs each call off the runtime with its timeout: a hung plugin delays itself.
        let verdicts = plugins.check_idle(&ctx).await;
        let round = Verdicts {
            drain_id: ctx.drain_id.clone().unwrap_or_default(),
            verdicts,
        };
        if !report(round) {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            changed = target.changed() => if changed.is_err() { return },
        }
    }
}
