//! How `ebb ctl` prints replies: a table for people, JSON for programs.

use ebb_sdk::reply::Reply;
use ebb_sdk::status::StatusResult;
use serde_json::{json, Value};

use crate::config::Dur;

pub fn print_replies(json: bool, verb: &str, replies: &[Reply], missing: &[String], timeout: Dur) {
    if json {
        let out = json!({ "replies": replies, "missing": missing });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return;
    }
    if verb == "status" {
        print_status(replies);
    } else {
        println!("{:<20} {:<6} DETAIL", "NODE", "OK");
        for r in replies {
            print_plain(r);
        }
    }
    for m in missing {
        println!("{m:<20} no reply within {timeout}");
    }
    if replies.is_empty() && missing.is_empty() {
        println!("no node answered within {timeout}");
    }
}

fn print_status(replies: &[Reply]) {
    println!(
        "{:<20} {:<9} {:>8} {:>4}  {:<16} BLOCKERS",
        "NODE", "STATE", "PID", "OLD", "LAST RELOAD"
    );
    for r in replies {
        let Some(Ok(s)) = r.result_as::<StatusResult>() else {
            print_plain(r);
            continue;
        };
        let last = s.last_reload.map_or("-".to_string(), |l| {
            format!(
                "{} in {}ms",
                if l.ok { "ok" } else { "FAILED" },
                l.duration_ms
            )
        });
        println!(
            "{:<20} {:<9} {:>8} {:>4}  {:<16} {}",
            r.node,
            s.state.to_string(),
            s.haproxy.pid.map_or("-".into(), |p| p.to_string()),
            s.old_workers.len(),
            last,
            s.drain.map_or(String::new(), |d| blockers(&d.blockers))
        );
    }
}

pub fn blockers(list: &[ebb_sdk::status::Blocker]) -> String {
    list.iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn print_plain(r: &Reply) {
    let detail = match (&r.result, &r.error) {
        (_, Some(e)) => format!("{}: {}", e.code.as_str(), e.message),
        (Some(v), None) => summarize(v),
        (None, None) => String::new(),
    };
    println!(
        "{:<20} {:<6} {detail}",
        r.node,
        if r.ok { "ok" } else { "FAILED" }
    );
}

fn summarize(v: &Value) -> String {
    match v.as_object() {
        Some(map) => map
            .iter()
            .filter(|(_, v)| !v.is_object())
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        None => v.to_string(),
    }
}
