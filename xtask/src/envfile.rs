//! Environment maps and shell-style env files (`.env`, the state files),
//! read the way `set -a; . FILE` reads the simple cases.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::Path;

/// Variables `cargo run` sets for the program it runs (us); services started
/// from here should not see them.
const CARGO_RUN_VARS: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
];

/// An environment for child processes.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: BTreeMap<OsString, OsString>,
}

impl Env {
    /// Ours, without what `cargo run` added.
    pub fn inherited() -> Self {
        let vars = std::env::vars_os()
            .filter(|(key, _)| {
                let key = key.to_string_lossy();
                !key.starts_with("CARGO_PKG_") && !CARGO_RUN_VARS.contains(&key.as_ref())
            })
            .collect();
        Self { vars }
    }

    /// The value of `key` when set and not empty (the shell's `${KEY:-}`).
    pub fn get(&self, key: &str) -> Option<String> {
        self.vars
            .get(OsStr::new(key))
            .map(|v| v.to_string_lossy().into_owned())
            .filter(|v| !v.is_empty())
    }

    pub fn set(&mut self, key: &str, value: impl Into<OsString>) {
        self.vars.insert(key.into(), value.into());
    }

    pub fn iter(&self) -> impl Iterator<Item = (&OsString, &OsString)> {
        self.vars.iter()
    }

    /// Sets what `file` assigns, as sourcing it would (its values win).
    pub fn source(&mut self, file: &Path) -> std::io::Result<()> {
        let text = std::fs::read_to_string(file)?;
        for (key, value) in parse(&text) {
            self.vars.insert(key.into(), value.into());
        }
        Ok(())
    }
}

/// `KEY=VALUE` lines: blank lines and `#` comments skipped, `export `
/// allowed, values unquoted (up to whitespace), in single quotes (literal),
/// in double quotes (backslash escapes) or a mix (`'it'\''s'`). No `$`
/// expansion.
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            if line.starts_with('#') {
                return None;
            }
            let (key, value) = line.split_once('=')?;
            let valid = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            valid.then(|| (key.to_owned(), shell_word(value)))
        })
        .collect()
}

/// The first shell word of `text`, quotes removed.
fn shell_word(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => out.extend(chars.by_ref().take_while(|&c| c != '\'')),
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some(next @ ('"' | '\\' | '$' | '`')) => out.push(next),
                            Some(next) => {
                                out.push('\\');
                                out.push(next);
                            }
                            None => out.push('\\'),
                        },
                        c => out.push(c),
                    }
                }
            }
            '\\' => out.extend(chars.next()),
            c if c.is_whitespace() => break,
            c => out.push(c),
        }
    }
    out
}

/// `value` single-quoted for a shell (`'` written as `'\''`).
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_shell_would() {
        let text = "# comment\n\nA=1\nexport B='x y'\nC=\"q\\\"uote\" # note\nD=plain # note\n\
                    E='it'\\''s'\n  F=\n9X=no\nG=a=b\n";
        let got = parse(text);
        let want: Vec<(String, String)> = [
            ("A", "1"),
            ("B", "x y"),
            ("C", "q\"uote"),
            ("D", "plain"),
            ("E", "it's"),
            ("F", ""),
            ("G", "a=b"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn quoted_values_read_back_unchanged() {
        for value in ["", "plain", "with space", "it's", "mongodb://h:1/?a=b&c=d"] {
            let line = format!("K={}", quote(value));
            assert_eq!(parse(&line), vec![("K".to_owned(), value.to_owned())]);
        }
    }
}
