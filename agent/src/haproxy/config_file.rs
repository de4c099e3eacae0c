//! What ebb needs to know from haproxy.cfg itself: where the admin socket is, and the config's hash.

use std::path::{Path, PathBuf};

pub use crate::digest::sha256_hex;

/// Finds the admin socket in the `global` section: a unix `stats socket` with `expose-fd listeners`
/// (needed by `-x`) and admin level (needed for `set var` and the drain commands).
///
/// When `wanted` is set, it must name one of those sockets.
pub fn find_admin_socket(text: &str, wanted: Option<&Path>) -> Result<PathBuf, String> {
    let mut in_global = false;
    let mut candidates = Vec::new();
    let mut without_expose = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let indented = line.starts_with(char::is_whitespace);
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if !indented {
            in_global = first == "global";
            continue;
        }
        if !in_global || first != "stats" || words.next() != Some("socket") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        let rest: Vec<&str> = words.collect();
        let Some(path) = unix_path(addr) else {
            continue;
        };
        let level = rest
            .windows(2)
            .find(|w| w[0] == "level")
            .map(|w| w[1])
            // HAProxy's own default: a socket without `level` is an operator socket, on which
            // `set var` and the drain commands are refused.
            .unwrap_or("operator");
        let exposes = rest.windows(2).any(|w| w == ["expose-fd", "listeners"]);
        if exposes && level == "admin" {
            candidates.push(path);
        } else {
            without_expose.push(path);
        }
    }
    let fix = "add `stats socket /run/haproxy/admin.sock mode 600 level admin expose-fd listeners` to the global section";
    match wanted {
        Some(w) if candidates.iter().any(|c| c == w) => Ok(w.to_path_buf()),
        Some(w) => Err(format!(
            "haproxy.admin_socket {} is not a `stats socket … level admin expose-fd listeners` in the global section; {fix}, or unset haproxy.admin_socket",
            w.display()
        )),
        None => match candidates.into_iter().next() {
            Some(c) => Ok(c),
            None if !without_expose.is_empty() => Err(format!(
                "stats socket {} lacks `level admin expose-fd listeners` (without `level`, HAProxy makes it an operator socket, which refuses the drain commands; seamless reloads (-x) need `expose-fd listeners`); {fix}",
                without_expose[0].display()
            )),
            None => Err(format!("no admin stats socket in the global section; {fix}")),
        },
    }
}

fn unix_path(addr: &str) -> Option<PathBuf> {
    let path = addr.strip_prefix("unix@").unwrap_or(addr);
    // Other address families (ipv4@, abns@, fd@ …) carry a '@'; a plain path is a unix socket.
    (!path.contains('@') && path.starts_with('/')).then(|| PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_admin_socket() {
        let cfg = "global\n  log stdout local0\n  stats socket ipv4@127.0.0.1:9999 level admin\n  stats socket /run/a.sock mode 600 level admin expose-fd listeners # the one\nfrontend f\n  bind :80\n";
        assert_eq!(
            find_admin_socket(cfg, None),
            Ok(PathBuf::from("/run/a.sock"))
        );
        assert_eq!(
            find_admin_socket(cfg, Some(Path::new("/run/a.sock"))),
            Ok(PathBuf::from("/run/a.sock"))
        );
        assert!(find_admin_socket(cfg, Some(Path::new("/run/b.sock"))).is_err());
    }

    #[test]
    fn unix_prefix_is_accepted() {
        let cfg = "global\n stats socket unix@/run/a.sock expose-fd listeners level admin\n";
        assert_eq!(
            find_admin_socket(cfg, None),
            Ok(PathBuf::from("/run/a.sock"))
        );
    }

    #[test]
    fn refuses_sockets_without_expose_fd_or_admin_level() {
        let e = find_admin_socket("global\n stats socket /run/a.sock level admin\n", None)
            .expect_err("no expose-fd");
        assert!(e.contains("expose-fd listeners"), "{e}");
        let e = find_admin_socket(
            "global\n stats socket /run/a.sock level user expose-fd listeners\n",
            None,
        )
        .expect_err("not admin");
        assert!(e.contains("level admin"), "{e}");
    }

    #[test]
    fn socket_without_level_is_an_operator_socket_and_refused() {
        let e = find_admin_socket(
            "global
 stats socket /run/a.sock mode 600 expose-fd listeners
",
            None,
        )
        .expect_err("operator by default");
        assert!(e.contains("operator") && e.contains("level admin"), "{e}");
    }

    #[test]
    fn ignores_sockets_outside_global_and_comments() {
        let e = find_admin_socket(
            "global\n # stats socket /run/a.sock level admin expose-fd listeners\nfrontend x\n stats socket /run/b.sock level admin expose-fd listeners\n",
            None,
        )
        .expect_err("none in global");
        assert!(e.contains("no admin stats socket"), "{e}");
    }

    #[test]
    fn hashes_bytes() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
