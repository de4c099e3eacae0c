//! `<state_dir>/draining.map`: whether the node drains, as a HAProxy map file.
//!
//! A worker the master forks (master-worker mode) cannot inherit `EBB_DRAINING`, and the drain's
//! start commands reach it only once ebb sees it, a few ms after it began to serve. A config that
//! reads this file at load time closes that window, for ebb's reloads and the master's own alike:
//!
//! ```text
//! global
//!     set-var proc.ebb_draining str(draining),map_str_int(/var/lib/ebb/draining.map,0)
//! ```
//!
//! ebb rewrites it (temp file, rename) whenever the drain starts or ends, before anything reloads.

use std::io::Write;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "draining.map";

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// The file's text: one key, `draining`, with 1 or 0.
pub fn text(draining: bool) -> &'static str {
    if draining {
        "draining 1\n"
    } else {
        "draining 0\n"
    }
}

/// Replaces the file at once: a master re-reading its config never sees it half written.
pub fn write(state_dir: &Path, draining: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = state_dir.join(format!(".{FILE_NAME}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        // HAProxy reads it as whatever user loads its config.
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(text(draining).as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path(state_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_says_draining_1_or_0_and_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), true).expect("write");
        assert_eq!(
            std::fs::read_to_string(path(dir.path())).expect("read"),
            "draining 1\n"
        );
        write(dir.path(), false).expect("write");
        assert_eq!(
            std::fs::read_to_string(path(dir.path())).expect("read"),
            "draining 0\n"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(FILE_NAME)],
            "no temp file left"
        );
    }
}
