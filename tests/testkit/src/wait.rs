//! Polling until a condition holds, instead of sleeping for a guessed time.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// What a polled check returns: `bool`, or a `Result` whose error explains
/// the failure (and is reported when time runs out).
pub trait Check {
    type Value;
    fn into_result(self) -> Result<Self::Value, String>;
}

impl Check for bool {
    type Value = ();
    fn into_result(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("condition was false".to_owned())
        }
    }
}

impl<T, E: Display> Check for Result<T, E> {
    type Value = T;
    fn into_result(self) -> Result<T, String> {
        self.map_err(|err| err.to_string())
    }
}

/// Runs `check` every `interval` until it succeeds or `timeout` has passed
/// (it always runs at least once). Returns the success value, or on timeout a
/// message with the number of attempts and the last failure.
///
/// ```ignore
/// eventually(Duration::from_secs(10), Duration::from_millis(100), || async {
///     api.client().get(api.url("/api/health/")).send().await?.status().is_success()
/// }).await.unwrap();
/// ```
pub async fn eventually<F, Fut, C>(
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> Result<C::Value, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
    C: Check,
{
    let started = Instant::now();
    let mut attempts = 0_u32;
    loop {
        attempts += 1;
        let last = match check().await.into_result() {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        if started.elapsed() >= timeout {
            return Err(format!(
                "not true within {timeout:?} ({attempts} attempts); last failure: {last}"
            ));
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_the_value_once_the_check_passes() {
        let calls = AtomicU32::new(0);
        let value = eventually(Duration::from_secs(5), Duration::from_millis(1), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= 3 {
                Ok(n)
            } else {
                Err(format!("only {n}"))
            }
        })
        .await;
        assert_eq!(value, Ok(3));
    }

    #[tokio::test]
    async fn reports_the_last_failure_on_timeout() {
        let err = eventually(
            Duration::from_millis(30),
            Duration::from_millis(5),
            || async { false },
        )
        .await
        .unwrap_err();
        assert!(err.contains("condition was false"), "{err}");
    }
}
