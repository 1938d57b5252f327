//! Configuration errors worded for the operator: which file, which line, which key, what is
//! wrong and what would be accepted.

use std::fmt;

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `<embedded default config>`).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted key path such as `upstreams[1].weight`; empty for the file as a whole.
    pub key: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl ConfigError {
    pub(super) fn unreadable(file: &str, error: std::io::Error) -> Self {
        ConfigError {
            file: file.to_string(),
            line: None,
            key: String::new(),
            message: format!("cannot read the configuration file: {error}"),
        }
    }

    pub(super) fn from_serde(
        file: &str,
        text: &str,
        error: serde_path_to_error::Error<serde_yaml::Error>,
    ) -> Self {
        let path = error.path().to_string();
        let mut key = if path == "." { String::new() } else { path };
        let inner = error.into_inner();
        let mut message = inner.to_string();
        // serde_yaml appends the position and prefixes its own path: both are given apart.
        if let Some(cut) = message.find(" at line ") {
            message.truncate(cut);
        }
        if let Some((prefix, rest)) = message.split_once(": ") {
            if !prefix.contains(' ') && !prefix.contains('`') {
                message = rest.to_string();
            }
        }
        // serde reports a duplicate at its mapping; the second occurrence is the one to fix.
        let duplicate = message
            .strip_prefix("duplicate field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(field, _)| field.to_string());
        let line = match duplicate {
            Some(field) => {
                key = if key.is_empty() {
                    field
                } else {
                    format!("{key}.{field}")
                };
                message = "is given twice; keep one".to_string();
                locate_nth_key(text, &key, 1).or(inner.location().map(|l| l.line()))
            }
            // serde_yaml places errors raised while checking a value at the start of the
            // enclosing mapping; the key's own line, when found, is more precise.
            None => match (inner.location().map(|l| l.line()), locate_key(text, &key)) {
                (Some(reported), Some(found)) => Some(reported.max(found)),
                (reported, found) => reported.or(found),
            },
        };
        ConfigError {
            file: file.to_string(),
            line,
            key,
            message,
        }
    }

    pub(super) fn at_line(file: &str, line: usize, message: String) -> Self {
        ConfigError {
            file: file.to_string(),
            line: Some(line),
            key: String::new(),
            message,
        }
    }

    pub(super) fn at_key(file: &str, text: &str, key: String, message: String) -> Self {
        ConfigError {
            file: file.to_string(),
            line: locate_key(text, &key),
            key,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": key `{}`: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// One step of a key path: a mapping key or a sequence index.
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, indices) = part.split_once('[').unwrap_or((part, ""));
        if !name.is_empty() {
            out.push(Segment::Key(name));
        }
        for index in indices.split('[') {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                out.push(Segment::Index(i));
            }
        }
    }
    out
}

/// Finds the 1-based line of a key path in block-style YAML, for errors found after parsing.
/// Flow-style collections are not descended into: the deepest key found is returned.
fn locate_key(text: &str, path: &str) -> Option<usize> {
    locate_nth_key(text, path, 0)
}

/// [locate_key], taking the `nth` (0-based) occurrence of the last key among its siblings.
fn locate_nth_key(text: &str, path: &str, nth: usize) -> Option<usize> {
    let segments = segments(path);
    let last = segments.len().saturating_sub(1);
    let lines: Vec<(usize, &str)> = text
        .lines()
        .map(|l| {
            let content = l.trim_start();
            (l.len() - content.len(), content)
        })
        .collect();
    let significant = |n: usize| !lines[n].1.is_empty() && !lines[n].1.starts_with('#');
    // The parent found so far: its line and the indentation its children are deeper than.
    let mut parent: Option<(usize, usize)> = None;
    let mut found = None;
    for (depth, segment) in segments.into_iter().enumerate() {
        let skip = if depth == last { nth } else { 0 };
        let first = parent.map_or(0, |(n, _)| n);
        let mut children = Vec::new();
        for n in (first..lines.len()).filter(|&n| significant(n)) {
            let (indent, content) = lines[n];
            if let Some((parent_line, parent_indent)) = parent {
                if n == parent_line {
                    // A sequence item's line also holds the item's first key, after "- ".
                    if let (Segment::Key(_), Some(rest)) = (&segment, content.strip_prefix("- ")) {
                        children.push((n, indent + 2, rest));
                    }
                    continue;
                }
                if indent <= parent_indent {
                    break;
                }
            }
            children.push((n, indent, content));
        }
        let Some(block_indent) = children.first().map(|c| c.1) else {
            return found;
        };
        let at_block_level = children.into_iter().filter(|c| c.1 == block_indent);
        let hit = match segment {
            Segment::Key(key) => at_block_level
                .filter(|(_, _, content)| {
                    content
                        .split_once(':')
                        .is_some_and(|(k, _)| k.trim().trim_matches(['"', '\'']) == key)
                })
                .nth(skip),
            Segment::Index(i) => at_block_level.filter(|c| c.2.starts_with('-')).nth(i),
        };
        let Some((n, indent, _)) = hit else {
            return found;
        };
        found = Some(n + 1);
        parent = Some((n, indent));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::locate_key;

    const TEXT: &str = "\
listeners:
  - 127.0.0.1:1
upstreams:
  - address: a:1
    weight: 2
  - address: b:1
    # comment
    weight: 3
health_check:
  kind: http
";

    #[test]
    fn finds_nested_keys() {
        assert_eq!(locate_key(TEXT, "upstreams[1].weight"), Some(8));
        assert_eq!(locate_key(TEXT, "upstreams[1].address"), Some(6));
        assert_eq!(locate_key(TEXT, "upstreams[0].weight"), Some(5));
        assert_eq!(locate_key(TEXT, "health_check.kind"), Some(10));
        assert_eq!(locate_key(TEXT, "listeners[0]"), Some(2));
    }

    #[test]
    fn falls_back_to_the_deepest_known_key() {
        assert_eq!(locate_key(TEXT, "health_check.path"), Some(9));
        assert_eq!(locate_key(TEXT, "nothing"), None);
    }
}
