//! `ebb ctl --context NAME` (or `NATS_CONTEXT`): the server and credentials of a `nats` CLI
//! context, `$XDG_CONFIG_HOME/nats/context/NAME.json` (`~/.config/nats/context/NAME.json`), so
//! that an operator who set one up with `nats context add` does not repeat `--creds` and `--tls-*`.
//!
//! Only what ebb ctl has a flag for is read: `url`, `creds`, `nkey`, `token`, `user`, `password`,
//! `cert`, `key`, `ca`. The `nats` CLI writes every field, unset ones as `""`, and many that ebb
//! has no use for (JetStream domain, inbox prefix…): empty strings count as unset, other fields
//! are ignored. A flag or its `NATS_*` variable wins over the context.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::args::ConnArgs;

/// The fields of a context file that ebb ctl uses.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct NatsContext {
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub creds: String,
    #[serde(default)]
    pub nkey: String,
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub password: String,
    #[serde(default)]
    pub cert: String,
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub ca: String,
}

/// Where the `nats` CLI keeps context `name`, given `XDG_CONFIG_HOME` and `HOME`.
pub fn path(
    name: &str,
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, String> {
    // A name is a file name in one directory: no separators, nothing hidden, no `..`.
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) {
        return Err(format!(
            "--context {name:?} is not a context name; use the name `nats context ls` lists (nothing was sent)"
        ));
    }
    let base = match (xdg_config_home.filter(|v| !v.is_empty()), home.filter(|v| !v.is_empty())) {
        (Some(xdg), _) => PathBuf::from(xdg),
        (None, Some(home)) => PathBuf::from(home).join(".config"),
        (None, None) => {
            return Err(format!(
                "--context {name}: neither XDG_CONFIG_HOME nor HOME is set, so the nats context directory is unknown; set one of them (nothing was sent)"
            ))
        }
    };
    Ok(base
        .join("nats")
        .join("context")
        .join(format!("{name}.json")))
}

/// Parses a context file's text; `file` names it in the error.
pub fn parse(file: &Path, text: &str) -> Result<NatsContext, String> {
    // Fields of other types than ebb expects are the `nats` CLI's business; only ours must be
    // strings, so read into loose JSON first and pick them.
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "context file {} is not JSON ({e}); fix it or recreate it with `nats context add` (nothing was sent)",
            file.display()
        )
    })?;
    let serde_json::Value::Object(fields) = value else {
        return Err(format!(
            "context file {} is not a JSON object; recreate it with `nats context add` (nothing was sent)",
            file.display()
        ));
    };
    let wanted = [
        "url", "creds", "nkey", "token", "user", "password", "cert", "key", "ca",
    ];
    let mut picked = serde_json::Map::new();
    for name in wanted {
        match fields.get(name) {
            None | Some(serde_json::Value::Null) => {}
            Some(v @ serde_json::Value::String(_)) => {
                picked.insert(name.to_string(), v.clone());
            }
            Some(_) => {
                return Err(format!(
                    "context file {}: \"{name}\" must be a string; fix it or recreate the context with `nats context add` (nothing was sent)",
                    file.display()
                ))
            }
        }
    }
    serde_json::from_value(serde_json::Value::Object(picked)).map_err(|e| {
        format!(
            "context file {}: {e}; recreate it with `nats context add` (nothing was sent)",
            file.display()
        )
    })
}

/// Reads context `name` from the directory `env` points at (`XDG_CONFIG_HOME`, `HOME`).
pub fn load(name: &str, env: &HashMap<String, OsString>) -> Result<NatsContext, String> {
    let file = path(
        name,
        env.get("XDG_CONFIG_HOME").cloned(),
        env.get("HOME").cloned(),
    )?;
    let text = std::fs::read_to_string(&file).map_err(|e| {
        format!(
            "--context {name}: cannot read {}: {e}; list the contexts with `nats context ls`, or create this one with `nats context add {name}` (nothing was sent)",
            file.display()
        )
    })?;
    parse(&file, &text)
}

/// `~/…` as the `nats` CLI writes paths, made absolute with `home`.
fn expand_home(path: &str, home: Option<&OsString>) -> PathBuf {
    match (path.strip_prefix("~/"), home) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

fn some(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// Fills what the command line (flags and `NATS_*` variables) left unset from `context`.
pub fn apply(conn: &mut ConnArgs, context: &NatsContext, home: Option<&OsString>) {
    let path = |s: &str| (!s.is_empty()).then(|| expand_home(s, home));
    if conn.nats.is_none() {
        conn.nats = some(&context.url);
    }
    // One way of authenticating: a context's credentials never join a different one given on the
    // command line (its nkey beside a --creds, say), which the server would see as a mix.
    let auth_given = conn.creds.is_some()
        || conn.nkey.is_some()
        || conn.token.is_some()
        || conn.user.is_some()
        || conn.password.is_some();
    if !auth_given {
        conn.creds = path(&context.creds);
        conn.nkey = path(&context.nkey);
        conn.token = some(&context.token);
        conn.user = some(&context.user);
        conn.password = some(&context.password);
    }
    if conn.tls_ca.is_none() {
        conn.tls_ca = path(&context.ca);
    }
    // The certificate and its key go together, like --tls-cert and --tls-key.
    if conn.tls_cert.is_none() && conn.tls_key.is_none() {
        conn.tls_cert = path(&context.cert);
        conn.tls_key = path(&context.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        conn: ConnArgs,
    }

    fn conn(args: &[&str]) -> ConnArgs {
        Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .conn
    }

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    /// As `nats context add prod --server … --creds …` writes it: every field, unset ones empty.
    const PROD: &str = r#"{
      "description": "production",
      "url": "nats://nats-1:4222,nats://nats-2:4222",
      "socks_proxy": "",
      "token": "",
      "user": "",
      "password": "",
      "creds": "~/.nats/prod.creds",
      "nkey": "",
      "cert": "/etc/ebb/client.pem",
      "key": "/etc/ebb/client.key",
      "ca": "/etc/ebb/ca.pem",
      "nsc": "",
      "jetstream_domain": "",
      "jetstream_api_prefix": "",
      "jetstream_event_prefix": "",
      "inbox_prefix": "",
      "user_jwt": "",
      "color_scheme": "",
      "tls_first": false,
      "windows_cert_store": ""
    }"#;

    fn prod() -> NatsContext {
        parse(Path::new("prod.json"), PROD).expect("a nats CLI context parses")
    }

    #[test]
    fn the_file_is_under_xdg_config_home_else_home_dot_config() {
        assert_eq!(
            path("prod", os("/xdg"), os("/home/op")),
            Ok(PathBuf::from("/xdg/nats/context/prod.json"))
        );
        assert_eq!(
            path("prod", None, os("/home/op")),
            Ok(PathBuf::from("/home/op/.config/nats/context/prod.json"))
        );
        assert_eq!(
            path("prod", os(""), os("/home/op")),
            Ok(PathBuf::from("/home/op/.config/nats/context/prod.json"))
        );
        assert!(path("prod", None, None).is_err_and(|e| e.contains("HOME")));
    }

    #[test]
    fn a_name_that_would_leave_the_directory_is_refused() {
        for bad in ["", "../prod", "a/b", ".hidden"] {
            assert!(
                path(bad, os("/xdg"), None).is_err_and(|e| e.contains("not a context name")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_nats_cli_context_gives_its_fields_and_empty_ones_count_as_unset() {
        let ctx = prod();
        assert_eq!(ctx.url, "nats://nats-1:4222,nats://nats-2:4222");
        assert_eq!(ctx.creds, "~/.nats/prod.creds");
        assert_eq!(ctx.token, "");
        let mut c = conn(&[]);
        apply(&mut c, &ctx, os("/home/op").as_ref());
        assert_eq!(
            c.nats.as_deref(),
            Some("nats://nats-1:4222,nats://nats-2:4222")
        );
        assert_eq!(c.creds, Some(PathBuf::from("/home/op/.nats/prod.creds")));
        assert_eq!(c.token, None);
        assert_eq!(c.user, None);
        assert_eq!(c.tls_ca, Some(PathBuf::from("/etc/ebb/ca.pem")));
        assert_eq!(c.tls_cert, Some(PathBuf::from("/etc/ebb/client.pem")));
        assert_eq!(c.tls_key, Some(PathBuf::from("/etc/ebb/client.key")));
    }

    #[test]
    fn flags_win_over_the_context() {
        let mut c = conn(&[
            "--nats",
            "nats://other:4222",
            "--token",
            "t0k",
            "--tls-ca",
            "/mine/ca.pem",
        ]);
        apply(&mut c, &prod(), os("/home/op").as_ref());
        assert_eq!(c.nats.as_deref(), Some("nats://other:4222"));
        assert_eq!(c.token.as_deref(), Some("t0k"));
        // The context's creds would be a second way of authenticating: left out.
        assert_eq!(c.creds, None);
        assert_eq!(c.tls_ca, Some(PathBuf::from("/mine/ca.pem")));
        // Not given: still from the context.
        assert_eq!(c.tls_cert, Some(PathBuf::from("/etc/ebb/client.pem")));
    }

    #[test]
    fn a_context_without_a_url_leaves_the_default() {
        let ctx = parse(Path::new("x.json"), r#"{"token": "abc"}"#).expect("parses");
        let mut c = conn(&[]);
        apply(&mut c, &ctx, None);
        assert_eq!(c.nats, None);
        assert_eq!(c.nats_config().url, "nats://127.0.0.1:4222");
        assert_eq!(c.token.as_deref(), Some("abc"));
    }

    #[test]
    fn a_malformed_file_is_an_error_naming_it() {
        for (text, says) in [
            ("{ not json", "is not JSON"),
            ("[1, 2]", "not a JSON object"),
            (r#"{"url": 4222}"#, "\"url\" must be a string"),
        ] {
            let err = parse(Path::new("/x/nats/context/bad.json"), text).expect_err(text);
            assert!(
                err.contains("/x/nats/context/bad.json") && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = HashMap::from([(
            "XDG_CONFIG_HOME".to_string(),
            dir.path().as_os_str().to_owned(),
        )]);
        let err = load("nope", &env).expect_err("no such context");
        assert!(
            err.contains("nope.json") && err.contains("nats context"),
            "{err}"
        );
    }
}
