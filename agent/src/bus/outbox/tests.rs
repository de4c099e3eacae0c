use std::io::Write;

use proptest::prelude::*;

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

fn undrained(seq: u64) -> Event {
    event(
        seq,
        EventBody::Undrained {
            drain_id: "d".into(),
        },
    )
}

fn drained(seq: u64) -> Event {
    event(
        seq,
        EventBody::Drained {
            drain_id: "d".into(),
            started_at: "t".into(),
            drained_at: "t".into(),
            duration_ms: 1,
            forced: false,
            connections_cut: 0,
        },
    )
}

fn seqs(o: &Outbox) -> Vec<u64> {
    o.queue.iter().map(|e| e.event.seq).collect()
}

fn log_of(dir: &Path) -> PathBuf {
    let pos = parse_position(&std::fs::read(dir.join(POSITION)).expect("position")).expect("pos");
    log_path(dir, pos.log)
}

#[test]
fn survives_a_restart_in_order_and_forgets_what_was_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut o = Outbox::open(dir.path(), 10).expect("open");
        o.push((1..=3).map(undrained).collect()).expect("push");
        o.pop().expect("pop");
        o.push(vec![undrained(4)]).expect("push");
    }
    let mut o = Outbox::open(dir.path(), 10).expect("reopen");
    assert_eq!(seqs(&o), vec![2, 3, 4]);
    for _ in 0..3 {
        o.pop().expect("pop");
    }
    let o = Outbox::open(dir.path(), 10).expect("reopen");
    assert!(o.is_empty());
}

#[test]
fn a_full_outbox_drops_the_oldest_but_keeps_drained_events_without_a_rewrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), 2).expect("open");
    o.push(vec![drained(1), undrained(2)]).expect("push");
    let generation = o.generation;
    let dropped = o.push(vec![undrained(3)]).expect("push");
    assert_eq!(dropped.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
    assert_eq!(seqs(&o), vec![1, 3]);
    assert_eq!(
        o.generation, generation,
        "the log was appended to, not rewritten"
    );
    assert_eq!(o.dropped(), 1);
    drop(o);
    let mut o = Outbox::open(dir.path(), 2).expect("reopen");
    assert_eq!(seqs(&o), vec![1, 3], "the drop survives a restart");
    o.pop().expect("pop");
    let o = Outbox::open(dir.path(), 2).expect("reopen");
    assert_eq!(seqs(&o), vec![3]);
}

#[test]
fn a_torn_line_and_garbage_are_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut o = Outbox::open(dir.path(), 10).expect("open");
        o.push(vec![undrained(1)]).expect("push");
    }
    let log = log_of(dir.path());
    let mut f = OpenOptions::new().append(true).open(&log).expect("open");
    f.write_all(b"garbage \xff\n").expect("write");
    let mut line = serde_json::to_vec(&undrained(2)).expect("json");
    line.push(b'\n');
    f.write_all(&line).expect("write");
    f.write_all(b"{\"v\":1,\"kin").expect("write");
    drop(f);
    let mut o = Outbox::open(dir.path(), 10).expect("reopen");
    assert_eq!(seqs(&o), vec![1, 2]);
    assert_eq!(o.unreadable_at_open(), 2);
    // The torn tail is gone: what comes next is a line of its own.
    o.push(vec![undrained(3)]).expect("push");
    drop(o);
    let o = Outbox::open(dir.path(), 10).expect("reopen");
    assert_eq!(seqs(&o), vec![1, 2, 3]);
    assert_eq!(o.unreadable_at_open(), 0);
}

#[test]
fn a_lost_position_resends_the_newest_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut o = Outbox::open(dir.path(), 10).expect("open");
        o.push((1..=3).map(undrained).collect()).expect("push");
        o.pop().expect("pop");
    }
    std::fs::write(dir.path().join(POSITION), b"\0\0garbage").expect("clobber");
    let o = Outbox::open(dir.path(), 10).expect("reopen");
    assert_eq!(seqs(&o), vec![1, 2, 3], "sent again; the stream dedupes");
}

#[test]
fn an_interrupted_compaction_leaves_the_old_log_in_charge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let generation = {
        let mut o = Outbox::open(dir.path(), 10).expect("open");
        o.push((1..=2).map(undrained).collect()).expect("push");
        o.generation
    };
    // A crash after the next log was (partly) written, before the position named it.
    let stray = log_path(dir.path(), generation + 1);
    std::fs::write(&stray, b"{\"half").expect("stray");
    let o = Outbox::open(dir.path(), 10).expect("reopen");
    assert_eq!(seqs(&o), vec![1, 2]);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(generation_of))
        .collect();
    assert_eq!(left, vec![o.generation], "one log left");
}

#[test]
fn the_legacy_log_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = Vec::new();
    for s in 1..=2 {
        serde_json::to_writer(&mut text, &undrained(s)).expect("json");
        text.push(b'\n');
    }
    std::fs::write(dir.path().join("outbox.jsonl"), &text).expect("write");
    let o = Outbox::open(dir.path(), 10).expect("open");
    assert_eq!(seqs(&o), vec![1, 2]);
}

/// One line of a log as a crash, a disk or a person might leave it.
fn line() -> impl Strategy<Value = Vec<u8>> {
    let valid = (1u64..1000).prop_map(|s| serde_json::to_vec(&undrained(s)).unwrap_or_default());
    prop_oneof![
        valid.clone(),
        (valid, any::<prop::sample::Index>()).prop_map(|(v, i)| v[..i.index(v.len())].to_vec()),
        prop::collection::vec(any::<u8>().prop_filter("one line", |b| *b != b'\n'), 0..64),
        Just(b"{\"v\":1,\"kind\":\"nope\"}".to_vec()),
        Just(b"null".to_vec()),
        Just(b"{\"v\":1,\"kind\":\"undrained\",\"seq\":-1}".to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn reading_arbitrary_bytes_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        offset in any::<u64>(),
        skip in prop::collection::btree_set(any::<u64>(), 0..4),
    ) {
        let pos = Position { log: 0, offset: offset % 300, skip };
        let read = read_log(&bytes, &pos);
        prop_assert!(read.entries.len() + read.unreadable.len() <= bytes.len());
        let _ = parse_position(&bytes);
    }

    #[test]
    fn every_complete_event_line_is_read_and_nothing_else(
        lines in prop::collection::vec(line(), 0..12),
        torn_tail in prop::collection::vec(any::<u8>().prop_filter("one line", |b| *b != b'\n'), 0..16),
    ) {
        let mut bytes = Vec::new();
        for l in &lines {
            bytes.extend_from_slice(l);
            bytes.push(b'\n');
        }
        bytes.extend_from_slice(&torn_tail);
        let read = read_log(&bytes, &Position::default());
        let expected: Vec<u64> = lines
            .iter()
            .filter_map(|l| serde_json::from_slice::<Event>(l).ok())
            .map(|e| e.seq)
            .collect();
        prop_assert_eq!(read.events().map(|e| e.seq).collect::<Vec<_>>(), expected);
        for e in &read.entries {
            let line = &bytes[e.start as usize..e.end as usize];
            prop_assert_eq!(line.last(), Some(&b'\n'));
        }
    }

    #[test]
    fn a_position_file_of_any_shape_never_panics(
        text in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            (any::<u64>(), any::<u64>(), prop::collection::vec(any::<i64>(), 0..4)).prop_map(
                |(l, o, s)| format!("{{\"log\":{l},\"offset\":{o},\"skip\":{s:?}}}").into_bytes()
            ),
        ],
    ) {
        let _ = parse_position(&text);
    }
}
