//! `cargo xtask test [ARGS…]`: the project's test command (what
//! `scripts/test.sh` runs). Installs the test services if needed, builds the
//! workspace's binaries, starts a private Redis + SecantusDB in a fresh state
//! dir under `target/`, runs
//!   cargo nextest run --workspace --all-targets ARGS   (cargo-nextest installed)
//!   cargo test --workspace --all-targets ARGS          (otherwise, or TEST_RUNNER=cargo)
//! with the test bed's variables, and always tears the test bed down again
//! (also on failure, SIGINT or SIGTERM). Logs stay when the run failed.
//! Exits with the test runner's status.

use crate::signals::Signals;
use crate::{install, paths, testbed, ui};
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

pub async fn run(args: Vec<OsString>) -> Result<i32> {
    let mut signals = Signals::new()?;
    testbed::install_tools()?;
    // The system tests run the services' binaries, and a package without
    // integration tests of its own does not get its binary from the test
    // build: built here, no test waits for a build of its own.
    ui::log("building the workspace's binaries: cargo build --workspace --bins");
    install::run(paths::cargo_command().args(["build", "--workspace", "--bins"]))?;
    let dir = fresh_dir(&paths::target_dir())?;

    let vars = tokio::select! {
        vars = testbed::up(&dir) => vars,
        caught = signals.recv() => {
            ui::warn("interrupted while starting the test bed");
            teardown(&dir, false).await;
            return Ok(caught.exit_code());
        }
    };
    let vars = match vars {
        Ok(vars) => vars,
        Err(err) => {
            teardown(&dir, false).await;
            return Err(err);
        }
    };

    let cargo = paths::cargo();
    let nextest = std::env::var("TEST_RUNNER").ok().as_deref() != Some("cargo")
        && paths::cargo_command()
            .args(["nextest", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let runner: &[&str] = if nextest {
        &["nextest", "run", "--workspace", "--all-targets"]
    } else {
        &["test", "--workspace", "--all-targets"]
    };
    let shown = std::iter::once("cargo".to_owned())
        .chain(runner.iter().map(|s| (*s).to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let extra: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    ui::log(format!("running: {shown} {}", extra.join(" ")));

    let began = Instant::now();
    let spawned = tokio::process::Command::from(paths::cargo_command())
        .args(runner)
        .args(&args)
        .envs(vars)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            teardown(&dir, false).await;
            return Err(err).with_context(|| format!("cannot run {}", cargo.display()));
        }
    };
    let status = tokio::select! {
        status = child.wait() => status,
        caught = signals.recv() => {
            // Stop the runner (and so the tests), then tear down.
            if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
                // SAFETY: a plain syscall on our own unreaped child.
                unsafe { libc::kill(pid, caught.number()) };
            }
            let _ = child.wait().await;
            teardown(&dir, false).await;
            return Ok(caught.exit_code());
        }
    };
    let rc = status.map_or(1, |s| s.code().unwrap_or(1));
    teardown(&dir, rc == 0).await;
    let secs = began.elapsed().as_secs();
    if rc == 0 {
        ui::log(format!("PASSED ({shown}) in {secs}s"));
    } else {
        ui::log(format!(
            "FAILED with exit status {rc} ({shown}) after {secs}s"
        ));
    }
    Ok(rc)
}

/// A new, empty `target/testbed-run.XXXXXX`.
fn fresh_dir(target: &Path) -> Result<PathBuf> {
    use rand::Rng;
    std::fs::create_dir_all(target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    let mut last = None;
    for _ in 0..10 {
        let suffix: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(6)
            .map(char::from)
            .collect();
        let dir = target.join(format!("testbed-run.{suffix}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) => last = Some(err),
        }
    }
    Err(anyhow::anyhow!(
        "cannot create a testbed-run dir in {}: {last:?}",
        target.display()
    ))
}

/// Stops the test bed; removes its dir after a passed run, keeps the logs
/// otherwise.
async fn teardown(dir: &Path, passed: bool) {
    if let Err(err) = testbed::down(dir).await {
        ui::warn(format!(
            "testbed teardown failed ({}): {err:#}",
            dir.display()
        ));
    }
    if passed {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        ui::log(format!("service logs kept in {}", dir.display()));
    }
}
