//! A call that misses its deadline answers "unavailable" at once. If it was
//! sent, it runs to completion in the background and its connection goes
//! back to the pool instead of being torn down (the driver cannot reuse a
//! connection whose operation was dropped half-way, and an overloaded
//! database that kept losing connections kept a replica from reaching it
//! long after). If it was still waiting for a connection, it is never sent.

use feature_store::{CustomerId, FeatureStore, StoreConfig, StoreError};
use std::time::{Duration, Instant};
use testkit::prometheus;
use testkit::proxy::GatedProxy;

const TIMEOUT: Duration = Duration::from_millis(300);

fn counter(name: &str) -> f64 {
    let samples = prometheus::parse(&telemetry::metrics::render()).expect("Prometheus text");
    prometheus::sum(&samples, name, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_their_deadline_keep_their_connections_and_unsent_ones_are_never_sent() {
    telemetry::metrics::install();
    let db = testkit::TestDb::new("deadlines").await;
    // The proxy holds the requests (a database too slow to answer in time)
    // without losing them.
    let proxy = GatedProxy::start(testkit::mongo::mongo_addr()).await;
    let uri = format!(
        "mongodb://127.0.0.1:{}/?directConnection=true&retryWrites=false",
        proxy.port()
    );
    let store = FeatureStore::connect(&StoreConfig {
        uri,
        database: db.name().to_owned(),
        collection: "features".to_owned(),
        timeout: TIMEOUT,
        app_name: "deadlines-test".to_owned(),
    })
    .await
    .expect("client");
    let id = CustomerId::parse("SLOW").expect("id");
    assert!(store.get(&id).await.expect("a first read").is_none());
    let commands_before = counter("mongodb_commands_total");
    assert_eq!(counter("mongodb_connections_closed_total"), 0.0);

    proxy.close();
    let started = Instant::now();
    // More calls than the pool has connections (10).
    let reads = (0..12).map(|_| {
        let (store, id) = (store.clone(), id.clone());
        tokio::spawn(async move { store.get(&id).await })
    });
    for read in futures::future::join_all(reads).await {
        let result = read.expect("task");
        assert!(matches!(result, Err(StoreError::Timeout(_))), "{result:?}");
    }
    // Bounded by the deadline plus the grace, with a wide margin.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Give a dropped call's connection time to be closed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        counter("mongodb_connections_closed_total"),
        0.0,
        "a call that missed its deadline cost a connection"
    );

    // Once the database answers, the calls that got a connection complete in
    // the background; the two that never got one are never sent.
    proxy.open();
    let opened = Instant::now();
    while counter("mongodb_commands_total") < commands_before + 10.0 {
        assert!(
            opened.elapsed() < Duration::from_secs(10),
            "the calls that were sent never completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        counter("mongodb_commands_total"),
        commands_before + 10.0,
        "a call sent after its caller was told 503"
    );
    assert!(store.get(&id).await.expect("a read after").is_none());
    assert_eq!(counter("mongodb_connections_closed_total"), 0.0);
    store.shutdown().await;
    db.drop_db().await;
}
