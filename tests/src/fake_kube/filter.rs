//! Which objects a request sees: its namespace (from the path) and its `fieldSelector`, with the
//! fields and operators the API server supports for pods and Services.

use serde_json::Value;

use super::Kind;

/// One `field=value` / `field==value` / `field!=value` term.
#[derive(Clone, Debug)]
struct Term {
    field: String,
    value: String,
    equal: bool,
}

#[derive(Clone, Debug)]
pub(super) struct Filter {
    namespace: Option<String>,
    terms: Vec<Term>,
}

impl Filter {
    /// The filter of a request on `kind` in `namespace` (all when `None`), or the API server's
    /// error message for a selector it would refuse.
    pub(super) fn new(
        kind: Kind,
        namespace: Option<String>,
        field_selector: Option<&str>,
    ) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in field_selector
            .unwrap_or_default()
            .split(',')
            .filter(|term| !term.is_empty())
        {
            let (field, value, equal) = if let Some((field, value)) = term.split_once("!=") {
                (field, value, false)
            } else if let Some((field, value)) = term.split_once("==") {
                (field, value, true)
            } else if let Some((field, value)) = term.split_once('=') {
                (field, value, true)
            } else {
                return Err(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                ));
            };
            if !kind.selectable_fields().contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push(Term {
                field: field.to_owned(),
                value: value.to_owned(),
                equal,
            });
        }
        Ok(Self { namespace, terms })
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        let in_namespace = self
            .namespace
            .as_deref()
            .is_none_or(|namespace| field(object, "metadata.namespace") == namespace);
        in_namespace
            && self
                .terms
                .iter()
                .all(|term| (field(object, &term.field) == term.value) == term.equal)
    }
}

/// The string at a dotted path; a missing field reads as empty, as the API server's field sets
/// have it (an unscheduled pod's `spec.nodeName` is "").
fn field<'a>(object: &'a Value, path: &str) -> &'a str {
    path.split('.')
        .try_fold(object, |value, key| value.get(key))
        .and_then(Value::as_str)
        .unwrap_or_default()
}
