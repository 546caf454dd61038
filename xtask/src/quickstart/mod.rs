//! `cargo xtask quickstart` (what `./quickstart.sh` runs): the whole system
//! on this machine, no Docker: Redis, SecantusDB, one invalidator, two API
//! replicas, as detached processes recorded in a state dir.
//!
//! - `mod.rs`      the command line, the components, the shared context
//! - `config.rs`   settings: environment and `.env`, ports, the state file
//! - `start.rs`    `start` / `run`: what to start, starting it, undoing it
//! - `prepare.rs`  before starting: install what is missing, build
//! - `summary.rs`  where everything is, once started
//! - `follow.rs`   `run`'s foreground: the logs, until Ctrl-C or a death
//! - `status.rs`   `stop` and `status`

mod config;
mod follow;
mod prepare;
mod start;
mod status;
mod summary;

use crate::envfile::Env;
use crate::paths;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use testkit::ready::Ready;
use testkit::state::StateDir;

const KNOBS: &str = "\
It starts (logs in .quickstart/logs/, PIDs in .quickstart/pids/):
  redis-server       127.0.0.1:6380    unless REDIS_URL is set (then that Redis is used)
  SecantusDB         127.0.0.1:27018   unless MONGO_URI is set (a MongoDB stand-in in .venv-secantus/)
  cache-invalidator  127.0.0.1:9100
  cache-api          127.0.0.1:8001 (api-1) and 127.0.0.1:8002 (api-2)
A .env file at the repo root is read first. The services get the variables of
.env.example from the environment (LOG_FORMAT defaults to pretty).

Knobs (environment variables):
  QS_REDIS_PORT QS_MONGO_PORT QS_API1_PORT QS_API2_PORT QS_INVALIDATOR_PORT
                       ports; a busy default port is replaced by a free one, a busy port you chose is an error
  QUICKSTART_PROFILE   release (default) or debug: cargo profile and target/<profile>/ binaries
                       (a first release build takes 10+ minutes on 2 cores; debug is quicker)
  QS_START_TIMEOUT     seconds to wait for each service to become healthy (default 60)
  QS_STOP_TIMEOUT      seconds between TERM and KILL on stop (default 10)
  QS_STATE_DIR         state dir: pids/, logs/, data (default .quickstart)
  QS_DOTENV=0          do not read .env";

/// ./quickstart.sh (cargo xtask quickstart): the whole redis-mongo-cache
/// system on this machine, no Docker.
#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true, after_help = KNOBS)]
pub struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    start: StartArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing, build, start in the background (the default)
    Start(StartArgs),
    /// The same in the foreground (shows the logs; Ctrl-C stops it)
    Run(StartArgs),
    /// Stop all it started
    Stop {
        /// Also delete its data
        #[arg(long)]
        purge: bool,
    },
    /// What runs, with health checks
    Status,
}

#[derive(clap::Args, Clone, Default)]
struct StartArgs {
    /// Load N sample customers (cachectl populate)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    populate: Option<u64>,
    /// Use the binaries already built in target/<QUICKSTART_PROFILE>/
    #[arg(long)]
    no_build: bool,
    /// Use the binaries in DIR (nothing is built)
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

/// The parts, in start order (stop runs backwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comp {
    Redis,
    Mongo,
    Invalidator,
    Api1,
    Api2,
}

/// Every component, in start order (the enum's order).
const COMPONENTS: [Comp; 5] = [
    Comp::Redis,
    Comp::Mongo,
    Comp::Invalidator,
    Comp::Api1,
    Comp::Api2,
];

impl Comp {
    fn name(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Mongo => "mongo",
            Self::Invalidator => "invalidator",
            Self::Api1 => "api-1",
            Self::Api2 => "api-2",
        }
    }

    /// The variable that chooses its port.
    fn port_var(self) -> &'static str {
        match self {
            Self::Redis => "QS_REDIS_PORT",
            Self::Mongo => "QS_MONGO_PORT",
            Self::Invalidator => "QS_INVALIDATOR_PORT",
            Self::Api1 => "QS_API1_PORT",
            Self::Api2 => "QS_API2_PORT",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Self::Redis => 6380,
            Self::Mongo => 27018,
            Self::Invalidator => 9100,
            Self::Api1 => 8001,
            Self::Api2 => 8002,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Redis => "Redis",
            Self::Mongo => "SecantusDB",
            Self::Invalidator => "cache-invalidator",
            Self::Api1 => "cache-api api-1",
            Self::Api2 => "cache-api api-2",
        }
    }

    fn is_app(self) -> bool {
        !matches!(self, Self::Redis | Self::Mongo)
    }

    /// Where it is healthy on `port` (and what status shows).
    fn health(self, port: u16) -> (Ready, String) {
        match self {
            Self::Redis => (Ready::redis_port(port), format!("127.0.0.1:{port}")),
            Self::Mongo => (Ready::mongo_port(port), format!("127.0.0.1:{port}")),
            Self::Invalidator => {
                let url = format!("http://127.0.0.1:{port}/health");
                (Ready::http(url.clone()), url)
            }
            Self::Api1 | Self::Api2 => {
                let url = format!("http://127.0.0.1:{port}/api/health/");
                (Ready::http(url.clone()), url)
            }
        }
    }
}

/// What every subcommand works with.
struct Ctx {
    state: StateDir,
    /// `DIR/env`: the running system's settings, sourceable.
    state_file: PathBuf,
    start_timeout: Duration,
    stop_timeout: Duration,
    /// The environment (after `.env`, for start and run).
    env: Env,
}

impl Ctx {
    /// `env` is what the services get; the state dir and the timeouts come
    /// from our own environment only (never from `.env`), so that every
    /// subcommand finds the same state dir.
    fn new(env: Env) -> Result<Self> {
        let own = Env::inherited();
        let dir = own
            .get("QS_STATE_DIR")
            .map_or_else(|| paths::root().join(".quickstart"), PathBuf::from);
        let state = StateDir::open(&dir)
            .with_context(|| format!("cannot use state dir {}", dir.display()))?;
        let seconds = |var: &str, default: u64| -> Result<Duration> {
            match own.get(var) {
                None => Ok(Duration::from_secs(default)),
                Some(v) => v
                    .parse()
                    .map(Duration::from_secs)
                    .with_context(|| format!("{var}={v}: want a number of seconds")),
            }
        };
        Ok(Self {
            state_file: state.path().join("env"),
            start_timeout: seconds("QS_START_TIMEOUT", 60)?,
            stop_timeout: seconds("QS_STOP_TIMEOUT", 10)?,
            state,
            env,
        })
    }

    fn log_dir(&self) -> PathBuf {
        self.state.path().join("logs")
    }

    fn any_running(&self) -> bool {
        COMPONENTS
            .iter()
            .any(|c| self.state.running(c.name()).is_some())
    }
}

pub async fn run(args: Args) -> Result<i32> {
    let cmd = args.cmd.unwrap_or(Cmd::Start(args.start));
    match cmd {
        Cmd::Start(start) => start::start(start, false).await,
        Cmd::Run(start) => start::start(start, true).await,
        Cmd::Stop { purge } => status::stop(&Ctx::new(Env::inherited())?, purge).await,
        Cmd::Status => status::status(&Ctx::new(Env::inherited())?).await,
    }
}
