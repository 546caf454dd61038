//! `run`'s foreground: the services' new log lines, prefixed with their
//! names, until Ctrl-C (handled by the caller) or, when watching, until one
//! of them exits.

use super::{Comp, Ctx};
use crate::ui;
use anyhow::{Result, bail};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Shows the logs of `comps` from now on; with `watch`, fails once one of
/// them no longer runs (after its last lines).
pub(super) async fn follow(ctx: &Ctx, comps: &[Comp], watch: bool) -> Result<()> {
    let mut tails: Vec<Tail> = comps
        .iter()
        .map(|c| Tail::at_end(c.name(), ctx.state.log_path(c.name())))
        .collect();
    let mut checked = Instant::now();
    loop {
        tails.iter_mut().for_each(Tail::print_new);
        if watch && checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            if let Some(dead) = comps.iter().find(|c| ctx.state.running(c.name()).is_none()) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                tails.iter_mut().for_each(Tail::print_new);
                ui::log_tail(&ctx.state.log_path(dead.name()), crate::procs::TAIL_LINES);
                bail!("{} exited", dead.name());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// New lines of one log.
struct Tail {
    name: &'static str,
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl Tail {
    fn at_end(name: &'static str, path: PathBuf) -> Self {
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        Self {
            name,
            path,
            offset,
            partial: String::new(),
        }
    }

    fn print_new(&mut self) {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        let len = file.metadata().map_or(0, |m| m.len());
        if len < self.offset {
            // truncated or replaced: from its start
            self.offset = 0;
        }
        let mut fresh = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut fresh).is_err()
        {
            return;
        }
        self.offset += fresh.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&fresh));
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if !line.is_empty() {
                println!("{:<11} | {line}", self.name);
            }
        }
    }
}
