//! `cargo xtask …`: the project's one process supervisor. Local runs
//! (`./quickstart.sh`), the test bed and the test command
//! (`scripts/test.sh`), and the benchmark's processes (`bench/*.sh`) all
//! start, wait for, record and stop processes through it, with the code the
//! tests use (testkit's `launch`, `ready` and `state`). No product crate is
//! linked: services are started from their binaries.
//!
//! - `main.rs`        the command line and the exit status
//! - `quickstart/`    `quickstart`: the whole system (Redis, SecantusDB, invalidator, 2 APIs)
//! - `testbed.rs`     `testbed install|up|down|status`: private Redis + SecantusDB
//! - `test_run.rs`    `test`: the test bed around `cargo nextest run`
//! - `procs.rs`       `proc …`: any detached process in a state dir; the shared start/stop steps
//! - `install.rs`     what a machine lacks: apt packages, SecantusDB's virtualenv
//! - `envfile.rs`     environments and shell-style env files (`.env`, state files)
//! - `signals.rs`     SIGINT/SIGTERM, so commands clean up before exiting
//! - `paths.rs`, `ui.rs`   where things are; how messages look

mod envfile;
mod install;
mod paths;
mod procs;
mod quickstart;
mod signals;
mod test_run;
mod testbed;
mod ui;

use clap::{Parser, Subcommand};
use std::ffi::OsString;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Runs the project's processes: quickstart, the test bed, the tests, the benchmark's processes."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole system on this machine (what ./quickstart.sh runs)
    Quickstart(quickstart::Args),
    /// Private Redis + SecantusDB for the tests and the benchmark
    Testbed {
        #[command(subcommand)]
        cmd: testbed::Cmd,
    },
    /// The test command (what scripts/test.sh runs): test bed up, cargo
    /// nextest run --workspace --all-targets ARGS, test bed down
    Test {
        /// Passed to the test runner
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Detached processes in a state dir (the benchmark's)
    Proc {
        #[command(subcommand)]
        cmd: procs::Cmd,
    },
}

fn main() {
    // Like other command-line tools, end quietly when our output is closed
    // (`… | head`) instead of panicking in println!.
    // SAFETY: sets a signal disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    ui::set_tag(match &cli.cmd {
        Cmd::Quickstart(_) => None,
        Cmd::Testbed { .. } => Some("testbed"),
        Cmd::Test { .. } => Some("test"),
        Cmd::Proc { .. } => Some("proc"),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(async {
            match cli.cmd {
                Cmd::Quickstart(args) => quickstart::run(args).await,
                Cmd::Testbed { cmd } => testbed::run(cmd).await,
                Cmd::Test { args } => test_run::run(args).await,
                Cmd::Proc { cmd } => procs::run(cmd).await,
            }
        }),
        Err(err) => Err(anyhow::Error::new(err).context("cannot start the async runtime")),
    };
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            ui::error(format!("{err:#}"));
            1
        }
    };
    std::process::exit(code);
}
