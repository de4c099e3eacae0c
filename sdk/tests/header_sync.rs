//! `sdk/include/ebb_plugin.h` describes the same ABI as `ebb_sdk::plugin`: same constants, same fields in the
//! same order at the same offsets, same function pointer types. The C half is checked by compiling a probe
//! against the header with the system C compiler.

use std::ffi::c_char;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use ebb_sdk::plugin::*;

fn header() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/ebb_plugin.h");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every field of the table, in order, with its Rust offset, and its C type as the probe must see it.
fn fields() -> Vec<(&'static str, usize, &'static str)> {
    vec![
        (
            "abi_version",
            offset_of!(EbbPluginV1, abi_version),
            "uint32_t",
        ),
        (
            "struct_size",
            offset_of!(EbbPluginV1, struct_size),
            "uint32_t",
        ),
        (
            "capabilities",
            offset_of!(EbbPluginV1, capabilities),
            "uint32_t",
        ),
        ("reserved", offset_of!(EbbPluginV1, reserved), "uint32_t"),
        ("name", offset_of!(EbbPluginV1, name), "const char *"),
        ("version", offset_of!(EbbPluginV1, version), "const char *"),
        (
            "create",
            offset_of!(EbbPluginV1, create),
            "EbbPluginInstance *(*)(const char *, char **)",
        ),
        (
            "check_idle",
            offset_of!(EbbPluginV1, check_idle),
            "char *(*)(EbbPluginInstance *, const char *)",
        ),
        (
            "on_event",
            offset_of!(EbbPluginV1, on_event),
            "char *(*)(EbbPluginInstance *, const char *)",
        ),
        (
            "free_string",
            offset_of!(EbbPluginV1, free_string),
            "void (*)(char *)",
        ),
        (
            "destroy",
            offset_of!(EbbPluginV1, destroy),
            "void (*)(EbbPluginInstance *)",
        ),
    ]
}

/// The Rust side of the C types listed in `fields`: this fails to compile when a Rust type changes, so the
/// list above must be updated with it (and then the C probe checks the header against it).
#[allow(dead_code)]
fn rust_types_match_the_list(t: EbbPluginV1) {
    let _: (u32, u32, u32, u32) = (t.abi_version, t.struct_size, t.capabilities, t.reserved);
    let _: (*const c_char, *const c_char) = (t.name, t.version);
    let _: Option<unsafe extern "C" fn(*const c_char, *mut *mut c_char) -> *mut EbbPluginInstance> =
        t.create;
    let _: Option<unsafe extern "C" fn(*mut EbbPluginInstance, *const c_char) -> *mut c_char> =
        t.check_idle;
    let _: Option<unsafe extern "C" fn(*mut EbbPluginInstance, *const c_char) -> *mut c_char> =
        t.on_event;
    let _: Option<unsafe extern "C" fn(*mut c_char)> = t.free_string;
    let _: Option<unsafe extern "C" fn(*mut EbbPluginInstance)> = t.destroy;
    let _: EntryFn = entry_type_probe;
}

#[allow(dead_code)]
unsafe extern "C" fn entry_type_probe() -> *const EbbPluginV1 {
    std::ptr::null()
}

fn define(header: &str, name: &str) -> String {
    header
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("#define") && words.next() == Some(name))
                .then(|| words.next().unwrap_or("").to_string())
        })
        .unwrap_or_else(|| panic!("ebb_plugin.h has no #define {name}"))
}

#[test]
fn constants_match() {
    let h = header();
    assert_eq!(
        define(&h, "EBB_PLUGIN_ABI_VERSION"),
        format!("{ABI_VERSION}u")
    );
    assert_eq!(
        define(&h, "EBB_PLUGIN_ENTRY_SYMBOL"),
        format!("\"{ENTRY_SYMBOL}\"")
    );
    assert_eq!(
        define(&h, "EBB_CAP_CHECK_IDLE"),
        format!("{CAP_CHECK_IDLE}u")
    );
    assert_eq!(define(&h, "EBB_CAP_EVENTS"), format!("{CAP_EVENTS}u"));
    assert!(h.contains("const EbbPluginV1 *ebb_plugin_entry(void);"));
}

/// The struct's field names in the order the header declares them (comments dropped).
fn header_field_names(h: &str) -> Vec<String> {
    let start = h
        .find("typedef struct EbbPluginV1 {")
        .expect("struct EbbPluginV1 in the header");
    let end = start
        + h[start..]
            .find("} EbbPluginV1;")
            .expect("end of struct EbbPluginV1");
    let mut body = h[start + "typedef struct EbbPluginV1 {".len()..end].to_string();
    while let Some(open) = body.find("/*") {
        let close = open + body[open..].find("*/").expect("closed comment") + 2;
        body.replace_range(open..close, " ");
    }
    body.split(';')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|decl| {
            // `uint32_t abi_version` or `char *(*check_idle)(...)`.
            if let Some(p) = decl.find("(*") {
                let rest = &decl[p + 2..];
                rest[..rest.find(')').expect("function pointer name")]
                    .trim()
                    .to_string()
            } else {
                decl.rsplit(|c: char| c.is_whitespace() || c == '*')
                    .next()
                    .unwrap()
                    .to_string()
            }
        })
        .collect()
}

#[test]
fn fields_match_in_order() {
    let names: Vec<String> = fields().iter().map(|f| f.0.to_string()).collect();
    assert_eq!(header_field_names(&header()), names);
    // Offsets grow in declaration order, and nothing hides at the end.
    let offsets: Vec<usize> = fields().iter().map(|f| f.1).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        size_of::<EbbPluginV1>(),
        offsets.last().unwrap() + size_of::<usize>()
    );
}

#[test]
fn the_c_compiler_sees_the_same_layout_and_types() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if Command::new(&cc).arg("--version").output().is_err() {
        // scripts/test installs a C compiler; a bare `cargo test` elsewhere only loses this half.
        eprintln!("SKIPPED: no C compiler ({cc}) to check ebb_plugin.h against; install gcc");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut probe =
        String::from("#include <stdio.h>\n#include <stddef.h>\n#include \"ebb_plugin.h\"\n");
    for (name, _, ty) in fields() {
        // A compile error unless the header declares the field with exactly this type.
        probe.push_str(&format!(
            "_Static_assert(__builtin_types_compatible_p(__typeof__(((EbbPluginV1 *)0)->{name}), {ty}), \"{name} has type {ty}\");\n"
        ));
    }
    probe.push_str(
        "_Static_assert(__builtin_types_compatible_p(EbbPluginEntryFn, const EbbPluginV1 *(*)(void)), \"entry\");\n",
    );
    probe.push_str("int main(void) {\n  printf(\"size %zu\\n\", sizeof(EbbPluginV1));\n");
    for (name, _, _) in fields() {
        probe.push_str(&format!(
            "  printf(\"{name} %zu\\n\", offsetof(EbbPluginV1, {name}));\n"
        ));
    }
    probe.push_str("  return 0;\n}\n");
    let src = dir.path().join("probe.c");
    let exe: PathBuf = dir.path().join("probe");
    std::fs::write(&src, probe).unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-I"])
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the header disagrees with sdk/src/plugin.rs:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut expected = format!("size {}\n", size_of::<EbbPluginV1>());
    for (name, offset, _) in fields() {
        expected.push_str(&format!("{name} {offset}\n"));
    }
    assert_eq!(text, expected);
}
