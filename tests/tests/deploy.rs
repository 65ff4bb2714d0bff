//! The deployment: the Kubernetes manifests validate against the Kubernetes schemas, ask for
//! no more privilege than the agent uses, carry a configuration the agent loads, and the
//! capabilities they grant are enough (and each needed) to profile another user's process;
//! the Dockerfile runs, builds and copies only what the project has.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::dockerfile::Dockerfile;
use integration_tests::manifests::{
    Object, added_capabilities, agent_container, container_env, manifest_files, objects, only,
    strings,
};
use integration_tests::{
    AgentRun, Folded, agent_binary, bpf_available, machine_lock, run_agent, workload_path,
    workspace_binary,
};
use rover_agent::config::Settings;
use serde_yaml::Value;

/// The capabilities the DaemonSet may add: those the agent uses (see the comments in
/// deploy/kubernetes/03-daemonset.yaml). The capability test below proves they suffice and
/// that each is needed.
const EXPECTED_CAPABILITIES: [&str; 4] = ["BPF", "PERFMON", "SYS_PTRACE", "SYSLOG"];

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// Every key `key` anywhere in `value`, with its value.
fn find_keys<'v>(value: &'v Value, key: &str, found: &mut Vec<&'v Value>) {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map {
                if k.as_str() == Some(key) {
                    found.push(v);
                }
                find_keys(v, key, found);
            }
        }
        Value::Sequence(items) => items.iter().for_each(|item| find_keys(item, key, found)),
        _ => {}
    }
}

fn keys<'v>(objects: &'v [Object], key: &str) -> Vec<&'v Value> {
    let mut found = Vec::new();
    for object in objects {
        find_keys(&object.value, key, &mut found);
    }
    found
}

// --- Schemas ---

/// `kubernetes-validate` as `cargo xtask test` installs it (xtask/src/kubernetes_validate.rs).
fn kubernetes_validate() -> Option<PathBuf> {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory holds tmp/");
    let program = target.join("tools/kubernetes-validate/bin/kubernetes-validate");
    if program.exists() {
        return Some(program);
    }
    let problem = format!(
        "{} is not installed: `cargo xtask test` installs it from PyPI",
        program.display()
    );
    assert!(
        !under_ci(),
        "the manifests cannot be validated in CI: {problem}"
    );
    eprintln!("\n*** SKIPPING the Kubernetes schema validation: {problem} ***\n");
    None
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let Some(validator) = kubernetes_validate() else {
        return;
    };
    let files = manifest_files();
    assert!(files.len() >= 4, "too few manifests: {files:?}");
    for file in files {
        // --strict: a misspelt or misplaced field is an error, not silently ignored.
        let output = Command::new(&validator)
            .arg("--strict")
            .arg(&file)
            .output()
            .unwrap_or_else(|error| panic!("running {}: {error}", validator.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "{} does not validate:\n{text}",
            file.display()
        );
        assert!(text.contains("passed"), "{}: {text}", file.display());
    }
}

// --- Least privilege ---

#[test]
fn nothing_is_privileged_and_exactly_the_listed_capabilities_are_added() {
    let objects = objects();
    for privileged in keys(&objects, "privileged") {
        assert_ne!(privileged, &Value::Bool(true), "privileged: true");
    }
    for host_network in keys(&objects, "hostNetwork") {
        assert_ne!(host_network, &Value::Bool(true), "hostNetwork: true");
    }
    for capabilities in keys(&objects, "capabilities") {
        let added = strings(&capabilities["add"]);
        assert!(
            !added
                .iter()
                .any(|c| c.trim_start_matches("CAP_") == "SYS_ADMIN"),
            "SYS_ADMIN added: {added:?}"
        );
    }
    assert!(keys(&objects, "hostPath").is_empty(), "a host mount");

    let daemon_set = only(&objects, "DaemonSet");
    let pod = &daemon_set["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], Value::Bool(true), "hostPID");
    let container = agent_container(&daemon_set);
    let security = &container["securityContext"];
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = added_capabilities(&container).into_iter().collect();
    let expected: BTreeSet<String> = EXPECTED_CAPABILITIES.map(str::to_owned).into();
    assert_eq!(added, expected, "capabilities.add");
    assert_eq!(security["allowPrivilegeEscalation"], Value::Bool(false));
    assert_eq!(security["readOnlyRootFilesystem"], Value::Bool(true));

    let role = only(&objects, "ClusterRole");
    let rules = role["rules"].as_sequence().expect("rules");
    assert_eq!(rules.len(), 1, "one rule: {rules:?}");
    assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strings(&rules[0]["resources"]), ["pods", "services"]);
    assert_eq!(strings(&rules[0]["verbs"]), ["get", "list", "watch"]);
}

#[test]
fn probes_and_metrics_use_the_named_http_port() {
    let daemon_set = only(&objects(), "DaemonSet");
    let container = agent_container(&daemon_set);
    let ports = container["ports"].as_sequence().expect("ports");
    assert!(
        ports.iter().any(
            |p| p["name"].as_str() == Some("http") && p["containerPort"].as_u64() == Some(9470)
        ),
        "no port `http` 9470: {ports:?}"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(get["port"].as_str(), Some("http"), "{probe}");
        // The endpoint gives the engine thread 2 s to answer (`task/http.rs`): kubelet's
        // default of 1 s would fail a busy but healthy agent.
        let timeout = container[probe]["timeoutSeconds"].as_u64().unwrap_or(1);
        assert!(
            timeout >= 3,
            "{probe}: timeoutSeconds {timeout}, at least 3"
        );
    }
    let annotations = &daemon_set["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("9470"));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
}

// --- Configuration ---

/// The values the downward API gives on the pretend node.
fn downward_api(field: &str) -> String {
    match field {
        "spec.nodeName" => "node-1".to_owned(),
        "status.hostIP" => "192.0.2.10".to_owned(),
        "status.podIP" => "10.244.1.7".to_owned(),
        other => panic!("the test plays no downward-API field {other}"),
    }
}

#[test]
fn the_config_map_holds_configs_rover_yaml_and_loads_with_the_daemon_sets_environment() {
    let objects = objects();
    let config_map = only(&objects, "ConfigMap");
    let config = config_map["data"]["rover.yaml"]
        .as_str()
        .expect("data.rover.yaml");
    let shipped = std::fs::read_to_string(repository().join("configs/rover.yaml"))
        .expect("configs/rover.yaml");
    assert!(
        config == shipped,
        "the ConfigMap's rover.yaml differs from configs/rover.yaml: copy it over"
    );

    let daemon_set = only(&objects, "DaemonSet");
    let container = agent_container(&daemon_set);
    let env = container_env(&container, &downward_api);
    // Every variable is one the configuration reads (a misspelt one would be ignored), or one
    // another variable refers to as `$(NAME)`.
    let raw_values = serde_yaml::to_string(&container["env"]).expect("YAML");
    for (name, _) in &env {
        assert!(
            config.contains(&format!("${{{name}:")) || raw_values.contains(&format!("$({name})")),
            "the DaemonSet sets {name}, which neither configs/rover.yaml nor another variable reads"
        );
    }
    let lookup = |name: &str| {
        env.iter()
            .find(|(defined, _)| defined == name)
            .map(|(_, value)| value.clone())
    };
    let loaded = Settings::parse(config, &lookup)
        .unwrap_or_else(|error| panic!("the ConfigMap's configuration does not load: {error}"));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let settings = loaded.settings;
    let kubernetes = &settings.discovery.kubernetes;
    assert!(kubernetes.active, "Kubernetes discovery is off");
    assert_eq!(kubernetes.node_name.as_deref(), Some("node-1"));
    assert_eq!(
        Some(settings.backend.addr.to_string()),
        lookup("ROVER_BACKEND_ADDR")
    );
    assert_eq!(
        settings.rover_rs.host_ip,
        Some("192.0.2.10".parse().expect("an IP"))
    );
    assert_eq!(
        settings.rover_rs.http_listen,
        "10.244.1.7:9470".parse().expect("a socket address")
    );

    // The ConfigMap is mounted where the image's CMD reads its configuration.
    let mount = container["volumeMounts"][0]["mountPath"]
        .as_str()
        .expect("a volume mount");
    let args = strings(&container["args"]);
    assert_eq!(args, ["run", "--config", &format!("{mount}/rover.yaml")]);
    let cmd = dockerfile()
        .image()
        .and_then(|image| image.exec_form("CMD").ok().flatten());
    assert_eq!(Some(args), cmd, "the DaemonSet's args and the image's CMD");
}

// --- Capabilities, for real ---

/// A uid no file or process here belongs to: the agent runs as it, not as root.
const AGENT_UID: u32 = 4242;
/// `nobody`: the workloads run as it, another user than the agent.
const WORKLOAD_UID: u32 = 65534;

/// A process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Binaries copied where another user can run them (the build directory may not be).
struct Staged {
    dir: tempfile::TempDir,
}

impl Staged {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let staged = Self { dir };
        staged.copy(agent_binary(), "rover-agent");
        for workload in ["cpu_split", "sleeper"] {
            staged.copy(&workload_path(workload), workload);
        }
        // Where the agent, as AGENT_UID, writes its profiles.
        let output = staged.output_dir();
        std::fs::create_dir(&output).expect("mkdir");
        std::os::unix::fs::chown(&output, Some(AGENT_UID), Some(AGENT_UID)).expect("chown");
        staged
    }

    fn copy(&self, from: &Path, name: &str) {
        let to = self.dir.path().join(name);
        std::fs::copy(from, &to).unwrap_or_else(|error| panic!("copying {name}: {error}"));
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn output_dir(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Starts a workload as WORKLOAD_UID.
    fn workload(&self, name: &str, args: &[&str]) -> Running {
        let child = Command::new(self.path(name))
            .args(args)
            .stdout(Stdio::null())
            .uid(WORKLOAD_UID)
            .gid(WORKLOAD_UID)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {name} as uid {WORKLOAD_UID}: {error}"));
        // Past exec and the dynamic loader before profiling starts.
        std::thread::sleep(Duration::from_millis(300));
        Running(child)
    }

    /// The agent as AGENT_UID holding exactly `capabilities` (effective, permitted, inheritable,
    /// ambient and bounding: nothing else can be regained), without new privileges, as the
    /// DaemonSet's `drop: [ALL]`, `add:` and `allowPrivilegeEscalation: false` make it.
    fn agent(&self, capabilities: &[String]) -> Command {
        let mut set = String::from("-all");
        for capability in capabilities {
            set.push_str(",+");
            set.push_str(&capability.to_ascii_lowercase());
        }
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={AGENT_UID}"))
            .arg(format!("--regid={AGENT_UID}"))
            .arg("--clear-groups")
            .arg("--no-new-privs")
            .arg(format!("--inh-caps={set}"))
            .arg(format!("--ambient-caps={set}"))
            .arg(format!("--bounding-set={set}"))
            .arg("--")
            .arg(self.path("rover-agent"))
            .current_dir(self.dir.path());
        command
    }
}

/// One profile of a workload run as another user.
struct Outcome {
    run: AgentRun,
    folded: Option<Folded>,
}

impl Outcome {
    fn context(&self) -> String {
        let folded = self
            .folded
            .as_ref()
            .map(Folded::to_string)
            .unwrap_or_default();
        format!(
            "{folded}\nexit {:?}, stderr:\n{}",
            self.run.code, self.run.stderr
        )
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    OnCpu,
    OffCpu,
}

fn profile(staged: &Staged, capabilities: &[String], kind: Kind) -> Outcome {
    let (workload, args, kind_arg) = match kind {
        Kind::OnCpu => ("cpu_split", ["30"].as_slice(), "on-cpu"),
        // 1500 sleeps of 20 ms: asleep for the whole profile.
        Kind::OffCpu => ("sleeper", ["1500", "20"].as_slice(), "off-cpu"),
    };
    let running = staged.workload(workload, args);
    let pid = running.0.id().to_string();
    let output = staged.output_dir().join(format!("{kind_arg}.folded"));
    let _ = std::fs::remove_file(&output);
    let run = run_agent(
        staged
            .agent(capabilities)
            .args(["profile", "--type", kind_arg, "--pid", &pid])
            .args(["--duration", "2s", "--output"])
            .arg(&output),
    );
    drop(running);
    let folded = (run.success && output.exists()).then(|| Folded::read(&output));
    Outcome { run, folded }
}

/// Whether `outcome` is a good profile of its workload: the agent succeeded, the workload's own
/// functions are named and hold the time, and (off-CPU) the kernel frames under them are named.
fn symbolized(kind: Kind, outcome: &Outcome) -> Result<(), String> {
    let Some(folded) = &outcome.folded else {
        return Err("the agent failed".to_owned());
    };
    match kind {
        Kind::OnCpu => {
            let total = folded.process_total("cpu_split") as f64;
            let hot_a = folded.with_frame(|frame| frame == "hot_a") as f64;
            let hot = folded.with_frame(|frame| frame == "hot_a" || frame == "hot_b") as f64;
            // At 99 Hz for 2 s: up to 200 samples (fewer on a busy machine: the sample count is
            // oncpu.rs's business), hot_a about three quarters of them.
            if total < 20.0 {
                return Err(format!("only {total} samples of cpu_split"));
            }
            if hot < 0.8 * total || hot_a < 0.5 * total {
                return Err(format!(
                    "hot_a has {hot_a} and hot_a+hot_b {hot} of {total} samples"
                ));
            }
        }
        Kind::OffCpu => {
            let total = folded.process_total("sleeper") as f64;
            let named = folded.with_frame(|frame| frame == "sleep_in_named_function") as f64;
            // Weighted by microseconds off-CPU: about 2 s.
            if total < 1_000_000.0 {
                return Err(format!("only {total} µs off-CPU for sleeper"));
            }
            if named < 0.9 * total {
                return Err(format!("sleep_in_named_function has {named} of {total} µs"));
            }
            let in_kernel =
                folded.with_frame(|frame| frame.ends_with("_[k]") && frame.contains("nanosleep"));
            if (in_kernel as f64) < 0.9 * total {
                return Err(format!(
                    "kernel frames named *nanosleep* hold {in_kernel} of {total} µs"
                ));
            }
        }
    }
    Ok(())
}

/// Whether kallsyms shows addresses to everyone here (`kernel.kptr_restrict` 0 and
/// `kernel.perf_event_paranoid` at most 1): then CAP_SYSLOG changes nothing on this host.
fn kallsyms_open_to_everyone() -> bool {
    let sysctl = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
    };
    sysctl("kptr_restrict") == Some(0) && sysctl("perf_event_paranoid").is_some_and(|p| p <= 1)
}

fn root_for_setpriv(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        !under_ci(),
        "{test}: switching users and capabilities needs root, and CI=true forbids skipping"
    );
    eprintln!("\n*** SKIPPING {test}: switching users and capabilities needs root ***\n");
    false
}

#[test]
fn profile_another_users_process_with_the_manifests_capabilities() {
    let test = "profile_another_users_process_with_the_manifests_capabilities";
    if !bpf_available(test) || !root_for_setpriv(test) {
        return;
    }
    let capabilities = added_capabilities(&agent_container(&only(&objects(), "DaemonSet")));
    let _lock = machine_lock();
    let staged = Staged::new();

    // `check` under the same capabilities sees each of them and passes.
    let check = run_agent(staged.agent(&capabilities).arg("check"));
    assert!(
        check.success,
        "check fails with {capabilities:?}:\n{}{}",
        check.stdout, check.stderr
    );

    for kind in [Kind::OnCpu, Kind::OffCpu] {
        let outcome = profile(&staged, &capabilities, kind);
        if let Err(problem) = symbolized(kind, &outcome) {
            panic!(
                "{kind:?} with the manifest's capabilities {capabilities:?}: {problem}\n{}",
                outcome.context()
            );
        }
    }

    // Each capability is needed: without it, one of the two profiles fails or loses names.
    for missing in &capabilities {
        if missing == "SYSLOG" && kallsyms_open_to_everyone() {
            eprintln!("not checking that SYSLOG is needed: this host shows kallsyms to anyone");
            continue;
        }
        let fewer: Vec<String> = capabilities
            .iter()
            .filter(|c| *c != missing)
            .cloned()
            .collect();
        let outcomes: Vec<(Kind, Outcome)> = [Kind::OnCpu, Kind::OffCpu]
            .into_iter()
            .map(|kind| (kind, profile(&staged, &fewer, kind)))
            .collect();
        assert!(
            outcomes
                .iter()
                .any(|(kind, outcome)| symbolized(*kind, outcome).is_err()),
            "{missing} is in the manifest but not needed: both profiles are good without it\n{}",
            outcomes
                .iter()
                .map(|(kind, outcome)| format!("{kind:?}:\n{}", outcome.context()))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// --- Dockerfile ---

fn dockerfile() -> Dockerfile {
    Dockerfile::read(&repository().join("deploy/docker/Dockerfile"))
}

/// `cargo metadata` of the workspace: package name → its binaries.
fn workspace_packages() -> Vec<(String, Vec<String>)> {
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(repository().join("Cargo.toml"))
        .output()
        .expect("running cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|package| {
            let name = package["name"].as_str().expect("a name").to_owned();
            let bins = package["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|target| {
                    target["kind"]
                        .as_array()
                        .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"))
                })
                .filter_map(|target| target["name"].as_str().map(str::to_owned))
                .collect();
            (name, bins)
        })
        .collect()
}

/// The value of `-p X`, `-pX`, `--package X` or `--package=X` options.
fn packages_of(command: &[String]) -> Vec<String> {
    let mut packages = Vec::new();
    let mut words = command.iter();
    while let Some(word) = words.next() {
        if word == "-p" || word == "--package" {
            packages.extend(words.next().cloned());
        } else if let Some(package) = word.strip_prefix("--package=") {
            packages.push(package.to_owned());
        } else if let Some(package) = word.strip_prefix("-p").filter(|p| !p.is_empty()) {
            packages.push(package.to_owned());
        }
    }
    packages
}

#[test]
fn the_dockerfile_runs_builds_and_copies_only_what_the_project_has() {
    let file = dockerfile();
    let build = file.stage("build").expect("a stage named build");
    let image = file.image().expect("a final stage");
    let packages = workspace_packages();
    let readme = std::fs::read_to_string(repository().join("README.md")).expect("README.md");
    let xtask = workspace_binary("xtask", "xtask");

    let mut products = Vec::new();
    for command in build.run_commands() {
        if command.first().map(String::as_str) != Some("cargo") {
            continue;
        }
        // Built with the README's own commands.
        let line = command.join(" ");
        assert!(readme.contains(&line), "`{line}` is not in the README");
        match command.get(1).map(String::as_str) {
            Some("xtask") => {
                let task = command.get(2).expect("cargo xtask TASK");
                let help = Command::new(&xtask)
                    .args([task, "--help"])
                    .output()
                    .expect("running xtask");
                assert!(
                    help.status.success(),
                    "`{line}`: xtask has no task {task}: {}",
                    String::from_utf8_lossy(&help.stderr)
                );
            }
            Some("build") => {
                assert!(
                    !command.iter().any(|word| word.starts_with("--target-dir")),
                    "`{line}`: the product paths below assume the default target directory"
                );
                let profile = if command.iter().any(|word| word == "--release") {
                    "release"
                } else {
                    "debug"
                };
                let built = packages_of(&command);
                assert!(!built.is_empty(), "`{line}` names no package");
                for package in built {
                    let bins = packages
                        .iter()
                        .find(|(name, _)| *name == package)
                        .map(|(_, bins)| bins)
                        .unwrap_or_else(|| panic!("`{line}`: {package} is no workspace member"));
                    for bin in bins {
                        products.push(build.workdir().join("target").join(profile).join(bin));
                    }
                }
            }
            other => panic!("`{line}`: the test knows no cargo {other:?}"),
        }
    }
    assert!(
        !build
            .all("ENV")
            .any(|env| env.arguments.contains("CARGO_TARGET_DIR")),
        "the build stage moves the target directory"
    );

    let copies = image.copies().expect("the COPY lines parse");
    let mut binary_destinations = Vec::new();
    for copy in &copies {
        match copy.from.as_deref() {
            Some(stage) => {
                assert_eq!(stage, "build", "line {}: COPY from {stage}", copy.line);
                for source in &copy.sources {
                    assert!(
                        products.contains(&PathBuf::from(source)),
                        "line {}: {source} is not built by the build stage (it builds {products:?})",
                        copy.line
                    );
                }
                binary_destinations.push(copy.destination.clone());
            }
            None => {
                for source in &copy.sources {
                    assert!(
                        repository().join(source).exists(),
                        "line {}: COPY {source}: no such path in the repository",
                        copy.line
                    );
                }
            }
        }
    }
    // The build stage copies the context: its own COPY sources exist too.
    for copy in build.copies().expect("the COPY lines parse") {
        for source in &copy.sources {
            assert!(repository().join(source).exists(), "COPY {source}");
        }
    }

    let entrypoint = image
        .exec_form("ENTRYPOINT")
        .expect("ENTRYPOINT in exec form")
        .expect("an ENTRYPOINT");
    assert_eq!(entrypoint.len(), 1, "{entrypoint:?}");
    assert!(
        binary_destinations.contains(&entrypoint[0]),
        "ENTRYPOINT {} is not the binary copied from the build stage ({binary_destinations:?})",
        entrypoint[0]
    );
    // CMD's configuration file is one the image holds.
    let cmd = image
        .exec_form("CMD")
        .expect("CMD in exec form")
        .expect("a CMD");
    let config = cmd
        .iter()
        .skip_while(|word| *word != "--config")
        .nth(1)
        .expect("CMD passes --config");
    let in_repository = copies
        .iter()
        .filter(|copy| copy.from.is_none())
        .find_map(|copy| {
            let relative = Path::new(config).strip_prefix(&copy.destination).ok()?;
            copy.sources
                .iter()
                .map(|source| repository().join(source).join(relative))
                .find(|path| path.is_file())
        });
    assert!(
        in_repository.is_some(),
        "CMD's --config {config} is not copied into the image"
    );
}
