//! Checks on a plugin file before any of its code runs: owner, permissions (of the file and of its
//! directory) and the optional sha256 pin. The checked file stays open, and the library is loaded through
//! that descriptor, so the bytes that were checked are the bytes that run.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A plugin file that passed the checks, still open.
#[derive(Debug)]
pub struct CheckedFile {
    pub file: File,
    /// The canonical path (symlinks resolved).
    pub path: PathBuf,
    /// Lowercase hex, when it was computed.
    pub sha256: Option<String>,
    pub uid: u32,
    pub mode: u32,
}

/// Opens `path` and checks it. Every error is one sentence that says what is wrong and how to fix it.
///
/// The file is hashed when `pin` is set or `want_hash` is true.
pub fn open_checked(
    path: &Path,
    pin: Option<&str>,
    want_hash: bool,
) -> Result<CheckedFile, String> {
    let pin = match pin {
        Some(p) => Some(normalize_pin(p)?),
        None => None,
    };
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        format!("cannot open the plugin file: {e}; check `path` (build the plugin, or install it there)")
    })?;
    let mut file = File::open(&canonical).map_err(|e| {
        format!(
            "cannot open {}: {e}; check its permissions",
            canonical.display()
        )
    })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", canonical.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "{} is not a regular file; point `path` at the plugin's .so",
            canonical.display()
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    check_owner_and_mode(&canonical, meta.uid(), meta.permissions().mode(), me, false)?;
    if let Some(dir) = canonical.parent() {
        let dmeta =
            std::fs::metadata(dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
        check_owner_and_mode(dir, dmeta.uid(), dmeta.permissions().mode(), me, true)?;
    }
    // Hashing costs a read of the whole file: only when a pin asks for it (or `inspect`, which wants it).
    let sha256 = match (&pin, want_hash) {
        (None, false) => None,
        _ => Some(sha256_of(&mut file, &canonical)?),
    };
    if let (Some(pin), Some(actual)) = (&pin, &sha256) {
        if pin != actual {
            return Err(format!(
                "sha256 mismatch: the file's is {actual}, the config pins {pin}; if the plugin was \
                 upgraded on purpose, set sha256 = \"{actual}\" (`ebb plugin inspect {}` prints it)",
                canonical.display()
            ));
        }
    }
    Ok(CheckedFile {
        file,
        path: canonical,
        sha256,
        uid: meta.uid(),
        mode: meta.permissions().mode() & 0o7777,
    })
}

/// Refuses what someone other than root or the agent's user could have written.
fn check_owner_and_mode(
    path: &Path,
    uid: u32,
    mode: u32,
    me: u32,
    is_dir: bool,
) -> Result<(), String> {
    let what = if is_dir {
        "its directory"
    } else {
        "the plugin file"
    };
    if uid != 0 && uid != me {
        return Err(format!(
            "{what} {} is owned by uid {uid}, neither root nor the agent's user (uid {me}), so that user \
             could change the code the agent runs; chown root {}",
            path.display(),
            path.display()
        ));
    }
    let writable_by_others = mode & 0o022 != 0;
    // A sticky directory (like /tmp) lets nobody else replace or rename a file they do not own.
    let sticky = is_dir && mode & 0o1000 != 0;
    if writable_by_others && !sticky {
        return Err(format!(
            "{what} {} is group- or world-writable (mode {:04o}), so others could change the code the \
             agent runs; chmod go-w {}",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

fn sha256_of(file: &mut File, path: &Path) -> Result<String, String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn normalize_pin(pin: &str) -> Result<String, String> {
    let p = pin
        .trim()
        .trim_start_matches("sha256:")
        .to_ascii_lowercase();
    if p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(p)
    } else {
        Err(format!(
            "sha256 {pin:?} is not 64 hex digits; `ebb plugin inspect PATH` prints the file's sha256"
        ))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file_with_mode(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join("libx.so");
        std::fs::write(&p, b"hello").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    const HELLO: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn a_private_file_passes_and_is_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with_mode(dir.path(), 0o644);
        let f = open_checked(&p, None, true).unwrap();
        assert_eq!(f.sha256.as_deref(), Some(HELLO));
        assert_eq!(open_checked(&p, None, false).unwrap().sha256, None);
        assert_eq!(f.mode, 0o644);
        // Pins are compared case-insensitively, with an optional sha256: prefix.
        open_checked(&p, Some(&HELLO.to_uppercase()), false).unwrap();
        open_checked(&p, Some(&format!("sha256:{HELLO}")), false).unwrap();
    }

    #[test]
    fn writable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o666, 0o620, 0o602] {
            let p = file_with_mode(dir.path(), mode);
            let e = open_checked(&p, None, false).unwrap_err();
            assert!(e.contains("group- or world-writable"), "{e}");
            assert!(e.contains("chmod go-w"), "{e}");
        }
    }

    #[test]
    fn a_writable_directory_is_refused_unless_sticky() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with_mode(dir.path(), 0o644);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = open_checked(&p, None, false).unwrap_err();
        assert!(e.contains("its directory"), "{e}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        open_checked(&p, None, false).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn owners_other_than_root_or_us_are_refused() {
        let e = check_owner_and_mode(Path::new("/x.so"), 1234, 0o644, 1000, false).unwrap_err();
        assert!(e.contains("owned by uid 1234"), "{e}");
        assert!(e.contains("chown root /x.so"), "{e}");
        check_owner_and_mode(Path::new("/x.so"), 0, 0o644, 1000, false).unwrap();
        check_owner_and_mode(Path::new("/x.so"), 1000, 0o644, 1000, false).unwrap();
    }

    #[test]
    fn pins_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with_mode(dir.path(), 0o644);
        let e = open_checked(&p, Some(&"0".repeat(64)), false).unwrap_err();
        assert!(e.contains("sha256 mismatch"), "{e}");
        assert!(e.contains(HELLO), "{e}");
        let e = open_checked(&p, Some("abc"), false).unwrap_err();
        assert!(e.contains("not 64 hex digits"), "{e}");
    }

    #[test]
    fn missing_files_say_so() {
        let e = open_checked(Path::new("/nonexistent/libx.so"), None, false).unwrap_err();
        assert!(e.contains("cannot open the plugin file"), "{e}");
    }
}
