//! `ebb ctl watch`: stream events. With the events stream in JetStream, an ordered consumer
//! replays the last `--since` first, so a late watcher sees the recent history; without it, a core
//! subscription shows new events only.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use ebb_sdk::client::{Client, Target};
use ebb_sdk::event::Event;
use futures::StreamExt;

use super::args::{ConnArgs, WatchArgs};
use super::exit;

pub async fn run(client: &Client, conn: &ConnArgs, args: &WatchArgs) -> anyhow::Result<u8> {
    let prefix = client.prefix();
    let subject = match &args.node {
        Some(n) => ebb_sdk::subject::node_event_wildcard(prefix, n),
        None => ebb_sdk::subject::event_wildcard(prefix),
    };
    let group_nodes: Option<BTreeSet<String>> = match &args.group {
        Some(g) => Some(client.discover(&Target::Group(g.clone())).await?),
        None => None,
    };
    let until = args.duration.map(|d| Instant::now() + d.0);
    let mut shown = 0usize;
    let mut seen = BTreeSet::new();
    let mut show = |event: Event| -> bool {
        if group_nodes
            .as_ref()
            .is_some_and(|g| !g.contains(&event.node))
            || (!args.kind.is_empty() && !args.kind.iter().any(|k| k == event.kind()))
            || !seen.insert((event.node.clone(), event.boot_id.clone(), event.seq))
        {
            return false;
        }
        print_event(conn.json, &event);
        shown += 1;
        args.count.is_some_and(|c| shown >= c)
    };
    let left = || {
        until.map_or(Duration::from_secs(3600), |u| {
            u.saturating_duration_since(Instant::now())
        })
    };

    let js = client.jetstream();
    let stream_name = conn.nats_config().events_stream;
    if let Ok(stream) = js.get_stream(&stream_name).await {
        let start = SystemTime::now() - args.since.0;
        let start_time = time::OffsetDateTime::from(start);
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: DeliverPolicy::ByStartTime { start_time },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(exit::OK);
            }
            match tokio::time::timeout(left(), messages.next()).await {
                Ok(Some(Ok(msg))) => {
                    if let Ok(event) = serde_json::from_slice::<Event>(&msg.payload) {
                        if show(event) {
                            return Ok(exit::OK);
                        }
                    }
                }
                Ok(Some(Err(e))) => eprintln!("ebb ctl watch: {e}"),
                Ok(None) => return Ok(exit::OK),
                Err(_) => {}
            }
        }
    }
    if !conn.json {
        eprintln!("(no {stream_name} stream: showing new events only)");
    }
    let mut sub = client.nats().subscribe(subject).await?;
    loop {
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(exit::OK);
        }
        match tokio::time::timeout(left(), sub.next()).await {
            Ok(Some(msg)) => {
                if let Ok(event) = serde_json::from_slice::<Event>(&msg.payload) {
                    if show(event) {
                        return Ok(exit::OK);
                    }
                }
            }
            Ok(None) => return Ok(exit::TIMEOUT),
            Err(_) => {}
        }
    }
}

fn print_event(json: bool, event: &Event) {
    if json {
        println!("{}", serde_json::to_string(event).unwrap_or_default());
        return;
    }
    let mut fields = serde_json::to_value(&event.body).unwrap_or_default();
    if let Some(map) = fields.as_object_mut() {
        map.remove("kind");
    }
    println!(
        "{} {:<16} {:<24} {}",
        event.time,
        event.node,
        event.kind(),
        fields
    );
}
