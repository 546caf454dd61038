//! Request coalescing ("single flight"): concurrent loads of one key share a
//! single execution. The shared future removes itself from the table when it
//! completes, so a caller that gives up (client gone) leaves nothing behind.

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

pub struct Coalescer<K, V: Clone> {
    inflight: Arc<Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>>,
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
    /// its result is shared.
    pub async fn run<F, Fut>(&self, key: K, load: F) -> (V, Role)
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
                    let shared = async move {
                        let value = fut.await;
                        table
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&done_key);
                        value
                    }
                    .boxed()
                    .shared();
                    inflight.insert(key, shared.clone());
                    (shared, Role::Loader)
                }
            }
        };
        (shared.await, role)
    }

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
            assert_eq!(value, 7);
            loaders += usize::from(role == Role::Loader);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(loaders, 1);
        assert_eq!(coalescer.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_abandoned_load_is_finished_by_the_next_caller() {
        let coalescer: Arc<Coalescer<String, u32>> = Arc::default();
        let first = {
            let coalescer = Arc::clone(&coalescer);
            tokio::spawn(async move {
                coalescer
                    .run("k".to_owned(), || async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        1
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        let (value, role) = coalescer.run("k".to_owned(), || async { 2 }).await;
        assert_eq!((value, role), (1, Role::Waiter));
        assert_eq!(coalescer.in_flight(), 0);
        let (value, role) = coalescer.run("k".to_owned(), || async { 3 }).await;
        assert_eq!((value, role), (3, Role::Loader));
    }
}
