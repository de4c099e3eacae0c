//! `ebb ctl`: command one node, a group or the whole fleet over NATS, through the sdk's fleet
//! client.
//!
//! - Everything local is checked before anything is sent ([`preflight`]): a problem there is a
//!   usage error (exit 2).
//! - A plain command is published once to the target subject; replies are gathered until the
//!   wait ends, or until every known node answered (known: fresh KV `ebb_nodes` records, or else
//!   `$SRV.PING.ebb`). `reload` and `stop` wait as long as their work may take ([`reply_wait`]).
//! - "No responders" from the server ends it at once: no agent of the target is connected.
//! - `drain --wait` follows events (subscribed before sending) with a live progress view.
//! - `reload --max-parallel` and `drain --max-parallel` roll through the target, N nodes in
//!   flight ([`rollout`]).
//! - `push` sends a haproxy.cfg; a group or fleet push asks first.
//! - `watch` streams events, from JetStream when it is there ([`watch`]).
//! - `--local` sends the same commands to the agent on this machine through its control socket,
//!   with no NATS at all ([`local`]).

mod args;
mod context;
pub mod exit;
mod local;
mod output;
mod preflight;
mod reply_wait;
mod rollout;
mod table;
mod wait;
mod watch;

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::time::SystemTime;

use ebb_sdk::client::{Client, Target};
use ebb_sdk::command::{
    Command, DrainRequest, PushRequest, ReloadRequest, StatusRequest, StopRequest, UndrainRequest,
};
use ebb_sdk::subject::Verb;

pub use args::{CtlArgs, CtlVerb};

use crate::bus::connect;
use args::{ConnArgs, Parallel};
use exit::Failure;
use reply_wait::{Limits, Work};

/// How long a signed push stays valid: enough for clock skew and a slow server, short enough that
/// a captured push cannot be replayed later.
const SIGNED_TTL_MS: u64 = 60_000;

/// Runs `ebb ctl`; returns the process exit code.
pub async fn run(args: CtlArgs) -> u8 {
    match run_inner(args).await {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("ebb ctl: {failure}");
            failure.code()
        }
    }
}

async fn run_inner(args: CtlArgs) -> Result<u8, Failure> {
    let CtlArgs { mut conn, verb } = args;
    if let Some(name) = conn.context.clone() {
        let env: HashMap<String, OsString> = ["XDG_CONFIG_HOME", "HOME"]
            .into_iter()
            .filter_map(|k| Some((k.to_string(), std::env::var_os(k)?)))
            .collect();
        let found = context::load(&name, &env).map_err(Failure::Usage)?;
        context::apply(&mut conn, &found, env.get("HOME"));
    }
    let files = preflight::check(&conn, &verb).await?;
    if conn.local {
        return local::run(&conn, &verb, &files).await;
    }
    let client = connect_client(&conn).await?;
    if let CtlVerb::Watch(w) = &verb {
        return Ok(watch::run(&client, &conn, w).await?);
    }
    let Some(target) = verb.target() else {
        return Err(Failure::Usage(
            "this verb needs --node, --group or --all".into(),
        ));
    };
    let target = target.to_target();
    let (mut command, work) = command_of(&verb, &files);
    if let Some((rolling, parallel, continue_on_error)) = rolling_of(&verb, &command) {
        return Ok(rollout::run(
            &client,
            &conn,
            &target,
            rolling,
            parallel,
            continue_on_error,
        )
        .await?);
    }
    match (&verb, &mut command) {
        (
            CtlVerb::Drain {
                wait: Some(wait_for),
                ..
            },
            Command::Drain(req),
        ) => return Ok(wait::run(&client, &conn, &target, req.clone(), wait_for.0).await?),
        (_, Command::Push(req)) => {
            // Signed for the one subject this push is published on.
            let subject = target.subject(client.prefix(), Verb::Push.as_str());
            sign(req, &files, &subject)?;
        }
        _ => {}
    }
    fan_out(&client, &conn, &target, &command, work).await
}

/// What `--max-parallel` rolls through the nodes, with its parallelism and whether it goes on
/// after a failure; `None` for a command sent to the target at once.
fn rolling_of(verb: &CtlVerb, command: &Command) -> Option<(rollout::Rolling, Parallel, bool)> {
    match (verb, command) {
        (
            CtlVerb::Reload {
                max_parallel: Some(parallel),
                continue_on_error,
                ..
            },
            Command::Reload(req),
        ) => Some((
            rollout::Rolling::Reload(req.clone()),
            *parallel,
            *continue_on_error,
        )),
        (
            CtlVerb::Drain {
                max_parallel: Some(parallel),
                continue_on_error,
                wait,
                ..
            },
            Command::Drain(req),
        ) => Some((
            rollout::Rolling::Drain {
                req: req.clone(),
                wait: wait.map_or(rollout::DRAIN_WAIT, |w| w.0),
            },
            *parallel,
            *continue_on_error,
        )),
        _ => None,
    }
}

/// The command a verb sends, and the work its reply waits for. Watch sends none (it gets
/// `status`, never sent).
fn command_of(verb: &CtlVerb, files: &preflight::Local) -> (Command, Work) {
    match verb {
        CtlVerb::Watch(_) | CtlVerb::Status { .. } => (
            Command::Status(StatusRequest {
                requester: Some(requester()),
                ..StatusRequest::default()
            }),
            Work::None,
        ),
        CtlVerb::Reload { common, .. } => (
            Command::Reload(ReloadRequest {
                request_id: common.request_id.clone(),
                requester: Some(requester()),
                reason: common.reason.clone(),
                sent_at: Some(now()),
                ..ReloadRequest::default()
            }),
            Work::Reload,
        ),
        CtlVerb::Push { common, .. } => {
            let text = files.pushed.clone().unwrap_or_default();
            let sha = crate::digest::sha256_hex(text.as_bytes());
            (
                Command::Push(PushRequest {
                    request_id: common.request_id.clone(),
                    requester: Some(requester()),
                    reason: common.reason.clone(),
                    sent_at: Some(now()),
                    config_sha256: Some(sha),
                    config: Some(text),
                    ..PushRequest::default()
                }),
                Work::Push,
            )
        }
        CtlVerb::Drain {
            common,
            min_period,
            deadline,
            stop_when_drained,
            drain_id,
            ..
        } => (
            Command::Drain(DrainRequest {
                request_id: common.request_id.clone(),
                requester: Some(requester()),
                reason: common.reason.clone(),
                sent_at: Some(now()),
                drain_id: drain_id.clone(),
                min_period_ms: min_period.map(|d| d.0.as_millis() as u64),
                deadline_ms: deadline.map(|d| d.0.as_millis() as u64),
                stop_when_drained: stop_when_drained.then_some(true),
                ..DrainRequest::default()
            }),
            Work::None,
        ),
        CtlVerb::Undrain {
            common, drain_id, ..
        } => (
            Command::Undrain(UndrainRequest {
                request_id: common.request_id.clone(),
                requester: Some(requester()),
                reason: common.reason.clone(),
                sent_at: Some(now()),
                drain_id: drain_id.clone(),
                ..UndrainRequest::default()
            }),
            Work::None,
        ),
        CtlVerb::Stop {
            common,
            stop_timeout,
            ..
        } => (
            Command::Stop(StopRequest {
                request_id: common.request_id.clone(),
                requester: Some(requester()),
                reason: common.reason.clone(),
                sent_at: Some(now()),
                timeout_ms: stop_timeout.map(|d| d.0.as_millis() as u64),
                ..StopRequest::default()
            }),
            Work::Stop {
                timeout: stop_timeout.map(|d| d.0),
            },
        ),
    }
}

/// Signs a push with `--sign-key`, when given, for the subject it goes to.
fn sign(req: &mut PushRequest, files: &preflight::Local, subject: &str) -> Result<(), Failure> {
    let Some(seed) = &files.seed else {
        return Ok(());
    };
    let (Some(sent_at), Some(sha)) = (&req.sent_at, &req.config_sha256) else {
        return Ok(());
    };
    req.signature = Some(
        ebb_sdk::push::sign(seed, subject, sent_at, sha)
            .map_err(|e| Failure::Usage(format!("--sign-key: {e}")))?,
    );
    req.ttl_ms = Some(SIGNED_TTL_MS);
    Ok(())
}

/// Sends `command` to `target` and prints what came back. For work with limits, a status
/// fan-out first learns them (and who is there).
async fn fan_out(
    client: &Client,
    conn: &ConnArgs,
    target: &Target,
    command: &Command,
    work: Work,
) -> Result<u8, Failure> {
    let margin = conn.timeout.0;
    let mut expected = known_nodes(client, target).await?;
    let wait = if work == Work::None {
        margin
    } else {
        let learnt = reply_wait::learn(client, target, &expected, margin).await?;
        if learnt.no_responders {
            let subject = target.subject(client.prefix(), command.verb().as_str());
            let missing = silent(target, &expected, &BTreeSet::new());
            output::no_responders(conn.json, &subject, client.prefix(), &missing);
            return Ok(exit::TIMEOUT);
        }
        expected = learnt.names();
        let limits: Vec<Limits> = expected.iter().map(|n| learnt.limits(n)).collect();
        reply_wait::for_fleet(work, &limits, margin)
    };
    let mut collected = output::Collected::new(conn.json, command.verb().as_str());
    let report = client
        .gather_each(target, command, &expected, wait, |r| collected.take(r))
        .await?;
    if report.no_responders {
        let missing = silent(target, &expected, &BTreeSet::new());
        output::no_responders(conn.json, &report.subject, client.prefix(), &missing);
        return Ok(exit::TIMEOUT);
    }
    let missing = silent(target, &expected, &report.answered);
    collected.print(&missing, wait);
    Ok(collected.exit_code(&missing))
}

/// The nodes that should have answered and did not: the node of a node target, or the known
/// nodes of a group or the fleet.
fn silent(
    target: &Target,
    expected: &BTreeSet<String>,
    answered: &BTreeSet<String>,
) -> Vec<String> {
    match target {
        Target::Node(n) if !answered.contains(n) => vec![n.clone()],
        Target::Node(_) => Vec::new(),
        _ => expected.difference(answered).cloned().collect(),
    }
}

/// The nodes known to exist among the target's: the node of a node target when KV has its
/// record (then a fan-out waits for it while it moves between NATS servers), or the nodes
/// discovery finds.
async fn known_nodes(client: &Client, target: &Target) -> Result<BTreeSet<String>, Failure> {
    Ok(match target {
        Target::Node(n) => client
            .node_record(n)
            .await
            .map(|r| BTreeSet::from([r.node]))
            .unwrap_or_default(),
        other => client.discover(other).await?,
    })
}

async fn connect_client(conn: &ConnArgs) -> Result<Client, Failure> {
    let cfg = conn.nats_config();
    // The files were read in preflight; what fails here is their content.
    let options = connect::options(&cfg, "ebb ctl")
        .await
        .map_err(|e| Failure::Usage(format!("{e:#}")))?;
    let nats = options
        .connect(connect::servers(&cfg.url))
        .await
        .map_err(|e| {
            Failure::Unreachable(format!(
                "cannot connect to NATS at {}: {e}; check --nats (or NATS_URL, or the --context), that the server \
                 runs, and the credentials",
                cfg.url
            ))
        })?;
    Ok(Client::new(nats, &conn.prefix))
}

fn now() -> String {
    crate::events::rfc3339(SystemTime::now())
}

fn requester() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{user}@{host} (ebb ctl)")
}
