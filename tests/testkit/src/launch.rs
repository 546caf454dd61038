//! Starting a process: one spawn / wait-until-ready path, whoever owns it.
//!
//! A [`Launch`] says what to run (program, arguments, environment, log file,
//! port) and when it counts as started ([`Ready`]). It is started either
//! - **attached** ([`Owner::Attached`]): a [`ChildGuard`] kills it when
//!   dropped, so a failing test never leaves a server behind; or
//! - **detached** ([`Owner::Detached`]): in a session of its own (a Ctrl-C in
//!   the terminal does not reach it), recorded in a [`StateDir`] right after
//!   the spawn, and left running; a later command stops it by PID
//!   ([`StateDir::stop`]).
//!
//! Either way, while it starts it is our child: an exit during start-up is
//! seen at once, and a start that fails (or is abandoned: the [`Starting`]
//! dropped) kills it and removes its record.

use crate::process::{ChildGuard, start_time};
use crate::ready::Ready;
use crate::state::{Record, StateDir};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How often a start with progress reporting says it is still waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Who owns a started process.
#[derive(Clone, Copy)]
pub enum Owner<'a> {
    /// Killed (SIGKILL) when its [`ChildGuard`] drops.
    Attached,
    /// Outlives this process; recorded in the state dir.
    Detached(&'a StateDir),
}

/// What to run and when it is ready.
#[derive(Debug, Clone)]
pub struct Launch {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    clear_env: bool,
    env: Vec<(OsString, OsString)>,
    log: Option<PathBuf>,
    port: Option<u16>,
    ready: Ready,
    timeout: Duration,
    progress: Option<fn(&str)>,
}

impl Launch {
    /// `program` as `name`: inherits the environment, output discarded,
    /// ready once spawned, 30 s to get ready.
    pub fn new(name: &str, program: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_owned(),
            program: program.into(),
            args: Vec::new(),
            clear_env: false,
            env: Vec::new(),
            log: None,
            port: None,
            ready: Ready::Spawned,
            timeout: Duration::from_secs(30),
            progress: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts from an empty environment (then [`Launch::env`] adds to it).
    pub fn clear_env(mut self) -> Self {
        self.clear_env = true;
        self
    }

    /// Sets `key` (later settings of the same key win).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// stdout and stderr are appended to `path`, after a marker line.
    pub fn log(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// The port it listens on (recorded; informational).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    pub fn ready(mut self, ready: Ready) -> Self {
        self.ready = ready;
        self
    }

    /// How long it may take from spawn until ready.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// While waiting, `report` gets a line every few seconds.
    pub fn progress(mut self, report: fn(&str)) -> Self {
        self.progress = Some(report);
        self
    }

    /// Another name (in records, log markers and messages).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// Program and arguments, for records and messages.
    pub fn command_line(&self) -> Vec<String> {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    /// Spawns it; [`Starting::ready`] then waits until it is ready.
    pub fn spawn(&self, owner: Owner<'_>) -> Result<Starting, String> {
        let mut command = Command::new(&self.program);
        command.args(&self.args).stdin(Stdio::null());
        if self.clear_env {
            command.env_clear();
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        match &self.log {
            Some(path) => {
                mark(
                    path,
                    &format!("starting {}", shell_words(&self.command_line())),
                );
                let out = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|err| format!("cannot open {}: {err}", path.display()))?;
                let err = out
                    .try_clone()
                    .map_err(|err| format!("cannot share {}: {err}", path.display()))?;
                command.stdout(out).stderr(err);
            }
            None => {
                command.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        if let Owner::Detached(_) = owner {
            // SAFETY: setsid is async-signal-safe; nothing else runs between
            // fork and exec.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() == -1 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
            }
        }
        let child = command
            .spawn()
            .map_err(|err| format!("cannot run {}: {err}", self.program.display()))?;
        let pid = child.id();
        let child = ChildGuard::from(child);
        let record = match owner {
            Owner::Attached => None,
            Owner::Detached(dir) => {
                let record = Record {
                    name: self.name.clone(),
                    pid,
                    // 0 (never a match) only if it is already gone: the
                    // wait below reports that.
                    start_time: start_time(pid).unwrap_or(0),
                    port: self.port,
                    log: self.log.clone(),
                    command: self.command_line(),
                    started_ms: now_ms(),
                };
                // On failure the guard drops and kills it: nothing untracked.
                dir.write(&record)
                    .map_err(|err| format!("cannot record {}: {err}", self.name))?;
                Some((dir.clone(), record))
            }
        };
        Ok(Starting {
            child: Some(child),
            record,
            name: self.name.clone(),
            log: self.log.clone(),
            ready: self.ready.clone(),
            timeout: self.timeout,
            progress: self.progress,
            began: Instant::now(),
        })
    }

    /// [`Launch::spawn`] and [`Starting::ready`].
    pub async fn start(&self, owner: Owner<'_>) -> Result<Started, String> {
        self.spawn(owner)?.ready().await
    }
}

/// A spawned process that is not ready yet. Dropping it kills the process
/// (and removes its record).
pub struct Starting {
    child: Option<ChildGuard>,
    record: Option<(StateDir, Record)>,
    name: String,
    log: Option<PathBuf>,
    ready: Ready,
    timeout: Duration,
    progress: Option<fn(&str)>,
    began: Instant,
}

/// A process that is ready.
pub enum Started {
    Attached(ChildGuard),
    Detached(Record),
}

impl Started {
    /// The guard of an attached process (`None` for a detached one).
    pub fn into_child(self) -> Option<ChildGuard> {
        match self {
            Self::Attached(child) => Some(child),
            Self::Detached(_) => None,
        }
    }
}

impl Starting {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Time since the spawn.
    pub fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }

    /// Probes until ready. Fails, killing the process, when it exits first or
    /// is not ready within the timeout; the error says which.
    pub async fn ready(mut self) -> Result<Started, String> {
        let mut next_note = self.began + PROGRESS_EVERY;
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(format!("{} is gone", self.name));
            };
            if let Some(status) = child.try_wait() {
                return Err(format!("{} exited during start-up ({status})", self.name));
            }
            let last = match self.ready.probe().await {
                Ok(()) => return self.finish(),
                Err(err) => err,
            };
            let waited = self.began.elapsed();
            if waited >= self.timeout {
                return Err(format!(
                    "{} did not answer {} within {} s (last: {last})",
                    self.name,
                    self.ready,
                    self.timeout.as_secs()
                ));
            }
            if let Some(report) = self.progress
                && Instant::now() >= next_note
            {
                report(&format!(
                    "{}: still waiting for {} ({} s; last: {last})",
                    self.name,
                    self.ready,
                    waited.as_secs()
                ));
                next_note += PROGRESS_EVERY;
            }
            tokio::time::sleep(self.ready.interval()).await;
        }
    }

    fn finish(&mut self) -> Result<Started, String> {
        let record = self.record.take().map(|(_, record)| record);
        match (self.child.take(), record) {
            (Some(child), Some(record)) => {
                child.release();
                Ok(Started::Detached(record))
            }
            (Some(child), None) => Ok(Started::Attached(child)),
            (None, _) => Err(format!("{} is gone", self.name)),
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        // Not ready (failed, or abandoned): the guard kills it; its record goes too.
        if let Some(mut child) = self.child.take() {
            child.kill9();
        }
        if let Some((dir, record)) = self.record.take() {
            dir.remove(&record.name);
        }
    }
}

/// Appends a marker line to a log (starts, stops, kills), so the log reads
/// as the process's owner saw it.
pub fn mark(log: &Path, what: &str) {
    if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(log) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let _ = writeln!(
            file,
            "===== t={}.{:03} {what} =====",
            now.as_secs(),
            now.subsec_millis()
        );
    }
}

/// `words` as a shell would need them (quoted where empty or not plain).
fn shell_words(words: &[String]) -> String {
    let plain = |w: &String| {
        !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c))
    };
    words
        .iter()
        .map(|w| {
            if plain(w) {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
