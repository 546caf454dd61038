//! How messages look: `==> …` for quickstart (as `./quickstart.sh` always
//! printed), `TAG: …` for the other commands; details indented by four.

use std::fmt::Display;
use std::path::Path;
use std::sync::OnceLock;

static TAG: OnceLock<&'static str> = OnceLock::new();

/// Chooses the look once, at start-up: `None` for quickstart's `==>`.
pub fn set_tag(tag: Option<&'static str>) {
    let _ = TAG.set(tag.unwrap_or(""));
}

fn head() -> String {
    match TAG.get() {
        Some(tag) if !tag.is_empty() => format!("{tag}:"),
        _ => "==>".to_owned(),
    }
}

/// A step.
pub fn log(msg: impl Display) {
    println!("{} {msg}", head());
}

/// A detail of the step.
pub fn say(msg: impl Display) {
    println!("    {msg}");
}

/// [`say`] as a plain function, for progress callbacks.
pub fn say_line(msg: &str) {
    say(msg);
}

pub fn warn(msg: impl Display) {
    eprintln!("{} WARNING: {msg}", head());
}

pub fn error(msg: impl Display) {
    eprintln!("{} ERROR: {msg}", head());
}

/// The last `lines` lines of a log on stderr, stack backtraces left out
/// (the message above them says what failed; the log keeps them).
pub fn log_tail(path: &Path, lines: usize) {
    let text = testkit::services::tail_of(path, lines * 20);
    let mut kept = Vec::new();
    let mut in_backtrace = false;
    for line in text.lines() {
        if line.starts_with("Stack backtrace:") {
            in_backtrace = true;
            kept.push("(stack backtrace left out)");
        } else if in_backtrace && line.is_empty() {
            in_backtrace = false;
        } else if !in_backtrace {
            kept.push(line);
        }
    }
    let start = kept.len().saturating_sub(lines);
    eprintln!("----- last lines of {} -----", path.display());
    for line in &kept[start..] {
        eprintln!("{line}");
    }
    eprintln!("-----");
}
