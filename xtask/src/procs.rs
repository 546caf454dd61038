//! Detached processes in a state dir: the steps every command shares
//! (spawn, wait until ready, stop by PID, with the same messages) and
//! `cargo xtask proc …`, which offers them to scripts (the benchmark's).

use crate::envfile::Env;
use crate::ui;
use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;
use testkit::launch::{Launch, Owner, Started, Starting};
use testkit::process::Ended;
use testkit::ready::Ready;
use testkit::state::{Record, StateDir};

/// Lines of a log shown when a start fails.
pub const TAIL_LINES: usize = 30;

/// Spawns `launch` detached, recorded in `state`.
pub fn spawn(state: &StateDir, launch: &Launch) -> Result<Starting> {
    launch
        .spawn(Owner::Detached(state))
        .map_err(|err| anyhow!(err))
}

/// Waits until it is ready and says so. On failure (the process is then
/// killed and forgotten) shows the end of its log and names the log.
pub async fn ready(starting: Starting) -> Result<Record> {
    let name = starting.name().to_owned();
    let log = starting.log_path().map(PathBuf::from);
    match starting.ready().await {
        Ok(Started::Detached(record)) => Ok(record),
        Ok(Started::Attached(_)) => bail!("{name} was started attached, not detached"),
        Err(err) => match log {
            Some(log) => {
                ui::log_tail(&log, TAIL_LINES);
                bail!("{err} (log: {})", log.display())
            }
            None => bail!(err),
        },
    }
}

/// Stops `name` by its recorded PID (SIGTERM, `grace`, SIGKILL) and forgets
/// it. Says what it did; `false` when there was nothing recorded.
pub async fn stop(state: &StateDir, name: &str, grace: Duration) -> Result<bool> {
    let record = state.read(name).unwrap_or_else(|err| {
        ui::warn(format!("unreadable record of {name}: {err}"));
        None
    });
    let Some(record) = record.filter(Record::is_alive) else {
        let had = state.has_record(name);
        if had {
            ui::say(format!("{name}: not running (stale PID file removed)"));
        }
        state.remove(name);
        return Ok(had);
    };
    ui::log(format!("stopping {name} (pid {})", record.pid));
    let stopped = state
        .stop(name, grace)
        .await
        .with_context(|| format!("cannot stop {name}"))?;
    match stopped.map(|(_, ended)| ended) {
        Some(Ended::Killed) => ui::warn(format!(
            "{name} (pid {}) still running after {} s: sent KILL",
            record.pid,
            grace.as_secs()
        )),
        Some(Ended::Survived) => {
            ui::warn(format!("{name} (pid {}) did not exit", record.pid));
        }
        _ => {}
    }
    Ok(true)
}

/// Stops every process recorded in `state`, newest first.
pub async fn stop_all(state: &StateDir, grace: Duration) -> Result<usize> {
    let mut stopped = 0;
    for record in state.records().iter().rev() {
        if stop(state, &record.name, grace).await? {
            stopped += 1;
        }
    }
    // pid files without a readable record
    for entry in std::fs::read_dir(state.path().join("pids"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".pid") {
            stop(state, name, grace).await?;
        }
    }
    Ok(stopped)
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Starts COMMAND detached (it outlives this command), recorded in DIR
    /// as NAME with its log in DIR/logs/NAME.log; waits until it is ready.
    Start {
        /// State dir (pids/, logs/)
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = parse_name)]
        name: String,
        /// The port it listens on (for --ready)
        #[arg(long)]
        port: Option<u16>,
        /// Ready once GET http://127.0.0.1:PORT/PATH answers 2xx
        #[arg(long, value_name = "PATH", requires = "port")]
        ready: Option<String>,
        /// ... with a body containing TEXT
        #[arg(long, value_name = "TEXT", requires = "ready")]
        ready_contains: Option<String>,
        /// Seconds it may take to get ready
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Sets a variable (repeatable); the rest of the environment is inherited
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_var)]
        env: Vec<(String, String)>,
        /// The program and its arguments
        #[arg(required = true, last = true)]
        command: Vec<OsString>,
    },
    /// Stops NAME (SIGTERM, then SIGKILL after --timeout seconds), by PID.
    Stop {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = parse_name)]
        name: String,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Stops every process recorded in DIR, newest first.
    Down {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Prints NAME's PID (exit status 1 when it does not run).
    Pid {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = parse_name)]
        name: String,
    },
    /// Lists the processes recorded in DIR.
    Status {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Prints N distinct free TCP ports of 127.0.0.1.
    Ports { n: usize },
    /// Waits until GET URL answers 2xx (with a body containing TEXT).
    Wait {
        url: String,
        #[arg(long, value_name = "TEXT")]
        contains: Option<String>,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

fn parse_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!("{name:?}: letters, digits, '-', '_' and '.' only"))
    }
}

fn parse_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn open(dir: &std::path::Path) -> Result<StateDir> {
    StateDir::open(dir).with_context(|| format!("cannot use state dir {}", dir.display()))
}

pub async fn run(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Start {
            dir,
            name,
            port,
            ready,
            ready_contains,
            timeout,
            env,
            command,
        } => {
            let state = open(&dir)?;
            if let Some(record) = state.running(&name) {
                bail!(
                    "{name} already runs in {} (pid {})",
                    dir.display(),
                    record.pid
                );
            }
            state.remove(&name);
            let mut words = command.into_iter();
            let program = words.next().context("no command given")?;
            let mut launch = Launch::new(&name, program)
                .args(words)
                .clear_env()
                .envs(Env::inherited().iter())
                .envs(env)
                .log(state.log_path(&name))
                .timeout(Duration::from_secs(timeout))
                .progress(ui::say_line);
            if let Some(port) = port {
                launch = launch.port(port);
            }
            if let (Some(port), Some(path)) = (port, ready) {
                let path = if path.starts_with('/') {
                    path
                } else {
                    format!("/{path}")
                };
                launch = launch.ready(Ready::Http {
                    url: format!("http://127.0.0.1:{port}{path}"),
                    contains: ready_contains,
                });
            }
            let record = self::ready(spawn(&state, &launch)?).await?;
            ui::log(format!("{name} is up (pid {})", record.pid));
            Ok(0)
        }
        Cmd::Stop { dir, name, timeout } => {
            stop(&open(&dir)?, &name, Duration::from_secs(timeout)).await?;
            Ok(0)
        }
        Cmd::Down { dir, timeout } => {
            if dir.is_dir() {
                stop_all(&open(&dir)?, Duration::from_secs(timeout)).await?;
            }
            Ok(0)
        }
        Cmd::Pid { dir, name } => match open(&dir)?.running(&name) {
            Some(record) => {
                println!("{}", record.pid);
                Ok(0)
            }
            None => {
                ui::error(format!("{name} does not run in {}", dir.display()));
                Ok(1)
            }
        },
        Cmd::Status { dir } => {
            let state = open(&dir)?;
            let records = state.records();
            if records.is_empty() {
                ui::log(format!("nothing recorded in {}", dir.display()));
            }
            for record in records {
                let port = record
                    .port
                    .map_or_else(String::new, |p| format!("port {p}"));
                let running = if record.is_alive() {
                    "running"
                } else {
                    "NOT running"
                };
                ui::say(format!(
                    "{:<14} {running:<12} pid {:<7} {port}",
                    record.name, record.pid
                ));
            }
            Ok(0)
        }
        Cmd::Ports { n } => {
            let ports = testkit::process::free_ports(n)?;
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            println!("{}", ports.join(" "));
            Ok(0)
        }
        Cmd::Wait {
            url,
            contains,
            timeout,
        } => {
            let ready = Ready::Http { url, contains };
            let timeout = Duration::from_secs(timeout);
            testkit::wait::eventually(timeout, ready.interval(), || ready.probe())
                .await
                .map_err(|err| anyhow!("{ready}: {err}"))?;
            Ok(0)
        }
    }
}
