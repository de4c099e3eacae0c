//! A stand-in for systemd's notify socket: a Unix datagram socket in a temp dir of its own, to
//! give an agent as `NOTIFY_SOCKET`, and a thread that reads it at once (the kernel queues only a
//! few datagrams: `net.unix.max_dgram_qlen`), keeping every line with the time it arrived.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{try_wait_for, wait_for};

/// How often the reader thread looks at its stop flag while nothing arrives.
const READ_TIMEOUT: Duration = Duration::from_millis(50);

/// One line of a notification (`READY=1`, `STATUS=…`, `WATCHDOG=1`), with when it arrived.
#[derive(Debug, Clone)]
pub struct Notification {
    pub at: Instant,
    pub line: String,
}

/// The socket and its reader; the thread ends and the dir goes on drop.
pub struct NotifySocket {
    path: PathBuf,
    lines: Arc<Mutex<Vec<Notification>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn bind() -> NotifySocket {
        let dir = tempfile::Builder::new()
            .prefix("ebb-notify-")
            .tempdir()
            .expect("create a temp dir for the notify socket");
        let path = dir.path().join("notify.sock");
        let socket =
            UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        socket
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("set the notify socket's read timeout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (lines, stop) = (lines.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    // A timeout (or any error) only means: look at the stop flag again.
                    let Ok(n) = socket.recv(&mut buf) else {
                        continue;
                    };
                    let at = Instant::now();
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let mut lines = lines.lock().expect("notifications");
                    for line in text.lines().filter(|l| !l.is_empty()) {
                        lines.push(Notification {
                            at,
                            line: line.to_owned(),
                        });
                    }
                }
            })
        };
        NotifySocket {
            path,
            lines,
            stop,
            reader: Some(reader),
            _dir: dir,
        }
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
    }

    /// Every line received so far, in order.
    pub fn lines(&self) -> Vec<Notification> {
        self.lines.lock().expect("notifications").clone()
    }

    /// How many lines received so far equal `line`.
    pub fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|n| n.line == line).count()
    }

    /// Waits for the first line (from index `from` on) that satisfies `pred`; returns its index
    /// and the line. Panics after `timeout` with every line seen.
    pub fn wait_line(
        &self,
        timeout: Duration,
        from: usize,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, Notification) {
        match try_wait_for(timeout, || self.find(from, &pred)) {
            Some(found) => found,
            None => panic!(
                "timed out after {timeout:?} waiting for the notification {what}; got: {:?}",
                self.lines().iter().map(|n| &n.line).collect::<Vec<_>>()
            ),
        }
    }

    /// Waits until `n` lines equal `line`.
    pub fn wait_count(&self, timeout: Duration, line: &str, n: usize) {
        wait_for(timeout, &format!("{n} notifications {line}"), || {
            (self.count(line) >= n).then_some(())
        })
    }

    /// The first line from index `from` on that satisfies `pred`, if any yet.
    pub fn find(&self, from: usize, pred: impl Fn(&str) -> bool) -> Option<(usize, Notification)> {
        self.lines()
            .into_iter()
            .enumerate()
            .skip(from)
            .find(|(_, n)| pred(&n.line))
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
