//! The node agent's HTTP endpoint (`rover_rs.http_listen`): `/healthz`, `/readyz` and
//! `/metrics`. Small and bounded, as it shares the agent's one async worker: HTTP/1, one
//! request per connection, GET only, request heads up to 8 KiB read within 5 s, a whole
//! connection within 10 s, at most 16 connections at once (more are closed at once).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::Agent;
use super::run_counts::RunCounts;
use crate::backend::{Backend, ProcessDirectory, UploadBuffer};
use crate::bpf::{EngineTotals, bpf_stats_enabled};
use crate::metrics::{self, Snapshot};

/// hyper's smallest read buffer: the bound of a request head.
const MAX_REQUEST_HEAD_BYTES: usize = 8192;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 16;
/// The engine thread answers within this or is taken as stuck. It may be busy loading a
/// profiler for about a second; probes should allow a few seconds (`timeoutSeconds`).
const ENGINE_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `addr` (before anything else starts, so a taken port stops the start at once).
pub fn bind_endpoint(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|error| {
        let why = match error.kind() {
            std::io::ErrorKind::AddrInUse => "the address is in use (another agent?)".to_owned(),
            std::io::ErrorKind::AddrNotAvailable => {
                "the IP address is not one of this host's".to_owned()
            }
            _ => error.to_string(),
        };
        anyhow::anyhow!(
            "rover_rs.http_listen: cannot listen on {addr}: {why} (set it, or \
             ROVER_RS_HTTP_LISTEN, to a free address)"
        )
    })?;
    listener
        .set_nonblocking(true)
        .context("rover_rs.http_listen: making the socket non-blocking")?;
    Ok(listener)
}

/// What the endpoint reads its answers from.
pub(super) struct EndpointState {
    pub agent: Arc<Agent>,
    pub backend: Backend,
    pub buffer: Arc<UploadBuffer>,
    pub directory: ProcessDirectory,
    pub runs: Arc<RunCounts>,
    /// Set once discovery has done its first scan (and listed pods and Services).
    pub discovery_synced: Arc<AtomicBool>,
    /// Set once a profiler was loaded to check the programs load here (at start).
    pub programs_load: Arc<OnceLock<Result<(), String>>>,
    /// The agent's loops: each must still run for the agent to be healthy.
    pub loops: Vec<(&'static str, AbortHandle)>,
}

/// Serves `listener` until `stop` changes.
pub(super) async fn serve(
    listener: std::net::TcpListener,
    state: Arc<EndpointState>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            warn!("rover_rs.http_listen: the HTTP endpoint is off: {error}");
            return;
        }
    };
    if let Ok(address) = listener.local_addr() {
        info!(%address, "HTTP endpoint listening: /healthz, /readyz, /metrics");
    }
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, mostly: wait instead of spinning.
                debug!("HTTP endpoint: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(respond(&state, &request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!("HTTP endpoint: {error}"),
                Err(_) => debug!("HTTP endpoint: a connection took too long: closed"),
            }
        });
    }
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Health,
    Ready,
    Metrics,
    /// Another path: 404.
    NotFound,
    /// One of the pages with another method than GET: 405.
    NotAllowed,
}

fn route(method: &Method, path: &str) -> Route {
    let page = match path {
        "/healthz" => Route::Health,
        "/readyz" => Route::Ready,
        "/metrics" => Route::Metrics,
        _ => return Route::NotFound,
    };
    if method == Method::GET {
        page
    } else {
        Route::NotAllowed
    }
}

async fn respond(state: &EndpointState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let route = route(request.method(), request.uri().path());
    match route {
        Route::NotFound => {
            return text(
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /readyz or /metrics\n",
            );
        }
        Route::NotAllowed => return not_allowed(),
        Route::Health | Route::Ready | Route::Metrics => {}
    }
    let engine = engine_totals(&state.agent).await;
    match route {
        Route::Health => report(&liveness(state, engine.is_some())),
        Route::Ready => {
            let mut problems = liveness(state, engine.is_some());
            problems.extend(readiness(
                state.programs_load.get(),
                state.backend.call_stats().answered > 0,
                state.discovery_synced.load(Ordering::Relaxed),
            ));
            report(&problems)
        }
        _ => match engine {
            Some(engine) => scrape(state, engine),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the profiling engine does not answer\n",
            ),
        },
    }
}

/// 405, saying which method is.
fn not_allowed() -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed\n");
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
    response
}

async fn engine_totals(agent: &Agent) -> Option<EngineTotals> {
    match tokio::time::timeout(ENGINE_TIMEOUT, agent.totals()).await {
        Ok(Ok(totals)) => Some(totals),
        Ok(Err(error)) => {
            debug!("HTTP endpoint: the engine: {error:#}");
            None
        }
        Err(_) => None,
    }
}

/// What keeps the agent from being alive: a loop or thread that ended, an engine that does not
/// answer.
fn liveness(state: &EndpointState, engine_answers: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if !engine_answers {
        problems.push(format!(
            "engine: the profiling engine did not answer within {ENGINE_TIMEOUT:?}"
        ));
    }
    if !state.agent.threads_alive() {
        problems.push("agent: the collector or process watcher thread ended".to_owned());
    }
    for (name, handle) in &state.loops {
        if handle.is_finished() {
            problems.push(format!("{name}: the loop ended"));
        }
    }
    problems
}

/// What the agent still waits for before it is ready. The backend counts once answered: an
/// OAP outage later leaves the agent ready, because readiness gates a DaemonSet's rolling
/// update, and an outage would stall it on every node at once while the agent keeps
/// profiling and buffering (the outage shows in `rover_backend_call_errors_total`).
fn readiness(
    programs_load: Option<&Result<(), String>>,
    backend_answered: bool,
    discovery_synced: bool,
) -> Vec<String> {
    let mut waiting = Vec::new();
    match programs_load {
        None => waiting.push("programs: being loaded once to check they load here".to_owned()),
        Some(Err(problem)) => waiting.push(format!("programs: they do not load: {problem}")),
        Some(Ok(())) => {}
    }
    if !backend_answered {
        waiting.push("backend: the OAP has not answered a call yet".to_owned());
    }
    if !discovery_synced {
        waiting.push(
            "discovery: the first process scan (and, with Kubernetes, the listing of pods and \
             Services) has not finished"
                .to_owned(),
        );
    }
    waiting
}

/// 200 `ok` without problems, else 503 listing them.
fn report(problems: &[String]) -> Response<Full<Bytes>> {
    if problems.is_empty() {
        return text(StatusCode::OK, "ok\n");
    }
    let mut body = String::from("not ready:\n");
    for problem in problems {
        body.push_str("- ");
        body.push_str(problem);
        body.push('\n');
    }
    text(StatusCode::SERVICE_UNAVAILABLE, &body)
}

fn scrape(state: &EndpointState, engine: EngineTotals) -> Response<Full<Bytes>> {
    let snapshot = Snapshot {
        engine,
        bpf_stats_enabled: bpf_stats_enabled(),
        frames: state.agent.frames(),
        runs: state.runs.snapshot(),
        calls: state.backend.call_stats(),
        upload: state.buffer.stats(),
        processes: state.directory.counts(),
    };
    match metrics::encode(snapshot) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("writing the metrics failed: {error}\n"),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("a full body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("UTF-8")
    }

    #[test]
    fn the_three_pages_answer_get_only_and_other_paths_are_not_found() {
        assert_eq!(route(&Method::GET, "/healthz"), Route::Health);
        assert_eq!(route(&Method::GET, "/readyz"), Route::Ready);
        assert_eq!(route(&Method::GET, "/metrics"), Route::Metrics);
        for path in ["/", "/metrics/", "/healthz/x", "/favicon.ico", ""] {
            assert_eq!(route(&Method::GET, path), Route::NotFound, "{path}");
            assert_eq!(route(&Method::POST, path), Route::NotFound, "{path}");
        }
        for method in [Method::POST, Method::HEAD, Method::PUT, Method::DELETE] {
            assert_eq!(route(&method, "/metrics"), Route::NotAllowed, "{method}");
        }
        let response = not_allowed();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            response.headers().get(header::ALLOW).map(|v| v.as_bytes()),
            Some(&b"GET"[..])
        );
    }

    #[tokio::test]
    async fn readiness_lists_what_it_waits_for() {
        let loaded = Ok(());
        let response = report(&readiness(Some(&loaded), true, true));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response).await, "ok\n");

        let text = body(report(&readiness(None, true, true))).await;
        assert!(text.contains("- programs: being loaded"), "{text}");
        let failed = Err("missing privilege: this process lacks CAP_BPF".to_owned());
        let response = report(&readiness(Some(&failed), true, true));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let text = body(response).await;
        assert!(
            text.contains("- programs: they do not load: missing privilege"),
            "{text}"
        );

        let response = report(&readiness(Some(&loaded), false, false));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let text = body(response).await;
        assert!(text.starts_with("not ready:\n"), "{text}");
        assert!(
            text.contains("- backend: the OAP has not answered"),
            "{text}"
        );
        assert!(
            text.contains("- discovery: the first process scan"),
            "{text}"
        );

        let text = body(report(&readiness(Some(&loaded), true, false))).await;
        assert!(!text.contains("backend"), "{text}");
        assert!(text.contains("discovery"), "{text}");
    }

    #[test]
    fn a_taken_port_is_an_error_naming_the_key_and_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = taken.local_addr().expect("its address");
        let error = bind_endpoint(addr).expect_err("in use").to_string();
        assert!(error.contains("rover_rs.http_listen"), "{error}");
        assert!(error.contains(&addr.to_string()), "{error}");
        assert!(error.contains("in use"), "{error}");
    }

    #[test]
    fn an_address_not_of_this_host_is_an_error_naming_the_key() {
        // TEST-NET-1 (RFC 5737): never a local address.
        let addr: SocketAddr = "192.0.2.1:9470".parse().expect("an address");
        let error = bind_endpoint(addr).expect_err("not local").to_string();
        assert!(error.contains("rover_rs.http_listen"), "{error}");
        assert!(error.contains("192.0.2.1:9470"), "{error}");
    }
}
