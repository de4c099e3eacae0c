//! Loading a plugin library and calling it through its ABI table: the only unsafe code of the host.
//!
//! A library is loaded once and never unloaded (thread-local destructors and threads a plugin started would
//! crash after `dlclose`), so every pointer the table holds stays valid for the life of the process.

use std::ffi::{c_char, CStr, CString};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::Path;

use ebb_sdk::plugin::{
    CheckIdleFn, CheckReply, CreateFn, DestroyFn, EbbPluginInstance, EbbPluginV1, EntryFn,
    FreeStringFn, OnEventFn, Verdict, ABI_VERSION, ENTRY_SYMBOL,
};

use super::file::CheckedFile;

/// A validated copy of a plugin's table. Its function pointers point into a library that is never
/// unloaded, so they stay valid.
#[derive(Debug, Clone)]
pub struct Table {
    pub abi_version: u32,
    pub capabilities: u32,
    pub name: String,
    pub version: String,
    create: CreateFn,
    check_idle: CheckIdleFn,
    on_event: OnEventFn,
    free_string: FreeStringFn,
    destroy: DestroyFn,
}

/// Loads a checked file and validates its table. The library stays loaded for the life of the process,
/// whatever the outcome (its initializers ran: unloading it is never safe).
///
/// This runs the library's initializers and its entry function: plugin code. Run it where a hang is
/// survivable (the host does, on the plugin's own thread, with a timeout).
pub fn load(checked: CheckedFile) -> Result<Table, String> {
    // Load through the descriptor that was checked: replacing the file after the checks changes nothing.
    // The loader knows the library by this name from now on, and would hand the same library back for
    // the same name: so a descriptor that loaded a library stays open for good (below), and its number
    // is never reused for another file.
    let via_fd = format!("/proc/self/fd/{}", checked.file.as_raw_fd());
    let target: &Path = if Path::new(&via_fd).exists() {
        Path::new(&via_fd)
    } else {
        &checked.path
    };
    // RTLD_NOW: an unresolved symbol fails here, with a message, instead of crashing at its first call.
    // SAFETY: loading runs the library's initializers; that is the trust the owner and mode checks,
    // and the optional pin, establish.
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(target),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
    }
    .map_err(|e| {
        format!("cannot load the library: {e}; is it a shared library built for this machine?")
    })?;
    // Never unloaded: see the module doc. Nor is its descriptor closed (see above).
    let lib: &'static libloading::os::unix::Library = Box::leak(Box::new(lib));
    let _never_closed = checked.file.into_raw_fd();
    // SAFETY: the symbol's type is the ABI's entry function type; a library that exports the name with
    // another type breaks the contract it claims by exporting it.
    let entry: EntryFn = unsafe { lib.get::<EntryFn>(ENTRY_SYMBOL.as_bytes()) }
        .map(|s| *s)
        .map_err(|_| {
            format!(
                "it does not export `{ENTRY_SYMBOL}`, so it is not an ebb plugin: a Rust plugin needs \
                 `ebb_sdk::export_plugin!(YourType);` and crate-type = [\"cdylib\"]; a C plugin must define \
                 `const EbbPluginV1 *ebb_plugin_entry(void)` (see ebb_plugin.h)"
            )
        })?;
    // SAFETY: calling the entry function is the ABI.
    let ptr = unsafe { entry() };
    if ptr.is_null() {
        return Err(format!(
            "`{ENTRY_SYMBOL}` returned NULL: the plugin could not build its table"
        ));
    }
    // Read the version alone first: the rest of the table is only meaningful for a known version.
    // SAFETY: every table version starts with the u32 abi_version; ptr is non-null and static.
    let abi_version = unsafe { std::ptr::addr_of!((*ptr).abi_version).read() };
    if abi_version != ABI_VERSION {
        return Err(format!(
            "it was built for plugin ABI version {abi_version}, and this agent loads version {ABI_VERSION}; \
             rebuild the plugin against the ebb-sdk (or ebb_plugin.h) of this agent's release"
        ));
    }
    // SAFETY: version 1 tables start with abi_version, struct_size.
    let struct_size = unsafe { std::ptr::addr_of!((*ptr).struct_size).read() } as usize;
    if struct_size < std::mem::size_of::<EbbPluginV1>() {
        return Err(format!(
            "its table is {struct_size} bytes, smaller than the {} of ABI version {ABI_VERSION}; rebuild it \
             against the current ebb_plugin.h",
            std::mem::size_of::<EbbPluginV1>()
        ));
    }
    // SAFETY: the table is a complete EbbPluginV1 (version and size checked), static in the library.
    let t: EbbPluginV1 = unsafe { ptr.read() };
    let missing = |what: &str| {
        format!("its table has no `{what}` function (NULL); every function is required")
    };
    let name = static_str(t.name).map_err(|e| format!("its name {e}"))?;
    let version = static_str(t.version).map_err(|e| format!("its version {e}"))?;
    Ok(Table {
        abi_version,
        capabilities: t.capabilities,
        name,
        version,
        create: t.create.ok_or_else(|| missing("create"))?,
        check_idle: t.check_idle.ok_or_else(|| missing("check_idle"))?,
        on_event: t.on_event.ok_or_else(|| missing("on_event"))?,
        free_string: t.free_string.ok_or_else(|| missing("free_string"))?,
        destroy: t.destroy.ok_or_else(|| missing("destroy"))?,
    })
}

fn static_str(p: *const c_char) -> Result<String, String> {
    if p.is_null() {
        return Err("is NULL".into());
    }
    // SAFETY: per the ABI, a static NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(str::to_string)
        .map_err(|_| "is not UTF-8".to_string())
}

/// One instance of a plugin. Not `Send`: it lives on the thread that created it.
pub struct Instance {
    table: Table,
    ptr: *mut EbbPluginInstance,
}

impl Instance {
    /// Calls `create(config_json)`.
    pub fn create(table: &Table, config_json: &str) -> Result<Instance, String> {
        let config =
            CString::new(config_json).map_err(|_| "the config contains a NUL byte".to_string())?;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: the ABI: a NUL-terminated string that outlives the call, and a writable error slot.
        let ptr = unsafe { (table.create)(config.as_ptr(), &mut error) };
        let message = take_string(table, error);
        if ptr.is_null() {
            return Err(
                message.unwrap_or_else(|| "create returned no instance and no error".into())
            );
        }
        Ok(Instance {
            table: table.clone(),
            ptr,
        })
    }

    /// Calls `check_idle(ctx_json)`: the plugin's verdict, or its error.
    pub fn check_idle(&mut self, ctx_json: &CStr) -> Result<Verdict, String> {
        // SAFETY: the ABI; self.ptr came from this table's create and is used by this thread only.
        let reply = unsafe { (self.table.check_idle)(self.ptr, ctx_json.as_ptr()) };
        let text = take_string(&self.table, reply)
            .ok_or_else(|| "check_idle returned NULL".to_string())?;
        CheckReply::parse(&text)?.into_result()
    }

    /// Calls `on_event(event_json)`.
    pub fn on_event(&mut self, event_json: &CStr) -> Result<(), String> {
        // SAFETY: as in check_idle.
        let reply = unsafe { (self.table.on_event)(self.ptr, event_json.as_ptr()) };
        match take_string(&self.table, reply) {
            None => Ok(()),
            Some(message) => Err(message),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: self.ptr came from create and is destroyed once, by its own thread.
        unsafe { (self.table.destroy)(self.ptr) };
    }
}

/// Copies a string the plugin returned and frees it with the plugin's own `free_string`.
fn take_string(table: &Table, p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per the ABI, a NUL-terminated string the plugin allocated and hands over.
    let text = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: freed once, by the allocator that made it.
    unsafe { (table.free_string)(p) };
    Some(text)
}
