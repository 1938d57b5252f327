//! Every numeric and duration key is bounded. The keys are discovered from the
//! configuration schema itself (the parser's own "expected one of" lists), so a key added
//! later is covered without editing this test.

use pingora_lb::config::{Config, MAX_FILE_SIZE};
use serde_yaml::{Mapping, Value};

const BASE: &str = "listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n";
const PROBE: &str = "zz_probe";

fn base() -> Value {
    serde_yaml::from_str(BASE).unwrap()
}

/// One step into the configuration: a mapping key, or the first item of a list.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    First,
}

fn path_name(path: &[Step]) -> String {
    let mut name = String::new();
    for step in path {
        match step {
            Step::Key(k) if name.is_empty() => name.push_str(k),
            Step::Key(k) => name.push_str(&format!(".{k}")),
            Step::First => name.push_str("[0]"),
        }
    }
    name
}

/// `base` with `value` placed at `path`, creating mappings and keeping what is there.
fn with(mut config: Value, path: &[Step], value: Value) -> Value {
    let mut at = &mut config;
    for step in path {
        at = match step {
            Step::Key(k) => {
                if !at.is_mapping() {
                    *at = Value::Mapping(Mapping::new());
                }
                at.as_mapping_mut()
                    .unwrap()
                    .entry(Value::from(k.as_str()))
                    .or_insert(Value::Null)
            }
            Step::First => {
                if !at.is_sequence() {
                    *at = Value::Sequence(vec![Value::Mapping(Mapping::new())]);
                }
                &mut at.as_sequence_mut().unwrap()[0]
            }
        };
    }
    *at = value;
    config
}

/// Stands for a number no YAML value type holds; replaced in the text.
const TOO_BIG: &str = "TOO_BIG_FOR_U64";

fn parse(config: &Value) -> Result<Config, String> {
    let text = serde_yaml::to_string(config)
        .unwrap()
        .replace(TOO_BIG, "18446744073709551616");
    Config::parse("probe.yaml", &text).map_err(|e| e.to_string())
}

/// The field names the parser expects where it met the probe key, if it met it there.
fn expected_fields(error: &str) -> Option<Vec<String>> {
    let rest = error
        .split_once(&format!("unknown field `{PROBE}`, expected"))?
        .1;
    Some(
        rest.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

fn probe_mapping() -> Value {
    let mut probe = Mapping::new();
    probe.insert(PROBE.into(), 1.into());
    Value::Mapping(probe)
}

/// Walks the schema from `path`; collects leaf keys.
fn discover(path: Vec<Step>, leaves: &mut Vec<Vec<Step>>) {
    // A mapping that already holds required keys (an upstream's address) keeps them.
    let existing = path
        .iter()
        .try_fold(&base(), |v, step| match step {
            Step::Key(k) => v.get(k.as_str()),
            Step::First => v.get(0),
        })
        .cloned();
    let mut mapping = match existing {
        Some(Value::Mapping(m)) => m,
        _ => Mapping::new(),
    };
    mapping.insert(PROBE.into(), 1.into());
    let as_struct = parse(&with(base(), &path, Value::Mapping(mapping))).unwrap_err();
    if let Some(fields) = expected_fields(&as_struct) {
        for field in fields {
            let mut child = path.clone();
            child.push(Step::Key(field));
            discover(child, leaves);
        }
        return;
    }
    let as_list = parse(&with(base(), &path, Value::Sequence(vec![probe_mapping()])));
    if let Err(e) = &as_list {
        if expected_fields(e).is_some() && !path.is_empty() {
            let mut child = path.clone();
            child.push(Step::First);
            discover(child, leaves);
            return;
        }
    }
    leaves.push(path);
}

enum Kind {
    Number,
    Duration,
    Other,
}

fn kind(path: &[Step]) -> Kind {
    match parse(&with(base(), path, Value::from(-1))) {
        Err(e) if e.contains("out of range") => Kind::Number,
        Err(e) if e.contains("duration") => Kind::Duration,
        _ => Kind::Other,
    }
}

#[test]
fn every_numeric_and_duration_key_is_bounded() {
    let mut leaves = Vec::new();
    discover(Vec::new(), &mut leaves);
    let names: Vec<String> = leaves.iter().map(|p| path_name(p)).collect();
    // The walk must reach the nested keys, or it proves nothing.
    for known in [
        "threads",
        "upstreams[0].weight",
        "health_check.interval",
        "timeouts.read",
    ] {
        assert!(
            names.iter().any(|n| n == known),
            "{known} not found in {names:?}"
        );
    }
    let (mut numbers, mut durations) = (0, 0);
    for path in &leaves {
        let name = path_name(path);
        let values: &[Value] = match kind(path) {
            Kind::Other => continue,
            Kind::Number => {
                numbers += 1;
                &[
                    Value::from(-1),
                    Value::from(u64::MAX),
                    Value::from(TOO_BIG),
                    Value::from(i64::MIN),
                ]
            }
            Kind::Duration => {
                durations += 1;
                &[
                    Value::from(0),
                    Value::from(-1),
                    Value::from(u64::MAX),
                    Value::from("18446744073709551615s"),
                    Value::from("18446744073709551616ms"),
                    Value::from("2305843009213693952s"),
                    Value::from("25h"),
                ]
            }
        };
        for value in values {
            let error = parse(&with(base(), path, value.clone()))
                .err()
                .unwrap_or_else(|| panic!("{name}: {value:?} was accepted"));
            assert!(
                error.contains(&format!("key `{name}`")),
                "{name}: {value:?}: {error}"
            );
            assert!(
                error.contains("between"),
                "{name}: {value:?}: the error must say the accepted range: {error}"
            );
        }
        // Zero is either a meaningful value or rejected with the range.
        if let Err(error) = parse(&with(base(), path, Value::from(0))) {
            assert!(error.contains("between"), "{name}: 0: {error}");
        }
    }
    assert!(
        numbers >= 8,
        "only {numbers} numeric keys found in {names:?}"
    );
    assert!(
        durations >= 5,
        "only {durations} duration keys found in {names:?}"
    );
}

#[test]
fn duplicate_keys_are_reported_at_the_duplicate() {
    let table = [
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\nretries: 1\nretries: 2\n", 5, "key `retries"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\nhealth_check:\n  interval: 1s\n  kind: tcp\n  interval: 2s\n", 7, "key `health_check.interval"),
        ("listeners: [\"127.0.0.1:1\"]\nupstreams:\n  - address: 127.0.0.1:2\n    weight: 1\n    weight: 2\n", 5, "key `upstreams[0].weight"),
    ];
    for (text, line, key) in table {
        let error = Config::parse("dup.yaml", text).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("dup.yaml:{line}:")),
            "{text}\n{error}"
        );
        assert!(
            error.contains(&format!("{key}`: is given twice")),
            "{error}"
        );
    }
}

#[test]
fn list_lengths_are_bounded() {
    let many: String = (0..10_001)
        .map(|i| {
            format!(
                "  - address: 10.{}.{}.{}:80\n",
                i / 65536,
                i / 256 % 256,
                i % 256
            )
        })
        .collect();
    let error = Config::parse(
        "big.yaml",
        &format!("listeners: [\"127.0.0.1:1\"]\nupstreams:\n{many}"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("key `upstreams`") && error.contains("at most 10000"),
        "{error}"
    );
    let listeners: Vec<String> = (1..=64).map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let error = Config::parse(
        "big.yaml",
        &format!(
            "listeners: [{}]\nupstreams:\n  - address: 127.0.0.1:2\n",
            listeners.join(", ")
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("key `listeners`") && error.contains("at most 63"),
        "{error}"
    );
}

#[test]
fn a_file_larger_than_the_limit_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.yaml");
    let mut text = BASE.to_string();
    while text.len() as u64 <= MAX_FILE_SIZE {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&path, text).unwrap();
    let error = Config::load(&path).unwrap_err().to_string();
    assert!(error.contains("larger than 1024 KiB"), "{error}");
    let error = Config::load(std::path::Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("larger than"), "{error}");
}

#[test]
fn deep_nesting_is_refused_quickly() {
    // Bounded by the file size, the deepest nesting a file can hold.
    let depth = (MAX_FILE_SIZE / 4) as usize;
    for text in [
        format!("listeners: {}{}", "[".repeat(depth), "]".repeat(depth)),
        format!("listeners: {}", "[".repeat(depth * 3)),
        format!("upstreams: {}", "- ".repeat(depth)),
        format!("listeners: {}1", "{a: ".repeat(depth / 2)),
        format!("listeners: [a 'b, {}", "[".repeat(depth)),
    ] {
        let started = std::time::Instant::now();
        let error = Config::parse("deep.yaml", &text).unwrap_err().to_string();
        assert!(error.starts_with("deep.yaml"), "{error}");
        // A guard against a hang, not a speed target.
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
}
