//! Tidy: the structural invariants of docs/ARCHITECTURE.md ("Structural invariants (checked by
//! agent/tests/tidy.rs)"), checked by reading the sources. Std only, no compiler: each failure
//! names the file, the line and the rule it breaks.
//!
//! A source file is read as tokens (comments and the contents of literals dropped, `#[cfg(test)]`
//! items and files named `tests.rs` skipped). Every path in what is left is checked: `use` trees
//! expanded, `self::`/`super::` resolved to `crate::…`, and a path that starts with a name brought
//! in by `use` followed back to where that name comes from.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// The rules
// ---------------------------------------------------------------------------------------------

/// What a module that decides without I/O never names: the runtime, the OS, the clock (the time
/// is passed in).
const IO_AND_RUNTIME: &[&str] = &[
    "tokio",
    "std::fs",
    "std::process",
    "std::net",
    "std::os",
    "std::thread",
    "rustix",
    "async_nats",
    "libloading",
    "SystemTime::now",
    "Instant::now",
];

/// What the node core may import from the crate.
const CORE_IMPORTS: &[&str] = &[
    "backoff",
    "config",
    "drain",
    "events",
    "inbox",
    "record",
    "reload",
    "state_file",
    "node::core",
    "node::effect",
];

/// A rule about modules of agent/src: which files → what they must not name → the only modules of
/// the crate they may import, besides themselves (`ANY`: whatever is not forbidden).
///
/// Files are relative to agent/src: `"drain.rs"` one file, `"haproxy/"` a directory, `"*"` every
/// file; `"!x"` leaves `x` out.
type Rule = (
    &'static [&'static str],
    &'static [&'static str],
    Option<&'static [&'static str]>,
);
const ANY: Option<&[&str]> = None;
const NOTHING: Option<&[&str]> = Some(&[]);

/// The table of docs/ARCHITECTURE.md, "Structural invariants".
#[rustfmt::skip]
const RULES: &[Rule] = &[
    (&["node/core.rs", "node/core/", "node/effect.rs"], IO_AND_RUNTIME, Some(CORE_IMPORTS)),
    (&["drain.rs"], IO_AND_RUNTIME, Some(&["config"])),
    (&["reload.rs", "backoff.rs", "events.rs", "record.rs"], IO_AND_RUNTIME, NOTHING),
    (&["haproxy/cfg_syntax.rs", "haproxy/push_policy.rs"], IO_AND_RUNTIME, Some(&["haproxy::cfg_syntax"])),
    (&["haproxy/"], &["async_nats", "crate::bus", "crate::node", "crate::plugins", "crate::ctl", "crate::inbox"], ANY),
    (&["bus/"], &["crate::node", "crate::haproxy", "crate::plugins"], ANY),
    (&["plugins/"], &["crate::node", "crate::bus", "crate::haproxy", "crate::metrics", "prometheus_client"], ANY),
    (&["metrics/"], &["crate::node", "crate::haproxy", "crate::ctl"], ANY),
    (&["metrics/mod.rs"], &["tokio", "async_nats", "hyper", "hyper_util"], ANY),
    (&["ctl/"], &["crate::node", "crate::haproxy", "crate::plugins"], ANY),
    (&["state_file.rs"], &[], Some(&["record", "drain"])),
    // main.rs, the binary, is the one place that wires the node up.
    (&["*", "!node/", "!main.rs"], &["crate::node"], ANY),
];

/// Where the "no citation of a document the repository does not have" rule looks.
const DOC_ROOTS: &[&str] = &[
    "agent",
    "sdk",
    "plugins",
    "examples",
    "tests",
    "docs",
    "README.md",
];
const DOC_EXTENSIONS: &[&str] = &["rs", "md", "toml", "h", "c"];
/// The name of that document, spelled so that this file does not cite it.
const MISSING_DOCUMENT: &str = concat!("DES", "IGN");

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

#[test]
fn modules_import_only_what_their_layer_allows() {
    let src = repo_root().join("agent/src");
    let mut failures = Failures::default();
    for path in rust_files(&src) {
        if path.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        check_module(&relative(&path, &src), &read(&path), &mut failures);
    }
    failures.check("modules import only what their layer allows");
}

/// Applies every rule that covers `rel` (a file under agent/src) to its text.
fn check_module(rel: &str, text: &str, failures: &mut Failures) {
    let rules: Vec<&Rule> = RULES.iter().filter(|r| covers(r.0, rel)).collect();
    if rules.is_empty() {
        return;
    }
    let module = module_path(rel);
    let shown = format!("agent/src/{rel}");
    for (line, segs) in paths(text, &module) {
        let path = segs.join("::");
        for (modules, forbidden, crate_only) in &rules {
            let who = describe(modules);
            for f in forbidden.iter() {
                let pattern: Vec<&str> = f.split("::").collect();
                if contains(&segs, &pattern) {
                    failures.push(&shown, line, format!("{who} must not name {f} ({path})"));
                }
            }
            let Some(allowed) = crate_only else {
                continue;
            };
            if let Some(m) = crate_module_outside(&segs, &module, allowed) {
                let may = if allowed.is_empty() {
                    "nothing".to_string()
                } else {
                    format!("only {}", allowed.join(", "))
                };
                failures.push(
                    &shown,
                    line,
                    format!("{who} may import {may} from the crate, not crate::{m} ({path})"),
                );
            }
        }
    }
}

/// A rule's files, as people say them: `every module but node/, main.rs`.
fn describe(modules: &[&str]) -> String {
    let named: Vec<&str> = modules
        .iter()
        .filter(|m| !m.starts_with('!'))
        .map(|m| if *m == "*" { "every module" } else { m })
        .collect();
    let left_out: Vec<&str> = modules.iter().filter_map(|m| m.strip_prefix('!')).collect();
    if left_out.is_empty() {
        named.join(", ")
    } else {
        format!("{} but {}", named.join(", "), left_out.join(", "))
    }
}

#[test]
fn no_citation_of_a_missing_document() {
    let root = repo_root();
    let mut failures = Failures::default();
    for top in DOC_ROOTS {
        let path = root.join(top);
        let files = if path.is_dir() {
            files_under(&path, DOC_EXTENSIONS)
        } else {
            vec![path]
        };
        for file in files {
            let text = read(&file);
            for (i, line) in text.lines().enumerate() {
                if line.contains(MISSING_DOCUMENT) {
                    failures.push(
                        &relative(&file, &root),
                        i + 1,
                        format!(
                            "cites {MISSING_DOCUMENT}, a document the repository does not have: \
                             say the rule here, or point to docs/ARCHITECTURE.md or docs/PROTOCOL.md"
                        ),
                    );
                }
            }
        }
    }
    failures.check("no citation of a missing document");
}

#[test]
fn every_crate_root_starts_with_a_crate_doc() {
    let root = repo_root();
    let mut failures = Failures::default();
    for lib in library_roots(&root) {
        let text = read(&lib);
        if !text.starts_with("//!") {
            failures.push(
                &relative(&lib, &root),
                1,
                "a crate root starts with a `//!` crate-level doc".to_string(),
            );
        }
    }
    failures.check("every crate root starts with a crate doc");
}

// ---------------------------------------------------------------------------------------------
// Rules applied
// ---------------------------------------------------------------------------------------------

/// Whether a rule's `modules` cover `rel` (a path relative to agent/src, with `/`).
fn covers(modules: &[&str], rel: &str) -> bool {
    let hits = |m: &str| m == "*" || m == rel || (m.ends_with('/') && rel.starts_with(m));
    let left_out = modules.iter().filter_map(|m| m.strip_prefix('!')).any(hits);
    let named = modules
        .iter()
        .filter(|m| !m.starts_with('!'))
        .any(|m| hits(m));
    named && !left_out
}

/// Whether `pattern` occurs in `segs`, segment by segment.
fn contains(segs: &[String], pattern: &[&str]) -> bool {
    segs.windows(pattern.len())
        .any(|w| w.iter().zip(pattern).all(|(a, b)| a == b))
}

/// The module of the crate `segs` (resolved) imports, when it is none of `allowed` and not
/// `module` itself.
fn crate_module_outside(segs: &[String], module: &[String], allowed: &[&str]) -> Option<String> {
    let rest = segs.strip_prefix(&["crate".to_string()])?;
    if rest.is_empty() || rest.starts_with(module) {
        return None;
    }
    let ok = allowed.iter().any(|a| {
        let a: Vec<&str> = a.split("::").collect();
        rest.len() >= a.len() && rest.iter().zip(&a).all(|(x, y)| x == y)
    });
    if ok {
        return None;
    }
    // `node::…` names a module inside node/; anything else a module at the top.
    let depth = if rest[0] == "node" && rest.len() > 1 {
        2
    } else {
        1
    };
    Some(rest[..depth].join("::"))
}

/// The module path of a file under agent/src: `node/core.rs` → `node::core`, `bus/mod.rs` → `bus`.
fn module_path(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

#[derive(Default)]
struct Failures(BTreeSet<(String, usize, String)>);

impl Failures {
    fn push(&mut self, file: &str, line: usize, rule: String) {
        self.0.insert((file.to_string(), line, rule));
    }

    fn check(self, what: &str) {
        if self.0.is_empty() {
            return;
        }
        let list: Vec<String> = self
            .0
            .iter()
            .map(|(file, line, rule)| format!("  {file}:{line}: {rule}"))
            .collect();
        panic!(
            "\n{what}: {} failure(s); see docs/ARCHITECTURE.md, \"Structural invariants\"\n{}\n",
            list.len(),
            list.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Reading Rust: tokens, `#[cfg(test)]` items, paths
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

/// The tokens of `text` that matter here: identifiers, `::` and punctuation. Comments, literals
/// and lifetimes are dropped.
fn tokenize(text: &str) -> Vec<Token> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let ident_start = |ch: char| ch.is_alphabetic() || ch == '_';
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    // Skips a quoted literal whose opening quote is at `i`; `hashes` for raw strings.
    let skip_str = |i: &mut usize, line: &mut usize, raw: bool, hashes: usize| {
        *i += 1;
        while *i < c.len() {
            match c[*i] {
                '\n' => *line += 1,
                '\\' if !raw => *i += 1,
                '"' if c[*i + 1..]
                    .iter()
                    .take(hashes)
                    .filter(|&&h| h == '#')
                    .count()
                    == hashes =>
                {
                    *i += 1 + hashes;
                    return;
                }
                _ => {}
            }
            *i += 1;
        }
    };
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        match ch {
            '\n' => {
                line += 1;
                i += 1;
            }
            _ if ch.is_whitespace() => i += 1,
            '/' if next == Some('/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        if c[i] == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                }
            }
            '"' => skip_str(&mut i, &mut line, false, 0),
            '\'' => {
                if next == Some('\\') {
                    // An escaped char literal: '\n', '\'', '\u{..}'.
                    i += 3;
                    while i < c.len() && c[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if c.get(i + 2) == Some(&'\'') {
                    i += 3;
                } else {
                    // A lifetime or a label.
                    i += 1;
                    while i < c.len() && ident_char(c[i]) {
                        i += 1;
                    }
                }
            }
            ':' if next == Some(':') => {
                out.push(Token {
                    tok: Tok::PathSep,
                    line,
                });
                i += 2;
            }
            _ if ident_start(ch) => {
                let start = i;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let after = c.get(i).copied();
                let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
                if raw_prefix && matches!(after, Some('"' | '#')) {
                    let hashes = c[i..].iter().take_while(|&&h| h == '#').count();
                    if c.get(i + hashes) == Some(&'"') {
                        i += hashes;
                        skip_str(&mut i, &mut line, true, hashes);
                        continue;
                    }
                    if word == "r" && hashes == 1 {
                        // A raw identifier: r#type.
                        i += 1;
                        continue;
                    }
                }
                if matches!(word.as_str(), "b" | "c") && after == Some('"') {
                    skip_str(&mut i, &mut line, false, 0);
                    continue;
                }
                if word == "b" && after == Some('\'') {
                    continue;
                }
                out.push(Token {
                    tok: Tok::Ident(word),
                    line,
                });
            }
            _ if ch.is_ascii_digit() => {
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
            }
            _ => {
                out.push(Token {
                    tok: Tok::Punct(ch),
                    line,
                });
                i += 1;
            }
        }
    }
    out
}

/// `tokens` without the items under `#[cfg(test)]` (a `mod tests { … }`, a `use`, a function).
fn without_test_items(tokens: Vec<Token>) -> Vec<Token> {
    const CFG_TEST: [&str; 7] = ["#", "[", "cfg", "(", "test", ")", "]"];
    let at_cfg_test = |rest: &[Token]| {
        rest.len() >= CFG_TEST.len()
            && rest.iter().zip(CFG_TEST).all(|(t, w)| match &t.tok {
                Tok::Ident(s) => s == w,
                Tok::Punct(c) => w.chars().eq([*c]),
                Tok::PathSep => false,
            })
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if !at_cfg_test(&tokens[i..]) {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        }
        i += CFG_TEST.len();
        // Skip the item: up to a `;` outside brackets, or to the `}` closing its first `{`.
        let mut depth = 0usize;
        while i < tokens.len() {
            let t = &tokens[i].tok;
            i += 1;
            match t {
                Tok::Punct('(' | '[') => depth += 1,
                Tok::Punct(')' | ']') => depth = depth.saturating_sub(1),
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        break;
                    }
                }
                Tok::Punct(';') if depth == 0 => break,
                _ => {}
            }
        }
    }
    out
}

/// One path of a `use` tree, and the name it brings into scope (`None` for a glob).
#[derive(Debug, Clone, PartialEq, Eq)]
struct UsePath {
    segs: Vec<String>,
    name: Option<String>,
    line: usize,
}

/// Parses the `use` tree that starts at `tokens[*i]` (just after `use`), up to its `;`.
fn parse_use(tokens: &[Token], i: &mut usize, prefix: Vec<String>, out: &mut Vec<UsePath>) {
    let mut segs = prefix;
    if tokens.get(*i).map(|t| &t.tok) == Some(&Tok::PathSep) {
        *i += 1;
    }
    while let Some(t) = tokens.get(*i) {
        match &t.tok {
            Tok::Ident(s) => {
                segs.push(s.clone());
                *i += 1;
                match tokens.get(*i).map(|t| &t.tok) {
                    Some(Tok::PathSep) => *i += 1,
                    Some(Tok::Ident(a)) if a == "as" => {
                        let alias = match tokens.get(*i + 1).map(|t| &t.tok) {
                            Some(Tok::Ident(n)) if n != "_" => Some(n.clone()),
                            _ => None,
                        };
                        *i += 2;
                        if segs.last().is_some_and(|s| s == "self") {
                            segs.pop();
                        }
                        out.push(UsePath {
                            segs,
                            name: alias,
                            line: t.line,
                        });
                        return;
                    }
                    _ => {
                        if segs.last().is_some_and(|s| s == "self") && segs.len() > 1 {
                            segs.pop();
                        }
                        let name = segs.last().cloned();
                        out.push(UsePath {
                            segs,
                            name,
                            line: t.line,
                        });
                        return;
                    }
                }
            }
            Tok::Punct('*') => {
                *i += 1;
                out.push(UsePath {
                    segs,
                    name: None,
                    line: t.line,
                });
                return;
            }
            Tok::Punct('{') => {
                *i += 1;
                loop {
                    match tokens.get(*i).map(|t| &t.tok) {
                        None => return,
                        Some(Tok::Punct('}')) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *i += 1,
                        Some(_) => {
                            let before = *i;
                            parse_use(tokens, i, segs.clone(), out);
                            if *i == before {
                                *i += 1;
                            }
                        }
                    }
                }
            }
            _ => return,
        }
    }
}

/// `segs` with `self::`/`super::` resolved against `module`, and a leading name brought in by
/// `use` replaced by what it names.
fn resolve(
    segs: &[String],
    module: &[String],
    scope: &HashMap<String, Vec<String>>,
) -> Vec<String> {
    let Some(first) = segs.first() else {
        return Vec::new();
    };
    let crate_rooted = |base: &[String], rest: &[String]| {
        let mut v = vec!["crate".to_string()];
        v.extend_from_slice(base);
        v.extend_from_slice(rest);
        v
    };
    match first.as_str() {
        "crate" => segs.to_vec(),
        "self" => crate_rooted(module, &segs[1..]),
        "super" => {
            let ups = segs.iter().take_while(|s| *s == "super").count();
            let base = &module[..module.len().saturating_sub(ups)];
            crate_rooted(base, &segs[ups..])
        }
        _ if segs.len() > 1 => match scope.get(first) {
            Some(full) => {
                let mut v = full.clone();
                v.extend_from_slice(&segs[1..]);
                v
            }
            None => segs.to_vec(),
        },
        _ => segs.to_vec(),
    }
}

/// Every path in the non-test code of `text` (a file of module `module`), resolved, with its
/// line.
fn paths(text: &str, module: &[String]) -> Vec<(usize, Vec<String>)> {
    let tokens = without_test_items(tokenize(text));
    let is = |i: usize, t: &Tok| tokens.get(i).map(|x| &x.tok) == Some(t);
    // `use` trees first: they give the names the other paths start with.
    let mut uses = Vec::new();
    let mut in_use = vec![false; tokens.len()];
    let mut i = 0;
    while i < tokens.len() {
        if is(i, &Tok::Ident("use".into())) && (i == 0 || !is(i - 1, &Tok::PathSep)) {
            let start = i;
            i += 1;
            parse_use(&tokens, &mut i, Vec::new(), &mut uses);
            while i < tokens.len() && !is(i, &Tok::Punct(';')) {
                i += 1;
            }
            for flag in &mut in_use[start..i.min(tokens.len())] {
                *flag = true;
            }
        }
        i += 1;
    }
    let empty = HashMap::new();
    let mut scope = HashMap::new();
    let mut out = Vec::new();
    for u in &uses {
        let full = resolve(&u.segs, module, &empty);
        if let Some(name) = &u.name {
            scope.insert(name.clone(), full.clone());
        }
        out.push((u.line, full));
    }
    let mut i = 0;
    while i < tokens.len() {
        let starts_path = matches!(tokens[i].tok, Tok::Ident(_))
            && !in_use[i]
            && (i == 0 || !is(i - 1, &Tok::PathSep));
        if !starts_path {
            i += 1;
            continue;
        }
        let line = tokens[i].line;
        let mut segs = Vec::new();
        while let Some(Tok::Ident(s)) = tokens.get(i).map(|t| &t.tok) {
            segs.push(s.clone());
            i += 1;
            if is(i, &Tok::PathSep)
                && matches!(tokens.get(i + 1).map(|t| &t.tok), Some(Tok::Ident(_)))
            {
                i += 1;
            } else {
                break;
            }
        }
        // A lone `self` is the receiver, not the module.
        if segs.len() > 1 {
            segs = resolve(&segs, module, &scope);
        }
        out.push((line, segs));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

fn repo_root() -> PathBuf {
    let agent = Path::new(env!("CARGO_MANIFEST_DIR"));
    agent.parent().unwrap_or(agent).to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn relative(path: &Path, base: &Path) -> String {
    let rel = path.strip_prefix(base).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir, &["rs"])
}

/// Files under `dir` with one of `extensions`, sorted; `target/` and hidden directories skipped.
fn files_under(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    stack.push(path);
                }
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The library root of each workspace member: its `[lib] path`, else `src/lib.rs`.
fn library_roots(root: &Path) -> Vec<PathBuf> {
    let manifest = read(&root.join("Cargo.toml"));
    let members = toml_array(&manifest, "members");
    assert!(
        !members.is_empty(),
        "no workspace members found in Cargo.toml"
    );
    let mut out = Vec::new();
    for member in members {
        let dir = root.join(&member);
        let manifest = read(&dir.join("Cargo.toml"));
        let lib =
            toml_section_value(&manifest, "lib", "path").unwrap_or_else(|| "src/lib.rs".into());
        let lib = dir.join(lib);
        if lib.is_file() {
            out.push(lib);
        }
    }
    out
}

/// The strings of `key = [ "…", … ]` (the only array form the workspace manifest uses).
fn toml_array(text: &str, key: &str) -> Vec<String> {
    let Some(start) = text.find(&format!("{key} = [")) else {
        return Vec::new();
    };
    let rest = &text[start..];
    let body = &rest[..rest.find(']').unwrap_or(rest.len())];
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

/// `key = "…"` in section `[section]`.
fn toml_section_value(text: &str, section: &str, key: &str) -> Option<String> {
    let header = format!("[{section}]");
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == header;
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().trim_matches('"').to_string());
                }
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The reader itself
// ---------------------------------------------------------------------------------------------

#[test]
fn the_reader_sees_paths_as_the_compiler_does() {
    let text = r##"
//! tokio in a doc comment
use std::time::{Duration, Instant as Clock};
use crate::{drain::{self, Drain}, record};
use super::effect::*;
const S: &str = "std::fs::read";
const R: &str = r#"tokio::spawn"#;
fn f<'a>(x: &'a str) -> char {
    /* std::net /* nested */ */
    let _ = Clock::now();
    let _ = drain::unix_ms(crate::events::rfc3339);
    'x'
}
#[cfg(test)]
mod tests {
    use std::process::Command;
}
fn g() { std::thread::spawn(|| {}); }
const Q: (char, u8) = ('\'', b'"'); fn h() { std::net::TcpStream::connect("a"); }
"##;
    let module = vec!["node".to_string(), "core".to_string()];
    let got: Vec<(usize, String)> = paths(text, &module)
        .into_iter()
        .filter(|(_, s)| s.len() > 1)
        .map(|(l, s)| (l, s.join("::")))
        .collect();
    let want = [
        (3, "std::time::Duration"),
        (3, "std::time::Instant"),
        (4, "crate::drain"),
        (4, "crate::drain::Drain"),
        (4, "crate::record"),
        (5, "crate::node::effect"),
        (10, "std::time::Instant::now"),
        (11, "crate::drain::unix_ms"),
        (11, "crate::events::rfc3339"),
        (18, "std::thread::spawn"),
        (19, "std::net::TcpStream::connect"),
    ];
    let want: Vec<(usize, String)> = want.iter().map(|(l, s)| (*l, s.to_string())).collect();
    assert_eq!(got, want);
    assert!(covers(&["*", "!node/", "!main.rs"], "bus/mod.rs"));
    assert!(!covers(&["*", "!node/", "!main.rs"], "node/shell.rs"));
    assert!(!covers(&["*", "!node/", "!main.rs"], "main.rs"));
    assert_eq!(module_path("node/mod.rs"), vec!["node".to_string()]);
}

#[test]
fn the_rules_catch_what_they_forbid() {
    let broken = |rel: &str, text: &str| {
        let mut failures = Failures::default();
        check_module(rel, text, &mut failures);
        let lines: BTreeSet<usize> = failures.0.into_iter().map(|(_, line, _)| line).collect();
        lines.into_iter().collect::<Vec<_>>()
    };
    let core = "use crate::haproxy::admin;\nfn f() { tokio::spawn(g()); }\n\
                fn h() { let _ = std::time::Instant::now(); }\nuse super::shell::Shell;\n\
                use super::effect::Effect;\n";
    assert_eq!(broken("node/core.rs", core), [1, 2, 3, 4]);
    assert_eq!(broken("reload.rs", "use crate::config::Dur;\n"), [1]);
    assert_eq!(
        broken("haproxy/admin.rs", "\nuse crate::{bus, record};\n"),
        [2]
    );
    assert_eq!(
        broken("ctl/mod.rs", "fn f() { crate::plugins::x(); }\n"),
        [1]
    );
    assert_eq!(broken("bus/publisher.rs", "use crate::node::Shell;\n"), [1]);
    assert_eq!(broken("state_file.rs", "use crate::config::X;\n"), [1]);
    assert_eq!(
        broken("main.rs", "use crate::node::Shell;\n"),
        [] as [usize; 0]
    );
    assert_eq!(
        broken("node/shell.rs", "use tokio::spawn;\n"),
        [] as [usize; 0]
    );
}
