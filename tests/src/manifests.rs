//! The Kubernetes manifests of `deploy/kubernetes`, read as YAML documents, and the parts of
//! the DaemonSet the deployment tests check or act on (its capabilities, its environment).

use std::path::{Path, PathBuf};

use serde_yaml::Value;

/// `deploy/kubernetes` of this repository.
pub fn manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// The `.yaml` files of the manifest directory, sorted as `kubectl apply -f` takes them.
pub fn manifest_files() -> Vec<PathBuf> {
    let dir = manifest_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("listing {}: {error}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

/// One object of a manifest file.
pub struct Object {
    pub value: Value,
}

impl Object {
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
}

/// Every object of every manifest file (files may hold several, `---`-separated).
pub fn objects() -> Vec<Object> {
    let mut objects = Vec::new();
    for file in manifest_files() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|error| panic!("reading {}: {error}", file.display()));
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|error| panic!("{}: not YAML: {error}", file.display()));
            if value != Value::Null {
                objects.push(Object { value });
            }
        }
    }
    objects
}

/// The only object of `kind`.
pub fn only(objects: &[Object], kind: &str) -> Value {
    let mut found = objects.iter().filter(|object| object.kind() == kind);
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} in {}", manifest_dir().display()));
    assert!(found.next().is_none(), "more than one {kind}");
    first.value.clone()
}

/// The DaemonSet's one container.
pub fn agent_container(daemon_set: &Value) -> Value {
    let containers = daemon_set["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("the DaemonSet has containers");
    assert_eq!(containers.len(), 1, "the DaemonSet runs one container");
    containers[0].clone()
}

/// `securityContext.capabilities.add` of the agent's container, as written (`BPF`, …).
pub fn added_capabilities(container: &Value) -> Vec<String> {
    strings(&container["securityContext"]["capabilities"]["add"])
}

/// A YAML list of strings; anything else is empty.
pub fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The environment Kubernetes would give the container: each `value`, with `$(NAME)` replaced
/// by an earlier variable as Kubernetes does, and each downward-API `fieldRef` given by
/// `field` (the test plays the node: `spec.nodeName` → a name, …). Panics on any other source.
pub fn container_env(container: &Value, field: &dyn Fn(&str) -> String) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for variable in container["env"].as_sequence().into_iter().flatten() {
        let name = variable["name"].as_str().expect("env name").to_owned();
        let value = if let Some(value) = variable["value"].as_str() {
            expand(value, &env)
        } else if let Some(path) = variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            field(path)
        } else {
            panic!("env {name}: neither a value nor a fieldRef");
        };
        env.push((name, value));
    }
    env
}

/// Kubernetes' `$(VAR)` expansion: a variable defined earlier is replaced, anything else kept.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut result = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$(") {
        result.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) => {
                let name = &after[..end];
                match env.iter().find(|(defined, _)| defined == name) {
                    Some((_, value)) => result.push_str(value),
                    None => result.push_str(&rest[start..start + 2 + end + 1]),
                }
                rest = &after[end + 1..];
            }
            None => {
                result.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    result.push_str(rest);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_uses_earlier_variables_only() {
        let env = vec![("POD_IP".to_owned(), "10.0.0.7".to_owned())];
        assert_eq!(expand("$(POD_IP):9470", &env), "10.0.0.7:9470");
        assert_eq!(expand("$(OTHER):1", &env), "$(OTHER):1");
        assert_eq!(expand("a$(POD_IP", &env), "a$(POD_IP");
        assert_eq!(expand("plain", &env), "plain");
    }
}
