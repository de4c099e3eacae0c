//! How `ebb ctl` prints replies: a table for people, JSON for programs.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use ebb_sdk::reply::Reply;
use ebb_sdk::status::StatusResult;
use serde::ser::SerializeSeq;
use serde::Serialize;
use serde_json::{json, Value};

use super::table;

/// What a fan-out keeps of each reply, as it comes: its JSON text for `--json`, else its table
/// row, and whether it was ok. A fleet of thousands costs one row (or one compact JSON text) per
/// node, never the decoded replies.
pub struct Collected {
    json: bool,
    status: bool,
    kept: BTreeMap<String, String>,
    rows: BTreeMap<String, Vec<String>>,
    failed: bool,
}

impl Collected {
    pub fn new(json: bool, verb: &str) -> Self {
        Collected {
            json,
            status: verb == "status",
            kept: BTreeMap::new(),
            rows: BTreeMap::new(),
            failed: false,
        }
    }

    pub fn take(&mut self, reply: Reply) {
        self.failed |= !reply.ok;
        if self.json {
            let text = serde_json::to_string(&reply).unwrap_or_default();
            self.kept.insert(reply.node, text);
        } else {
            let row = if self.status {
                status_row(&reply)
            } else {
                vec![reply.node.clone(), ok_word(&reply).into(), detail(&reply)]
            };
            self.rows.insert(reply.node, row);
        }
    }

    pub fn answered(&self) -> usize {
        self.kept.len() + self.rows.len()
    }

    pub fn exit_code(&self, missing: &[String]) -> u8 {
        super::exit::for_outcome(self.failed, self.answered(), missing.len())
    }

    /// Prints the replies sorted by node, and a row for each expected node that stayed silent
    /// within `waited`.
    pub fn print(&self, missing: &[String], waited: Duration) {
        if self.json {
            let out = JsonOut {
                replies: Replies(&self.kept),
                missing,
            };
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            if serde_json::to_writer_pretty(&mut lock, &out).is_ok() {
                let _ = writeln!(lock);
            }
            return;
        }
        if self.rows.is_empty() && missing.is_empty() {
            eprintln!(
                "ebb ctl: no node answered within {}; check that the agents run and the --prefix",
                fmt_wait(waited)
            );
            return;
        }
        let silent = format!("no reply within {}", fmt_wait(waited));
        let mut t = if self.status {
            table::with_header(&["NODE", "STATE", "PID", "OLD", "LAST RELOAD", "BLOCKERS"])
        } else {
            table::with_header(&["NODE", "OK", "DETAIL"])
        };
        for row in self.rows.values() {
            t.add_row(row.clone());
        }
        for m in missing {
            if self.status {
                t.add_row(vec![
                    m.as_str(),
                    "UNREACHED",
                    "-",
                    "-",
                    "-",
                    silent.as_str(),
                ]);
            } else {
                t.add_row(vec![m.as_str(), "NO REPLY", silent.as_str()]);
            }
        }
        table::print(&t);
    }
}

#[derive(Serialize)]
struct JsonOut<'a> {
    replies: Replies<'a>,
    missing: &'a [String],
}

/// The kept replies, decoded one at a time as they are written.
struct Replies<'a>(&'a BTreeMap<String, String>);

impl Serialize for Replies<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for text in self.0.values() {
            let value: Value = serde_json::from_str(text).map_err(serde::ser::Error::custom)?;
            seq.serialize_element(&value)?;
        }
        seq.end()
    }
}

/// Prints the replies of one node or a few, as a fan-out does.
pub fn print_replies(
    json: bool,
    verb: &str,
    replies: &[Reply],
    missing: &[String],
    waited: Duration,
) {
    let mut collected = Collected::new(json, verb);
    for r in replies {
        collected.take(r.clone());
    }
    collected.print(missing, waited);
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

fn status_row(r: &Reply) -> Vec<String> {
    let Some(Ok(s)) = r.result_as::<StatusResult>() else {
        return vec![
            r.node.clone(),
            ok_word(r).into(),
            "-".into(),
            "-".into(),
            "-".into(),
            detail(r),
        ];
    };
    let last = s.last_reload.map_or("-".to_string(), |l| {
        format!(
            "{} in {}ms",
            if l.ok { "ok" } else { "FAILED" },
            l.duration_ms
        )
    });
    vec![
        r.node.clone(),
        s.state.to_string(),
        s.haproxy.pid.map_or("-".into(), |p| p.to_string()),
        s.old_workers.len().to_string(),
        last,
        s.drain.map_or(String::new(), |d| blockers(&d.blockers)),
    ]
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
