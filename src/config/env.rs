//! `${NAME}` substitution in every string value of the parsed TOML tree.
//!
//! `${NAME}` is replaced by the variable's value, `$$` is a literal `$`, and
//! a `$` followed by anything else stays as it is. An unset variable, an
//! invalid name and an unterminated `${` are problems at the key path of the
//! value; keys themselves are never substituted, and substituted text is not
//! scanned again.

use super::ConfigProblem;

/// Substitutes in place every string value under `table`, reporting each
/// failure at its key path and recording that path in `broken`.
pub(super) fn substitute_table(
    table: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<ConfigProblem>,
    broken: &mut Vec<String>,
) {
    for (key, value) in table.iter_mut() {
        substitute_value(value, key.clone(), env, problems, broken);
    }
}

fn substitute_value(
    value: &mut toml::Value,
    path: String,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<ConfigProblem>,
    broken: &mut Vec<String>,
) {
    match value {
        toml::Value::String(text) => match substitute(text, env) {
            Ok(replaced) => *text = replaced,
            Err(messages) => {
                problems.extend(
                    messages
                        .into_iter()
                        .map(|message| ConfigProblem::new(path.clone(), message)),
                );
                broken.push(path);
            }
        },
        toml::Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                substitute_value(item, format!("{path}[{index}]"), env, problems, broken);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                substitute_value(item, format!("{path}.{key}"), env, problems, broken);
            }
        }
        toml::Value::Integer(_)
        | toml::Value::Float(_)
        | toml::Value::Boolean(_)
        | toml::Value::Datetime(_) => {}
    }
}

/// `text` with every `${NAME}` replaced, or every reason it cannot be.
pub(super) fn substitute(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let Some(end) = tail.find('}') else {
                errors.push("unterminated \"${\" (write \"$$\" for a literal \"$\")".to_owned());
                rest = "";
                break;
            };
            let name = &tail[..end];
            if !is_variable_name(name) {
                errors.push(format!("invalid environment variable name {name:?}"));
            } else {
                match env(name) {
                    Some(value) => out.push_str(&value),
                    None => errors.push(format!("environment variable {name} is not set")),
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// A portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cr3t".to_owned()),
            "EMPTY" => Some(String::new()),
            "DOLLAR" => Some("${SECRET}$$".to_owned()),
            _ => None,
        }
    }

    fn sub(text: &str) -> Result<String, Vec<String>> {
        substitute(text, &env)
    }

    #[test]
    fn replaces_variables() {
        assert_eq!(sub("${SECRET}"), Ok("s3cr3t".to_owned()));
        assert_eq!(sub("a-${SECRET}-b"), Ok("a-s3cr3t-b".to_owned()));
        assert_eq!(sub("${SECRET}${SECRET}"), Ok("s3cr3ts3cr3t".to_owned()));
        assert_eq!(sub("x${EMPTY}y"), Ok("xy".to_owned()));
        assert_eq!(sub("no variables"), Ok("no variables".to_owned()));
    }

    #[test]
    fn substituted_text_is_not_scanned_again() {
        assert_eq!(sub("${DOLLAR}"), Ok("${SECRET}$$".to_owned()));
    }

    #[test]
    fn double_dollar_is_a_literal_dollar() {
        assert_eq!(sub("$$"), Ok("$".to_owned()));
        assert_eq!(sub("$${SECRET}"), Ok("${SECRET}".to_owned()));
        assert_eq!(sub("$$$${SECRET}"), Ok("$${SECRET}".to_owned()));
        assert_eq!(sub("$$${SECRET}"), Ok("$s3cr3t".to_owned()));
    }

    #[test]
    fn lone_dollar_stays() {
        assert_eq!(sub("$"), Ok("$".to_owned()));
        assert_eq!(sub("cost $5"), Ok("cost $5".to_owned()));
        assert_eq!(sub("a$"), Ok("a$".to_owned()));
        assert_eq!(sub("$share/group"), Ok("$share/group".to_owned()));
    }

    #[test]
    fn unset_variables_are_each_reported() {
        assert_eq!(
            sub("${NOPE}:${SECRET}:${ALSO_NOPE}"),
            Err(vec![
                "environment variable NOPE is not set".to_owned(),
                "environment variable ALSO_NOPE is not set".to_owned(),
            ])
        );
    }

    #[test]
    fn unterminated_is_an_error() {
        assert_eq!(
            sub("abc${SECRET"),
            Err(vec![
                "unterminated \"${\" (write \"$$\" for a literal \"$\")".to_owned()
            ])
        );
        assert!(sub("${").is_err());
        assert!(sub("${SECRET}${").is_err());
    }

    #[test]
    fn invalid_names_are_errors() {
        assert_eq!(
            sub("${}"),
            Err(vec!["invalid environment variable name \"\"".to_owned()])
        );
        assert!(sub("${1ABC}").is_err());
        assert!(sub("${A B}").is_err());
        assert_eq!(
            sub("${_ok_1}"),
            Err(vec!["environment variable _ok_1 is not set".to_owned()])
        );
    }

    #[test]
    fn walks_nested_values_with_paths() {
        let mut table: toml::Table = toml::from_str(
            r#"
            top = "${SECRET}"
            [[provider]]
            secret = "${NOPE}"
            list = ["ok", "${MISSING}"]
            inline = { key = "$${x}" }
            "#,
        )
        .expect("test TOML parses");
        let mut problems = Vec::new();
        let mut broken = Vec::new();
        substitute_table(&mut table, &env, &mut problems, &mut broken);
        problems.sort_by(|a, b| a.path.cmp(&b.path));
        broken.sort();
        assert_eq!(
            problems,
            vec![
                ConfigProblem::new(
                    "provider[0].list[1]",
                    "environment variable MISSING is not set"
                ),
                ConfigProblem::new("provider[0].secret", "environment variable NOPE is not set"),
            ]
        );
        assert_eq!(broken, vec!["provider[0].list[1]", "provider[0].secret"]);
        assert_eq!(table["top"].as_str(), Some("s3cr3t"));
        assert_eq!(table["provider"][0]["inline"]["key"].as_str(), Some("${x}"));
    }
}
