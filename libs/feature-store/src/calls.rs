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

/// What a call is, for the share of the pool it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallClass {
    /// One customer's read or write: may use the whole pool.
    SingleKey,
    /// A bulk write or a batch read: never holds the connections kept for
    /// single-key calls, so a burst of batches cannot starve single reads.
    Bulk,
    /// A health probe (`ping`, `count`): one connection of its own, so a
    /// probe never waits behind, nor takes from, the requests.
    Probe,
}

/// Runs database calls within their deadline and the pool's size.
#[derive(Clone)]
pub(crate) struct CallLimiter {
    /// One permit per pool connection for requests: a call is sent only
    /// once it holds one, so a call still waiting when its deadline passes
    /// is never sent.
    permits: Arc<Semaphore>,
    /// Bulk calls take one of these first: the pool less the reserve.
    bulk: Arc<Semaphore>,
    /// The probes' own connection.
    probe: Arc<Semaphore>,
    /// MongoDB not answering: logged when it starts and when it ends, not
    /// for each of the calls that fail meanwhile.
    reachable: Arc<Condition>,
}

impl CallLimiter {
    /// `max_in_flight` request calls at once, of which bulk calls hold at
    /// most `max_in_flight - single_key_reserve`; probes have one more
    /// connection of their own (the pool needs `max_in_flight + 1`).
    pub(crate) fn new(max_in_flight: usize, single_key_reserve: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            bulk: Arc::new(Semaphore::new(
                max_in_flight.saturating_sub(single_key_reserve).max(1),
            )),
            probe: Arc::new(Semaphore::new(1)),
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
        class: CallClass,
        limit: Duration,
        call: impl Future<Output = Result<T, mongodb::error::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let limit = limit + CLIENT_GRACE;
        let deadline = tokio::time::Instant::now() + limit;
        let (share, permits) = match class {
            CallClass::SingleKey => (None, Arc::clone(&self.permits)),
            CallClass::Bulk => (Some(Arc::clone(&self.bulk)), Arc::clone(&self.permits)),
            CallClass::Probe => (None, Arc::clone(&self.probe)),
        };
        let task = tokio::spawn(
            async move {
                let permit = tokio::time::timeout_at(deadline, async move {
                    let share = match share {
                        Some(share) => Some(share.acquire_owned().await?),
                        None => None,
                    };
                    let permit = permits.acquire_owned().await?;
                    Ok::<_, tokio::sync::AcquireError>((share, permit))
                })
                .await;
                let Ok(Ok(_permits)) = permit else {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Bulk calls that hold every connection they may get (they never
    /// finish here) leave the reserve to a single-key call, which is sent
    /// and answered; a further bulk call waits and times out unsent.
    #[tokio::test]
    async fn bulk_calls_cannot_take_the_connections_kept_for_single_key_calls() {
        let limiter = CallLimiter::new(4, 1);
        let limit = Duration::from_millis(200);
        let mut stuck = Vec::new();
        for _ in 0..10 {
            let limiter = limiter.clone();
            stuck.push(tokio::spawn(async move {
                limiter
                    .run(CallClass::Bulk, Duration::from_secs(60), async {
                        std::future::pending::<Result<(), mongodb::error::Error>>().await
                    })
                    .await
            }));
        }
        // Let the bulk calls take what they can.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let single = limiter
            .run(CallClass::SingleKey, limit, async { Ok(7) })
            .await;
        assert_eq!(single.ok(), Some(7), "the single-key call was served");
        let probe = limiter.run(CallClass::Probe, limit, async { Ok(1) }).await;
        assert_eq!(probe.ok(), Some(1), "the probe was served");
        let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&sent);
        let bulk = limiter
            .run(CallClass::Bulk, limit, async move {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
            .await;
        assert!(matches!(bulk, Err(StoreError::Timeout(_))), "{bulk:?}");
        assert!(
            !sent.load(std::sync::atomic::Ordering::SeqCst),
            "never sent"
        );
        for task in stuck {
            task.abort();
        }
    }
}
