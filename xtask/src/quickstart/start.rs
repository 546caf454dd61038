//! `start` and `run`: install what is missing, build, start what does not
//! run yet (Redis and SecantusDB together, then the three services
//! together), print where everything is. Whatever ends a start early (an
//! error, Ctrl-C, SIGTERM, in `run` a service that dies) stops what this
//! invocation started, and only that.

use super::config::Config;
use super::{COMPONENTS, Comp, Ctx, StartArgs, follow, prepare, summary};
use crate::envfile::Env;
use crate::signals::Signals;
use crate::{install, paths, procs, ui};
use anyhow::{Context, Result, anyhow, bail};
use std::io::IsTerminal;
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::launch::Launch;
use testkit::ready::Ready;

/// One `start` or `run` invocation.
struct Start {
    ctx: Ctx,
    /// What this invocation started (or is starting), in order.
    started: Vec<Comp>,
    /// Where REDIS_URL / MONGO_URI came from, for messages.
    origin: &'static str,
    /// Services log in colour (only where a terminal shows the logs).
    color: bool,
    /// The start is over (in `run`: the logs are being shown).
    up: bool,
}

pub(super) async fn start(args: StartArgs, foreground: bool) -> Result<i32> {
    let mut env = Env::inherited();
    let mut origin = "environment";
    let dotenv = paths::root().join(".env");
    if env.get("QS_DOTENV").as_deref() != Some("0") && dotenv.is_file() {
        let had = (env.get("REDIS_URL"), env.get("MONGO_URI"));
        ui::log(format!("reading {}", dotenv.display()));
        env.source(&dotenv)
            .with_context(|| format!("cannot read {}", dotenv.display()))?;
        if had != (env.get("REDIS_URL"), env.get("MONGO_URI")) {
            origin = "environment or .env";
        }
    }
    let color =
        foreground && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let ctx = Ctx::new(env)?;
    // keep the state dir out of git without touching .gitignore
    let ignore = ctx.state.path().join(".gitignore");
    if !ignore.exists() {
        std::fs::write(&ignore, "*\n")
            .with_context(|| format!("cannot write {}", ignore.display()))?;
    }
    let mut run = Start {
        ctx,
        started: Vec::new(),
        origin,
        color,
        up: false,
    };
    let mut signals = Signals::new()?;
    let ending = tokio::select! {
        result = run.start(&args, foreground) => Ending::Done(result),
        caught = signals.recv() => Ending::Signal(caught),
    };
    match ending {
        Ending::Done(Ok(())) => Ok(0),
        // `run` showing the logs of a system started earlier: nothing to stop.
        Ending::Signal(_) if run.up && run.started.is_empty() => Ok(0),
        Ending::Signal(caught) => {
            run.abort("interrupted: stopping what this run started")
                .await;
            Ok(caught.exit_code())
        }
        Ending::Done(Err(err)) => {
            run.abort("stopping what this run started").await;
            Err(err)
        }
    }
}

enum Ending {
    Done(Result<()>),
    Signal(crate::signals::Caught),
}

impl Start {
    async fn start(&mut self, args: &StartArgs, foreground: bool) -> Result<()> {
        let began = Instant::now();
        let (mut config, reusing) = self.configure(args)?;
        let state = &self.ctx.state;

        let mut missing = Vec::new();
        for comp in COMPONENTS.into_iter().filter(|c| config.wanted(*c)) {
            if let Some(record) = state.running(comp.name()) {
                let port = config
                    .port(comp)
                    .map_or_else(|| "?".to_owned(), |p| p.to_string());
                ui::log(format!(
                    "{} is already running (pid {}, port {port})",
                    comp.name(),
                    record.pid
                ));
            } else {
                if state.has_record(comp.name()) {
                    ui::say(format!("removing stale PID file of {}", comp.name()));
                }
                state.remove(comp.name());
                missing.push(comp);
            }
        }

        if missing.is_empty() {
            ui::log("everything is already running: nothing started");
        } else {
            if reusing {
                let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
                ui::log(format!("starting the missing part: {}", names.join(" ")));
                for comp in &missing {
                    if let Some(port) = config.port(*comp)
                        && testkit::process::port_busy(port)
                    {
                        bail!(
                            "port {port} of {} is taken by another process; run './quickstart.sh stop' and start again",
                            comp.name()
                        );
                    }
                }
            }
            prepare::ensure_tools(
                missing.contains(&Comp::Redis),
                missing.contains(&Comp::Mongo),
            )?;
            let build = if missing.iter().any(|c| c.is_app()) {
                prepare::build(&config, args)?
            } else {
                None
            };
            if !reusing {
                config.choose_ports(&self.ctx.env)?;
                self.check_external(&config).await?;
            }
            config.write(&self.ctx.state_file)?;

            let launched = Instant::now();
            // Redis and SecantusDB start together, then the services together.
            for group in [
                &[Comp::Redis, Comp::Mongo][..],
                &[Comp::Invalidator, Comp::Api1, Comp::Api2][..],
            ] {
                let mut starting = Vec::new();
                for comp in group.iter().filter(|c| missing.contains(c)) {
                    let launch = self.launch(*comp, &config)?;
                    // Listed first, so an interrupted start stops it too.
                    self.started.push(*comp);
                    starting.push(procs::spawn(&self.ctx.state, &launch)?);
                }
                for process in starting {
                    let spawned = Instant::now() - process.elapsed();
                    let name = process.name().to_owned();
                    let record = procs::ready(process).await?;
                    ui::say(format!(
                        "{name} is up (pid {}, {}s)",
                        record.pid,
                        spawned.elapsed().as_secs()
                    ));
                }
            }
            let names: Vec<&str> = self.started.iter().map(|c| c.name()).collect();
            let build = build.map_or_else(String::new, |s| format!(" (build {s}s)"));
            ui::log(format!(
                "started {} in {}s{build}; total {}s",
                names.join(" "),
                launched.elapsed().as_secs(),
                began.elapsed().as_secs()
            ));
        }

        if let Some(count) = args.populate {
            self.populate(&config, count)?;
        }
        summary::print(&self.ctx, &config);
        if foreground {
            self.up = true;
            if self.started.is_empty() {
                ui::log(
                    "all was started earlier by './quickstart.sh start': showing the logs; Ctrl-C \
                     stops showing, './quickstart.sh stop' stops the services",
                );
                let all: Vec<Comp> = COMPONENTS
                    .into_iter()
                    .filter(|c| self.ctx.state.log_path(c.name()).is_file())
                    .collect();
                follow::follow(&self.ctx, &all, false).await
            } else {
                let names: Vec<&str> = self.started.iter().map(|c| c.name()).collect();
                ui::log(format!(
                    "running in the foreground; Ctrl-C stops everything started here ({})",
                    names.join(" ")
                ));
                follow::follow(&self.ctx, &self.started, true).await
            }
        } else {
            Ok(())
        }
    }

    /// The running system's settings (kept in the state file) while anything
    /// runs; else new ones from the environment, stale records dropped.
    fn configure(&self, args: &StartArgs) -> Result<(Config, bool)> {
        let env = &self.ctx.env;
        if self.ctx.state_file.is_file() && self.ctx.any_running() {
            let config = Config::read(&self.ctx.state_file)?;
            let differs = |var: &str, running: &str| env.get(var).is_some_and(|v| v != running);
            if differs("REDIS_URL", &config.redis_url) || differs("MONGO_URI", &config.mongo_uri) {
                ui::warn(
                    "keeping the settings of the running system (REDIS_URL/MONGO_URI differ); \
                     './quickstart.sh stop' first to change them",
                );
            }
            if let Some(wanted) = env.get("QUICKSTART_PROFILE")
                && wanted != config.profile
            {
                ui::warn(format!(
                    "the running system uses profile {}, not {wanted}; keeping it",
                    config.profile
                ));
            }
            return Ok((config, true));
        }
        for comp in COMPONENTS {
            if self.ctx.state.has_record(comp.name()) {
                ui::say(format!("removing stale PID file of {}", comp.name()));
            }
            self.ctx.state.remove(comp.name());
        }
        let _ = std::fs::remove_file(&self.ctx.state_file);
        Ok((Config::new(env, args.bin_dir.clone())?, false))
    }

    /// Before starting anything against a Redis/MongoDB you named: are they there?
    async fn check_external(&self, config: &Config) -> Result<()> {
        let origin = self.origin;
        if !config.own_redis {
            let url = &config.redis_url;
            ui::log(format!(
                "using your Redis: REDIS_URL={url} (from the {origin})"
            ));
            Ready::Redis(url.clone()).probe().await.map_err(|err| {
                anyhow!(
                    "REDIS_URL={url} (from the {origin}) does not answer PING ({err}). Start that \
                     Redis, or unset REDIS_URL (also in .env) to let quickstart run its own"
                )
            })?;
            ui::say("REDIS_URL answers PING");
        }
        if !config.own_mongo {
            let uri = &config.mongo_uri;
            ui::log(format!(
                "using your MongoDB: MONGO_URI={uri} (from the {origin})"
            ));
            let ping = Ready::Mongo(uri.clone());
            testkit::wait::eventually(Duration::from_secs(5), ping.interval(), || ping.probe())
                .await
                .map_err(|err| {
                    anyhow!(
                        "MONGO_URI={uri} (from the {origin}) does not answer ping ({err}; a replica \
                         set is needed for change streams). Start that MongoDB, or unset MONGO_URI \
                         (also in .env) to let quickstart run SecantusDB"
                    )
                })?;
            ui::say("MONGO_URI answers ping");
        }
        Ok(())
    }

    /// The services' environment: ours (with `.env`) plus where the stores are.
    fn service_env(&self, config: &Config) -> Env {
        let mut env = self.base_env();
        env.set("REDIS_URL", &config.redis_url);
        env.set("MONGO_URI", &config.mongo_uri);
        env.set("MONGO_DB", &config.mongo_db);
        let format = self
            .ctx
            .env
            .get("LOG_FORMAT")
            .unwrap_or_else(|| "pretty".to_owned());
        env.set("LOG_FORMAT", format);
        if !self.color {
            env.set("NO_COLOR", "1");
        }
        env
    }

    /// Ours, marked with the state dir (so its processes can be found by it).
    fn base_env(&self) -> Env {
        let mut env = self.ctx.env.clone();
        env.set("QUICKSTART_STATE_DIR", self.ctx.state.path());
        env
    }

    fn launch(&self, comp: Comp, config: &Config) -> Result<Launch> {
        let port = config
            .port(comp)
            .with_context(|| format!("no port chosen for {}", comp.name()))?;
        let dir = self.ctx.state.path();
        let launch = match comp {
            Comp::Redis => {
                let server = paths::which("redis-server").context("redis-server not found")?;
                ui::log(format!("starting redis-server on 127.0.0.1:{port}"));
                testkit::redis::launch(&server, port, &dir.join("redis-data"))?
                    .clear_env()
                    .envs(self.base_env().iter())
            }
            Comp::Mongo => {
                let data = dir.join("mongo-data");
                ui::log(format!(
                    "starting SecantusDB on 127.0.0.1:{port} (data in {})",
                    data.display()
                ));
                testkit::secantus::launch(
                    &install::venv().secantusd,
                    port,
                    &dir.join("secantusd.toml"),
                    &data,
                )?
                .clear_env()
                .envs(self.base_env().iter())
            }
            Comp::Invalidator | Comp::Api1 | Comp::Api2 => {
                let (bin, instance) = if comp == Comp::Invalidator {
                    ("cache-invalidator", "invalidator-1")
                } else {
                    ("cache-api", comp.name())
                };
                ui::log(format!("starting {} on 127.0.0.1:{port}", comp.label()));
                Launch::new(comp.name(), config.bin_dir.join(bin))
                    .clear_env()
                    .envs(self.service_env(config).iter())
                    .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
                    .env("INSTANCE_ID", instance)
                    .port(port)
                    .ready(comp.health(port).0)
            }
        };
        Ok(launch
            .named(comp.name())
            .log(self.ctx.state.log_path(comp.name()))
            .timeout(self.ctx.start_timeout)
            .progress(ui::say_line))
    }

    fn populate(&self, config: &Config, count: u64) -> Result<()> {
        let bin = config.bin_dir.join("cachectl");
        ui::log(format!(
            "populating {count} sample customers: {} populate --count {count}",
            bin.display()
        ));
        install::run(
            Command::new(&bin)
                .args(["populate", "--count", &count.to_string()])
                .env_clear()
                .envs(self.service_env(config).iter()),
        )
    }

    /// Stops, newest first, what this invocation started.
    async fn abort(&mut self, why: &str) {
        if self.started.is_empty() {
            return;
        }
        eprintln!();
        ui::warn(why);
        for comp in self.started.iter().rev() {
            if let Err(err) = procs::stop(&self.ctx.state, comp.name(), self.ctx.stop_timeout).await
            {
                ui::warn(format!("{err:#}"));
            }
        }
        self.started.clear();
        if !self.ctx.any_running() {
            let _ = std::fs::remove_file(&self.ctx.state_file);
        }
    }
}
