//! Plugins for a node under test: the cdylibs cargo built and their `[[plugins]]` tables.
//!
//! The Rust plugins (`ebb-plugin-test`, `ebb-plugin-exec`, `ebb-plugin-alb`) are dev-dependencies
//! of ebb-agent, so cargo builds their cdylibs (into target/<profile>/deps) before a test runs.

use std::path::{Path, PathBuf};

use super::agent::toml_string;

/// A plugin cdylib built by cargo: `lib<name>.so` next to this test's executable
/// (target/<profile>/deps), or uplifted into target/<profile> by a `cargo build`; the newer of the
/// two.
pub fn cdylib(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    let file = format!("lib{name}.so");
    let candidates = [
        deps.join(&file),
        deps.parent().expect("profile dir").join(&file),
    ];
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "{file} not found in {} or its parent; it is built as a dev-dependency of \
                 ebb-agent (cargo build -p ebb-plugin-test -p ebb-plugin-exec -p ebb-plugin-alb)",
                deps.display()
            )
        })
}

/// One `[[plugins]]` table of agent.toml; `timeout` is a duration (`"2s"`), `config` raw TOML (an
/// inline table).
pub fn plugin_toml(name: &str, path: &Path, timeout: &str, config: &str) -> String {
    format!(
        "[[plugins]]\nname = {}\npath = {}\ntimeout = {}\nconfig = {config}\n",
        toml_string(name),
        toml_string(path.to_string_lossy()),
        toml_string(timeout)
    )
}
