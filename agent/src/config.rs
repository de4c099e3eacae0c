//! The agent's configuration (README.md, "Configuration"): a TOML file plus
//! `EBB_<SECTION>__<KEY>` environment overrides, deserialized strictly and validated once at
//! load, so that a running agent never meets a bad setting.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::haproxy::config_file;

/// A human-written duration such as `"250ms"` or `"30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn ms(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(Dur)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "bad duration {text:?} ({e}); write it like \"250ms\", \"30s\" or \"5m\""
                ))
            })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub nats: NatsConfig,
    pub haproxy: HaproxyConfig,
    pub drain: DrainConfig,
    pub reload: ReloadConfig,
    pub push: PushConfig,
    pub plugins: Vec<PluginConfig>,
    pub log: LogConfig,
    pub control: ControlConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Defaults to the hostname up to its first dot.
    pub id: String,
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// One server or several: a comma-separated string or a TOML array of URLs, kept as the
    /// comma-separated list (`bus::connect::servers` splits it).
    #[serde(deserialize_with = "url_list")]
    pub url: String,
    pub prefix: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "redact")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "redact")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
    pub events_stream: String,
    pub state_bucket: String,
    pub heartbeat: Dur,
    /// Most events the on-disk outbox holds while NATS is away; the oldest non-`drained` events go first.
    pub outbox_limit: usize,
    /// `max_age` of the events stream ebb creates: events older than this are discarded.
    pub events_max_age: Dur,
    /// `duplicate_window` of the events stream ebb creates: a Msg-Id seen within it is not stored
    /// twice. It bounds how late a retried event (from the outbox) is still deduplicated, and
    /// the server keeps every Msg-Id for that long.
    pub events_duplicate_window: Dur,
    /// `num_replicas` of the stream and bucket ebb creates (1 to 5). ebb never changes one that
    /// exists; it says so in the log and in `status` when either has fewer, or fewer current.
    pub stream_replicas: usize,
}

/// `nats.url` as a string (`"nats://a:4222,nats://b:4222"`) or an array of strings, normalised to
/// the comma-separated list.
fn url_list<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        One(String),
        Many(Vec<String>),
    }
    match Urls::deserialize(d) {
        Ok(Urls::One(url)) => Ok(url),
        Ok(Urls::Many(urls)) => {
            if let Some(bad) = urls.iter().find(|u| u.contains(',')) {
                return Err(serde::de::Error::custom(format!(
                    "nats.url entry {bad:?} holds a comma; give one URL per array entry"
                )));
            }
            Ok(urls
                .iter()
                .map(|u| u.trim())
                .filter(|u| !u.is_empty())
                .collect::<Vec<_>>()
                .join(","))
        }
        Err(_) => Err(serde::de::Error::custom(
            "nats.url must be a string (\"nats://a:4222\", commas between servers) or an array \
             of such strings ([\"nats://a:4222\", \"nats://b:4222\"])",
        )),
    }
}

fn redact<S: Serializer>(_: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("<redacted>")
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            prefix: ebb_sdk::subject::DEFAULT_PREFIX.into(),
            creds: None,
            nkey_seed: None,
            token: None,
            user: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            events_stream: ebb_sdk::subject::STREAM_NAME.into(),
            state_bucket: ebb_sdk::subject::KV_BUCKET.into(),
            heartbeat: Dur::secs(10),
            outbox_limit: 10_000,
            events_max_age: Dur::secs(7 * 24 * 3600),
            events_duplicate_window: Dur::secs(24 * 3600),
            stream_replicas: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Direct,
    MasterWorker,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HaproxyConfig {
    /// Defaults to `haproxy` found on PATH.
    pub binary: PathBuf,
    pub config: PathBuf,
    /// Defaults to the config's `stats socket … level admin expose-fd listeners`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<PathBuf>,
    pub mode: Mode,
    /// master-worker only: the master CLI (HAProxy's `-S`), with admin level.
    pub master_socket: PathBuf,
    /// master-worker only: `false` attaches to a master a service manager runs; `true` makes ebb
    /// start and own it (`haproxy -W -db -f CFG -S SOCK`).
    pub manage_master: bool,
    pub startup_timeout: Dur,
    pub stop_timeout: Dur,
    pub state_dir: PathBuf,
    /// Environment variables HAProxy inherits from the agent, besides `PATH` (and `EBB_DRAINING`,
    /// which ebb sets). Everything else, NATS secrets included, stays with the agent.
    pub env: Vec<String>,
    /// A worker's log (its stdout and stderr) past this many bytes is cut to its tail.
    pub worker_log_max_bytes: u64,
}

impl Default for HaproxyConfig {
    fn default() -> Self {
        HaproxyConfig {
            binary: PathBuf::from("haproxy"),
            config: PathBuf::from("/etc/haproxy/haproxy.cfg"),
            admin_socket: None,
            mode: Mode::Direct,
            master_socket: PathBuf::from("/run/haproxy-master.sock"),
            manage_master: false,
            startup_timeout: Dur::secs(30),
            stop_timeout: Dur::secs(120),
            state_dir: PathBuf::from("/var/lib/ebb"),
            env: Vec::new(),
            worker_log_max_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleRule {
    Connections,
    Sessions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadline {
    Report,
    Force,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    pub min_period: Dur,
    pub idle: IdleRule,
    pub ignore_frontends: Vec<String>,
    pub quiet_period: Dur,
    pub poll_interval: Dur,
    pub deadline: Dur,
    pub on_deadline: OnDeadline,
    pub stop_when_drained: bool,
    pub start_commands: Vec<String>,
    pub stop_commands: Vec<String>,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            min_period: Dur::secs(30),
            idle: IdleRule::Connections,
            ignore_frontends: Vec::new(),
            quiet_period: Dur::ms(0),
            poll_interval: Dur::ms(10),
            deadline: Dur::ms(0),
            on_deadline: OnDeadline::Report,
            stop_when_drained: false,
            start_commands: vec!["experimental-mode on; set var proc.ebb_draining int(1)".into()],
            stop_commands: vec!["experimental-mode on; set var proc.ebb_draining int(0)".into()],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Optional debounce between back-to-back reloads; a lone reload always starts at once.
    pub coalesce: Dur,
    /// Replaced by `push.enabled`; refused at load with a message that says so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_config_push: Option<bool>,
    /// Most old workers (HAProxy processes still finishing their connections) at once; a reload
    /// that would exceed it is refused as `conflict`, and nothing is killed to make room.
    pub max_old_workers: usize,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            coalesce: Dur::ms(0),
            allow_config_push: None,
            max_old_workers: 32,
        }
    }
}

/// Pushed configs: the `push` verb (docs/SECURITY.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Off by default: whoever may push may change what HAProxy does on this node.
    pub enabled: bool,
    pub policy: PushPolicy,
    /// Absolute directories a pushed config may name files in; empty means the config's own
    /// directory.
    pub allowed_paths: Vec<PathBuf>,
    /// nkey public keys (`U…`); when set, every push must be signed by one of them.
    pub keys: Vec<String>,
    /// The longest `haproxy -c` of a pushed config may run before it is killed and the push
    /// refused: loading a config can run code (Lua), and a check that never ends would hold every
    /// later reload and `stop`.
    pub check_timeout: Dur,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: false,
            policy: PushPolicy::Safe,
            allowed_paths: Vec::new(),
            keys: Vec::new(),
            check_timeout: Dur::secs(10),
        }
    }
}

/// What a pushed config may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushPolicy {
    /// No code, no environment changes, no sockets or files outside `allowed_paths`.
    Safe,
    /// Anything HAProxy accepts: whoever may push is root on this node.
    Trusted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    Busy,
    Idle,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    pub name: String,
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default = "default_plugin_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_on_error")]
    pub on_error: OnError,
    #[serde(default)]
    pub config: serde_json::Value,
}

fn default_plugin_timeout() -> Dur {
    Dur::secs(2)
}
fn default_on_error() -> OnError {
    OnError::Busy
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The local control socket: the bus's requests, one JSON object per line, with no NATS at all
/// (`ebb ctl --local`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Where the socket is made (mode 0600, the agent's user); an empty path turns it off.
    pub socket: PathBuf,
}

/// The control socket's default path, also `ebb ctl --local`'s.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/ebb/ctl.sock";

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
        }
    }
}

/// `/metrics` and `/healthz` (README.md, "Metrics").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `IP:PORT` to serve on; `""` turns the server off.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9310".into(),
        }
    }
}

impl ControlConfig {
    /// The socket's path, unless it is turned off.
    pub fn socket(&self) -> Option<&Path> {
        (!self.socket.as_os_str().is_empty()).then_some(self.socket.as_path())
    }
}

impl MetricsConfig {
    /// The address to serve on; `None` when turned off (or not an address, which load refuses).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.trim().parse().ok()
    }
}

/// Everything wrong with a configuration, one line per problem.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(msg: String) -> Self {
        ConfigError {
            problems: vec![msg],
        }
    }
}

/// The validated configuration, with every default resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    /// Absolute path of the haproxy binary.
    pub haproxy_binary: PathBuf,
    /// The admin socket ebb talks to (and passes to `-x`). In master-worker mode it may be empty:
    /// the master CLI reaches every worker.
    pub admin_socket: PathBuf,
    /// `push.allowed_paths`, or the config's own directory when it is empty.
    pub push_allowed_paths: Vec<PathBuf>,
}

impl Settings {
    pub fn node_id(&self) -> &str {
        &self.config.node.id
    }
}

/// Reads `path` with environment overrides taken from `env` (normally `std::env::vars()`).
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::one(format!(
            "config file {}: not found; pass --config PATH or set EBB_CONFIG",
            path.display()
        )));
    }
    // Only `EBB_<SECTION>__<KEY>` names are overrides: other EBB_ variables (EBB_CONFIG, EBB_DRAINING in
    // HAProxy's environment, test knobs) must not turn into unknown keys.
    let overrides: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("EBB_") && k.contains("__"))
        .collect();
    let raw = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("EBB")
                .prefix_separator("_")
                .separator("__")
                // No `try_parsing`: it would turn `007` into the number 7 before serde sees the
                // key's type. Values stay strings, and each key's type parses its own (numbers,
                // booleans, durations), so `EBB_NODE__ID=007` is node "007".
                .source(Some(overrides)),
        )
        .build()
        .map_err(|e| ConfigError::one(format!("config file {}: {e}", path.display())))?;
    let config: Config = raw.try_deserialize().map_err(|e| {
        ConfigError::one(format!(
            "config file {}: {}",
            path.display(),
            explain_serde(&e.to_string())
        ))
    })?;
    validate(config, path)
}

/// Adds a fix to serde's terse messages.
fn explain_serde(msg: &str) -> String {
    if msg.starts_with("unknown field") {
        format!("{msg}; remove it or fix its spelling (the keys are listed in README.md, Configuration)")
    } else {
        msg.to_string()
    }
}

fn validate(mut config: Config, path: &Path) -> Result<Settings, ConfigError> {
    let mut problems = Vec::new();
    let file = path.display();

    if config.node.id.is_empty() {
        let host = hostname();
        config.node.id = host.split('.').next().unwrap_or_default().to_string();
        if !ebb_sdk::subject::is_valid_token(&config.node.id) {
            problems.push(format!(
                "{file}: node.id defaults to the hostname {host:?}, which is not a valid NATS subject token; set node.id to match ^[A-Za-z0-9_-]{{1,64}}$"
            ));
        }
    } else if !ebb_sdk::subject::is_valid_token(&config.node.id) {
        problems.push(format!(
            "{file}: node.id {:?} is not a valid NATS subject token; use 1 to 64 of A-Z a-z 0-9 _ -",
            config.node.id
        ));
    }
    for group in &config.node.groups {
        if !ebb_sdk::subject::is_valid_token(group) {
            problems.push(format!(
                "{file}: node.groups entry {group:?} is not a valid NATS subject token; use 1 to 64 of A-Z a-z 0-9 _ -"
            ));
        }
    }
    if !ebb_sdk::subject::is_valid_prefix(&config.nats.prefix) {
        problems.push(format!(
            "{file}: nats.prefix {:?} is not a valid subject prefix; use tokens of A-Z a-z 0-9 _ - joined by dots",
            config.nats.prefix
        ));
    }
    if config.nats.heartbeat.is_zero() {
        problems.push(format!(
            "{file}: nats.heartbeat must be more than 0s; the default is \"10s\""
        ));
    }
    let attached = config.haproxy.mode == Mode::MasterWorker && !config.haproxy.manage_master;
    if attached && config.drain.stop_when_drained {
        problems.push(format!(
            "{file}: drain.stop_when_drained cannot be used with haproxy.mode = \"master-worker\" and manage_master = false: a service manager runs HAProxy's master, and ebb never stops it; stop it there once drained, or set manage_master = true"
        ));
    }
    if config.haproxy.mode == Mode::MasterWorker && !config.haproxy.master_socket.is_absolute() {
        problems.push(format!(
            "{file}: haproxy.master_socket {} must be an absolute path, the one HAProxy's `-S` option names",
            config.haproxy.master_socket.display()
        ));
    }
    if config.haproxy.worker_log_max_bytes < 4096 {
        problems.push(format!(
            "{file}: haproxy.worker_log_max_bytes must be at least 4096; the default is 16777216 (16 MiB)"
        ));
    }
    if config.reload.allow_config_push.is_some() {
        problems.push(format!(
            "{file}: reload.allow_config_push is gone: a pushed config has its own verb, `push`; remove the key and set push.enabled = true (see docs/SECURITY.md)"
        ));
    }
    for dir in &config.push.allowed_paths {
        if !dir.is_absolute() {
            problems.push(format!(
                "{file}: push.allowed_paths entry {} is not an absolute directory; write it from /",
                dir.display()
            ));
        }
    }
    for key in &config.push.keys {
        if let Err(e) = ebb_sdk::push::check_public_key(key) {
            problems.push(format!("{file}: push.keys: {e}"));
        }
    }
    if config.push.check_timeout.is_zero() {
        problems.push(format!(
            "{file}: push.check_timeout must be more than 0s; the default is \"10s\""
        ));
    }
    if config.reload.max_old_workers == 0 {
        problems.push(format!(
            "{file}: reload.max_old_workers must be at least 1; the default is 32"
        ));
    }
    if config.nats.events_duplicate_window.is_zero() || config.nats.events_max_age.is_zero() {
        problems.push(format!(
            "{file}: nats.events_max_age and nats.events_duplicate_window must be more than 0s; the defaults are \"7d\" and \"1d\""
        ));
    } else if config.nats.events_duplicate_window > config.nats.events_max_age {
        problems.push(format!(
            "{file}: nats.events_duplicate_window ({}) is longer than nats.events_max_age ({}); JetStream refuses that, so shorten the window",
            config.nats.events_duplicate_window, config.nats.events_max_age
        ));
    }
    if !(1..=5).contains(&config.nats.stream_replicas) {
        problems.push(format!(
            "{file}: nats.stream_replicas is {}, JetStream allows 1 to 5; set it to the replicas the events stream and KV bucket should have (3 on a 3-server cluster, 1 on a single server)",
            config.nats.stream_replicas
        ));
    }
    if config.nats.url.split(',').all(|u| u.trim().is_empty()) {
        problems.push(format!(
            "{file}: nats.url names no server; set it to a URL like \"nats://127.0.0.1:4222\", or several"
        ));
    }
    for name in &config.haproxy.env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            problems.push(format!(
                "{file}: haproxy.env entry {name:?} is not an environment variable name; list names only, like [\"TZ\", \"LANG\"]"
            ));
        }
    }
    if config.drain.poll_interval.is_zero() {
        problems.push(format!(
            "{file}: drain.poll_interval must be more than 0s; the default is \"10ms\""
        ));
    }
    if config.haproxy.startup_timeout.is_zero() {
        problems.push(format!(
            "{file}: haproxy.startup_timeout must be more than 0s; the default is \"30s\""
        ));
    }
    if !config.metrics.listen.trim().is_empty() && config.metrics.addr().is_none() {
        problems.push(format!(
            "{file}: metrics.listen {:?} is not an IP:PORT address; write it like \"127.0.0.1:9310\" or \"[::1]:9310\", or \"\" to turn metrics off",
            config.metrics.listen
        ));
    }
    if tracing_subscriber::EnvFilter::try_new(&config.log.level).is_err() {
        problems.push(format!(
            "{file}: log.level {:?} is not a level or filter; use error, warn, info, debug or trace",
            config.log.level
        ));
    }

    let haproxy_binary = match find_binary(&config.haproxy.binary) {
        Some(found) => found,
        None => {
            problems.push(format!(
                "{file}: haproxy.binary {}: not found or not executable; install haproxy (apt-get install haproxy) or set haproxy.binary",
                config.haproxy.binary.display()
            ));
            PathBuf::new()
        }
    };

    let mut admin_socket = PathBuf::new();
    let cfg_path = &config.haproxy.config;
    match std::fs::read_to_string(cfg_path) {
        Err(e) => problems.push(format!(
            "{file}: haproxy.config {}: {e}; point haproxy.config at your haproxy.cfg",
            cfg_path.display()
        )),
        Ok(text) => {
            match config_file::find_admin_socket(&text, config.haproxy.admin_socket.as_deref()) {
                Ok(sock) => admin_socket = sock,
                // In master-worker mode ebb reaches every worker through the master CLI: an
                // admin socket is optional (a pushed config may keep the one it names).
                Err(_)
                    if config.haproxy.mode == Mode::MasterWorker
                        && config.haproxy.admin_socket.is_none() => {}
                Err(e) => problems.push(format!("{}: {e}", cfg_path.display())),
            }
        }
    }

    for (i, plugin) in config.plugins.iter().enumerate() {
        if plugin.name.is_empty() || !ebb_sdk::subject::is_valid_token(&plugin.name) {
            problems.push(format!(
                "{file}: plugins[{i}].name {:?} must match ^[A-Za-z0-9_-]{{1,64}}$",
                plugin.name
            ));
        }
    }

    if let Some(socket) = config.control.socket() {
        // sun_path holds 108 bytes with its NUL.
        if !socket.is_absolute() || socket.as_os_str().len() > 107 {
            problems.push(format!(
                "{file}: control.socket {:?} must be an absolute path of at most 107 bytes; \
                 set it to one (default {DEFAULT_CONTROL_SOCKET}), or to \"\" to turn the \
                 control socket off",
                socket.display()
            ));
        }
    }

    if problems.is_empty() {
        let push_allowed_paths = if config.push.allowed_paths.is_empty() {
            config
                .haproxy
                .config
                .parent()
                .map(Path::to_path_buf)
                .into_iter()
                .collect()
        } else {
            config.push.allowed_paths.clone()
        };
        Ok(Settings {
            config,
            haproxy_binary,
            admin_socket,
            push_allowed_paths,
        })
    } else {
        Err(ConfigError { problems })
    }
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Resolves a binary like a shell would: a path with a slash as is, a bare name through PATH.
fn find_binary(binary: &Path) -> Option<PathBuf> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.components().count() > 1 {
        return executable(binary).then(|| binary.to_path_buf());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| executable(p))
}

/// The effective configuration as TOML, secrets redacted, for `ebb config check`.
pub fn render(settings: &Settings) -> String {
    let mut config = settings.config.clone();
    config.haproxy.binary = settings.haproxy_binary.clone();
    config.haproxy.admin_socket = Some(settings.admin_socket.clone());
    let mut value = match toml::Value::try_from(&config) {
        Ok(v) => v,
        Err(e) => return format!("# cannot render the configuration: {e}\n"),
    };
    // Plugin configs are free-form JSON; TOML cannot hold JSON nulls, so drop them from the display.
    if let Some(toml::Value::Array(plugins)) = value.get_mut("plugins") {
        for p in plugins {
            if let Some(t) = p.as_table_mut() {
                t.retain(|_, v| !matches!(v, toml::Value::Table(m) if m.is_empty()));
            }
        }
    }
    toml::to_string_pretty(&value)
        .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const HAPROXY_CFG: &str = "global\n    stats socket /tmp/ebb-test-admin.sock mode 600 level admin expose-fd listeners\n";

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new(haproxy_cfg: &str) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("haproxy.cfg"), haproxy_cfg).expect("write");
            // Any executable works as the "haproxy binary" for validation.
            Fixture { dir }
        }
        fn agent(&self, body: &str) -> PathBuf {
            let path = self.dir.path().join("agent.toml");
            let mut f = std::fs::File::create(&path).expect("create");
            write!(
                f,
                "[haproxy]\nbinary = \"/bin/sh\"\nconfig = \"{}\"\nstate_dir = \"{}\"\n{body}",
                self.dir.path().join("haproxy.cfg").display(),
                self.dir.path().display()
            )
            .expect("write");
            path
        }
    }

    fn load_with(path: &Path, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        load(
            path,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_and_admin_socket_from_haproxy_config() {
        let fx = Fixture::new(HAPROXY_CFG);
        let s = load_with(&fx.agent("[node]\nid = \"web-1\"\n"), &[]).expect("valid");
        assert_eq!(s.admin_socket, PathBuf::from("/tmp/ebb-test-admin.sock"));
        assert_eq!(s.config.drain.poll_interval, Dur::ms(10));
        assert_eq!(s.config.drain.min_period, Dur::secs(30));
        assert_eq!(s.config.nats.prefix, "ebb");
    }

    #[test]
    fn master_worker_mode_needs_no_admin_socket_and_refuses_stop_when_drained_when_attached() {
        let fx = Fixture::new("global\n    maxconn 100\n");
        // Keys of [haproxy] go after the fixture's own, so they are appended to its table.
        let agent = |extra: &str| {
            let path = fx.agent("");
            let text = std::fs::read_to_string(&path).expect("read");
            std::fs::write(&path, format!("{text}{extra}")).expect("write");
            path
        };
        let s = load_with(
            &agent("mode = \"master-worker\"\nmaster_socket = \"/run/haproxy-master.sock\"\n[node]\nid = \"web-1\"\n"),
            &[],
        )
        .expect("master-worker needs no stats socket");
        assert_eq!(s.config.haproxy.mode, Mode::MasterWorker);
        assert!(!s.config.haproxy.manage_master, "attach by default");
        assert_eq!(s.admin_socket, PathBuf::new());

        let e = load_with(
            &agent("mode = \"master-worker\"\n[node]\nid = \"web-1\"\n[drain]\nstop_when_drained = true\n"),
            &[],
        )
        .expect_err("attached: ebb never stops the master");
        assert!(e.to_string().contains("stop_when_drained"), "{e}");
        assert!(e.to_string().contains("manage_master = true"), "{e}");

        load_with(
            &agent("mode = \"master-worker\"\nmanage_master = true\n[node]\nid = \"web-1\"\n[drain]\nstop_when_drained = true\n"),
            &[],
        )
        .expect("an owned master may be stopped when drained");

        let e = load_with(
            &agent("mode = \"master-worker\"\nmaster_socket = \"run/m.sock\"\n[node]\nid = \"web-1\"\n"),
            &[],
        )
        .expect_err("a relative master socket");
        assert!(e.to_string().contains("absolute"), "{e}");

        // Direct mode still needs its admin socket.
        let e = load_with(&agent("[node]\nid = \"web-1\"\n"), &[]).expect_err("direct mode");
        assert!(e.to_string().contains("stats socket"), "{e}");
    }

    #[test]
    fn environment_overrides_scalars_and_ignores_other_ebb_vars() {
        let fx = Fixture::new(HAPROXY_CFG);
        let s = load_with(
            &fx.agent("[node]\nid = \"web-1\"\n"),
            &[
                ("EBB_NATS__URL", "nats://10.0.0.1:4222"),
                ("EBB_DRAIN__MIN_PERIOD", "5s"),
                ("EBB_DRAIN__STOP_WHEN_DRAINED", "true"),
                ("EBB_NODE__ID", "web-2"),
                ("EBB_CONFIG", "/elsewhere.toml"),
                ("EBB_DRAINING", "1"),
            ],
        )
        .expect("valid");
        assert_eq!(s.config.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(s.config.drain.min_period, Dur::secs(5));
        assert!(s.config.drain.stop_when_drained);
        assert_eq!(s.node_id(), "web-2");
    }

    #[test]
    fn nats_url_may_be_an_array_and_stream_replicas_is_checked() {
        let fx = Fixture::new(HAPROXY_CFG);
        let s = load_with(&fx.agent(""), &[]).expect("valid");
        assert_eq!(s.config.nats.stream_replicas, 1);
        let s = load_with(
            &fx.agent(
                "[nats]\nurl = [\"nats://a:4222\", \" nats://b:4222\"]\nstream_replicas = 3\n",
            ),
            &[],
        )
        .expect("an array of URLs");
        assert_eq!(s.config.nats.url, "nats://a:4222,nats://b:4222");
        assert_eq!(s.config.nats.stream_replicas, 3);
        let s = load_with(&fx.agent(""), &[("EBB_NATS__STREAM_REPLICAS", "5")]).expect("env");
        assert_eq!(s.config.nats.stream_replicas, 5);
        for bad in ["0", "6"] {
            let msg = problems(
                &format!("[nats]\nstream_replicas = {bad}\n"),
                HAPROXY_CFG,
                &[],
            );
            assert_eq!(msg.lines().count(), 1, "{msg}");
            assert!(
                msg.contains("nats.stream_replicas is") && msg.contains("1 to 5"),
                "{msg}"
            );
        }
        let msg = problems("[nats]\nurl = []\n", HAPROXY_CFG, &[]);
        assert!(msg.contains("nats.url names no server"), "{msg}");
        let msg = problems(
            "[nats]\nurl = [\"nats://a:1,nats://b:2\"]\n",
            HAPROXY_CFG,
            &[],
        );
        assert!(msg.contains("one URL per array entry"), "{msg}");
        let msg = problems("[nats]\nurl = 4222\n", HAPROXY_CFG, &[]);
        assert!(msg.contains("nats.url must be a string"), "{msg}");
    }

    #[test]
    fn a_worker_log_cap_too_small_to_hold_a_line_is_refused() {
        let msg = problems(
            "",
            HAPROXY_CFG,
            &[("EBB_HAPROXY__WORKER_LOG_MAX_BYTES", "100")],
        );
        assert!(
            msg.contains("haproxy.worker_log_max_bytes must be at least 4096"),
            "{msg}"
        );
    }

    #[test]
    fn environment_strings_stay_as_written() {
        let fx = Fixture::new(HAPROXY_CFG);
        let s = load_with(
            &fx.agent(""),
            &[
                ("EBB_NODE__ID", "007"),
                ("EBB_NATS__TOKEN", "0123"),
                ("EBB_NATS__OUTBOX_LIMIT", "25"),
                ("EBB_RELOAD__MAX_OLD_WORKERS", "4"),
                ("EBB_DRAIN__STOP_WHEN_DRAINED", "true"),
            ],
        )
        .expect("valid");
        assert_eq!(s.node_id(), "007");
        assert_eq!(s.config.nats.token.as_deref(), Some("0123"));
        assert_eq!(s.config.nats.outbox_limit, 25);
        assert_eq!(s.config.reload.max_old_workers, 4);
        assert!(s.config.drain.stop_when_drained);
        let msg = problems("", HAPROXY_CFG, &[("EBB_NATS__OUTBOX_LIMIT", "lots")]);
        assert!(
            msg.contains("outbox_limit") || msg.contains("lots"),
            "{msg}"
        );
    }

    fn problems(body: &str, cfg: &str, env: &[(&str, &str)]) -> String {
        let fx = Fixture::new(cfg);
        match load_with(&fx.agent(body), env) {
            Ok(_) => panic!("expected an error for {body:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn metrics_listen_defaults_on_can_be_turned_off_and_a_bad_one_is_named() {
        let fx = Fixture::new(HAPROXY_CFG);
        let s = load_with(&fx.agent(""), &[]).expect("valid");
        assert_eq!(
            s.config.metrics.addr(),
            Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9310)))
        );
        let s = load_with(&fx.agent("[metrics]\nlisten = \"\"\n"), &[]).expect("off");
        assert_eq!(s.config.metrics.addr(), None);
        let s = load_with(&fx.agent(""), &[("EBB_METRICS__LISTEN", "[::1]:9400")]).expect("v6");
        assert_eq!(s.config.metrics.addr().map(|a| a.port()), Some(9400));
        for bad in ["localhost:9310", "127.0.0.1", "127.0.0.1:99999", "nope"] {
            let msg = problems(&format!("[metrics]\nlisten = {bad:?}\n"), HAPROXY_CFG, &[]);
            assert_eq!(msg.lines().count(), 1, "{msg}");
            assert!(msg.contains("metrics.listen") && msg.contains(bad), "{msg}");
            assert!(msg.contains("127.0.0.1:9310"), "{msg}");
        }
        let msg = problems("[metrics]\nenabled = false\n", HAPROXY_CFG, &[]);
        assert!(msg.contains("enabled"), "{msg}");
    }

    #[test]
    fn unknown_key_is_named() {
        let msg = problems("[drain]\nmin_perod = \"1s\"\n", HAPROXY_CFG, &[]);
        assert!(msg.contains("min_perod"), "{msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
        let msg = problems("", HAPROXY_CFG, &[("EBB_DRAIN__NOPE", "1")]);
        assert!(msg.contains("nope"), "{msg}");
    }

    #[test]
    fn bad_duration_is_named_with_a_fix() {
        let msg = problems("[drain]\nmin_period = \"3 parsecs\"\n", HAPROXY_CFG, &[]);
        assert!(msg.contains("min_period") && msg.contains("30s"), "{msg}");
    }

    #[test]
    fn invalid_tokens_are_refused() {
        let msg = problems(
            "[node]\nid = \"web.1\"\ngroups = [\"ok\", \"a b\"]\n",
            HAPROXY_CFG,
            &[],
        );
        assert!(msg.contains("node.id \"web.1\""), "{msg}");
        assert!(msg.contains("\"a b\""), "{msg}");
        assert_eq!(msg.lines().count(), 2);
    }

    #[test]
    fn missing_binary_and_config_are_named() {
        let fx = Fixture::new(HAPROXY_CFG);
        let path = fx.dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "[node]\nid=\"a\"\n[haproxy]\nbinary = \"/nonexistent/haproxy\"\nconfig = \"/nonexistent/haproxy.cfg\"\n",
        )
        .expect("write");
        let msg = load_with(&path, &[]).expect_err("invalid").to_string();
        assert!(msg.contains("haproxy.binary /nonexistent/haproxy"), "{msg}");
        assert!(
            msg.contains("haproxy.config /nonexistent/haproxy.cfg"),
            "{msg}"
        );
    }

    #[test]
    fn admin_socket_without_expose_fd_is_refused() {
        let msg = problems(
            "[node]\nid=\"a\"\n",
            "global\n    stats socket /tmp/x.sock level admin\n",
            &[],
        );
        assert!(msg.contains("expose-fd listeners"), "{msg}");
    }

    #[test]
    fn missing_agent_config_file_says_how_to_fix() {
        let msg = load_with(Path::new("/nonexistent/agent.toml"), &[])
            .expect_err("missing")
            .to_string();
        assert!(msg.contains("--config"), "{msg}");
    }

    #[test]
    fn control_socket_defaults_turns_off_and_must_be_absolute() {
        let fx = Fixture::new(HAPROXY_CFG);
        let s = load_with(&fx.agent(""), &[]).expect("valid");
        assert_eq!(
            s.config.control.socket(),
            Some(Path::new(DEFAULT_CONTROL_SOCKET))
        );
        let s = load_with(&fx.agent("[control]\nsocket = \"\"\n"), &[]).expect("valid");
        assert_eq!(s.config.control.socket(), None);
        let err =
            load_with(&fx.agent("[control]\nsocket = \"ctl.sock\"\n"), &[]).expect_err("relative");
        assert!(
            err.to_string()
                .contains("control.socket \"ctl.sock\" must be an absolute path"),
            "{err}"
        );
        let long = format!("/{}", "s".repeat(120));
        let err = load_with(&fx.agent(&format!("[control]\nsocket = \"{long}\"\n")), &[])
            .expect_err("too long");
        assert!(err.to_string().contains("107 bytes"), "{err}");
    }

    #[test]
    fn render_round_trips() {
        let fx = Fixture::new(HAPROXY_CFG);
        let s = load_with(
            &fx.agent("[node]\nid = \"web-1\"\n[nats]\ntoken = \"s3cret\"\n"),
            &[],
        )
        .expect("valid");
        let text = render(&s);
        assert!(text.contains("web-1"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("min_period = \"30s\""), "{text}");
    }
}
