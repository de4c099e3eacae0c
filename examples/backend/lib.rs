//! The demo backend of ebb's quickstart and end-to-end tests.
//!
//! A deliberately small HTTP/1.1 server on tokio, with no dependency beyond tokio itself:
//!
//! - `GET /slow?ms=N` waits `N` milliseconds (at most [`MAX_SLOW_MS`]), then answers `200` with
//!   `slept N ms\n`. Long requests like this are what a drain must wait for.
//! - Any other request answers `200` with `ok\n`.
//! - Keep-alive is the HTTP/1.1 default; `Connection: close` (or an HTTP/1.0 request without
//!   `Connection: keep-alive`) gets its answer and then a closed connection. Pipelined requests are
//!   answered in order.
//! - Request bodies with `Content-Length` (up to [`MAX_BODY`]) are read and discarded; chunked request
//!   bodies are refused with `501`.
//!
//! Malformed input never panics: it gets a `400` (or `431` / `413` / `505`) and a closed connection.
//!
//! Use [`serve`] inside your own runtime, or [`spawn_thread`] to run the server on a thread of its own
//! (what the tests do: it works from both `#[test]` and `#[tokio::test]`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Largest request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted (and discarded), in bytes.
pub const MAX_BODY: u64 = 1024 * 1024;
/// Longest wait `GET /slow?ms=N` accepts: ten minutes.
pub const MAX_SLOW_MS: u64 = 600_000;
/// A connection with no complete request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// HTTP version of a request. Only 1.0 and 1.1 are spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// The parts of a request head that the backend needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent, such as `/slow?ms=50`.
    pub target: String,
    pub version: Version,
    /// `Content-Length` of the body, 0 when absent.
    pub content_length: u64,
    /// A `Transfer-Encoding` header was present (the body length is then unknown to us).
    pub chunked: bool,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

impl Request {
    /// The target's path, without the query string.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The value of query parameter `name`, if present (no percent-decoding: none is needed here).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        let (_, query) = self.target.split_once('?')?;
        query
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// Why a request head was refused. Each maps to a status code with [`ParseError::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The head exceeds [`MAX_HEAD`] bytes.
    TooLarge,
    /// The version is not HTTP/1.0 or HTTP/1.1.
    UnsupportedVersion,
    /// Anything else; the text says what.
    Malformed(&'static str),
}

impl ParseError {
    /// The status code that answers this error.
    pub fn status(&self) -> u16 {
        match self {
            ParseError::TooLarge => 431,
            ParseError::UnsupportedVersion => 505,
            ParseError::Malformed(_) => 400,
        }
    }
}

/// Parses one request head from the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete, or the request and the length of its head
/// (including the blank line) once it is complete. Lines may end in CRLF or, leniently, a bare LF;
/// empty lines before the request line are skipped (RFC 9112 §2.2).
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, ParseError> {
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut head_len = None;
    while let Some(offset) = buf[start..].iter().position(|&b| b == b'\n') {
        let end = start + offset;
        let line = buf[start..end]
            .strip_suffix(b"\r")
            .unwrap_or(&buf[start..end]);
        start = end + 1;
        if line.is_empty() {
            if lines.is_empty() {
                continue;
            }
            head_len = Some(start);
            break;
        }
        lines.push(line);
        if start > MAX_HEAD {
            return Err(ParseError::TooLarge);
        }
    }
    let Some(head_len) = head_len else {
        return if buf.len() > MAX_HEAD {
            Err(ParseError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if head_len > MAX_HEAD {
        return Err(ParseError::TooLarge);
    }

    let request_line = std::str::from_utf8(lines[0])
        .map_err(|_| ParseError::Malformed("request line is not UTF-8"))?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::Malformed(
            "request line is not METHOD TARGET VERSION",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(ParseError::Malformed("invalid method"));
    }
    if target.is_empty() || target.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(ParseError::Malformed("invalid request target"));
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        v if v.starts_with("HTTP/") => return Err(ParseError::UnsupportedVersion),
        _ => return Err(ParseError::Malformed("invalid HTTP version")),
    };

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_token = false;
    for line in &lines[1..] {
        let line =
            std::str::from_utf8(line).map_err(|_| ParseError::Malformed("header is not UTF-8"))?;
        let (name, value) = line
            .split_once(':')
            .ok_or(ParseError::Malformed("header without colon"))?;
        // No whitespace is allowed between the name and the colon (RFC 9112 §5.1), and obsolete
        // line folding (a line starting with whitespace) is refused too.
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(ParseError::Malformed("invalid header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<u64>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or(ParseError::Malformed("invalid Content-Length"))?;
            if content_length.is_some_and(|previous| previous != n) {
                return Err(ParseError::Malformed("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(|t| t.trim_matches([' ', '\t'])) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
    if chunked && content_length.is_some() {
        return Err(ParseError::Malformed(
            "both Transfer-Encoding and Content-Length",
        ));
    }
    let keep_alive = !close && (version == Version::Http11 || keep_alive_token);
    Ok(Some((
        Request {
            method: method.to_owned(),
            target: target.to_owned(),
            version,
            content_length: content_length.unwrap_or(0),
            chunked,
            keep_alive,
        },
        head_len,
    )))
}

/// RFC 9110 `tchar`: the bytes allowed in methods and header names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Accepts connections on `listener` and serves them until the future is dropped.
pub async fn serve(listener: TcpListener) {
    serve_until(listener, std::future::pending()).await
}

/// Like [`serve`], but returns once `shutdown` completes. Connections already accepted keep being
/// served by their own tasks until the runtime goes away.
pub async fn serve_until(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        // Client errors (resets, broken pipes) end that connection and nothing else.
                        let _ = handle_connection(stream).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning on the error.
                    eprintln!("ebb-demo-backend: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// Serves one connection: requests in order, until the client closes or asks to close.
async fn handle_connection(mut stream: TcpStream) -> io::Result<()> {
    // Small responses written one by one: do not let Nagle delay them behind the previous one.
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        let (request, head_len) = loop {
            match parse_request(&buf) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) => {}
                Err(e) => {
                    let message = match &e {
                        ParseError::Malformed(why) => *why,
                        ParseError::TooLarge => "request head too large",
                        ParseError::UnsupportedVersion => "HTTP version not supported",
                    };
                    return respond_and_close(&mut stream, e.status(), message).await;
                }
            }
            let n = match tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut chunk)).await {
                Ok(read) => read?,
                Err(_) => return Ok(()),
            };
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        buf.drain(..head_len);

        if request.chunked {
            return respond_and_close(&mut stream, 501, "chunked request bodies are not supported")
                .await;
        }
        if request.content_length > MAX_BODY {
            return respond_and_close(&mut stream, 413, "request body too large").await;
        }
        // Discard the body: first what is already buffered, then the rest from the socket.
        let mut remaining = request.content_length;
        let buffered = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        buf.drain(..buffered);
        remaining -= buffered as u64;
        while remaining > 0 {
            let want = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(chunk.len());
            let n = match tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut chunk[..want])).await
            {
                Ok(read) => read?,
                Err(_) => return Ok(()),
            };
            if n == 0 {
                return Ok(());
            }
            remaining -= n as u64;
        }

        let (status, body) = route(&request).await;
        let response = render_response(
            status,
            &body,
            request.keep_alive,
            request.version,
            request.method == "HEAD",
        );
        stream.write_all(&response).await?;
        if !request.keep_alive {
            return stream.shutdown().await;
        }
    }
}

/// Decides the answer to a well-formed request.
async fn route(request: &Request) -> (u16, String) {
    if request.path() != "/slow" {
        return (200, "ok\n".to_owned());
    }
    match request.query_param("ms").map(str::parse::<u64>) {
        Some(Ok(ms)) if ms <= MAX_SLOW_MS => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (200, format!("slept {ms} ms\n"))
        }
        _ => (
            400,
            format!("usage: /slow?ms=N with N at most {MAX_SLOW_MS}\n"),
        ),
    }
}

async fn respond_and_close(stream: &mut TcpStream, status: u16, message: &str) -> io::Result<()> {
    let response = render_response(
        status,
        &format!("{message}\n"),
        false,
        Version::Http11,
        false,
    );
    stream.write_all(&response).await?;
    stream.shutdown().await
}

fn render_response(
    status: u16,
    body: &str,
    keep_alive: bool,
    version: Version,
    head_only: bool,
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "",
    };
    // HTTP/1.1 keeps the connection by default, HTTP/1.0 closes it: say so only when it differs.
    let connection = match (keep_alive, version) {
        (false, Version::Http11) => "Connection: close\r\n",
        (true, Version::Http10) => "Connection: keep-alive\r\n",
        _ => "",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

/// A backend running on a thread of its own, with its own tokio runtime. Stops when dropped.
pub struct BackendThread {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BackendThread {
    /// The address the backend listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every connection and joins the thread. Same as dropping it.
    pub fn stop(self) {}
}

impl Drop for BackendThread {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Dropping the runtime at the end of the thread cancels the connection tasks, which
            // closes their sockets, so this join is short.
            let _ = thread.join();
        }
    }
}

/// Binds `addr` (port 0 picks a free port) and serves on a new thread with a current-thread runtime.
///
/// Binding happens before this returns, so the address is ready for connections at once. A thread
/// of its own makes the backend independent of the caller's runtime, if any: it works from plain
/// `#[test]`s, and dropping it inside `#[tokio::test]` does not drop a runtime in async context.
pub fn spawn_thread(addr: SocketAddr) -> io::Result<BackendThread> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("ebb-backend-{}", addr.port()))
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        serve_until(listener, async {
                            // A dropped sender also means stop.
                            let _ = shutdown_rx.await;
                        })
                        .await
                    }
                    Err(e) => eprintln!("ebb-demo-backend: cannot register listener: {e}"),
                }
            });
        })?;
    Ok(BackendThread {
        addr,
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn parse(raw: &str) -> Result<Option<(Request, usize)>, ParseError> {
        parse_request(raw.as_bytes())
    }

    fn parse_ok(raw: &str) -> Request {
        let (request, len) = parse(raw).expect("valid").expect("complete");
        assert_eq!(len, raw.len(), "head length");
        request
    }

    #[test]
    fn parses_a_simple_get() {
        let r = parse_ok("GET /slow?ms=50 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.method, "GET");
        assert_eq!(r.target, "/slow?ms=50");
        assert_eq!(r.path(), "/slow");
        assert_eq!(r.query_param("ms"), Some("50"));
        assert_eq!(r.query_param("x"), None);
        assert_eq!(r.version, Version::Http11);
        assert!(r.keep_alive);
        assert_eq!(r.content_length, 0);
    }

    #[test]
    fn incomplete_heads_ask_for_more() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: x\r\n\r"), Ok(None));
    }

    #[test]
    fn reports_head_length_with_trailing_bytes() {
        let raw = "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let (r, len) = parse(raw).unwrap().unwrap();
        assert_eq!(r.target, "/a");
        let (r, _) = parse(&raw[len..]).unwrap().unwrap();
        assert_eq!(r.target, "/b");
    }

    #[test]
    fn connection_semantics() {
        assert!(!parse_ok("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!parse_ok("GET / HTTP/1.1\r\nconnection: Keep-Alive, CLOSE\r\n\r\n").keep_alive);
        assert!(!parse_ok("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(parse_ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(parse_ok("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n").keep_alive);
    }

    #[test]
    fn lenient_line_endings_and_leading_blank_lines() {
        let r = parse_ok("\r\n\nGET / HTTP/1.1\nHost: x\n\n");
        assert_eq!(r.target, "/");
    }

    #[test]
    fn body_framing() {
        let r = parse_ok("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(r.content_length, 5);
        assert!(parse_ok("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").chunked);
        let same = "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(parse_ok(same).content_length, 5);
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ParseError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_malformed_heads() {
        for bad in [
            "GET\r\n\r\n",
            "GET /\r\n\r\n",
            "GET / HTTP/1.1 extra\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
            "GET / FTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nName : x\r\n\r\n",
            "GET / HTTP/1.1\r\n folded: x\r\n\r\n",
            "GET / HTTP/1.1\r\n: x\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ParseError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse("GET / HTTP/2.0\r\n\r\n"),
            Err(ParseError::UnsupportedVersion)
        );
        assert!(matches!(
            parse_request(b"GET /\xff HTTP/1.1\r\n\r\n"),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n"),
            Err(ParseError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_oversized_heads() {
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse(&long), Err(ParseError::TooLarge));
        let no_newline = "a".repeat(MAX_HEAD + 1);
        assert_eq!(parse(&no_newline), Err(ParseError::TooLarge));
        let complete = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse(&complete), Err(ParseError::TooLarge));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: every prefix and single-byte mutation of a valid request.
        let base = b"POST /slow?ms=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc";
        for len in 0..=base.len() {
            let _ = parse_request(&base[..len]);
        }
        for i in 0..base.len() {
            for b in [0u8, b'\r', b'\n', b' ', b':', 0x80, 0xff] {
                let mut mutated = base.to_vec();
                mutated[i] = b;
                let _ = parse_request(&mutated);
            }
        }
    }

    /// Sends `raw` on a fresh connection and reads until the server closes it.
    fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(raw).unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_keep_alive_pipelined_and_close() {
        let backend = spawn_thread("127.0.0.1:0".parse().unwrap()).unwrap();
        let out = exchange(
            backend.addr(),
            b"GET / HTTP/1.1\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nbodyGET /slow?ms=20 HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{out}");
        assert_eq!(out.matches("ok\n").count(), 2, "{out}");
        assert!(
            out.ends_with("Connection: close\r\n\r\nslept 20 ms\n"),
            "{out}"
        );
    }

    #[test]
    fn answers_errors_and_closes() {
        let backend = spawn_thread("127.0.0.1:0".parse().unwrap()).unwrap();
        let out = exchange(backend.addr(), b"garbage\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        let out = exchange(
            backend.addr(),
            b"GET /slow?ms=abc HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        let out = exchange(backend.addr(), b"HEAD / HTTP/1.0\r\n\r\n");
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\n"),
            "{out}"
        );
        // The backend still serves after all that.
        let out = exchange(
            backend.addr(),
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(out.ends_with("\r\n\r\nok\n"), "{out}");
    }

    #[test]
    fn stop_closes_the_listener() {
        let backend = spawn_thread("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = backend.addr();
        backend.stop();
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}
