//! Analyzers against fixture pods, services, containers and processes with known names.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::{Value as Json, json};

use super::*;
use crate::config::Settings;
use crate::process::host_ip::InterfaceIps;
use crate::process::proc_files::CommandLine;

/// Rover 0.7.0's `rover_configs.yaml`: its three analyzers, verbatim.
const ROVER_CONFIG: &str = include_str!("../../../config/testdata/rover_configs_0.7.0.yaml");
/// Our shipped file: Rover's three and ours for pods no Service selects.
const SHIPPED_CONFIG: &str = include_str!("../../../../../configs/rover.yaml");

fn analyzer_settings(yaml: &str) -> Vec<KubernetesAnalyzerSettings> {
    Settings::parse(yaml, &|_| None)
        .expect("the configuration loads")
        .settings
        .discovery
        .kubernetes
        .analyzers
}

fn analyzers(yaml: &str) -> Analyzers {
    Analyzers::new(&analyzer_settings(yaml)).expect("the analyzers parse")
}

/// One active analyzer.
fn analyzer(
    filters: &[&str],
    service: &str,
    instance: &str,
    process: &str,
) -> KubernetesAnalyzerSettings {
    KubernetesAnalyzerSettings {
        active: true,
        filters: filters.iter().map(|filter| (*filter).to_owned()).collect(),
        layer: "GENERAL".to_owned(),
        service_name: service.to_owned(),
        instance_name: instance.to_owned(),
        process_name: process.to_owned(),
        labels: vec!["test".to_owned()],
    }
}

fn container_status(name: &str, id: &str) -> Json {
    json!({
        "name": name, "containerID": id, "image": "img", "imageID": "img@sha256:0",
        "ready": true, "restartCount": 0
    })
}

/// An Istio-injected pod of the Deployment `reviews-v1`: containers `reviews` and
/// `istio-proxy`, init container `istio-init`.
fn istio_pod_json() -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "reviews-v1-7d9f8c6b5d-x2x4q",
            "namespace": "bookinfo",
            "labels": {
                "app": "reviews",
                "version": "v1",
                "service.istio.io/canonical-name": "reviews-canonical",
                "pod-template-hash": "7d9f8c6b5d"
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-v1-7d9f8c6b5d",
                "uid": "3f1c", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "nodeName": "node-1",
            "initContainers": [{"name": "istio-init", "image": "proxyv2"}],
            "containers": [
                {
                    "name": "reviews",
                    "image": "reviews",
                    "env": [
                        {"name": "LOG_DIR", "value": "/tmp/logs"},
                        {"name": "JAVA_OPTS", "value": "-Xmx1g"},
                        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}
                    ]
                },
                {
                    "name": "istio-proxy",
                    "image": "proxyv2",
                    "env": [{"name": "ISTIO_META_WORKLOAD_NAME", "value": "reviews-v1"}]
                }
            ]
        },
        "status": {
            "podIP": "10.244.1.7",
            "initContainerStatuses": [container_status("istio-init", "containerd://1111")],
            "containerStatuses": [
                container_status("reviews", "containerd://aaaa"),
                container_status("istio-proxy", "containerd://bbbb")
            ]
        }
    })
}

fn pod(json: Json) -> Pod {
    serde_json::from_value(json).expect("a valid pod")
}

/// A one-container pod `name` in `default` with the given labels and owners.
fn plain_pod(name: &str, labels: Json, owners: Json) -> Pod {
    pod(json!({
        "metadata": {
            "name": name, "namespace": "default", "labels": labels, "ownerReferences": owners
        },
        "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]},
        "status": {"containerStatuses": [container_status("app", "cri-o://cccc")]}
    }))
}

fn owner(kind: &str, name: &str) -> Json {
    json!({"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true})
}

fn service(name: &str, namespace: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": "x"}}
    }))
    .expect("a valid service")
}

/// A process as the templates see it; `/proc/PID` is a temporary directory with `exe` and `cwd`.
struct ProcessFixture {
    pid: u32,
    exe_name: String,
    command_line: CommandLine,
    proc_dir: tempfile::TempDir,
}

impl ProcessFixture {
    fn new(pid: u32, exe_name: &str, argv: &[&str]) -> Self {
        let proc_dir = tempfile::tempdir().expect("a temporary directory");
        let exe = PathBuf::from("/usr/lib/jvm/bin").join(exe_name);
        std::os::unix::fs::symlink(exe, proc_dir.path().join("exe")).expect("exe link");
        std::os::unix::fs::symlink("/app", proc_dir.path().join("cwd")).expect("cwd link");
        Self {
            pid,
            exe_name: exe_name.to_owned(),
            command_line: CommandLine::from_args(argv),
            proc_dir,
        }
    }

    fn values(&self) -> ProcessValues<'_> {
        ProcessValues {
            pid: self.pid,
            exe_name: &self.exe_name,
            argv0: self.command_line.argv0(),
            command_line: self.command_line.as_str(),
            proc_dir: self.proc_dir.path(),
        }
    }
}

/// The agent's values in every fixture.
fn rover_values(interfaces: &HashMap<String, InterfaceIps>) -> RoverValues<'_> {
    RoverValues {
        instance_id: "agent-uuid",
        host_name: "node-1.example",
        host_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        interfaces: Some(interfaces),
    }
}

fn interfaces() -> HashMap<String, InterfaceIps> {
    HashMap::from([(
        "eth0".to_owned(),
        InterfaceIps {
            v4: Some(Ipv4Addr::new(10, 0, 0, 5)),
            v6: Some(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5)),
        },
    )])
}

fn analyze(
    analyzers: &Analyzers,
    pod: &Pod,
    service: Option<&Service>,
    container_name: &str,
    process: &ProcessFixture,
) -> Result<Option<EntityNames>, AnalyzeError> {
    let interfaces = interfaces();
    let input = AnalyzerInput {
        pod,
        service,
        container_name,
        process: process.values(),
        rover: rover_values(&interfaces),
    };
    analyzers.analyze(
        &input,
        &mut analyzers.container_renders(),
        &mut ProcessRenders::default(),
    )
}

fn names(layer: &str, service: &str, instance: &str, process: &str, label: &str) -> EntityNames {
    EntityNames {
        layer: layer.to_owned(),
        service_name: service.to_owned(),
        instance_name: instance.to_owned(),
        process_name: process.to_owned(),
        labels: vec![label.to_owned()],
    }
}

fn envoy() -> ProcessFixture {
    ProcessFixture::new(
        4100,
        "envoy",
        &["/usr/local/bin/envoy", "-c", "envoy-rev.json"],
    )
}

fn java() -> ProcessFixture {
    ProcessFixture::new(4200, "java", &["java", "-jar", "/app/reviews.jar"])
}

#[test]
fn rovers_shipped_analyzers_name_sidecars_applications_and_service_pods() {
    let analyzers = analyzers(ROVER_CONFIG);
    let istio = pod(istio_pod_json());
    let reviews = service("reviews", "bookinfo");
    let pod_name = "reviews-v1-7d9f8c6b5d-x2x4q";

    // Sidecar: every process of istio-proxy.
    let sidecar = analyze(&analyzers, &istio, Some(&reviews), "istio-proxy", &envoy());
    let expected = names(
        "MESH_DP",
        "reviews-canonical.bookinfo",
        pod_name,
        "envoy",
        "mesh-envoy",
    );
    assert_eq!(sidecar.unwrap(), Some(expected));
    let pilot = ProcessFixture::new(
        4099,
        "pilot-agent",
        &["/usr/local/bin/pilot-agent", "proxy"],
    );
    let pilot = analyze(&analyzers, &istio, Some(&reviews), "istio-proxy", &pilot).unwrap();
    assert_eq!(pilot.unwrap().process_name, "pilot-agent");

    // Application: the first analyzer that holds wins, although a Service selects the pod.
    let app = analyze(&analyzers, &istio, Some(&reviews), "reviews", &java());
    let expected = names(
        "MESH",
        "reviews-canonical.bookinfo",
        pod_name,
        "java",
        "mesh-application",
    );
    assert_eq!(app.unwrap(), Some(expected));

    // LabelValue's keys are tried in order; none set gives the default, "" (Rover's names).
    let mut json = istio_pod_json();
    json["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("service.istio.io/canonical-name");
    let by_app = analyze(&analyzers, &pod(json.clone()), None, "reviews", &java()).unwrap();
    assert_eq!(by_app.unwrap().service_name, "reviews.bookinfo");
    json["metadata"]["labels"] = json!({});
    let unlabelled = analyze(&analyzers, &pod(json), None, "reviews", &java()).unwrap();
    assert_eq!(unlabelled.unwrap().service_name, ".bookinfo");

    // A pod behind a Service, without a sidecar.
    let shop = plain_pod("shop-5f6d8-abcde", json!({"app": "shop"}), json!([]));
    let frontend = service("shop-frontend", "default");
    let named = analyze(&analyzers, &shop, Some(&frontend), "app", &java());
    let expected = names(
        "K8S_SERVICE",
        "shop-frontend.default",
        "shop-5f6d8-abcde",
        "java",
        "k8s-service",
    );
    assert_eq!(named.unwrap(), Some(expected));

    // Rover's defaults leave a pod no Service selects out.
    assert_eq!(
        analyze(&analyzers, &shop, None, "app", &java()).unwrap(),
        None
    );
}

#[test]
fn our_shipped_analyzers_add_pods_no_service_selects() {
    let rover = analyzer_settings(ROVER_CONFIG);
    let shipped = analyzer_settings(SHIPPED_CONFIG);
    assert_eq!(shipped.len(), 4);
    assert_eq!(
        shipped[..3],
        rover[..],
        "Rover's three analyzers, unchanged"
    );
    let analyzers = Analyzers::new(&shipped).unwrap();

    let workload = |pod: &Pod| {
        analyze(&analyzers, pod, None, "app", &java())
            .unwrap()
            .map(|names| {
                (
                    names.layer,
                    names.service_name,
                    names.instance_name,
                    names.labels,
                )
            })
    };
    let expect = |service: &str, instance: &str| {
        Some((
            "K8S_SERVICE".to_owned(),
            service.to_owned(),
            instance.to_owned(),
            vec!["k8s-workload".to_owned()],
        ))
    };
    // A Deployment's pod: its ReplicaSet ends with the pod-template-hash.
    let deployed = plain_pod(
        "shop-7c9d5b-qx2vz",
        json!({"app": "shop", "pod-template-hash": "7c9d5b"}),
        json!([owner("ReplicaSet", "shop-7c9d5b")]),
    );
    assert_eq!(
        workload(&deployed),
        expect("shop.default", "shop-7c9d5b-qx2vz")
    );
    // A ReplicaSet of its own (no hash label) names itself.
    let replicated = plain_pod("rs-abcde", json!({}), json!([owner("ReplicaSet", "rs")]));
    assert_eq!(workload(&replicated), expect("rs.default", "rs-abcde"));
    let stateful = plain_pod("db-0", json!({}), json!([owner("StatefulSet", "db")]));
    assert_eq!(workload(&stateful), expect("db.default", "db-0"));
    let daemon = plain_pod("agent-x1", json!({}), json!([owner("DaemonSet", "agent")]));
    assert_eq!(workload(&daemon), expect("agent.default", "agent-x1"));
    let job = plain_pod(
        "migrate-29001-kq",
        json!({}),
        json!([owner("Job", "migrate-29001")]),
    );
    assert_eq!(
        workload(&job),
        expect("migrate-29001.default", "migrate-29001-kq")
    );
    // A bare pod, and a static pod (owned by its Node), name themselves.
    let bare = plain_pod("debug", json!(null), json!(null));
    assert_eq!(workload(&bare), expect("debug.default", "debug"));
    let mirror = plain_pod("etcd-node-1", json!({}), json!([owner("Node", "node-1")]));
    assert_eq!(
        workload(&mirror),
        expect("etcd-node-1.default", "etcd-node-1")
    );

    // Selected by a Service: Rover's analyzer, not ours.
    let frontend = service("shop-frontend", "default");
    let named = analyze(&analyzers, &deployed, Some(&frontend), "app", &java()).unwrap();
    assert_eq!(named.unwrap().service_name, "shop-frontend.default");
}

#[test]
fn every_template_method_renders() {
    let template = [
        // .Pod
        "{{.Pod.Name}}",
        "{{.Pod.Namespace}}",
        "{{.Pod.Node}}",
        r#"{{.Pod.LabelValue "missing,version,app" "none"}}"#,
        r#"{{.Pod.LabelValue "missing" "none"}}"#,
        "{{.Pod.ServiceName}}",
        r#"{{.Pod.OwnerName "Deployment"}}"#,
        r#"{{.Pod.OwnerName "StatefulSet,SERVICE,ReplicaSet"}}"#,
        r#"{{.Pod.OwnerName "ReplicaSet,Service"}}"#,
        r#"{{(.Pod.FindContainer "istio-proxy").Name}}"#,
        r#"{{(.Pod.FindContainer "istio-init").ID}}"#,
        r#"{{with .Pod.FindContainer "reviews"}}{{.EnvValue "JAVA_OPTS"}}{{end}}"#,
        r#"{{.Pod.HasContainer "istio-proxy"}}"#,
        r#"{{.Pod.HasContainer "istio-init"}}"#,
        r#"{{.Pod.LabelSelector "app=reviews, version=v1"}}"#,
        r#"{{.Pod.LabelSelector "app=ratings"}}"#,
        "{{.Pod.HasServiceName}}",
        r#"{{.Pod.HasOwnerName "Deployment"}}"#,
        r#"{{.Pod.HasOwnerName "CronJob"}}"#,
        // .Container
        "{{.Container.Name}}",
        "{{.Container.ID}}",
        r#"{{.Container.EnvValue "MISSING,JAVA_OPTS,LOG_DIR"}}"#,
        r#"[{{.Container.EnvValue "DB_PASSWORD"}}]"#,
        // .Process
        "{{.Process.ExeFilePath}}",
        "{{.Process.ExeName}}",
        "{{.Process.CommandLine}}",
        "{{.Process.Pid}}",
        "{{.Process.WorkDir}}",
        "{{.Process.ExeNameInCommandLine}}",
        // .Rover
        "{{.Rover.InstanceID}}",
        r#"{{.Rover.HostIPV4 "eth0"}}"#,
        r#"{{.Rover.HostIPV6 "eth0"}}"#,
        "{{.Rover.HostName}}",
        // Functions.
        r#"{{equalsOrDefault "reviews" "self" (.Pod.LabelValue "app" "")}}"#,
        r#"{{equalsOrDefault "x" "self" .Pod.Namespace}}"#,
        r#"{{printf "%s/%d" .Container.Name .Process.Pid}}"#,
        r#"{{index (.Pod.FindContainer "reviews") "Name"}}"#,
        r#"{{"eth0" | .Rover.HostIPV4}}"#,
    ]
    .join("|");
    let filters = [
        r#"and (eq .Pod.Namespace "bookinfo") (ne .Container.Name "istio-proxy")"#,
        r#"or (.Pod.HasOwnerName "CronJob") (.Pod.LabelSelector "app=reviews")"#,
        r#"not (.Pod.HasContainer "sidecar")"#,
        "lt 1000 .Process.Pid",
        "ge (len .Process.CommandLine) 5",
        r#"eq (.Container.EnvValue "LOG_DIR") "/tmp/logs""#,
        r#"eq .Rover.HostName "node-1.example""#,
    ];
    let settings = [analyzer(
        &filters,
        "{{.Pod.ServiceName}}",
        "{{.Pod.Name}}",
        &template,
    )];
    let analyzers = Analyzers::new(&settings).unwrap();
    assert!(analyzers.uses_interfaces());
    let istio = pod(istio_pod_json());
    let reviews = service("reviews", "bookinfo");

    let process = java();
    let named = analyze(&analyzers, &istio, Some(&reviews), "reviews", &process)
        .unwrap()
        .expect("every filter holds");
    let expected = [
        "reviews-v1-7d9f8c6b5d-x2x4q",
        "bookinfo",
        "node-1",
        "v1",
        "none",
        "reviews",
        "reviews-v1",
        "reviews",
        "reviews-v1-7d9f8c6b5d",
        "istio-proxy",
        "containerd://1111",
        "-Xmx1g",
        "true",
        "false",
        "true",
        "false",
        "true",
        "true",
        "false",
        "reviews",
        "containerd://aaaa",
        "-Xmx1g",
        "[]",
        "/usr/lib/jvm/bin/java",
        "java",
        "java -jar /app/reviews.jar",
        "4200",
        "/app",
        "java",
        "agent-uuid",
        "10.0.0.5",
        "fd00::5",
        "node-1.example",
        "self",
        "bookinfo",
        "reviews/4200",
        "reviews",
        "10.0.0.5",
    ]
    .join("|");
    assert_eq!(named.process_name, expected);
    assert_eq!(named.service_name, "reviews");
    assert_eq!(named.layer, "GENERAL");
    assert_eq!(named.labels, ["test"]);

    // In the sidecar container the first filter does not hold.
    let sidecar = analyze(&analyzers, &istio, Some(&reviews), "istio-proxy", &process);
    assert_eq!(sidecar.unwrap(), None);
}

#[test]
fn filters_must_all_hold_and_inactive_analyzers_are_skipped() {
    let mut never = analyzer(&["true"], "never", "i", "p");
    never.active = false;
    let settings = [
        never,
        analyzer(&["true", r#"eq .Pod.Name "other""#], "second", "i", "p"),
        analyzer(
            &[r#"eq .Container.Name "app""#, "print 1", r#"print "T""#],
            "third",
            "i",
            "p",
        ),
        analyzer(&[], "fallback", "i", "p"),
    ];
    let analyzers = Analyzers::new(&settings).unwrap();
    assert!(!analyzers.uses_interfaces());
    let shop = plain_pod("shop", json!({}), json!([]));
    let service_of = |container: &str| {
        analyze(&analyzers, &shop, None, container, &java())
            .unwrap()
            .map(|names| names.service_name)
    };
    assert_eq!(service_of("app").as_deref(), Some("third"));
    // An analyzer without filters holds for every process.
    assert_eq!(service_of("other").as_deref(), Some("fallback"));

    // No active analyzer: nothing, whatever the input.
    let mut inactive = settings[3].clone();
    inactive.active = false;
    let analyzers = Analyzers::new(&[inactive]).unwrap();
    assert_eq!(
        analyze(&analyzers, &Pod::default(), None, "", &java()).unwrap(),
        None
    );
}

#[test]
fn filters_give_go_booleans_or_an_error_naming_their_key() {
    let shop = plain_pod("shop", json!({}), json!([]));
    let first_filter = |filter: &str| {
        let analyzers = Analyzers::new(&[analyzer(&[filter], "s", "i", "p")]).unwrap();
        analyze(&analyzers, &shop, None, "app", &java())
    };
    for truth in ["1", "t", "T", "true", "True", "TRUE"] {
        let result = first_filter(&format!("print {truth:?}")).unwrap();
        assert!(result.is_some(), "{truth}");
    }
    for falsity in ["0", "f", "F", "false", "False", "FALSE"] {
        let result = first_filter(&format!("print {falsity:?}")).unwrap();
        assert!(result.is_none(), "{falsity}");
    }
    for not_boolean in ["yes", "tRUE", "", " true"] {
        let Err(error) = first_filter(&format!("print {not_boolean:?}")) else {
            panic!("{not_boolean:?} is no Go boolean");
        };
        assert!(
            matches!(error, AnalyzeError::NotBoolean { .. }),
            "{error:?}"
        );
        assert_eq!(
            error.key(),
            "process_discovery.kubernetes.analyzers[0].filters[0]"
        );
    }
    // `.Pod.Name` is a string, not a boolean.
    assert!(first_filter(".Pod.Name").is_err());
}

#[test]
fn a_failing_template_leaves_the_process_unnamed() {
    let shop = plain_pod("shop", json!({}), json!([]));
    let settings = [
        analyzer(&["true", r#".Pod.OwnerName "CronJob""#], "s", "i", "p"),
        analyzer(&[], "fallback", "i", "p"),
    ];
    let analyzers = Analyzers::new(&settings).unwrap();
    let Err(error) = analyze(&analyzers, &shop, None, "app", &java()) else {
        panic!("OwnerName of a kind the pod lacks fails, as in Rover");
    };
    assert_eq!(
        error.key(),
        "process_discovery.kubernetes.analyzers[0].filters[1]"
    );
    let message = format!("{:#}", anyhow::Error::new(error));
    assert!(message.contains("no owner of kind CronJob"), "{message}");

    let settings = [
        analyzer(&[], "s", "i", r#"{{.Container.EnvValue "NOPE,ALSO_NOPE"}}"#),
        analyzer(&[], "fallback", "i", "p"),
    ];
    let analyzers = Analyzers::new(&settings).unwrap();
    let istio = pod(istio_pod_json());
    let Err(error) = analyze(&analyzers, &istio, None, "reviews", &java()) else {
        panic!("EnvValue of variables the container lacks fails, as in Rover");
    };
    assert_eq!(
        error.key(),
        "process_discovery.kubernetes.analyzers[0].process_name"
    );
    let message = format!("{:#}", anyhow::Error::new(error));
    assert!(
        message.contains("defines none of the variables NOPE,ALSO_NOPE (it defines DB_PASSWORD,JAVA_OPTS,LOG_DIR)"),
        "{message}"
    );
}

/// Makes a valid analyzer invalid.
type BreakSettings = fn(&mut KubernetesAnalyzerSettings);

#[test]
fn bad_templates_are_errors_naming_their_keys() {
    let valid = || analyzer(&["true"], "s", "i", "p");
    let cases: Vec<(BreakSettings, &str, &str)> = vec![
        (
            |a| a.filters[0] = r#"eq (.Pod.Name "x""#.to_owned(),
            "process_discovery.kubernetes.analyzers[1].filters[0]",
            r#"cannot parse the template "eq (.Pod.Name \"x\"""#,
        ),
        (
            |a| a.filters.push(String::new()),
            "process_discovery.kubernetes.analyzers[1].filters[1]",
            "must be set",
        ),
        (
            |a| a.service_name = "{{.Pod.Name".to_owned(),
            "process_discovery.kubernetes.analyzers[1].service_name",
            "cannot parse",
        ),
        (
            |a| a.instance_name = "{{noSuchFunction .Pod.Name}}".to_owned(),
            "process_discovery.kubernetes.analyzers[1].instance_name",
            "cannot parse",
        ),
        (
            |a| a.process_name = "  ".to_owned(),
            "process_discovery.kubernetes.analyzers[1].process_name",
            "must be set",
        ),
        (
            |a| a.layer = String::new(),
            "process_discovery.kubernetes.analyzers[1].layer",
            "must be set",
        ),
        (
            // An inactive analyzer is checked too, as in Rover.
            |a| {
                a.active = false;
                a.process_name = "{{end}}".to_owned();
            },
            "process_discovery.kubernetes.analyzers[1].process_name",
            "cannot parse",
        ),
    ];
    for (break_it, key, problem) in cases {
        let mut broken = valid();
        break_it(&mut broken);
        let Err(error) = Analyzers::new(&[valid(), broken, valid()]) else {
            panic!("{key} must be refused");
        };
        let message = error.to_string();
        assert!(message.starts_with(&format!("{key}: ")), "{message}");
        assert!(message.contains(problem), "{message}");
    }
}

#[test]
fn methods_refuse_wrong_arguments_and_receivers() {
    let istio = pod(istio_pod_json());
    let render = |process_name: &str| {
        let analyzers = Analyzers::new(&[analyzer(&[], "s", "i", process_name)]).unwrap();
        analyze(&analyzers, &istio, None, "reviews", &java())
            .map(|names| names.map(|n| n.process_name))
    };
    for bad in [
        r#"{{.Pod.LabelValue "app"}}"#,
        r#"{{.Pod.LabelValue "app" "x" "y"}}"#,
        "{{.Pod.LabelValue 1 2}}",
        r#"{{.Container.LabelValue "app" ""}}"#,
        r#"{{.Pod.EnvValue "A"}}"#,
        "{{.Pod.HasContainer}}",
        r#"{{.Pod.FindContainer "nope"}}"#,
        r#"{{.Pod.LabelSelector "app==reviews"}}"#,
        r#"{{.Rover.HostIPV6 "nope0"}}"#,
        r#"{{.Process.HostIPV4 "eth0"}}"#,
        "{{.Pod.NoSuchField}}",
    ] {
        assert!(render(bad).is_err(), "{bad} must fail");
    }
    // An interface the host lacks gives the node's IP (rule_template's choice for HostIPV4).
    assert_eq!(
        render(r#"{{.Rover.HostIPV4 "en0"}}"#).unwrap().as_deref(),
        Some("192.0.2.10")
    );
    // Go's truthiness of the rendered output is not the filter's: `if` takes any value.
    assert_eq!(
        render(r#"{{if .Pod.ServiceName}}svc{{else}}none{{end}}"#)
            .unwrap()
            .as_deref(),
        Some("none")
    );
}

#[test]
fn weird_pods_give_empty_values_or_errors_never_a_panic() {
    let every_method = [
        "{{.Pod.Name}}{{.Pod.Namespace}}{{.Pod.Node}}{{.Pod.ServiceName}}{{.Pod.HasServiceName}}",
        r#"{{.Pod.LabelValue "a,b" "dflt"}}{{.Pod.HasContainer "x"}}{{.Pod.LabelSelector "a=b"}}"#,
        r#"{{.Pod.HasOwnerName "Deployment,service"}}{{.Pod.LabelSelector ""}}"#,
        "{{.Container.Name}}{{.Container.ID}}",
    ]
    .concat();
    let analyzers = Analyzers::new(&[analyzer(&[], "s", "i", &every_method)]).unwrap();
    let failing = [
        r#"{{.Pod.OwnerName "Deployment"}}"#,
        r#"{{.Pod.FindContainer "nope"}}"#,
        r#"{{.Container.EnvValue "A"}}"#,
        "{{.Process.ExeFilePath}}",
    ];
    let failing: Vec<Analyzers> = failing
        .iter()
        .map(|template| Analyzers::new(&[analyzer(&[], "s", "i", template)]).unwrap())
        .collect();

    let no_process = ProcessFixture {
        pid: 0,
        exe_name: String::new(),
        command_line: CommandLine::from_args(&[]),
        proc_dir: tempfile::tempdir().unwrap(),
    };
    let weird_pods = [
        Pod::default(),
        pod(
            json!({"metadata": {"labels": {}, "ownerReferences": []}, "spec": {"containers": []}, "status": {}}),
        ),
        // Owners and statuses with what a watch may show early: no hash label, no ids.
        pod(json!({
            "metadata": {"name": "p", "labels": {"pod-template-hash": ""},
                          "ownerReferences": [owner("ReplicaSet", ""), owner("ReplicaSet", "-")]},
            "spec": {"containers": [{"name": "x"}]},
            "status": {"containerStatuses": [{"name": "x", "image": "", "imageID": "", "ready": false, "restartCount": 0}]}
        })),
    ];
    for weird in &weird_pods {
        let named = analyze(&analyzers, weird, None, "x", &no_process)
            .unwrap()
            .unwrap();
        assert!(
            named.process_name.contains("dflt"),
            "{}",
            named.process_name
        );
        for analyzers in &failing {
            assert!(analyze(analyzers, weird, None, "x", &no_process).is_err());
        }
    }
    let named = analyze(&analyzers, &Pod::default(), None, "", &no_process)
        .unwrap()
        .unwrap();
    assert_eq!(named.process_name, "falsedfltfalsefalsefalsetrue");
}

#[test]
fn analyzers_can_be_shared_by_threads() {
    fn assert_shareable<T: Send + Sync + 'static>() {}
    assert_shareable::<Analyzers>();
    assert_shareable::<Error>();
    assert_shareable::<AnalyzeError>();
}

#[test]
fn a_template_s_roots_over_approximate_what_it_reads() {
    let roots = |source| Roots::of(source, false);
    assert_eq!(
        roots("{{.Pod.ServiceName}}.{{.Pod.Namespace}}"),
        Roots {
            pod: true,
            container: false,
            process: false,
            rover: false,
        }
    );
    assert_eq!(
        roots("{{.Process.ExeName}}"),
        Roots {
            pod: false,
            container: false,
            process: true,
            rover: false,
        }
    );
    // `.` itself, or a variable, may read anything.
    for source in [
        "{{.}}",
        "{{ . }}",
        "{{with .Pod}}{{.Name}}{{end}}-{{$.Process}}",
    ] {
        assert_eq!(roots(source), Roots::ALL, "{source}");
    }
    // A number is not a bare dot; text outside actions is not read.
    assert!(!roots("{{if gt 1.5 1.0}}Process.{{end}}").process);
    // A filter is one action.
    assert!(Roots::of(".Pod.HasServiceName", true).pod);
    assert_eq!(Roots::of("not .", true), Roots::ALL);
}

#[test]
fn processes_of_one_container_share_what_reads_no_process() {
    let analyzers = Analyzers::new(&[analyzer(
        &[".Pod.HasServiceName"],
        "{{.Pod.ServiceName}}",
        "{{.Pod.Name}}",
        "{{.Process.ExeName}}-{{.Process.Pid}}",
    )])
    .unwrap();
    let pod = pod(
        json!({"metadata": {"name": "cart-1", "namespace": "shop", "labels": {"app": "cart"}}}),
    );
    let service = service("cart", "shop");
    let mut renders = analyzers.container_renders();
    let interfaces = interfaces();
    let mut names = Vec::new();
    for (pid, exe) in [(10, "java"), (11, "python")] {
        let process = ProcessFixture::new(pid, exe, &[exe]);
        let input = AnalyzerInput {
            pod: &pod,
            service: Some(&service),
            container_name: "app",
            process: process.values(),
            rover: rover_values(&interfaces),
        };
        let named = analyzers
            .analyze(&input, &mut renders, &mut ProcessRenders::default())
            .unwrap()
            .unwrap();
        names.push((named.service_name, named.instance_name, named.process_name));
    }
    assert_eq!(
        names,
        [
            ("cart".to_owned(), "cart-1".to_owned(), "java-10".to_owned()),
            (
                "cart".to_owned(),
                "cart-1".to_owned(),
                "python-11".to_owned()
            ),
        ]
    );
}

#[test]
fn what_reads_only_the_process_is_rendered_once_per_process() {
    // The process name reads only `.Process`: kept across pod changes. The instance name reads
    // the pod and the process: rendered again for each pod. (A template of one `.Process` field
    // alone is not rendered at all.)
    let analyzers = Analyzers::new(&[analyzer(
        &[],
        "{{.Pod.Name}}",
        "{{.Pod.Name}}-{{.Process.Pid}}",
        "{{.Process.ExeName}}.{{.Process.Pid}}",
    )])
    .unwrap();
    let process = ProcessFixture::new(10, "java", &["java"]);
    let interfaces = interfaces();
    let mut process_renders = ProcessRenders::default();
    let mut names = Vec::new();
    for pod_name in ["cart-1", "cart-2"] {
        let pod = pod(json!({"metadata": {"name": pod_name, "namespace": "shop"}}));
        let input = AnalyzerInput {
            pod: &pod,
            service: None,
            container_name: "app",
            process: process.values(),
            rover: rover_values(&interfaces),
        };
        let named = analyzers
            .analyze(
                &input,
                &mut analyzers.container_renders(),
                &mut process_renders,
            )
            .unwrap()
            .unwrap();
        names.push((named.service_name, named.instance_name, named.process_name));
        // Only the process name is kept.
        assert_eq!(
            process_renders
                .0
                .iter()
                .map(|(_, output)| output.as_str())
                .collect::<Vec<_>>(),
            ["java.10"]
        );
    }
    let expected = |pod: &str| (pod.to_owned(), format!("{pod}-10"), "java.10".to_owned());
    assert_eq!(names, [expected("cart-1"), expected("cart-2")]);
}

#[test]
fn a_template_of_one_process_field_gives_what_rendering_it_gives() {
    let fields = [
        "{{.Process.ExeName}}",
        "{{ .Process.CommandLine }}",
        "{{.Process.ExeNameInCommandLine  }}",
    ];
    let processes = [
        ProcessFixture::new(7, "java", &["/usr/bin/java", "-jar", "app.jar"]),
        ProcessFixture::new(8, "a <b> & \"c\" 'd' é", &["x y", "<&>", "\u{1F600}"]),
        ProcessFixture::new(9, "", &[]),
    ];
    let interfaces = interfaces();
    let pod = Pod::default();
    for source in fields {
        let direct = KeyedTemplate::name("key".to_owned(), source).unwrap();
        assert!(direct.field.is_some(), "{source} is read directly");
        let mut rendered = KeyedTemplate::name("key".to_owned(), source).unwrap();
        rendered.field = None;
        for process in &processes {
            let input = AnalyzerInput {
                pod: &pod,
                service: None,
                container_name: "app",
                process: process.values(),
                rover: rover_values(&interfaces),
            };
            let output = |template: &KeyedTemplate| {
                let mut contexts = Contexts {
                    input: &input,
                    needs: PodNeeds::default(),
                    built: Default::default(),
                };
                let mut container = ContainerRenders(vec![None]);
                let mut process = ProcessRenders::default();
                let mut renders = Renders {
                    container: &mut container,
                    process: &mut process,
                };
                template.render(&mut contexts, &mut renders).unwrap()
            };
            assert_eq!(output(&direct), output(&rendered), "{source}");
        }
    }
    // Anything more is rendered.
    for source in [
        "{{.Process.ExeName}}-x",
        " {{.Process.ExeName}}",
        "{{- .Process.ExeName}}",
        "{{.Process.ExeName}}{{.Process.Pid}}",
        "{{.Process.Pid}}",
        "{{.Process.ExeFilePath}}",
        "{{.Process.ExeName | printf \"%q\"}}",
    ] {
        let template = KeyedTemplate::name("key".to_owned(), source).unwrap();
        assert_eq!(template.field, None, "{source}");
    }
}
