use crate::codec::Unstorable;
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
    Unavailable(#[source] mongodb::error::Error),
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
    Driver(#[source] mongodb::error::Error),
    /// A stored document (or change event) does not fit the schema.
    #[error("stored document is malformed: {0}")]
    Malformed(String),
    /// The task running the call ended without an answer (it panicked or
    /// the runtime is shutting down).
    #[error("the database call was lost: {0}")]
    Lost(String),
}

impl StoreError {
    /// Whether the failure is "not now" rather than "wrong": callers answer
    /// these with 503 and may retry.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Timeout(_) | Self::Unavailable(_) | Self::Lost(_)
        )
    }

    /// Sorts a driver error into "unavailable" (transient) and the rest.
    pub(crate) fn from_driver(err: mongodb::error::Error) -> Self {
        use mongodb::error::ErrorKind;
        match *err.kind {
            ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. } => Self::Unavailable(err),
            ErrorKind::Command(ref command) if TRANSIENT_CODES.contains(&command.code) => {
                Self::Unavailable(err)
            }
            _ => Self::Driver(err),
        }
    }
}

impl From<mongodb::error::Error> for StoreError {
    fn from(err: mongodb::error::Error) -> Self {
        Self::from_driver(err)
    }
}

/// Server errors that mean "not now" rather than "wrong": the operation's
/// deadline passed on the server (MaxTimeMSExpired), or the node is shutting
/// down or is no longer primary (a failover in progress).
const TRANSIENT_CODES: [i32; 6] = [50, 91, 189, 10107, 11600, 13435];

/// The server error code of a driver error, if it carries one.
pub(crate) fn server_code(err: &mongodb::error::Error) -> Option<i32> {
    use mongodb::error::{ErrorKind, WriteFailure};
    match &*err.kind {
        ErrorKind::Command(command) => Some(command.code),
        ErrorKind::Write(WriteFailure::WriteError(write)) => Some(write.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;
    use mongodb::error::{CommandError, Error, ErrorKind};

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
    fn the_driver_error_stays_the_source() {
        let err = StoreError::from_driver(command_error(2, "BadValue"));
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert!(source.is_some_and(|s| s.contains("from the server")));
    }
}
