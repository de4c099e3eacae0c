//! A rolling-drain orchestrator written against the ebb fleet client (`ebb-sdk`, feature `client`).
//!
//! It drains a group in batches, each node stopping HAProxy once drained (`stop_when_drained`),
//! waits for every node of a batch to report `stopped`, then moves on; at the end it undrains the
//! whole group, which starts HAProxy again. Run it against a fleet:
//!
//! ```sh
//! cargo run -p ebb-examples --example rolling_drain -- nats://127.0.0.1:4222 web 2
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use ebb_sdk::client::{Client, Target};
use ebb_sdk::command::{Command, DrainRequest, UndrainRequest};
use ebb_sdk::event::EventBody;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let group = args.next().unwrap_or_else(|| "web".into());
    let batch: usize = args.next().and_then(|b| b.parse().ok()).unwrap_or(1).max(1);

    let client = Client::new(
        async_nats::connect(&url).await?,
        ebb_sdk::subject::DEFAULT_PREFIX,
    );
    let nodes: Vec<String> = client
        .roll_call(&Target::Group(group.clone()))
        .await?
        .into_iter()
        .collect();
    println!("group {group}: {} nodes, {batch} at a time", nodes.len());

    for chunk in nodes.chunks(batch) {
        let wanted: BTreeSet<String> = chunk.iter().cloned().collect();
        // Subscribe first: a node may drain (and stop) before its reply reaches us.
        let mut events = client
            .events(&Target::Group(group.clone()))
            .await?
            .only(wanted.clone());
        for node in chunk {
            let drain = Command::Drain(DrainRequest {
                stop_when_drained: Some(true),
                reason: Some("rolling drain example".into()),
                ..DrainRequest::default()
            });
            let replies = client
                .request(
                    &Target::Node(node.clone()),
                    &drain,
                    &BTreeSet::new(),
                    Duration::from_secs(5),
                )
                .await?;
            match replies.first() {
                Some(r) if r.ok => println!("{node}: draining"),
                Some(r) => return Err(format!("{node}: drain refused: {:?}", r.error).into()),
                None => return Err(format!("{node}: no reply").into()),
            }
        }
        let mut stopped = BTreeSet::new();
        while stopped != wanted {
            let Some(event) = events.next_within(Duration::from_secs(600)).await else {
                return Err(format!(
                    "timed out; still waiting for {:?}",
                    wanted.difference(&stopped)
                )
                .into());
            };
            match event.body {
                EventBody::Drained {
                    duration_ms,
                    connections_cut,
                    ..
                } => {
                    println!(
                        "{}: drained after {duration_ms}ms ({connections_cut} connections cut)",
                        event.node
                    )
                }
                EventBody::Stopped { connections_cut } => {
                    println!(
                        "{}: stopped ({connections_cut} connections cut)",
                        event.node
                    );
                    stopped.insert(event.node);
                }
                _ => {}
            }
        }
    }

    let all: BTreeSet<String> = nodes.iter().cloned().collect();
    let replies = client
        .request(
            &Target::Group(group.clone()),
            &Command::Undrain(UndrainRequest::default()),
            &all,
            Duration::from_secs(10),
        )
        .await?;
    for r in replies {
        println!("{}: undrain {}", r.node, if r.ok { "ok" } else { "FAILED" });
    }
    Ok(())
}
