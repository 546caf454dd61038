//! Consistency, measured: the invalidator's continuous audit finds a value
//! planted straight into Redis (same version, other features) and one only
//! in a replica's near cache, logs them with the key and evicts them
//! everywhere, while an untouched key counts as consistent in both tiers;
//! and `cachectl audit --full [--near]` reports planted entries of every
//! kind (content, stale, ahead, orphan, a stale cached 404), repairs them,
//! and then finds everything consistent.

use serde_json::{Value, json};
use std::time::Duration;
use system_tests::{Cached, Deployment, Options, POLL};
use testkit::services::workspace_bin;

/// How long the audit may take to check, report and repair a sample.
const AUDIT_BOUND: Duration = Duration::from_secs(20);

/// A cached document as the services write it (`version` first), with the
/// stored document's fields and `features` replaced.
fn planted(stored: &Value, version: i64, features: Value) -> String {
    format!(
        r#"{{"version":{version},"customer_id":{},"features":{features},"calculated_at":{},"model_version":{},"expires_at":{}}}"#,
        stored["customer_id"],
        stored["calculated_at"],
        stored["model_version"],
        stored["expires_at"],
    )
}

fn audited(sample_rate: &str) -> Options {
    Options {
        invalidator_env: vec![
            ("AUDIT_SAMPLE_RATE".into(), sample_rate.into()),
            ("AUDIT_DELAY_MS".into(), "1500".into()),
            ("AUDIT_WINDOW_S".into(), "60".into()),
        ],
        ..Options::default()
    }
}

async fn checks(deployment: &Deployment, tier: &str, result: &str) -> f64 {
    deployment
        .metric(
            &deployment.invalidators[0],
            "cache_consistency_checks_total",
            &[("tier", tier), ("result", result)],
        )
        .await
}

#[tokio::test]
async fn the_auditor_finds_values_planted_in_redis_and_a_near_cache_logs_and_evicts_them() {
    let deployment = Deployment::start("audit_planted", audited("1")).await;

    // Untouched: consistent, and nothing is reported.
    deployment
        .post(&deployment.a, "AUDIT-OK", json!({"score": 1}))
        .await;
    for tier in ["redis", "near"] {
        testkit::eventually(AUDIT_BOUND, POLL, || async {
            checks(&deployment, tier, "consistent").await >= 1.0
        })
        .await
        .unwrap_or_else(|_| panic!("the untouched key is checked in {tier} and consistent"));
        assert_eq!(checks(&deployment, tier, "inconsistent").await, 0.0);
    }

    // Planted before the audit's delay passes: MongoDB's version, other
    // features. The version guard keeps it (same version), so only a
    // comparison of content can see it.
    let id = "AUDIT-PLANTED";
    let stored = deployment
        .post(&deployment.a, id, json!({"score": 1}))
        .await;
    let version = stored["version"].as_i64().expect("version");
    deployment
        .redis_set(
            &format!("features:{id}"),
            &planted(&stored, version, json!({"score": 666})),
        )
        .await;
    let served = deployment.get(&deployment.b, id).await;
    assert_eq!(
        served.features().and_then(|f| f.get("score")),
        Some(&json!(666)),
        "the planted value is served until the audit repairs it"
    );

    // Only in B's near cache: planted in Redis, read through B, and Redis
    // put back as it was.
    let near_only = "AUDIT-NEAR";
    deployment
        .post(&deployment.a, near_only, json!({"score": 1}))
        .await;
    let key = format!("features:{near_only}");
    let original = deployment
        .redis_get(&key)
        .await
        .expect("cached by the write");
    let near_stored: Value = serde_json::from_str(&original).expect("cached JSON");
    let near_version = near_stored["version"].as_i64().expect("version");
    deployment
        .redis_set(
            &key,
            &planted(&near_stored, near_version, json!({"score": 777})),
        )
        .await;
    let served = deployment.get(&deployment.b, near_only).await;
    assert_eq!(
        served.features().and_then(|f| f.get("score")),
        Some(&json!(777))
    );
    deployment.redis_set(&key, &original).await;

    testkit::eventually(AUDIT_BOUND, POLL, || async {
        checks(&deployment, "redis", "inconsistent").await >= 1.0
            && checks(&deployment, "near", "inconsistent").await >= 2.0
    })
    .await
    .expect("the auditor counts the planted values as inconsistent");
    assert_eq!(
        checks(&deployment, "redis", "inconsistent").await,
        1.0,
        "Redis was put back for {near_only}"
    );
    testkit::eventually(AUDIT_BOUND, POLL, || async {
        let log = deployment.invalidators[0].log_text();
        log.lines()
            .any(|line| line.contains(id) && line.contains("disagrees with MongoDB"))
    })
    .await
    .expect("the inconsistency is logged with its key");
    let log = deployment.invalidators[0].log_text();
    let line = log
        .lines()
        .find(|line| line.contains(id) && line.contains("disagrees with MongoDB"))
        .expect("logged");
    assert!(
        line.contains("content") && line.contains(&version.to_string()),
        "the kind and the versions seen: {line}"
    );
    let log = deployment.invalidators[0].log_text();
    assert!(
        log.lines().any(|line| line.contains(near_only)
            && line.contains("disagrees with MongoDB")
            && line.contains("api-b")),
        "the near-cache inconsistency is logged with the replica"
    );

    // Repaired: Redis no longer holds it, every replica serves the truth
    // (B had copied the planted value into its near cache: the eviction is
    // announced to every replica).
    testkit::eventually(AUDIT_BOUND, POLL, || async {
        match deployment.cached(id).await {
            Cached::Document { features, .. } if features.get("score") == Some(&json!(666)) => {
                Err("Redis still holds the planted value".to_owned())
            }
            _ => Ok(()),
        }
    })
    .await
    .expect("the planted value is evicted from Redis");
    testkit::eventually(AUDIT_BOUND, POLL, || async {
        deployment
            .metric(
                &deployment.invalidators[0],
                "cache_inconsistencies_repaired_total",
                &[],
            )
            .await
            >= 2.0
    })
    .await
    .expect("both keys are counted repaired");
    testkit::eventually(AUDIT_BOUND, POLL, || async {
        let mut found = deployment.mismatches(id).await;
        found.extend(deployment.mismatches(near_only).await);
        if found.is_empty() {
            Ok(())
        } else {
            Err(found.join("\n"))
        }
    })
    .await
    .expect("every tier serves MongoDB's document after the repair");
    for replica in deployment.replicas() {
        let served = deployment.get(replica, id).await;
        assert_eq!(served.version(), Some(version));
        assert_eq!(
            served.features().and_then(|f| f.get("score")),
            Some(&json!(1))
        );
    }
    // The ratio over the window shows the bad checks among the good.
    let ratio = deployment
        .metric(
            &deployment.invalidators[0],
            "cache_consistency_ratio",
            &[("tier", "redis")],
        )
        .await;
    assert!(ratio < 1.0 && ratio > 0.0, "ratio {ratio}");
    deployment.finish().await;
}

/// Runs `cachectl audit --full` with `extra` flags against the deployment.
fn cachectl_audit(deployment: &Deployment, extra: &[&str]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(workspace_bin("cachectl"))
        .args(["audit", "--full", "--batch", "7", "--settle-ms", "200"])
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REDIS_URL", deployment.redis.url())
        .env("MONGO_URI", &deployment.mongo_uri)
        .env("MONGO_DB", &deployment.db_name)
        .env("LOG_FORMAT", "pretty")
        .output()
        .expect("cachectl runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cachectl_audit_full_reports_planted_entries_repairs_them_everywhere_and_then_finds_all_consistent()
 {
    // The continuous audit is off: only cachectl may find the planted entries.
    let deployment = Deployment::start("audit_full", audited("0")).await;
    let ids: Vec<String> = (0..30).map(|n| format!("FULL-{n:02}")).collect();
    let mut stored = Vec::new();
    for id in &ids {
        stored.push(deployment.post(&deployment.a, id, json!({"n": id})).await);
    }
    // Every write applied by the invalidator, so none refreshes a planted entry.
    testkit::eventually(AUDIT_BOUND, POLL, || async {
        deployment
            .metric(&deployment.invalidators[0], "invalidator_events_total", &[])
            .await
            >= ids.len() as f64
    })
    .await
    .expect("the invalidator applied every write");
    deployment
        .wait_consistent(&ids, system_tests::LAG_BOUND)
        .await;

    let version = |n: usize| stored[n]["version"].as_i64().expect("version");
    // One of each kind, and two harmless values (a marker, a value nobody
    // wrote) that are not inconsistencies.
    let wrong = [
        (
            0,
            planted(&stored[0], version(0), json!({"n": "other"})),
            "content",
        ),
        (
            1,
            planted(&stored[1], version(1) - 1, stored[1]["features"].clone()),
            "stale",
        ),
        (
            2,
            planted(&stored[2], version(2) + 1, stored[2]["features"].clone()),
            "ahead",
        ),
        // A cached 404 of a document MongoDB has.
        (
            7,
            format!(r#"{{"version":{},"absent":true}}"#, version(7) - 1),
            "negative",
        ),
    ];
    for (n, value, _) in &wrong {
        deployment
            .redis_set(&format!("features:{}", ids[*n]), value)
            .await;
    }
    deployment
        .redis_set(
            "features:FULL-GONE",
            &planted(&stored[3], version(3), json!({"n": "gone"})).replace("FULL-03", "FULL-GONE"),
        )
        .await;
    deployment
        .redis_set(
            &format!("features:{}", ids[4]),
            // A version floor is never served: consistent. (A tombstone
            // would be served as 404 with negative caching: `negative`.)
            &format!(r#"{{"version":{},"fence":true}}"#, version(4)),
        )
        .await;
    deployment
        .redis_set(&format!("features:{}", ids[5]), "not json")
        .await;
    // Wrong only in B's near cache (a key B has not read yet): planted in
    // Redis, read through B, and Redis put back as it was.
    let near_only = "FULL-NEAR";
    let near_stored = deployment
        .post(&deployment.a, near_only, json!({"n": near_only}))
        .await;
    testkit::eventually(AUDIT_BOUND, POLL, || async {
        deployment
            .metric(&deployment.invalidators[0], "invalidator_events_total", &[])
            .await
            > ids.len() as f64
    })
    .await
    .expect("the invalidator applied the write");
    let key = format!("features:{near_only}");
    let original = deployment.redis_get(&key).await.expect("cached");
    let near_version = near_stored["version"].as_i64().expect("version");
    deployment
        .redis_set(
            &key,
            &planted(&near_stored, near_version, json!({"n": "near"})),
        )
        .await;
    let served = deployment.get(&deployment.b, near_only).await;
    assert_eq!(
        served.features().and_then(|f| f.get("n")),
        Some(&json!("near"))
    );
    deployment.redis_set(&key, &original).await;

    let (code, stdout, stderr) = cachectl_audit(&deployment, &["--json"]);
    assert_eq!(
        code,
        Some(1),
        "inconsistencies left: exit 1\n{stdout}\n{stderr}"
    );
    let summary: Value = serde_json::from_str(&stdout).expect("JSON summary");
    assert_eq!(summary["scanned"], 32, "{summary}");
    assert_eq!(summary["inconsistent"], 5, "{summary}");
    assert_eq!(summary["consistent"], 27, "{summary}");
    for kind in ["content", "stale", "ahead", "orphan", "negative"] {
        assert_eq!(summary["by_kind"]["redis"][kind], 1, "{kind}: {summary}");
    }
    assert_eq!(summary["repaired"], 0);
    // Nothing was changed without --repair.
    assert!(matches!(
        deployment.cached(&ids[0]).await,
        Cached::Document { .. }
    ));
    // With --near, B's copy too.
    let (code, stdout, stderr) = cachectl_audit(&deployment, &["--near", "--json"]);
    assert_eq!(
        code,
        Some(1),
        "{stdout}
{stderr}"
    );
    let summary: Value = serde_json::from_str(&stdout).expect("JSON summary");
    assert_eq!(summary["inconsistent"], 6, "{summary}");
    assert_eq!(summary["near_checked"], true, "{summary}");
    assert_eq!(summary["by_kind"]["near"]["content"], 1, "{summary}");
    let near_finding = summary["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["tier"] == "near")
        .cloned()
        .expect("a near finding");
    assert_eq!(near_finding["customer_id"], near_only);
    assert_eq!(near_finding["instance"], "api-b");

    let (code, stdout, stderr) = cachectl_audit(&deployment, &["--near", "--repair"]);
    assert_eq!(code, Some(0), "all repaired: exit 0\n{stdout}\n{stderr}");
    assert!(stdout.contains("repaired"), "{stdout}");
    assert!(stdout.contains("result: consistent"), "{stdout}");
    for (n, _, kind) in &wrong {
        assert!(
            stdout.contains(&format!("redis {kind}")),
            "{kind} in the table:\n{stdout}"
        );
        assert_eq!(
            deployment.cached(&ids[*n]).await,
            Cached::Absent,
            "{} ({kind}) still cached",
            ids[*n]
        );
    }
    assert!(stdout.contains("near content"), "{stdout}");
    assert_eq!(deployment.redis_get("features:FULL-GONE").await, None);

    let (code, stdout, stderr) = cachectl_audit(&deployment, &["--near", "--json"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let summary: Value = serde_json::from_str(&stdout).expect("JSON summary");
    assert_eq!(summary["inconsistent"], 0, "{summary}");
    // Every repaired key is served as MongoDB holds it (FULL-05 keeps the
    // value nobody wrote: never served, so never an inconsistency).
    let served: Vec<String> = ids
        .iter()
        .filter(|id| *id != "FULL-05")
        .cloned()
        .chain([near_only.to_owned()])
        .collect();
    deployment
        .wait_consistent(&served, system_tests::LAG_BOUND)
        .await;
    deployment.finish().await;
}

/// Every dashboard is valid JSON with unique panel ids, and the overview
/// shows the audit's ratio per tier and its inconsistencies.
#[test]
fn the_dashboards_are_valid_and_show_consistency_per_tier() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../otel/grafana/dashboards");
    let mut queries = String::new();
    for entry in std::fs::read_dir(&dir).expect("dashboards") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("dashboard");
        let dashboard: Value =
            serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let panels = dashboard["panels"].as_array().expect("panels");
        let mut ids: Vec<i64> = panels.iter().filter_map(|p| p["id"].as_i64()).collect();
        let count = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), count, "{}: panel ids repeat", path.display());
        for panel in panels {
            for target in panel["targets"].as_array().into_iter().flatten() {
                queries.push_str(target["expr"].as_str().unwrap_or_default());
                queries.push('\n');
            }
        }
    }
    for metric in [
        "cache_consistency_ratio",
        "cache_consistency_checks_total{result=\"inconsistent\"}",
        "cache_inconsistencies_repaired_total",
    ] {
        assert!(queries.contains(metric), "no panel queries {metric}");
    }
}
