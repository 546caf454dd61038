//! `cachectl inspect ID`, `cachectl evict ID`, `cachectl replicas`: the
//! admin API (`/admin/…`) over HTTP, printed as tables (or, with `--json`,
//! the API's JSON as it came). A refusal or an unreachable API is an error
//! that says which, and the exit status is non-zero.

use anyhow::{Context, bail};
use clap::Args;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use serde_json::Value;
use std::time::Duration;

/// How to reach the API.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Base URL of a `cache-api` replica (or the load balancer).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    api: String,
    /// Key (or token) with scope `admin`, sent as `Authorization: Bearer`.
    /// Prefer the environment: command lines are visible to every user of
    /// the machine.
    #[arg(long, env = "CACHECTL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The customer id.
    id: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// `GET /admin/keys/{id}`: the key in MongoDB, Redis and every near cache.
pub async fn inspect(args: KeyArgs) -> anyhow::Result<()> {
    let path = format!("/admin/keys/{}", encode(&args.id));
    let (_, body) = call(&args.api, reqwest::Method::GET, &path).await?;
    if args.api.json {
        return print_json(&body);
    }
    println!("{}", inspect_table(&body));
    Ok(())
}

/// `POST /admin/keys/{id}/evict`: removes the key from Redis and every near cache.
pub async fn evict(args: KeyArgs) -> anyhow::Result<()> {
    let path = format!("/admin/keys/{}/evict", encode(&args.id));
    let (_, body) = call(&args.api, reqwest::Method::POST, &path).await?;
    if args.api.json {
        return print_json(&body);
    }
    let mut table = table(&["customer", "request", "handled"]);
    let handled = body["handled"] == true;
    table.add_row(vec![
        text(&body["customer_id"]),
        text(&body["request_id"]),
        if handled {
            "yes: removed from Redis, every replica told".to_owned()
        } else {
            "not yet: queued for the invalidator".to_owned()
        },
    ]);
    println!("{table}");
    Ok(())
}

/// `GET /admin/replicas`: the live replicas from their heartbeats.
pub async fn replicas(args: ApiArgs) -> anyhow::Result<()> {
    let (_, body) = call(&args, reqwest::Method::GET, "/admin/replicas").await?;
    if args.json {
        return print_json(&body);
    }
    println!("{}", replicas_table(&body));
    Ok(())
}

/// One call; the status and JSON of a success, else an error naming what
/// refused or failed.
async fn call(args: &ApiArgs, method: reqwest::Method, path: &str) -> anyhow::Result<(u16, Value)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("HTTP client")?;
    let url = format!("{}{path}", args.api.trim_end_matches('/'));
    let mut request = client.request(method.clone(), &url);
    if let Some(key) = args.api_key.as_deref().filter(|k| !k.is_empty()) {
        request = request.bearer_auth(key);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the API at {}", args.api))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = body["error"].as_str().unwrap_or("no error message");
        let hint = match status.as_u16() {
            401 => " (give a key with --api-key or CACHECTL_API_KEY)",
            403 => " (the key needs scope admin)",
            _ => "",
        };
        bail!("{method} {url}: the API answered {status}: {message}{hint}");
    }
    Ok((status.as_u16(), body))
}

fn print_json(body: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(body)?);
    Ok(())
}

/// A table in the style of every `cachectl` table.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    table
}

/// One row per tier: MongoDB, Redis, each replica's near cache (silent
/// replicas too).
pub fn inspect_table(body: &Value) -> Table {
    let mut table = table(&["tier", "holds", "version", "ttl", "detail"]);
    let mongodb = &body["mongodb"];
    table.add_row(if mongodb.is_null() {
        row("mongodb", "nothing", "", "", "")
    } else {
        let detail = format!(
            "calculated_at {}, expires_at {}, model {}",
            text(&mongodb["calculated_at"]),
            text(&mongodb["expires_at"]),
            text(&mongodb["model_version"])
        );
        row(
            "mongodb",
            "document",
            &text(&mongodb["version"]),
            "",
            &detail,
        )
    });
    let redis = &body["redis"];
    table.add_row(if redis.is_null() {
        row("redis", "nothing", "", "", "")
    } else {
        let ttl = redis["ttl_ms"]
            .as_u64()
            .map_or_else(|| "none".to_owned(), human_ms);
        row(
            "redis",
            &text(&redis["kind"]),
            &text(&redis["version"]),
            &ttl,
            &features(&redis["document"]),
        )
    });
    for replica in body["replicas"].as_array().into_iter().flatten() {
        let tier = format!("near {}", text(&replica["instance_id"]));
        let entry = &replica["entry"];
        table.add_row(if entry.is_null() {
            row(&tier, "nothing", "", "", "")
        } else {
            row(
                &tier,
                &text(&entry["kind"]),
                &text(&entry["version"]),
                "",
                &features(&entry["document"]),
            )
        });
    }
    for silent in body["silent_replicas"].as_array().into_iter().flatten() {
        let tier = format!("near {}", text(silent));
        table.add_row(row(&tier, "SILENT", "", "", "did not answer in time"));
    }
    table
}

/// One row per live replica.
pub fn replicas_table(body: &Value) -> Table {
    let mut table = table(&[
        "instance",
        "version",
        "uptime",
        "last stream id",
        "lag",
        "near entries",
        "near bytes",
        "hit ratio",
        "subscribed",
    ]);
    for replica in body["replicas"].as_array().into_iter().flatten() {
        table.add_row(vec![
            text(&replica["instance_id"]),
            text(&replica["binary_version"]),
            replica["uptime_ms"]
                .as_u64()
                .map_or_else(String::new, human_ms),
            text(&replica["last_stream_id"]),
            replica["lag_ms"]
                .as_u64()
                .map_or_else(String::new, human_ms),
            text(&replica["near_entries"]),
            text(&replica["near_bytes"]),
            replica["hit_ratio"]
                .as_f64()
                .map_or_else(String::new, |r| format!("{:.1} %", r * 100.0)),
            if replica["subscribed"] == true {
                "yes".to_owned()
            } else {
                "NO".to_owned()
            },
        ]);
    }
    table
}

fn row(tier: &str, holds: &str, version: &str, ttl: &str, detail: &str) -> Vec<String> {
    [tier, holds, version, ttl, detail]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

/// A JSON value as a cell: strings without quotes, null as nothing.
fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A document's features, shortened for a cell.
fn features(document: &Value) -> String {
    let features = document["features"].to_string();
    if document.is_null() {
        return String::new();
    }
    let mut shown: String = features.chars().take(60).collect();
    if shown.len() < features.len() {
        shown.push('…');
    }
    shown
}

fn human_ms(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{:.1} min", ms as f64 / 60_000.0),
        _ => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

/// A customer id as a path segment (valid ids need no escaping; anything
/// else is escaped so the API answers 400 rather than another route).
fn encode(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_inspection_table_has_a_row_per_tier_and_names_silent_replicas() {
        let body = json!({
            "customer_id": "C1",
            "mongodb": {"version": 7, "calculated_at": "t", "expires_at": null, "model_version": "v1"},
            "redis": {"kind": "document", "version": 7, "ttl_ms": 90_000, "document": {"features": {"a": 1}}},
            "replicas": [{"instance_id": "api-a", "entry": {"kind": "document", "version": 7, "document": {"features": {"a": 1}}}},
                         {"instance_id": "api-b", "entry": null}],
            "silent_replicas": ["api-c"],
        });
        let shown = inspect_table(&body).to_string();
        for expected in [
            "mongodb",
            "redis",
            "1.5 min",
            "near api-a",
            "near api-b",
            "near api-c",
            "SILENT",
        ] {
            assert!(shown.contains(expected), "{expected} missing:\n{shown}");
        }
        assert_eq!(inspect_table(&body).row_count(), 5);
    }

    #[test]
    fn ids_are_escaped_in_paths() {
        assert_eq!(encode("CUST.1:a-b_c"), "CUST.1:a-b_c");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }
}
