use super::*;

use proptest::prelude::*;

fn nodes(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn drain_sends(g: &mut Gathering, now: Instant) -> Vec<Dest> {
    std::iter::from_fn(|| g.poll_transmit(now)).collect()
}

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_reply_lost_with_a_server_is_asked_for_again_once_and_only_from_the_silent_nodes() {
    let t0 = Instant::now();
    let mut g = Gathering::new(None, nodes(&["a", "b", "c"]), t0, WAIT);
    assert_eq!(drain_sends(&mut g, t0), vec![Dest::Target]);
    g.handle_reply("a");
    assert_eq!(drain_sends(&mut g, t0 + RETRY_AFTER / 2), vec![]);
    assert_eq!(g.poll_timeout(), t0 + RETRY_AFTER);
    assert_eq!(
        drain_sends(&mut g, t0 + RETRY_AFTER),
        vec![Dest::Node("b".into()), Dest::Node("c".into())]
    );
    assert!(g.retried());
    // Never a second retry, however long the wait.
    assert_eq!(drain_sends(&mut g, t0 + WAIT / 2), vec![]);
    g.handle_reply("b");
    g.handle_reply("c");
    assert!(g.is_done(t0 + WAIT / 2));
}

#[test]
fn the_retry_goes_as_soon_as_the_clients_own_connection_is_back() {
    let t0 = Instant::now();
    let mut g = Gathering::new(Some("a".into()), nodes(&["a"]), t0, WAIT);
    assert_eq!(drain_sends(&mut g, t0), vec![Dest::Target]);
    g.handle_connection_lost();
    // Not while it is down: the retry would wait in the client's buffer behind the lost reply.
    assert_eq!(drain_sends(&mut g, t0 + RETRY_AFTER), vec![]);
    let back = t0 + RETRY_AFTER + Duration::from_millis(300);
    g.handle_connection_back(back);
    assert_eq!(drain_sends(&mut g, back), vec![Dest::Target]);
    g.handle_connection_lost();
    g.handle_connection_back(back + Duration::from_secs(1));
    assert_eq!(drain_sends(&mut g, back + Duration::from_secs(1)), vec![]);
}

#[test]
fn a_short_wait_retries_at_its_half() {
    let t0 = Instant::now();
    let mut g = Gathering::new(
        Some("a".into()),
        BTreeSet::new(),
        t0,
        Duration::from_secs(1),
    );
    drain_sends(&mut g, t0);
    assert_eq!(g.poll_timeout(), t0 + Duration::from_millis(500));
}

#[test]
fn a_known_node_between_servers_is_asked_again_until_it_listens() {
    let t0 = Instant::now();
    let mut g = Gathering::new(Some("a".into()), nodes(&["a"]), t0, WAIT);
    drain_sends(&mut g, t0);
    g.handle_no_responders(Dest::Target, t0);
    assert!(!g.is_done(t0));
    assert_eq!(drain_sends(&mut g, t0), vec![]);
    assert_eq!(g.poll_timeout(), t0 + RESEND_FIRST);
    assert_eq!(drain_sends(&mut g, t0 + RESEND_FIRST), vec![Dest::Target]);
    // Again nobody: a longer pause.
    let t1 = t0 + RESEND_FIRST;
    g.handle_no_responders(Dest::Target, t1);
    assert_eq!(g.poll_timeout(), t1 + RESEND_FIRST * 2);
    g.handle_reply("a");
    assert!(g.is_done(t1) && !g.no_responders());
}

#[test]
fn a_known_node_gone_longer_than_the_grace_is_reported_as_unreachable() {
    let t0 = Instant::now();
    let mut g = Gathering::new(Some("a".into()), nodes(&["a"]), t0, WAIT);
    drain_sends(&mut g, t0);
    g.handle_no_responders(Dest::Target, t0 + MOVE_GRACE);
    assert!(g.is_done(t0 + MOVE_GRACE) && g.no_responders());
}

#[test]
fn a_node_nobody_knows_with_no_responders_ends_at_once() {
    let t0 = Instant::now();
    let mut g = Gathering::new(Some("typo".into()), BTreeSet::new(), t0, WAIT);
    drain_sends(&mut g, t0);
    g.handle_no_responders(Dest::Target, t0);
    assert!(g.is_done(t0) && g.no_responders());
}

#[test]
fn a_retried_node_that_is_between_servers_is_asked_again_without_ending_the_fan_out() {
    let t0 = Instant::now();
    let mut g = Gathering::new(None, nodes(&["a", "b"]), t0, WAIT);
    drain_sends(&mut g, t0);
    g.handle_reply("a");
    let t1 = t0 + RETRY_AFTER;
    assert_eq!(drain_sends(&mut g, t1), vec![Dest::Node("b".into())]);
    g.handle_no_responders(Dest::Node("b".into()), t1);
    assert!(!g.is_done(t1));
    assert_eq!(
        drain_sends(&mut g, t1 + RESEND_FIRST),
        vec![Dest::Node("b".into())]
    );
}

#[test]
fn a_group_without_known_nodes_waits_the_whole_wait_and_retries_the_group() {
    let t0 = Instant::now();
    let mut g = Gathering::new(None, BTreeSet::new(), t0, WAIT);
    drain_sends(&mut g, t0);
    g.handle_reply("a");
    assert!(!g.is_done(t0));
    assert_eq!(drain_sends(&mut g, t0 + RETRY_AFTER), vec![Dest::Target]);
    assert!(g.is_done(t0 + WAIT));
}

#[derive(Debug, Clone)]
enum Input {
    Reply(usize),
    NoResponders(Option<usize>),
    Lost,
    Back,
    Advance(u64),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        (0..4usize).prop_map(Input::Reply),
        proptest::option::of(0..4usize).prop_map(Input::NoResponders),
        Just(Input::Lost),
        Just(Input::Back),
        (0..3000u64).prop_map(Input::Advance),
    ]
}

proptest! {
    /// The contract: the command goes out first to the target; besides resends after "no
    /// responders" (nothing was delivered), each node is asked again at most once; nothing is
    /// sent once the fan-out is over; it never outlives its wait.
    #[test]
    fn at_most_one_retry_and_nothing_after_the_end(
        known in 0..4usize,
        single in any::<bool>(),
        inputs in proptest::collection::vec(input(), 0..60),
    ) {
        let names = ["a", "b", "c", "d"];
        let t0 = Instant::now();
        let expected: BTreeSet<String> = names[..known].iter().map(|s| s.to_string()).collect();
        let mut g = Gathering::new(single.then(|| "a".to_string()), expected, t0, WAIT);
        let mut now = t0;
        let first = drain_sends(&mut g, now);
        prop_assert_eq!(first.first(), Some(&Dest::Target));
        // Sends that may have reached an agent: all but those the server answered with "no
        // responders".
        let mut delivered: BTreeMap<Dest, u32> = BTreeMap::new();
        for d in first {
            *delivered.entry(d).or_default() += 1;
        }
        for i in inputs {
            match i {
                Input::Reply(n) => g.handle_reply(names[n]),
                Input::NoResponders(n) => {
                    let dest = n.map_or(Dest::Target, |n| Dest::Node(names[n].to_string()));
                    // The server says so only of a send that went out.
                    if let Some(c) = delivered.get_mut(&dest).filter(|c| **c > 0) {
                        *c -= 1;
                        g.handle_no_responders(dest, now);
                    }
                }
                Input::Lost => g.handle_connection_lost(),
                Input::Back => g.handle_connection_back(now),
                Input::Advance(ms) => now += Duration::from_millis(ms),
            }
            let over = g.finished;
            let sent = drain_sends(&mut g, now);
            if over {
                prop_assert!(sent.is_empty());
            }
            for d in sent {
                *delivered.entry(d).or_default() += 1;
            }
            prop_assert!(g.poll_timeout() <= t0 + WAIT);
            for (dest, count) in &delivered {
                let most = if *dest == Dest::Target { 2 } else { 1 };
                prop_assert!(*count <= most, "{:?}", delivered);
            }
        }
        prop_assert!(g.is_done(t0 + WAIT));
    }
}
