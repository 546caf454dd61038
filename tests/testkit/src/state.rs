//! Detached processes' state dir: who runs, found again by a later command.
//!
//! ```text
//! DIR/pids/NAME.json   the record: pid, start time, port, log, command
//! DIR/pids/NAME.pid    the pid alone (for `kill`, `perf -p`, …)
//! DIR/logs/NAME.log    stdout and stderr, appended across restarts
//! ```
//!
//! A process is only ever signalled while its PID still has the recorded
//! start time, so a PID the kernel has handed to another process since is
//! never touched.

use crate::process::{Ended, Signal, start_time, terminate};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A detached process as recorded at its start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub pid: u32,
    /// Its start time in clock ticks since boot ([`start_time`]).
    pub start_time: u64,
    pub port: Option<u16>,
    pub log: Option<PathBuf>,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Milliseconds since the epoch; orders the records by start.
    pub started_ms: u64,
}

impl Record {
    /// Whether the recorded process still runs (same PID, same start time).
    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }
}

impl Signal for Record {
    fn is_running(&mut self) -> bool {
        self.is_alive()
    }

    fn signal(&mut self, signal: libc::c_int) {
        if self.is_alive()
            && let Ok(pid) = libc::pid_t::try_from(self.pid)
        {
            // SAFETY: a plain syscall; the start time check above makes sure
            // the PID is still the recorded process.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }
}

/// A state dir of detached processes (created on open).
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creates) `path` with its `pids/` and `logs/`; the path is made
    /// absolute so records and logs name it wherever they are read.
    pub fn open(path: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(path.join("pids"))?;
        std::fs::create_dir_all(path.join("logs"))?;
        Ok(Self {
            root: std::path::absolute(path)?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `DIR/logs/NAME.log`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }

    /// `DIR/pids/NAME.pid`.
    pub fn pid_path(&self, name: &str) -> PathBuf {
        self.root.join("pids").join(format!("{name}.pid"))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root.join("pids").join(format!("{name}.json"))
    }

    /// Writes the record (then the bare pid file), each atomically.
    pub fn write(&self, record: &Record) -> io::Result<()> {
        let json = serde_json::to_string_pretty(record).map_err(io::Error::other)?;
        write_atomic(&self.record_path(&record.name), &json)?;
        write_atomic(&self.pid_path(&record.name), &format!("{}\n", record.pid))
    }

    /// The record of `name`, if there is one (running or not). An unreadable
    /// record is an error naming the file.
    pub fn read(&self, name: &str) -> io::Result<Option<Record>> {
        let path = self.record_path(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|err| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {err}", path.display()),
                )
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(io::Error::new(
                err.kind(),
                format!("{}: {err}", path.display()),
            )),
        }
    }

    /// The record of `name` if its process runs.
    pub fn running(&self, name: &str) -> Option<Record> {
        self.read(name).ok().flatten().filter(Record::is_alive)
    }

    /// Whether `name` has a record or a pid file (running or stale).
    pub fn has_record(&self, name: &str) -> bool {
        self.record_path(name).exists() || self.pid_path(name).exists()
    }

    /// Every readable record, oldest start first.
    pub fn records(&self) -> Vec<Record> {
        let mut records: Vec<Record> = std::fs::read_dir(self.root.join("pids"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let name = name.strip_suffix(".json")?.to_owned();
                self.read(&name).ok().flatten()
            })
            .collect();
        records.sort_by_key(|r| (r.started_ms, r.name.clone()));
        records
    }

    /// Forgets `name` (its record and pid file), whatever runs.
    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.record_path(name));
        let _ = std::fs::remove_file(self.pid_path(name));
    }

    /// Stops `name` (SIGTERM, `grace`, SIGKILL; only its recorded PID) and
    /// removes its record. `None` when there was no record.
    pub async fn stop(&self, name: &str, grace: Duration) -> io::Result<Option<(Record, Ended)>> {
        let Some(mut record) = self.read(name)? else {
            self.remove(name);
            return Ok(None);
        };
        let ended = terminate(&mut record, grace).await;
        if ended != Ended::Survived {
            self.remove(name);
        }
        Ok(Some((record, ended)))
    }
}

fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_recorded_process_is_found_again_and_stopped_by_pid() {
        let dir = crate::services::target_dir()
            .join("testkit-state")
            .join(format!("{}", std::process::id()));
        let state = StateDir::open(&dir).unwrap();
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let record = Record {
            name: "sleeper".into(),
            pid,
            start_time: start_time(pid).unwrap(),
            port: None,
            log: None,
            command: vec!["sleep".into(), "30".into()],
            started_ms: 1,
        };
        state.write(&record).unwrap();
        assert_eq!(state.running("sleeper"), Some(record.clone()));
        assert_eq!(
            std::fs::read_to_string(state.pid_path("sleeper")).unwrap(),
            format!("{pid}\n")
        );

        // The same PID with another start time is somebody else's: left alone.
        let mut stranger = Record {
            start_time: record.start_time + 1,
            ..record.clone()
        };
        assert!(!stranger.is_alive());
        assert_eq!(
            terminate(&mut stranger, Duration::ZERO).await,
            Ended::NotRunning
        );

        // Once stopped (a zombie of this test until reaped) it no longer counts.
        let (_, ended) = state
            .stop("sleeper", Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended, Ended::Exited);
        assert!(state.read("sleeper").unwrap().is_none());
        assert!(!state.pid_path("sleeper").exists());
        drop(child);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
