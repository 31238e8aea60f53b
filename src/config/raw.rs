//! The configuration as written: serde structs that mirror the TOML keys.
//!
//! Every field is optional here, so that a missing key is reported by
//! validation as `required` with its path, and numbers are read as `i64` so
//! that validation can say which range is allowed. Unknown keys are
//! collected with `serde_ignored` (all of them, where `deny_unknown_fields`
//! would stop at the first), and a type error is reported at its key path;
//! the offending value is then removed and decoding repeated, so that every
//! type error of the file is found, not only the first.

use serde::Deserialize;

use super::ConfigProblem;

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawConfig {
    pub store: Option<RawStore>,
    pub api: Option<RawApi>,
    pub ingest: Option<RawIngest>,
    pub deliver: Option<RawDeliver>,
    pub retention: Option<RawRetention>,
    #[serde(default)]
    pub mqtt: Vec<RawMqtt>,
    #[serde(default)]
    pub serial: Vec<RawSerial>,
    #[serde(default)]
    pub provider: Vec<RawProvider>,
    #[serde(default)]
    pub contract: Vec<RawContract>,
    pub routing: Option<RawRouting>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawStore {
    pub url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawApi {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawIngest {
    pub batch_max: Option<i64>,
    pub batch_wait_ms: Option<i64>,
    pub commit_interval_ms: Option<i64>,
    pub dedupe_window_s: Option<i64>,
    pub queue: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawDeliver {
    pub instance_id: Option<String>,
    pub lease_s: Option<i64>,
    pub poll_ms: Option<i64>,
    pub max_in_flight: Option<i64>,
    pub claim_batch: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawRetention {
    pub days: Option<i64>,
    pub batch: Option<i64>,
    pub interval_s: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawMqtt {
    pub id: Option<String>,
    pub url: Option<String>,
    pub client_id: Option<String>,
    pub shared_group: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive_s: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawSerial {
    pub id: Option<String>,
    pub path: Option<String>,
    pub baud: Option<i64>,
    pub data_bits: Option<i64>,
    pub parity: Option<String>,
    pub stop_bits: Option<i64>,
    pub format: Option<String>,
    pub tenant: Option<String>,
    pub comms_fail_after_s: Option<i64>,
    #[serde(default)]
    pub map: Vec<RawSerialMap>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawSerialMap {
    pub receiver: Option<String>,
    pub line: Option<String>,
    pub account: Option<String>,
    pub tenant: Option<String>,
    pub device_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawProvider {
    pub id: Option<String>,
    pub kind: Option<String>,
    pub url: Option<String>,
    pub secret: Option<String>,
    pub token: Option<String>,
    pub timeout_s: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawContract {
    pub id: Option<String>,
    pub provider: Option<String>,
    pub fallback: Option<Vec<String>>,
    pub tenants: Option<Vec<String>>,
    /// A TOML date or a quoted `YYYY-MM-DD` (a TOML date may arrive as its
    /// text); anything else is reported by validation.
    pub starts: Option<toml::Value>,
    pub ends: Option<toml::Value>,
    pub answer_targets: Option<Vec<RawAnswerTarget>>,
    pub failover_after_s: Option<RawFailoverAfter>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawAnswerTarget {
    pub within_s: Option<i64>,
    pub pct: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawFailoverAfter {
    pub critical: Option<i64>,
    pub urgent: Option<i64>,
    pub technical: Option<i64>,
    pub routine: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawRouting {
    pub default_provider: Option<String>,
}

/// Bound on decoding passes; each failed pass removes one value, so a file
/// needs as many passes as it has type errors, plus one.
const MAX_PASSES: usize = 1000;

/// Decodes the substituted tree into a [`RawConfig`], reporting every
/// unknown key and every type error; the path of each value removed for a
/// type error is added to `broken`. `None` when decoding could not go on.
pub(super) fn decode(
    mut tree: toml::Value,
    problems: &mut Vec<ConfigProblem>,
    broken: &mut Vec<String>,
) -> Option<RawConfig> {
    let mut removals = Removals::default();
    for _ in 0..MAX_PASSES {
        let mut unknown = Vec::new();
        let result = {
            let mut note_unknown =
                |path: serde_ignored::Path<'_>| unknown.push(ignored_path(&path));
            let deserializer = serde_ignored::Deserializer::new(tree.clone(), &mut note_unknown);
            serde_path_to_error::deserialize::<_, RawConfig>(deserializer)
        };
        let err = match result {
            Ok(raw) => {
                problems.extend(unknown.iter().map(|current| {
                    ConfigProblem::new(render(&removals.original(current)), "unknown key")
                }));
                return Some(raw);
            }
            Err(err) => err,
        };

        let message = err.inner().message().trim_end().to_owned();
        let Some(current) = error_path(err.path()) else {
            problems.push(ConfigProblem::new(err.path().to_string(), message));
            return None;
        };
        let original = removals.original(&current);
        let path = render(&original);
        let found = lookup(&tree, &current).map(describe);
        problems.push(ConfigProblem::new(
            if path.is_empty() { "(file)" } else { &path },
            type_message(&message, found),
        ));
        if !remove(&mut tree, &current) {
            return None;
        }
        removals.record(&original);
        broken.push(path);
    }
    problems.push(ConfigProblem::new(
        "(file)",
        format!("too many type errors; stopped after {MAX_PASSES}"),
    ));
    None
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `provider[1].url`-style rendering of a key path.
fn render(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Index(index) => {
                out.push('[');
                out.push_str(&index.to_string());
                out.push(']');
            }
        }
    }
    out
}

fn ignored_path(path: &serde_ignored::Path<'_>) -> Vec<Segment> {
    match path {
        serde_ignored::Path::Root => Vec::new(),
        serde_ignored::Path::Seq { parent, index } => {
            let mut segments = ignored_path(parent);
            segments.push(Segment::Index(*index));
            segments
        }
        serde_ignored::Path::Map { parent, key } => {
            let mut segments = ignored_path(parent);
            segments.push(Segment::Key(key.clone()));
            segments
        }
        serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// The key path of a decoding error, if it is made of keys and indexes.
fn error_path(path: &serde_path_to_error::Path) -> Option<Vec<Segment>> {
    path.iter()
        .map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(Segment::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(Segment::Index(*index)),
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {
                None
            }
        })
        .collect()
}

fn lookup<'a>(tree: &'a toml::Value, segments: &[Segment]) -> Option<&'a toml::Value> {
    segments
        .iter()
        .try_fold(tree, |value, segment| match (segment, value) {
            (Segment::Key(key), toml::Value::Table(table)) => table.get(key),
            (Segment::Index(index), toml::Value::Array(items)) => items.get(*index),
            _ => None,
        })
}

/// Removes the value at `segments`; false when there is none.
fn remove(tree: &mut toml::Value, segments: &[Segment]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut value = tree;
    for segment in parents {
        let next = match (segment, value) {
            (Segment::Key(key), toml::Value::Table(table)) => table.get_mut(key),
            (Segment::Index(index), toml::Value::Array(items)) => items.get_mut(*index),
            _ => None,
        };
        match next {
            Some(next) => value = next,
            None => return false,
        }
    }
    match (last, value) {
        (Segment::Key(key), toml::Value::Table(table)) => table.remove(key).is_some(),
        (Segment::Index(index), toml::Value::Array(items)) if *index < items.len() => {
            items.remove(*index);
            true
        }
        _ => false,
    }
}

/// Array elements removed so far, by the original path of their array, so
/// that later problems are still reported at the indexes of the file.
#[derive(Debug, Default)]
struct Removals {
    removed: Vec<(Vec<Segment>, Vec<usize>)>,
}

impl Removals {
    /// The path in the file of a path in the current (reduced) tree.
    fn original(&self, current: &[Segment]) -> Vec<Segment> {
        let mut out = Vec::with_capacity(current.len());
        for segment in current {
            match segment {
                Segment::Key(key) => out.push(Segment::Key(key.clone())),
                Segment::Index(index) => {
                    let removed = self.removed_under(&out);
                    let original = (0..)
                        .filter(|candidate| !removed.contains(candidate))
                        .nth(*index)
                        .unwrap_or(*index);
                    out.push(Segment::Index(original));
                }
            }
        }
        out
    }

    /// Notes a removal at `original`, a path in the file.
    fn record(&mut self, original: &[Segment]) {
        let Some((Segment::Index(index), array)) = original.split_last() else {
            return;
        };
        match self.removed.iter_mut().find(|(path, _)| path == array) {
            Some((_, indexes)) => indexes.push(*index),
            None => self.removed.push((array.to_vec(), vec![*index])),
        }
    }

    fn removed_under(&self, array: &[Segment]) -> &[usize] {
        self.removed
            .iter()
            .find(|(path, _)| path == array)
            .map_or(&[], |(_, indexes)| indexes.as_slice())
    }
}

/// What kind of TOML value this is, for messages that must not repeat the
/// value itself (it may hold a substituted secret).
pub(super) fn describe(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// serde's "invalid type: string \"fast\", expected i64" in the words of a
/// TOML file, without the value: "expected an integer, found a string".
fn type_message(message: &str, found: Option<&str>) -> String {
    let expected = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.split_once(", expected "))
        .map(|(_, expected)| expected);
    match (expected, found) {
        (Some(expected), Some(found)) => {
            let expected = match expected {
                "i64" => "an integer",
                "f64" => "a number",
                "a sequence" => "an array",
                "a map" => "a table",
                other if other.starts_with("struct ") => "a table",
                other => other,
            };
            format!("expected {expected}, found {found}")
        }
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_text(text: &str) -> (Option<RawConfig>, Vec<ConfigProblem>, Vec<String>) {
        let tree = toml::Value::Table(text.parse::<toml::Table>().expect("test TOML parses"));
        let mut problems = Vec::new();
        let mut broken = Vec::new();
        let raw = decode(tree, &mut problems, &mut broken);
        (raw, problems, broken)
    }

    #[test]
    fn reports_every_type_error_at_file_indexes() {
        let (raw, problems, broken) = decode_text(
            r#"
            [[contract]]
            fallback = [1, "a", true, "b"]
            tenants = "x"
            [[serial]]
            baud = "fast"
            "#,
        );
        let mut paths: Vec<_> = problems
            .iter()
            .map(|problem| format!("{problem}"))
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            vec![
                "contract[0].fallback[0]: expected a string, found an integer",
                "contract[0].fallback[2]: expected a string, found a boolean",
                "contract[0].tenants: expected an array, found a string",
                "serial[0].baud: expected an integer, found a string",
            ]
        );
        assert_eq!(broken.len(), 4);
        let raw = raw.expect("decoding goes on past type errors");
        assert_eq!(
            raw.contract[0].fallback,
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
    }

    #[test]
    fn reports_every_unknown_key() {
        let (raw, problems, _) = decode_text(
            r#"
            [store]
            urll = "x"
            [bogus]
            a = 1
            [[contract]]
            answer_targets = [{ within_s = 60, pct = 97.5, extra = 1 }]
            "#,
        );
        assert!(raw.is_some());
        let mut paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            vec!["bogus", "contract[0].answer_targets[0].extra", "store.urll"]
        );
        assert!(problems.iter().all(|p| p.message == "unknown key"));
    }

    #[test]
    fn dates_pass_through_as_values() {
        let (raw, problems, _) = decode_text(
            r#"
            [[contract]]
            starts = 2026-04-01
            ends = "2027-03-31"
            "#,
        );
        assert_eq!(problems, vec![]);
        let raw = raw.expect("decodes");
        // Through serde_ignored a TOML date arrives as its text; validation
        // accepts either form.
        for date in [&raw.contract[0].starts, &raw.contract[0].ends] {
            assert!(matches!(
                date,
                Some(toml::Value::Datetime(_) | toml::Value::String(_))
            ));
        }
    }
}
