//! Before anything starts: install what the components to start need, and
//! build the services (or check that the binaries to use are there).

use super::StartArgs;
use super::config::Config;
use crate::{install, paths, ui};
use anyhow::{Result, bail};
use std::time::Instant;

const BINARIES: [&str; 3] = ["cache-api", "cache-invalidator", "cachectl"];

/// Installs what the components to start need.
pub(super) fn ensure_tools(need_redis: bool, need_mongo: bool) -> Result<()> {
    let mut need = Vec::new();
    if need_mongo && paths::which("python3").is_none() {
        need.extend(["python3", "python3-venv"]);
    }
    if need_redis && paths::which("redis-server").is_none() {
        need.push("redis-server");
    }
    install::apt_install(&need)?;
    if need_mongo {
        ui::log("checking the MongoDB stand-in SecantusDB (.venv-secantus/)");
        install::secantus()?;
    }
    Ok(())
}

/// `cargo build --bins` in the profile, unless told to use what is built.
/// Returns the build's seconds.
pub(super) fn build(config: &Config, args: &StartArgs) -> Result<Option<u64>> {
    let dir = &config.bin_dir;
    let missing = BINARIES.iter().any(|b| !paths::is_executable(&dir.join(b)));
    if args.no_build || args.bin_dir.is_some() {
        let flag = if args.bin_dir.is_some() {
            "--bin-dir"
        } else {
            "--no-build"
        };
        if missing {
            bail!(
                "{flag}, but {} lacks {}: run without {flag}",
                dir.display(),
                BINARIES.join(" ")
            );
        }
        ui::log(format!("{flag}: using the binaries in {}", dir.display()));
        return Ok(None);
    }
    let mut cargo_args = vec!["build", "--bins"];
    if config.profile == "release" {
        cargo_args.push("--release");
    }
    let note = match (missing, config.profile.as_str()) {
        (false, _) => "",
        (true, "release") => {
            " (a first release build takes 10+ minutes on 2 cores; QUICKSTART_PROFILE=debug is quicker)"
        }
        (true, _) => " (the first build takes a few minutes)",
    };
    let shown = format!("cargo {}", cargo_args.join(" "));
    ui::log(format!("building ({}): {shown}{note}", config.profile));
    let began = Instant::now();
    install::run(paths::cargo_command().args(&cargo_args))?;
    let secs = began.elapsed().as_secs();
    ui::log(format!("build done in {secs}s"));
    Ok(Some(secs))
}
