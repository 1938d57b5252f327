//! The shape of the source tree, checked so that it stays a house a maintainer can live in:
//! modules import one way (no cycles), functions stay short, and `unsafe` lives in one
//! module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest function accepted in `src/`, in lines from `fn` to its closing brace.
const MAX_FUNCTION_LINES: usize = 70;

/// The only module allowed `unsafe`.
const UNSAFE_MODULE: &str = "system";

/// Every `.rs` file under `src/` but the binary's and the library's roots, with its module
/// path (`upstreams::health` for `src/upstreams/health.rs`) and its text without the unit
/// tests at its end.
fn modules() -> Vec<(String, PathBuf, String)> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .filter(|f| !f.ends_with("src/main.rs") && !f.ends_with("src/lib.rs"))
        .map(|file| {
            let relative = file.strip_prefix(&src).unwrap().with_extension("");
            let name = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("::");
            let text = std::fs::read_to_string(&file).unwrap();
            let code = match text.find("#[cfg(test)]") {
                Some(tests) => text[..tests].to_string(),
                None => text,
            };
            (name, file, code)
        })
        .collect()
}

/// The code of a line: no comment, and string and character literals emptied, so that
/// braces and words inside them do not count.
fn code_of(line: &str) -> String {
    let mut code = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
                code.push_str("\"\"");
            }
            '\'' if matches!(chars.clone().nth(1), Some('\'')) => {
                chars.nth(1);
                code.push_str("' '");
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => code.push(c),
        }
    }
    code
}

/// The modules `code` (of module `name`) refers to: `crate::a::b` paths, `super::`, and a
/// parent's own `child::` paths, each resolved to the longest known module path.
fn references(name: &str, code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let parent = name.rsplit_once("::").map(|(p, _)| p.to_string());
    let mut found = BTreeSet::new();
    let mut resolve = |path: &str| {
        let segments: Vec<&str> = path.split("::").collect();
        for length in (1..=segments.len()).rev() {
            let candidate = segments[..length].join("::");
            if candidate == name {
                return;
            }
            if known.contains(&candidate) {
                found.insert(candidate);
                return;
            }
        }
    };
    for line in code.lines().map(code_of) {
        let words = line.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'));
        for word in words.filter(|w| !w.is_empty()) {
            if let Some(path) = word.strip_prefix("crate::") {
                resolve(path);
            } else if let Some(path) = word.strip_prefix("super::") {
                if let Some(parent) = &parent {
                    resolve(&format!("{parent}::{path}"));
                }
            } else if word.contains("::") {
                resolve(&format!("{name}::{word}"));
            }
        }
    }
    found
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn graph_of(modules: &[(String, PathBuf, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let known: BTreeSet<String> = modules.iter().map(|(n, _, _)| n.clone()).collect();
    modules
        .iter()
        .map(|(name, _, code)| (name.clone(), references(name, code, &known)))
        .collect()
}

#[test]
fn modules_import_one_way() {
    let modules = modules();
    let graph = graph_of(&modules);
    assert!(graph.len() > 10, "too few modules found: {graph:?}");
    // The checker sees a cycle where there is one.
    let mut broken = graph.clone();
    broken
        .get_mut("metrics")
        .unwrap()
        .insert("proxy".to_string());
    assert!(find_cycle(&broken).is_some(), "{broken:?}");

    assert_eq!(
        find_cycle(&graph),
        None,
        "modules import each other: {graph:#?}"
    );
}

#[test]
fn metrics_is_a_leaf() {
    let graph = graph_of(&modules());
    // References are seen: the proxy counts with metrics, health is a child of upstreams.
    assert!(graph["proxy"].contains("metrics"), "{graph:#?}");
    assert!(
        graph["upstreams"].contains("upstreams::health"),
        "{graph:#?}"
    );
    assert_eq!(graph["metrics"], BTreeSet::new());
    assert_eq!(graph["traffic"], BTreeSet::new());
}

/// Each function of `code` with its first line (1-based) and length in lines.
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<String> = code.lines().map(code_of).collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(name) = [
            "fn ",
            "pub fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) fn ",
        ]
        .iter()
        .find_map(|prefix| trimmed.strip_prefix(prefix)) else {
            continue;
        };
        let name: String = name
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let mut depth = 0usize;
        let mut opened = false;
        'lines: for (end, line) in lines.iter().enumerate().skip(start) {
            for c in line.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened => break 'lines,
                    _ => {}
                }
                if opened && depth == 0 {
                    found.push((name.clone(), start + 1, end - start + 1));
                    break 'lines;
                }
            }
        }
    }
    found
}

#[test]
fn functions_are_short() {
    let long_one = format!(
        "fn long() {{\n{}}}\nfn short() -> &'static str {{ \"}}\" }}\n",
        "    step();\n".repeat(MAX_FUNCTION_LINES)
    );
    assert_eq!(
        functions(&long_one),
        [
            ("long".to_string(), 1, MAX_FUNCTION_LINES + 2),
            ("short".to_string(), MAX_FUNCTION_LINES + 3, 1)
        ]
    );
    let mut too_long = Vec::new();
    for (_, file, code) in modules() {
        for (name, line, length) in functions(&code) {
            if length > MAX_FUNCTION_LINES {
                too_long.push(format!(
                    "{}:{line}: {name} ({length} lines)",
                    file.display()
                ));
            }
        }
    }
    assert!(
        too_long.is_empty(),
        "split these along their steps: {too_long:#?}"
    );
}

#[test]
fn unsafe_lives_in_one_module() {
    let mut outside = Vec::new();
    for (name, file, _) in modules() {
        let text = std::fs::read_to_string(&file).unwrap();
        let uses_unsafe = text
            .lines()
            .map(code_of)
            .any(|line| line.contains("unsafe ") || line.contains("allow(unsafe_code)"));
        if uses_unsafe && name != UNSAFE_MODULE {
            outside.push(file.display().to_string());
        }
    }
    assert!(
        outside.is_empty(),
        "unsafe outside `{UNSAFE_MODULE}`: {outside:?}"
    );
    let manifest = include_str!("../Cargo.toml");
    assert!(
        manifest.contains("unsafe_code = \"deny\""),
        "Cargo.toml's [lints] must deny unsafe_code"
    );
}
