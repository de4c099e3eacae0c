//! The workspace's `rust-version` (root Cargo.toml, `[workspace.package]`) is the real minimum:
//! no crate that the locked build compiles for this platform asks for a newer Rust, and every
//! workspace member inherits the value, so an older toolchain is refused by cargo with one clear
//! message instead of a compile error deep in a dependency.
//!
//! It reads `cargo metadata --offline --locked` (the dependencies are already fetched by the build
//! that runs this test), with every feature on, as `scripts/test` builds.

use std::path::{Path, PathBuf};
use std::process::Command;

type Version = (u64, u64, u64);

fn parse_version(text: &str) -> Option<Version> {
    let mut parts = text.trim().split('.').map(|p| p.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next().unwrap_or(Some(0))?;
    let patch = parts.next().unwrap_or(Some(0))?;
    parts.next().is_none().then_some((major, minor, patch))
}

fn repo_root() -> PathBuf {
    let agent = Path::new(env!("CARGO_MANIFEST_DIR"));
    agent.parent().unwrap_or(agent).to_path_buf()
}

fn workspace_rust_version(root: &Path) -> (String, Version) {
    let path = root.join("Cargo.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let manifest: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()));
    let declared = manifest
        .get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("rust-version"))
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| {
            panic!(
                "{}: [workspace.package] has no rust-version; set it",
                path.display()
            )
        })
        .to_string();
    let version = parse_version(&declared).unwrap_or_else(|| {
        panic!(
            "{}: rust-version {declared:?} is not a version",
            path.display()
        )
    });
    (declared, version)
}

/// The host triple, as `rustc -vV` prints it: the platform whose dependencies are built.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc} -vV: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{rustc} -vV printed no host line"))
}

fn metadata(root: &Path) -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(root)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--locked",
            "--all-features",
            "--filter-platform",
        ])
        .arg(host_triple())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo} metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

#[test]
fn no_locked_dependency_needs_a_newer_rust_than_the_workspace_declares() {
    let root = repo_root();
    let (declared, workspace) = workspace_rust_version(&root);
    let meta = metadata(&root);
    let built: std::collections::BTreeSet<&str> = meta["resolve"]["nodes"]
        .as_array()
        .expect("cargo metadata has resolve.nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    let members: std::collections::BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("cargo metadata has workspace_members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();

    let mut newer = Vec::new();
    let mut not_inherited = Vec::new();
    for package in meta["packages"]
        .as_array()
        .expect("cargo metadata has packages")
    {
        let (Some(id), Some(name)) = (package["id"].as_str(), package["name"].as_str()) else {
            continue;
        };
        let wanted = package["rust_version"].as_str();
        if members.contains(id) {
            if wanted != Some(declared.as_str()) {
                not_inherited.push(format!("{name} (rust-version {wanted:?})"));
            }
            continue;
        }
        if !built.contains(id) {
            continue;
        }
        if let Some(wanted) = wanted {
            match parse_version(wanted) {
                Some(v) if v > workspace => newer.push(format!(
                    "{name} {} needs Rust {wanted}",
                    package["version"].as_str().unwrap_or("?")
                )),
                Some(_) => {}
                None => newer.push(format!("{name}: unreadable rust-version {wanted:?}")),
            }
        }
    }
    assert!(
        newer.is_empty(),
        "Cargo.lock builds crates that need a newer Rust than rust-version = {declared:?} in \
         Cargo.toml: {}; raise [workspace.package] rust-version to the highest of them (and say \
         so in the commit), or lock older versions of these crates",
        newer.join(", ")
    );
    assert!(
        not_inherited.is_empty(),
        "workspace members that do not inherit rust-version = {declared:?}: {}; give each \
         `rust-version.workspace = true`",
        not_inherited.join(", ")
    );
}

#[test]
fn versions_compare_by_number() {
    assert_eq!(parse_version("1.94.1"), Some((1, 94, 1)));
    assert_eq!(parse_version("1.89"), Some((1, 89, 0)));
    assert!(
        parse_version("1.100").unwrap_or_default() > parse_version("1.99.9").unwrap_or_default()
    );
    assert_eq!(parse_version("1.x"), None);
    assert_eq!(parse_version("1.2.3.4"), None);
}
