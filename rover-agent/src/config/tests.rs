use std::path::Path;
use std::time::Duration;

use super::*;

const ROVER_070: &str = include_str!("testdata/rover_configs_0.7.0.yaml");
const ROVER_050_SCANNER: &str = include_str!("testdata/rover_configs_0.5.0_scanner.yaml");
const SHIPPED: &str = include_str!("../../../configs/rover.yaml");

fn no_env(_: &str) -> Option<String> {
    None
}

fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

fn load(yaml: &str) -> Loaded {
    Settings::parse(yaml, &no_env).expect("the configuration loads")
}

fn load_env(yaml: &str, vars: &[(&str, &str)]) -> Loaded {
    Settings::parse(yaml, &env_of(vars)).expect("the configuration loads")
}

fn err(yaml: &str) -> String {
    Settings::parse(yaml, &no_env)
        .expect_err("the configuration is refused")
        .to_string()
}

/// The error names every one of `parts` (the key path, the value, what is expected).
fn assert_err(yaml: &str, parts: &[&str]) {
    let e = err(yaml);
    for part in parts {
        assert!(e.contains(part), "`{part}` not in: {e}");
    }
}

const S: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn rover_070_file_loads_with_warnings_only_for_unimplemented_sections() {
    let Loaded { settings, warnings } = load(ROVER_070);
    assert_eq!(
        warnings,
        [
            "profiling.task.network: not supported by rover-rs, ignored",
            "access_log: not supported by rover-rs, ignored",
            "pprof: not supported by rover-rs, ignored",
        ]
    );
    assert_eq!(settings.log_level, LevelFilter::INFO);
    assert_eq!(settings.log_level.to_string(), "info");
    assert_eq!(settings.cluster_name, None);
    assert_eq!(
        settings.backend,
        BackendSettings {
            addr: BackendAddr {
                host: "localhost".into(),
                port: 11800
            },
            tls: None,
            check_period: S(5),
            // `${ROVER_BACKEND_AUTHENTICATION:""}`: the quotes are not a token.
            authentication: None,
        }
    );
    let d = &settings.discovery;
    assert_eq!(d.heartbeat_period, S(20));
    assert_eq!(d.properties_report_period, 10);
    assert!(d.scanner.is_none());
    let k = &d.kubernetes;
    assert!(k.active);
    assert_eq!(k.node_name, None);
    assert!(k.namespaces.is_empty());
    assert_eq!(k.analyzers.len(), 3);
    assert_eq!(
        k.analyzers[0],
        KubernetesAnalyzerSettings {
            active: true,
            filters: vec![
                r#".Pod.HasContainer "istio-proxy""#.into(),
                r#"eq .Container.Name "istio-proxy""#.into(),
            ],
            layer: "MESH_DP".into(),
            service_name: r#"{{.Pod.LabelValue "service.istio.io/canonical-name,app.kubernetes.io/name,app" ""}}.{{.Pod.Namespace}}"#.into(),
            instance_name: "{{.Pod.Name}}".into(),
            process_name: "{{.Process.ExeName}}".into(),
            labels: vec!["mesh-envoy".into()],
        }
    );
    assert_eq!(k.analyzers[1].layer, "MESH");
    assert_eq!(k.analyzers[2].filters, [".Pod.HasServiceName"]);
    assert_eq!(
        k.analyzers[2].service_name,
        "{{.Pod.ServiceName}}.{{.Pod.Namespace}}"
    );
    assert_eq!(k.analyzers[2].labels, ["k8s-service"]);
    assert_eq!(settings.profiling, default_profiling());
    assert_eq!(settings.rover_rs, default_rover_rs());
}

fn default_profiling() -> ProfilingSettings {
    ProfilingSettings {
        active: true,
        check_interval: S(10),
        flush_interval: S(5),
        on_cpu_dump_period: Duration::from_millis(9),
        continuous: ContinuousSettings {
            meter_prefix: "rover_con_p".into(),
            fetch_interval: S(1),
            check_interval: S(5),
            execute_duration: S(600),
            silence_duration: S(1200),
        },
    }
}

fn default_rover_rs() -> RoverRsSettings {
    RoverRsSettings {
        off_cpu_sample_probability: 1.0,
        map_memory: 32 * 1024 * 1024,
        max_targets: 1024,
        upload_buffer: 16 * 1024 * 1024,
        shutdown_deadline: S(5),
        max_triggered_runs: 10,
        http_listen: DEFAULT_HTTP_LISTEN,
        host_ip: None,
    }
}

#[test]
fn rover_environment_names_override() {
    let Loaded { settings, warnings } = load_env(
        ROVER_070,
        &[
            ("ROVER_LOGGER_LEVEL", "Warning"),
            ("ROVER_CORE_CLUSTER_NAME", "prod"),
            ("ROVER_BACKEND_ADDR", "oap.skywalking:11800"),
            ("ROVER_BACKEND_ENABLE_TLS", "true"),
            ("ROVER_BACKEND_CA_PEM_PATH", "/etc/rover/ca.pem"),
            ("ROVER_BACKEND_INSECURE_SKIP_VERIFY", "1"),
            ("ROVER_BACKEND_CHECK_PERIOD", "7"),
            ("ROVER_BACKEND_AUTHENTICATION", "secret-token"),
            ("ROVER_PROCESS_DISCOVERY_HEARTBEAT_PERIOD", "1m"),
            ("ROVER_PROCESS_DISCOVERY_PROPERTIES_REPORT_PERIOD", "3"),
            ("ROVER_PROCESS_DISCOVERY_KUBERNETES_ACTIVE", "false"),
            ("ROVER_PROCESS_DISCOVERY_KUBERNETES_NODE_NAME", "node-1"),
            (
                "ROVER_PROCESS_DISCOVERY_KUBERNETES_NAMESPACES",
                "default, shop",
            ),
            (
                "ROVER_PROCESS_DISCOVERY_KUBERNETES_ANALYZER_K8S_SERVICE_LABLES",
                "a,b",
            ),
            ("ROVER_PROFILING_FLUSH_INTERVAL", "30s"),
            ("ROVER_PROFILING_TASK_ON_CPU_DUMP_PERIOD", "1ms"),
            (
                "ROVER_PROFILING_CONTINUOUS_TRIGGER_EXECUTE_DURATION",
                "1h30m",
            ),
        ],
    );
    assert_eq!(warnings.len(), 3);
    assert_eq!(settings.log_level, LevelFilter::WARN);
    assert_eq!(settings.cluster_name.as_deref(), Some("prod"));
    let b = &settings.backend;
    assert_eq!(b.addr.to_string(), "oap.skywalking:11800");
    assert_eq!(b.check_period, S(7));
    assert_eq!(b.authentication.as_deref(), Some("secret-token"));
    assert_eq!(
        b.tls,
        Some(TlsSettings {
            ca_pem_path: Some("/etc/rover/ca.pem".into()),
            // The shipped defaults `"client.pem"` / `"client.key"`, quotes removed.
            client: Some(ClientCertSettings {
                pem_path: "client.pem".into(),
                key_path: "client.key".into(),
            }),
            insecure_skip_verify: true,
        })
    );
    let d = &settings.discovery;
    assert_eq!(d.heartbeat_period, S(60));
    assert_eq!(d.properties_report_period, 3);
    assert!(!d.kubernetes.active);
    assert_eq!(d.kubernetes.node_name.as_deref(), Some("node-1"));
    assert_eq!(d.kubernetes.namespaces, ["default", "shop"]);
    assert_eq!(d.kubernetes.analyzers[2].labels, ["a", "b"]);
    let p = &settings.profiling;
    assert_eq!(p.flush_interval, S(30));
    assert_eq!(p.on_cpu_dump_period, Duration::from_millis(1));
    assert_eq!(p.continuous.execute_duration, S(5400));
}

#[test]
fn an_empty_variable_gives_the_default_as_in_rover() {
    let settings = load_env(
        ROVER_070,
        &[
            ("ROVER_BACKEND_ADDR", ""),
            ("ROVER_PROFILING_FLUSH_INTERVAL", ""),
            (
                "ROVER_PROCESS_DISCOVERY_KUBERNETES_ANALYZER_K8S_SERVICE_INSTANCE_NAME",
                "",
            ),
        ],
    )
    .settings;
    assert_eq!(settings.backend.addr.to_string(), "localhost:11800");
    assert_eq!(settings.profiling.flush_interval, S(5));
    assert_eq!(
        settings.discovery.kubernetes.analyzers[2].instance_name,
        "{{.Pod.Name}}"
    );
}

#[test]
fn defaults_when_keys_are_missing() {
    for yaml in [
        "",
        "{}",
        "logger:\ncore:\n  backend:\nprofiling:\n  task:\n",
    ] {
        let Loaded { settings, warnings } = load(yaml);
        assert!(warnings.is_empty(), "{yaml}: {warnings:?}");
        assert_eq!(settings.log_level, LevelFilter::INFO);
        assert_eq!(settings.cluster_name, None);
        assert_eq!(settings.backend.addr.to_string(), "localhost:11800");
        assert_eq!(settings.backend.tls, None);
        assert_eq!(settings.backend.check_period, S(5));
        assert_eq!(settings.backend.authentication, None);
        let d = &settings.discovery;
        assert_eq!(
            (d.heartbeat_period, d.properties_report_period),
            (S(20), 10)
        );
        assert!(d.scanner.is_none());
        assert!(!d.kubernetes.active && d.kubernetes.analyzers.is_empty());
        assert_eq!(settings.profiling, default_profiling());
        assert_eq!(settings.rover_rs, default_rover_rs());
    }
}

#[test]
fn the_shipped_example_loads_without_warnings() {
    let Loaded { settings, warnings } = load(SHIPPED);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(settings.backend.addr.to_string(), "localhost:11800");
    assert_eq!(settings.backend.tls, None);
    assert!(settings.discovery.scanner.is_none());
    assert!(!settings.discovery.kubernetes.active);
    assert_eq!(settings.discovery.kubernetes.analyzers.len(), 4);
    assert_eq!(settings.profiling, default_profiling());
    assert_eq!(settings.rover_rs, default_rover_rs());

    let over = load_env(
        SHIPPED,
        &[
            ("ROVER_RS_OFF_CPU_SAMPLE_PROBABILITY", "0.25"),
            ("ROVER_RS_MAP_MEMORY", "64MiB"),
            ("ROVER_RS_MAX_TARGETS", "16"),
            ("ROVER_RS_UPLOAD_BUFFER", "1GB"),
            ("ROVER_RS_SHUTDOWN_DEADLINE", "0"),
            ("ROVER_RS_MAX_TRIGGERED_RUNS", "3"),
            ("ROVER_RS_HTTP_LISTEN", "10.1.2.3:9000"),
            ("ROVER_RS_HOST_IP", "192.168.7.8"),
        ],
    )
    .settings
    .rover_rs;
    assert_eq!(
        over,
        RoverRsSettings {
            off_cpu_sample_probability: 0.25,
            map_memory: 64 * 1024 * 1024,
            max_targets: 16,
            upload_buffer: 1_000_000_000,
            shutdown_deadline: Duration::ZERO,
            max_triggered_runs: 3,
            http_listen: "10.1.2.3:9000".parse().expect("a socket address"),
            host_ip: Some("192.168.7.8".parse().expect("an IP address")),
        }
    );
}

#[test]
fn scanner_from_a_rover_050_section() {
    let Loaded { settings, warnings } = load_env(
        ROVER_050_SCANNER,
        &[
            ("ROVER_PROCESS_DISCOVERY_SCAN_MODE", "REGEX"),
            ("ROVER_PROCESS_DISCOVERY_SCAN_PERIOD", "10s"),
            (
                "ROVER_PROCESS_DISCOVERY_REGEX_SCANNER_MATCH_CMD",
                "java .*-jar orders",
            ),
            (
                "ROVER_PROCESS_DISCOVERY_REGEX_SCANNER_SERVICE_NAME",
                "orders",
            ),
            ("ROVER_PROCESS_DISCOVERY_REGEX_SCANNER_LABELS", "java,shop"),
        ],
    );
    assert_eq!(
        warnings,
        ["process_discovery.scanner.agent: not supported by rover-rs, ignored"]
    );
    let scanner = settings.discovery.scanner.expect("REGEX mode scans");
    assert_eq!(scanner.period, S(10));
    let [orders, nginx] = &scanner.rules[..] else {
        panic!("two rules: {:?}", scanner.rules);
    };
    assert!(
        orders
            .match_cmd
            .is_match("/usr/bin/java -Xmx1g -jar orders.jar")
    );
    assert_eq!(orders.layer, "OS_LINUX");
    assert_eq!(orders.service_name, "orders");
    assert_eq!(orders.instance_name, r#"{{.Rover.HostIPV4 "en0"}}"#);
    assert_eq!(orders.process_name, "{{.Process.ExeName}}");
    assert_eq!(orders.labels, ["java", "shop"]);
    assert!(nginx.match_cmd.is_match("nginx: worker process"));
    assert_eq!(nginx.service_name, "nginx");
    assert_eq!(nginx.layer, "OS_LINUX");
    assert_eq!(nginx.instance_name, r#"{{.Rover.HostIPV4 "en0"}}"#);
    assert_eq!(nginx.labels, ["web", "proxy"]);

    // Rover 0.5.0's shipped mode: one warning, the scanner is off, the rules are not read.
    let Loaded { settings, warnings } = load(ROVER_050_SCANNER);
    assert!(settings.discovery.scanner.is_none());
    assert_eq!(
        warnings,
        [
            "process_discovery.scanner.mode: AGENT_SENSOR is not supported by rover-rs, the scanner is off"
        ]
    );

    // A missing mode is REGEX.
    let s = load(
        "process_discovery:\n  scanner:\n    regex:\n      - match_cmd: x\n        service_name: s\n",
    );
    assert_eq!(s.settings.discovery.scanner.map(|s| s.rules.len()), Some(1));
}

#[test]
fn keys_ignore_case_and_a_key_twice_is_an_error() {
    let s = load("CORE:\n  Backend:\n    ENABLE_tls: true\n").settings;
    assert!(s.backend.tls.is_some());
    assert_err(
        "core:\n  backend:\n    enable_TLS: true\n    enable_tls: true\n",
        &["core.backend.enable_tls", "only once"],
    );
}

#[test]
fn text_around_a_placeholder_is_dropped_with_a_warning() {
    let Loaded { settings, warnings } =
        load("core:\n  cluster_name: prod-${ROVER_CORE_CLUSTER_NAME:eu}\n");
    assert_eq!(settings.cluster_name.as_deref(), Some("eu"));
    assert_eq!(
        warnings,
        [
            "core.cluster_name: the text around ${ROVER_CORE_CLUSTER_NAME:eu} is dropped, as Rover does; the value is `eu`"
        ]
    );
}

#[test]
fn an_unknown_key_is_named_with_a_suggestion() {
    assert_eq!(
        err("core:\n  backend:\n    adr: oap:11800\n"),
        "unknown key `core.backend.adr` (did you mean `core.backend.addr`?)"
    );
    assert_eq!(
        err("profilng:\n  active: true\n"),
        "unknown key `profilng` (did you mean `profiling`?)"
    );
    assert_eq!(
        err("rover_rs:\n  nonsense: 1\n"),
        "unknown key `rover_rs.nonsense`"
    );
    assert_err(
        "process_discovery:\n  scanner:\n    mode: REGEX\n    regex:\n      - match_cmd: x\n        service_name: s\n        proces_name: p\n",
        &[
            "unknown key `process_discovery.scanner.regex[0].proces_name`",
            "process_name",
        ],
    );
    assert_err(
        "process_discovery:\n  kubernetes:\n    analyzers:\n      - actve: true\n",
        &["process_discovery.kubernetes.analyzers[0].actve"],
    );
    assert_err(
        "profiling:\n  task:\n    off_cpu: {}\n",
        &["profiling.task.off_cpu"],
    );
}

#[test]
fn a_bad_duration_is_named_with_its_value_after_substitution() {
    assert_err(
        "profiling:\n  flush_interval: 5 seconds\n",
        &["`profiling.flush_interval`", "`5 seconds`", "duration"],
    );
    let e = Settings::parse(
        ROVER_070,
        &env_of(&[("ROVER_PROFILING_FLUSH_INTERVAL", "soon")]),
    )
    .expect_err("refused")
    .to_string();
    assert!(e.contains("`profiling.flush_interval`: `soon`"), "{e}");
    assert_err(
        "process_discovery:\n  heartbeat_period: 20\n",
        &["process_discovery.heartbeat_period", "`20`"],
    );
    assert_err(
        "profiling:\n  continuous:\n    trigger:\n      silence_duration: 0s\n",
        &[
            "profiling.continuous.trigger.silence_duration",
            "greater than zero",
        ],
    );
    assert_err(
        "rover_rs:\n  shutdown_deadline: -1s\n",
        &["rover_rs.shutdown_deadline", "`-1s`"],
    );
    // A host name is not an address to listen on, nor is an address without its port.
    for bad in ["localhost:9470", "127.0.0.1", "127.0.0.1:99999"] {
        assert_err(
            &format!("rover_rs:\n  http_listen: {bad}\n"),
            &["rover_rs.http_listen", &format!("`{bad}`")],
        );
    }
}

#[test]
fn backend_addresses() {
    let addr = |a: &str| {
        load(&format!("core:\n  backend:\n    addr: \"{a}\"\n"))
            .settings
            .backend
            .addr
    };
    assert_eq!(addr("10.0.0.7:11800").to_string(), "10.0.0.7:11800");
    let v6 = addr("[fd00::1]:11800");
    assert_eq!((v6.host.as_str(), v6.port), ("fd00::1", 11800));
    assert_eq!(v6.to_string(), "[fd00::1]:11800");
    for bad in [
        "localhost",
        "localhost:",
        "localhost:0",
        "localhost:65536",
        "localhost:+80",
        "fd00::1:11800",
        "[fd00::1]",
        "[nonsense]:1",
        "http://oap:11800",
        "10.0.0.300:11800",
        ":11800",
    ] {
        assert_err(
            &format!("core:\n  backend:\n    addr: \"{bad}\"\n"),
            &["`core.backend.addr`", &format!("`{bad}`"), "host:port"],
        );
    }
}

#[test]
fn check_period_takes_seconds_or_a_duration() {
    let period = |p: &str| {
        load(&format!("core:\n  backend:\n    check_period: {p}\n"))
            .settings
            .backend
            .check_period
    };
    assert_eq!(period("7"), S(7));
    assert_eq!(period("1500ms"), Duration::from_millis(1500));
    assert_err(
        "core:\n  backend:\n    check_period: 0\n",
        &["core.backend.check_period", "`0`"],
    );
}

#[test]
fn bad_bools_ints_and_levels_are_named() {
    assert_err(
        "core:\n  backend:\n    enable_TLS: yes\n",
        &["`core.backend.enable_TLS`", "`yes`", "true or false"],
    );
    assert_err("profiling:\n  active: 2\n", &["`profiling.active`", "`2`"]);
    assert_err(
        "process_discovery:\n  properties_report_period: 0\n",
        &[
            "`process_discovery.properties_report_period`",
            "`0`",
            "at least 1",
        ],
    );
    assert_err(
        "process_discovery:\n  properties_report_period: ten\n",
        &["`ten`"],
    );
    assert_err(
        "rover_rs:\n  max_targets: -1\n",
        &["`rover_rs.max_targets`", "`-1`"],
    );
    assert_err(
        "rover_rs:\n  max_targets: 5000000000\n",
        &["`rover_rs.max_targets`"],
    );
    assert_err(
        "logger:\n  level: verbose\n",
        &["`logger.level`", "`verbose`", "trace"],
    );
}

#[test]
fn bad_and_empty_match_cmd_are_named() {
    let rules = |second: &str| {
        format!(
            "process_discovery:\n  scanner:\n    mode: REGEX\n    regex:\n      - match_cmd: ok\n        service_name: a\n      - match_cmd: {second}\n        service_name: b\n"
        )
    };
    assert_err(
        &rules("\"java (\""),
        &[
            "`process_discovery.scanner.regex[1].match_cmd`",
            "`java (`",
            "regular expression",
        ],
    );
    assert_err(
        &rules("\"\""),
        &["`process_discovery.scanner.regex[1].match_cmd`", "``"],
    );
    assert_err(
        &rules("~"),
        &["`process_discovery.scanner.regex[1].match_cmd`"],
    );
    // Rover 0.5.0's shipped rule in REGEX mode, without the variables it needs.
    let e = Settings::parse(
        ROVER_050_SCANNER,
        &env_of(&[("ROVER_PROCESS_DISCOVERY_SCAN_MODE", "REGEX")]),
    )
    .expect_err("refused")
    .to_string();
    assert!(
        e.contains("`process_discovery.scanner.regex[0].match_cmd`"),
        "{e}"
    );
    assert_err(
        "process_discovery:\n  scanner:\n    regex:\n      - match_cmd: x\n",
        &["`process_discovery.scanner.regex[0].service_name`"],
    );
    assert_err(
        "process_discovery:\n  scanner:\n    mode: REGEX\n",
        &["`process_discovery.scanner.regex`", "at least one rule"],
    );
    assert_err(
        "process_discovery:\n  scanner:\n    mode: EBPF\n",
        &[
            "`process_discovery.scanner.mode`",
            "`EBPF`",
            "REGEX or AGENT_SENSOR",
        ],
    );
}

#[test]
fn a_client_pem_without_its_key_names_both_keys() {
    let tls = "core:\n  backend:\n    enable_TLS: true\n";
    for (set, missing) in [
        ("client_pem_path", "client_key_path"),
        ("client_key_path", "client_pem_path"),
    ] {
        let e = err(&format!("{tls}    {set}: /etc/rover/x\n"));
        assert!(e.contains(&format!("`core.backend.{set}`")), "{e}");
        assert!(e.contains(&format!("`core.backend.{missing}`")), "{e}");
    }
    // Without TLS the paths are not read, as in Rover.
    let s = load("core:\n  backend:\n    client_pem_path: /x\n").settings;
    assert_eq!(s.backend.tls, None);
}

#[test]
fn dump_period_must_be_between_1ms_and_1s() {
    let on_cpu = |p: &str| format!("profiling:\n  task:\n    on_cpu:\n      dump_period: {p}\n");
    for ok in ["1ms", "1s", "10ms", "1000us"] {
        load(&on_cpu(ok));
    }
    for bad in ["999us", "1001ms", "2s", "0", "fast"] {
        assert_err(
            &on_cpu(bad),
            &[
                "`profiling.task.on_cpu.dump_period`",
                &format!("`{bad}`"),
                "between 1ms and 1s",
            ],
        );
    }
}

#[test]
fn probability_must_be_in_0_1() {
    assert_eq!(
        load("rover_rs:\n  off_cpu_sample_probability: 0.01\n")
            .settings
            .rover_rs
            .off_cpu_sample_probability,
        0.01
    );
    for bad in ["0", "1.5", "-0.5", ".nan", "NaN", "half"] {
        assert_err(
            &format!("rover_rs:\n  off_cpu_sample_probability: {bad}\n"),
            &["`rover_rs.off_cpu_sample_probability`", "0 < p <= 1"],
        );
    }
}

#[test]
fn bad_byte_sizes_are_named() {
    for bad in ["32 parsecs", "0", "0MiB", "lots", "-1MiB"] {
        assert_err(
            &format!("rover_rs:\n  map_memory: {bad}\n"),
            &["`rover_rs.map_memory`", &format!("`{bad}`"), "byte size"],
        );
    }
    assert_err(
        "rover_rs:\n  upload_buffer: 16 MiBs\n",
        &["`rover_rs.upload_buffer`"],
    );
    assert_eq!(
        load("rover_rs:\n  upload_buffer: 1.5 KiB\n")
            .settings
            .rover_rs
            .upload_buffer,
        1536
    );
}

#[test]
fn wrong_shapes_are_named() {
    assert_err("core: [1, 2]\n", &["`core`", "a list", "a mapping"]);
    assert_err(
        "core:\n  backend:\n    addr: [a]\n",
        &["`core.backend.addr`", "a single value"],
    );
    assert_err(
        "process_discovery:\n  scanner:\n    regex: x\n",
        &["`process_discovery.scanner.regex`", "a list"],
    );
    assert_err("- a\n- b\n", &["(the whole file)", "a mapping"]);
}

#[test]
fn a_missing_file_and_bad_yaml_are_errors() {
    let path = Path::new("/nonexistent/rover-rs/rover.yaml");
    let e = Settings::load(path).expect_err("no such file");
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(
        e.to_string().contains("/nonexistent/rover-rs/rover.yaml"),
        "{e}"
    );
    assert!(matches!(
        Settings::parse("core: [\n", &no_env),
        Err(ConfigError::Yaml(_))
    ));
}

#[test]
fn odd_inputs_do_not_panic() {
    let deep = "[".repeat(10_000);
    let inputs = [
        "~",
        "42",
        "\"text\"",
        "!!binary aGk=",
        "core: !tag {a: 1}",
        "? [a, b]\n: c\n",
        "1: 2\n",
        "core:\n  backend:\n    addr: ${ROVER_BACKEND_ADDR:${X:y}}\n",
        "a: &x {b: *x}\n",
        "<<: {logger: {level: debug}}\n",
        "process_discovery:\n  scanner:\n    regex:\n      - ~\n      - [1]\n",
        "rover_rs:\n  map_memory: 99999999999999999999999EiB\n",
        "profiling:\n  flush_interval: 9999999999999999999999h\n",
        &deep,
    ];
    for yaml in inputs {
        let _ = Settings::parse(yaml, &no_env);
    }
}

/// Every `profiling.continuous` key from Rover's environment names, in Rover's file and ours.
#[test]
fn continuous_keys_take_rovers_environment_names() {
    let vars = [
        ("ROVER_PROFILING_CONTINUOUS_METER_PREFIX", "my_meters"),
        ("ROVER_PROFILING_CONTINUOUS_FETCH_INTERVAL", "500ms"),
        ("ROVER_PROFILING_CONTINUOUS_CHECK_INTERVAL", "10s"),
        ("ROVER_PROFILING_CONTINUOUS_TRIGGER_EXECUTE_DURATION", "5m"),
        ("ROVER_PROFILING_CONTINUOUS_TRIGGER_SILENCE_DURATION", "1h"),
    ];
    for file in [ROVER_070, SHIPPED] {
        let continuous = load_env(file, &vars).settings.profiling.continuous;
        assert_eq!(
            continuous,
            ContinuousSettings {
                meter_prefix: "my_meters".into(),
                fetch_interval: Duration::from_millis(500),
                check_interval: S(10),
                execute_duration: S(300),
                silence_duration: S(3600),
            }
        );
    }
    // An empty variable gives the default, as in Rover.
    let empty: Vec<_> = vars.iter().map(|(name, _)| (*name, "")).collect();
    assert_eq!(
        load_env(ROVER_070, &empty).settings.profiling.continuous,
        default_profiling().continuous
    );
}

#[test]
fn bad_continuous_values_name_their_key() {
    for key in ["fetch_interval", "check_interval"] {
        for bad in ["0", "0s", "soon", "-1s", "5"] {
            assert_err(
                &format!("profiling:\n  continuous:\n    {key}: {bad}\n"),
                &[
                    &format!("`profiling.continuous.{key}`"),
                    &format!("`{bad}`"),
                    "greater than zero",
                ],
            );
        }
    }
    for key in ["execute_duration", "silence_duration"] {
        assert_err(
            &format!("profiling:\n  continuous:\n    trigger:\n      {key}: 10 minutes\n"),
            &[
                &format!("`profiling.continuous.trigger.{key}`"),
                "`10 minutes`",
            ],
        );
    }
    let e = Settings::parse(
        ROVER_070,
        &env_of(&[("ROVER_PROFILING_CONTINUOUS_FETCH_INTERVAL", "often")]),
    )
    .expect_err("refused")
    .to_string();
    assert!(
        e.contains("`profiling.continuous.fetch_interval`: `often`"),
        "{e}"
    );
    assert_err(
        "profiling:\n  continuous:\n    trigger:\n      silence: 1m\n",
        &["unknown key `profiling.continuous.trigger.silence`"],
    );
    // A blank prefix is the default one (meter names need a prefix).
    assert_eq!(
        load("profiling:\n  continuous:\n    meter_prefix: \" \"\n")
            .settings
            .profiling
            .continuous
            .meter_prefix,
        "rover_con_p"
    );
}

#[test]
fn max_triggered_runs_is_at_least_one() {
    assert_eq!(
        load("rover_rs:\n  max_triggered_runs: 1\n")
            .settings
            .rover_rs
            .max_triggered_runs,
        1
    );
    for bad in ["0", "-1", "two", "4294967296", "1.5"] {
        assert_err(
            &format!("rover_rs:\n  max_triggered_runs: {bad}\n"),
            &[
                "`rover_rs.max_triggered_runs`",
                &format!("`{bad}`"),
                "at least 1",
            ],
        );
    }
}

#[test]
fn bad_listen_and_host_addresses_are_named() {
    for bad in [
        "9470",
        "localhost:9470",
        "10.0.0.1",
        "[::1]",
        "10.0.0.1:99999",
    ] {
        assert_err(
            &format!("rover_rs:\n  http_listen: \"{bad}\"\n"),
            &["`rover_rs.http_listen`", &format!("`{bad}`"), "a port"],
        );
    }
    assert_eq!(
        load("rover_rs:\n  http_listen: \"[::]:9470\"\n")
            .settings
            .rover_rs
            .http_listen,
        "[::]:9470".parse().expect("a socket address")
    );
    for bad in ["node-1", "10.0.0.256", "10.0.0.1:80"] {
        assert_err(
            &format!("rover_rs:\n  host_ip: \"{bad}\"\n"),
            &["`rover_rs.host_ip`", &format!("`{bad}`"), "IPv4 or IPv6"],
        );
    }
}
