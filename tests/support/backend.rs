//! The demo backend (crate `ebb-examples`), run in-process on a free port.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use ebb_examples::BackendThread;

/// The demo backend on its own thread and runtime: usable from `#[test]` and `#[tokio::test]`
/// alike. Answers `/slow?ms=N` after N ms and anything else with `ok\n`. Stops on drop.
pub struct Backend {
    inner: BackendThread,
}

impl Backend {
    /// Starts on 127.0.0.1 with a port chosen by the kernel; ready for connections on return.
    pub fn start() -> Result<Backend> {
        let inner = ebb_examples::spawn_thread(SocketAddr::from(([127, 0, 0, 1], 0)))
            .context("start the demo backend")?;
        Ok(Backend { inner })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr()
    }

    pub fn port(&self) -> u16 {
        self.inner.addr().port()
    }

    /// Stops accepting and closes every connection (HAProxy then answers 503). Same as drop.
    pub fn stop(self) {}
}
