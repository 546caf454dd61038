//! `cargo xtask testbed install|up|down|status`: a private `redis-server`
//! and a SecantusDB (MongoDB stand-in, one-node replica set `secantus`) on
//! free ports, for the tests and the benchmark. `up` writes `DIR/env`, to be
//! sourced (`set -a; . DIR/env; set +a`). The system Redis on port 6379 is
//! never used or touched.
//!
//! Optional environment: `TESTBED_START_TIMEOUT` (seconds each service may
//! take, default 30), `TESTBED_SECANTUS_ARGS` (extra `secantusd-py` flags,
//! split at whitespace, e.g. `--log-level DEBUG`).

use crate::envfile::{Env, quote};
use crate::{install, paths, procs, ui};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::ready::Ready;
use testkit::state::StateDir;

/// How long `down` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Subcommand)]
pub enum Cmd {
    /// Creates .venv-secantus/ with SecantusDB; checks redis-server, chromium
    /// and chromedriver (apt-get installs them as root)
    Install,
    /// Starts both (state dir, default target/testbed) and writes DIR/env
    Up { dir: Option<PathBuf> },
    /// Shows what runs in DIR
    Status { dir: Option<PathBuf> },
    /// Stops both (by PID only) and removes their data; logs stay in DIR/logs/
    Down { dir: Option<PathBuf> },
}

pub async fn run(cmd: Cmd) -> Result<i32> {
    let dir = |d: Option<PathBuf>| d.unwrap_or_else(|| paths::target_dir().join("testbed"));
    match cmd {
        Cmd::Install => install_tools().map(|_| 0),
        Cmd::Up { dir: d } => up(&dir(d)).await.map(|_| 0),
        Cmd::Status { dir: d } => status(&dir(d)).await,
        Cmd::Down { dir: d } => down(&dir(d)).await.map(|()| 0),
    }
}

/// SecantusDB in `.venv-secantus/` and `redis-server`, installed if missing.
pub fn install_tools() -> Result<install::Venv> {
    ui::log(format!(
        "install: checking SecantusDB {} in .venv-secantus/",
        install::SECANTUS_VERSION
    ));
    let venv = install::secantus()?;
    ui::log("install: checking redis-server");
    let redis = install::redis_server()?;
    ui::say(format!("redis-server: {}", redis.display()));

    // The API's documentation pages are tested in a real headless browser
    // (services/api/tests/it/docs.rs), driven through chromedriver.
    ui::log("install: checking chromium and chromedriver");
    if paths::which("chromium").is_none() || paths::which("chromedriver").is_none() {
        if install::can_apt() {
            install::apt_install(&["chromium", "chromium-driver"])?;
        } else {
            ui::warn(
                "chromium/chromedriver missing and we are not root: the browser test will fail; \
                 install Debian's chromium and chromium-driver packages",
            );
        }
    }
    if let Some(driver) = paths::which("chromedriver") {
        ui::say(format!("chromedriver: {}", driver.display()));
    }

    // The load balancer's configuration is tested with Debian's nginx in
    // front of real replicas (tests/system/tests/it/load_balancer.rs).
    ui::log("install: checking nginx");
    let nginx = paths::which("nginx").or_else(|| {
        let sbin = std::path::PathBuf::from("/usr/sbin/nginx");
        paths::is_executable(&sbin).then_some(sbin)
    });
    match nginx {
        Some(path) => ui::say(format!("nginx: {}", path.display())),
        None if install::can_apt() => install::apt_install(&["nginx-light"])?,
        None => ui::warn(
            "nginx missing and we are not root: the load-balancer tests will fail; \
             install Debian's nginx-light package",
        ),
    }
    Ok(venv)
}

/// Starts the test bed in `dir` (or reuses the one running there) and
/// returns the variables of `DIR/env`.
pub async fn up(dir: &Path) -> Result<Vec<(String, String)>> {
    let venv = install::venv();
    if !paths::is_executable(&venv.secantusd) {
        bail!(
            "{} missing: run `cargo xtask testbed install` first",
            venv.secantusd.display()
        );
    }
    let redis_server = paths::which("redis-server")
        .context("redis-server missing: run `cargo xtask testbed install` first")?;
    let state = StateDir::open(dir).with_context(|| format!("cannot use {}", dir.display()))?;
    let dir = state.path().to_path_buf();
    let env_file = dir.join("env");

    let redis = state.running("redis");
    let mongo = state.running("mongo");
    if let (Some(redis), Some(mongo), true) = (&redis, &mongo, env_file.is_file()) {
        ui::log(format!(
            "already up in {} (redis pid {}, secantusd pid {}): reusing it",
            dir.display(),
            redis.pid,
            mongo.pid
        ));
        return read_env(&env_file);
    }
    if state.has_record("redis") || state.has_record("mongo") {
        ui::log(format!(
            "stale or partial testbed in {}: cleaning it up first",
            dir.display()
        ));
        down(&dir).await?;
    }

    let ports = testkit::process::free_ports(2)?;
    let (redis_port, mongo_port) = (ports[0], ports[1]);
    ui::log(format!(
        "state dir {}; redis port {redis_port}; SecantusDB port {mongo_port}",
        dir.display()
    ));
    let _ = std::fs::remove_file(&env_file);
    let timeout = Duration::from_secs(
        std::env::var("TESTBED_START_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    let redis = testkit::redis::launch(&redis_server, redis_port, &dir.join("redis-data"))?
        .named("redis")
        .log(state.log_path("redis"))
        .timeout(timeout)
        .progress(ui::say_line);
    let extra = std::env::var("TESTBED_SECANTUS_ARGS").unwrap_or_default();
    let mongo = testkit::secantus::launch(
        &venv.secantusd,
        mongo_port,
        &dir.join("secantusd.toml"),
        &dir.join("mongo-data"),
    )?
    .args(extra.split_whitespace())
    .named("mongo")
    .log(state.log_path("mongo"))
    .timeout(timeout)
    .progress(ui::say_line);

    // Both start at once: SecantusDB's start-up (about a second) overlaps Redis'.
    let began = Instant::now();
    ui::log("starting redis-server and SecantusDB");
    let started = async {
        let redis = procs::spawn(&state, &redis)?;
        let mongo = procs::spawn(&state, &mongo)?;
        procs::ready(redis).await?;
        ui::say("redis-server ready");
        procs::ready(mongo).await?;
        ui::say(format!(
            "SecantusDB ready after {:.1} s",
            began.elapsed().as_secs_f64()
        ));
        anyhow::Ok(())
    }
    .await;
    if let Err(err) = started {
        down(&dir).await.ok();
        return Err(err);
    }

    let vars: Vec<(String, String)> = [
        ("REDIS_URL", format!("redis://127.0.0.1:{redis_port}/0")),
        ("MONGO_URI", testkit::secantus::uri(mongo_port)),
        ("TESTBED_REDIS_PORT", redis_port.to_string()),
        ("TESTBED_MONGO_PORT", mongo_port.to_string()),
        ("TESTBED_DIR", dir.display().to_string()),
        ("SECANTUSD", venv.secantusd.display().to_string()),
        ("REDIS_SERVER", redis_server.display().to_string()),
        ("TESTBED_PYTHON", venv.python.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut text = String::from(
        "# written by `cargo xtask testbed up`; source it (set -a) to use the testbed\n",
    );
    for (key, value) in &vars {
        text.push_str(&format!("export {key}={}\n", quote(value)));
    }
    let tmp = dir.join("env.tmp");
    std::fs::write(&tmp, &text)
        .and_then(|()| std::fs::rename(&tmp, &env_file))
        .with_context(|| format!("cannot write {}", env_file.display()))?;
    ui::log(format!(
        "testbed up; environment in {}:",
        env_file.display()
    ));
    print!("{text}");
    Ok(vars)
}

fn read_env(file: &Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    print!("{text}");
    Ok(crate::envfile::parse(&text))
}

/// Stops both (by PID only) and removes their data; logs stay.
pub async fn down(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        ui::log(format!("no state dir {}: nothing to stop", dir.display()));
        return Ok(());
    }
    let state = StateDir::open(dir)?;
    procs::stop(&state, "mongo", STOP_GRACE).await?;
    procs::stop(&state, "redis", STOP_GRACE).await?;
    for data in ["mongo-data", "redis-data"] {
        let _ = std::fs::remove_dir_all(state.path().join(data));
    }
    for file in ["env", "env.tmp", "secantusd.toml"] {
        let _ = std::fs::remove_file(state.path().join(file));
    }
    ui::log(format!(
        "down in {} (logs kept: {}/logs/)",
        state.path().display(),
        state.path().display()
    ));
    Ok(())
}

/// What runs in `dir`: 0 when both run and answer.
async fn status(dir: &Path) -> Result<i32> {
    if !dir.is_dir() {
        ui::log(format!("no testbed in {}", dir.display()));
        return Ok(1);
    }
    let state = StateDir::open(dir)?;
    let env_file = state.path().join("env");
    let vars = std::fs::read_to_string(&env_file)
        .map(|t| crate::envfile::parse(&t))
        .unwrap_or_default();
    let mut env = Env::default();
    for (key, value) in vars {
        env.set(&key, value);
    }
    let mut ok = 0;
    for (name, label, port_var) in [
        ("redis", "redis-server", "TESTBED_REDIS_PORT"),
        ("mongo", "SecantusDB", "TESTBED_MONGO_PORT"),
    ] {
        let port = env.get(port_var).and_then(|p| p.parse::<u16>().ok());
        match state.running(name) {
            Some(record) => {
                let probe = match (name, port) {
                    ("redis", Some(port)) => Some(Ready::redis_port(port)),
                    (_, Some(port)) => Some(Ready::mongo_port(port)),
                    _ => None,
                };
                let answers = match &probe {
                    Some(probe) => probe.probe().await.is_ok(),
                    None => false,
                };
                let port = port.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
                if answers {
                    println!(
                        "{label:<13} running, pid {}, 127.0.0.1:{port}, ping ok",
                        record.pid
                    );
                } else {
                    println!(
                        "{label:<13} pid {} alive but no ping answer (port {port})",
                        record.pid
                    );
                    ok = 1;
                }
            }
            None => {
                let stale = if state.has_record(name) {
                    " (stale PID file)"
                } else {
                    ""
                };
                println!("{label:<13} not running{stale}");
                ok = 1;
            }
        }
    }
    if env_file.is_file() {
        println!("env file: {}", env_file.display());
        read_env(&env_file)?;
    }
    Ok(ok)
}
