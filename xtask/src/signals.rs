//! SIGINT and SIGTERM as something to wait for, so a command can clean up
//! (stop what it started) before it exits.

use anyhow::{Context, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caught {
    Int,
    Term,
}

impl Caught {
    /// The shell's exit status for it (128 + signal number).
    pub fn exit_code(self) -> i32 {
        128 + self.number()
    }

    pub fn number(self) -> i32 {
        match self {
            Self::Int => libc::SIGINT,
            Self::Term => libc::SIGTERM,
        }
    }
}

/// SIGINT and SIGTERM, caught from creation on.
pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    pub fn new() -> Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("cannot catch SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot catch SIGTERM")?,
        })
    }

    /// The next one to arrive.
    pub async fn recv(&mut self) -> Caught {
        tokio::select! {
            _ = self.int.recv() => Caught::Int,
            _ = self.term.recv() => Caught::Term,
        }
    }
}
