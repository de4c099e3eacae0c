//! How `ebb ctl` prints replies: a table for people, JSON for programs.

use std::time::Duration;

use ebb_sdk::reply::Reply;
use ebb_sdk::status::StatusResult;
use serde_json::{json, Value};

use super::table;

/// Prints a fan-out's replies, and a row for each expected node that stayed silent within
/// `waited`.
pub fn print_replies(
    json: bool,
    verb: &str,
    replies: &[Reply],
    missing: &[String],
    waited: Duration,
) {
    if json {
        let out = json!({ "replies": replies, "missing": missing });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return;
    }
    if replies.is_empty() && missing.is_empty() {
        eprintln!(
            "ebb ctl: no node answered within {}; check that the agents run and the --prefix",
            fmt_wait(waited)
        );
        return;
    }
    let silent = format!("no reply within {}", fmt_wait(waited));
    if verb == "status" {
        print_status(replies, missing, &silent);
    } else {
        let mut t = table::with_header(&["NODE", "OK", "DETAIL"]);
        for r in replies {
            t.add_row(vec![r.node.clone(), ok_word(r).into(), detail(r)]);
        }
        for m in missing {
            t.add_row(vec![m.as_str(), "NO REPLY", silent.as_str()]);
        }
        table::print(&t);
    }
}

/// What to say when the server answered "no responders" to `subject`.
pub fn no_responders(json: bool, subject: &str, prefix: &str, missing: &[String]) {
    if json {
        let out = json!({ "replies": [], "missing": missing, "no_responders": true });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    eprintln!(
        "ebb ctl: no node answered: nothing on this NATS server listens on {subject}. Check the \
node id or group (ebb ctl status --all lists the nodes), that the agents run and are connected to \
this server, and the subject prefix (--prefix, now {prefix:?})."
    );
}

fn print_status(replies: &[Reply], missing: &[String], silent: &str) {
    let mut t = table::with_header(&["NODE", "STATE", "PID", "OLD", "LAST RELOAD", "BLOCKERS"]);
    for r in replies {
        let Some(Ok(s)) = r.result_as::<StatusResult>() else {
            t.add_row(vec![
                r.node.clone(),
                ok_word(r).into(),
                "-".into(),
                "-".into(),
                "-".into(),
                detail(r),
            ]);
            continue;
        };
        let last = s.last_reload.map_or("-".to_string(), |l| {
            format!(
                "{} in {}ms",
                if l.ok { "ok" } else { "FAILED" },
                l.duration_ms
            )
        });
        t.add_row(vec![
            r.node.clone(),
            s.state.to_string(),
            s.haproxy.pid.map_or("-".into(), |p| p.to_string()),
            s.old_workers.len().to_string(),
            last,
            s.drain.map_or(String::new(), |d| blockers(&d.blockers)),
        ]);
    }
    for m in missing {
        t.add_row(vec![m.as_str(), "UNREACHED", "-", "-", "-", silent]);
    }
    table::print(&t);
}

pub fn blockers(list: &[ebb_sdk::status::Blocker]) -> String {
    list.iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

fn ok_word(r: &Reply) -> &'static str {
    if r.ok {
        "ok"
    } else {
        "FAILED"
    }
}

fn detail(r: &Reply) -> String {
    match (&r.result, &r.error) {
        (_, Some(e)) => format!("{}: {}", e.code.as_str(), e.message),
        (Some(v), None) => summarize(v),
        (None, None) => String::new(),
    }
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

/// A wait as people write it: whole seconds when it is.
pub fn fmt_wait(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}
