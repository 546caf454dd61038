//! Writes are stored exactly as sent or refused: every value that cannot
//! be stored exactly is a 400 naming its path, nothing stored changes, and
//! in a bulk only that item fails. What is accepted comes back byte for
//! byte from every tier.

use crate::errors::snapshot;
use crate::support::{NEAR_OFF, TestStack};
use redis::AsyncCommands;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// The `features` of a JSON document, as text.
fn features_text(json: &[u8]) -> String {
    let fields: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(json).expect("a JSON object");
    fields["features"].get().to_owned()
}

/// `[[…[]…]]`: `n` arrays, one inside the other.
fn arrays(n: usize) -> String {
    format!("{}{}", "[".repeat(n), "]".repeat(n))
}

/// What a client sends, in the form the API renders it (keys sorted, no
/// spaces, floats in their shortest form), so that "as sent" can be
/// compared as text. `deep` nests arrays to level 100 of the stored
/// document (the document is level 1, `features` 2, `deep` 3).
fn accepted_features() -> String {
    format!(
        concat!(
            r#"{{"":"empty key","a.b":"dotted key","arrays":[[{{"x":[[1]]}}],[]],"deep":{deep},"#,
            r#""esc":"q\" b\\ n\n t\t é 😀 \u0001","#,
            r#""floats":[0.1,1.0715660391465826e-75,-1.603964615428183e+143,5e-324,1.7976931348623157e+308,-0.0,2.0,1e+19],"#,
            r#""ints":[9223372036854775807,-9223372036854775808,0,-1],"nul":"a\u0000b","ключ 😀":"値"}}"#
        ),
        deep = arrays(98)
    )
}

#[tokio::test]
async fn what_is_accepted_comes_back_exactly_from_every_tier() {
    let stack = TestStack::start("exact_round_trip", &[NEAR_OFF]).await;
    let features = accepted_features();
    let model_version = "é".repeat(128);
    let body = format!(
        r#"{{"customer_id":"EXACT","model_version":"{model_version}","features":{features}}}"#
    );
    let reply = stack.api.post_text("/api/features/", &body).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(
        features_text(&reply.body),
        features,
        "as the write answered"
    );
    assert_eq!(reply.json()["model_version"], model_version.as_str());

    // Stored as the BSON types the JSON stands for.
    let stored = stack.db.all_features().await;
    assert_eq!(stored.len(), 1);
    let f = stored[0].get_document("features").unwrap();
    let ints = f.get_array("ints").unwrap();
    assert_eq!(ints[0], bson::Bson::Int64(i64::MAX));
    assert_eq!(ints[1], bson::Bson::Int64(i64::MIN));
    assert_eq!(ints[2], bson::Bson::Int64(0));
    let floats = f.get_array("floats").unwrap();
    assert_eq!(floats[1], bson::Bson::Double(1.0715660391465826e-75));
    assert_eq!(floats[6], bson::Bson::Double(2.0));
    assert_eq!(f.get_str("nul").unwrap(), "a\0b");
    assert_eq!(f.get_str("").unwrap(), "empty key");
    assert_eq!(f.get_str("a.b").unwrap(), "dotted key");

    let reply = stack.api.get("/api/features/EXACT/").await;
    assert_eq!(reply.header("x-cache-source"), Some("redis"));
    assert_eq!(features_text(&reply.body), features, "from Redis");
    let mut redis = stack.redis_conn().await;
    let cached: String = redis.get("features:EXACT").await.unwrap();
    assert_eq!(
        features_text(cached.as_bytes()),
        features,
        "as Redis holds it"
    );

    let _: () = redis.del("features:EXACT").await.unwrap();
    let reply = stack.api.get("/api/features/EXACT/").await;
    assert_eq!(reply.header("x-cache-source"), Some("mongodb"));
    assert_eq!(features_text(&reply.body), features, "from MongoDB");
    stack.finish().await;
}

#[tokio::test]
async fn values_that_cannot_be_stored_exactly_are_400_naming_their_path() {
    let stack = TestStack::start("exact_refused", &[]).await;
    let reply = stack
        .api
        .post_text(
            "/api/features/",
            r#"{"customer_id":"KEEP","features":{"score":1}}"#,
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let before = snapshot(&stack).await;

    let level_101 = format!(r#"{{"deep":{}}}"#, arrays(99));
    let level_101_path = format!("features.deep{}", "[0]".repeat(98));
    let dots = ".".repeat(255);
    let cases: Vec<(&str, String, String)> = vec![
        (
            "i64::MAX + 1 in an array of arrays",
            r#"{"ok":1,"a":[[1,9223372036854775808]]}"#.into(),
            "features.a[0][1]".into(),
        ),
        (
            "i64::MIN - 1",
            r#"{"a":{"b":-9223372036854775809}}"#.into(),
            "features.a.b".into(),
        ),
        (
            "u64::MAX",
            r#"{"a":18446744073709551615}"#.into(),
            "features.a".into(),
        ),
        (
            "u64::MAX + 1 (a float to a parser)",
            r#"{"a":18446744073709551616}"#.into(),
            "features.a".into(),
        ),
        (
            "30 digits",
            r#"{"a":[123456789012345678901234567890]}"#.into(),
            "features.a[0]".into(),
        ),
        ("1e400", r#"{"x":1e400}"#.into(), "features.x".into()),
        (
            "-1e400 nested",
            r#"{"x":[{"y":-1e400}]}"#.into(),
            "features.x[0].y".into(),
        ),
        (
            "$numberLong in an array of arrays",
            r#"{"a":[[{"$numberLong":"5"}]]}"#.into(),
            r#"features.a[0][0]["$numberLong"]"#.into(),
        ),
        (
            "$date deep",
            r#"{"a":[{"b":[[{"$date":"2020-01-01T00:00:00Z"}]]}]}"#.into(),
            r#"features.a[0].b[0][0]["$date"]"#.into(),
        ),
        (
            "$oid deep",
            r#"{"a":[[[[{"$oid":"5f0000000000000000000000"}]]]]}"#.into(),
            r#"features.a[0][0][0][0]["$oid"]"#.into(),
        ),
        (
            "$regex deep",
            r#"{"a":[[[{"r":{"$regex":"^a"}}]]]}"#.into(),
            r#"features.a[0][0][0].r["$regex"]"#.into(),
        ),
        (
            "$ key at depth 5 in arrays of arrays",
            r#"{"l":[[[[{"$x":1}]]]]}"#.into(),
            r#"features.l[0][0][0][0]["$x"]"#.into(),
        ),
        (
            "NUL in a key",
            r#"{"a":{"b\u0000c":1}}"#.into(),
            r#"features.a["b\u0000c"]"#.into(),
        ),
        (
            "NUL as a key",
            r#"{"\u0000":1}"#.into(),
            r#"features["\u0000"]"#.into(),
        ),
        (
            "a key twice",
            r#"{"a":1,"a":2}"#.into(),
            "features.a".into(),
        ),
        (
            "a key twice, spelled differently",
            r#"{"o":[{"k":1,"\u006b":2}]}"#.into(),
            "features.o[0].k".into(),
        ),
        ("level 101", level_101, level_101_path),
        (
            "256 dotted parts",
            format!(r#"{{"{dots}":1}}"#),
            format!(r#"features["{}…"]"#, ".".repeat(100)),
        ),
    ];
    // Aimed at a new customer too: a refused write must not even reserve
    // its key in Redis.
    for ((what, features, field), id) in cases.iter().zip(["KEEP", "FRESH"].iter().cycle()) {
        let body = format!(r#"{{"customer_id":"{id}","features":{features}}}"#);
        let reply = stack.api.post_text("/api/features/", &body).await;
        let body = reply.expect_error(400, "validation_error");
        assert_eq!(
            body["details"][0]["field"],
            field.as_str(),
            "{what}: {body}"
        );
        assert!(
            body["details"][0]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
        assert_eq!(snapshot(&stack).await, before, "{what} changed stored data");
    }

    let long = "v".repeat(129);
    for (what, body, field) in [
        (
            "NUL in model_version",
            r#"{"customer_id":"KEEP","features":{},"model_version":"v\u00001"}"#.to_owned(),
            "model_version",
        ),
        (
            "a control character in model_version",
            r#"{"customer_id":"KEEP","features":{},"model_version":"v\n1"}"#.to_owned(),
            "model_version",
        ),
        (
            "model_version of 129 characters",
            format!(r#"{{"customer_id":"KEEP","features":{{}},"model_version":"{long}"}}"#),
            "model_version",
        ),
        (
            "NUL in customer_id",
            r#"{"customer_id":"KE\u0000EP","features":{}}"#.to_owned(),
            "customer_id",
        ),
    ] {
        let reply = stack.api.post_text("/api/features/", &body).await;
        let body = reply.expect_error(400, "validation_error");
        assert_eq!(body["details"][0]["field"], field, "{what}: {body}");
        assert_eq!(snapshot(&stack).await, before, "{what} changed stored data");
    }
    let reply = stack.api.get("/api/features/KEEP/").await;
    assert_eq!(reply.json()["features"], serde_json::json!({"score": 1}));
    stack.finish().await;
}

#[tokio::test]
async fn a_bulk_stores_the_exact_items_and_fails_only_the_others() {
    let stack = TestStack::start("exact_bulk", &[NEAR_OFF]).await;
    let good = [
        (
            "G1",
            r#"{"f":1.0715660391465826e-75,"n":9223372036854775807}"#.to_owned(),
        ),
        ("G2", r#"{"a.b":[[{"x":"a\u0000b"}]]}"#.to_owned()),
        ("G3", format!(r#"{{"":"","deep":{}}}"#, arrays(98))),
    ];
    let bad = [
        (
            "B1",
            r#"{"n":9223372036854775808}"#.to_owned(),
            "features.n".to_owned(),
        ),
        (
            "B2",
            r#"{"a":[[{"$numberLong":"5"}]]}"#.to_owned(),
            r#"features.a[0][0]["$numberLong"]"#.to_owned(),
        ),
        (
            "B3",
            r#"{"a":{"b\u0000":1}}"#.to_owned(),
            r#"features.a["b\u0000"]"#.to_owned(),
        ),
        (
            "B4",
            format!(r#"{{"deep":{}}}"#, arrays(99)),
            format!("features.deep{}", "[0]".repeat(98)),
        ),
        ("B5", r#"{"k":1,"k":2}"#.to_owned(), "features.k".to_owned()),
        (
            "B6",
            r#"{"x":[1e400]}"#.to_owned(),
            "features.x[0]".to_owned(),
        ),
    ];
    let item =
        |id: &str, features: &str| format!(r#"{{"customer_id":"{id}","features":{features}}}"#);
    let items = [
        item(good[0].0, &good[0].1),
        item(bad[0].0, &bad[0].1),
        item(good[1].0, &good[1].1),
        item(bad[1].0, &bad[1].1),
        item(bad[2].0, &bad[2].1),
        item(bad[3].0, &bad[3].1),
        item(bad[4].0, &bad[4].1),
        item(bad[5].0, &bad[5].1),
        item(good[2].0, &good[2].1),
    ];
    let body = format!(r#"{{"features_list":[{}]}}"#, items.join(","));
    let reply = stack.api.post_text("/api/features/bulk/", &body).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let body = reply.json();
    assert_eq!(
        (body["success"].as_u64(), body["failed"].as_u64()),
        (Some(3), Some(6)),
        "{body}"
    );
    let results = body["results"].as_array().unwrap();
    let statuses: Vec<(&str, &str)> = results
        .iter()
        .map(|r| {
            (
                r["customer_id"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("G1", "created"),
            ("B1", "failed"),
            ("G2", "created"),
            ("B2", "failed"),
            ("B3", "failed"),
            ("B4", "failed"),
            ("B5", "failed"),
            ("B6", "failed"),
            ("G3", "created"),
        ]
    );
    for (id, _, path) in &bad {
        let result = results.iter().find(|r| r["customer_id"] == *id).unwrap();
        let error = result["error"].as_str().unwrap();
        assert!(error.starts_with(&format!("{path}: ")), "{id}: {error}");
    }

    // Only the exact items are stored and cached, as sent.
    assert_eq!(stack.stored_ids().await, ["G1", "G2", "G3"]);
    let mut redis = stack.redis_conn().await;
    for (id, _, _) in &bad {
        let cached: Option<String> = redis.get(format!("features:{id}")).await.unwrap();
        assert_eq!(cached, None, "{id}");
    }
    for (id, features) in &good {
        let cached: String = redis.get(format!("features:{id}")).await.unwrap();
        assert_eq!(&features_text(cached.as_bytes()), features, "{id} in Redis");
        let reply = stack.api.get(&format!("/api/features/{id}/")).await;
        assert_eq!(&features_text(&reply.body), features, "{id} served");
    }
    stack.finish().await;
}

#[tokio::test]
async fn a_document_of_16_mib_is_stored_and_one_byte_more_is_refused() {
    // The stand-in takes a while over 16 MiB: on a shared one, other tests'
    // calls would time out behind it.
    let stack = TestStack::start_on_own_mongo(
        "exact_size",
        &[],
        "",
        &[
            NEAR_OFF,
            ("MAX_BODY_BYTES", "18000000"),
            // Past the BSON limit, to test that limit rather than ours.
            ("MAX_DOCUMENT_BYTES", "18000000"),
            ("MAX_BATCH_RESPONSE_BYTES", "18000000"),
            ("MONGO_TIMEOUT_MS", "30000"),
        ],
    )
    .await;
    let body_of = |len: usize| {
        format!(
            r#"{{"customer_id":"BIG","features":{{"blob":"{}"}}}}"#,
            "x".repeat(len)
        )
    };
    let reply = stack.api.post_text("/api/features/", &body_of(0)).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let stored_bytes = |doc: &bson::Document| bson::to_vec(doc).unwrap().len();
    let base = stored_bytes(&stack.db.all_features().await[0]);
    let limit = 16 * 1024 * 1024;

    let reply = stack
        .api
        .post_text("/api/features/", &body_of(limit - base))
        .await;
    let head = String::from_utf8_lossy(&reply.body[..reply.body.len().min(300)]).into_owned();
    assert_eq!(reply.status, 200, "{head}");
    let stored = stack.db.all_features().await;
    assert_eq!(stored_bytes(&stored[0]), limit);
    let version = stored[0].get_i64("version").unwrap();

    let reply = stack
        .api
        .post_text("/api/features/", &body_of(limit - base + 1))
        .await;
    let body = reply.expect_error(400, "validation_error");
    assert_eq!(body["details"][0]["field"], "features", "{body}");
    let stored = stack.db.all_features().await;
    assert_eq!(
        stored[0].get_i64("version").unwrap(),
        version,
        "nothing changed"
    );

    let reply = stack.api.get("/api/features/BIG/").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json()["features"]["blob"].as_str().map(str::len),
        Some(limit - base)
    );
    stack.finish().await;
}
