//! Redis under memory pressure evicts cached entries — documents,
//! tombstones and fills' reservations alike. Whatever it takes, no tier
//! stays wrong: fills need their reservation, and every change rewrites or
//! removes its key.

use serde_json::json;
use std::time::Duration;
use system_tests::{Deployment, LAG_BOUND, Options, ids};

#[tokio::test]
async fn under_memory_pressure_every_tier_still_converges() {
    let deployment = Deployment::start(
        "pressure",
        Options {
            redis_args: ["--maxmemory", "3mb", "--maxmemory-policy", "volatile-lru"]
                .map(str::to_owned)
                .to_vec(),
            ..Options::default()
        },
    )
    .await;
    let customers = ids("PRESSURE", 300);
    let padding = "x".repeat(10_000);
    for id in &customers {
        deployment
            .write_versioned(id, json!({"round": 0, "padding": padding}))
            .await;
    }
    for round in 1..=3 {
        // Every replica reads everything (fills, and evictions to make room)
        // while a fifth of the customers change or go, directly in MongoDB
        // and through the API.
        for (n, id) in customers.iter().enumerate() {
            for replica in deployment.replicas() {
                deployment.get(replica, id).await;
            }
            match (n + round) % 10 {
                0 => {
                    deployment
                        .write_versioned(id, json!({"round": round, "padding": padding}))
                        .await;
                }
                5 => {
                    deployment
                        .post(
                            &deployment.a,
                            id,
                            json!({"round": round, "padding": padding}),
                        )
                        .await;
                }
                7 if round == 3 => {
                    deployment.delete_direct(id).await;
                }
                _ => {}
            }
        }
    }
    let evicted = deployment.redis_info_field("evicted_keys").await;
    assert!(
        evicted > 0,
        "Redis never had to evict: the test did not test"
    );
    let took = deployment
        .wait_consistent(&customers, LAG_BOUND + Duration::from_secs(5))
        .await;
    println!(
        "{evicted} keys evicted; every tier agreed with MongoDB {took:?} after the last change"
    );
    deployment.finish().await;
}
