//! `push.policy = "safe"`: which HAProxy configs a node accepts from the bus.
//!
//! Whoever can push a config to a node controls HAProxy there, and HAProxy runs as the agent's
//! user. Under the `safe` policy a pushed config may route, balance, rewrite and answer HTTP as it
//! likes, but may not turn that into running code, reading or writing files of the host, or
//! reaching into it through sockets. [`check`] reads the config with [`cfg_syntax`] (HAProxy's own
//! quoting rules, so `"lua-load"` or `lua\x2dload` is still `lua-load`) and reports every
//! violation, each with its line. Every branch of an `.if` block is checked: which one HAProxy
//! takes depends on the host.
//!
//! The rules (their `rule` ids in brackets), and what an attacker could do without each:
//!
//! - [syntax] A line that cannot be read with certainty is refused: a check over words HAProxy
//!   reads differently proves nothing.
//! - [lua] `lua-load`, `lua-load-per-thread`, `lua-prepend-path`, any `lua-*` keyword: Lua runs
//!   with the process's rights (`io.open`, `os.execute`).
//! - [exec] `external-check` and `option external-check` (runs a command per health check),
//!   `insecure-fork-wanted`, `insecure-setuid-wanted` (lift HAProxy's guards against forking and
//!   setuid), `filter opentracing`/`filter opentelemetry` (their config loads a plugin library),
//!   `ssl-engine`, `ssl-provider`, `ssl-provider-path`, `module-load`, `module-path`
//!   (load native code).
//! - [env] `setenv`, `presetenv`, `resetenv`, `unsetenv`: they change the environment that
//!   later `$VAR`s read and that child processes inherit (`LD_PRELOAD`).
//! - [program] a `program` section, every line of it: the master process runs its `command`.
//! - [socket] Any unix socket but the configured admin socket: `bind`, `server`,
//!   `server-template`, `peer`, `nameserver`, `mailer`, `dgram-bind`, `log` and `stats socket`
//!   with a `/path`, `unix@`, `uxst@` or `uxdg@` address. A listener creates (and replaces) a file;
//!   a client reaches any local service the agent's user can (Docker's socket, the agent's own).
//!   Abstract sockets (`abns@`, `abnsz@`) are not files, but any local user can reach them: a
//!   pushed listener there is an unauthenticated door into the host, so they are refused too;
//!   `fd@`/`sockpair@` (inherited file descriptors) as well, but `log fd@1`/`log fd@2` (stdout,
//!   stderr). `unix-bind` is refused: it moves every unix socket. `log /dev/log` is refused like any
//!   other unix socket: log to syslog over UDP (`log 127.0.0.1:514 local0`) instead. Besides,
//!   `stats socket` is allowed only on the admin socket, and not with a `mode` that lets other
//!   users in: a stats socket on TCP or at another path with `level admin` would hand HAProxy's
//!   control to whoever reaches it.
//! - [path] A file outside `allowed_paths`: `errorfile` would serve `/etc/shadow` or
//!   `~/.ssh/id_ed25519` as an error page, `http-request return file` and maps and ACL files read
//!   any file, `pidfile` and `server-state-file` write one, `crt`/`ca-file` read keys, `chroot`
//!   and `*-base` move where the rest points. A path is inside when, resolved lexically (`.`
//!   dropped, `..` removing the component before it; a `..` above `/` is refused), it lies
//!   under an allowed directory, component by component (`/etc/haproxy-evil` is not under
//!   `/etc/haproxy`). Symbolic links are not followed (this module touches no file): the allowed
//!   directories must not hold links the pusher controls.
//! - [path] A relative file name: HAProxy resolves it against its working directory, which the
//!   pusher does not know and the operator did not choose. Refused, except where a `crt-base`,
//!   `ca-base`, `key-base` or `server-state-base` of `global` applies: then it is joined to that
//!   base and checked. `ca-file @system-ca` (the system store, read only) is allowed.
//! - [variable] An environment variable in a file or socket position: the agent cannot know
//!   where `${X}/y` points. Outside those positions, a word that starts with one, on a line that
//!   is not a request rule, is refused too.
//!
//! Where is a path? The file-taking keywords are matched explicitly (`chroot`, `pidfile`,
//! `errorfile`, every `*-file`/`*-base`/`*-path` keyword, `crt`, `crt-list`, `ca-file`,
//! `crl-file`, `ca-verify-file`, `ca-sign-file`, `key`, `ocsp`, `issuer`, `sctl` on `bind`,
//! `server`, `default-server`, `load` lines, `-f` anywhere, `file`/`lf-file`/`errorfile` in
//! `http-request`/`http-response`/`http-after-response`/`http-error` rules, `config` of a
//! `filter`, `stats file`, `default-path origin`, `backing-file`, and the first
//! argument of the `map*` converters and `set-map`/`del-map`/`add-acl`/`del-acl`). Beyond them,
//! every word that starts with `/` is checked as a path, unless the line is one whose `/` words
//! are HTTP paths and patterns, not files: request and response rules (`http-request`,
//! `http-response`, `http-after-response`, `tcp-request`, `tcp-response`, `http-check`,
//! `tcp-check`), `acl` and conditions, `redirect`, `monitor-uri`, `stats` (but `stats socket`),
//! `option` (such as `option httpchk GET /health`), `errorloc*` (URLs), `use_backend`,
//! `use-server`, `capture`, `cookie`, the log formats, and `docroot`/`path-info`/`index` of a
//! `fcgi-app` (paths on the FastCGI server). Arguments of other converters (`regsub(^/a,/b)`)
//! are inline values, not files. Anything else is a path until proven otherwise.
//!
//! Not covered: what the allowed files contain (a `crt-list` or an SPOE config names further
//! files); `user`/`group`/`uid`/`gid` (privilege drop when HAProxy starts as root); whether the
//! config declares the admin socket at all (the reload fails without it).

use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::cfg_syntax::{self, Line, SectionKind, Word};

/// What the `safe` policy allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafePolicy {
    /// The one unix socket a pushed config may declare (`stats socket`), absolute.
    pub admin_socket: PathBuf,
    /// Directories whose files a pushed config may name. Absolute; a relative entry allows
    /// nothing, and so does an empty list.
    pub allowed_paths: Vec<PathBuf>,
}

/// One line the policy refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// 1-based.
    pub line: usize,
    /// A short id: `syntax`, `lua`, `exec`, `env`, `program`, `socket`, `path`, `variable`.
    pub rule: &'static str,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

const POLICY: &str = "push.policy = \"safe\"";
const TRUSTED: &str = "or set push.policy = \"trusted\"";

/// Whether `text` is a config the `safe` policy accepts; if not, every violation, in line order.
pub fn check(text: &str, ctx: &SafePolicy) -> Result<(), Vec<Violation>> {
    let (lines, errors) = cfg_syntax::parse_all(text);
    let mut out: Vec<Violation> = errors
        .into_iter()
        .map(|e| Violation {
            line: e.line,
            rule: "syntax",
            message: format!(
                "{} (refused by {POLICY}: a line that cannot be read with certainty cannot be \
                 checked); fix the line",
                e.message
            ),
        })
        .collect();
    let bases = Bases::of(&lines);
    for line in &lines {
        Checker {
            ctx,
            bases: &bases,
            line,
            out: &mut out,
        }
        .run();
    }
    out.sort_by_key(|v| v.line);
    if out.is_empty() {
        Ok(())
    } else {
        Err(out)
    }
}

/// The `*-base` directories of `global`, against which relative file names resolve.
#[derive(Default)]
struct Bases {
    crt: Option<String>,
    ca: Option<String>,
    key: Option<String>,
    state: Option<String>,
}

#[derive(Clone, Copy)]
enum Base {
    None,
    Crt,
    Ca,
    Key,
    State,
}

impl Bases {
    fn of(lines: &[Line]) -> Bases {
        let mut bases = Bases::default();
        for line in lines.iter().filter(|l| l.section == SectionKind::Global) {
            let Some(value) = line.words.get(1).filter(|w| !w.env) else {
                continue;
            };
            let slot = match line.words[0].text.as_str() {
                "crt-base" => &mut bases.crt,
                "ca-base" => &mut bases.ca,
                "key-base" => &mut bases.key,
                "server-state-base" => &mut bases.state,
                _ => continue,
            };
            *slot = Some(value.text.clone());
        }
        bases
    }

    fn get(&self, base: Base) -> Option<&str> {
        match base {
            Base::None => None,
            Base::Crt => self.crt.as_deref(),
            Base::Ca => self.ca.as_deref(),
            // HAProxy falls back to crt-base for keys when key-base is not set.
            Base::Key => self.key.as_deref().or(self.crt.as_deref()),
            Base::State => self.state.as_deref(),
        }
    }
}

/// Lines whose `/` words are HTTP paths, URLs and patterns rather than files.
const REQUEST_KEYWORDS: &[&str] = &[
    "http-request",
    "http-response",
    "http-after-response",
    "tcp-request",
    "tcp-response",
    "http-check",
    "tcp-check",
    "acl",
    "redirect",
    "monitor-uri",
    "monitor",
    "stats",
    "option",
    "errorloc",
    "errorloc302",
    "errorloc303",
    "use_backend",
    "use-server",
    "use-fcgi-app",
    "capture",
    "declare",
    "cookie",
    "log-format",
    "log-format-sd",
    "error-log-format",
    "unique-id-format",
    "unique-id-header",
    "force-persist",
    "ignore-persist",
    "http-reuse",
    "compression",
    "set-var",
    "set-var-fmt",
    "filter",
    "http-error",
    "balance",
    "hash-type",
    "stick",
    "stick-table",
    "default_backend",
    "description",
    "node",
    "log-tag",
    "localpeer",
];

/// `fcgi-app` keywords whose paths are on the FastCGI server, not here.
const FCGI_REMOTE_PATHS: &[&str] = &["docroot", "path-info", "index", "set-param"];

/// Lines that carry an address in a fixed position.
fn address_index(line: &Line) -> Option<usize> {
    match line.word(0)? {
        "bind" | "dgram-bind" => Some(1),
        "log" => (line.word(1) != Some("global")).then_some(1),
        "server" | "peer" | "nameserver" | "mailer" => Some(2),
        "server-template" => Some(3),
        "stats" if line.word(1) == Some("socket") => Some(2),
        _ => None,
    }
}

/// Keyword options followed by a file, on `bind`/`server`/`default-server`/`load` lines.
fn option_file(option: &str) -> Option<Base> {
    Some(match option {
        "crt" | "crt-list" | "ca-sign-file" | "ocsp" | "issuer" | "sctl" => Base::Crt,
        "ca-file" | "crl-file" | "ca-verify-file" => Base::Ca,
        "key" => Base::Key,
        _ => return None,
    })
}

struct Checker<'a> {
    ctx: &'a SafePolicy,
    bases: &'a Bases,
    line: &'a Line,
    out: &'a mut Vec<Violation>,
}

impl Checker<'_> {
    fn push(&mut self, rule: &'static str, message: String) {
        self.out.push(Violation {
            line: self.line.number,
            rule,
            message,
        });
    }

    fn run(&mut self) {
        let line = self.line;
        let kw = line.words[0].text.as_str();
        if line.section == SectionKind::Program {
            self.push(
                "program",
                format!(
                    "`{kw}` in a `program` section: the master process runs the program's \
                     command as the agent's user, refused by {POLICY}; run it as a service of \
                     the host, {TRUSTED}"
                ),
            );
            return;
        }
        let second = line.word(1).unwrap_or("");
        if kw.starts_with("lua-") {
            self.push(
                "lua",
                format!(
                    "`{kw}` runs code as the agent's user and is refused by {POLICY}; load Lua \
                     from the file on disk (reload), {TRUSTED}"
                ),
            );
        }
        let exec = match kw {
            "external-check"
            | "insecure-fork-wanted"
            | "insecure-setuid-wanted"
            | "ssl-engine"
            | "ssl-provider"
            | "ssl-provider-path"
            | "module-load"
            | "module-path" => Some(kw),
            "option" if second == "external-check" => Some("option external-check"),
            "filter" if matches!(second, "opentracing" | "opentelemetry") => Some(kw),
            _ => None,
        };
        if let Some(what) = exec {
            self.push(
                "exec",
                format!(
                    "`{what}` runs programs or loads native code as the agent's user and is \
                     refused by {POLICY}; keep it in the config on disk (reload), {TRUSTED}"
                ),
            );
        }
        if matches!(kw, "setenv" | "presetenv" | "resetenv" | "unsetenv") {
            self.push(
                "env",
                format!(
                    "`{kw}` changes the environment of HAProxy and of what it runs, refused by \
                     {POLICY}; set the variable in the agent's service, {TRUSTED}"
                ),
            );
        }

        let mut seen = vec![false; line.words.len()];
        seen[0] = true;
        if let Some(i) = address_index(line) {
            if let Some(w) = line.words.get(i) {
                seen[i] = true;
                self.address(w);
            }
        }
        if kw == "stats" && second == "socket" {
            self.admin_socket_mode();
        }
        if kw == "unix-bind" {
            self.push(
                "socket",
                "`unix-bind` changes where every unix socket is created, the admin socket's \
                 included, and is refused by push.policy = \"safe\"; keep it in the config on \
                 disk (reload), or set push.policy = \"trusted\""
                    .to_string(),
            );
        }
        self.files(&mut seen);
        self.parenthesized();
        self.prefixed_sockets(&seen);
        self.remaining(&seen);
    }

    /// An address: a unix socket is allowed only as the admin socket of `stats socket`.
    fn address(&mut self, w: &Word) {
        let kw = self.line.words[0].text.clone();
        let stats = kw == "stats";
        let what = if stats {
            "stats socket".to_string()
        } else {
            kw
        };
        if w.env {
            self.push(
                "variable",
                format!(
                    "`{what} {}` uses an environment variable the agent cannot see, so where it \
                     listens or connects is unknown; refused by {POLICY}; write the address, \
                     {TRUSTED}",
                    w.text
                ),
            );
            return;
        }
        for addr in w.text.split(',') {
            // `log fd@1` / `log fd@2` are stdout and stderr.
            if what == "log" && matches!(addr, "fd@1" | "fd@2") {
                continue;
            }
            match classify(addr) {
                Addr::Unix(path) => {
                    if stats && same_path(path, &self.ctx.admin_socket) {
                        continue;
                    }
                    let instead = if stats {
                        "declare only the admin socket"
                    } else {
                        "use a TCP address"
                    };
                    self.push(
                        "socket",
                        format!(
                            "`{what} {addr}` is a unix socket other than the admin socket ({}); \
                             refused by {POLICY}: a listener replaces a file, a client reaches \
                             local services; {instead}, {TRUSTED}",
                            self.ctx.admin_socket.display()
                        ),
                    );
                }
                Addr::Other(kind) => self.push(
                    "socket",
                    format!(
                        "`{what} {addr}` is {kind}, refused by {POLICY}: any local process \
                         could reach it; use a TCP address, {TRUSTED}"
                    ),
                ),
                Addr::Inet if stats => self.push(
                    "socket",
                    format!(
                        "`stats socket {addr}`: the only stats socket a pushed config may declare \
                         is the admin socket ({}), refused by {POLICY}: another one hands \
                         HAProxy's control to whoever reaches it; {TRUSTED}",
                        self.ctx.admin_socket.display()
                    ),
                ),
                Addr::Inet => {}
            }
        }
    }

    /// `stats socket … mode M`: no access for other users.
    fn admin_socket_mode(&mut self) {
        let words = &self.line.words;
        for (i, w) in words.iter().enumerate() {
            if w.text != "mode" {
                continue;
            }
            let Some(m) = words.get(i + 1) else { continue };
            let ok = !m.env && u32::from_str_radix(&m.text, 8).is_ok_and(|mode| mode & 0o007 == 0);
            if !ok {
                self.push(
                    "socket",
                    format!(
                        "`stats socket … mode {}` lets other users reach the admin socket, \
                         refused by {POLICY}; use a mode such as 600 or 660, {TRUSTED}",
                        m.text
                    ),
                );
            }
        }
    }

    /// The words that are files by position.
    fn files(&mut self, seen: &mut [bool]) {
        let line = self.line;
        let words = &line.words;
        let kw = words[0].text.as_str();
        let mut file_at: Vec<(usize, Base)> = Vec::new();

        let bare = kw
            .strip_prefix("tune.")
            .or_else(|| kw.strip_prefix("httpclient."))
            .unwrap_or(kw);
        match kw {
            "chroot" | "pidfile" | "backing-file" => file_at.push((1, Base::None)),
            "errorfile" => file_at.push((2, Base::None)),
            "server-state-file" | "server-state-file-name" => file_at.push((1, Base::State)),
            "default-path" if line.word(1) == Some("origin") => file_at.push((2, Base::None)),
            // Refused as a whole (socket); its prefix is not checked again.
            "unix-bind" => seen.iter_mut().for_each(|s| *s = true),
            "load-server-state-from-file" => {}
            _ if bare.ends_with("-file") || bare.ends_with("-base") || bare.ends_with("-path") => {
                file_at.extend((1..words.len()).map(|i| (i, Base::None)));
            }
            _ => {}
        }
        let stats_socket = kw == "stats" && second_is(line, "socket");
        if matches!(
            kw,
            "bind" | "server" | "default-server" | "server-template" | "peer" | "load" | "crt"
        ) || stats_socket
            || line.section == SectionKind::CrtStore
        {
            for (i, w) in words.iter().enumerate() {
                if let Some(base) = option_file(&w.text) {
                    file_at.push((i + 1, base));
                }
            }
        }
        if matches!(
            kw,
            "http-request" | "http-response" | "http-after-response" | "http-error"
        ) {
            for (i, w) in words.iter().enumerate().skip(1) {
                if matches!(w.text.as_str(), "file" | "lf-file" | "errorfile") {
                    file_at.push((i + 1, Base::None));
                }
            }
        }
        if kw == "stats" && second_is(line, "file") {
            file_at.push((2, Base::None));
        }
        if kw == "filter" {
            for (i, w) in words.iter().enumerate() {
                if w.text == "config" {
                    file_at.push((i + 1, Base::None));
                }
            }
        }
        for (i, w) in words.iter().enumerate().skip(1) {
            if w.text == "-f" {
                file_at.push((i + 1, Base::None));
            }
        }
        for (i, base) in file_at {
            let Some(w) = words.get(i) else { continue };
            if seen[i] {
                continue;
            }
            seen[i] = true;
            let what = format!("{kw} … {}", w.text);
            self.file(&what, w, base);
        }
    }

    /// A word in a file position.
    fn file(&mut self, what: &str, w: &Word, base: Base) {
        if w.env {
            self.push(
                "variable",
                format!(
                    "`{what}` names a file through an environment variable the agent cannot see; \
                     refused by {POLICY}; write the path, {TRUSTED}"
                ),
            );
            return;
        }
        if w.text == "@system-ca" {
            return;
        }
        let path = if w.text.starts_with('/') {
            w.text.clone()
        } else if let Some(base) = self.bases.get(base).filter(|b| b.starts_with('/')) {
            format!("{base}/{}", w.text)
        } else {
            self.push(
                "path",
                format!(
                    "`{what}` is a relative file name, which HAProxy resolves against a \
                     directory the pusher does not choose; refused by {POLICY}; write an absolute \
                     path under an allowed path ({}), {TRUSTED}",
                    self.allowed()
                ),
            );
            return;
        };
        self.path(what, &path);
    }

    /// An absolute path: inside an allowed directory.
    fn path(&mut self, what: &str, path: &str) {
        match normalize(path) {
            None => self.push(
                "path",
                format!(
                    "`{what}`: `..` climbs above `/`; refused by {POLICY}; write the path \
                     without `..`"
                ),
            ),
            Some(p) if self.inside(&p) => {}
            Some(p) => self.push(
                "path",
                format!(
                    "`{what}` names {}, outside the allowed paths ({}); refused by {POLICY}: a \
                     pushed config could read or replace any file the agent's user can; move \
                     the file under an allowed path, {TRUSTED}",
                    p.display(),
                    self.allowed()
                ),
            ),
        }
    }

    fn inside(&self, p: &Path) -> bool {
        self.ctx
            .allowed_paths
            .iter()
            .filter_map(|a| normalize(&a.to_string_lossy()))
            .any(|a| a.is_absolute() && p.starts_with(&a))
    }

    fn allowed(&self) -> String {
        if self.ctx.allowed_paths.is_empty() {
            return "none".to_string();
        }
        self.ctx
            .allowed_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `map*(file…)`, `set-map(file)`, `del-map`, `add-acl`, `del-acl`, in any word.
    fn parenthesized(&mut self) {
        for w in &self.line.words {
            for (name, arg) in calls(&w.text) {
                let lname = name.to_ascii_lowercase();
                let takes_file = lname.starts_with("map")
                    || matches!(
                        lname.as_str(),
                        "set-map" | "del-map" | "add-acl" | "del-acl"
                    );
                if !takes_file {
                    continue;
                }
                let what = format!("{name}({arg})");
                let Some(text) = unquote_arg(arg) else {
                    self.push(
                        "path",
                        format!(
                            "`{what}`: a file argument with quotes or backslashes this check \
                             cannot read with certainty; refused by {POLICY}; write the path \
                             plainly, {TRUSTED}"
                        ),
                    );
                    continue;
                };
                let arg_word = Word {
                    text: text.to_string(),
                    quoted: false,
                    escaped: false,
                    env: w.env && arg.contains('$'),
                };
                self.file(&what, &arg_word, Base::None);
            }
        }
    }

    /// Socket prefixes anywhere (an address in a position not listed).
    fn prefixed_sockets(&mut self, seen: &[bool]) {
        for (i, w) in self.line.words.iter().enumerate() {
            if seen[i] {
                continue;
            }
            if let Addr::Unix(_) | Addr::Other(_) = classify_prefixed(&w.text) {
                self.push(
                    "socket",
                    format!(
                        "`{}` names a unix, abstract or inherited socket, refused by {POLICY}; \
                         use a TCP address, {TRUSTED}",
                        w.text
                    ),
                );
            }
        }
    }

    /// Every other word: a `/` word is a path, unless the line is a request rule.
    fn remaining(&mut self, seen: &[bool]) {
        let line = self.line;
        let kw = line.words[0].text.as_str();
        let stats_files = kw == "stats" && matches!(line.word(1), Some("socket" | "file"));
        let request = (REQUEST_KEYWORDS.contains(&kw) && !stats_files)
            || (line.section == SectionKind::FcgiApp && FCGI_REMOTE_PATHS.contains(&kw))
            || SectionKind::from_keyword(kw).is_some();
        if request {
            return;
        }
        for (i, w) in line.words.iter().enumerate() {
            if seen[i] || classify_prefixed(&w.text) != Addr::Inet {
                continue;
            }
            if w.env && w.text.starts_with('$') {
                self.push(
                    "variable",
                    format!(
                        "`{kw} … {}` starts with an environment variable the agent cannot see; \
                         it may be a path; refused by {POLICY}; write the value, {TRUSTED}",
                        w.text
                    ),
                );
            } else if w.text.starts_with('/') {
                let what = format!("{kw} … {}", w.text);
                self.file(&what, w, Base::None);
            }
        }
    }
}

fn second_is(line: &Line, s: &str) -> bool {
    line.word(1) == Some(s)
}

#[derive(Debug, PartialEq, Eq)]
enum Addr<'a> {
    Unix(&'a str),
    Other(&'static str),
    Inet,
}

/// What an address in an address position is.
fn classify(addr: &str) -> Addr<'_> {
    if addr.starts_with('/') {
        return Addr::Unix(addr);
    }
    classify_prefixed(addr)
}

/// What an address with a socket-family prefix is (anything else is `Inet`).
fn classify_prefixed(word: &str) -> Addr<'_> {
    let Some((prefix, rest)) = word.split_once('@') else {
        return Addr::Inet;
    };
    match prefix.to_ascii_lowercase().as_str() {
        "unix" | "uxst" | "uxdg" => Addr::Unix(rest),
        "abns" | "abnsz" => Addr::Other("an abstract unix socket"),
        "fd" | "sockpair" => Addr::Other("an inherited file descriptor"),
        _ => Addr::Inet,
    }
}

/// The `name(first argument)` calls in a word: `%[src,map_ip(/a,x)]` gives `("map_ip", "/a")`.
fn calls(word: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    for (open, _) in word.match_indices('(') {
        let before = &word[..open];
        let start = before
            .rfind([',', '[', '(', ' ', '{', ')'])
            .map_or(0, |i| i + 1);
        let name = &before[start..];
        let after = &word[open + 1..];
        let end = after.find([',', ')']).unwrap_or(after.len());
        out.push((name, after[..end].trim()));
    }
    out
}

/// A sample-expression argument without its quotes (`'a'`, `"a"`), or `None` if it holds quotes or
/// backslashes otherwise (HAProxy's argument parser would read them in ways not repeated here).
fn unquote_arg(arg: &str) -> Option<&str> {
    let special = |s: &str| s.contains(['\'', '"', '\\']);
    for q in ['\'', '"'] {
        if let Some(inner) = arg.strip_prefix(q).and_then(|a| a.strip_suffix(q)) {
            return (!special(inner)).then_some(inner);
        }
    }
    (!special(arg)).then_some(arg)
}

/// `path` resolved lexically, or `None` if it is not absolute or a `..` climbs above `/`.
fn normalize(path: &str) -> Option<PathBuf> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn same_path(a: &str, b: &Path) -> bool {
    match (normalize(a), normalize(&b.to_string_lossy())) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> SafePolicy {
        SafePolicy {
            admin_socket: PathBuf::from("/run/ebb/admin.sock"),
            allowed_paths: vec![
                PathBuf::from("/etc/haproxy"),
                PathBuf::from("/var/lib/ebb/"),
            ],
        }
    }

    /// (line, rule) of every violation.
    fn violations(cfg: &str) -> Vec<(usize, &'static str)> {
        match check(cfg, &policy()) {
            Ok(()) => Vec::new(),
            Err(v) => v.iter().map(|v| (v.line, v.rule)).collect(),
        }
    }

    /// The quickstart's config, its admin socket moved to the policy's.
    const QUICKSTART: &str = include_str!("../../../examples/quickstart/haproxy.cfg");

    /// A config as tests/support/haproxy.rs renders it, plus the usual production lines.
    const REALISTIC: &str = r#"global
    stats socket /run/ebb/admin.sock mode 600 level admin expose-fd listeners
    set-var proc.ebb_draining env(EBB_DRAINING),add(0)
    hard-stop-after 5m
    log 127.0.0.1:514 local0 info
    log stdout format raw local0
    maxconn 20000
    node ${HOSTNAME}
    crt-base /etc/haproxy/certs
    ca-base /etc/haproxy/ca
    server-state-base /var/lib/ebb/state
    server-state-file global.state
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-dh-param-file /etc/haproxy/dh.pem

defaults
    mode http
    log global
    option httplog
    option httpchk GET /healthz HTTP/1.1
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    errorfile 503 /etc/haproxy/errors/503.http
    errorloc302 404 /not-found.html
    load-server-state-from-file global

frontend fe
    bind 127.0.0.1:8080
    bind :::8443 v4v6 ssl crt site.pem ca-file client-ca.pem crt-list /etc/haproxy/certs/list.txt alpn h2,http/1.1
    acl api path_beg /api/ /v2/
    acl blocked src -f /etc/haproxy/blocked.lst
    acl static path_end .css .js
    http-request return status 503 content-type text/plain string "draining\n" if { path /healthz } { var(proc.ebb_draining) -m int 1 }
    http-request return status 200 content-type text/plain string "ok\n" if { path /healthz }
    http-request return status 404 content-type text/html file /etc/haproxy/errors/404.html if { path /missing }
    http-request redirect location /new/ if { path /old/ }
    http-request set-path %[path,regsub(^/api/,/)] if api
    http-request set-header X-Backend %[req.hdr(host),lower,map_dom(/etc/haproxy/maps/hosts.map,default)]
    http-request set-map(/etc/haproxy/maps/dyn.map) %[src] %[req.hdr(x-id)] if { path /register }
    http-after-response set-header Connection close if { var(proc.ebb_draining) -m int 1 }
    use_backend %[req.hdr(host),lower,map(/etc/haproxy/maps/backends.map,be)]
    default_backend be

backend be
    balance roundrobin
    server app 127.0.0.1:8081 check
    server tls 10.0.0.2:443 ssl verify required ca-file @system-ca sni str(example.com)
    server-template web 3 10.0.1.1:80 check

frontend stats
    bind 127.0.0.1:8404
    stats enable
    stats uri /stats
    stats refresh 5s

http-errors site
    errorfile 404 /etc/haproxy/errors/404.http

resolvers dns
    nameserver ns1 10.0.0.53:53
    parse-resolv-conf

peers mypeers
    peer node1 10.0.0.1:1024
    peer node2 10.0.0.2:1024

.if defined(EXTRA)
frontend extra
    bind 127.0.0.1:9000
    default_backend be
.endif
"#;

    #[test]
    fn clean_configs_are_accepted() {
        let quickstart = QUICKSTART.replace("/tmp/ebb-demo/admin.sock", "/run/ebb/admin.sock");
        assert_eq!(violations(&quickstart), []);
        assert_eq!(violations(REALISTIC), []);
    }

    #[test]
    fn the_quickstart_socket_is_not_the_admin_socket() {
        assert_eq!(violations(QUICKSTART), [(5, "socket")]);
    }

    /// One row per refused kind: (config, its violations).
    #[test]
    fn refused_kinds_name_their_line() {
        let cases: &[(&str, &[(usize, &str)])] = &[
            ("global\n  lua-load /etc/haproxy/a.lua\n", &[(2, "lua")]),
            (
                "global\n\n  lua-load-per-thread /etc/haproxy/a.lua\n",
                &[(3, "lua")],
            ),
            (
                "global\n  lua-prepend-path /etc/haproxy/?.lua\n",
                &[(2, "lua")],
            ),
            ("global\n  external-check\n", &[(2, "exec")]),
            ("backend b\n  option external-check\n", &[(2, "exec")]),
            (
                "backend b\n  external-check command /bin/true\n",
                &[(2, "exec"), (2, "path")],
            ),
            ("global\n  insecure-fork-wanted\n", &[(2, "exec")]),
            ("global\n  insecure-setuid-wanted\n", &[(2, "exec")]),
            ("global\n  ssl-engine rdrand\n", &[(2, "exec")]),
            (
                "global\n  setenv LD_PRELOAD /etc/haproxy/x.so\n",
                &[(2, "env")],
            ),
            ("global\n  presetenv A b\n", &[(2, "env")]),
            ("global\n  resetenv\n", &[(2, "env")]),
            ("global\n  unsetenv PATH\n", &[(2, "env")]),
            (
                "global\nprogram evil\n  command /bin/sh -c id\n  option start-on-reload\n",
                &[(2, "program"), (3, "program"), (4, "program")],
            ),
            (
                "global\n  stats socket /tmp/other.sock level admin\n",
                &[(2, "socket")],
            ),
            (
                "global\n  stats socket ipv4@0.0.0.0:9999 level admin\n",
                &[(2, "socket")],
            ),
            (
                "global\n  stats socket :9999 level admin\n",
                &[(2, "socket")],
            ),
            (
                "global\n  stats socket /run/ebb/admin.sock mode 666 level admin\n",
                &[(2, "socket")],
            ),
            (
                "global\n  stats socket abns@x level admin\n",
                &[(2, "socket")],
            ),
            (
                "frontend f\n  bind /var/run/docker.sock\n",
                &[(2, "socket")],
            ),
            (
                "frontend f\n  bind unix@/etc/haproxy/f.sock\n",
                &[(2, "socket")],
            ),
            ("frontend f\n  bind :80,unix@/tmp/x\n", &[(2, "socket")]),
            ("frontend f\n  bind abns@hidden\n", &[(2, "socket")]),
            ("frontend f\n  bind fd@3\n", &[(2, "socket")]),
            ("frontend f\n  bind /run/ebb/admin.sock\n", &[(2, "socket")]),
            (
                "backend b\n  server d /var/run/docker.sock\n",
                &[(2, "socket")],
            ),
            (
                "backend b\n  server d unix@/var/run/docker.sock\n",
                &[(2, "socket")],
            ),
            (
                "backend b\n  server-template s 2 uxst@/x\n",
                &[(2, "socket")],
            ),
            ("global\n  log /dev/log local0\n", &[(2, "socket")]),
            ("peers p\n  peer a /tmp/p.sock\n", &[(2, "socket")]),
            ("backend b\n  source unix@/tmp/x\n", &[(2, "socket")]),
            ("global\n  errorfile 503 /etc/shadow\n", &[(2, "path")]),
            (
                "defaults\n  errorfile 503 /etc/haproxy/../shadow\n",
                &[(2, "path")],
            ),
            (
                "defaults\n  errorfile 503 /etc/haproxy/../../../../x\n",
                &[(2, "path")],
            ),
            (
                "defaults\n  errorfile 503 /etc/haproxy-evil/x\n",
                &[(2, "path")],
            ),
            (
                "defaults\n  errorfile 503 errors/503.http\n",
                &[(2, "path")],
            ),
            ("global\n  chroot /\n", &[(2, "path")]),
            ("global\n  pidfile /home/u/.bashrc\n", &[(2, "path")]),
            ("global\n  crt-base /root\n", &[(2, "path")]),
            ("global\n  server-state-file /tmp/s\n", &[(2, "path")]),
            ("global\n  h1-case-adjust-file /tmp/h\n", &[(2, "path")]),
            ("global\n  51degrees-data-file /tmp/d\n", &[(2, "path")]),
            ("global\n  tune.ssl.keylog-file /tmp/k\n", &[(2, "path")]),
            (
                "global\n  unix-bind prefix /tmp mode 777\n",
                &[(2, "socket")],
            ),
            ("global\n  log fd@3 local0\n", &[(2, "socket")]),
            (
                "frontend f\n  bind :443 ssl crt /root/key.pem\n",
                &[(2, "path")],
            ),
            ("frontend f\n  bind :443 ssl crt site.pem\n", &[(2, "path")]),
            (
                "frontend f\n  bind :443 ssl crt /etc/haproxy/a.pem ca-file /x crl-file /y\n",
                &[(2, "path"), (2, "path")],
            ),
            (
                "backend b\n  server s 1.1.1.1:443 ssl crt /tmp/c.pem\n",
                &[(2, "path")],
            ),
            ("frontend f\n  acl bad src -f /etc/passwd\n", &[(2, "path")]),
            (
                "frontend f\n  http-request deny if { src -f /tmp/x.lst }\n",
                &[(2, "path")],
            ),
            (
                "frontend f\n  http-request return status 200 file /etc/shadow\n",
                &[(2, "path")],
            ),
            (
                "frontend f\n  http-response return status 200 lf-file /etc/shadow\n",
                &[(2, "path")],
            ),
            (
                "http-errors e\n  errorfile 404 /etc/shadow\n",
                &[(2, "path")],
            ),
            (
                "frontend f\n  use_backend %[req.hdr(host),map(/etc/passwd)]\n",
                &[(2, "path")],
            ),
            (
                "frontend f\n  http-request set-var(txn.x) req.hdr(a),map_str(/tmp/m,x)\n",
                &[(2, "path")],
            ),
            (
                "frontend f\n  http-request set-map(/tmp/m) %[src] x\n",
                &[(2, "path")],
            ),
            (
                "frontend f\n  http-request set-var(txn.x) src,map_ip(hosts.map)\n",
                &[(2, "path")],
            ),
            (
                "frontend f\n  filter spoe engine x config /tmp/spoe.conf\n",
                &[(2, "path")],
            ),
            ("ring r\n  backing-file /tmp/ring\n", &[(2, "path")]),
            (
                "frontend f\n  filter opentracing config /etc/haproxy/ot.cfg\n",
                &[(2, "exec")],
            ),
            ("global\n  stats file /tmp/s\n", &[(2, "path")]),
            (
                "frontend f\n  use_backend %[src,map('/etc/passwd')]\n",
                &[(2, "path")],
            ),
            (
                "frontend f\n  use_backend \"%[src,map('/etc/a\\'b')]\"\n",
                &[(2, "path")],
            ),
            ("global\n  some-future-keyword /tmp/x\n", &[(2, "path")]),
            (
                "global\n  errorfile 503 ${HOME}/.ssh/id_rsa\n",
                &[(2, "variable")],
            ),
            ("frontend f\n  bind ${ADDR}\n", &[(2, "variable")]),
            ("backend b\n  server s $TARGET\n", &[(2, "variable")]),
            (
                "frontend f\n  use_backend %[src,map(${MAPS}/a)]\n",
                &[(2, "variable")],
            ),
            ("global\n  some-keyword ${X}\n", &[(2, "variable")]),
        ];
        for (cfg, want) in cases {
            assert_eq!(violations(cfg), *want, "{cfg}");
        }
    }

    #[test]
    fn allowed_paths_and_bases() {
        for cfg in [
            "global\n  crt-base /etc/haproxy/certs\nfrontend f\n  bind :443 ssl crt site.pem\n",
            "global\n  key-base /etc/haproxy/k\n  crt-base /etc/haproxy/c\nfrontend f\n  bind :443 ssl crt a.pem key a.key\n",
            "defaults\n  errorfile 503 /etc/haproxy/./x/../503.http\n",
            "defaults\n  errorfile 503 /var/lib/ebb\n",
            "global\n  stats socket /run/ebb/./admin.sock mode 660 level admin\n",
            "global\n  stats socket unix@/run/ebb/admin.sock\n",
            "backend b\n  server s ipv4@10.0.0.1:80\n",
            "global\n  log ring@buf local0\n",
            "global\n  log fd@1 local0\n  log stderr local0\n",
            "backend b\n  no option external-check\n",
            "fcgi-app php\n  docroot /var/www/html\n  index index.php\n",
            "frontend f\n  use_backend \"%[src,map('/etc/haproxy/b.map',x)]\"\n",
            "frontend f\n  filter spoe engine x config /etc/haproxy/spoe.conf\n",
            "frontend f\n  monitor-uri /up\n  redirect prefix /x code 301\n",
        ] {
            assert_eq!(violations(cfg), [], "{cfg}");
        }
        // A base outside the allowed paths is refused itself, and what resolves under it too.
        assert_eq!(
            violations("global\n  crt-base /root\nfrontend f\n  bind :443 ssl crt a.pem\n"),
            [(2, "path"), (4, "path")]
        );
    }

    #[test]
    fn quoting_does_not_hide_a_directive() {
        let cases: &[(&str, &[(usize, &str)])] = &[
            ("global\n  \"lua-load\" /etc/haproxy/a.lua\n", &[(2, "lua")]),
            ("global\n  'lua-load' /etc/haproxy/a.lua\n", &[(2, "lua")]),
            ("global\n  lua\"-\"load /etc/haproxy/a.lua\n", &[(2, "lua")]),
            ("global\n  lua\\x2dload /etc/haproxy/a.lua\n", &[(2, "lua")]),
            ("global\n  errorfile 503 \"/etc/shadow\"\n", &[(2, "path")]),
            (
                "global\n  errorfile 503 \\x2fetc\\x2fshadow\n",
                &[(2, "path")],
            ),
            (
                "global\n  errorfile 503 /etc/haproxy/a\\ b/../../../etc/shadow\n",
                &[(2, "path")],
            ),
            (
                "global\n  .if 0\n  lua-load /etc/haproxy/a.lua\n  .endif\n",
                &[(3, "lua")],
            ),
            (
                "global\n.if 1\n.else\n  setenv A b\n.endif\n",
                &[(4, "env")],
            ),
            // `lua\-load` keeps its backslash: HAProxy sees an unknown keyword, no Lua.
            ("global\n  lua\\-load /etc/haproxy/a.lua\n", &[]),
            // Comments and quoted hashes.
            (
                "global\n  # lua-load /x\n  description \"# lua-load /x\"\n",
                &[],
            ),
            ("global\n  description a # lua-load /x\n", &[]),
            // `\#` is not a comment: the rest is read.
            (
                "global\n  description a \\# b\n  lua-load /x # c\n",
                &[(3, "lua"), (3, "path")],
            ),
        ];
        for (cfg, want) in cases {
            assert_eq!(violations(cfg), *want, "{cfg}");
        }
    }

    #[test]
    fn syntax_errors_are_violations_and_the_rest_is_still_checked() {
        let cfg =
            "global\n  description \"open\n  lua-load /etc/haproxy/a.lua\n  bind :80 \\\n.if 1\n";
        assert_eq!(
            violations(cfg),
            [(2, "syntax"), (3, "lua"), (4, "syntax"), (5, "syntax")]
        );
    }

    #[test]
    fn every_violation_is_reported() {
        let cfg = "global\n  lua-load /a.lua\n  setenv X y\nfrontend f\n  bind /x.sock\n";
        assert_eq!(
            violations(cfg),
            [(2, "lua"), (2, "path"), (3, "env"), (5, "socket")]
        );
    }

    #[test]
    fn messages_say_what_and_what_to_do() {
        let v = check("\n\n  lua-load /etc/haproxy/a.lua\n", &policy()).unwrap_err();
        assert_eq!(
            v[0].to_string(),
            "line 3: `lua-load` runs code as the agent's user and is refused by push.policy = \
             \"safe\"; load Lua from the file on disk (reload), or set push.policy = \"trusted\""
        );
        let v = check("defaults\n  errorfile 503 /etc/shadow\n", &policy()).unwrap_err();
        let s = v[0].to_string();
        assert!(
            s.starts_with("line 2: `errorfile … /etc/shadow` names /etc/shadow, outside"),
            "{s}"
        );
        assert!(s.contains("/etc/haproxy, /var/lib/ebb/"), "{s}");
    }

    #[test]
    fn every_rule_says_which_line_and_what_to_do() {
        let cfg =
            "global\n  lua-load /a\n  external-check\n  setenv A b\n  stats socket /tmp/s\n  \
                   errorfile 503 x\n  errorfile 503 ${X}\n  \"\nprogram p\n";
        let vs = check(cfg, &policy()).unwrap_err();
        let rules: Vec<&str> = vs.iter().map(|v| v.rule).collect();
        assert_eq!(
            rules,
            ["lua", "path", "exec", "env", "socket", "path", "variable", "syntax", "program"]
        );
        for v in vs {
            let s = v.to_string();
            assert!(s.starts_with(&format!("line {}: ", v.line)), "{s}");
            assert!(s.contains("push.policy = \"safe\""), "{s}");
        }
    }

    #[test]
    fn normalize_is_lexical() {
        let n = |p: &str| normalize(p).map(|p| p.display().to_string());
        assert_eq!(n("/a/./b/../c"), Some("/a/c".into()));
        assert_eq!(n("//a//b/"), Some("/a/b".into()));
        assert_eq!(n("/.."), None);
        assert_eq!(n("/a/../../b"), None);
        assert_eq!(n("a/b"), None);
    }

    #[test]
    fn unicode_and_garbage() {
        assert_eq!(violations("global\n  description \"✓ ünïcode\"\n"), []);
        assert_eq!(
            violations("défaults\n  errorfile 503 /etc/haproxy/é/✓\n"),
            []
        );
        assert_eq!(
            violations("global\n  errorfile 503 /étc/x\n"),
            [(2, "path")]
        );
        assert_eq!(violations("\u{feff}global\n"), [(1, "syntax")]);
        assert_eq!(violations("\0\n"), [(1, "syntax")]);
        assert_eq!(violations(""), []);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn never_panics_on_any_text(text in "\\PC*") {
            let _ = check(&text, &policy());
        }

        #[test]
        fn never_panics_on_structured_garbage(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("\n".to_string()), Just(" ".to_string()), Just("\"".to_string()),
                    Just("'".to_string()), Just("\\".to_string()), Just("$X".to_string()),
                    Just("(".to_string()), Just(")".to_string()), Just(",".to_string()),
                    Just("/".to_string()), Just("..".to_string()), Just("@".to_string()),
                    Just("unix@".to_string()), Just("map(".to_string()), Just("-f".to_string()),
                    Just("stats socket".to_string()), Just("bind".to_string()),
                    Just("server s".to_string()), Just("program p".to_string()),
                    Just("errorfile 503".to_string()), Just("crt".to_string()),
                    Just("mode".to_string()), Just("lua-load".to_string()),
                    Just(".if 1".to_string()), Just(".endif".to_string()),
                    "[a-z0-9é✓]{0,4}",
                ],
                0..40,
            )
        ) {
            let text = parts.concat();
            if let Err(vs) = check(&text, &policy()) {
                let lines = text.split('\n').count();
                for v in vs {
                    prop_assert!(v.line >= 1 && v.line <= lines, "{v}");
                    prop_assert!(!v.message.is_empty());
                }
            }
        }
    }
}
