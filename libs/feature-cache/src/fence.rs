//! Fenced writes: a write that lands only while a given key holds a given
//! value. The invalidators' lease is such a key and its holder's token such
//! a value, so a leader that lost the lease (paused, partitioned) cannot
//! write after its successor took over.

use redis::{RedisError, Script};

/// The error code a fenced script answers with when the fence has moved.
const FENCED: &str = "FENCED";

/// Checks the fence before the script's own body runs (the fence key is the
/// script's last key, the expected value its last argument).
const CHECK: &str = include_str!("lua/fence_check.lua");

/// Write only while `key` holds `token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub token: String,
}

impl Fence {
    /// `body` behind the fence check. Invoke it with the fence's key after
    /// the body's keys and its token after the body's arguments
    /// ([`Fence::append`] does both).
    pub fn script(body: &str) -> Script {
        Script::new(&format!("{CHECK}\n{body}"))
    }

    /// Adds the fence's key and token to an invocation, last.
    pub fn append(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation.key(&self.key).arg(&self.token);
    }

    /// Whether a script failed because the fence moved (alone, or any of
    /// a pipeline's).
    pub fn refused(err: &RedisError) -> bool {
        err.code() == Some(FENCED)
            || err
                .clone()
                .into_server_errors()
                .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == FENCED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_answers_with_the_code_refused_looks_for() {
        assert!(CHECK.contains(&format!("error_reply('{FENCED} ")));
    }
}
