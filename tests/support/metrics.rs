//! The agent's `/metrics` and `/healthz` (`metrics.listen`, which [`super::AgentConfig::new`] sets to a
//! free port): a scrape, parsed by a strict OpenMetrics text parser ([`Scrape::parse`]).

use std::collections::BTreeMap;
use std::time::Duration;

use super::http::{http_request, Response};

/// The `Content-Type` the agent must serve `/metrics` with.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One family: its `# TYPE`, `# HELP` and samples.
#[derive(Debug, Clone, Default)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` answer.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub families: Vec<Family>,
}

impl Scrape {
    /// Parses OpenMetrics text strictly: every family has `# TYPE` before its samples and a
    /// `# HELP`, no family appears twice, every sample's name is its family's name with a suffix
    /// its type allows, labels are well quoted, values are numbers, and the text ends with
    /// `# EOF` and a newline, with nothing after it.
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let body = text
            .strip_suffix("# EOF\n")
            .ok_or_else(|| "does not end with `# EOF\\n`".to_owned())?;
        let mut families: Vec<Family> = Vec::new();
        for (n, line) in body.lines().enumerate() {
            let at = |why: String| format!("line {}: {why}: {line:?}", n + 1);
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let (keyword, name, tail) = (words.next(), words.next(), words.next());
                let name = name.ok_or_else(|| at("a comment without a metric name".into()))?;
                match keyword {
                    Some("TYPE") => {
                        // HELP may have opened the family; a second TYPE may not.
                        let opened = families.last().is_some_and(|f| {
                            f.name == name && f.kind.is_empty() && f.samples.is_empty()
                        });
                        let help = if opened {
                            families.pop().and_then(|f| f.help)
                        } else if families.iter().any(|f| f.name == name) {
                            return Err(at(format!("family {name} appears twice")));
                        } else {
                            None
                        };
                        let kind = tail.ok_or_else(|| at("TYPE without a type".into()))?;
                        const KINDS: [&str; 8] = [
                            "counter",
                            "gauge",
                            "histogram",
                            "gaugehistogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown",
                        ];
                        if !KINDS.contains(&kind) {
                            return Err(at(format!("unknown type {kind}")));
                        }
                        families.push(Family {
                            name: name.to_owned(),
                            kind: kind.to_owned(),
                            help,
                            ..Family::default()
                        });
                    }
                    Some("HELP") | Some("UNIT") => {
                        // HELP may come before TYPE: it opens the family then.
                        if families.last().is_none_or(|f| f.name != name) {
                            if families.iter().any(|f| f.name == name) {
                                return Err(at(format!("family {name} appears twice")));
                            }
                            families.push(Family {
                                name: name.to_owned(),
                                ..Family::default()
                            });
                        }
                        if keyword == Some("HELP") {
                            if let Some(f) = families.last_mut() {
                                f.help = Some(tail.unwrap_or_default().to_owned());
                            }
                        }
                    }
                    _ => return Err(at("an unknown comment".into())),
                }
                continue;
            }
            let sample = parse_sample(line).map_err(at)?;
            let family = families
                .last_mut()
                .ok_or_else(|| at("a sample before any family".into()))?;
            let suffixes: &[&str] = match family.kind.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_count", "_sum", "_created"],
                "info" => &["_info"],
                "" => return Err(at(format!("family {} has no TYPE", family.name))),
                _ => &[""],
            };
            if !suffixes
                .iter()
                .any(|s| sample.name == format!("{}{s}", family.name))
            {
                return Err(at(format!(
                    "sample {} does not belong to family {} ({})",
                    sample.name, family.name, family.kind
                )));
            }
            family.samples.push(sample);
        }
        for f in &families {
            if f.kind.is_empty() {
                return Err(format!("family {} has no TYPE", f.name));
            }
            if f.help.is_none() {
                return Err(format!("family {} has no HELP", f.name));
            }
        }
        Ok(Scrape { families })
    }

    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The value of sample `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
    }

    /// [`value`](Self::value), 0 when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| "a sample without a value".to_owned())?;
    let name = &line[..name_end];
    let valid_name = name.chars().enumerate().all(|(i, c)| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
    });
    if name.is_empty() || !valid_name {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end;
        loop {
            let (start, c) = chars.next().ok_or("unclosed label set")?;
            if c == '}' {
                end = start;
                break;
            }
            if c == ',' {
                continue;
            }
            let eq = inner[start..].find('=').ok_or("a label without `=`")? + start;
            let key = &inner[start..eq];
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name {key:?}"));
            }
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} is not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape in label {key}: {other:?}")),
                    },
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated value of label {key}")),
                }
            }
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
        }
        rest = &inner[end + 1..];
    }
    let mut words = rest
        .strip_prefix(' ')
        .ok_or("no space before the value")?
        .split(' ');
    let value = words.next().ok_or("no value")?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|e| format!("bad value {v:?}: {e}"))?,
    };
    if let Some(ts) = words.next() {
        ts.parse::<f64>()
            .map_err(|e| format!("bad timestamp {ts:?}: {e}"))?;
    }
    if words.next().is_some() {
        return Err("trailing words after the value".to_owned());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `GET path` on the agent's metrics port.
pub async fn get(port: u16, path: &str, timeout: Duration) -> Response {
    http_request(port, path, true, timeout)
        .await
        .unwrap_or_else(|e| panic!("GET http://127.0.0.1:{port}{path}: {e}"))
}

/// `GET /metrics`: must be 200 with the OpenMetrics content type and parse.
pub async fn scrape(port: u16, timeout: Duration) -> Scrape {
    let response = get(port, "/metrics", timeout).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.header("content-type"),
        Some(OPENMETRICS),
        "{response:?}"
    );
    Scrape::parse(&response.body).unwrap_or_else(|e| {
        panic!(
            "/metrics is not valid OpenMetrics text: {e}\n{}",
            response.body
        )
    })
}
