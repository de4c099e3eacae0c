//! HAProxy's configuration syntax, read the way HAProxy 2.6 reads it (`parse_line()` in
//! src/tools.c, `readcfgfile()` in src/cfgparse.c, doc/configuration.txt section 2.2 "Quoting and
//! escaping"), so that a check over the result sees the words HAProxy will see.
//!
//! Pure: text in, lines out. Nothing is run, read or expanded.
//!
//! - A line is split into words on unquoted, unescaped spaces and tabs. `#` outside quotes starts
//!   a comment, even in the middle of a word.
//! - Double quotes group a word; inside them backslash escapes and environment variables work.
//!   Single quotes group a word literally (no escape, no variable). Quotes may start or end in the
//!   middle of a word (`a"b c"d` is the one word `ab cd`); `""` is an empty word.
//! - Backslash, outside single quotes: `\ `, `\<tab>`, `\\`, `\"`, `\'`, `\#`, `\$` stand for the
//!   character; `\r`, `\n`, `\t` for the control character; `\xHH` for that byte. Any other
//!   backslash is kept as a character (`\1` in a regex stays `\1`), as HAProxy does.
//! - HAProxy 2.6 has no line continuation: a backslash at the end of a line is kept as a
//!   character. Someone who writes one almost certainly meant a continuation, so it is an error
//!   here rather than a silently different config. A `\x` escape that is not two hex digits, or
//!   that names a non-ASCII byte or NUL, is an error too (the word would not be text).
//! - Environment variables (`$NAME`, `${NAME}`, `${NAME-default}`, `${NAME[*]}`), outside single
//!   quotes, are expanded by HAProxy at load time. They are kept here as written and the word is
//!   flagged ([`Word::env`]): whoever checks the config cannot know what they hold.
//! - A line whose first word is a section keyword starts a section, whatever its indentation.
//! - `.if`/`.elif`/`.else`/`.endif` are checked for balance, and the lines of every branch are
//!   returned (flagged [`Line::conditional`]): which branch HAProxy takes depends on the host, so
//!   a check must hold for all of them. `.diag`/`.notice`/`.warning`/`.alert` only print, and are
//!   not returned. Any other word starting with `.` is an error, as in HAProxy.
//! - More than 64 words on a line is an error (HAProxy's `MAX_LINE_ARGS`), and so is a NUL, and
//!   a byte order mark at the start (HAProxy 2.6 does not skip it).

use std::fmt;

/// HAProxy refuses a line with more words than this (`MAX_LINE_ARGS`).
pub const MAX_WORDS: usize = 64;

/// The kind of section a line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// Before the first section keyword.
    None,
    Global,
    Defaults,
    Frontend,
    Backend,
    Listen,
    Peers,
    Resolvers,
    Userlist,
    Program,
    Ring,
    Cache,
    HttpErrors,
    Mailers,
    FcgiApp,
    CrtStore,
    LogForward,
    Traces,
    Acme,
    DynamicUpdate,
}

impl SectionKind {
    /// The section a keyword opens, if it is a section keyword.
    pub fn from_keyword(keyword: &str) -> Option<SectionKind> {
        Some(match keyword {
            "global" => SectionKind::Global,
            "defaults" => SectionKind::Defaults,
            "frontend" => SectionKind::Frontend,
            "backend" => SectionKind::Backend,
            "listen" => SectionKind::Listen,
            "peers" => SectionKind::Peers,
            "resolvers" => SectionKind::Resolvers,
            "userlist" => SectionKind::Userlist,
            "program" => SectionKind::Program,
            "ring" => SectionKind::Ring,
            "cache" => SectionKind::Cache,
            "http-errors" => SectionKind::HttpErrors,
            "mailers" => SectionKind::Mailers,
            "fcgi-app" => SectionKind::FcgiApp,
            "crt-store" => SectionKind::CrtStore,
            "log-forward" => SectionKind::LogForward,
            "traces" => SectionKind::Traces,
            "acme" => SectionKind::Acme,
            "dynamic-update" => SectionKind::DynamicUpdate,
            _ => return None,
        })
    }
}

/// One word of a line, unescaped and unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    /// The word as HAProxy sees it, except that environment variables are kept as written.
    pub text: String,
    /// Some of it was in single or double quotes.
    pub quoted: bool,
    /// Some of it came from a backslash escape.
    pub escaped: bool,
    /// It holds an environment variable HAProxy expands at load time (`$X`, `${X}`).
    pub env: bool,
}

/// One line that says something: its words, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based.
    pub number: usize,
    pub section: SectionKind,
    /// The section's name (its second word), as written.
    pub section_name: Option<String>,
    /// At least one word. A section keyword line is returned too, with its section.
    pub words: Vec<Word>,
    /// Inside an `.if` block (any branch).
    pub conditional: bool,
}

impl Line {
    /// The text of word `i`, if there is one.
    pub fn word(&self, i: usize) -> Option<&str> {
        self.words.get(i).map(|w| w.text.as_str())
    }
}

/// A line HAProxy would refuse, or that cannot be read with certainty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub message: String,
}

/// The lines of a config, or its first error.
pub fn parse(text: &str) -> Result<Vec<Line>, ParseError> {
    let (lines, mut errors) = parse_all(text);
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors.swap_remove(0))
    }
}

/// Every line that could be read, and every error (in line order). A line with an error is left
/// out; the lines around it are still read.
pub fn parse_all(text: &str) -> (Vec<Line>, Vec<ParseError>) {
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut section = SectionKind::None;
    let mut section_name: Option<String> = None;
    // One entry per open `.if`: its line and whether `.else` was seen.
    let mut conds: Vec<(usize, bool)> = Vec::new();
    // HAProxy 2.6 reads a byte order mark as part of the first word (`unknown keyword`).
    if text.starts_with('\u{feff}') {
        errors.push(ParseError {
            line: 1,
            message: "a byte order mark, which HAProxy reads as part of the first word; save \
                      the file as UTF-8 without one"
                .to_string(),
        });
    }
    for (i, raw) in text.split('\n').enumerate() {
        let number = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let words = match split_words(raw) {
            Ok(words) => words,
            Err(message) => {
                errors.push(ParseError {
                    line: number,
                    message,
                });
                continue;
            }
        };
        let Some(first) = words.first() else {
            continue;
        };
        if first.text.starts_with('.') {
            if let Err(message) = directive(&first.text, number, &mut conds) {
                errors.push(ParseError {
                    line: number,
                    message,
                });
            }
            continue;
        }
        if let Some(kind) = SectionKind::from_keyword(&first.text) {
            section = kind;
            section_name = words.get(1).map(|w| w.text.clone());
        }
        lines.push(Line {
            number,
            section,
            section_name: section_name.clone(),
            words,
            conditional: !conds.is_empty(),
        });
    }
    for (line, _) in conds {
        errors.push(ParseError {
            line,
            message: "`.if` without a matching `.endif`".to_string(),
        });
    }
    errors.sort_by_key(|e| e.line);
    (lines, errors)
}

/// A conditional-block or message directive.
fn directive(word: &str, number: usize, conds: &mut Vec<(usize, bool)>) -> Result<(), String> {
    match word {
        ".if" => conds.push((number, false)),
        ".elif" | ".else" => match conds.last_mut() {
            None => return Err(format!("`{word}` without a `.if`")),
            Some((_, true)) => return Err(format!("`{word}` after `.else`")),
            Some((_, seen_else)) => *seen_else = word == ".else",
        },
        ".endif" => {
            if conds.pop().is_none() {
                return Err("`.endif` without a `.if`".to_string());
            }
        }
        ".diag" | ".notice" | ".warning" | ".alert" => {}
        _ => return Err(format!("unknown directive `{word}`")),
    }
    Ok(())
}

#[derive(Default)]
struct WordBuilder {
    text: String,
    quoted: bool,
    escaped: bool,
    env: bool,
}

impl WordBuilder {
    fn finish(self) -> Word {
        Word {
            text: self.text,
            quoted: self.quoted,
            escaped: self.escaped,
            env: self.env,
        }
    }
}

/// The words of one line (without its line break).
pub fn split_words(line: &str) -> Result<Vec<Word>, String> {
    let chars: Vec<char> = line.chars().collect();
    let mut words = Vec::new();
    let mut cur: Option<WordBuilder> = None;
    let mut squote = false;
    let mut dquote = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\0' {
            return Err("a NUL character".to_string());
        }
        if squote {
            if c == '\'' {
                squote = false;
            } else {
                cur.get_or_insert_with(Default::default).text.push(c);
            }
            i += 1;
            continue;
        }
        match c {
            '"' => {
                dquote = !dquote;
                cur.get_or_insert_with(Default::default).quoted = true;
                i += 1;
            }
            ' ' | '\t' if !dquote => {
                if let Some(w) = cur.take() {
                    words.push(w.finish());
                }
                i += 1;
            }
            '#' if !dquote => break,
            '\'' if !dquote => {
                squote = true;
                cur.get_or_insert_with(Default::default).quoted = true;
                i += 1;
            }
            '\\' => {
                let w = cur.get_or_insert_with(Default::default);
                i += escape(&chars, i, w)?;
            }
            '$' => {
                let w = cur.get_or_insert_with(Default::default);
                i += variable(&chars, i, w)?;
            }
            _ => {
                cur.get_or_insert_with(Default::default).text.push(c);
                i += 1;
            }
        }
    }
    if squote || dquote {
        return Err(format!(
            "unmatched {} quote",
            if squote { "single" } else { "double" }
        ));
    }
    if let Some(w) = cur.take() {
        words.push(w.finish());
    }
    if words.len() > MAX_WORDS {
        return Err(format!(
            "{} words, more than HAProxy's {MAX_WORDS}",
            words.len()
        ));
    }
    Ok(words)
}

/// A backslash at `chars[i]`: appends what it stands for, returns how many chars it took.
fn escape(chars: &[char], i: usize, w: &mut WordBuilder) -> Result<usize, String> {
    let Some(&next) = chars.get(i + 1) else {
        return Err(
            "a backslash at the end of the line: HAProxy has no line continuation (it would keep \
             the backslash as a character); join the lines, or write `\\\\` for a backslash"
                .to_string(),
        );
    };
    let (c, len) = match next {
        ' ' | '\t' | '\\' | '"' | '\'' | '#' | '$' => (next, 2),
        'r' => ('\r', 2),
        'n' => ('\n', 2),
        't' => ('\t', 2),
        'x' => {
            let hex: String = chars.iter().skip(i + 2).take(2).collect();
            let byte = (hex.len() == 2)
                .then(|| u8::from_str_radix(&hex, 16).ok())
                .flatten()
                .filter(|b| *b != 0 && b.is_ascii())
                .ok_or_else(|| {
                    format!(
                        "`\\x{hex}` is not a \\x escape of a non-NUL ASCII byte (two hex digits)"
                    )
                })?;
            (char::from(byte), 4)
        }
        // HAProxy keeps any other backslash (regex back-references such as `\1`).
        _ => {
            w.text.push('\\');
            return Ok(1);
        }
    };
    w.text.push(c);
    w.escaped = true;
    Ok(len)
}

/// A `$` at `chars[i]`: appends the variable as written (or a lone `$`), returns its length.
fn variable(chars: &[char], i: usize, w: &mut WordBuilder) -> Result<usize, String> {
    match chars.get(i + 1) {
        Some('{') => {
            let Some(end) = chars[i + 2..].iter().position(|&c| c == '}') else {
                return Err("`${` without a closing `}`".to_string());
            };
            let len = end + 3;
            w.text.extend(&chars[i..i + len]);
            w.env = true;
            Ok(len)
        }
        Some(c) if c.is_ascii_alphanumeric() || *c == '_' => {
            let name = chars[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                .count();
            w.text.extend(&chars[i..=i + name]);
            w.env = true;
            Ok(name + 1)
        }
        _ => {
            w.text.push('$');
            Ok(1)
        }
    }
}

impl fmt::Display for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn texts(line: &str) -> Vec<String> {
        split_words(line)
            .unwrap()
            .into_iter()
            .map(|w| w.text)
            .collect()
    }

    #[test]
    fn words_split_on_spaces_and_tabs() {
        assert_eq!(
            texts("  bind\t127.0.0.1:80   ssl "),
            ["bind", "127.0.0.1:80", "ssl"]
        );
        assert!(texts("   ").is_empty());
        assert!(texts("").is_empty());
    }

    #[test]
    fn comments_start_at_an_unquoted_hash() {
        assert_eq!(texts("a b # c d"), ["a", "b"]);
        assert_eq!(texts("a b#c"), ["a", "b"]);
        assert_eq!(texts("a \"b # c\" d"), ["a", "b # c", "d"]);
        assert_eq!(texts("a 'b # c' d"), ["a", "b # c", "d"]);
        assert_eq!(texts(r"a b\#c"), ["a", "b#c"]);
        assert!(texts("# only a comment").is_empty());
    }

    #[test]
    fn quotes_group_and_may_be_mid_word() {
        assert_eq!(texts(r#"a"b c"d"#), ["ab cd"]);
        assert_eq!(texts(r#"x "" y"#), ["x", "", "y"]);
        assert_eq!(texts(r#"'a\nb' "a\nb""#), [r"a\nb", "a\nb"]);
        assert_eq!(texts(r#""a\"b" 'it''s'"#), ["a\"b", "its"]);
        assert_eq!(texts(r#"'say "hi"'"#), ["say \"hi\""]);
        let w = &split_words(r#""lua-load" x"#).unwrap()[0];
        assert!(w.quoted && w.text == "lua-load");
    }

    #[test]
    fn backslash_escapes_outside_quotes() {
        assert_eq!(texts(r"a\ b c"), ["a b", "c"]);
        assert_eq!(texts(r"a\\b \'x\' \$HOME"), [r"a\b", "'x'", "$HOME"]);
        assert_eq!(texts(r"\x2fetc\x2fpasswd"), ["/etc/passwd"]);
        // Unknown escapes keep their backslash (regex back-references).
        assert_eq!(
            texts(r"replace-path (.*) /x\1 lua\-load"),
            ["replace-path", "(.*)", r"/x\1", r"lua\-load"]
        );
        let w = &split_words(r"\$HOME").unwrap()[0];
        assert!(!w.env && w.escaped);
    }

    #[test]
    fn variables_are_kept_and_flagged() {
        let ws = split_words(r#"a $HOME/x "${DIR}/y" '$NOT' b$ ${X-def}"#).unwrap();
        let got: Vec<(&str, bool)> = ws.iter().map(|w| (w.text.as_str(), w.env)).collect();
        assert_eq!(
            got,
            [
                ("a", false),
                ("$HOME/x", true),
                ("${DIR}/y", true),
                ("$NOT", false),
                ("b$", false),
                ("${X-def}", true)
            ]
        );
    }

    #[test]
    fn what_cannot_be_read_is_an_error() {
        for bad in [
            r#"a "b"#,
            "a 'b",
            r"bind :80 \",
            "${HOME",
            r"\xZZ",
            r"\x0",
            r"\x80",
            r"\x00",
            "a\0b",
        ] {
            assert!(split_words(bad).is_err(), "{bad:?}");
        }
        let many = vec!["w"; MAX_WORDS + 1].join(" ");
        assert!(split_words(&many).is_err());
        assert!(split_words(&vec!["w"; MAX_WORDS].join(" ")).is_ok());
    }

    #[test]
    fn sections_at_any_indentation() {
        let cfg = "# c\nglobal\n  log stdout local0\n  frontend fe\n bind :80\nbackend be\n\
                   server s 1.2.3.4:80\n";
        let lines = parse(cfg).unwrap();
        let got: Vec<(usize, SectionKind, Option<&str>, &str)> = lines
            .iter()
            .map(|l| {
                (
                    l.number,
                    l.section,
                    l.section_name.as_deref(),
                    l.word(0).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (2, SectionKind::Global, None, "global"),
                (3, SectionKind::Global, None, "log"),
                (4, SectionKind::Frontend, Some("fe"), "frontend"),
                (5, SectionKind::Frontend, Some("fe"), "bind"),
                (6, SectionKind::Backend, Some("be"), "backend"),
                (7, SectionKind::Backend, Some("be"), "server"),
            ]
        );
    }

    #[test]
    fn conditional_blocks_return_every_branch() {
        let cfg = "global\n.if 0\n  lua-load /a.lua\n.elif defined(X)\n  b\n.else\n  c\n.endif\n\
                   .diag \"hi\"\nd\n";
        let lines = parse(cfg).unwrap();
        let got: Vec<(usize, &str, bool)> = lines
            .iter()
            .map(|l| (l.number, l.word(0).unwrap(), l.conditional))
            .collect();
        assert_eq!(
            got,
            [
                (1, "global", false),
                (3, "lua-load", true),
                (5, "b", true),
                (7, "c", true),
                (10, "d", false)
            ]
        );
    }

    #[test]
    fn unbalanced_conditionals_are_errors() {
        let cases: &[(&str, usize)] = &[
            (".if 1\na\n", 1),
            ("a\n.endif\n", 2),
            (".else\n", 1),
            (".if 1\n.else\n.elif 1\n.endif\n", 3),
            (".if 1\n.else\n.else\n.endif\n", 3),
            ("a\n.include x\n", 2),
        ];
        for (cfg, line) in cases {
            let (_, errors) = parse_all(cfg);
            assert_eq!(
                errors.iter().map(|e| e.line).collect::<Vec<_>>(),
                [*line],
                "{cfg:?}"
            );
        }
    }

    #[test]
    fn errors_name_their_line_and_do_not_stop_the_rest() {
        let (lines, errors) = parse_all("global\n  a \"b\n  c\n  d 'e\r\n");
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(lines.iter().map(|l| l.number).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(
            parse("x\n\"").unwrap_err().to_string(),
            "line 2: unmatched double quote"
        );
    }

    #[test]
    fn crlf_and_unicode() {
        let lines = parse("global\r\n  description \"héllo wörld ✓\"\r\n").unwrap();
        assert_eq!(lines[1].word(1), Some("héllo wörld ✓"));
        assert_eq!(parse("\u{feff}global\n").unwrap_err().line, 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn never_panics_on_any_text(text in "\\PC*") {
            let _ = parse_all(&text);
        }

        #[test]
        fn never_panics_on_structured_garbage(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("\\".to_string()), Just("\"".to_string()), Just("'".to_string()),
                    Just("#".to_string()), Just("$".to_string()), Just("${".to_string()),
                    Just("}".to_string()), Just("\\x".to_string()), Just(" ".to_string()),
                    Just("\n".to_string()), Just(".if 1".to_string()), Just(".endif".to_string()),
                    Just("frontend".to_string()), Just("\t".to_string()), Just("\r".to_string()),
                    "[a-z0-9/é✓]{0,4}",
                ],
                0..40,
            )
        ) {
            let text = parts.concat();
            let (lines, errors) = parse_all(&text);
            for l in &lines {
                prop_assert!(!l.words.is_empty());
                prop_assert!(l.number >= 1);
            }
            for e in &errors {
                prop_assert!(e.line >= 1);
            }
        }
    }
}
