//! What "ready" (or "healthy") means for a process: one probe, asked again
//! and again while it starts ([`crate::launch`]) and once by a status check.

use std::time::Duration;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A readiness (health) probe.
#[derive(Debug, Clone)]
pub enum Ready {
    /// Running counts as ready: there is nothing to ask.
    Spawned,
    /// `GET url` answers 2xx, with a body containing `contains` if given.
    Http {
        url: String,
        contains: Option<String>,
    },
    /// The Redis at this URL answers `PING`.
    Redis(String),
    /// The MongoDB server at this URI answers `ping`.
    Mongo(String),
}

impl Ready {
    /// `GET url` answers 2xx.
    pub fn http(url: impl Into<String>) -> Self {
        Self::Http {
            url: url.into(),
            contains: None,
        }
    }

    /// A Redis on 127.0.0.1:`port` answers `PING`.
    pub fn redis_port(port: u16) -> Self {
        Self::Redis(format!("redis://127.0.0.1:{port}/0"))
    }

    /// A MongoDB server on 127.0.0.1:`port` answers `ping` (asked directly,
    /// whatever replica set it belongs to).
    pub fn mongo_port(port: u16) -> Self {
        Self::Mongo(format!("mongodb://127.0.0.1:{port}/?directConnection=true"))
    }

    /// How often to probe while waiting.
    pub fn interval(&self) -> Duration {
        match self {
            Self::Spawned | Self::Redis(_) => Duration::from_millis(25),
            Self::Http { .. } => Duration::from_millis(50),
            Self::Mongo(_) => Duration::from_millis(100),
        }
    }

    /// Asks once; the error says what was wrong.
    pub async fn probe(&self) -> Result<(), String> {
        match tokio::time::timeout(PROBE_TIMEOUT + Duration::from_secs(1), self.probe_once()).await
        {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
    }

    async fn probe_once(&self) -> Result<(), String> {
        match self {
            Self::Spawned => Ok(()),
            Self::Http { url, contains } => http(url, contains.as_deref()).await,
            Self::Redis(url) => redis_ping(url).await,
            Self::Mongo(uri) => mongo_ping(uri).await,
        }
    }
}

async fn http(url: &str, contains: Option<&str>) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .build()
        .map_err(|err| err.to_string())?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|err| err.to_string())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    match contains {
        None => Ok(()),
        Some(text) => {
            let body = response.text().await.map_err(|err| err.to_string())?;
            if body.contains(text) {
                Ok(())
            } else {
                Err(format!("status {status}, but the body lacks {text}"))
            }
        }
    }
}

async fn redis_ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|err| format!("{url}: {err}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|err| err.to_string())?;
    let reply: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|err| err.to_string())?;
    if reply == "PONG" {
        Ok(())
    } else {
        Err(format!("PING answered {reply:?}"))
    }
}

async fn mongo_ping(uri: &str) -> Result<(), String> {
    let mut options = mongodb::options::ClientOptions::parse(uri)
        .await
        .map_err(|err| err.to_string())?;
    options.server_selection_timeout = Some(PROBE_TIMEOUT);
    options.connect_timeout = Some(Duration::from_secs(1));
    let client = mongodb::Client::with_options(options).map_err(|err| err.to_string())?;
    let result = client
        .database("admin")
        .run_command(bson::doc! { "ping": 1 })
        .await
        .map(drop)
        .map_err(|err| err.to_string());
    client.shutdown().immediate(true).await;
    result
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Spawned => write!(f, "its start"),
            Self::Http {
                url,
                contains: None,
            } => write!(f, "GET {url} with 2xx"),
            Self::Http {
                url,
                contains: Some(text),
            } => write!(f, "GET {url} with 2xx and {text}"),
            Self::Redis(url) => write!(f, "PING on {url}"),
            Self::Mongo(uri) => write!(f, "ping on {uri}"),
        }
    }
}
