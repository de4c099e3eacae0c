//! HTTP/1.1 clients over real TCP: one-shot requests, a keep-alive client, a request left with
//! partial headers, and a load generator that classifies every failure.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Timeout of [`http_get`] and the default per-request timeout of [`LoadGen`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why an HTTP exchange failed.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens on the port.
    ConnectRefused,
    /// Connecting failed otherwise.
    Connect(io::Error),
    /// The connection was reset (or the write hit a closed socket) before any response byte.
    ResetBeforeResponse,
    /// The connection was reset in the middle of the response.
    Reset,
    /// The server closed the connection without sending any response byte.
    EofBeforeResponse,
    /// The server closed the connection in the middle of the response.
    EofInResponse,
    /// A keep-alive connection the server had already closed; the request was not sent.
    Closed,
    /// No complete response within the timeout.
    Timeout,
    /// The response was not valid HTTP/1.x.
    Protocol(String),
    /// Any other I/O error.
    Io(io::Error),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::ConnectRefused => write!(f, "connection refused"),
            ClientError::Connect(e) => write!(f, "connect failed: {e}"),
            ClientError::ResetBeforeResponse => write!(f, "connection reset before the response"),
            ClientError::Reset => write!(f, "connection reset during the response"),
            ClientError::EofBeforeResponse => write!(f, "connection closed before the response"),
            ClientError::EofInResponse => write!(f, "connection closed during the response"),
            ClientError::Closed => write!(f, "keep-alive connection already closed by the server"),
            ClientError::Timeout => write!(f, "timed out"),
            ClientError::Protocol(why) => write!(f, "invalid response: {why}"),
            ClientError::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// Whether the server dropped the connection before answering anything: on a reused
    /// keep-alive connection, that is the keep-alive close race.
    pub fn before_response(&self) -> bool {
        matches!(
            self,
            ClientError::ResetBeforeResponse | ClientError::EofBeforeResponse
        )
    }
}

/// Maps an I/O error during an exchange; `answered` says whether response bytes had arrived.
fn io_error(e: io::Error, answered: bool) -> ClientError {
    use io::ErrorKind::*;
    match (e.kind(), answered) {
        (ConnectionReset | ConnectionAborted | BrokenPipe, false) => {
            ClientError::ResetBeforeResponse
        }
        (ConnectionReset | ConnectionAborted | BrokenPipe, true) => ClientError::Reset,
        (UnexpectedEof, false) => ClientError::EofBeforeResponse,
        (UnexpectedEof, true) => ClientError::EofInResponse,
        _ => ClientError::Io(e),
    }
}

/// A parsed response. Header names are lowercased.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the response says `Connection: close`.
    pub fn connection_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

async fn connect(port: u16) -> Result<TcpStream, ClientError> {
    let stream = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionRefused => ClientError::ConnectRefused,
            _ => ClientError::Connect(e),
        })?;
    stream.set_nodelay(true).map_err(ClientError::Connect)?;
    Ok(stream)
}

fn request_text(port: u16, path: &str, close: bool) -> String {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{connection}\r\n")
}

/// Reads more bytes into `buf`; `Ok(0)` at EOF.
async fn fill(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    answered: bool,
) -> Result<usize, ClientError> {
    let answered = answered || !buf.is_empty();
    // Read straight into the spare capacity: no big buffer inside every future.
    buf.reserve(16 * 1024);
    stream
        .read_buf(buf)
        .await
        .map_err(|e| io_error(e, answered))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response from `stream`. `buf` holds bytes read past the previous response and keeps
/// any read past this one.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Response, ClientError> {
    let head_end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(ClientError::Protocol("response head too large".into()));
        }
        if fill(stream, buf, false).await? == 0 {
            return Err(if buf.is_empty() {
                ClientError::EofBeforeResponse
            } else {
                ClientError::EofInResponse
            });
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split(' ').collect::<Vec<_>>().as_slice() {
        [version, code, ..] if version.starts_with("HTTP/1.") => code
            .parse::<u16>()
            .map_err(|_| ClientError::Protocol(format!("bad status line {status_line:?}")))?,
        _ => {
            return Err(ClientError::Protocol(format!(
                "bad status line {status_line:?}"
            )))
        }
    };
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut response = Response {
        status,
        headers,
        body: String::new(),
    };

    let body = if status < 200 || status == 204 || status == 304 {
        Vec::new()
    } else if response
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        read_chunked(stream, buf).await?
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| ClientError::Protocol(format!("bad Content-Length {length:?}")))?;
        while buf.len() < length {
            if fill(stream, buf, true).await? == 0 {
                return Err(ClientError::EofInResponse);
            }
        }
        buf.drain(..length).collect()
    } else {
        // No framing: the body runs to EOF.
        while fill(stream, buf, true).await? > 0 {}
        std::mem::take(buf)
    };
    response.body = String::from_utf8_lossy(&body).into_owned();
    Ok(response)
}

async fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>, ClientError> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(pos) = find(buf, b"\r\n") {
                break pos;
            }
            if fill(stream, buf, true).await? == 0 {
                return Err(ClientError::EofInResponse);
            }
        };
        let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        buf.drain(..line_end + 2);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ClientError::Protocol(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                if let Some(pos) = find(buf, b"\r\n") {
                    buf.drain(..pos + 2);
                    if pos == 0 {
                        return Ok(body);
                    }
                } else if fill(stream, buf, true).await? == 0 {
                    return Err(ClientError::EofInResponse);
                }
            }
        }
        while buf.len() < size + 2 {
            if fill(stream, buf, true).await? == 0 {
                return Err(ClientError::EofInResponse);
            }
        }
        body.extend(buf.drain(..size));
        buf.drain(..2);
    }
}

/// `GET path` on a new connection to 127.0.0.1:`port`, with `Connection: close` if `close`.
/// Returns the status and body; times out after [`REQUEST_TIMEOUT`].
pub async fn http_get(port: u16, path: &str, close: bool) -> Result<(u16, String), ClientError> {
    let response = http_request(port, path, close, REQUEST_TIMEOUT).await?;
    Ok((response.status, response.body))
}

/// Like [`http_get`], returning the whole [`Response`], with a timeout of your choice.
pub async fn http_request(
    port: u16,
    path: &str,
    close: bool,
    timeout: Duration,
) -> Result<Response, ClientError> {
    tokio::time::timeout(timeout, async {
        let mut stream = connect(port).await?;
        stream
            .write_all(request_text(port, path, close).as_bytes())
            .await
            .map_err(|e| io_error(e, false))?;
        read_response(&mut stream, &mut Vec::new()).await
    })
    .await
    .map_err(|_| ClientError::Timeout)?
}

/// One connection reused for successive requests, which reports when the server closed it.
pub struct KeepAliveClient {
    port: u16,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    requests: u64,
    timeout: Duration,
}

impl KeepAliveClient {
    pub async fn connect(port: u16) -> Result<KeepAliveClient, ClientError> {
        Ok(KeepAliveClient {
            port,
            stream: Some(connect(port).await?),
            buf: Vec::new(),
            requests: 0,
            timeout: REQUEST_TIMEOUT,
        })
    }

    /// Sets the per-request timeout (default [`REQUEST_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Requests completed on this connection.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// `GET path` on the connection. Fails with [`ClientError::Closed`] (sending nothing) if the
    /// server already closed it. After a `Connection: close` response or any error, the connection
    /// counts as closed.
    pub async fn get(&mut self, path: &str) -> Result<Response, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let stream = self.stream.as_mut().expect("open: checked above");
        let request = request_text(self.port, path, false);
        let result = tokio::time::timeout(self.timeout, async {
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| io_error(e, false))?;
            read_response(stream, &mut self.buf).await
        })
        .await
        .map_err(|_| ClientError::Timeout)
        .and_then(|r| r);
        match &result {
            Ok(response) if !response.connection_close() => self.requests += 1,
            Ok(_) => {
                self.requests += 1;
                self.stream = None;
            }
            Err(_) => self.stream = None,
        }
        result
    }

    /// Whether the connection is known closed: by a `Connection: close` response, an error, or
    /// the server's FIN or RST already received (checked without blocking).
    pub fn is_closed(&mut self) -> bool {
        let Some(stream) = &self.stream else {
            return true;
        };
        let mut byte = [0u8; 1];
        match stream.try_read(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            // Data nobody asked for is a protocol error: treat it like a closed connection.
            Ok(_) | Err(_) => {
                self.stream = None;
                true
            }
        }
    }

    /// Waits up to `timeout` for the server to close the idle connection; true if it did.
    pub async fn wait_closed(&mut self, timeout: Duration) -> bool {
        let Some(stream) = self.stream.as_mut() else {
            return true;
        };
        let mut byte = [0u8; 1];
        match tokio::time::timeout(timeout, stream.read(&mut byte)).await {
            Err(_) => false,
            Ok(_) => {
                self.stream = None;
                true
            }
        }
    }
}

/// A request whose headers were only partly sent; the socket stays open until it is finished or
/// dropped. HAProxy counts it as a connection (`CurrConns`) but not as a session on a backend.
pub struct PartialRequest {
    port: u16,
    stream: TcpStream,
}

/// Connects to `port` and sends `GET / HTTP/1.1` and a Host header, without the blank line that
/// ends the head.
pub async fn partial_request(port: u16) -> Result<PartialRequest, ClientError> {
    let mut stream = connect(port).await?;
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n").as_bytes())
        .await
        .map_err(|e| io_error(e, false))?;
    Ok(PartialRequest { port, stream })
}

impl PartialRequest {
    /// Sends the rest of the head (`Connection: close` and the blank line) and reads the response.
    pub async fn finish(mut self) -> Result<Response, ClientError> {
        tokio::time::timeout(REQUEST_TIMEOUT, async {
            self.stream
                .write_all(b"Connection: close\r\n\r\n")
                .await
                .map_err(|e| io_error(e, false))?;
            read_response(&mut self.stream, &mut Vec::new()).await
        })
        .await
        .map_err(|_| ClientError::Timeout)?
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits up to `timeout` for the server to close the connection (or answer it); true if it did.
    pub async fn wait_closed(&mut self, timeout: Duration) -> bool {
        let mut byte = [0u8; 1];
        tokio::time::timeout(timeout, self.stream.read(&mut byte))
            .await
            .is_ok()
    }
}

/// How [`LoadGen`] workers use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// A new connection per request, with `Connection: close`.
    Close,
    /// One connection per worker, reused until the server closes it; then a new one.
    KeepAlive,
}

/// A failed request's cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    ConnectRefused,
    ConnectError,
    /// Reset before any response byte, on a fresh connection.
    Reset,
    /// Reset in the middle of a response.
    ResetInResponse,
    /// Closed before any response byte, on a fresh connection.
    EofBeforeResponse,
    /// Closed in the middle of a response.
    EofInResponse,
    /// A reused keep-alive connection closed or reset by the server before any response byte:
    /// the keep-alive close race (the server closed an idle connection as the request went out).
    ReuseRace,
    BadStatus(u16),
    /// A 200 whose body was not the one [`LoadGenBuilder::expect_body`] asked for.
    WrongBody,
    Timeout,
    Protocol,
    Io,
}

impl FailureKind {
    /// Classifies `error`; `reused` says whether the request went out on a reused connection.
    pub fn of(error: &ClientError, reused: bool) -> FailureKind {
        match error {
            e if reused && e.before_response() => FailureKind::ReuseRace,
            ClientError::ConnectRefused => FailureKind::ConnectRefused,
            ClientError::Connect(_) => FailureKind::ConnectError,
            ClientError::ResetBeforeResponse => FailureKind::Reset,
            ClientError::Reset => FailureKind::ResetInResponse,
            ClientError::EofBeforeResponse => FailureKind::EofBeforeResponse,
            ClientError::EofInResponse => FailureKind::EofInResponse,
            // KeepAliveClient's own check; LoadGen reconnects instead of getting this.
            ClientError::Closed => FailureKind::ReuseRace,
            ClientError::Timeout => FailureKind::Timeout,
            ClientError::Protocol(_) => FailureKind::Protocol,
            ClientError::Io(_) => FailureKind::Io,
        }
    }
}

/// What a [`LoadGen`] saw.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests answered with 200.
    pub ok: u64,
    pub failures: BTreeMap<FailureKind, u64>,
    /// Connections opened.
    pub connections: u64,
    /// The first few failures, described, for messages.
    pub samples: Vec<String>,
    pub elapsed: Duration,
}

/// How many failure descriptions a report keeps.
const MAX_SAMPLES: usize = 10;

impl LoadReport {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub fn count(&self, kind: FailureKind) -> u64 {
        self.failures.get(&kind).copied().unwrap_or(0)
    }

    /// Failures other than keep-alive close races.
    pub fn failed_excluding_reuse_races(&self) -> u64 {
        self.failed() - self.count(FailureKind::ReuseRace)
    }

    pub fn total(&self) -> u64 {
        self.ok + self.failed()
    }

    /// Panics, with the report, if any request failed.
    pub fn assert_no_failures(&self) {
        assert_eq!(self.failed(), 0, "load generator saw failures: {self}");
    }

    fn record(&mut self, kind: FailureKind, detail: String) {
        *self.failures.entry(kind).or_default() += 1;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(detail);
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ok, {} failed {:?}, {} connections in {:?}",
            self.ok,
            self.failed(),
            self.failures,
            self.connections,
            self.elapsed
        )?;
        for sample in &self.samples {
            write!(f, "\n  {sample}")?;
        }
        Ok(())
    }
}

/// Configures a [`LoadGen`]; see [`LoadGen::builder`].
#[derive(Debug, Clone)]
pub struct LoadGenBuilder {
    port: u16,
    concurrency: usize,
    mode: LoadMode,
    path: String,
    max_duration: Duration,
    request_timeout: Duration,
    expect_body: Option<String>,
}

impl LoadGenBuilder {
    pub fn concurrency(mut self, workers: usize) -> Self {
        self.concurrency = workers.max(1);
        self
    }

    pub fn mode(mut self, mode: LoadMode) -> Self {
        self.mode = mode;
        self
    }

    /// The request path (default `/`).
    pub fn path(mut self, path: &str) -> Self {
        self.path = path.to_owned();
        self
    }

    /// The generator stops by itself after this long (default 5 min).
    pub fn max_duration(mut self, duration: Duration) -> Self {
        self.max_duration = duration;
        self
    }

    /// Per-request timeout (default [`REQUEST_TIMEOUT`]).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Counts a 200 as ok only when its body is exactly `body` (else [`FailureKind::WrongBody`]):
    /// a response cut short but framed, or one from the wrong server, is a failure too. Off by
    /// default: any 200 counts.
    pub fn expect_body(mut self, body: &str) -> Self {
        self.expect_body = Some(body.to_owned());
        self
    }

    /// Starts the workers on a thread and runtime of their own (so it works from `#[test]` and
    /// `#[tokio::test]` alike).
    pub fn start(self) -> LoadGen {
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::clone(&report);
        let thread = std::thread::Builder::new()
            .name(format!("ebb-loadgen-{}", self.port))
            .spawn(move || run(self, shared, stop_rx))
            .expect("spawn the load generator thread");
        LoadGen {
            report,
            stop: stop_tx,
            thread: Some(thread),
        }
    }
}

/// Sends requests in a loop from `concurrency` workers until stopped (or `max_duration` passed),
/// counting successes and failures by cause.
pub struct LoadGen {
    report: Arc<Mutex<LoadReport>>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl LoadGen {
    /// `concurrency` workers sending `GET /` in `mode`, stopping by themselves after 5 minutes.
    pub fn start(port: u16, concurrency: usize, mode: LoadMode) -> LoadGen {
        LoadGen::builder(port)
            .concurrency(concurrency)
            .mode(mode)
            .start()
    }

    pub fn builder(port: u16) -> LoadGenBuilder {
        LoadGenBuilder {
            port,
            concurrency: 4,
            mode: LoadMode::Close,
            path: "/".to_owned(),
            max_duration: Duration::from_secs(300),
            request_timeout: REQUEST_TIMEOUT,
            expect_body: None,
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> LoadReport {
        self.report.lock().expect("report lock").clone()
    }

    pub fn ok_count(&self) -> u64 {
        self.report.lock().expect("report lock").ok
    }

    /// Waits (blocking) until at least `n` requests succeeded; panics with the report on timeout.
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) {
        if super::try_wait_for(timeout, || (self.ok_count() >= n).then_some(())).is_none() {
            panic!(
                "load generator: fewer than {n} ok requests after {timeout:?}: {}",
                self.snapshot()
            );
        }
    }

    /// Stops the workers (letting in-flight requests finish, within their timeout) and returns
    /// the final report. Blocks the calling thread meanwhile.
    pub fn stop(mut self) -> LoadReport {
        self.shutdown();
        self.snapshot()
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(config: LoadGenBuilder, report: Arc<Mutex<LoadReport>>, mut stop: watch::Receiver<bool>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            report
                .lock()
                .expect("report lock")
                .record(FailureKind::Io, format!("cannot build a runtime: {e}"));
            return;
        }
    };
    runtime.block_on(async move {
        let started = Instant::now();
        // Workers read this flag; the outer stop channel may also be closed by a dropped LoadGen.
        let (halt_tx, halt_rx) = watch::channel(false);
        let config = Arc::new(config);
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..config.concurrency {
            workers.spawn(worker(
                Arc::clone(&config),
                Arc::clone(&report),
                halt_rx.clone(),
            ));
        }
        tokio::select! {
            _ = stop.wait_for(|&stopped| stopped) => {}
            () = tokio::time::sleep(config.max_duration) => {}
        }
        let _ = halt_tx.send(true);
        // In-flight requests may finish (each is bounded by its timeout); then give up on them.
        let grace = config.request_timeout + Duration::from_secs(1);
        let _ = tokio::time::timeout(grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        workers.abort_all();
        report.lock().expect("report lock").elapsed = started.elapsed();
    });
}

async fn worker(
    config: Arc<LoadGenBuilder>,
    report: Arc<Mutex<LoadReport>>,
    halt: watch::Receiver<bool>,
) {
    let mut conn: Option<(TcpStream, Vec<u8>)> = None;
    while !*halt.borrow() {
        // A keep-alive connection whose FIN already arrived is not reused: careful clients check
        // this too, and it keeps ReuseRace for the real race (a close racing the request).
        if let Some((stream, _)) = &conn {
            let mut byte = [0u8; 1];
            if !matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            {
                conn = None;
            }
        }
        let reused = conn.is_some();
        let result = tokio::time::timeout(config.request_timeout, async {
            if conn.is_none() {
                let stream = connect(config.port).await?;
                report.lock().expect("report lock").connections += 1;
                conn = Some((stream, Vec::new()));
            }
            let (stream, buf) = conn.as_mut().expect("connected above");
            let close = config.mode == LoadMode::Close;
            stream
                .write_all(request_text(config.port, &config.path, close).as_bytes())
                .await
                .map_err(|e| io_error(e, false))?;
            read_response(stream, buf).await
        })
        .await
        .map_err(|_| ClientError::Timeout)
        .and_then(|r| r);

        // The lock guard must not live across an await (it is not Send): scope it.
        let refused = {
            let mut report = report.lock().expect("report lock");
            match result {
                Ok(response) => {
                    if config.mode == LoadMode::Close || response.connection_close() {
                        conn = None;
                    }
                    let wrong_body = config
                        .expect_body
                        .as_ref()
                        .filter(|body| **body != response.body);
                    if let (200, Some(expected)) = (response.status, wrong_body) {
                        let detail = format!("body {:?}, expected {expected:?}", response.body);
                        report.record(FailureKind::WrongBody, detail);
                    } else if response.status == 200 {
                        report.ok += 1;
                    } else {
                        let detail = format!("status {}: {:?}", response.status, response.body);
                        report.record(FailureKind::BadStatus(response.status), detail);
                    }
                    false
                }
                Err(error) => {
                    conn = None;
                    let kind = FailureKind::of(&error, reused);
                    report.record(kind, format!("{kind:?}: {error}"));
                    matches!(
                        kind,
                        FailureKind::ConnectRefused | FailureKind::ConnectError
                    )
                }
            }
        };
        if refused {
            // Nothing listens: do not spin hot on refusals (and starve haproxy of CPU).
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// A `GET` started by [`spawn_get`]: the response and the instant it was complete.
pub type Pending = tokio::task::JoinHandle<(Result<Response, ClientError>, std::time::Instant)>;

/// `GET path` with `Connection: close`, in a task of its own.
pub fn spawn_get(port: u16, path: &str) -> Pending {
    let path = path.to_string();
    tokio::spawn(async move {
        let response = http_request(port, &path, true, Duration::from_secs(60)).await;
        (response, std::time::Instant::now())
    })
}

/// Awaits a [`spawn_get`] request: it must be a full 200 with `body`. Returns when it completed.
pub async fn full_200(request: Pending, body: &str) -> std::time::Instant {
    let (response, done) = tokio::time::timeout(Duration::from_secs(60), request)
        .await
        .expect("the request ends within 60 s")
        .expect("request task");
    let response = response.unwrap_or_else(|e| panic!("the request was cut: {e}"));
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, body),
        "{response:?}"
    );
    done
}
