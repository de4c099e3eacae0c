//! Installing a pushed haproxy.cfg, and putting the previous one back.
//!
//! HAProxy (and whoever else reads the file: a crash restart, the next agent, an operator's
//! `haproxy -c`) must only ever see a whole file: the old one or the new one. So the new text is
//! staged beside the config, synced, and renamed over it; the previous file is kept beside it as a
//! hard link (`.<name>.ebb-last-good`), and a failed reload renames that link back. Nothing is
//! ever copied over the live file, and every rename is followed by a sync of the directory, so a
//! power cut leaves one of the two files in place, never a torn one.
//!
//! The staged file takes the live file's mode and owner: a config readable only by root stays so.
//!
//! Blocking file I/O: call these from the blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What an install error was doing, and to which file.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct InstallError {
    action: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn at(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError {
        action,
        path,
        source,
    }
}

/// Where the new text waits, beside `config`, until it is checked and installed.
pub fn staged_path(config: &Path) -> PathBuf {
    sibling(config, "ebb-new")
}

/// The previous config, kept beside `config` after an install.
pub fn last_good_path(config: &Path) -> PathBuf {
    sibling(config, "ebb-last-good")
}

fn sibling(config: &Path, suffix: &str) -> PathBuf {
    let name = config
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "haproxy.cfg".into());
    config
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.{suffix}"))
}

fn dir_of(config: &Path) -> &Path {
    match config.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `text` to [`staged_path`] with the live file's mode and owner, synced. Returns the
/// staged path, for `haproxy -c`.
pub fn stage(config: &Path, text: &[u8]) -> Result<PathBuf, InstallError> {
    let staged = staged_path(config);
    let live = fs::metadata(config).map_err(at("cannot read the metadata of", config))?;
    // A stale staged file (an agent that died mid-push) is this agent's own leftover.
    match fs::remove_file(&staged) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(at("cannot remove the stale", &staged)(e)),
    }
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staged)?;
        // Mode first, with nothing written yet: the text is never readable more widely than
        // the live file.
        file.set_permissions(fs::Permissions::from_mode(live.mode() & 0o7777))?;
        std::os::unix::fs::fchown(&file, Some(live.uid()), Some(live.gid()))?;
        file.write_all(text)?;
        file.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&staged);
        return Err(at("cannot write", &staged)(e));
    }
    Ok(staged)
}

/// Keeps the live config as [`last_good_path`], then renames the staged file over it.
pub fn install(config: &Path) -> Result<(), InstallError> {
    let staged = staged_path(config);
    replace_with_link(config, &last_good_path(config))?;
    fs::rename(&staged, config).map_err(at("cannot rename the staged config over", config))?;
    sync_dir(dir_of(config))
}

/// Puts the last good config back in place of `config`, atomically.
pub fn restore(config: &Path) -> Result<(), InstallError> {
    let last_good = last_good_path(config);
    let back = sibling(config, "ebb-restore");
    replace_with_link(&last_good, &back)?;
    fs::rename(&back, config).map_err(at("cannot rename the last good config over", config))?;
    sync_dir(dir_of(config))
}

/// Removes a staged file that was not installed (its check failed).
pub fn discard(config: &Path) {
    let _ = fs::remove_file(staged_path(config));
}

/// Makes `link` a hard link to `target`, replacing any previous `link` atomically.
fn replace_with_link(target: &Path, link: &Path) -> Result<(), InstallError> {
    let tmp = link.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    fs::hard_link(target, &tmp).map_err(at("cannot link", &tmp))?;
    fs::rename(&tmp, link).map_err(at("cannot rename into place", link))
}

fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at("cannot sync the directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let config = dir.join("haproxy.cfg");
        fs::write(&config, text).expect("write");
        fs::set_permissions(&config, fs::Permissions::from_mode(mode)).expect("chmod");
        config
    }

    #[test]
    fn the_new_file_keeps_the_live_files_mode_and_the_old_one_is_kept_beside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = live(dir.path(), "old\n", 0o640);
        let staged = stage(&config, b"new\n").expect("stage");
        assert_eq!(fs::read(&staged).expect("read"), b"new\n");
        assert_eq!(fs::metadata(&staged).expect("meta").mode() & 0o7777, 0o640);
        install(&config).expect("install");
        assert_eq!(fs::read_to_string(&config).expect("read"), "new\n");
        assert_eq!(fs::metadata(&config).expect("meta").mode() & 0o7777, 0o640);
        assert_eq!(
            fs::read_to_string(last_good_path(&config)).expect("read"),
            "old\n"
        );
        assert!(!staged.exists());
    }

    #[test]
    fn the_owner_is_kept_too() {
        if rustix::process::geteuid().as_raw() != 0 {
            // Only root can give a file away; CI runs as root, where this is checked.
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let config = live(dir.path(), "old\n", 0o600);
        std::os::unix::fs::chown(&config, Some(65534), Some(65534)).expect("chown");
        let staged = stage(&config, b"new\n").expect("stage");
        let meta = fs::metadata(&staged).expect("meta");
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    }

    /// A failed reload puts the previous file back by renaming it, never by copying over the
    /// live file: the restored config is the very inode that was kept.
    #[test]
    fn restore_renames_the_last_good_file_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = live(dir.path(), "old\n", 0o644);
        let old_inode = fs::metadata(&config).expect("meta").ino();
        stage(&config, b"new\n").expect("stage");
        install(&config).expect("install");
        restore(&config).expect("restore");
        assert_eq!(fs::read_to_string(&config).expect("read"), "old\n");
        assert_eq!(fs::metadata(&config).expect("meta").ino(), old_inode);
        // Still kept, for the next failure.
        assert_eq!(
            fs::read_to_string(last_good_path(&config)).expect("read"),
            "old\n"
        );
    }

    #[test]
    fn a_stale_staged_file_is_replaced_and_a_discarded_one_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = live(dir.path(), "old\n", 0o644);
        fs::write(staged_path(&config), "stale").expect("stale");
        let staged = stage(&config, b"new\n").expect("stage");
        assert_eq!(fs::read(&staged).expect("read"), b"new\n");
        discard(&config);
        assert!(!staged.exists());
        assert_eq!(fs::read_to_string(&config).expect("read"), "old\n");
    }

    #[test]
    fn a_missing_live_config_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = stage(&dir.path().join("nope.cfg"), b"x").expect_err("missing");
        assert!(e.to_string().contains("nope.cfg"), "{e}");
    }
}
