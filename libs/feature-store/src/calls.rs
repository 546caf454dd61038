//! How every database call is bounded: by a deadline, and by a permit per
//! pool connection.

use crate::error::StoreError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use telemetry::Condition;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// How much longer than the server-side deadline (`maxTimeMS`) the client
/// waits: the server gives up first and says so.
const CLIENT_GRACE: Duration = Duration::from_millis(250);

/// Runs database calls within their deadline and the pool's size.
#[derive(Clone)]
pub(crate) struct CallLimiter {
    /// One permit per pool connection: a call is sent only once it holds
    /// one, so a call still waiting when its deadline passes is never sent.
    permits: Arc<Semaphore>,
    /// MongoDB not answering: logged when it starts and when it ends, not
    /// for each of the calls that fail meanwhile.
    reachable: Arc<Condition>,
}

impl CallLimiter {
    pub(crate) fn new(max_in_flight: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            reachable: Arc::new(Condition::new(
                "mongodb",
                "MongoDB does not answer; what needs it fails until it does",
                "MongoDB answers again",
            )),
        }
    }

    /// Waits at most `limit` (plus a grace) for a database call.
    ///
    /// Operations carry the same deadline to the server (`maxTimeMS`), so the
    /// database stops work nobody waits for. A call is sent only with one of
    /// the pool's permits, and one still waiting for a permit at its deadline
    /// is never sent: a write answered 503 then cannot land much later. A
    /// call that was sent runs to completion in a task of its own, past its
    /// caller's deadline if need be: the driver cannot reuse a connection
    /// whose operation was dropped half-way, and under overload that churn
    /// kept a replica from reaching MongoDB long after the load was gone.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        limit: Duration,
        call: impl Future<Output = Result<T, mongodb::error::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let limit = limit + CLIENT_GRACE;
        let deadline = tokio::time::Instant::now() + limit;
        let permits = Arc::clone(&self.permits);
        let task = tokio::spawn(
            async move {
                let permit = tokio::time::timeout_at(deadline, permits.acquire_owned()).await;
                let Ok(Ok(_permit)) = permit else {
                    return None;
                };
                Some(call.await)
            }
            .in_current_span(),
        );
        let result = match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Some(result))) => result.map_err(StoreError::from_driver),
            Ok(Ok(None)) | Err(_) => Err(StoreError::Timeout(limit)),
            Ok(Err(failed)) => Err(StoreError::Lost(failed.to_string())),
        };
        match &result {
            Err(err) if err.is_unavailable() => {
                self.reachable.fail(err);
            }
            // Any answer, also a refusal, shows that MongoDB is there.
            _ => {
                self.reachable.recover();
            }
        }
        result
    }
}
