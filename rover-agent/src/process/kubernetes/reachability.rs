//! Whether the API server is failing, logged once per outage: one warning when requests start
//! failing (naming the server and the error) and one line when it answers again, however many
//! retries the watchers make in between.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{debug, info, warn};

use crate::error_chain::chain;

pub(super) struct Reachability {
    server: String,
    failing: AtomicBool,
}

impl Reachability {
    pub(super) fn new(server: String) -> Self {
        Self {
            server,
            failing: AtomicBool::new(false),
        }
    }

    /// A watcher of `what` failed with `error`. Returns whether this began an outage (and
    /// logged it).
    pub(super) fn failed(&self, what: &str, error: &dyn std::error::Error) -> bool {
        let began = !self.failing.swap(true, Ordering::Relaxed);
        if began {
            warn!(
                "Kubernetes API server {} is failing ({what}: {}); retrying with backoff, \
                 host rules keep working",
                self.server,
                chain(error)
            );
        } else {
            debug!(
                "Kubernetes API server {}: {what}: {}",
                self.server,
                chain(error)
            );
        }
        began
    }

    /// The server answered a request successfully. Returns whether this ended an outage (and
    /// logged it).
    pub(super) fn answered(&self) -> bool {
        let ended = self.failing.swap(false, Ordering::Relaxed);
        if ended {
            info!("Kubernetes API server {} is answering again", self.server);
        }
        ended
    }

    pub(super) fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Log lines written by a test's subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Self;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            String::from_utf8_lossy(&self.0.lock().expect("log buffer"))
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    fn refused() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "tcp connect error: Connection refused",
        )
    }

    #[test]
    fn one_warning_per_outage_and_one_line_when_it_ends() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let reachability = Reachability::new("https://10.96.0.1:443/".to_owned());
            assert!(reachability.failed("pods on node-a", &refused()));
            for _ in 0..5 {
                assert!(!reachability.failed("Services", &refused()));
            }
            assert!(reachability.failing());
            assert!(reachability.answered());
            assert!(!reachability.answered());
            assert!(!reachability.failing());
            assert!(reachability.failed("pods on node-a", &refused()));
        });
        let lines = captured.lines();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        for warning in [&lines[0], &lines[2]] {
            assert!(warning.contains("WARN"), "{warning}");
            assert!(warning.contains("https://10.96.0.1:443/"), "{warning}");
            assert!(
                warning.contains("pods on node-a: tcp connect error: Connection refused"),
                "{warning}"
            );
        }
        assert!(lines[1].contains("INFO"), "{}", lines[1]);
        assert!(lines[1].contains("https://10.96.0.1:443/ is answering again"));
    }

    #[test]
    fn answers_without_an_outage_log_nothing() {
        let reachability = Reachability::new("http://127.0.0.1:1/".to_owned());
        assert!(!reachability.answered());
        assert!(!reachability.failing());
    }
}
