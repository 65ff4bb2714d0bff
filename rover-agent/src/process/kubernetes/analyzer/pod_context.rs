//! `.Pod` and `.Container` of the analyzers' templates, as Rover's
//! `pkg/process/finders/kubernetes/template.go` defines them:
//!
//! - `.Pod`: `Name`, `Namespace`, `Node`, `ServiceName` (the Service's name, empty without one),
//!   `HasServiceName`, `LabelValue "k1,k2" "default"`, `OwnerName "Kind1,Kind2"`,
//!   `HasOwnerName "Kind1,Kind2"`, `HasContainer "name"`, `FindContainer "name"` (a container
//!   object), `LabelSelector "k=v,k2=v2"`;
//! - `.Container`: `Name`, `ID` (the status's id, with its runtime prefix, as Rover),
//!   `EnvValue "NAME1,NAME2"`.

use std::collections::{BTreeMap, HashMap};

use gtmpl::{FuncError, Value};
use k8s_openapi::api::core::v1::{EnvVar, Pod, Service};

use crate::process::rule_template::{MethodsWithArguments, field, object, string_argument};

/// `.Pod`'s methods with arguments.
pub(super) const POD_METHODS: &MethodsWithArguments = &[
    ("LabelValue", pod_label_value),
    ("OwnerName", pod_owner_name),
    ("HasOwnerName", pod_has_owner_name),
    ("HasContainer", pod_has_container),
    ("FindContainer", pod_find_container),
    ("LabelSelector", pod_label_selector),
];

/// `.Container`'s methods with arguments.
pub(super) const CONTAINER_METHODS: &MethodsWithArguments = &[("EnvValue", container_env_value)];

// Hidden fields of the objects, read by the functions above.
const LABELS: &str = "__labels";
const OWNERS: &str = "__owners";
const SPEC_CONTAINER_NAMES: &str = "__specContainerNames";
const CONTAINERS: &str = "__containers";
const ENV: &str = "__env";
const SERVICE_NAME: &str = "ServiceName";

/// The label the Deployment controller puts on its pods, and ends its ReplicaSets' names with.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// What of a pod the templates read, from the methods with arguments they call: the rest is
/// left out of the context, which gtmpl copies at every field access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct PodNeeds {
    labels: bool,
    owners: bool,
    spec_container_names: bool,
    containers: bool,
    env: bool,
}

impl PodNeeds {
    pub(super) fn of_methods<'a>(methods: impl IntoIterator<Item = &'a str>) -> Self {
        let mut needs = Self::default();
        for method in methods {
            match method {
                "LabelValue" | "LabelSelector" => needs.labels = true,
                "OwnerName" | "HasOwnerName" => needs.owners = true,
                "HasContainer" => needs.spec_container_names = true,
                "FindContainer" => needs.containers = true,
                "EnvValue" => needs.env = true,
                _ => {}
            }
        }
        needs
    }
}

/// `.Pod` for a pod and the Service chosen for it.
pub(super) fn pod_object(pod: &Pod, service: Option<&Service>, needs: PodNeeds) -> Value {
    let metadata = &pod.metadata;
    let empty_labels = BTreeMap::new();
    let labels = metadata.labels.as_ref().unwrap_or(&empty_labels);
    let service_name = service
        .and_then(|service| service.metadata.name.clone())
        .unwrap_or_default();
    let node = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.node_name.as_deref())
        .unwrap_or("");
    let mut fields: HashMap<String, Value> = [
        ("Name", Value::from(metadata.name.as_deref().unwrap_or(""))),
        (
            "Namespace",
            Value::from(metadata.namespace.as_deref().unwrap_or("")),
        ),
        ("Node", Value::from(node)),
        ("HasServiceName", Value::from(!service_name.is_empty())),
        (SERVICE_NAME, Value::from(service_name)),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    if needs.labels {
        let labels = labels
            .iter()
            .map(|(key, value)| (key.clone(), Value::from(value.as_str())))
            .collect();
        fields.insert(LABELS.to_owned(), Value::Map(labels));
    }
    if needs.owners {
        let owners = owners(pod, labels)
            .into_iter()
            .map(|(kind, name)| object([("kind", Value::from(kind)), ("name", Value::from(name))]))
            .collect();
        fields.insert(OWNERS.to_owned(), Value::Array(owners));
    }
    if needs.spec_container_names {
        let names = pod
            .spec
            .iter()
            .flat_map(|spec| &spec.containers)
            .map(|container| Value::from(container.name.as_str()))
            .collect();
        fields.insert(SPEC_CONTAINER_NAMES.to_owned(), Value::Array(names));
    }
    if needs.containers {
        let containers = spec_containers(pod)
            .map(|(name, env)| container_value(pod, name, env, needs))
            .collect();
        fields.insert(CONTAINERS.to_owned(), Value::Array(containers));
    }
    Value::Object(fields)
}

/// `.Container` for the container `name` of the pod (regular, init or ephemeral). A name the
/// spec lacks still gives its name, its status's id if any, and no environment.
pub(super) fn container_object(pod: &Pod, name: &str, needs: PodNeeds) -> Value {
    let env = spec_containers(pod)
        .find(|(spec_name, _)| *spec_name == name)
        .map_or(&[][..], |(_, env)| env);
    container_value(pod, name, env, needs)
}

fn container_value(pod: &Pod, name: &str, env: &[EnvVar], needs: PodNeeds) -> Value {
    let mut fields = HashMap::from([
        ("Name".to_owned(), Value::from(name)),
        ("ID".to_owned(), Value::from(container_status_id(pod, name))),
    ]);
    if needs.env {
        let mut values: HashMap<String, Value> = HashMap::new();
        for var in env {
            // A `valueFrom` variable has no value here, as in Rover (which reads the spec only).
            values
                .entry(var.name.clone())
                .or_insert_with(|| Value::from(var.value.as_deref().unwrap_or("")));
        }
        fields.insert(ENV.to_owned(), Value::Map(values));
    }
    Value::Object(fields)
}

/// Every container of the spec with its environment: regular, init and ephemeral ones.
fn spec_containers(pod: &Pod) -> impl Iterator<Item = (&str, &[EnvVar])> {
    pod.spec.iter().flat_map(|spec| {
        let regular = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .map(|container| (container.name.as_str(), container.env.as_deref()));
        let ephemeral = spec
            .ephemeral_containers
            .iter()
            .flatten()
            .map(|container| (container.name.as_str(), container.env.as_deref()));
        regular
            .chain(ephemeral)
            .map(|(name, env)| (name, env.unwrap_or_default()))
    })
}

/// The container's id in the pod status (`containerd://…`), empty while it has none.
fn container_status_id<'a>(pod: &'a Pod, name: &str) -> &'a str {
    pod.status
        .iter()
        .flat_map(|status| {
            status
                .container_statuses
                .iter()
                .chain(&status.init_container_statuses)
                .chain(&status.ephemeral_container_statuses)
                .flatten()
        })
        .find(|status| status.name == name)
        .and_then(|status| status.container_id.as_deref())
        .unwrap_or("")
}

/// The pod's owners, `(kind, name)`: its owner references, then the owners known without asking
/// the API server. Rover walks up the controller references through the API; rover-rs may only
/// read pods and services, so it knows the one step that pods name: the Deployment of a
/// ReplicaSet that the Deployment controller made (`<deployment>-<pod-template-hash>`).
fn owners(pod: &Pod, labels: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let references = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let mut owners: Vec<(String, String)> = references
        .iter()
        .map(|reference| (reference.kind.clone(), reference.name.clone()))
        .collect();
    let hash = labels
        .get(POD_TEMPLATE_HASH)
        .map(String::as_str)
        .unwrap_or("");
    if !hash.is_empty() {
        for reference in references {
            // Rover follows controller references only (an unset flag counts as one).
            if reference.kind != "ReplicaSet" || reference.controller == Some(false) {
                continue;
            }
            let deployment = reference
                .name
                .strip_suffix(hash)
                .and_then(|name| name.strip_suffix('-'))
                .filter(|name| !name.is_empty());
            if let Some(deployment) = deployment {
                owners.push(("Deployment".to_owned(), deployment.to_owned()));
            }
        }
    }
    owners
}

/// A method called on a receiver without its hidden fields (`.Container.LabelValue`).
fn wrong_receiver(method: &str, receiver: &str) -> FuncError {
    FuncError::Generic(format!("{method} is a method of {receiver}"))
}

/// The hidden list `name` of the `.Pod` receiver.
fn pod_list<'a>(args: &'a [Value], name: &str, method: &str) -> Result<&'a [Value], FuncError> {
    match field(args.first(), name) {
        Some(Value::Array(items)) => Ok(items),
        _ => Err(wrong_receiver(method, ".Pod")),
    }
}

/// The receiver's hidden map `name` (a pod's labels, a container's environment).
fn receiver_map<'a>(
    args: &'a [Value],
    name: &str,
    method: &str,
    receiver: &str,
) -> Result<&'a HashMap<String, Value>, FuncError> {
    match field(args.first(), name) {
        Some(Value::Map(map)) => Ok(map),
        _ => Err(wrong_receiver(method, receiver)),
    }
}

/// The receiver and `N` string arguments, or an error naming the method.
fn string_arguments<'a, const N: usize>(
    args: &'a [Value],
    method: &str,
) -> Result<[&'a str; N], FuncError> {
    if args.len() != N + 1 {
        return Err(FuncError::Generic(format!(
            "{method} takes {N} argument(s), not {}",
            args.len().saturating_sub(1)
        )));
    }
    let mut strings = [""; N];
    for (index, string) in strings.iter_mut().enumerate() {
        *string = string_argument(args, index + 1, method)?;
    }
    Ok(strings)
}

fn label<'a>(labels: &'a HashMap<String, Value>, key: &str) -> Option<&'a str> {
    match labels.get(key) {
        Some(Value::String(value)) => Some(value),
        _ => None,
    }
}

/// `.Pod.LabelValue "k1,k2" "default"`: the first of the keys with a non-empty value, else the
/// default.
fn pod_label_value(args: &[Value]) -> Result<Value, FuncError> {
    let [keys, default] = string_arguments(args, "LabelValue")?;
    let labels = receiver_map(args, LABELS, "LabelValue", ".Pod")?;
    let value = keys
        .split(',')
        .filter_map(|key| label(labels, key))
        .find(|value| !value.is_empty())
        .unwrap_or(default);
    Ok(Value::from(value))
}

/// The name of the first owner of the kinds, tried in order: `service` (any case) is the
/// Service's name when the pod has one; any other kind is matched exactly against the owners.
fn owner_name(args: &[Value], kinds: &str, method: &str) -> Result<Option<String>, FuncError> {
    let owners = pod_list(args, OWNERS, method)?;
    for kind in kinds.split(',') {
        if kind.eq_ignore_ascii_case("service") {
            match field(args.first(), SERVICE_NAME) {
                Some(Value::String(service)) if !service.is_empty() => {
                    return Ok(Some(service.clone()));
                }
                _ => continue,
            }
        }
        let owner = owners.iter().find(
            |owner| matches!(field(Some(owner), "kind"), Some(Value::String(k)) if k == kind),
        );
        if let Some(Value::String(name)) = field(owner, "name") {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// `.Pod.OwnerName "Kind1,Kind2"`: an error when the pod has no owner of these kinds.
fn pod_owner_name(args: &[Value]) -> Result<Value, FuncError> {
    let [kinds] = string_arguments(args, "OwnerName")?;
    owner_name(args, kinds, "OwnerName")?
        .map(Value::from)
        .ok_or_else(|| FuncError::Generic(format!("the pod has no owner of kind {kinds}")))
}

/// `.Pod.HasOwnerName "Kind1,Kind2"`: whether `OwnerName` gives a non-empty name.
fn pod_has_owner_name(args: &[Value]) -> Result<Value, FuncError> {
    let [kinds] = string_arguments(args, "HasOwnerName")?;
    let name = owner_name(args, kinds, "HasOwnerName")?;
    Ok(Value::from(name.is_some_and(|name| !name.is_empty())))
}

/// `.Pod.HasContainer "name"`: whether the spec has this (regular) container, as in Rover.
fn pod_has_container(args: &[Value]) -> Result<Value, FuncError> {
    let [name] = string_arguments(args, "HasContainer")?;
    let names = pod_list(args, SPEC_CONTAINER_NAMES, "HasContainer")?;
    Ok(Value::from(names.iter().any(
        |spec_name| matches!(spec_name, Value::String(s) if s == name),
    )))
}

/// `.Pod.FindContainer "name"`: the container object (regular, init or ephemeral), an error
/// when the pod has none of this name.
fn pod_find_container(args: &[Value]) -> Result<Value, FuncError> {
    let [name] = string_arguments(args, "FindContainer")?;
    let containers = pod_list(args, CONTAINERS, "FindContainer")?;
    containers
        .iter()
        .find(|container| matches!(field(Some(container), "Name"), Some(Value::String(n)) if n == name))
        .cloned()
        .ok_or_else(|| FuncError::Generic(format!("the pod has no container {name}")))
}

/// `.Pod.LabelSelector "k=v,k2=v2"`: whether the pod's labels hold every pair (Kubernetes'
/// `ConvertSelectorToLabelsMap`, which Rover uses: equality pairs only; empty matches all).
fn pod_label_selector(args: &[Value]) -> Result<Value, FuncError> {
    let [selector] = string_arguments(args, "LabelSelector")?;
    let labels = receiver_map(args, LABELS, "LabelSelector", ".Pod")?;
    let pairs = parse_equality_selector(selector).map_err(FuncError::Generic)?;
    Ok(Value::from(
        pairs
            .iter()
            .all(|(key, value)| label(labels, key) == Some(*value)),
    ))
}

/// `.Container.EnvValue "NAME1,NAME2"`: the spec's value of the first of the names the container
/// defines (left to right, as Rover documents it); an error when it defines none.
fn container_env_value(args: &[Value]) -> Result<Value, FuncError> {
    let [names] = string_arguments(args, "EnvValue")?;
    let env = receiver_map(args, ENV, "EnvValue", ".Container")?;
    if let Some(value) = names.split(',').find_map(|name| env.get(name)) {
        return Ok(value.clone());
    }
    let mut defined: Vec<&str> = env.keys().map(String::as_str).collect();
    defined.sort_unstable();
    Err(FuncError::Generic(format!(
        "the container defines none of the variables {names} (it defines {})",
        defined.join(",")
    )))
}

/// `k=v,k2=v2` into pairs, refusing what Kubernetes refuses: a pair without exactly one `=`, an
/// invalid label key or value.
fn parse_equality_selector(selector: &str) -> Result<Vec<(&str, &str)>, String> {
    if selector.is_empty() {
        return Ok(Vec::new());
    }
    selector
        .split(',')
        .map(|pair| {
            let mut parts = pair.split('=');
            let (Some(key), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!(
                    "invalid label selector {selector:?}: {pair:?} is not key=value"
                ));
            };
            let (key, value) = (key.trim(), value.trim());
            if !is_label_key(key) {
                return Err(format!(
                    "invalid label selector {selector:?}: bad key {key:?}"
                ));
            }
            if !(value.is_empty() || is_label_name(value)) {
                return Err(format!(
                    "invalid label selector {selector:?}: bad value {value:?}"
                ));
            }
            Ok((key, value))
        })
        .collect()
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

/// At most 63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn is_label_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// At most 253 characters: dot-separated lowercase alphanumeric labels, `-` inside.
fn is_dns_subdomain(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.split('.').all(|part| {
            let bytes = part.as_bytes();
            bytes
                .first()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && bytes
                    .last()
                    .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_selectors_as_kubernetes_parses_them() {
        assert_eq!(parse_equality_selector(""), Ok(vec![]));
        assert_eq!(
            parse_equality_selector("app=shop, tier = web,example.com/team=a_b.c-1"),
            Ok(vec![
                ("app", "shop"),
                ("tier", "web"),
                ("example.com/team", "a_b.c-1")
            ])
        );
        assert_eq!(parse_equality_selector("app="), Ok(vec![("app", "")]));
        for bad in [
            "app",
            "app==shop",
            "app!=shop",
            "=x",
            "a=b,",
            "Bad.Prefix/x=y",
            "x=-y",
            "a b=c",
        ] {
            assert!(parse_equality_selector(bad).is_err(), "{bad}");
        }
        assert!(!is_label_name(&"a".repeat(64)));
        assert!(is_label_name(&"a".repeat(63)));
    }
}
