//! The command line of `ebb ctl`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ebb_sdk::client::Target as ClientTarget;

use crate::config::{Dur, NatsConfig};

#[derive(Debug, Args)]
pub struct CtlArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub verb: CtlVerb,
}

/// Connection options. Like the `nats` CLI, each may come from a `NATS_*` variable, or from a
/// `nats` CLI context (`--context`); the agent's own `EBB_*` variables are not read.
///
/// They are listed apart from each verb's own options, under "Connection" in `--help`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnArgs {
    /// NATS server URL(s), comma-separated [default: nats://127.0.0.1:4222].
    #[arg(long, global = true, env = "NATS_URL")]
    pub nats: Option<String>,
    /// A `nats` CLI context (~/.config/nats/context/NAME.json): its server and credentials, for
    /// whatever the flags and NATS_* variables leave unset.
    #[arg(long, global = true, env = "NATS_CONTEXT")]
    pub context: Option<String>,
    /// Subject prefix the agents use.
    #[arg(long, global = true, default_value = ebb_sdk::subject::DEFAULT_PREFIX)]
    pub prefix: String,
    /// NATS credentials file.
    #[arg(long, global = true, env = "NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// File holding an NKey seed.
    #[arg(long, global = true, env = "NATS_NKEY")]
    pub nkey: Option<PathBuf>,
    /// NATS token.
    #[arg(long, global = true, env = "NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long, global = true, env = "NATS_USER", requires = "password")]
    pub user: Option<String>,
    #[arg(
        long,
        global = true,
        env = "NATS_PASSWORD",
        hide_env_values = true,
        requires = "user"
    )]
    pub password: Option<String>,
    /// CA certificate to verify the server.
    #[arg(long, global = true, env = "NATS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (with --tls-key).
    #[arg(long, global = true, env = "NATS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "NATS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How long to wait for replies. reload and stop wait this much beyond the work's own limit
    /// (the node's startup or stop timeout), and end as soon as every node answered.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_dur)]
    pub timeout: Dur,
    /// Print machine-readable JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Command the agent on this machine through its control socket, with no NATS at all (for
    /// when NATS is down). Takes no --node, --group or --all.
    #[arg(long, global = true)]
    pub local: bool,
    /// The agent's control socket (its control.socket), with --local.
    #[arg(long, global = true, default_value = crate::config::DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,
}

impl ConnArgs {
    pub fn nats_config(&self) -> NatsConfig {
        NatsConfig {
            url: self
                .nats
                .clone()
                .unwrap_or_else(|| NatsConfig::default().url),
            prefix: self.prefix.clone(),
            creds: self.creds.clone(),
            nkey_seed: self.nkey.clone(),
            token: self.token.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            ..NatsConfig::default()
        }
    }
}

/// Which nodes a verb goes to: one of the three over NATS; none with --local.
#[derive(Debug, Args, Clone)]
#[group(required = false, multiple = false)]
pub struct Target {
    /// One node, by id.
    #[arg(long)]
    pub node: Option<String>,
    /// Every node of a group.
    #[arg(long)]
    pub group: Option<String>,
    /// Every node.
    #[arg(long)]
    pub all: bool,
}

impl Target {
    /// Whether --node, --group or --all was given.
    pub fn is_given(&self) -> bool {
        self.node.is_some() || self.group.is_some() || self.all
    }

    pub fn to_target(&self) -> ClientTarget {
        match (&self.node, &self.group) {
            (Some(n), _) => ClientTarget::Node(n.clone()),
            (None, Some(g)) => ClientTarget::Group(g.clone()),
            (None, None) => ClientTarget::All,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Copied into the events the command causes.
    #[arg(long)]
    pub reason: Option<String>,
    /// Idempotency key: a repeat gets the first reply and acts only once.
    #[arg(long)]
    pub request_id: Option<String>,
}

/// Rollout batch size: a count, or a percentage of the target's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallel {
    Count(usize),
    Percent(u8),
}

impl Parallel {
    /// Nodes per batch for `total` nodes: at least 1.
    pub fn batch(self, total: usize) -> usize {
        match self {
            Parallel::Count(n) => n.max(1),
            Parallel::Percent(p) => (total * p as usize).div_ceil(100).max(1),
        }
    }
}

fn parse_parallel(s: &str) -> Result<Parallel, String> {
    let bad = || format!("{s:?}: write a count like 2 or a percentage like 25%");
    match s.strip_suffix('%') {
        Some(p) => match p.parse::<u8>() {
            Ok(p) if (1..=100).contains(&p) => Ok(Parallel::Percent(p)),
            _ => Err(bad()),
        },
        None => match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Parallel::Count(n)),
            _ => Err(bad()),
        },
    }
}

pub fn parse_dur(s: &str) -> Result<Dur, String> {
    humantime::parse_duration(s)
        .map(Dur)
        .map_err(|e| format!("{e}; write durations like \"500ms\" or \"10s\""))
}

#[derive(Debug, Subcommand)]
pub enum CtlVerb {
    /// Show each node's state, HAProxy worker, old workers, last reload and drain blockers.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Reload HAProxy seamlessly from its config file on disk.
    ///
    /// With --max-parallel, a rolling reload: batch after batch, each waiting for its nodes'
    /// `reloaded` events, stopping at the first failure unless --continue-on-error.
    Reload {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        common: Common,
        /// Roll through the nodes N at a time (or P% at a time).
        #[arg(long, value_parser = parse_parallel)]
        max_parallel: Option<Parallel>,
        /// Keep rolling after a node failed.
        #[arg(long, requires = "max_parallel")]
        continue_on_error: bool,
    },
    /// Push a haproxy.cfg: each node checks it (its push policy, `haproxy -c`), installs it and
    /// reloads. The nodes must have push.enabled; see docs/SECURITY.md.
    Push {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        common: Common,
        /// The haproxy.cfg to push.
        #[arg(long)]
        config: PathBuf,
        /// Sign the push with this nkey seed file (`SU…`), for nodes with push.keys. The
        /// signature holds for the subject this push is sent to and for one minute.
        #[arg(long)]
        sign_key: Option<PathBuf>,
        /// Push to a group or every node without asking first.
        #[arg(long)]
        yes: bool,
    },
    /// Start draining: each node publishes `drained` once no request can be cut.
    Drain {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        common: Common,
        /// Floor before a node may be drained (default: the node's drain.min_period).
        #[arg(long, value_parser = parse_dur)]
        min_period: Option<Dur>,
        /// Report (or force, per the node's on_deadline) when not drained by then.
        #[arg(long, value_parser = parse_dur)]
        deadline: Option<Dur>,
        /// Stop HAProxy gracefully once drained.
        #[arg(long)]
        stop_when_drained: bool,
        /// Name the drain (default: a new UUID).
        #[arg(long)]
        drain_id: Option<String>,
        /// Follow progress until every node is drained, at most this long (bare --wait: 1h).
        #[arg(long, value_parser = parse_dur, num_args = 0..=1, default_missing_value = "1h")]
        wait: Option<Dur>,
        /// Roll through the nodes, at most N (or P%) draining at once: as soon as one is drained,
        /// the next starts. Each node is waited for at most --wait (1h by default).
        #[arg(long, value_parser = parse_parallel)]
        max_parallel: Option<Parallel>,
        /// Keep rolling after a node failed.
        #[arg(long, requires = "max_parallel")]
        continue_on_error: bool,
        /// Do not ask for confirmation (required to drain --all without a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// End a drain: the node serves again.
    Undrain {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        common: Common,
        /// Only undrain this drain.
        #[arg(long)]
        drain_id: Option<String>,
    },
    /// Stop HAProxy gracefully on the target.
    Stop {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        common: Common,
        /// How long HAProxy may take before it is hard-stopped (default: the node's stop_timeout).
        #[arg(long, value_parser = parse_dur)]
        stop_timeout: Option<Dur>,
        /// Do not ask for confirmation (required to stop a fleet without a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Stream events (recent history first, from JetStream when available).
    Watch(WatchArgs),
}

impl CtlVerb {
    pub fn target(&self) -> Option<&Target> {
        match self {
            CtlVerb::Status { target }
            | CtlVerb::Reload { target, .. }
            | CtlVerb::Push { target, .. }
            | CtlVerb::Drain { target, .. }
            | CtlVerb::Undrain { target, .. }
            | CtlVerb::Stop { target, .. } => Some(target),
            CtlVerb::Watch(_) => None,
        }
    }
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this node's events.
    #[arg(long, conflicts_with = "group")]
    pub node: Option<String>,
    /// Only events of this group's nodes (as known now).
    #[arg(long, conflicts_with = "all")]
    pub group: Option<String>,
    /// Every node's events (the default).
    #[arg(long, conflicts_with = "node")]
    pub all: bool,
    /// Replay history from this long ago (JetStream only); 0s for new events only.
    #[arg(long, default_value = "10m", value_parser = parse_dur)]
    pub since: Dur,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<usize>,
    /// Exit after this long (default: run until interrupted).
    #[arg(long = "for", value_parser = parse_dur)]
    pub duration: Option<Dur>,
    /// Only these kinds (e.g. drained,reloaded).
    #[arg(long, value_delimiter = ',')]
    pub kind: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_counts_and_percentages() {
        assert_eq!(parse_parallel("3"), Ok(Parallel::Count(3)));
        assert_eq!(parse_parallel("25%"), Ok(Parallel::Percent(25)));
        assert!(parse_parallel("0").is_err());
        assert!(parse_parallel("101%").is_err());
        assert!(parse_parallel("x").is_err());
        assert_eq!(Parallel::Percent(25).batch(20), 5);
        assert_eq!(Parallel::Percent(10).batch(3), 1);
        assert_eq!(Parallel::Percent(50).batch(3), 2);
        assert_eq!(Parallel::Count(4).batch(2), 4);
    }
}
