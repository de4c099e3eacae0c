//! `ebb ctl drain --wait`: send the drain, then follow each node until it is drained, with a live
//! view of every node's state and blockers, and a summary at the end.
//!
//! Events are subscribed to before the drain is sent, so a node that drains at once is never
//! missed; a reply that already says drained needs no event. Blockers come from `status`, polled
//! every half second for the nodes still draining.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use ebb_sdk::client::{Client, Target};
use ebb_sdk::command::{Command, DrainRequest, StatusRequest};
use ebb_sdk::event::EventBody;
use ebb_sdk::reply::{DrainResult, Reply};
use ebb_sdk::status::{NodeState, StatusResult};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use super::args::ConnArgs;
use super::exit;
use super::output::{self, blockers};
use super::table;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum Progress {
    Draining {
        blockers: String,
    },
    Drained {
        duration_ms: u64,
        forced: bool,
        connections_cut: u64,
    },
    Failed {
        message: String,
    },
    NoReply,
    TimedOut {
        blockers: String,
    },
}

const REFRESH: Duration = Duration::from_millis(500);
/// Status asks per second a large drain may cost the fleet at most: events carry the outcome,
/// `status` only the blockers on display, so a fleet of thousands is refreshed less often.
const REFRESH_RATE: u32 = 200;
/// Past this many nodes still draining, one fan-out to the target refreshes them all.
const ASK_EACH_UP_TO: usize = 8;

pub async fn run(
    client: &Client,
    conn: &ConnArgs,
    target: &Target,
    req: DrainRequest,
    wait: Duration,
) -> anyhow::Result<u8> {
    let deadline = Instant::now() + wait;
    let expected = match target {
        Target::Node(n) => BTreeSet::from([n.clone()]),
        other => client.discover(other).await?,
    };
    let mut events = client.events(target).await?;
    if !expected.is_empty() {
        events = events.only(expected.clone());
    }
    let gathered = client
        .gather(target, &Command::Drain(req), &expected, conn.timeout.0)
        .await?;
    if gathered.no_responders {
        let missing: Vec<String> = expected.iter().cloned().collect();
        output::no_responders(conn.json, &gathered.subject, client.prefix(), &missing);
        return Ok(exit::TIMEOUT);
    }
    let replies = gathered.replies;

    let mut nodes: BTreeMap<String, Progress> = expected
        .iter()
        .map(|n| (n.clone(), Progress::NoReply))
        .collect();
    let mut drain_ids: BTreeMap<String, String> = BTreeMap::new();
    for r in &replies {
        let p = match (r.ok, r.result_as::<DrainResult>()) {
            (true, Some(Ok(d))) => {
                drain_ids.insert(r.node.clone(), d.drain_id.clone());
                if d.state == NodeState::Drained {
                    Progress::Drained {
                        duration_ms: 0,
                        forced: false,
                        connections_cut: 0,
                    }
                } else {
                    Progress::Draining {
                        blockers: String::new(),
                    }
                }
            }
            _ => Progress::Failed {
                message: r.error.as_ref().map_or("unreadable reply".into(), |e| {
                    format!("{}: {}", e.code.as_str(), e.message)
                }),
            },
        };
        nodes.insert(r.node.clone(), p);
    }

    let live = !conn.json && std::io::stderr().is_terminal();
    let view = View::new(live, &nodes);
    let mut next_refresh = Instant::now();
    while nodes
        .values()
        .any(|p| matches!(p, Progress::Draining { .. }))
        && Instant::now() < deadline
    {
        if Instant::now() >= next_refresh {
            let asked = refresh(client, conn, target, &mut nodes).await;
            next_refresh = Instant::now() + refresh_every(asked);
            view.update(&nodes);
        }
        let left = next_refresh
            .min(deadline)
            .saturating_duration_since(Instant::now());
        let Some(event) = events.next_within(left).await else {
            continue;
        };
        let same_drain = |id: &str| drain_ids.get(&event.node).is_none_or(|d| d == id);
        match &event.body {
            EventBody::Drained {
                drain_id,
                duration_ms,
                forced,
                connections_cut,
                ..
            } if same_drain(drain_id) => {
                nodes.insert(
                    event.node.clone(),
                    Progress::Drained {
                        duration_ms: *duration_ms,
                        forced: *forced,
                        connections_cut: *connections_cut,
                    },
                );
                if !live && !conn.json {
                    println!("{} drained after {duration_ms}ms (forced: {forced}, connections cut: {connections_cut})", event.node);
                }
                view.update(&nodes);
            }
            EventBody::DrainDeadlineExceeded { blockers: b, .. } if !live && !conn.json => {
                println!(
                    "{}: drain deadline exceeded; blockers: {}",
                    event.node,
                    blockers(b)
                );
            }
            _ => {}
        }
    }
    for p in nodes.values_mut() {
        if let Progress::Draining { blockers } = p {
            *p = Progress::TimedOut {
                blockers: blockers.clone(),
            };
        }
    }
    view.finish();

    if conn.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else {
        let mut t = table::with_header(&["NODE", "RESULT", "DURATION", "FORCED", "CUT", "DETAIL"]);
        for (node, p) in &nodes {
            let dash = || "-".to_string();
            let row = match p {
                Progress::Drained {
                    duration_ms,
                    forced,
                    connections_cut,
                } => [
                    "drained".into(),
                    format!("{duration_ms}ms"),
                    forced.to_string(),
                    connections_cut.to_string(),
                    String::new(),
                ],
                Progress::Failed { message } => {
                    ["FAILED".into(), dash(), dash(), dash(), message.clone()]
                }
                Progress::NoReply => [
                    "UNREACHED".into(),
                    dash(),
                    dash(),
                    dash(),
                    "no reply".into(),
                ],
                Progress::TimedOut { blockers } | Progress::Draining { blockers } => {
                    ["TIMEOUT".into(), dash(), dash(), dash(), blockers.clone()]
                }
            };
            t.add_row(
                std::iter::once(node.clone())
                    .chain(row)
                    .collect::<Vec<String>>(),
            );
        }
        table::print(&t);
    }
    Ok(
        if nodes.values().any(|p| matches!(p, Progress::Failed { .. })) {
            exit::FAILED
        } else if nodes.is_empty()
            || nodes
                .values()
                .any(|p| !matches!(p, Progress::Drained { .. }))
        {
            exit::TIMEOUT
        } else {
            exit::OK
        },
    )
}

/// Asks the draining nodes for their status: blockers for the view, and a drained state in case
/// an event was missed.
/// How long until the next refresh after asking `asked` nodes: every [`REFRESH`], or less often
/// so that at most [`REFRESH_RATE`] nodes are asked per second.
fn refresh_every(asked: usize) -> Duration {
    let paced = Duration::from_secs(1) * asked as u32 / REFRESH_RATE;
    REFRESH.max(paced)
}

/// Asks the nodes still draining for their status (each on its own subject, or, when many, one
/// fan-out to the target) and updates their progress; returns how many were asked.
async fn refresh(
    client: &Client,
    conn: &ConnArgs,
    target: &Target,
    nodes: &mut BTreeMap<String, Progress>,
) -> usize {
    let draining: BTreeSet<String> = nodes
        .iter()
        .filter(|(_, p)| matches!(p, Progress::Draining { .. }))
        .map(|(n, _)| n.clone())
        .collect();
    let wait = conn.timeout.0.min(Duration::from_secs(2));
    let status = Command::Status(StatusRequest::default());
    if draining.len() > ASK_EACH_UP_TO {
        // Each reply is applied as it comes: nothing of a large fleet's replies is kept.
        let _ = client
            .gather_each(target, &status, &draining, wait, |r| {
                if draining.contains(&r.node) {
                    apply(nodes, &r);
                }
            })
            .await;
    } else {
        let asks = draining.iter().map(|n| {
            let target = Target::Node(n.clone());
            let status = &status;
            async move {
                client
                    .request(&target, status, &BTreeSet::new(), wait)
                    .await
            }
        });
        for r in futures::future::join_all(asks).await.into_iter().flatten() {
            r.iter().for_each(|r| apply(nodes, r));
        }
    }
    draining.len()
}

/// A node's progress as its `status` reply tells it.
fn apply(nodes: &mut BTreeMap<String, Progress>, r: &Reply) {
    let Some(Ok(s)) = r.result_as::<StatusResult>() else {
        return;
    };
    let entry = nodes.entry(r.node.clone()).or_insert(Progress::NoReply);
    *entry = match s.state {
        NodeState::Drained | NodeState::Stopping | NodeState::Stopped => Progress::Drained {
            duration_ms: s.drain.as_ref().map_or(0, |d| d.elapsed_ms),
            forced: false,
            connections_cut: 0,
        },
        _ => Progress::Draining {
            blockers: s
                .drain
                .map_or("not draining".into(), |d| blockers(&d.blockers)),
        },
    };
}

/// One spinner per node, only on a terminal.
struct View {
    multi: Option<MultiProgress>,
    bars: BTreeMap<String, ProgressBar>,
}

impl View {
    fn new(live: bool, nodes: &BTreeMap<String, Progress>) -> Self {
        if !live {
            return View {
                multi: None,
                bars: BTreeMap::new(),
            };
        }
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{spinner} {prefix:<20} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = nodes
            .keys()
            .map(|n| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(n.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                (n.clone(), bar)
            })
            .collect();
        let view = View {
            multi: Some(multi),
            bars,
        };
        view.update(nodes);
        view
    }

    fn update(&self, nodes: &BTreeMap<String, Progress>) {
        for (node, p) in nodes {
            let Some(bar) = self.bars.get(node) else {
                continue;
            };
            match p {
                Progress::Draining { blockers } => bar.set_message(format!("draining  {blockers}")),
                Progress::Drained { duration_ms, .. } => {
                    bar.finish_with_message(format!("drained after {duration_ms}ms"))
                }
                Progress::Failed { message } => {
                    bar.finish_with_message(format!("FAILED {message}"))
                }
                Progress::NoReply => bar.set_message("no reply"),
                Progress::TimedOut { blockers } => {
                    bar.finish_with_message(format!("timed out  {blockers}"))
                }
            }
        }
    }

    fn finish(&self) {
        for bar in self.bars.values() {
            if !bar.is_finished() {
                bar.finish();
            }
        }
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_drain_does_not_flood_the_fleet_with_status_asks() {
        assert_eq!(refresh_every(1), REFRESH);
        assert_eq!(refresh_every(100), REFRESH);
        // 10,000 nodes still draining: asked every 50 s, 200 a second.
        assert_eq!(refresh_every(10_000), Duration::from_secs(50));
    }
}
