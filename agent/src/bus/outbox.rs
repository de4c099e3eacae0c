//! The event outbox: every event is written here (and synced) before it is published, and removed
//! only once NATS confirmed it (or refused it for good). So events wait while NATS is away, go out
//! in order after it comes back, and survive an agent restart with their original `boot_id`,
//! `seq` and Msg-Id.
//!
//! On disk, in `state_dir`:
//! - a log, one event per line, only ever appended to (one fsync per batch of events): `outbox.jsonl`
//!   for generation 0, `outbox.<generation>.jsonl` after that;
//! - `outbox.pos`, which names the log's generation, the byte offset before which every line was
//!   sent, and the offsets of lines dropped beyond it (a full outbox). It is replaced atomically
//!   (temp file, fsync, rename, directory fsync), so it always describes a log that is complete on
//!   disk.
//!
//! Compaction writes the unsent events to the next generation's log, syncs it, and only then
//! points `outbox.pos` at it: a crash at any moment leaves a position and a log that agree, so no
//! unsent event is skipped. Should the position be lost, the events are sent again with the same
//! Msg-Id, which the stream drops as duplicates. A line that cannot be read (a torn write, garbage)
//! is skipped, logged and counted, never fatal.
//!
//! Every method does blocking file I/O: the publisher calls them through `spawn_blocking`.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use ebb_sdk::event::{Event, EventBody};
use serde::{Deserialize, Serialize};

const POSITION: &str = "outbox.pos";
/// Written by agents before the position file existed; removed at the first compaction.
const LEGACY_ACKED: &str = "outbox.acked";
/// Sent bytes at the head of the log that trigger a compaction.
const COMPACT_BYTES: u64 = 1 << 20;
/// Dropped lines recorded in the position file that trigger a compaction.
const COMPACT_SKIPS: usize = 512;

#[derive(Debug, thiserror::Error)]
#[error("event outbox {path}: {source}; check that state_dir is writable and not full")]
pub struct OutboxError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Where the unsent events of a log begin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The log's generation.
    pub log: u64,
    /// Every line before this byte offset was sent.
    pub offset: u64,
    /// Start offsets of lines after `offset` that were dropped (the outbox was full).
    #[serde(default)]
    pub skip: BTreeSet<u64>,
}

/// Reads a position file. Anything but a well-formed position is an error, never a panic.
pub fn parse_position(bytes: &[u8]) -> Result<Position, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// One unsent event and the bytes of its line in the log.
#[derive(Debug, Clone)]
struct Entry {
    event: Event,
    start: u64,
    end: u64,
}

/// What a log holds past a position.
#[derive(Debug, Default)]
pub struct LogContents {
    /// The unsent events, each with the byte range of its line.
    entries: Vec<Entry>,
    /// Lines that are not an event: (start offset, why).
    pub unreadable: Vec<(u64, String)>,
}

impl LogContents {
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.entries.iter().map(|e| &e.event)
    }
}

/// Reads the events of a log that lie past `pos`, in order. A last line without its newline was
/// torn by a crash mid-write: it counts as unreadable. Never panics, whatever the bytes.
pub fn read_log(bytes: &[u8], pos: &Position) -> LogContents {
    let mut out = LogContents::default();
    let mut start = usize::try_from(pos.offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    while start < bytes.len() {
        let rest = &bytes[start..];
        let (line, next, complete) = match rest.iter().position(|&b| b == b'\n') {
            Some(n) => (&rest[..n], start + n + 1, true),
            None => (rest, bytes.len(), false),
        };
        let at = start as u64;
        if !line.iter().all(u8::is_ascii_whitespace) && !pos.skip.contains(&at) {
            if !complete {
                out.unreadable
                    .push((at, "the last line is incomplete (torn write)".into()));
            } else {
                match serde_json::from_slice::<Event>(line) {
                    Ok(event) => out.entries.push(Entry {
                        event,
                        start: at,
                        end: next as u64,
                    }),
                    Err(e) => out.unreadable.push((at, e.to_string())),
                }
            }
        }
        start = next;
    }
    out
}

#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    generation: u64,
    /// Open for appending; `None` until a write succeeds after a failed one.
    file: Option<File>,
    /// Bytes in the log.
    len: u64,
    queue: VecDeque<Entry>,
    offset: u64,
    skip: BTreeSet<u64>,
    limit: usize,
    /// A write failed: the log may not match `queue`, so the next change rewrites it.
    broken: bool,
    /// Lines skipped when the outbox was opened.
    unreadable_at_open: usize,
    /// Events dropped because the outbox was full, since it was opened.
    dropped: u64,
}

impl Outbox {
    /// Opens the outbox in `dir`, keeping events a previous agent could not send. Fails only when
    /// the directory cannot be read or written; unreadable contents are skipped and logged.
    pub fn open(dir: &Path, limit: usize) -> Result<Outbox, OutboxError> {
        let pos_path = dir.join(POSITION);
        let pos = match std::fs::read(&pos_path) {
            Ok(bytes) => parse_position(&bytes).unwrap_or_else(|why| {
                // Without it, everything in the newest log goes out again; the stream dedupes.
                tracing::warn!(
                    "event outbox {}: unreadable ({why}); resending every event of the newest log",
                    pos_path.display()
                );
                Position {
                    log: newest_generation(dir),
                    ..Position::default()
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Position::default(),
            Err(e) => {
                return Err(OutboxError {
                    path: pos_path,
                    source: e,
                })
            }
        };
        let log_path = log_path(dir, pos.log);
        let contents = match std::fs::read(&log_path) {
            Ok(bytes) => read_log(&bytes, &pos),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LogContents::default(),
            Err(e) => {
                return Err(OutboxError {
                    path: log_path,
                    source: e,
                })
            }
        };
        for (at, why) in contents.unreadable.iter().take(10) {
            tracing::warn!(
                "event outbox {}: skipping an unreadable line at byte {at}: {why}",
                log_path.display()
            );
        }
        let mut outbox = Outbox {
            dir: dir.to_owned(),
            generation: pos.log,
            file: None,
            len: 0,
            queue: contents.entries.into(),
            offset: 0,
            skip: BTreeSet::new(),
            limit: limit.max(1),
            broken: false,
            unreadable_at_open: contents.unreadable.len(),
            dropped: 0,
        };
        if outbox.unreadable_at_open > 0 {
            tracing::error!(
                "event outbox {}: {} unreadable line(s) skipped (torn write or corruption); the \
                 other {} event(s) will be sent",
                log_path.display(),
                outbox.unreadable_at_open,
                outbox.queue.len()
            );
        }
        // A fresh log without torn tail, sent lines or leftovers of an interrupted compaction.
        outbox.compact()?;
        outbox.remove_stale_logs();
        Ok(outbox)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn front(&self) -> Option<&Event> {
        self.queue.front().map(|e| &e.event)
    }

    pub fn unreadable_at_open(&self) -> usize {
        self.unreadable_at_open
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Appends events durably (one fsync for all). When full, the oldest events that are not a
    /// `drained` give way; they are returned. On error the events are still queued in memory, to
    /// be sent, and the log is rewritten at the next change.
    pub fn push(&mut self, events: Vec<Event>) -> Result<Vec<Event>, OutboxError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let (bytes, entries) = encode(self.len, events);
        let written = if self.broken {
            // Rewritten whole by the compaction below.
            Ok(())
        } else {
            self.append(&bytes)
        };
        match &written {
            Ok(()) if !self.broken => self.len += bytes.len() as u64,
            Ok(()) => {}
            Err(_) => self.broken = true,
        }
        self.queue.extend(entries);
        let dropped = self.enforce_limit();
        written?;
        if self.broken || !dropped.is_empty() {
            self.save_position()?;
        }
        Ok(dropped)
    }

    /// The front event is done with: confirmed by NATS, or set aside.
    pub fn pop(&mut self) -> Result<(), OutboxError> {
        let Some(front) = self.queue.pop_front() else {
            return Ok(());
        };
        self.advance_to(front.end);
        if self.broken || self.offset > COMPACT_BYTES || self.skip.len() > COMPACT_SKIPS {
            self.compact()
        } else {
            self.save_position()
        }
    }

    fn advance_to(&mut self, offset: u64) {
        self.offset = self.offset.max(offset);
        self.skip = self.skip.split_off(&self.offset);
    }

    fn enforce_limit(&mut self) -> Vec<Event> {
        let mut dropped = Vec::new();
        while self.queue.len() > self.limit {
            let victim = self
                .queue
                .iter()
                .position(|e| !matches!(e.event.body, EventBody::Drained { .. }))
                .unwrap_or(0);
            let Some(entry) = self.queue.remove(victim) else {
                break;
            };
            if victim == 0 {
                self.advance_to(entry.end);
            } else {
                self.skip.insert(entry.start);
            }
            self.dropped += 1;
            dropped.push(entry.event);
        }
        dropped
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), OutboxError> {
        let path = log_path(&self.dir, self.generation);
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?,
            ),
        };
        file.write_all(bytes).map_err(|e| io_err(&path, e))?;
        file.sync_data().map_err(|e| io_err(&path, e))
    }

    /// Writes the unsent events to the next generation's log, then points the position at it.
    fn compact(&mut self) -> Result<(), OutboxError> {
        let next = self.generation + 1;
        let path = log_path(&self.dir, next);
        let events = self.queue.drain(..).map(|e| e.event).collect();
        let (bytes, entries) = encode(0, events);
        self.queue = entries.into();
        let result = (|| {
            let mut file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            file.write_all(&bytes).map_err(|e| io_err(&path, e))?;
            file.sync_all().map_err(|e| io_err(&path, e))?;
            sync_dir(&self.dir)?;
            let old = log_path(&self.dir, self.generation);
            let position = Position {
                log: next,
                offset: 0,
                skip: BTreeSet::new(),
            };
            write_position(&self.dir, &position)?;
            let file = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            Ok((file, old))
        })();
        match result {
            Ok((file, old)) => {
                self.generation = next;
                self.file = Some(file);
                self.len = bytes.len() as u64;
                self.offset = 0;
                self.skip.clear();
                self.broken = false;
                let _ = std::fs::remove_file(old);
                let _ = std::fs::remove_file(self.dir.join(LEGACY_ACKED));
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                self.file = None;
                Err(e)
            }
        }
    }

    fn save_position(&mut self) -> Result<(), OutboxError> {
        if self.broken {
            return self.compact();
        }
        let position = Position {
            log: self.generation,
            offset: self.offset,
            skip: self.skip.clone(),
        };
        write_position(&self.dir, &position)
    }

    /// Logs of other generations: a compaction that was interrupted, or whose cleanup was.
    fn remove_stale_logs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(generation) = name.to_str().and_then(generation_of) else {
                continue;
            };
            if generation != self.generation {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The log lines of `events`, and where each lies once appended to a log of `len` bytes.
fn encode(len: u64, events: Vec<Event>) -> (Vec<u8>, Vec<Entry>) {
    let mut bytes = Vec::new();
    let mut entries = Vec::with_capacity(events.len());
    for event in events {
        let start = len + bytes.len() as u64;
        // An Event always serializes; one that did not would have nothing to write anyway.
        if serde_json::to_writer(&mut bytes, &event).is_err() {
            continue;
        }
        bytes.push(b'\n');
        entries.push(Entry {
            event,
            start,
            end: len + bytes.len() as u64,
        });
    }
    (bytes, entries)
}

fn log_path(dir: &Path, generation: u64) -> PathBuf {
    match generation {
        0 => dir.join("outbox.jsonl"),
        n => dir.join(format!("outbox.{n}.jsonl")),
    }
}

fn generation_of(name: &str) -> Option<u64> {
    if name == "outbox.jsonl" {
        return Some(0);
    }
    name.strip_prefix("outbox.")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

fn newest_generation(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(generation_of))
        .max()
        .unwrap_or(0)
}

fn write_position(dir: &Path, position: &Position) -> Result<(), OutboxError> {
    let path = dir.join(POSITION);
    let tmp = dir.join(format!("{POSITION}.tmp"));
    let bytes = serde_json::to_vec(position).unwrap_or_default();
    let mut file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    file.write_all(&bytes).map_err(|e| io_err(&tmp, e))?;
    file.sync_all().map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    sync_dir(dir)
}

/// Makes a rename or a new file in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

fn io_err(path: &Path, source: std::io::Error) -> OutboxError {
    OutboxError {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests;
