//! The thread that owns one plugin instance. Every call into the plugin happens here, off the async
//! runtime, one at a time; callers wait for answers on oneshot channels with their own timeouts, so a hung
//! plugin blocks only its own thread.

use std::ffi::CString;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb_sdk::plugin::Verdict;
use tokio::sync::oneshot;

use super::file::CheckedFile;
use super::library::{self, Instance, Table};

/// Jobs waiting behind a running call. Past this, a caller treats the plugin as hung.
pub(crate) const QUEUE: usize = 32;

pub(crate) enum Job {
    Check {
        ctx: CString,
        reply: oneshot::Sender<Result<Verdict, String>>,
    },
    Event {
        name: &'static str,
        json: Arc<CString>,
        reply: Option<oneshot::Sender<Result<(), String>>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Starts the plugin's thread, which loads the library and creates the instance. Waits for that up to
/// `load_timeout`; past it the thread is abandoned (it keeps the library, as every thread does).
pub(crate) fn start(
    plugin: &str,
    checked: CheckedFile,
    config_json: String,
    load_timeout: Duration,
    hook_timeout: Duration,
) -> Result<(mpsc::SyncSender<Job>, Table), String> {
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(QUEUE);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Table, String>>();
    let name = plugin.to_string();
    std::thread::Builder::new()
        .name(format!("ebb-plugin-{plugin}"))
        .spawn(move || {
            let loaded = library::load(checked).and_then(|table| {
                Instance::create(&table, &config_json)
                    .map(|instance| (table, instance))
                    .map_err(|e| format!("its create rejected the config: {e}"))
            });
            match loaded {
                Ok((table, instance)) => {
                    if ready_tx.send(Ok(table)).is_ok() {
                        serve(&name, instance, jobs_rx, hook_timeout);
                    }
                    // Else the loader gave up waiting: drop the instance (destroy) and end.
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| format!("cannot start its thread: {e}"))?;
    match ready_rx.recv_timeout(load_timeout) {
        Ok(Ok(table)) => Ok((jobs_tx, table)),
        Ok(Err(e)) => Err(e),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "it did not finish loading within {} (its initializers, entry function or create hung); \
             fix the plugin or raise its timeout",
            humantime::format_duration(load_timeout)
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("its thread ended while loading it".into()),
    }
}

fn serve(name: &str, mut instance: Instance, jobs: mpsc::Receiver<Job>, hook_timeout: Duration) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Check { ctx, reply } => {
                // The caller gave up (timed out) while this job waited: its answer would be stale.
                if reply.is_closed() {
                    continue;
                }
                let _ = reply.send(instance.check_idle(&ctx));
            }
            Job::Event {
                name: event,
                json,
                reply,
            } => {
                let started = Instant::now();
                let result = instance.on_event(&json);
                let took = started.elapsed();
                if took > hook_timeout {
                    tracing::warn!(
                        plugin = name,
                        "plugin {name}: its {event} hook took {}, longer than its timeout; idle checks \
                         waited behind it",
                        humantime::format_duration(round_ms(took))
                    );
                }
                match reply {
                    Some(reply) => {
                        let _ = reply.send(result);
                    }
                    None => {
                        if let Err(e) = result {
                            tracing::warn!(
                                plugin = name,
                                "plugin {name}: its {event} hook failed: {e}"
                            );
                        }
                    }
                }
            }
            Job::Shutdown { reply } => {
                drop(instance);
                let _ = reply.send(());
                return;
            }
        }
    }
    // Every sender is gone (the host was dropped): destroy the instance on its own thread.
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
