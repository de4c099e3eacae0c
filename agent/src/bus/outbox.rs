//! The event outbox: every event is written here (and synced) before it is published, and removed
//! only once NATS confirmed it. So events wait while NATS is away, go out in order after it comes
//! back, and survive an agent restart with their original `boot_id`, `seq` and Msg-Id.
//!
//! On disk: `outbox.jsonl` holds one event per line, and `outbox.acked` how many of its first
//! lines were already confirmed (a cheap overwrite per publish instead of rewriting the file).
//! Should the count be lost, the events are sent again with the same Msg-Id, which the stream
//! drops as duplicates.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use ebb_sdk::event::{Event, EventBody};

#[derive(Debug, thiserror::Error)]
#[error("event outbox {path}: {source}; check that state_dir is writable")]
pub struct OutboxError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

#[derive(Debug)]
pub struct Outbox {
    path: PathBuf,
    file: File,
    queue: VecDeque<Event>,
    limit: usize,
    /// Lines in the file that were already published; the file is rewritten when they pile up.
    stale_lines: usize,
}

impl Outbox {
    /// Opens the outbox in `dir`, keeping events a previous agent could not send.
    pub fn open(dir: &Path, limit: usize) -> Result<Outbox, OutboxError> {
        let path = dir.join("outbox.jsonl");
        let acked: usize = std::fs::read_to_string(acked_path(&path))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let err = |source| OutboxError {
            path: path.clone(),
            source,
        };
        let mut queue = VecDeque::new();
        match File::open(&path) {
            Ok(f) => {
                for line in BufReader::new(f).lines().skip(acked) {
                    let line = line.map_err(err)?;
                    // A torn last line (crash mid-write) was never published: skip it.
                    match serde_json::from_str::<Event>(&line) {
                        Ok(e) => queue.push_back(e),
                        Err(e) => tracing::warn!(
                            "outbox {}: skipping an unreadable line: {e}",
                            path.display()
                        ),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err)?;
        let mut outbox = Outbox {
            path,
            file,
            queue,
            limit: limit.max(1),
            stale_lines: 0,
        };
        outbox.rewrite()?;
        Ok(outbox)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn front(&self) -> Option<&Event> {
        self.queue.front()
    }

    /// Appends an event durably. When full, the oldest event that is not a `drained` gives way.
    pub fn push(&mut self, event: Event) -> Result<(), OutboxError> {
        if self.queue.len() >= self.limit {
            let victim = self
                .queue
                .iter()
                .position(|e| !matches!(e.body, EventBody::Drained { .. }))
                .unwrap_or(0);
            if let Some(dropped) = self.queue.remove(victim) {
                tracing::warn!(
                    msg_id = %dropped.msg_id(),
                    "event outbox full ({} events): dropping {} event {}",
                    self.limit,
                    dropped.kind(),
                    dropped.msg_id()
                );
            }
            // The dropped event may sit anywhere in the file: rewrite it to keep "the first
            // `acked` lines were sent" true.
            self.rewrite()?;
        }
        let mut line = serde_json::to_vec(&event).map_err(|e| self.err(e.into()))?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(|e| self.err(e))?;
        self.file.sync_data().map_err(|e| self.err(e))?;
        self.queue.push_back(event);
        Ok(())
    }

    /// The front event was published and confirmed.
    pub fn pop(&mut self) -> Result<(), OutboxError> {
        self.queue.pop_front();
        self.stale_lines += 1;
        if self.queue.is_empty() {
            self.file.set_len(0).map_err(|e| self.err(e))?;
            self.stale_lines = 0;
            self.write_acked()
        } else if self.stale_lines > 256 {
            self.rewrite()
        } else {
            self.write_acked()
        }
    }

    fn write_acked(&self) -> Result<(), OutboxError> {
        std::fs::write(acked_path(&self.path), self.stale_lines.to_string())
            .map_err(|e| self.err(e))
    }

    fn rewrite(&mut self) -> Result<(), OutboxError> {
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut out = Vec::new();
        for e in &self.queue {
            serde_json::to_writer(&mut out, e).map_err(|e| self.err(e.into()))?;
            out.push(b'\n');
        }
        std::fs::write(&tmp, &out).map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.err(e))?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| self.err(e))?;
        self.stale_lines = 0;
        self.write_acked()
    }

    fn err(&self, source: std::io::Error) -> OutboxError {
        OutboxError {
            path: self.path.clone(),
            source,
        }
    }
}

fn acked_path(outbox: &Path) -> PathBuf {
    outbox.with_extension("acked")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, body: EventBody) -> Event {
        Event {
            v: 1,
            node: "n".into(),
            boot_id: "b".into(),
            seq,
            time: "2026-01-01T00:00:00.000Z".into(),
            requester: None,
            reason: None,
            body,
        }
    }

    fn hb(seq: u64) -> Event {
        event(
            seq,
            EventBody::Heartbeat {
                state: ebb_sdk::status::NodeState::Serving,
            },
        )
    }

    #[test]
    fn survives_a_restart_in_order_and_forgets_what_was_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut o = Outbox::open(dir.path(), 10).expect("open");
            for s in 1..=3 {
                o.push(hb(s)).expect("push");
            }
            o.pop().expect("pop");
        }
        let o = Outbox::open(dir.path(), 10).expect("reopen");
        assert_eq!(o.len(), 2);
        assert_eq!(o.front().map(|e| e.seq), Some(2));
    }

    #[test]
    fn a_full_outbox_keeps_drained_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), 2).expect("open");
        let drained = event(
            1,
            EventBody::Drained {
                drain_id: "d".into(),
                started_at: "t".into(),
                drained_at: "t".into(),
                duration_ms: 1,
                forced: false,
                connections_cut: 0,
            },
        );
        o.push(drained).expect("push");
        o.push(hb(2)).expect("push");
        o.push(hb(3)).expect("push");
        let seqs: Vec<u64> = o.queue.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 3]);
    }

    #[test]
    fn a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut o = Outbox::open(dir.path(), 10).expect("open");
            o.push(hb(1)).expect("push");
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("outbox.jsonl"))
            .expect("open");
        f.write_all(b"{\"v\":1,\"kin").expect("write");
        let o = Outbox::open(dir.path(), 10).expect("reopen");
        assert_eq!(o.len(), 1);
    }
}
