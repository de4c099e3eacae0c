//! The `ebb` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ebb",
    version,
    about = "Node agent for HAProxy fleets: seamless reloads and safe drains, commanded over NATS",
    long_about = "ebb runs beside HAProxy on every proxy node. It owns the node's HAProxy processes, \
reloads them without losing a connection, tracks old workers until they exit, and takes \
status/reload/drain/undrain/stop commands over NATS."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run the agent: adopt or start HAProxy and serve commands until stopped.
    ///
    /// Signals: SIGHUP reloads; SIGTERM/SIGINT stop HAProxy gracefully, then exit; SIGUSR2 exits
    /// and leaves HAProxy running for the next agent to adopt (use it for restarts and upgrades).
    Agent {
        /// The agent's TOML configuration.
        #[arg(long, env = "EBB_CONFIG", default_value = "/etc/ebb/agent.toml")]
        config: PathBuf,
    },
    /// Command nodes over NATS: status, reload, drain, undrain, stop, watch.
    ///
    /// Exit codes: 0 every node ok; 1 some node failed; 2 usage error (nothing was sent); 3
    /// timeout or unreachable. The server comes from --nats or NATS_URL (the agent's EBB_*
    /// variables are not read).
    Ctl(Box<crate::ctl::CtlArgs>),
    /// Work with plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a shell completion script to stdout.
    ///
    /// For example: `ebb completions bash > /etc/bash_completion.d/ebb`. The Debian package
    /// installs them for bash, zsh and fish.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration (with EBB_<SECTION>__<KEY> overrides applied) and print the
    /// effective result. Also runs `haproxy -c` on the configured haproxy.cfg, so a file HAProxy
    /// would refuse fails here too. Exits 0 when valid, 1 with one line per problem otherwise.
    Check {
        #[arg(long, env = "EBB_CONFIG", default_value = "/etc/ebb/agent.toml")]
        config: PathBuf,
        /// Skip `haproxy -c` (for example on a machine without the haproxy.cfg's certificates).
        #[arg(long)]
        no_haproxy: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Show a plugin file's ABI version, name, version, capabilities and sha256 (for the `sha256` pin),
    /// or say why the agent would not load it. Runs the agent's checks (owner, mode, ABI version) and
    /// the library's initializers, but creates no instance. Exits 0 when loadable, 1 otherwise.
    Inspect {
        /// The plugin's shared library (.so).
        path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}
