//! Every command the store sends carries its deadline to the server
//! (`maxTimeMS`), so MongoDB stops work nobody waits for any more: read
//! off the wire by a proxy between the store and the database.

use bson::Document;
use feature_store::{CustomerId, FeatureStore, FeatureWrite, StoreConfig};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The OP_MSG wire opcode; the driver sends every command as one.
const OP_MSG: i32 = 2013;

/// Commands the driver sends on its own (handshakes, monitoring, cursors
/// and sessions), not on the store's behalf.
const DRIVER_OWN: [&str; 8] = [
    "hello",
    "isMaster",
    "ismaster",
    "endSessions",
    "buildInfo",
    "getMore",
    "killCursors",
    "saslStart",
];

type Seen = Arc<Mutex<Vec<Document>>>;

/// Forwards to `upstream` and records every command the clients send.
async fn recording_proxy(upstream: SocketAddr) -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let to_server = async move {
                    let mut pending = Vec::new();
                    let mut buf = vec![0_u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(message) = next_message(&mut pending) {
                            if let Some(command) = command_of(&message) {
                                record.lock().unwrap().push(command);
                            }
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let to_client = async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                };
                tokio::select! {
                    () = to_server => {}
                    () = to_client => {}
                }
            });
        }
    });
    (port, seen)
}

/// Takes one whole wire message off the front of `pending`, if there is one.
fn next_message(pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let len = usize::try_from(i32::from_le_bytes(pending.get(..4)?.try_into().ok()?)).ok()?;
    if pending.len() < len {
        return None;
    }
    Some(pending.drain(..len).collect())
}

/// The command document of an OP_MSG (its kind-0 section).
fn command_of(message: &[u8]) -> Option<Document> {
    let opcode = i32::from_le_bytes(message.get(12..16)?.try_into().ok()?);
    if opcode != OP_MSG {
        return None;
    }
    // Header (16 bytes), flag bits (4), then sections; the driver puts the
    // command body first.
    let section = message.get(20..)?;
    if section.first() != Some(&0) {
        return None;
    }
    Document::from_reader(&section[1..]).ok()
}

fn write(id: &str) -> FeatureWrite {
    FeatureWrite {
        customer_id: CustomerId::parse(id).unwrap(),
        features: serde_json::json!({"n": 1}).as_object().cloned().unwrap(),
        model_version: "v1".into(),
        ttl_days: 1,
        traceparent: None,
    }
}

#[tokio::test]
async fn every_command_the_store_sends_carries_its_deadline() {
    let db = testkit::TestDb::new("server_deadlines").await;
    let (port, seen) = recording_proxy(testkit::mongo::mongo_addr()).await;
    let store = FeatureStore::connect(&StoreConfig {
        uri: format!("mongodb://127.0.0.1:{port}/?directConnection=true&retryWrites=false"),
        database: db.name().to_owned(),
        collection: "features".to_owned(),
        timeout: Duration::from_secs(5),
        app_name: "server-deadlines-test".to_owned(),
    })
    .await
    .unwrap();
    let a = CustomerId::parse("A").unwrap();
    store.ensure_indexes().await.unwrap();
    store.ping().await.unwrap();
    store.count().await.unwrap();
    store.upsert(&write("A")).await.unwrap();
    store.upsert_many(&[write("B"), write("C")]).await.unwrap();
    store.get(&a).await.unwrap();
    store.get_many(std::slice::from_ref(&a)).await.unwrap();
    store.stamp_version("A", 0).await.unwrap();
    store.delete(&a).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    let commands: Vec<&Document> = seen
        .iter()
        .filter(|c| {
            c.keys()
                .next()
                .is_some_and(|name| !DRIVER_OWN.contains(&name.as_str()))
        })
        .collect();
    let names: Vec<&str> = commands
        .iter()
        .filter_map(|c| c.keys().next().map(String::as_str))
        .collect();
    for expected in [
        "createIndexes",
        "ping",
        "count",
        "findAndModify",
        "update",
        "find",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} not seen in {names:?}"
        );
    }
    for command in commands {
        assert!(
            command.contains_key("maxTimeMS"),
            "sent without maxTimeMS: {command}"
        );
    }
    store.shutdown().await;
    db.drop_db().await;
}
