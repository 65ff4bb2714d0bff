//! Work a scan spreads over a few threads when there is much of it: the first scan of a busy
//! node reads and names thousands of processes.

/// The most threads a scan uses: enough for the first scan of a busy node, few enough never to
/// take a node's cores.
const THREADS_MAX: usize = 4;

/// How many threads a scan may use. Ask once: the standard library reads cgroup files to
/// answer, which costs more than a pod event's whole pass.
pub(super) fn available() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(THREADS_MAX)
}

/// `jobs` cut into `threads` runs in order, each done on a thread of its own with a state
/// `state` makes for it: each run's outputs in order, with its state.
pub(super) fn split<J: Send, O: Send, S: Send>(
    jobs: Vec<J>,
    threads: usize,
    state: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, J) -> O + Sync,
) -> Vec<(Vec<O>, S)> {
    let run = jobs.len().div_ceil(threads.max(1)).max(1);
    let mut jobs = jobs.into_iter();
    let runs: Vec<Vec<J>> = (0..threads)
        .map(|_| jobs.by_ref().take(run).collect())
        .collect();
    let (state, work) = (&state, &work);
    std::thread::scope(|scope| {
        let workers: Vec<_> = runs
            .into_iter()
            .map(|run| {
                scope.spawn(move || {
                    let mut state = state();
                    let outputs = run.into_iter().map(|job| work(&mut state, job)).collect();
                    (outputs, state)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}
