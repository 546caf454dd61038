use crate::codec::Unstorable;
use bson::Document;
use mongodb::error::{Error, ErrorKind, WriteConcernError, WriteFailure};
use std::time::Duration;
use thiserror::Error;

/// Every way a call to the store can fail. Cheap to clone (a failed load is
/// shared by every caller that waited on it) and keeps the driver's error as
/// its source.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// No answer within the call's deadline (the database is slow, down or
    /// unreachable, or every connection is busy).
    #[error("MongoDB did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The database cannot serve now: no server selectable, the connection
    /// broke, the operation's server-side deadline passed, or a failover is
    /// in progress.
    #[error("MongoDB is unavailable")]
    Unavailable(#[source] Error),
    /// The write was applied on the primary but not confirmed as its write
    /// concern asks (`writeConcernError`): replication timed out, the
    /// primary stepped down, or the write concern cannot be satisfied. It
    /// may still be rolled back, so it is never reported (or cached) as
    /// done.
    #[error("MongoDB did not confirm the write (write concern error {code})")]
    NotConfirmed {
        code: i32,
        #[source]
        source: Error,
    },
    /// A write kept colliding with concurrent writes of the same document.
    #[error("concurrent writes to the same customer kept conflicting; retry")]
    Conflict,
    /// The write cannot be stored exactly as sent; nothing was sent.
    #[error(transparent)]
    Unstorable(#[from] Unstorable),
    /// The database refused one item of a bulk write.
    #[error("MongoDB refused the write (code {code}): {message}")]
    Refused { code: i32, message: String },
    /// Anything else the driver reports.
    #[error("MongoDB failed")]
    Driver(#[source] Error),
    /// A stored document (or change event) does not fit the schema.
    #[error("stored document is malformed: {0}")]
    Malformed(String),
    /// The task running the call ended without an answer (it panicked or
    /// the runtime is shutting down).
    #[error("the database call was lost: {0}")]
    Lost(String),
}

/// What a failed write attempt may have done, which decides whether the
/// store sends it once more and what the second answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailedAttempt {
    /// Refused before it ran (the node is not, or no longer, primary, or
    /// is shutting down), or never sent: sending it again is safe.
    NotApplied,
    /// May have been applied: the connection broke after sending, a
    /// failover interrupted it, or it was applied and then its write
    /// concern failed in a failover.
    MaybeApplied,
}

impl StoreError {
    /// Whether the failure is "not now" rather than "wrong": callers answer
    /// these with 503 and may retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Unavailable(_) | Self::Lost(_) => true,
            Self::NotConfirmed { code, .. } => UNCONFIRMED_FOR_NOW.contains(code),
            _ => false,
        }
    }

    /// Sorts a driver error into "unavailable" (transient), "applied but not
    /// confirmed" and the rest.
    pub(crate) fn from_driver(err: Error) -> Self {
        match *err.kind {
            ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. } => Self::Unavailable(err),
            ErrorKind::Command(ref command) if TRANSIENT_CODES.contains(&command.code) => {
                Self::Unavailable(err)
            }
            ErrorKind::Write(WriteFailure::WriteConcernError(ref wce)) => Self::NotConfirmed {
                code: wce.code,
                source: err,
            },
            _ => Self::Driver(err),
        }
    }

    /// `Some` when sending the same write once more can succeed where this
    /// attempt failed: a failover or a broken connection. Not after a
    /// timeout (the first attempt may still be running, and its time is
    /// spent) nor when no server could be selected within the deadline.
    pub(crate) fn failed_attempt(&self) -> Option<FailedAttempt> {
        let code = match self {
            Self::Unavailable(err) => match &*err.kind {
                ErrorKind::Io(_) => return Some(FailedAttempt::MaybeApplied),
                ErrorKind::ConnectionPoolCleared { .. } => return Some(FailedAttempt::NotApplied),
                ErrorKind::Command(command) => command.code,
                _ => return None,
            },
            // Applied on a primary that then stepped down: the new primary
            // may not have it.
            Self::NotConfirmed { code, .. } if FAILOVER_CODES.contains(code) => {
                return Some(FailedAttempt::MaybeApplied);
            }
            _ => return None,
        };
        if NOT_APPLIED_CODES.contains(&code) {
            Some(FailedAttempt::NotApplied)
        } else if FAILOVER_CODES.contains(&code) || NETWORK_CODES.contains(&code) {
            Some(FailedAttempt::MaybeApplied)
        } else {
            None
        }
    }
}

/// The write-concern failure a write command's reply reports, as an error.
/// The driver's `run_command` returns such a reply as a success (`ok: 1`):
/// the write was applied, it just was not confirmed.
pub(crate) fn write_concern_failure(reply: &Document) -> Option<StoreError> {
    let raw = reply.get_document("writeConcernError").ok()?;
    // Read leniently: a reply that says "not confirmed" in an unexpected
    // shape still means "not confirmed".
    let code = match raw.get("code") {
        Some(bson::Bson::Int32(code)) => *code,
        Some(bson::Bson::Int64(code)) => i32::try_from(*code).unwrap_or(0),
        Some(bson::Bson::Double(code)) => *code as i32,
        _ => 0,
    };
    let mut wce = bson::doc! {
        "code": code,
        "codeName": raw.get_str("codeName").unwrap_or_default(),
        "errmsg": raw.get_str("errmsg").unwrap_or("write concern error"),
    };
    if let Ok(info) = raw.get_document("errInfo") {
        wce.insert("errInfo", info.clone());
    }
    let err = match bson::from_document::<WriteConcernError>(wce) {
        Ok(wce) => Error::from(ErrorKind::Write(WriteFailure::WriteConcernError(wce))),
        Err(err) => {
            return Some(StoreError::Malformed(format!(
                "writeConcernError {raw}: {err}"
            )));
        }
    };
    Some(StoreError::from_driver(err))
}

impl From<Error> for StoreError {
    fn from(err: Error) -> Self {
        Self::from_driver(err)
    }
}

/// A failover: the node is not (or no longer) primary, or is shutting down.
const FAILOVER_CODES: [i32; 7] = [
    91,    // ShutdownInProgress
    189,   // PrimarySteppedDown
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

/// Failover errors returned before the operation ran.
const NOT_APPLIED_CODES: [i32; 4] = [91, 10107, 13435, 13436];

/// Network errors a router (mongos) reports about its own connections.
const NETWORK_CODES: [i32; 4] = [
    6,    // HostUnreachable
    7,    // HostNotFound
    89,   // NetworkTimeout
    9001, // SocketException
];

/// Server errors that mean "not now" rather than "wrong": a failover, a
/// network error behind a router, or the operation's deadline passed on
/// the server (MaxTimeMSExpired 50, ExceededTimeLimit 262).
const TRANSIENT_CODES: [i32; 13] = [
    50, 262, 91, 189, 10107, 11600, 11602, 13435, 13436, 6, 7, 89, 9001,
];

/// Write-concern failures that a later retry can get past: replication did
/// not confirm in time (WriteConcernFailed 64, or the deadline: 50, 262),
/// or a failover. The others (UnsatisfiableWriteConcern 100,
/// UnknownReplWriteConcern 79, …) are configuration errors: retrying
/// cannot help.
const UNCONFIRMED_FOR_NOW: [i32; 10] = [64, 50, 262, 91, 189, 10107, 11600, 11602, 13435, 13436];

/// The server error code of a driver error, if it carries one.
pub(crate) fn server_code(err: &Error) -> Option<i32> {
    match &*err.kind {
        ErrorKind::Command(command) => Some(command.code),
        ErrorKind::Write(WriteFailure::WriteError(write)) => Some(write.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(wce)) => Some(wce.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;
    use mongodb::error::CommandError;

    fn command_error(code: i32, name: &str) -> Error {
        let command: CommandError = bson::from_document(doc! {
            "code": code, "codeName": name, "errmsg": "from the server",
        })
        .unwrap();
        Error::from(ErrorKind::Command(command))
    }

    #[test]
    fn an_expired_server_deadline_means_unavailable_not_a_fault() {
        assert!(StoreError::from_driver(command_error(50, "MaxTimeMSExpired")).is_unavailable());
        assert!(
            StoreError::from_driver(command_error(10107, "NotWritablePrimary")).is_unavailable()
        );
        assert!(matches!(
            StoreError::from_driver(command_error(2, "BadValue")),
            StoreError::Driver(_)
        ));
    }

    #[test]
    fn every_failover_error_is_unavailable_and_worth_one_retry() {
        for (code, name, attempt) in [
            (10107, "NotWritablePrimary", FailedAttempt::NotApplied),
            (13435, "NotPrimaryNoSecondaryOk", FailedAttempt::NotApplied),
            (13436, "NotPrimaryOrSecondary", FailedAttempt::NotApplied),
            (91, "ShutdownInProgress", FailedAttempt::NotApplied),
            (189, "PrimarySteppedDown", FailedAttempt::MaybeApplied),
            (11600, "InterruptedAtShutdown", FailedAttempt::MaybeApplied),
            (
                11602,
                "InterruptedDueToReplStateChange",
                FailedAttempt::MaybeApplied,
            ),
            (9001, "SocketException", FailedAttempt::MaybeApplied),
        ] {
            let err = StoreError::from_driver(command_error(code, name));
            assert!(err.is_unavailable(), "{name}");
            assert_eq!(err.failed_attempt(), Some(attempt), "{name}");
        }
        let io = StoreError::from_driver(Error::from(ErrorKind::Io(std::sync::Arc::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        ))));
        assert!(io.is_unavailable());
        assert_eq!(io.failed_attempt(), Some(FailedAttempt::MaybeApplied));
        // Its time is spent: no second attempt.
        let expired = StoreError::from_driver(command_error(50, "MaxTimeMSExpired"));
        assert_eq!(expired.failed_attempt(), None);
        assert_eq!(
            StoreError::Timeout(Duration::from_secs(1)).failed_attempt(),
            None
        );
        assert_eq!(
            StoreError::from_driver(command_error(2, "BadValue")).failed_attempt(),
            None
        );
    }

    /// What MongoDB answers when a write was applied but not confirmed.
    fn reply_with(code: i32, name: &str) -> Document {
        doc! {
            "lastErrorObject": { "n": 1, "updatedExisting": true },
            "value": { "_id": "C1", "version": 5_i64 },
            "writeConcernError": {
                "code": code,
                "codeName": name,
                "errmsg": "waiting for replication timed out",
                "errInfo": { "wtimeout": true },
            },
            "ok": 1.0,
        }
    }

    #[test]
    fn a_write_concern_error_in_a_reply_is_not_success() {
        assert!(write_concern_failure(&doc! { "ok": 1.0, "n": 1 }).is_none());

        // Replication did not confirm in time: 503, no retry (the write is
        // applied; sending it again would wait for the same replication).
        let err = write_concern_failure(&reply_with(64, "WriteConcernFailed")).unwrap();
        assert!(
            matches!(err, StoreError::NotConfirmed { code: 64, .. }),
            "{err:?}"
        );
        assert!(err.is_unavailable());
        assert_eq!(err.failed_attempt(), None);
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert!(
            source.is_some_and(|s| s.contains("waiting for replication")),
            "{err:?}"
        );

        // A failover while waiting: 503, and worth one more attempt on the
        // new primary.
        for (code, name) in [
            (189, "PrimarySteppedDown"),
            (11602, "InterruptedDueToReplStateChange"),
            (91, "ShutdownInProgress"),
        ] {
            let err = write_concern_failure(&reply_with(code, name)).unwrap();
            assert!(err.is_unavailable(), "{name}");
            assert_eq!(err.failed_attempt(), Some(FailedAttempt::MaybeApplied));
        }

        // A write concern the replica set cannot satisfy: retrying cannot
        // help, 500.
        for (code, name) in [
            (100, "UnsatisfiableWriteConcern"),
            (79, "UnknownReplWriteConcern"),
        ] {
            let err = write_concern_failure(&reply_with(code, name)).unwrap();
            assert!(matches!(err, StoreError::NotConfirmed { .. }), "{name}");
            assert!(!err.is_unavailable(), "{name}");
            assert_eq!(err.failed_attempt(), None);
        }

        // The same in the replies of `update` and of a delete.
        let update = doc! {
            "n": 1, "nModified": 1, "ok": 1.0,
            "writeConcernError": { "code": 64, "codeName": "WriteConcernFailed", "errmsg": "x" },
        };
        assert!(write_concern_failure(&update).is_some_and(|e| e.is_unavailable()));
        let delete = doc! {
            "lastErrorObject": { "n": 1 }, "value": { "_id": "C1" }, "ok": 1.0,
            "writeConcernError": { "code": 100, "errmsg": "Not enough data-bearing nodes" },
        };
        assert!(write_concern_failure(&delete).is_some_and(|e| !e.is_unavailable()));
        // Even a malformed one is not success.
        let odd = doc! { "ok": 1.0, "writeConcernError": { "errmsg": "?" } };
        assert!(write_concern_failure(&odd).is_some());
    }

    #[test]
    fn the_driver_error_stays_the_source() {
        let err = StoreError::from_driver(command_error(2, "BadValue"));
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert!(source.is_some_and(|s| s.contains("from the server")));
    }
}
