//! The node agent's HTTP endpoint end to end: `rover-agent run` against the fake OAP, its
//! `/healthz`, `/readyz` and `/metrics` fetched over loopback HTTP. `/readyz` turns ready only
//! once the backend answered and discovery synced; `/metrics` parses as Prometheus exposition
//! and its counters move while an ON_CPU task runs.
//!
//! Every test starts the agent, which needs BPF: it takes the machine lock and skips (fails in
//! CI) without it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration_tests::fake_oap::{FakeOap, TaskCommand, now_ms};
use integration_tests::node_agent::{HostRule, NodeAgent, NodeConfig, prepare, token};
use integration_tests::{Workload, bpf_available};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Upper bound of any single wait for something the agent does within a few periods.
const WAIT: Duration = Duration::from_secs(20);
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// An HTTP response, as read off the socket.
struct Reply {
    status: u16,
    content_type: String,
    body: String,
}

/// One request on its own connection (the endpoint serves one per connection).
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 10 s"))
        .unwrap_or_else(|error| panic!("{method} {path}: {error}"));
    let raw = String::from_utf8(raw).expect("an HTTP reply in UTF-8");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of the head in {raw:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let header = |name: &str| {
        head.lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim().to_owned())
    };
    let length: usize = header("content-length")
        .and_then(|length| length.parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    assert_eq!(body.len(), length, "the body is as long as announced");
    Reply {
        status,
        content_type: header("content-type").unwrap_or_default(),
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path).await
}

/// Fetches `path` until `done` holds for the reply, or panics with the last reply and the log.
async fn wait_reply(
    agent: &mut NodeAgent,
    fake: &FakeOap,
    addr: SocketAddr,
    path: &str,
    what: &str,
    done: impl Fn(&Reply) -> bool,
) -> Reply {
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = get(addr, path).await;
        if done(&reply) {
            return reply;
        }
        agent.assert_running(fake);
        assert!(
            Instant::now() < deadline,
            "waiting for {what}: {path} answers {} {:?}\n{}",
            reply.status,
            reply.body,
            agent.context(fake)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Series (`name{label="value",...}`, labels sorted) to values, from an exposition checked
/// as a scraper reads it: every line a HELP, TYPE or UNIT comment or a sample as
/// prometheus-parse reads them, each sample after its family's TYPE and HELP (in either order;
/// a counter's samples named `<family>_total`), and `# EOF` last (OpenMetrics).
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    use prometheus_parse::{LineInfo, SampleType, Scrape};

    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "no `# EOF` at the end:\n{text}"
    );
    let mut families: BTreeMap<String, SampleType> = BTreeMap::new();
    let mut documented: BTreeSet<String> = BTreeSet::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(unit) = line.strip_prefix("# UNIT ") {
            let (family, unit) = unit.split_once(' ').expect("`# UNIT name unit`");
            assert!(family.ends_with(&format!("_{unit}")), "{line}");
            continue;
        }
        match LineInfo::parse(line) {
            LineInfo::Doc { metric_name, .. } => {
                assert!(
                    documented.insert(metric_name.to_owned()),
                    "{metric_name} documented twice"
                );
            }
            LineInfo::Type {
                metric_name,
                sample_type,
                ..
            } => {
                assert!(
                    families.insert(metric_name.clone(), sample_type).is_none(),
                    "{metric_name} typed twice"
                );
                assert!(metric_name.starts_with("rover_"), "{line}");
                assert!(
                    matches!(sample_type, SampleType::Counter | SampleType::Gauge),
                    "{line}"
                );
            }
            LineInfo::Sample {
                metric_name, value, ..
            } => {
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("not a number: {line}"));
                let counter = metric_name
                    .strip_suffix("_total")
                    .filter(|family| families.get(*family) == Some(&SampleType::Counter));
                let gauge = Some(metric_name)
                    .filter(|family| families.get(*family) == Some(&SampleType::Gauge));
                let family = counter.or(gauge).unwrap_or_else(|| {
                    panic!("a sample of no TYPE (or a counter's without _total): {line}")
                });
                assert!(
                    documented.contains(family),
                    "a sample of a family without HELP: {line}"
                );
            }
            LineInfo::Empty | LineInfo::Ignored => panic!("not exposition: {line:?}"),
        }
    }
    let scrape = Scrape::parse(lines.iter().map(|line| Ok((*line).to_owned())))
        .expect("prometheus-parse reads it");
    let mut series = BTreeMap::new();
    for sample in scrape.samples {
        let value = match sample.value {
            prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value) => value,
            other => panic!("{}: unexpected {other:?}", sample.metric),
        };
        let key = if sample.labels.is_empty() {
            sample.metric
        } else {
            format!("{}{{{}}}", sample.metric, sample.labels)
        };
        assert!(series.insert(key.clone(), value).is_none(), "{key} twice");
    }
    series
}

fn value(series: &BTreeMap<String, f64>, key: &str) -> f64 {
    *series
        .get(key)
        .unwrap_or_else(|| panic!("no series {key} in {series:#?}"))
}

const ON_CPU_ACTIVE: &str = r#"rover_tasks_active{profiler="ON_CPU",source="backend"}"#;
const ON_CPU_STARTED: &str = r#"rover_tasks_started_total{profiler="ON_CPU",source="backend"}"#;
const SAMPLES: &str = "rover_oncpu_samples_total";
const BYTES_SENT: &str = "rover_upload_sent_bytes_total";
const PROGRAM_RUNS: &str =
    r#"rover_bpf_program_runs_total{object="oncpu",program="on_cpu_sample"}"#;
const PROGRAM_TIME: &str =
    r#"rover_bpf_program_run_time_seconds_total{object="oncpu",program="on_cpu_sample"}"#;

async fn scrape(agent: &mut NodeAgent, fake: &FakeOap, addr: SocketAddr) -> BTreeMap<String, f64> {
    let reply = get(addr, "/metrics").await;
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, agent.context(fake));
    assert!(
        reply
            .content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        reply.content_type
    );
    parse_exposition(&reply.body)
}

/// Sets `kernel.bpf_stats_enabled` and restores what it was when dropped.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> Self {
        let previous = std::fs::read_to_string(BPF_STATS).expect("reading bpf_stats_enabled");
        std::fs::write(BPF_STATS, "1").expect("enabling bpf_stats (as root)");
        Self(previous)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.0.trim());
    }
}

#[tokio::test]
async fn readyz_waits_for_the_backend_and_metrics_move_while_a_task_runs() {
    if !bpf_available("readyz_waits_for_the_backend_and_metrics_move_while_a_task_runs") {
        return;
    }
    let _lock = prepare();
    // The OAP is down when the agent starts: it is given the address, then it goes away.
    let mut fake = FakeOap::start().expect("fake OAP");
    fake.stop();
    let tag = token("metrics");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let config = NodeConfig::new(
        &fake,
        vec![HostRule::new(&format!("/cpu_split .*{tag}"), "e2e-metrics")],
    );
    let mut agent = NodeAgent::start(&config, &[]);
    let addr = agent
        .http_address(WAIT)
        .unwrap_or_else(|| panic!("no HTTP endpoint logged\n{}", agent.context(&fake)));

    // Alive at once; not ready, and saying why, while the OAP never answered.
    let health = get(addr, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let waiting = wait_reply(
        &mut agent,
        &fake,
        addr,
        "/readyz",
        "discovery synced, the backend still awaited",
        |reply| !reply.body.contains("discovery"),
    )
    .await;
    assert_eq!(waiting.status, 503, "{}", waiting.body);
    assert!(waiting.body.starts_with("not ready:\n"), "{}", waiting.body);
    assert!(
        waiting.body.contains("backend: the OAP has not answered"),
        "{}",
        waiting.body
    );
    assert!(waiting.content_type.starts_with("text/plain"));
    let down = scrape(&mut agent, &fake, addr).await;
    assert_eq!(value(&down, "rover_backend_calls_answered_total"), 0.0);
    let failed: f64 = down
        .iter()
        .filter(|(key, _)| key.starts_with("rover_backend_call_errors_total{"))
        .map(|(_, value)| value)
        .sum();
    assert!(failed >= 1.0, "calls to the absent OAP count as errors");
    assert_eq!(value(&down, ON_CPU_ACTIVE), 0.0);
    assert_eq!(value(&down, "rover_processes_found"), 1.0);

    // The OAP comes: ready.
    fake.start_again().expect("the fake OAP again");
    let ready = wait_reply(&mut agent, &fake, addr, "/readyz", "ready", |reply| {
        reply.status == 200
    })
    .await;
    assert_eq!(ready.body, "ok\n");

    // Other paths and methods.
    assert_eq!(get(addr, "/nothing-here").await.status, 404);
    let post = request(addr, "POST", "/metrics").await;
    assert_eq!(post.status, 405);

    // An ON_CPU task: the counters move while it runs.
    let stats_enabled_before =
        std::fs::read_to_string(BPF_STATS).is_ok_and(|value| value.trim() == "1");
    if !stats_enabled_before {
        let idle = scrape(&mut agent, &fake, addr).await;
        assert_eq!(value(&idle, "rover_bpf_stats_enabled"), 0.0);
        assert!(!idle.keys().any(|key| key.starts_with("rover_bpf_program")));
    }
    let _stats = BpfStats::enable();
    let id = loop {
        if let Some(id) = fake.recorded().process_id_named("cpu_split") {
            break id;
        }
        agent.assert_running(&fake);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    const DURATION_S: i64 = 10;
    fake.add_task(TaskCommand::on_cpu(
        "metrics-oncpu",
        std::slice::from_ref(&id),
        now_ms(),
        DURATION_S,
    ));
    let first = wait_for_metrics(&mut agent, &fake, addr, "a first upload", |series| {
        series.get(BYTES_SENT).is_some_and(|bytes| *bytes > 0.0)
    })
    .await;
    assert_eq!(value(&first, ON_CPU_ACTIVE), 1.0, "one task runs");
    assert_eq!(value(&first, ON_CPU_STARTED), 1.0);
    // Two flush intervals later, within the task.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = scrape(&mut agent, &fake, addr).await;
    assert_eq!(value(&second, ON_CPU_ACTIVE), 1.0, "the task still runs");
    for counter in [
        SAMPLES,
        BYTES_SENT,
        "rover_frames_symbolized_total",
        r#"rover_distinct_stacks_total{profiler="ON_CPU"}"#,
        PROGRAM_RUNS,
        PROGRAM_TIME,
    ] {
        assert!(
            value(&second, counter) > value(&first, counter),
            "{counter} did not move: {} then {}",
            value(&first, counter),
            value(&second, counter)
        );
    }
    assert_eq!(value(&second, "rover_bpf_stats_enabled"), 1.0);
    assert_eq!(value(&second, "rover_processes_reported"), 1.0);
    assert_eq!(
        value(
            &second,
            r#"rover_tasks_active{profiler="OFF_CPU",source="backend"}"#
        ),
        0.0
    );
    // cpu_split spins: a sample every 10 ms of its 2 s, give or take.
    let samples = value(&second, SAMPLES) - value(&first, SAMPLES);
    assert!(
        samples >= 50.0,
        "{samples} samples in 2.5 s of a spinning process"
    );

    // After the task: no task active, one started in all.
    let after = wait_for_metrics(&mut agent, &fake, addr, "the task's end", |series| {
        series.get(ON_CPU_ACTIVE) == Some(&0.0)
    })
    .await;
    assert_eq!(value(&after, ON_CPU_STARTED), 1.0);
    agent.assert_running(&fake);
    drop(cpu);
}

async fn wait_for_metrics(
    agent: &mut NodeAgent,
    fake: &FakeOap,
    addr: SocketAddr,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let series = scrape(agent, fake, addr).await;
        if done(&series) {
            return series;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {what} in the metrics: {series:#?}\n{}",
            agent.context(fake)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_taken_http_port_stops_the_start_naming_the_key_and_the_address() {
    if !bpf_available("a_taken_http_port_stops_the_start_naming_the_key_and_the_address") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = taken.local_addr().expect("its address");
    let mut config = NodeConfig::new(&fake, Vec::new());
    config.http_listen = addr.to_string();
    let mut agent = NodeAgent::start(&config, &[]);
    let status = agent
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("the agent runs on\n{}", agent.context(&fake)));
    assert!(!status.success(), "{status}");
    let log = agent.stderr();
    assert!(log.contains("rover_rs.http_listen"), "{log}");
    assert!(log.contains(&addr.to_string()), "{log}");
    assert!(log.contains("in use"), "{log}");
    drop(taken);
}
