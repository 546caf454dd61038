//! Write outcomes: a write MongoDB applied but did not confirm is never
//! answered (or cached) as a success; failover errors are retried once in
//! the store and otherwise answered 503 with `Retry-After`, never 500.
//!
//! These tests run their own stand-in with `--enable-test-commands`, whose
//! `failCommand` fail point answers the next commands with the errors and
//! `writeConcernError`s MongoDB sends in a failover (the write-concern ones
//! after applying the write, as MongoDB does).

use crate::support::{NEAR_OFF, Reply, TestStack};
use bson::{Bson, Document, doc};
use redis::AsyncCommands;
use serde_json::json;
use std::time::Duration;
use testkit::eventually;

/// A [`TestStack`] on a stand-in of its own with fail points, the near
/// cache off.
struct Bed(TestStack);

impl std::ops::Deref for Bed {
    type Target = TestStack;
    fn deref(&self) -> &TestStack {
        &self.0
    }
}

impl Bed {
    async fn start(prefix: &str, mongo_args: &[&str], overrides: &[(&str, &str)]) -> Self {
        // An error injected by `failCommand` changes nothing on the server,
        // so the driver's streaming monitor (which marks the server unknown
        // after a "not primary" error) only hears of it again at its next
        // heartbeat: 10 s by default, longer than a retry waits. In a real
        // failover the server's state changes, and the monitor hears at once.
        let mut settings = vec![NEAR_OFF];
        settings.extend_from_slice(overrides);
        let stack = TestStack::start_on_own_mongo(
            prefix,
            mongo_args,
            "&heartbeatFrequencyMS=500",
            &settings,
        )
        .await;
        Self(stack)
    }

    /// Makes the next `times` commands named in `commands` fail as `data`
    /// says (`errorCode`, `writeConcernError`, `closeConnection`).
    async fn fail_next(&self, times: i32, commands: &[&str], mut data: Document) {
        data.insert("failCommands", commands.to_vec());
        self.own_mongo().fail_commands(times, data).await;
    }

    /// What Redis holds for `id`: a document or a tombstone. A write
    /// reserves its key before it goes to MongoDB; the reservation is no
    /// content (never served, and it expires), so it counts as nothing.
    async fn cached(&self, id: &str) -> Option<String> {
        let value: Option<String> = self
            .redis_conn()
            .await
            .get(format!("features:{id}"))
            .await
            .unwrap();
        value.filter(|v| !is_reservation(v))
    }

    async fn stored(&self, id: &str) -> Option<Document> {
        self.db
            .features()
            .find_one(doc! { "_id": id })
            .await
            .unwrap()
    }

    /// A bulk write of empty features for `ids`.
    async fn bulk(&self, ids: &[&str]) -> Reply {
        let items: Vec<_> = ids
            .iter()
            .map(|id| json!({"customer_id": id, "features": {}}))
            .collect();
        self.api
            .post("/api/features/bulk/", &json!({ "features_list": items }))
            .await
    }

    async fn post(&self, id: &str, n: i64) -> Reply {
        self.api
            .post(
                "/api/features/",
                &json!({"customer_id": id, "features": {"n": n}}),
            )
            .await
    }
}

fn is_reservation(value: &str) -> bool {
    value.contains(r#""reserved":"#)
}

fn write_concern_error(code: i32, name: &str) -> Document {
    doc! {
        "writeConcernError": {
            "code": code,
            "codeName": name,
            "errmsg": "waiting for replication timed out",
            "errInfo": { "wtimeout": true },
        }
    }
}

/// A 503 that tells the client when to come back.
fn expect_retry_later(reply: &Reply, what: &str) {
    reply.expect_error(503, "service_unavailable");
    assert_eq!(
        reply.header("retry-after"),
        Some("1"),
        "{what}: {:?}",
        reply.headers
    );
}

#[tokio::test]
async fn a_write_mongodb_did_not_confirm_is_not_a_success_and_is_not_cached() {
    let bed = Bed::start("outcomes_unconfirmed", &["--enable-test-commands"], &[]).await;

    // Replication did not confirm in time: 503, Retry-After, nothing cached.
    bed.fail_next(
        1,
        &["findAndModify"],
        write_concern_error(64, "WriteConcernFailed"),
    )
    .await;
    let reply = bed.post("U1", 1).await;
    expect_retry_later(&reply, "upsert not confirmed");
    assert_eq!(bed.cached("U1").await, None);
    // MongoDB did apply it (it may still be rolled back on a real replica
    // set); a read finds it there, not in a cache.
    assert!(bed.stored("U1").await.is_some());
    let reply = bed.api.get("/api/features/U1/").await;
    assert_eq!(reply.header("x-cache-source"), Some("mongodb"));

    // A write concern that cannot be satisfied: retrying cannot help, 500.
    bed.fail_next(
        1,
        &["findAndModify"],
        write_concern_error(100, "UnsatisfiableWriteConcern"),
    )
    .await;
    let reply = bed.post("U2", 1).await;
    reply.expect_error(500, "internal_error");
    assert_eq!(reply.header("retry-after"), None);
    assert_eq!(bed.cached("U2").await, None);

    // A bulk write: the command's write concern covers every item.
    bed.fail_next(
        1,
        &["update"],
        write_concern_error(64, "WriteConcernFailed"),
    )
    .await;
    let reply = bed.bulk(&["U3", "U4"]).await;
    expect_retry_later(&reply, "bulk not confirmed");
    assert_eq!(
        (bed.cached("U3").await, bed.cached("U4").await),
        (None, None)
    );

    // A delete.
    assert_eq!(bed.post("D1", 1).await.status, 201);
    bed.fail_next(
        1,
        &["findAndModify"],
        write_concern_error(64, "WriteConcernFailed"),
    )
    .await;
    let reply = bed.api.delete("/api/features/D1/").await;
    expect_retry_later(&reply, "delete not confirmed");
    let cached = bed.cached("D1").await.unwrap_or_default();
    assert!(
        !cached.contains("deleted"),
        "a tombstone was cached: {cached}"
    );
}

#[tokio::test]
async fn the_write_concern_of_the_uri_applies_to_every_write() {
    // `w=2` on a one-node replica set: the server itself answers every write
    // with a writeConcernError (UnsatisfiableWriteConcern) after applying it.
    let stack = TestStack::start_on_own_mongo("outcomes_w2", &[], "&w=2", &[NEAR_OFF]).await;
    let api = &stack.api;
    let reply = api
        .post(
            "/api/features/",
            &json!({"customer_id": "W2", "features": {}}),
        )
        .await;
    reply.expect_error(500, "internal_error");
    let reply = api
        .post(
            "/api/features/bulk/",
            &json!({"features_list": [{"customer_id": "W3", "features": {}}]}),
        )
        .await;
    reply.expect_error(500, "internal_error");
    let mut conn = stack.redis_conn().await;
    for id in ["W2", "W3"] {
        let value: Option<String> = conn.get(format!("features:{id}")).await.unwrap();
        assert!(value.is_none_or(|v| is_reservation(&v)), "{id}");
    }
}

#[tokio::test]
async fn failover_errors_are_retried_once_then_answered_503_with_retry_after() {
    let bed = Bed::start("outcomes_failover", &["--enable-test-commands"], &[]).await;

    // Refused before it ran: the second attempt writes it.
    bed.fail_next(1, &["findAndModify"], doc! { "errorCode": 10107 })
        .await;
    let reply = bed.post("R1", 1).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert!(bed.cached("R1").await.is_some());

    for (code, name) in [
        (11602, "InterruptedDueToReplStateChange"),
        (189, "PrimarySteppedDown"),
        (13436, "NotPrimaryOrSecondary"),
        (91, "ShutdownInProgress"),
    ] {
        bed.fail_next(1, &["findAndModify"], doc! { "errorCode": code })
            .await;
        let reply = bed.post("R1", i64::from(code)).await;
        assert_eq!(reply.status, 200, "{name}: {}", reply.text());
        assert_eq!(reply.json()["features"]["n"], code, "{name}");
    }

    // A broken connection.
    bed.fail_next(1, &["findAndModify"], doc! { "closeConnection": true })
        .await;
    let reply = bed.post("R2", 1).await;
    assert_eq!(reply.status, 201, "{}", reply.text());

    // Still failing on the second attempt: 503 with Retry-After, nothing
    // stored or cached.
    bed.fail_next(2, &["findAndModify"], doc! { "errorCode": 10107 })
        .await;
    let reply = bed.post("R3", 1).await;
    expect_retry_later(&reply, "upsert in a failover");
    assert_eq!(bed.cached("R3").await, None);
    assert!(bed.stored("R3").await.is_none());

    // Bulk writes and deletes are retried the same way.
    bed.fail_next(1, &["update"], doc! { "errorCode": 189 })
        .await;
    let reply = bed.bulk(&["R4", "R5"]).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.json()["success"], 2, "{}", reply.text());
    bed.fail_next(1, &["findAndModify"], doc! { "errorCode": 10107 })
        .await;
    assert_eq!(bed.api.delete("/api/features/R1/").await.status, 204);
    assert!(
        bed.cached("R1")
            .await
            .is_some_and(|v| v.contains("deleted"))
    );
    bed.fail_next(2, &["findAndModify"], doc! { "errorCode": 11602 })
        .await;
    expect_retry_later(
        &bed.api.delete("/api/features/R2/").await,
        "delete in a failover",
    );

    // Applied, then not confirmed because the primary stepped down: the
    // upsert is sent once more (so the new primary has it; its version
    // advances twice, and "created" reads "updated").
    bed.fail_next(
        1,
        &["findAndModify"],
        write_concern_error(189, "PrimarySteppedDown"),
    )
    .await;
    let reply = bed.post("R6", 1).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(bed.cached("R6").await.is_some());
    // A delete sent once more after that finds nothing: whether this request
    // deleted the document is unknown, so it is not "not found" but 503.
    bed.fail_next(
        1,
        &["findAndModify"],
        write_concern_error(189, "PrimarySteppedDown"),
    )
    .await;
    expect_retry_later(
        &bed.api.delete("/api/features/R6/").await,
        "delete after a step-down",
    );
    assert!(bed.stored("R6").await.is_none());
}

#[tokio::test]
async fn a_stepped_down_primary_is_503_with_retry_after_until_it_is_back() {
    let bed = Bed::start("outcomes_stepdown", &[], &[("MONGO_TIMEOUT_MS", "500")]).await;
    // A fresh stand-in's first write (it creates the collection) can take
    // longer than the short deadline on a busy machine.
    eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            match bed.post("S1", 1).await.status {
                200 | 201 => Ok(()),
                other => Err(format!("first write answered {other}")),
            }
        },
    )
    .await
    .expect("a first write succeeds");

    // The stand-in stays secondary for about 10 s after a forced step-down.
    bed.own_mongo()
        .client()
        .await
        .database("admin")
        .run_command(doc! { "replSetStepDown": 5, "force": true })
        .await
        .expect("replSetStepDown");
    expect_retry_later(&bed.post("S1", 2).await, "upsert");
    expect_retry_later(&bed.api.get("/api/features/S2/").await, "uncached read");
    expect_retry_later(&bed.api.delete("/api/features/S1/").await, "delete");
    expect_retry_later(&bed.bulk(&["S3"]).await, "bulk");

    eventually(
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            let reply = bed.post("S1", 3).await;
            match reply.status {
                200 => Ok(()),
                503 => Err("still 503".to_owned()),
                other => panic!("{other} during a failover: {}", reply.text()),
            }
        },
    )
    .await
    .expect("writes succeed once a primary is back");
    let stored = bed.stored("S1").await.unwrap();
    assert_eq!(
        stored.get_document("features").unwrap().get("n"),
        Some(&Bson::Int64(3))
    );
}
