//! What `ebb ctl` checks before it sends anything; each problem is a usage error (exit 2): ids
//! that no subject can carry, files it cannot read, and a fleet-wide command nobody confirmed.

use std::io::IsTerminal;
use std::path::Path;

use super::args::{ConnArgs, CtlVerb};
use super::exit::Failure;

/// What the command line names on disk, read once here.
#[derive(Default)]
pub struct Local {
    /// The haproxy.cfg of `push --config`.
    pub pushed: Option<String>,
    /// The seed of `push --sign-key`.
    pub seed: Option<String>,
}

/// Checks the command line and reads the files it names.
pub async fn check(conn: &ConnArgs, verb: &CtlVerb) -> Result<Local, Failure> {
    if conn.local {
        local_only(verb).map_err(Failure::Usage)?;
    } else if verb.target().is_some_and(|t| !t.is_given()) {
        return Err(Failure::Usage(
            "this verb needs --node, --group or --all, or --local for the agent on this machine \
             (nothing was sent)"
                .into(),
        ));
    }
    match verb {
        CtlVerb::Watch(w) => validate_ids(&w.node, &w.group),
        _ => verb
            .target()
            .map_or(Ok(()), |t| validate_ids(&t.node, &t.group)),
    }
    .map_err(Failure::Usage)?;
    for (flag, path) in [
        ("--nkey", &conn.nkey),
        ("--tls-ca", &conn.tls_ca),
        ("--tls-cert", &conn.tls_cert),
        ("--tls-key", &conn.tls_key),
    ] {
        if let Some(path) = path {
            read(flag, path)?;
        }
    }
    if let Some(path) = &conn.creds {
        read("--creds", path)?;
        async_nats::ConnectOptions::new()
            .credentials_file(path)
            .await
            .map_err(|e| {
                Failure::Usage(format!(
                    "--creds {} is not a NATS credentials file ({e}); pass the .creds file `nsc` \
                     or your NATS operator gave you",
                    path.display()
                ))
            })?;
    }
    let mut local = Local::default();
    if let CtlVerb::Push {
        config, sign_key, ..
    } = verb
    {
        local.pushed = Some(read("--config", config)?);
        if let Some(path) = sign_key {
            local.seed = Some(
                ebb_sdk::push::read_seed_file(path)
                    .map_err(|e| Failure::Usage(format!("--sign-key: {e} (nothing was sent)")))?,
            );
        }
    }
    if let Some(question) = needs_confirmation(verb) {
        confirm(&question)?;
    }
    Ok(local)
}

/// What `--local` cannot do: it commands the one agent on this machine, and has no events.
fn local_only(verb: &CtlVerb) -> Result<(), String> {
    match verb {
        CtlVerb::Watch(_) => Err(
            "watch follows events over NATS, which --local does not use; poll `ebb ctl --local \
             status` instead (nothing was sent)"
                .into(),
        ),
        CtlVerb::Reload {
            max_parallel: Some(_),
            ..
        }
        | CtlVerb::Drain {
            max_parallel: Some(_),
            ..
        } => Err(
            "--max-parallel rolls through nodes over NATS; --local commands this node only: drop \
             one of them (nothing was sent)"
                .into(),
        ),
        _ if verb.target().is_some_and(|t| t.is_given()) => Err(
            "--local commands the agent on this machine: drop --node, --group and --all, or \
             drop --local to go through NATS (nothing was sent)"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// Ids become subject tokens: a `.`, `*` or `>` would address other nodes than the one named.
fn validate_ids(node: &Option<String>, group: &Option<String>) -> Result<(), String> {
    for (flag, value) in [("--node", node), ("--group", group)] {
        if let Some(v) = value {
            if !ebb_sdk::subject::is_valid_token(v) {
                return Err(format!(
                    "{flag} {v:?} is not a valid id (^[A-Za-z0-9_-]{{1,64}}$)"
                ));
            }
        }
    }
    Ok(())
}

fn read(flag: &str, path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| {
        Failure::Usage(format!(
            "cannot read {flag} {}: {e}; check the path and its permissions (nothing was sent)",
            path.display()
        ))
    })
}

/// The question to ask before a command that reaches many nodes at once and takes them out of
/// service: `drain --all`, and `stop` of a group or every node. `None` when `--yes` was given or
/// the command is not one of those.
fn needs_confirmation(verb: &CtlVerb) -> Option<String> {
    match verb {
        CtlVerb::Drain {
            target, yes: false, ..
        } if target.all => Some("Drain every node?".into()),
        CtlVerb::Stop {
            target, yes: false, ..
        } if target.node.is_none() => Some(match &target.group {
            Some(g) => format!("Stop HAProxy on every node of group {g}?"),
            None => "Stop HAProxy on every node?".into(),
        }),
        CtlVerb::Push {
            target, yes: false, ..
        } if target.node.is_none() => Some(match &target.group {
            Some(g) => format!("Push this config to every node of group {g}?"),
            None => "Push this config to every node?".into(),
        }),
        _ => None,
    }
}

fn confirm(question: &str) -> Result<(), Failure> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Failure::Usage(format!(
            "{question} Nobody can confirm: stdin is not a terminal. Pass --yes to go ahead \
             (nothing was sent)"
        )));
    }
    eprint!("{question} [y/N] ");
    let mut line = String::new();
    if stdin.read_line(&mut line).is_ok() && matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Failure::Usage(
            "not confirmed; nothing was sent (--yes skips the question)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        verb: CtlVerb,
    }

    fn question(args: &[&str]) -> Option<String> {
        let cli = Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        needs_confirmation(&cli.verb)
    }

    #[test]
    fn fleet_wide_drains_and_stops_ask_first() {
        assert!(question(&["drain", "--all"]).is_some());
        assert!(question(&["stop", "--all"]).is_some());
        assert!(question(&["stop", "--group", "web"]).is_some_and(|q| q.contains("web")));
    }

    #[test]
    fn one_node_a_group_drain_and_yes_do_not_ask() {
        assert_eq!(question(&["drain", "--group", "web"]), None);
        assert_eq!(question(&["drain", "--all", "--yes"]), None);
        assert_eq!(question(&["stop", "--node", "web-1"]), None);
        assert_eq!(question(&["stop", "--all", "--yes"]), None);
        assert_eq!(question(&["reload", "--all"]), None);
    }
}
