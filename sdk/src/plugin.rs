//! The plugin ABI, a contract (docs/PLUGINS.md): how a dynamic library adds idle checks and drain hooks to an agent.
//!
//! A plugin is a shared library (a Rust `cdylib`, or C against `sdk/include/ebb_plugin.h`) that exports one
//! symbol, [`ENTRY_SYMBOL`] (`ebb_plugin_entry`): a C function without arguments that returns a pointer to a
//! static [`EbbPluginV1`] table. The table starts with its ABI version; the agent reads it first and refuses
//! any version it does not know, so the rest of the table may change only together with [`ABI_VERSION`].
//!
//! Everything else crosses the boundary as JSON in NUL-terminated UTF-8 strings:
//! - `create(config_json, &error)` makes an instance from the plugin's `config` table (as JSON);
//! - `check_idle(instance, ctx_json)` answers [`CheckReply`] JSON to a [`CheckContext`];
//! - `on_event(instance, event_json)` receives a [`HookEvent`] and answers NULL or an error message;
//! - `destroy(instance)` frees the instance.
//!
//! A string is freed by whoever allocated it: the agent frees the strings a plugin returns by calling that
//! plugin's `free_string`; a plugin never frees the strings it is given (they live until the call returns).
//!
//! The agent calls one instance from one thread at a time (a dedicated thread per plugin, off its async
//! runtime), with a timeout. Calls are synchronous: a plugin that needs async I/O runs its own small runtime
//! (never the agent's: a `cdylib` has its own copy of tokio). The agent never unloads a plugin library.
//!
//! # Writing a plugin in Rust
//! Implement [`Plugin`] (the hooks default to no-ops) and export it with [`export_plugin!`](crate::export_plugin); the macro
//! writes every `extern "C"` function, and each one catches panics, so no unsafe code is needed and a
//! panic becomes an error reply instead of aborting the agent:
//!
//! ```
//! use ebb_sdk::plugin::{CheckContext, Plugin, PluginResult, Verdict};
//!
//! struct AlwaysIdle;
//!
//! impl Plugin for AlwaysIdle {
//!     const NAME: &'static str = "always-idle";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!
//!     fn create(_config: serde_json::Value) -> PluginResult<Self> {
//!         Ok(AlwaysIdle)
//!     }
//!
//!     fn check_idle(&mut self, _ctx: &CheckContext) -> PluginResult<Verdict> {
//!         Ok(Verdict::Idle)
//!     }
//! }
//!
//! ebb_sdk::export_plugin!(AlwaysIdle);
//! ```
//! with `crate-type = ["cdylib"]` in the plugin's Cargo.toml. docs/PLUGINS.md has the whole guide.

use std::ffi::{c_char, CStr, CString};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::{Deserialize, Serialize};

/// The ABI version this SDK builds and this agent loads. The first field of every table.
pub const ABI_VERSION: u32 = 1;

/// The one symbol a plugin exports: `const EbbPluginV1 *ebb_plugin_entry(void)`.
pub const ENTRY_SYMBOL: &str = "ebb_plugin_entry";

/// Capability bit: the plugin answers `check_idle`; the agent asks it while draining.
pub const CAP_CHECK_IDLE: u32 = 1;
/// Capability bit: the plugin wants hook events (`on_event`).
pub const CAP_EVENTS: u32 = 2;
/// Every capability bit this ABI version defines.
pub const CAP_ALL: u32 = CAP_CHECK_IDLE | CAP_EVENTS;

/// An instance made by `create`: opaque to the agent, which only passes it back.
#[repr(C)]
pub struct EbbPluginInstance {
    _private: [u8; 0],
}

/// `create(config_json, error)`: an instance, or NULL with `*error` set to a message (from the plugin's
/// allocator, or NULL when it has nothing to say).
pub type CreateFn = unsafe extern "C" fn(
    config_json: *const c_char,
    error: *mut *mut c_char,
) -> *mut EbbPluginInstance;
/// `check_idle(instance, ctx_json)`: a [`CheckReply`] JSON string from the plugin's allocator.
pub type CheckIdleFn =
    unsafe extern "C" fn(instance: *mut EbbPluginInstance, ctx_json: *const c_char) -> *mut c_char;
/// `on_event(instance, event_json)`: NULL when handled, else an error message from the plugin's allocator.
pub type OnEventFn = unsafe extern "C" fn(
    instance: *mut EbbPluginInstance,
    event_json: *const c_char,
) -> *mut c_char;
/// `free_string(s)`: frees a string this plugin returned; NULL is a no-op.
pub type FreeStringFn = unsafe extern "C" fn(s: *mut c_char);
/// `destroy(instance)`: frees an instance; it is not used afterwards.
pub type DestroyFn = unsafe extern "C" fn(instance: *mut EbbPluginInstance);
/// The entry symbol's type.
pub type EntryFn = unsafe extern "C" fn() -> *const EbbPluginV1;

/// The table a plugin's entry symbol returns (ABI version 1). Mirrored field by field by `struct EbbPluginV1`
/// in `sdk/include/ebb_plugin.h` (a test keeps the two in sync).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EbbPluginV1 {
    /// [`ABI_VERSION`]: read before anything else.
    pub abi_version: u32,
    /// `sizeof(EbbPluginV1)` as the plugin was built: the agent refuses a smaller table.
    pub struct_size: u32,
    /// [`CAP_CHECK_IDLE`] | [`CAP_EVENTS`].
    pub capabilities: u32,
    /// Zero.
    pub reserved: u32,
    /// The plugin's name, static, NUL-terminated UTF-8 (e.g. `alb-deregistration`).
    pub name: *const c_char,
    /// The plugin's version, static, NUL-terminated UTF-8 (e.g. `1.2.0`).
    pub version: *const c_char,
    pub create: Option<CreateFn>,
    pub check_idle: Option<CheckIdleFn>,
    pub on_event: Option<OnEventFn>,
    pub free_string: Option<FreeStringFn>,
    pub destroy: Option<DestroyFn>,
}

/// What a plugin says about its part of a drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing of this plugin's keeps the node from being drained.
    Idle,
    /// Not yet, and why, for the status's blockers (e.g. "212s of deregistration delay left").
    Busy(String),
}

/// Errors a plugin returns: any error type converts (`?` works on `std::io::Error`, `String`, `&str`, …).
pub type PluginError = Box<dyn std::error::Error + Send + Sync>;
/// The result of a plugin method.
pub type PluginResult<T> = Result<T, PluginError>;

/// What an idle check is given (`ctx_json`). Fields may be added; plugins ignore the ones they do not know.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckContext {
    /// The node's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The drain being decided; `None` when the node is not draining.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_id: Option<String>,
    /// When the drain started, in milliseconds since the Unix epoch. Survives agent restarts, unlike a
    /// timestamp a plugin takes at `drain_started` (a restarted agent does not send that hook again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// Milliseconds since the drain started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
    /// This call's timeout (the plugin's `timeout` setting): answer well within it.
    pub timeout_ms: u64,
}

/// `check_idle`'s answer on the wire: `{"verdict":"idle"|"busy"|"error","message":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReply {
    pub verdict: VerdictKind,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    Idle,
    Busy,
    Error,
}

impl CheckReply {
    /// The wire form of a plugin method's result; `Err` becomes `"error"`.
    pub fn from_result(result: &Result<Verdict, String>) -> CheckReply {
        match result {
            Ok(Verdict::Idle) => CheckReply {
                verdict: VerdictKind::Idle,
                message: String::new(),
            },
            Ok(Verdict::Busy(message)) => CheckReply {
                verdict: VerdictKind::Busy,
                message: message.clone(),
            },
            Err(message) => CheckReply {
                verdict: VerdictKind::Error,
                message: message.clone(),
            },
        }
    }

    /// Back to a result: `"error"` becomes `Err(message)`.
    pub fn into_result(self) -> Result<Verdict, String> {
        match self.verdict {
            VerdictKind::Idle => Ok(Verdict::Idle),
            VerdictKind::Busy => Ok(Verdict::Busy(self.message)),
            VerdictKind::Error => Err(self.message),
        }
    }

    /// Parses `check_idle`'s answer.
    pub fn parse(json: &str) -> Result<CheckReply, String> {
        serde_json::from_str(json).map_err(|e| {
            format!(
                "check_idle answered {:?}, which is not {{\"verdict\":\"idle\"|\"busy\"|\"error\",\"message\":\"…\"}}: {e}",
                truncate(json, 200)
            )
        })
    }

    /// The JSON text.
    pub fn to_json(&self) -> String {
        // Serializing a struct of a string and an enum cannot fail.
        serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"verdict":"error","message":"cannot encode the reply"}"#.into())
    }
}

/// A hook event (`event_json`), tagged by `event`. Fields may be added, and events too: an event this SDK
/// does not know parses as [`HookEvent::Unknown`] and is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HookEvent {
    /// A drain began (sent once per drain id, after the drain's `start_commands` ran).
    DrainStarted(DrainStarted),
    /// HAProxy was reloaded. During a drain this is sent instead of a second `drain_started`.
    Reloaded(Reloaded),
    /// The node is drained.
    Drained(Drained),
    /// The drain was ended by `undrain`: the node serves again.
    Undrained(Undrained),
    /// HAProxy is about to be stopped: the last hook before it stops.
    Stopping(Stopping),
    /// An event newer than this SDK.
    #[serde(other)]
    Unknown,
}

impl HookEvent {
    /// The `event` tag.
    pub fn name(&self) -> &'static str {
        match self {
            HookEvent::DrainStarted(_) => "drain_started",
            HookEvent::Reloaded(_) => "reloaded",
            HookEvent::Drained(_) => "drained",
            HookEvent::Undrained(_) => "undrained",
            HookEvent::Stopping(_) => "stopping",
            HookEvent::Unknown => "unknown",
        }
    }

    /// The JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| r#"{"event":"unknown"}"#.into())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DrainStarted {
    pub drain_id: String,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    pub min_period_ms: u64,
    /// `None`: no deadline.
    pub deadline_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Reloaded {
    /// True when the node is draining (the new worker answers 503 on health checks from the start).
    pub draining: bool,
    /// The drain in progress, if any.
    pub drain_id: Option<String>,
    pub reload_id: Option<String>,
    /// Pid of the new worker.
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Drained {
    pub drain_id: String,
    /// True when declared drained at the deadline despite blockers (`on_deadline = "force"`).
    pub forced: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Undrained {
    pub drain_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stopping {}

/// A plugin, safely: implement this and export it with [`export_plugin!`](crate::export_plugin).
///
/// The agent makes one instance per `[[plugins]]` entry and calls it from one thread at a time; every
/// method should return well within the plugin's `timeout` (it is in [`CheckContext::timeout_ms`]). The
/// hook methods default to doing nothing.
pub trait Plugin: Send + Sized + 'static {
    /// The plugin's name (shown by `ebb plugin inspect`; the agent names plugins by their config `name`).
    const NAME: &'static str;
    /// The plugin's version, usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;
    /// [`CAP_CHECK_IDLE`] and/or [`CAP_EVENTS`]: which calls the agent makes.
    const CAPABILITIES: u32 = CAP_ALL;

    /// Makes an instance from the plugin's `config` table (`null` when the config has none). Reject what
    /// you cannot use with a message that names the key and the fix: the agent shows it as is.
    fn create(config: serde_json::Value) -> PluginResult<Self>;

    /// Is this plugin's part of the drain done? Called repeatedly while draining, so keep it cheap
    /// (answer from state that a hook or a background task keeps up to date). An `Err` is reported as
    /// `"error"`; the agent then treats the plugin per its `on_error` setting (busy by default).
    fn check_idle(&mut self, ctx: &CheckContext) -> PluginResult<Verdict>;

    fn drain_started(&mut self, _event: &DrainStarted) -> PluginResult<()> {
        Ok(())
    }
    fn reloaded(&mut self, _event: &Reloaded) -> PluginResult<()> {
        Ok(())
    }
    fn drained(&mut self, _event: &Drained) -> PluginResult<()> {
        Ok(())
    }
    fn undrained(&mut self, _event: &Undrained) -> PluginResult<()> {
        Ok(())
    }
    fn stopping(&mut self, _event: &Stopping) -> PluginResult<()> {
        Ok(())
    }

    /// Dispatches an event to the hook methods; events this SDK does not know are ignored.
    fn on_event(&mut self, event: &HookEvent) -> PluginResult<()> {
        match event {
            HookEvent::DrainStarted(e) => self.drain_started(e),
            HookEvent::Reloaded(e) => self.reloaded(e),
            HookEvent::Drained(e) => self.drained(e),
            HookEvent::Undrained(e) => self.undrained(e),
            HookEvent::Stopping(e) => self.stopping(e),
            HookEvent::Unknown => Ok(()),
        }
    }
}

/// Exports a [`Plugin`] as this library's `ebb_plugin_entry`. Use it once per `cdylib`:
/// `ebb_sdk::export_plugin!(MyPlugin);`
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// The ebb plugin entry point (generated by `ebb_sdk::export_plugin!`).
        #[unsafe(no_mangle)]
        pub extern "C" fn ebb_plugin_entry() -> *const $crate::plugin::EbbPluginV1 {
            static TABLE: $crate::plugin::__private::TableCell =
                $crate::plugin::__private::TableCell::new();
            TABLE.get::<$plugin>()
        }
    };
}

/// The macro's machinery: not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;
    use std::sync::OnceLock;

    struct Holder {
        table: EbbPluginV1,
        // The table points into these; a CString's bytes stay put when the CString moves.
        _name: CString,
        _version: CString,
    }

    // SAFETY: the raw pointers point into the CStrings owned by the same Holder, which is never mutated after
    // it is built, and into functions; sharing them across threads is sound.
    unsafe impl Send for Holder {}
    unsafe impl Sync for Holder {}

    /// The static table behind a plugin's entry symbol, built on first use.
    pub struct TableCell(OnceLock<Option<Holder>>);

    impl TableCell {
        #[allow(clippy::new_without_default)]
        pub const fn new() -> TableCell {
            TableCell(OnceLock::new())
        }

        /// The table, or NULL if it cannot be built (a panic is caught here too).
        pub fn get<P: Plugin>(&'static self) -> *const EbbPluginV1 {
            let holder = self.0.get_or_init(|| catch_unwind(build::<P>).ok());
            match holder {
                Some(h) => &h.table,
                None => std::ptr::null(),
            }
        }
    }

    fn c_string(s: &str) -> CString {
        // A NUL inside a name cuts it there rather than failing.
        let bytes = s.as_bytes();
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        CString::new(&bytes[..end]).unwrap_or_default()
    }

    fn build<P: Plugin>() -> Holder {
        let name = c_string(P::NAME);
        let version = c_string(P::VERSION);
        Holder {
            table: EbbPluginV1 {
                abi_version: ABI_VERSION,
                struct_size: std::mem::size_of::<EbbPluginV1>() as u32,
                capabilities: P::CAPABILITIES & CAP_ALL,
                reserved: 0,
                name: name.as_ptr(),
                version: version.as_ptr(),
                create: Some(create::<P>),
                check_idle: Some(check_idle::<P>),
                on_event: Some(on_event::<P>),
                free_string: Some(free_string),
                destroy: Some(destroy::<P>),
            },
            _name: name,
            _version: version,
        }
    }

    /// A string for the agent, allocated here (freed by `free_string`).
    fn out(s: String) -> *mut c_char {
        let bytes: Vec<u8> = s.into_bytes().into_iter().filter(|b| *b != 0).collect();
        // No NUL is left, so this cannot fail.
        CString::new(bytes)
            .map(CString::into_raw)
            .unwrap_or(std::ptr::null_mut())
    }

    fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
        if let Some(s) = payload.downcast_ref::<&str>() {
            format!("the plugin panicked: {s}")
        } else if let Some(s) = payload.downcast_ref::<String>() {
            format!("the plugin panicked: {s}")
        } else {
            "the plugin panicked".to_string()
        }
    }

    /// # Safety
    /// `s` is NULL or a NUL-terminated string that lives for the call.
    unsafe fn arg<'a>(s: *const c_char, what: &str) -> Result<&'a str, String> {
        if s.is_null() {
            return Err(format!("{what} is NULL"));
        }
        // SAFETY: the caller passes a NUL-terminated string that outlives this call.
        unsafe { CStr::from_ptr(s) }
            .to_str()
            .map_err(|e| format!("{what} is not UTF-8: {e}"))
    }

    unsafe extern "C" fn create<P: Plugin>(
        config_json: *const c_char,
        error: *mut *mut c_char,
    ) -> *mut EbbPluginInstance {
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<Box<P>, String> {
            // SAFETY: per the ABI, config_json is a NUL-terminated string valid during the call.
            let text = unsafe { arg(config_json, "config_json") }?;
            let config: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("config_json is not JSON: {e}"))?;
            P::create(config).map(Box::new).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|payload| Err(panic_message(&*payload)));
        match result {
            Ok(instance) => {
                if !error.is_null() {
                    // SAFETY: error points to a writable `char *` per the ABI.
                    unsafe { *error = std::ptr::null_mut() };
                }
                Box::into_raw(instance).cast()
            }
            Err(message) => {
                if !error.is_null() {
                    // SAFETY: as above.
                    unsafe { *error = out(message) };
                }
                std::ptr::null_mut()
            }
        }
    }

    unsafe extern "C" fn check_idle<P: Plugin>(
        instance: *mut EbbPluginInstance,
        ctx_json: *const c_char,
    ) -> *mut c_char {
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<Verdict, String> {
            if instance.is_null() {
                return Err("instance is NULL".into());
            }
            // SAFETY: per the ABI, ctx_json is a NUL-terminated string valid during the call.
            let text = unsafe { arg(ctx_json, "ctx_json") }?;
            let ctx: CheckContext = serde_json::from_str(text)
                .map_err(|e| format!("ctx_json is not a check context: {e}"))?;
            // SAFETY: instance came from create::<P> (a Box<P>) and is used by one thread at a time.
            let plugin = unsafe { &mut *instance.cast::<P>() };
            plugin.check_idle(&ctx).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|payload| Err(panic_message(&*payload)));
        out(CheckReply::from_result(&result).to_json())
    }

    unsafe extern "C" fn on_event<P: Plugin>(
        instance: *mut EbbPluginInstance,
        event_json: *const c_char,
    ) -> *mut c_char {
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
            if instance.is_null() {
                return Err("instance is NULL".into());
            }
            // SAFETY: per the ABI, event_json is a NUL-terminated string valid during the call.
            let text = unsafe { arg(event_json, "event_json") }?;
            let event: HookEvent = serde_json::from_str(text)
                .map_err(|e| format!("event_json is not an event: {e}"))?;
            // SAFETY: instance came from create::<P> and is used by one thread at a time.
            let plugin = unsafe { &mut *instance.cast::<P>() };
            plugin.on_event(&event).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|payload| Err(panic_message(&*payload)));
        match result {
            Ok(()) => std::ptr::null_mut(),
            Err(message) => out(message),
        }
    }

    unsafe extern "C" fn free_string(s: *mut c_char) {
        if s.is_null() {
            return;
        }
        let _ = catch_unwind(|| {
            // SAFETY: s was returned by `out` (CString::into_raw) in this library and is freed once.
            drop(unsafe { CString::from_raw(s) });
        });
    }

    unsafe extern "C" fn destroy<P: Plugin>(instance: *mut EbbPluginInstance) {
        if instance.is_null() {
            return;
        }
        // A panicking Drop is caught; whatever it left behind leaks.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: instance came from create::<P> and is destroyed once.
            drop(unsafe { Box::from_raw(instance.cast::<P>()) });
        }));
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Idle => f.write_str("idle"),
            Verdict::Busy(message) => write!(f, "busy: {message}"),
        }
    }
}

/// Capability bits as words, e.g. `check_idle, events`.
pub fn capability_names(capabilities: u32) -> String {
    let mut names = Vec::new();
    if capabilities & CAP_CHECK_IDLE != 0 {
        names.push("check_idle".to_string());
    }
    if capabilities & CAP_EVENTS != 0 {
        names.push("events".to_string());
    }
    let unknown = capabilities & !CAP_ALL;
    if unknown != 0 {
        names.push(format!("unknown bits {unknown:#x}"));
    }
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::ptr;

    struct Probe {
        events: Vec<String>,
        panic_on: Option<String>,
    }

    impl Plugin for Probe {
        const NAME: &'static str = "probe";
        const VERSION: &'static str = "9.9.9";

        fn create(config: serde_json::Value) -> PluginResult<Self> {
            let panic_on = config
                .get("panic_on")
                .and_then(|v| v.as_str())
                .map(String::from);
            if panic_on.as_deref() == Some("create") {
                panic!("boom in create");
            }
            if config.get("bad").is_some() {
                return Err("bad: not allowed; remove it".into());
            }
            Ok(Probe {
                events: Vec::new(),
                panic_on,
            })
        }

        fn check_idle(&mut self, ctx: &CheckContext) -> PluginResult<Verdict> {
            if self.panic_on.as_deref() == Some("check_idle") {
                panic!("boom in check_idle");
            }
            if ctx.drain_id.as_deref() == Some("err") {
                return Err("it failed".into());
            }
            if self.events.is_empty() {
                Ok(Verdict::Idle)
            } else {
                Ok(Verdict::Busy(format!(
                    "{} after {}ms",
                    self.events.join(","),
                    ctx.timeout_ms
                )))
            }
        }

        fn drain_started(&mut self, e: &DrainStarted) -> PluginResult<()> {
            if self.panic_on.as_deref() == Some("on_event") {
                panic!("boom in on_event");
            }
            self.events.push(format!("drain_started:{}", e.drain_id));
            Ok(())
        }

        fn undrained(&mut self, _e: &Undrained) -> PluginResult<()> {
            Err("undrain failed".into())
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            if self.panic_on.as_deref() == Some("destroy") {
                panic!("boom in destroy");
            }
        }
    }

    crate::export_plugin!(Probe);

    /// Calls through the C table, as the agent does.
    struct Host {
        table: EbbPluginV1,
        instance: *mut EbbPluginInstance,
    }

    impl Host {
        fn new(config: serde_json::Value) -> Result<Host, String> {
            let table = unsafe { *ebb_plugin_entry() };
            let config = CString::new(config.to_string()).unwrap();
            let mut error = ptr::null_mut();
            let instance = unsafe { table.create.unwrap()(config.as_ptr(), &mut error) };
            if instance.is_null() {
                return Err(take(&table, error));
            }
            assert!(error.is_null());
            Ok(Host { table, instance })
        }

        fn check(&self, ctx: &CheckContext) -> String {
            let ctx = CString::new(serde_json::to_string(ctx).unwrap()).unwrap();
            let s = unsafe { self.table.check_idle.unwrap()(self.instance, ctx.as_ptr()) };
            take(&self.table, s)
        }

        fn event(&self, json: &str) -> Option<String> {
            let json = CString::new(json).unwrap();
            let s = unsafe { self.table.on_event.unwrap()(self.instance, json.as_ptr()) };
            (!s.is_null()).then(|| take(&self.table, s))
        }
    }

    impl Drop for Host {
        fn drop(&mut self) {
            unsafe { self.table.destroy.unwrap()(self.instance) };
        }
    }

    fn take(table: &EbbPluginV1, s: *mut c_char) -> String {
        assert!(!s.is_null());
        let text = unsafe { CStr::from_ptr(s) }.to_str().unwrap().to_string();
        unsafe { table.free_string.unwrap()(s) };
        text
    }

    #[test]
    fn the_table_describes_the_plugin() {
        let table = unsafe { &*ebb_plugin_entry() };
        assert_eq!(table.abi_version, ABI_VERSION);
        assert_eq!(
            table.struct_size as usize,
            std::mem::size_of::<EbbPluginV1>()
        );
        assert_eq!(table.capabilities, CAP_ALL);
        assert_eq!(
            unsafe { CStr::from_ptr(table.name) }.to_str().unwrap(),
            "probe"
        );
        assert_eq!(
            unsafe { CStr::from_ptr(table.version) }.to_str().unwrap(),
            "9.9.9"
        );
        // The same table every time.
        assert_eq!(ebb_plugin_entry(), ebb_plugin_entry());
    }

    #[test]
    fn checks_and_events_round_trip_as_json() {
        let host = Host::new(json!({})).unwrap();
        let ctx = CheckContext {
            timeout_ms: 2000,
            ..Default::default()
        };
        assert_eq!(host.check(&ctx), r#"{"verdict":"idle","message":""}"#);
        let started = HookEvent::DrainStarted(DrainStarted {
            drain_id: "d1".into(),
            ..Default::default()
        });
        assert_eq!(host.event(&started.to_json()), None);
        let reply = CheckReply::parse(&host.check(&ctx)).unwrap();
        assert_eq!(
            reply.into_result(),
            Ok(Verdict::Busy("drain_started:d1 after 2000ms".into()))
        );
        let err_ctx = CheckContext {
            drain_id: Some("err".into()),
            ..ctx
        };
        assert_eq!(
            CheckReply::parse(&host.check(&err_ctx))
                .unwrap()
                .into_result(),
            Err("it failed".into())
        );
        // Hook errors come back as messages; unknown events are ignored; garbage is an error.
        let undrained = HookEvent::Undrained(Undrained {
            drain_id: "d1".into(),
        });
        assert_eq!(
            host.event(&undrained.to_json()).as_deref(),
            Some("undrain failed")
        );
        assert_eq!(host.event(r#"{"event":"from_the_future","x":1}"#), None);
        assert!(host.event("not json").unwrap().contains("not an event"));
    }

    #[test]
    fn create_errors_are_returned() {
        let err = Host::new(json!({"bad": 1})).err().unwrap();
        assert_eq!(err, "bad: not allowed; remove it");
    }

    #[test]
    fn panics_are_caught_at_every_boundary() {
        let err = Host::new(json!({"panic_on": "create"})).err().unwrap();
        assert!(err.contains("panicked: boom in create"), "{err}");

        let host = Host::new(json!({"panic_on": "check_idle"})).unwrap();
        let reply = CheckReply::parse(&host.check(&CheckContext::default())).unwrap();
        assert_eq!(reply.verdict, VerdictKind::Error);
        assert!(reply.message.contains("boom in check_idle"));

        let host = Host::new(json!({"panic_on": "on_event"})).unwrap();
        let started = HookEvent::DrainStarted(DrainStarted::default()).to_json();
        assert!(host.event(&started).unwrap().contains("boom in on_event"));
        // Still usable after a panic.
        assert!(host.check(&CheckContext::default()).contains("idle"));

        // Dropping runs destroy, which panics inside and must not unwind into us.
        drop(Host::new(json!({"panic_on": "destroy"})).unwrap());
    }

    #[test]
    fn hook_events_have_a_stable_wire_form() {
        let cases = [
            (
                HookEvent::DrainStarted(DrainStarted {
                    drain_id: "d".into(),
                    started_at_ms: 5,
                    min_period_ms: 30000,
                    deadline_ms: None,
                }),
                json!({"event":"drain_started","drain_id":"d","started_at_ms":5,"min_period_ms":30000,"deadline_ms":null}),
            ),
            (
                HookEvent::Reloaded(Reloaded {
                    draining: true,
                    drain_id: Some("d".into()),
                    reload_id: None,
                    pid: Some(7),
                }),
                json!({"event":"reloaded","draining":true,"drain_id":"d","reload_id":null,"pid":7}),
            ),
            (
                HookEvent::Drained(Drained {
                    drain_id: "d".into(),
                    forced: false,
                }),
                json!({"event":"drained","drain_id":"d","forced":false}),
            ),
            (
                HookEvent::Undrained(Undrained {
                    drain_id: "d".into(),
                }),
                json!({"event":"undrained","drain_id":"d"}),
            ),
            (
                HookEvent::Stopping(Stopping {}),
                json!({"event":"stopping"}),
            ),
        ];
        for (event, wire) in cases {
            assert_eq!(serde_json::to_value(&event).unwrap(), wire);
            assert_eq!(serde_json::from_value::<HookEvent>(wire).unwrap(), event);
        }
        // Older agents may send fewer fields; newer ones more.
        let e: HookEvent =
            serde_json::from_str(r#"{"event":"reloaded","draining":true,"new":1}"#).unwrap();
        assert_eq!(
            e,
            HookEvent::Reloaded(Reloaded {
                draining: true,
                ..Default::default()
            })
        );
    }

    #[test]
    fn check_context_ignores_unknown_fields() {
        let ctx: CheckContext = serde_json::from_str(
            r#"{"drain_id":"d","elapsed_ms":3,"timeout_ms":10,"future":true}"#,
        )
        .unwrap();
        assert_eq!(ctx.drain_id.as_deref(), Some("d"));
        assert_eq!(ctx.elapsed_ms, Some(3));
        assert_eq!(
            serde_json::to_value(CheckContext::default()).unwrap(),
            json!({"timeout_ms":0})
        );
    }

    #[test]
    fn capabilities_read_as_words() {
        assert_eq!(capability_names(CAP_ALL), "check_idle, events");
        assert_eq!(capability_names(0), "none");
        assert_eq!(capability_names(CAP_EVENTS | 8), "events, unknown bits 0x8");
    }
}
