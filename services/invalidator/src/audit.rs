//! The continuous consistency audit: a sample of the changes the leader
//! applies is read back, `AUDIT_DELAY_MS` later, in every tier and compared
//! with MongoDB (the rules are `consistency::verdict`'s).
//!
//! It lives here because the invalidator sees every change, with its trace,
//! at the moment it is applied (the natural "start the clock" point), is
//! highly available through the lease (the standby takes over the audit with
//! the feed), and costs no process of its own. The change feed never waits
//! for it: [`AuditHandle::offer`] decides and enqueues without awaiting, into
//! a bounded queue (a full queue drops the sample and counts it); the reads
//! run in the [`Auditor`]'s own task, a bounded number at a time.
//!
//! Every inconsistency is logged (key, versions seen, the change's trace
//! id), counted, and repaired: an eviction is requested through the fleet's
//! request path (`FleetClient::request_eviction`), which the leader handles
//! between changes like an operator's — the Redis entry removed behind the
//! fence and an `evict` announced to every replica.

use chrono::Utc;
use consistency::{
    AuditConfig, Checker, Expect, KeyState, Observed, RatioWindow, Sampler, Verdict,
};
use feature_store::{ChangeKind, CustomerId};
use fleet::FleetClient;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Samples waiting for their delay; beyond, samples are dropped (and counted).
const QUEUE_CAPACITY: usize = 4096;
/// Batches of checks reading the tiers at once.
const CHECKS_IN_FLIGHT: usize = 4;
/// Most samples read back together (one near-cache fan-out, one MGET, one
/// `$in` query): the ones due by the time a batch starts.
const BATCH: usize = 100;
/// Repairs waiting for the leader to handle them at once; beyond, a repair
/// is dropped (and counted).
const REPAIRS_IN_FLIGHT: usize = 64;
/// How long a repair waits for the leader to confirm its eviction.
const REPAIR_WAIT: Duration = Duration::from_secs(5);
/// How often the ratio gauges are recomputed (checks age out of the window).
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// The tiers judged, as `tier` labels.
const REDIS: &str = "redis";
const NEAR: &str = "near";

/// One audited change, waiting for its delay.
#[derive(Debug)]
struct Sample {
    customer_id: CustomerId,
    expect: Expect,
    traceparent: Option<String>,
    due: Instant,
}

/// What the change feed holds: decides whether to audit a change and
/// enqueues it, never waiting. Cheap to clone; [`AuditHandle::off`] audits
/// nothing.
#[derive(Clone)]
pub struct AuditHandle {
    inner: Option<Arc<HandleInner>>,
}

struct HandleInner {
    queue: mpsc::Sender<Sample>,
    sampler: Sampler,
    delay: Duration,
}

impl AuditHandle {
    pub fn off() -> Self {
        Self { inner: None }
    }

    /// Offers an applied change: audited with probability `AUDIT_SAMPLE_RATE`
    /// when it concerns one customer's document. `traceparent` is asked for
    /// only when the change is sampled.
    pub fn offer(&self, kind: &ChangeKind, traceparent: impl FnOnce() -> Option<String>) {
        let Some(inner) = &self.inner else {
            return;
        };
        let Some((customer_id, expect, stored_trace)) = audited(kind) else {
            return;
        };
        if !inner.sampler.pick(&mut rand::rng()) {
            return;
        }
        let Ok(customer_id) = CustomerId::parse(customer_id) else {
            return;
        };
        let sample = Sample {
            customer_id,
            expect,
            traceparent: traceparent().or_else(|| stored_trace.map(str::to_owned)),
            due: Instant::now() + inner.delay,
        };
        if inner.queue.try_send(sample).is_err() {
            metrics::counter!("cache_audit_dropped_total", "reason" => "queue_full").increment(1);
        }
    }
}

/// The key, what MongoDB held right after the change, and the trace the
/// change stored; `None` for changes that concern no single document.
fn audited(kind: &ChangeKind) -> Option<(&str, Expect, Option<&str>)> {
    match kind {
        ChangeKind::Written {
            customer_id,
            document,
            traceparent,
            ..
        } => {
            let expect = match document {
                Some(doc) if !doc.is_expired(Utc::now()) => Expect::Version(doc.version),
                _ => Expect::Absent,
            };
            Some((customer_id.as_str(), expect, traceparent.as_deref()))
        }
        ChangeKind::Deleted { customer_id, .. } => {
            Some((customer_id.as_str(), Expect::Absent, None))
        }
        ChangeKind::Unreadable { .. } | ChangeKind::CollectionGone(_) | ChangeKind::Other => None,
    }
}

/// The per-tier ratio windows, on a monotonic clock in seconds.
struct Windows {
    base: std::time::Instant,
    redis: RatioWindow,
    near: RatioWindow,
}

impl Windows {
    fn new(span: Duration) -> Self {
        Self {
            base: std::time::Instant::now(),
            redis: RatioWindow::new(span.as_secs()),
            near: RatioWindow::new(span.as_secs()),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_secs()
    }

    fn record(&mut self, tier: &'static str, consistent: bool) {
        let now = self.now();
        let window = if tier == NEAR {
            &mut self.near
        } else {
            &mut self.redis
        };
        window.record(now, consistent);
    }

    /// Sets `cache_consistency_ratio{tier}`: 1 while no check in the window
    /// judged anything (no evidence of an inconsistency).
    fn publish(&mut self, near: bool) {
        let now = self.now();
        let ratio = self.redis.ratio(now).unwrap_or(1.0);
        metrics::gauge!("cache_consistency_ratio", "tier" => REDIS).set(ratio);
        if near {
            let ratio = self.near.ratio(now).unwrap_or(1.0);
            metrics::gauge!("cache_consistency_ratio", "tier" => NEAR).set(ratio);
        }
    }
}

/// The outcome of one tier's check of one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Judged(Verdict),
    ChangedSince,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Judged(Verdict::Consistent) => "consistent",
            Self::Judged(Verdict::Inconsistent(_)) => "inconsistent",
            Self::ChangedSince => "changed_since",
        }
    }
}

/// Reads samples back once due, judges them and requests repairs.
pub struct Auditor {
    queue: mpsc::Receiver<Sample>,
    shared: Arc<Shared>,
}

struct Shared {
    checker: Checker,
    windows: Mutex<Windows>,
    fleet: FleetClient,
    repairs: Arc<Semaphore>,
}

/// The auditor for `config`: its handle for the change feed, and the task
/// (`None` when `AUDIT_SAMPLE_RATE` is 0). Repairs go through `fleet`.
pub fn start(
    config: &AuditConfig,
    checker: Checker,
    fleet: FleetClient,
) -> (AuditHandle, Option<Auditor>) {
    if !config.enabled() {
        return (AuditHandle::off(), None);
    }
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    metrics::gauge!("cache_audit_delay_seconds").set(config.delay.as_secs_f64());
    let handle = AuditHandle {
        inner: Some(Arc::new(HandleInner {
            queue: tx,
            sampler: Sampler::new(config.sample_rate),
            delay: config.delay,
        })),
    };
    let auditor = Auditor {
        queue: rx,
        shared: Arc::new(Shared {
            checker,
            windows: Mutex::new(Windows::new(config.window)),
            fleet,
            repairs: Arc::new(Semaphore::new(REPAIRS_IN_FLIGHT)),
        }),
    };
    (handle, Some(auditor))
}

impl Auditor {
    /// Runs until `shutdown`: samples are read back once due, in batches of
    /// those due together, up to [`CHECKS_IN_FLIGHT`] batches at a time;
    /// the gauges are refreshed every second.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self { mut queue, shared } = self;
        let near = shared.checker.checks_near();
        tokio::spawn({
            let (shared, shutdown) = (Arc::clone(&shared), shutdown.clone());
            async move {
                let mut tick = tokio::time::interval(PUBLISH_EVERY);
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        _ = tick.tick() => shared.publish(near),
                    }
                }
            }
        });
        let permits = Arc::new(Semaphore::new(CHECKS_IN_FLIGHT));
        // A sample taken off the queue that was not due yet.
        let mut next: Option<Sample> = None;
        loop {
            let first = match next.take() {
                Some(sample) => sample,
                None => tokio::select! {
                    () = shutdown.cancelled() => return,
                    sample = queue.recv() => match sample {
                        Some(sample) => sample,
                        None => return,
                    },
                },
            };
            // Samples arrive in the order they are due (one delay for all):
            // the queue is the delay queue.
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(first.due) => {}
            }
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            let mut batch = vec![first];
            let now = Instant::now();
            while batch.len() < BATCH {
                match queue.try_recv() {
                    Ok(sample) if sample.due <= now => batch.push(sample),
                    Ok(sample) => {
                        next = Some(sample);
                        break;
                    }
                    Err(_) => break,
                }
            }
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                shared.check(batch).await;
                drop(permit);
            });
        }
    }
}

impl Shared {
    fn publish(&self, near: bool) {
        if let Ok(mut windows) = self.windows.lock() {
            windows.publish(near);
        }
    }

    fn record(&self, tier: &'static str, outcome: Outcome) {
        metrics::counter!("cache_consistency_checks_total", "tier" => tier, "result" => outcome.label())
            .increment(1);
        if let Outcome::Judged(verdict) = outcome
            && let Ok(mut windows) = self.windows.lock()
        {
            windows.record(tier, verdict.is_consistent());
        }
    }

    /// Reads a batch of samples back in every tier and judges each.
    async fn check(self: &Arc<Self>, batch: Vec<Sample>) {
        let ids: Vec<CustomerId> = batch.iter().map(|s| s.customer_id.clone()).collect();
        let (states, silent) = match self.checker.read(&ids).await {
            Ok(read) => read,
            Err(err) => {
                metrics::counter!("cache_audit_dropped_total", "reason" => "read_failed")
                    .increment(batch.len() as u64);
                tracing::warn!(keys = batch.len(), error = %telemetry::ErrorChain(&err), "audit: could not read the keys back; checks skipped");
                return;
            }
        };
        if !silent.is_empty() {
            tracing::debug!(?silent, "audit: replicas did not answer");
        }
        for (sample, state) in batch.into_iter().zip(states) {
            let (redis, near) = outcomes(&sample, &state);
            self.record(REDIS, redis);
            if let Some(near) = near {
                self.record(NEAR, near);
            }
            let wrong =
                |o: Option<Outcome>| matches!(o, Some(Outcome::Judged(Verdict::Inconsistent(_))));
            if wrong(Some(redis)) || wrong(near) {
                report(&sample, &state);
                self.repair(state.customer_id, sample.traceparent);
                self.publish(near.is_some());
            }
        }
    }

    /// Requests an eviction of the key everywhere, and counts it repaired
    /// once the leader has handled it (in a task of its own: a check never
    /// waits for the leader).
    fn repair(self: &Arc<Self>, customer_id: String, traceparent: Option<String>) {
        let Ok(permit) = Arc::clone(&self.repairs).try_acquire_owned() else {
            metrics::counter!("cache_audit_dropped_total", "reason" => "repairs_full").increment(1);
            return;
        };
        let fleet = self.fleet.clone();
        tokio::spawn(async move {
            let requested = fleet
                .request_eviction(&customer_id, "audit", traceparent)
                .await;
            let handled = match requested {
                Ok(id) => fleet.wait_handled(&id, REPAIR_WAIT).await,
                Err(err) => Err(err),
            };
            match handled {
                Ok(true) => {
                    metrics::counter!("cache_inconsistencies_repaired_total").increment(1);
                }
                Ok(false) => tracing::warn!(
                    customer_id,
                    "audit: eviction requested, not yet handled by the leader"
                ),
                Err(err) => {
                    metrics::counter!("cache_audit_dropped_total", "reason" => "repair_failed")
                        .increment(1);
                    tracing::warn!(customer_id, error = %telemetry::ErrorChain(&err), "audit: could not request the eviction");
                }
            }
            drop(permit);
        });
    }
}

/// Each tier's outcome for a sample (near: `None` when no replica answered
/// or near caches are not checked; inconsistent when any replica is).
fn outcomes(sample: &Sample, state: &KeyState) -> (Outcome, Option<Outcome>) {
    let near_answered = !state.near.is_empty();
    if sample.expect.moved(state.truth.as_ref()) {
        let moved = Outcome::ChangedSince;
        return (moved, near_answered.then_some(moved));
    }
    let now = Utc::now();
    let redis = Outcome::Judged(state.redis_verdict(now));
    let near = near_answered.then(|| {
        let wrong = state
            .near_verdicts(now)
            .into_iter()
            .find_map(|(_, _, verdict)| (!verdict.is_consistent()).then_some(verdict));
        Outcome::Judged(wrong.unwrap_or(Verdict::Consistent))
    });
    (redis, near)
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
fn trace_id(traceparent: Option<&str>) -> &str {
    traceparent.and_then(|t| t.split('-').nth(1)).unwrap_or("")
}

/// One warning per inconsistent tier (and replica).
fn report(sample: &Sample, state: &KeyState) {
    let now = Utc::now();
    let trace_id = trace_id(sample.traceparent.as_deref());
    let stored = state.truth.as_ref().map(|t| t.version);
    let expected = match sample.expect {
        Expect::Version(v) => Some(v),
        Expect::Absent => None,
    };
    let warn = |tier: &str, instance: &str, observed: &Observed, verdict: Verdict| {
        if let Verdict::Inconsistent(mismatch) = verdict {
            tracing::warn!(
                customer_id = %state.customer_id,
                tier,
                instance,
                mismatch = mismatch.as_str(),
                cached_version = observed.version(),
                stored_version = stored,
                change_version = expected,
                trace_id,
                "audit: a cache disagrees with MongoDB; evicting the key everywhere"
            );
        }
    };
    warn(REDIS, "", &state.redis, state.redis_verdict(now));
    for (instance, observed, verdict) in state.near_verdicts(now) {
        warn(NEAR, instance, observed, verdict);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use feature_store::{FeatureDocument, WriteOp};

    fn document(version: i64, expires_at: &str) -> FeatureDocument {
        serde_json::from_value(serde_json::json!({
            "version": version, "customer_id": "C1", "features": {"a": 1},
            "calculated_at": "2026-01-01T00:00:00.000Z", "model_version": "v1.0.0",
            "expires_at": expires_at,
        }))
        .unwrap()
    }

    fn written(document: Option<FeatureDocument>) -> ChangeKind {
        ChangeKind::Written {
            op: WriteOp::Update,
            customer_id: "C1".into(),
            document,
            version_advanced: true,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    #[test]
    fn writes_and_deletes_of_one_document_are_audited_with_what_they_left() {
        let doc = document(5, "2999-01-01T00:00:00.000Z");
        let change = written(Some(doc));
        let (id, expect, trace) = audited(&change).unwrap();
        assert_eq!((id, expect), ("C1", Expect::Version(5)));
        assert_eq!(
            trace_id(trace),
            "0af7651916cd43dd8448eb211c80319c",
            "the write's trace"
        );
        let expired = document(5, "2000-01-01T00:00:00.000Z");
        assert_eq!(audited(&written(Some(expired))).unwrap().1, Expect::Absent);
        assert_eq!(audited(&written(None)).unwrap().1, Expect::Absent);
        let deleted = ChangeKind::Deleted {
            customer_id: "C1".into(),
            version_bound: 9,
        };
        assert_eq!(audited(&deleted).unwrap().1, Expect::Absent);
        assert!(audited(&ChangeKind::Other).is_none());
        assert!(
            audited(&ChangeKind::Unreadable {
                customer_id: Some("C1".into()),
                reason: "x".into()
            })
            .is_none()
        );
    }

    #[tokio::test]
    async fn an_off_handle_or_a_zero_rate_samples_nothing_and_a_full_queue_drops() {
        let doc = document(5, "2999-01-01T00:00:00.000Z");
        AuditHandle::off().offer(&written(Some(doc.clone())), || panic!("not sampled"));

        let (tx, mut rx) = mpsc::channel(1);
        let handle = |rate: f64| AuditHandle {
            inner: Some(Arc::new(HandleInner {
                queue: tx.clone(),
                sampler: Sampler::new(rate),
                delay: Duration::from_millis(10),
            })),
        };
        handle(0.0).offer(&written(Some(doc.clone())), || panic!("not sampled"));
        assert!(rx.try_recv().is_err());
        let all = handle(1.0);
        all.offer(&written(Some(doc.clone())), || None);
        // The queue holds one: the second is dropped, never awaited.
        all.offer(&written(Some(doc)), || None);
        let sample = rx.try_recv().unwrap();
        assert_eq!(sample.customer_id.as_str(), "C1");
        assert_eq!(sample.expect, Expect::Version(5));
        assert!(sample.traceparent.is_some(), "the change's stored trace");
        assert!(rx.try_recv().is_err());
    }

    fn state(redis: Observed, near: Vec<Observed>, truth: Option<i64>) -> KeyState {
        let body = |v: i64| serde_json::to_value(document(v, "2999-01-01T00:00:00.000Z")).unwrap();
        KeyState {
            customer_id: "C1".into(),
            redis,
            near: near
                .into_iter()
                .enumerate()
                .map(|(n, o)| (format!("api-{n}"), o))
                .collect(),
            truth: truth.map(|version| consistency::Truth {
                version,
                body: body(version),
            }),
        }
    }

    fn sample(expect: Expect) -> Sample {
        Sample {
            customer_id: CustomerId::parse("C1").unwrap(),
            expect,
            traceparent: None,
            due: Instant::now(),
        }
    }

    fn cached(version: i64) -> Observed {
        Observed::Document {
            version,
            body: serde_json::to_value(document(version, "2999-01-01T00:00:00.000Z")).unwrap(),
        }
    }

    #[test]
    fn a_check_judges_each_tier_unless_mongodb_moved_on() {
        use consistency::Mismatch;
        let consistent = Outcome::Judged(Verdict::Consistent);
        assert_eq!(
            outcomes(
                &sample(Expect::Version(5)),
                &state(cached(5), vec![], Some(5))
            ),
            (consistent, None)
        );
        assert_eq!(
            outcomes(
                &sample(Expect::Version(5)),
                &state(Observed::Absent, vec![cached(5), cached(4)], Some(5))
            ),
            (
                consistent,
                Some(Outcome::Judged(Verdict::Inconsistent(Mismatch::Stale)))
            ),
            "one wrong replica makes the near tier inconsistent"
        );
        let mut planted = cached(5);
        if let Observed::Document { body, .. } = &mut planted {
            body["features"]["a"] = serde_json::json!(2);
        }
        assert_eq!(
            outcomes(
                &sample(Expect::Version(5)),
                &state(planted, vec![cached(5)], Some(5))
            )
            .0,
            Outcome::Judged(Verdict::Inconsistent(Mismatch::Content))
        );
        assert_eq!(
            outcomes(
                &sample(Expect::Version(5)),
                &state(cached(5), vec![cached(5)], Some(6))
            ),
            (Outcome::ChangedSince, Some(Outcome::ChangedSince))
        );
        assert_eq!(
            outcomes(&sample(Expect::Absent), &state(cached(5), vec![], None)).0,
            Outcome::Judged(Verdict::Inconsistent(Mismatch::Orphan))
        );
    }
}
