//! The `ebb` binary: see `ebb --help`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use ebb_agent::bus::commands::{CommandServer, REQUEST_QUEUE};
use ebb_agent::bus::connect;
use ebb_agent::bus::outbox::Outbox;
use ebb_agent::bus::publisher::{Publisher, PublisherReport, EVENTS_QUEUE};
use ebb_agent::bus::refusals::Refusals;
use ebb_agent::bus::service::CommandService;
use ebb_agent::cli::{Cli, Commands, ConfigCommand, PluginCommand};
use ebb_agent::config::{self, LogFormat, Settings};
use ebb_agent::control::ControlSocket;
use ebb_agent::inbox::{AgentSignal, Input, Summary};
use ebb_agent::node::{Outcome, Shell};
use ebb_sdk::status::NodeState;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Commands::Config {
            command: ConfigCommand::Check { config, no_haproxy },
        } => match config::load(&config, std::env::vars()) {
            Ok(settings) => {
                print!("{}", config::render(&settings));
                if no_haproxy {
                    return ExitCode::SUCCESS;
                }
                match haproxy_check(&settings) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!(
                            "haproxy.config {}: `{} -c` refuses it: {e}; fix the file (or pass --no-haproxy to check only ebb's settings)",
                            settings.config.haproxy.config.display(),
                            settings.haproxy_binary.display()
                        );
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Commands::Completions { shell } => print_completions(shell),
        Commands::Plugin {
            command: PluginCommand::Inspect { path, json },
        } => ExitCode::from(ebb_agent::plugins::inspect::run(&path, json)),
        Commands::Ctl(args) => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("ebb ctl: cannot start the async runtime: {e}");
                    return ExitCode::from(ebb_agent::ctl::exit::FAILED);
                }
            };
            ExitCode::from(runtime.block_on(ebb_agent::ctl::run(*args)))
        }
        Commands::Agent { config } => {
            let settings = match config::load(&config, std::env::vars()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            init_logging(&settings);
            match run_agent(settings) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Writes the whole script at once, so that a closed pipe (`ebb completions bash | head`) is an
/// error message, not a panic halfway.
fn print_completions(shell: clap_complete::Shell) -> ExitCode {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ebb", &mut script);
    match std::io::stdout().lock().write_all(&script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ebb completions {shell}: cannot write the script to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `haproxy -c` on the configured file, as the agent runs it before every reload.
fn haproxy_check(settings: &Settings) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(ebb_agent::haproxy::launch::check_config(
        &settings.haproxy_binary,
        &settings.config.haproxy.config,
        &settings.config.haproxy.env,
        settings.config.push.check_timeout.0,
    ))
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match settings.config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// The agent's exit status after a panic (EX_SOFTWARE): distinct from a configuration or startup
/// failure (1), so that an operator reading `systemctl status` knows it is a bug to report.
const PANIC_EXIT: i32 = 70;

/// A panic anywhere in the agent ends it. A task that panicked would otherwise die alone and leave
/// a half-alive agent: answering `status` while nobody watches a worker's exit, say. HAProxy runs
/// in its own process group and keeps serving; systemd restarts the agent (`Restart=on-failure`
/// in examples/systemd/ebb.service), and the next agent adopts the workers from the state file.
///
/// Plugins are cdylibs with their own copy of std, hence their own panic hook: the SDK catches
/// their panics and turns them into error answers, which this hook never sees.
fn exit_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        tracing::error!(
            "the agent panicked ({info}); exiting with status {PANIC_EXIT} so that its supervisor \
             restarts it; HAProxy keeps serving and the next agent adopts it. Please report this bug"
        );
        std::process::exit(PANIC_EXIT);
    }));
}

/// A test hook, in debug builds only: with `EBB_TEST_PANIC_ON_SIGUSR1=1` in the agent's environment
/// (read once, at start), a task panics when the agent gets SIGUSR1, as a bug would. It shows the
/// panic policy from outside (tests/resources.rs); release builds have no such trigger.
#[cfg(debug_assertions)]
fn spawn_test_panic_trigger() -> anyhow::Result<()> {
    if std::env::var_os("EBB_TEST_PANIC_ON_SIGUSR1").is_none_or(|v| v != "1") {
        return Ok(());
    }
    let mut usr1 = signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?;
    tokio::spawn(async move {
        if usr1.recv().await.is_some() {
            panic!("EBB_TEST_PANIC_ON_SIGUSR1: a task panics, as asked");
        }
    });
    Ok(())
}

/// glibc gives a thread that meets contention an arena of its own, up to 8 per core, and each
/// keeps its high-water mark. The agent's blocking threads (state-file fsyncs, /proc counts) come
/// and go, so after 1000 reloads it held about 2 MiB more than with two arenas
/// (docs/BENCHMARKS.md, "Metrics"); it is not allocation-bound, so two are plenty. An operator's
/// own `MALLOC_ARENA_MAX` wins: glibc read it at start, and it is left alone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called before the agent starts any thread; mallopt only sets a parameter of
        // the allocator, which applies to arenas made from now on.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn run_agent(settings: Settings) -> anyhow::Result<()> {
    limit_malloc_arenas();
    exit_on_panic();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let settings = Arc::new(settings);
        let cfg = &settings.config;
        let boot_id = uuid::Uuid::new_v4().to_string();
        std::fs::create_dir_all(&cfg.haproxy.state_dir).with_context(|| {
            format!(
                "cannot create haproxy.state_dir {}; create it or point state_dir elsewhere",
                cfg.haproxy.state_dir.display()
            )
        })?;
        // It syncs files: off the runtime's threads.
        let outbox = {
            let (dir, limit) = (cfg.haproxy.state_dir.clone(), cfg.nats.outbox_limit);
            tokio::task::spawn_blocking(move || Outbox::open(&dir, limit))
                .await
                .context("the event outbox could not be opened")??
        };
        // Bounded: the publisher takes events into the outbox at once, so the node only waits
        // while the disk is slow, and the publisher never waits for the node.
        let (events_tx, events_rx) = mpsc::channel(EVENTS_QUEUE);
        let metrics = cfg
            .metrics
            .addr()
            .map(|addr| (addr, Arc::new(ebb_agent::metrics::Metrics::new())));
        // With metrics on, the node's events pass through a tee that counts them on the way to
        // the publisher: the same bound, and the counting never waits.
        let node_events_tx = match &metrics {
            Some((_, m)) => tee_events(m.clone(), events_tx),
            None => events_tx,
        };
        let (report_tx, report_rx) = watch::channel(PublisherReport::default());
        let (inputs_tx, inputs_rx) = mpsc::channel(1024);
        let (summary_tx, summary_rx) = watch::channel(Summary {
            state: NodeState::Starting,
            drain_id: None,
        });
        spawn_signal_handler(inputs_tx.clone())?;
        #[cfg(debug_assertions)]
        spawn_test_panic_trigger()?;

        let refusals = Refusals::default();
        let client =
            connect::connect_agent(&cfg.nats, settings.node_id(), refusals.clone()).await?;
        // systemd's notifications probe the node like any other local observer.
        let (notify_inputs, notify_summary) = (inputs_tx.clone(), summary_rx.clone());
        let publisher = Publisher {
            client: client.clone(),
            cfg: cfg.nats.clone(),
            node: settings.node_id().to_string(),
            groups: cfg.node.groups.clone(),
            boot_id: boot_id.clone(),
            outbox,
            events: events_rx,
            summary: summary_rx,
            refusals,
            report: report_tx,
        };
        let publishing = tokio::spawn(publisher.run());

        // Set once the control socket serves: /healthz counts the node as commandable through it
        // while NATS is away.
        let control_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some((addr, m)) = &metrics {
            ebb_agent::metrics::server::spawn(
                *addr,
                m.clone(),
                ebb_agent::metrics::server::Sources {
                    inputs: inputs_tx.clone(),
                    publisher: report_rx.clone(),
                    nats: client.clone(),
                    control_socket_up: control_up.clone(),
                },
            );
        }
        // Commands are served (and queue up) before the node starts, so that once
        // `agent_started` is out, the node answers. NATS and the control socket feed one command
        // server: the same checks and one memory of request ids for both.
        let (requests_tx, requests_rx) = mpsc::channel(REQUEST_QUEUE);
        let commands = CommandServer {
            node: settings.node_id().to_string(),
            inputs: inputs_tx,
            push_keys: cfg.push.keys.clone(),
        };
        tokio::spawn(commands.run(requests_rx));
        if let Some(path) = cfg.control.socket() {
            // Not fatal: NATS still commands the node, and a missing /run/ebb must not keep
            // HAProxy unwatched.
            match ControlSocket::bind(path) {
                Ok(socket) => {
                    tracing::info!("control socket: listening on {}", socket.path().display());
                    control_up.store(true, std::sync::atomic::Ordering::Relaxed);
                    tokio::spawn(socket.serve(
                        cfg.nats.prefix.clone(),
                        settings.node_id().to_string(),
                        requests_tx.clone(),
                    ));
                }
                Err(e) => tracing::error!("{e}"),
            }
        }
        let service = CommandService {
            client: client.clone(),
            prefix: cfg.nats.prefix.clone(),
            node: settings.node_id().to_string(),
            groups: cfg.node.groups.clone(),
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Err(e) = service.run(requests_tx, ready_tx).await {
                tracing::error!("{e:#}");
            }
        });
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), ready_rx).await;
        // A plugin that fails to load does not stop the agent: it stays listed as unhealthy and,
        // with on_error = "busy", blocks drains with the reason (fail closed).
        let (plugins, problems) = ebb_agent::plugins::PluginHost::load_fail_closed(&cfg.plugins);
        for p in problems {
            tracing::error!("{p}");
        }
        if let Some((_, m)) = &metrics {
            plugins.observe_checks(m.clone());
        }
        let node = Shell::start(
            settings.clone(),
            boot_id.clone(),
            node_events_tx,
            report_rx,
            summary_tx,
            plugins.clone(),
        )
        .await?;
        // READY=1 once the node is past `starting` (adoption or first start done), not before.
        ebb_agent::notify::spawn(notify_inputs, notify_summary);
        let outcome = node.run(inputs_rx).await;
        // Each plugin's instance is destroyed (within its timeout), so it can release what it holds.
        plugins.shutdown().await;
        // The node dropped its event sender: give the publisher a moment to send what is left.
        // Whatever it cannot send stays in the outbox for the next agent.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), publishing).await;
        match outcome {
            Outcome::Stopped { connections_cut } => {
                tracing::info!(connections_cut, "agent exiting after stopping haproxy")
            }
            Outcome::Detached => tracing::info!("agent exiting; haproxy left running"),
        }
        Ok(())
    })
}

/// A sender for the node whose events are counted by `metrics`, then handed to `publisher` in
/// order. It ends when the node drops the sender, which then closes the publisher's intake.
fn tee_events(
    metrics: Arc<ebb_agent::metrics::Metrics>,
    publisher: mpsc::Sender<ebb_sdk::event::Event>,
) -> mpsc::Sender<ebb_sdk::event::Event> {
    let (tx, mut rx) = mpsc::channel(EVENTS_QUEUE);
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            metrics.record(&event);
            if publisher.send(event).await.is_err() {
                return;
            }
        }
    });
    tx
}

fn spawn_signal_handler(inputs: mpsc::Sender<Input>) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("cannot handle SIGUSR2")?;
    let notifier = ebb_agent::notify::Notifier::from_env();
    tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                _ = hup.recv() => AgentSignal::Reload,
                _ = term.recv() => AgentSignal::Stop,
                _ = int.recv() => AgentSignal::Stop,
                _ = usr2.recv() => AgentSignal::Detach,
            };
            tracing::info!("signal received: {sig:?}");
            // Every signal but SIGHUP ends the agent, whatever the node's state.
            if let (Some(notifier), AgentSignal::Stop | AgentSignal::Detach) = (&notifier, sig) {
                notifier.stopping();
            }
            if inputs.send(Input::Signal(sig)).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}
