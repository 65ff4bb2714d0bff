//! The fake OAP itself, driven by the generated tonic clients (no agent, no root).

use std::time::Duration;

use integration_tests::fake_oap::{
    FakeOap, FakeOapConfig, FoldValue, TaskCommand, TestCertificates, fold_received, now_ms,
    process_id,
};
use rover_proto::v3::ebpf_process_service_client::EbpfProcessServiceClient;
use rover_proto::v3::ebpf_profiling_service_client::EbpfProfilingServiceClient;
use rover_proto::v3::{
    EbpfHostProcessMetadata, EbpfKubernetesProcessMetadata, EbpfOffCpuProfiling,
    EbpfOnCpuProfiling, EbpfProcessEntityMetadata, EbpfProcessPingPkg, EbpfProcessPingPkgList,
    EbpfProcessProperties, EbpfProcessReportList, EbpfProfilingData, EbpfProfilingStackMetadata,
    EbpfProfilingStackType, EbpfProfilingTaskMetadata, EbpfProfilingTaskQuery, KeyStringValuePair,
    ebpf_process_downstream, ebpf_process_properties, ebpf_profiling_data,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const WAIT: Duration = Duration::from_secs(10);

fn entity(service: &str, instance: &str, process: &str) -> EbpfProcessEntityMetadata {
    EbpfProcessEntityMetadata {
        layer: "OS_LINUX".to_owned(),
        service_name: service.to_owned(),
        instance_name: instance.to_owned(),
        process_name: process.to_owned(),
        labels: vec!["demo".to_owned()],
    }
}

fn host_process(entity: EbpfProcessEntityMetadata, pid: i32) -> EbpfProcessProperties {
    EbpfProcessProperties {
        metadata: Some(ebpf_process_properties::Metadata::HostProcess(
            EbpfHostProcessMetadata {
                entity: Some(entity),
                pid,
                properties: vec![KeyStringValuePair {
                    key: "support_ebpf_profiling".to_owned(),
                    value: "true".to_owned(),
                }],
            },
        )),
    }
}

fn report(processes: Vec<EbpfProcessProperties>) -> EbpfProcessReportList {
    EbpfProcessReportList {
        processes,
        ebpf_agent_id: "agent-1".to_owned(),
    }
}

fn stack(kind: EbpfProfilingStackType, leaf_first: &[&str]) -> EbpfProfilingStackMetadata {
    EbpfProfilingStackMetadata {
        stack_type: kind as i32,
        stack_id: 1,
        stack_symbols: leaf_first.iter().map(|&s| s.to_owned()).collect(),
    }
}

fn task_metadata(task_id: &str, process_id: &str, now: i64) -> EbpfProfilingTaskMetadata {
    EbpfProfilingTaskMetadata {
        task_id: task_id.to_owned(),
        process_id: process_id.to_owned(),
        profiling_start_time: now,
        current_time: now,
    }
}

fn on_cpu(
    task: Option<EbpfProfilingTaskMetadata>,
    stacks: Vec<EbpfProfilingStackMetadata>,
    dump_count: i32,
) -> EbpfProfilingData {
    EbpfProfilingData {
        task,
        profiling: Some(ebpf_profiling_data::Profiling::OnCpu(EbpfOnCpuProfiling {
            stacks,
            dump_count,
        })),
    }
}

fn arg<'a>(command: &'a rover_proto::v3::Command, key: &str) -> &'a str {
    command
        .args
        .iter()
        .find(|pair| pair.key == key)
        .map(|pair| pair.value.as_str())
        .unwrap_or_else(|| panic!("command without {key}: {command:?}"))
}

#[test]
fn process_ids_are_the_oaps() {
    // SHA-256 of "proc_" + base64("svc") + ".1_" + base64("inst"), computed with sha256sum.
    assert_eq!(
        process_id("svc", "inst", "proc"),
        "5aebe619cb9b70527c90e217b312bc36972950e2e46f4defee296de0b6953fb8"
    );
}

#[tokio::test]
async fn reported_processes_get_their_ids_back_and_keep_alives_are_recorded() {
    let fake = FakeOap::start().expect("fake OAP");
    let mut client = EbpfProcessServiceClient::connect(fake.endpoint())
        .await
        .expect("connect");
    let k8s = EbpfProcessProperties {
        metadata: Some(ebpf_process_properties::Metadata::K8sProcess(
            EbpfKubernetesProcessMetadata {
                entity: Some(entity("web.default", "web-0", "nginx")),
                pid: 7,
                properties: Vec::new(),
            },
        )),
    };
    let mut request = tonic::Request::new(report(vec![
        host_process(entity("svc", "inst", "proc"), 42),
        k8s,
    ]));
    request
        .metadata_mut()
        .insert("authentication", "secret".parse().expect("metadata"));
    let reply = client
        .report_processes(request)
        .await
        .expect("reportProcesses")
        .into_inner();

    assert_eq!(reply.processes.len(), 2);
    assert_eq!(
        reply.processes[0].process_id,
        process_id("svc", "inst", "proc")
    );
    match &reply.processes[0].process {
        Some(ebpf_process_downstream::Process::HostProcess(host)) => {
            assert_eq!(host.pid, 42);
            assert_eq!(host.entity_metadata, Some(entity("svc", "inst", "proc")));
        }
        other => panic!("expected a host process, got {other:?}"),
    }
    assert_eq!(
        reply.processes[1].process_id,
        process_id("web.default", "web-0", "nginx")
    );
    assert!(matches!(
        &reply.processes[1].process,
        Some(ebpf_process_downstream::Process::K8sProcess(k8s)) if k8s.pid == 7
    ));

    client
        .keep_alive(EbpfProcessPingPkgList {
            processes: vec![EbpfProcessPingPkg {
                entity_metadata: Some(entity("svc", "inst", "proc")),
                properties: Vec::new(),
            }],
            ebpf_agent_id: "agent-1".to_owned(),
        })
        .await
        .expect("keepAlive");

    let recorded = fake
        .wait_for(|recorded| recorded.keep_alives.len() == 1, WAIT)
        .await
        .expect("keepAlive recorded");
    assert_eq!(recorded.process_reports.len(), 1);
    assert_eq!(recorded.process_reports[0].ebpf_agent_id, "agent-1");
    assert_eq!(
        recorded.process_id_named("nginx"),
        Some(process_id("web.default", "web-0", "nginx"))
    );
    assert_eq!(
        recorded.authentications(),
        vec![Some("secret".to_owned()), None]
    );
}

#[tokio::test]
async fn a_required_authentication_refuses_other_calls() {
    let fake = FakeOap::start_with(FakeOapConfig {
        required_authentication: Some("token".to_owned()),
        ..FakeOapConfig::default()
    })
    .expect("fake OAP");
    let mut client = EbpfProcessServiceClient::connect(fake.endpoint())
        .await
        .expect("connect");
    let status = client
        .report_processes(report(Vec::new()))
        .await
        .expect_err("no authentication");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let mut request = tonic::Request::new(report(Vec::new()));
    request
        .metadata_mut()
        .insert("authentication", "token".parse().expect("metadata"));
    client
        .report_processes(request)
        .await
        .expect("authenticated");
    assert_eq!(
        fake.recorded().authentications(),
        vec![None, Some("token".to_owned())]
    );
}

#[tokio::test]
async fn a_queued_task_is_returned_once_per_process_then_not_for_a_later_watermark() {
    let fake = FakeOap::start().expect("fake OAP");
    let mut client = EbpfProfilingServiceClient::connect(fake.endpoint())
        .await
        .expect("connect");
    let query = |latest_update_time| EbpfProfilingTaskQuery {
        rover_instance_id: "agent-1".to_owned(),
        latest_update_time,
    };
    assert!(
        client
            .query_tasks(query(0))
            .await
            .expect("queryTasks")
            .into_inner()
            .commands
            .is_empty()
    );

    fake.add_task(TaskCommand {
        task_id: "task-1".to_owned(),
        process_ids: vec!["p1".to_owned(), "p2".to_owned()],
        target: "ON_CPU".to_owned(),
        start_ms: 1_000,
        duration_s: 30,
        update_ms: 2_000,
    });
    let commands = client
        .query_tasks(query(0))
        .await
        .expect("queryTasks")
        .into_inner()
        .commands;
    assert_eq!(commands.len(), 2, "{commands:?}");
    for (command, process) in commands.iter().zip(["p1", "p2"]) {
        assert_eq!(command.command, "EBPFProfilingTaskQuery");
        assert_eq!(arg(command, "TaskId"), "task-1");
        assert_eq!(arg(command, "ProcessId"), process);
        assert_eq!(arg(command, "TaskUpdateTime"), "2000");
        assert_eq!(arg(command, "TaskStartTime"), "1000");
        assert_eq!(arg(command, "TriggerType"), "FIXED_TIME");
        assert_eq!(arg(command, "TargetType"), "ON_CPU");
        assert_eq!(arg(command, "ExtensionConfigJSON"), "null");
        assert_eq!(arg(command, "FixedTriggerDuration"), "30");
        assert!(!arg(command, "SerialNumber").is_empty());
    }

    // Strictly greater: the watermark equal to the update time gets nothing.
    for latest in [2_000, 5_000] {
        assert!(
            client
                .query_tasks(query(latest))
                .await
                .expect("queryTasks")
                .into_inner()
                .commands
                .is_empty()
        );
    }
    let recorded = fake.recorded();
    let watermarks: Vec<i64> = recorded
        .task_queries
        .iter()
        .map(|query| query.latest_update_time)
        .collect();
    assert_eq!(watermarks, [0, 0, 2_000, 5_000]);
    assert!(
        recorded
            .task_queries
            .iter()
            .all(|query| query.rover_instance_id == "agent-1")
    );
}

#[tokio::test]
async fn profiling_streams_are_recorded_and_fold_like_the_oap() {
    let fake = FakeOap::start().expect("fake OAP");
    let mut client = EbpfProfilingServiceClient::connect(fake.endpoint())
        .await
        .expect("connect");
    let now = now_ms();
    use EbpfProfilingStackType::{ProcessKernelSpace as Kernel, ProcessUserSpace as User};
    let messages = vec![
        // Kernel stack then user stack, each leaf first (Rover's order).
        on_cpu(
            Some(task_metadata("task-1", "p1", now)),
            vec![
                stack(Kernel, &["k_leaf", "k_root"]),
                stack(User, &["u_leaf", "u_mid", "u_root"]),
            ],
            3,
        ),
        // No task: inherits task-1/p1.
        on_cpu(None, vec![stack(User, &["u_leaf", "u_mid", "u_root"])], 2),
        on_cpu(
            Some(task_metadata("task-1", "p2", now)),
            vec![stack(User, &["other", "u_root"])],
            5,
        ),
        EbpfProfilingData {
            task: Some(task_metadata("task-2", "p1", now)),
            profiling: Some(ebpf_profiling_data::Profiling::OffCpu(
                EbpfOffCpuProfiling {
                    stacks: vec![stack(User, &["sleep", "main"])],
                    switch_count: 4,
                    duration: 1_000_000,
                },
            )),
        },
    ];
    client
        .collect_profiling_data(tokio_stream::iter(messages))
        .await
        .expect("collectProfilingData");

    let recorded = fake
        .wait_for(
            |recorded| {
                recorded
                    .profiling_streams
                    .first()
                    .is_some_and(|stream| stream.completed)
            },
            WAIT,
        )
        .await
        .expect("stream recorded");
    assert_eq!(recorded.profiling_streams[0].messages.len(), 4);
    assert_eq!(recorded.streams_for_task("task-1"), 1);

    let task_1 = fold_received(&recorded.profiling_streams, "task-1", None);
    assert_eq!(task_1.messages, 3);
    assert_eq!(task_1.without_task, 0);
    assert_eq!(task_1.get("u_root;u_mid;u_leaf;k_root;k_leaf").count, 3);
    assert_eq!(task_1.get("u_root;u_mid;u_leaf").count, 2);
    assert_eq!(task_1.get("u_root;other").count, 5);
    assert_eq!(task_1.total_count(), 10);
    assert_eq!(task_1.count_with_frame(|frame| frame == "k_leaf"), 3);
    assert_eq!(task_1.time_range, Some((now, now)));

    let p1_only = fold_received(&recorded.profiling_streams, "task-1", Some("p1"));
    assert_eq!(p1_only.total_count(), 5);
    assert_eq!(
        p1_only.folded_text(FoldValue::Count),
        "u_root;u_mid;u_leaf 2\nu_root;u_mid;u_leaf;k_root;k_leaf 3\n"
    );
    assert_eq!(p1_only.to_folded().total(), 5);

    let task_2 = fold_received(&recorded.profiling_streams, "task-2", None);
    assert_eq!(task_2.get("main;sleep").count, 4);
    assert_eq!(task_2.total_duration_ns(), 1_000_000);
    assert_eq!(
        task_2.folded_text(FoldValue::DurationNs),
        "main;sleep 1000000\n"
    );
}

#[tokio::test]
async fn a_stopped_fake_cuts_streams_and_restarts_on_the_same_port() {
    let mut fake = FakeOap::start().expect("fake OAP");
    let addr = fake.addr();
    let channel = Channel::from_shared(fake.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut profiling = EbpfProfilingServiceClient::new(channel.clone());

    // A stream left open when the fake is killed is recorded as not completed.
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let open_stream = tokio::spawn(async move {
        profiling
            .collect_profiling_data(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
    });
    sender
        .send(on_cpu(
            Some(task_metadata("task-1", "p1", now_ms())),
            vec![stack(EbpfProfilingStackType::ProcessUserSpace, &["main"])],
            1,
        ))
        .await
        .expect("send");
    fake.wait_for(
        |recorded| {
            recorded
                .profiling_streams
                .first()
                .is_some_and(|stream| stream.messages.len() == 1)
        },
        WAIT,
    )
    .await
    .expect("first message recorded");

    fake.stop();
    assert!(!fake.is_running());
    let cut = tokio::time::timeout(WAIT, open_stream)
        .await
        .expect("the open stream ends when the fake is killed")
        .expect("task");
    assert!(cut.is_err(), "a killed server cannot answer: {cut:?}");
    let mut processes = EbpfProcessServiceClient::new(channel);
    assert!(
        processes
            .report_processes(report(Vec::new()))
            .await
            .is_err(),
        "a stopped fake answers nothing"
    );

    fake.start_again().expect("start again");
    assert_eq!(fake.addr(), addr);
    // The channel reconnects by itself; give it a few tries.
    let mut answered = false;
    for _ in 0..50 {
        if processes.report_processes(report(Vec::new())).await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "the restarted fake answers on {addr}");

    let recorded = fake.recorded();
    assert_eq!(recorded.profiling_streams.len(), 1);
    assert!(!recorded.profiling_streams[0].completed);
    assert_eq!(recorded.profiling_streams[0].messages.len(), 1);
    assert_eq!(recorded.process_reports.len(), 1);
}

async fn tls_channel(endpoint: String, ca_pem: &str) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(endpoint)
        .expect("endpoint")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .domain_name("localhost"),
        )?
        .connect()
        .await
}

#[tokio::test]
async fn tls_works_with_the_generated_ca_and_fails_with_another() {
    let certificates = TestCertificates::generate().expect("certificates");
    let fake = FakeOap::start_with(FakeOapConfig {
        tls: Some(certificates.server_tls()),
        ..FakeOapConfig::default()
    })
    .expect("fake OAP");
    assert!(fake.endpoint().starts_with("https://localhost:"));
    assert!(certificates.ca_path.exists());

    let channel = tls_channel(fake.endpoint(), &certificates.ca_pem)
        .await
        .expect("TLS connect with the CA");
    let reply = EbpfProcessServiceClient::new(channel)
        .report_processes(report(vec![host_process(entity("svc", "inst", "proc"), 1)]))
        .await
        .expect("reportProcesses over TLS")
        .into_inner();
    assert_eq!(reply.processes.len(), 1);

    let other = TestCertificates::generate().expect("other certificates");
    let refused = match tls_channel(fake.endpoint(), &other.ca_pem).await {
        Err(_) => true,
        Ok(channel) => EbpfProcessServiceClient::new(channel)
            .report_processes(report(Vec::new()))
            .await
            .is_err(),
    };
    assert!(refused, "a client trusting another CA must fail");
    assert_eq!(fake.recorded().process_reports.len(), 1);
}

/// The demo binary, driven by a hand-made agent: report a process, pick up the task, upload,
/// and get the folded stacks and the SVG.
#[tokio::test]
async fn the_demo_binary_hands_out_a_task_and_draws_what_it_received() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let svg = dir.path().join("demo.svg");
    let mut binary = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-oap"))
        .args(["--port", &port.to_string(), "--process-name", "demo"])
        .args([
            "--duration",
            "1",
            "--quiet",
            "1",
            "--timeout",
            "30",
            "--output",
        ])
        .arg(&svg)
        .kill_on_drop(true)
        .spawn()
        .expect("starting fake-oap");

    let endpoint = format!("http://127.0.0.1:{port}");
    let mut channel = None;
    for _ in 0..100 {
        if let Ok(connected) = Channel::from_shared(endpoint.clone())
            .expect("endpoint")
            .connect()
            .await
        {
            channel = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let channel = channel.expect("fake-oap listens");
    let reply = EbpfProcessServiceClient::new(channel.clone())
        .report_processes(report(vec![host_process(entity("svc", "inst", "demo"), 9)]))
        .await
        .expect("reportProcesses")
        .into_inner();
    let process = reply.processes[0].process_id.clone();

    let mut profiling = EbpfProfilingServiceClient::new(channel);
    let mut task = None;
    for _ in 0..100 {
        let commands = profiling
            .query_tasks(EbpfProfilingTaskQuery {
                rover_instance_id: "agent-1".to_owned(),
                latest_update_time: 0,
            })
            .await
            .expect("queryTasks")
            .into_inner()
            .commands;
        if let Some(command) = commands.first() {
            assert_eq!(arg(command, "ProcessId"), process);
            assert_eq!(arg(command, "TargetType"), "ON_CPU");
            task = Some(arg(command, "TaskId").to_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let task = task.expect("a task for the reported process");
    let data = on_cpu(
        Some(task_metadata(&task, &process, now_ms())),
        vec![stack(
            EbpfProfilingStackType::ProcessUserSpace,
            &["spin", "main"],
        )],
        7,
    );
    profiling
        .collect_profiling_data(tokio_stream::iter(vec![data]))
        .await
        .expect("collectProfilingData");

    let output = tokio::time::timeout(Duration::from_secs(30), async { binary.wait().await })
        .await
        .expect("fake-oap exits")
        .expect("fake-oap status");
    assert!(output.success(), "fake-oap failed: {output}");
    let folded = std::fs::read_to_string(dir.path().join("demo.folded")).expect("folded");
    assert_eq!(folded, "main;spin 7\n");
    let svg = std::fs::read_to_string(&svg).expect("svg");
    assert!(svg.contains("<svg") && svg.contains("spin"), "{svg}");
}
