//! Log lines of the code under test, captured in memory.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use tracing::subscriber::DefaultGuard;
use tracing_subscriber::EnvFilter;

/// What `tracing` wrote on this thread while the guard of
/// [`capture`](Self::capture) lived, as plain text lines
/// (`LEVEL target: message field=value …`).
///
/// The subscriber is the thread's default, not the process's: a
/// `#[tokio::test]` (one thread) sees everything its tasks log, and tests
/// running beside it in the same process do not mix in.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Starts capturing what `filter` (`RUST_LOG` syntax, e.g.
    /// `"info,telemetry::condition=debug"`) lets through.
    pub fn capture(filter: &str) -> (Self, DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter))
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// How many lines at `level` (`"WARN"`, `"INFO"`, `"DEBUG"`, …) contain
    /// `text`.
    pub fn count(&self, level: &str, text: &str) -> usize {
        self.lines()
            .iter()
            .filter(|line| line.trim_start().starts_with(level) && line.contains(text))
            .count()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
