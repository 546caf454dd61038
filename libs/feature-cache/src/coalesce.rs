//! Request coalescing ("single flight"): concurrent loads of one key share a
//! single execution.
//!
//! The load runs in a task of its own, so it always finishes — also when
//! every caller that waited on it has gone away — and it leaves the table
//! before it hands its result out: a caller that comes after the load
//! finished never receives that result, it starts a load of its own. The
//! table therefore only ever holds loads in flight.

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

type InFlight<K, V> = Arc<Mutex<HashMap<K, Shared<BoxFuture<'static, Option<V>>>>>>;

pub struct Coalescer<K, V: Clone> {
    inflight: InFlight<K, V>,
}

impl<K, V> Default for Coalescer<K, V>
where
    V: Clone,
{
    fn default() -> Self {
        Self {
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// Whether a caller ran the load or waited on another caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Loader,
    Waiter,
}

impl<K, V> Coalescer<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `load` unless a load for `key` is already in flight, in which case
    /// its result is shared. `None` when the load's task did not finish (it
    /// panicked, or the runtime is shutting down).
    pub async fn run<F, Fut>(&self, key: K, load: F) -> (Option<V>, Role)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (shared, role) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
            match inflight.get(&key) {
                Some(shared) => (shared.clone(), Role::Waiter),
                None => {
                    let table = Arc::clone(&self.inflight);
                    let done_key = key.clone();
                    let fut = load();
                    let task = tokio::spawn(async move {
                        let value = fut.await;
                        // Out of the table before anyone can see the value.
                        table
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&done_key);
                        value
                    });
                    let shared = task.map(Result::ok).boxed().shared();
                    inflight.insert(key, shared.clone());
                    (shared, Role::Loader)
                }
            }
        };
        (shared.await, role)
    }

    /// Loads in flight now.
    pub fn in_flight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let coalescer: Arc<Coalescer<String, u32>> = Arc::default();
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let coalescer = Arc::clone(&coalescer);
            let loads = Arc::clone(&loads);
            tasks.push(tokio::spawn(async move {
                coalescer
                    .run("k".to_owned(), || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        7
                    })
                    .await
            }));
        }
        let mut loaders = 0;
        for task in tasks {
            let (value, role) = task.await.unwrap();
            assert_eq!(value, Some(7));
            loaders += usize::from(role == Role::Loader);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(loaders, 1);
        assert_eq!(coalescer.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_abandoned_load_finishes_and_its_result_goes_to_no_later_caller() {
        let coalescer: Arc<Coalescer<String, u32>> = Arc::default();
        let finished = Arc::new(AtomicUsize::new(0));
        let first = {
            let (coalescer, finished) = (Arc::clone(&coalescer), Arc::clone(&finished));
            tokio::spawn(async move {
                coalescer
                    .run("k".to_owned(), || async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        finished.fetch_add(1, Ordering::SeqCst);
                        1
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The only caller goes away (a client that disconnected).
        first.abort();
        // The load still finishes, and leaves the table by itself.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert_eq!(coalescer.in_flight(), 0);
        // A caller after that gets a load of its own, never the parked result.
        let (value, role) = coalescer.run("k".to_owned(), || async { 2 }).await;
        assert_eq!((value, role), (Some(2), Role::Loader));
    }

    #[tokio::test]
    async fn the_table_only_holds_loads_in_flight() {
        let coalescer: Arc<Coalescer<u32, u32>> = Arc::default();
        let callers: Vec<_> = (0..1000)
            .map(|key| {
                let coalescer = Arc::clone(&coalescer);
                tokio::spawn(async move {
                    coalescer
                        .run(key, || async move {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            key
                        })
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(5)).await;
        for caller in &callers {
            caller.abort();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(coalescer.in_flight(), 0);
    }
}
