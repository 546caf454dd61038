//! Cross-replica miss coalescing: the reservation a read places in Redis
//! before it reads MongoDB is also a lease on that read.
//!
//! Within a replica the [`Coalescer`](crate::coalesce::Coalescer) already
//! makes one load per key; across replicas, the first reservation decides:
//! its maker leads (reads MongoDB and fills), and a replica that finds it
//! there waits a little for the fill instead of reading MongoDB too — the
//! memcache lease. A lease holder that is slow or dead costs the others at
//! most the wait: then they read MongoDB themselves and fill onto the shared
//! reservation, which is exactly as safe as the leader's fill (each began
//! after the reservation was made, and any change since removed it).

use crate::entry::Entry;
use crate::redis_tier::{Peek, RedisTier};
use std::time::Duration;
use tokio::time::Instant;

/// The first pause between two looks at the key; each pause doubles up to
/// [`MAX_PAUSE`]. A MongoDB read by `_id` takes about a millisecond, so most
/// fills are seen after a look or two.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(20);

/// What waiting on another's reservation gave.
#[derive(Debug)]
pub enum Waited {
    /// The lease holder filled the key: a document or a cached absence.
    Filled(Entry),
    /// The wait ran out, or the key changed in another way (removed,
    /// reserved again, a marker): read MongoDB yourself.
    GaveUp,
}

/// Polls `customer_id` (with a short backoff) until the reservation `token`
/// is replaced by a fill, for at most `wait`.
pub async fn wait_for_fill(
    redis: &RedisTier,
    customer_id: &str,
    token: &str,
    wait: Duration,
) -> Waited {
    let deadline = Instant::now() + wait;
    let mut pause = FIRST_PAUSE;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Waited::GaveUp;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
        match redis.peek(customer_id).await {
            Ok(Peek::Reserved(held)) if held == token => {}
            Ok(Peek::Entry(entry @ (Entry::Document(_) | Entry::Absent { .. }))) => {
                return Waited::Filled(entry);
            }
            Ok(_) => return Waited::GaveUp,
            Err(err) => {
                tracing::debug!(customer_id, error = %telemetry::ErrorChain(&err), "could not look at a lease; reading MongoDB");
                return Waited::GaveUp;
            }
        }
    }
}
