//! Rover's `${ENV_NAME:default}` substitution, reproduced exactly so a Rover user's file and
//! environment give the same values here.
//!
//! Rover (`pkg/config/env_override.go`) matches each string value against
//! `\${(?P<ENV>[_A-Z0-9]+):(?P<DEF>.*)}` and replaces the **whole value** by the variable, or by
//! the default when the variable is unset or empty. Consequences this module keeps:
//! - the default runs to the last `}` of the line (`.*` is greedy), which is what lets defaults
//!   hold templates: `${NAME:{{.Pod.Name}}}` has the default `{{.Pod.Name}}`;
//! - only the first `${` with an upper-case name and a `:` is a placeholder; a second one in the
//!   same value is part of the first one's default;
//! - text before or after the placeholder is dropped (the caller warns about it);
//! - `${NAME}` without a colon, or with a lower-case name, is not a placeholder.
//!
//! One deliberate difference: one pair of double quotes around a default is removed. Rover's
//! shipped file writes `${ROVER_BACKEND_PEM_PATH:"client.pem"}` and
//! `${ROVER_BACKEND_AUTHENTICATION:""}`; in Rover the quotes end up in the value (an
//! authentication header of two quote characters), which is never what the file means.

use std::sync::LazyLock;

use regex::Regex;

/// Rover's pattern, unchanged; Rust's `regex` has Go's leftmost-first semantics and its `.`
/// does not cross a newline either.
static PLACEHOLDER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\$\{([_A-Z0-9]+):(.*)\}").expect("the placeholder pattern is a valid constant")
});

/// A string value after substitution.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Substituted {
    pub value: String,
    /// The placeholder, when text around it was dropped (Rover does the same).
    pub dropped_around: Option<String>,
}

/// Substitutes the first placeholder of `raw` as Rover does; `env` returns a variable's value.
pub(super) fn substitute(raw: &str, env: &dyn Fn(&str) -> Option<String>) -> Substituted {
    let Some(caps) = PLACEHOLDER.captures(raw) else {
        return Substituted {
            value: raw.to_owned(),
            dropped_around: None,
        };
    };
    let (Some(whole), Some(name), Some(default)) = (caps.get(0), caps.get(1), caps.get(2)) else {
        return Substituted {
            value: raw.to_owned(),
            dropped_around: None,
        };
    };
    let value = match env(name.as_str()) {
        Some(v) if !v.is_empty() => v,
        _ => unquote(default.as_str()).to_owned(),
    };
    let dropped_around = (whole.len() != raw.len()).then(|| whole.as_str().to_owned());
    Substituted {
        value,
        dropped_around,
    }
}

fn unquote(default: &str) -> &str {
    default
        .strip_prefix('"')
        .and_then(|d| d.strip_suffix('"'))
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    fn sub(raw: &str, vars: &[(&str, &str)]) -> String {
        substitute(raw, &with(vars)).value
    }

    #[test]
    fn default_when_unset_or_empty_and_value_when_set() {
        assert_eq!(sub("${A:1}", &[]), "1");
        assert_eq!(sub("${A:1}", &[("A", "")]), "1");
        assert_eq!(sub("${A:1}", &[("A", "2")]), "2");
        assert_eq!(sub("${A:}", &[]), "");
        assert_eq!(sub("plain", &[("A", "2")]), "plain");
    }

    #[test]
    fn defaults_keep_braces_and_colons() {
        assert_eq!(sub("${N:{{.Pod.Name}}}", &[]), "{{.Pod.Name}}");
        assert_eq!(sub("${ADDR:localhost:11800}", &[]), "localhost:11800");
        assert_eq!(
            sub(
                r#"${S:{{.Pod.LabelValue "a,b" ""}}.{{.Pod.Namespace}}}"#,
                &[]
            ),
            r#"{{.Pod.LabelValue "a,b" ""}}.{{.Pod.Namespace}}"#
        );
    }

    #[test]
    fn quotes_around_a_default_are_removed_but_not_from_the_environment() {
        assert_eq!(sub(r#"${P:"client.pem"}"#, &[]), "client.pem");
        assert_eq!(sub(r#"${P:""}"#, &[]), "");
        assert_eq!(sub(r#"${P:"x"}"#, &[("P", r#""y""#)]), r#""y""#);
    }

    #[test]
    fn only_the_first_placeholder_counts_and_surrounding_text_is_dropped() {
        // Greedy default: the second placeholder is part of the first one's default.
        assert_eq!(sub("${A:a}-${B:b}", &[]), "a}-${B:b");
        assert_eq!(sub("${A:a}-${B:b}", &[("A", "x"), ("B", "y")]), "x");
        let s = substitute("tcp://${A:h}:1", &with(&[]));
        assert_eq!(s.value, "h");
        assert_eq!(s.dropped_around.as_deref(), Some("${A:h}"));
        assert_eq!(substitute("${A:h}", &with(&[])).dropped_around, None);
    }

    #[test]
    fn not_placeholders() {
        assert_eq!(sub("${A}", &[("A", "x")]), "${A}");
        assert_eq!(sub("${lower:x}", &[("lower", "y")]), "${lower:x}");
        assert_eq!(sub("${A:x", &[("A", "y")]), "${A:x");
        // `.` does not cross a newline, as in Go.
        assert_eq!(sub("${A:x\n}", &[("A", "y")]), "${A:x\n}");
    }
}
