//! Who is calling, and may they: the API's admission control.
//!
//! - [`scope`]: [`Scope`] (`features:read`, `features:write`, `admin`) and
//!   [`Scopes`], a bit set.
//! - [`keys`]: API keys stored as SHA-256 hashes (`API_KEYS_FILE`, reloaded
//!   on SIGHUP and on change; `API_KEYS` for development), found in
//!   constant time.
//! - [`jwt`]: bearer tokens checked against a JWKS, issuer and audience.
//! - [`limits`]: per-principal rate limits and global load shedding.
//! - [`Access`]: all of it for one service — [`Access::authenticate`] turns
//!   request headers into a [`Principal`] or a [`Denial`], [`Access::maintain`]
//!   runs the reloads and sweeps.
//!
//! HTTP framing (which route needs which scope, the error bodies) is the
//! service's; this crate only decides.

pub mod jwt;
pub mod keys;
pub mod limits;
pub mod scope;

pub use jwt::{JwksSource, JwtConfig};
pub use keys::KeyEntry;
pub use limits::{RateKey, RateLimitConfig};
pub use scope::{Scope, Scopes};

use http::HeaderMap;
use http::header::AUTHORIZATION;
use jwt::{JwtVerifier, TokenError};
use keys::KeyStore;
use limits::{LoadShedder, RateLimiter};
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

/// How often `API_KEYS_FILE` is read for changes (SIGHUP reloads at once).
pub const KEYS_POLL_EVERY: Duration = Duration::from_secs(1);

/// Everything admission control is configured with (mapped from the
/// settings by the `settings` crate).
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    pub api_keys_file: Option<PathBuf>,
    /// `API_KEYS`, already hashed.
    pub dev_keys: Vec<KeyEntry>,
    pub jwt: Option<JwtConfig>,
    /// `AUTH_REQUIRED`: refuse to start without credentials.
    pub required: bool,
    pub rate_limit: Option<RateLimitConfig>,
    pub max_concurrent_requests: Option<NonZeroUsize>,
}

impl AccessConfig {
    /// Whether any credentials are configured (then every protected route
    /// needs them, even while the key file holds no key: closed, not open).
    pub fn authenticates(&self) -> bool {
        self.api_keys_file.is_some() || !self.dev_keys.is_empty() || self.jwt.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "AUTH_REQUIRED is true but no credentials are configured: set API_KEYS_FILE, API_KEYS or AUTH_JWT_JWKS_URL/AUTH_JWT_JWKS_FILE"
    )]
    NoCredentials,
    #[error("API_KEYS_FILE: {0}")]
    KeysFile(String),
    #[error("API_KEYS: {0}")]
    DevKeys(String),
    #[error("AUTH_JWT_JWKS_FILE: {0}")]
    Jwks(String),
}

/// Why a request was refused; the label of `auth_denied_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No credentials.
    Missing,
    /// Unknown key, or a token that is malformed, badly signed, or for
    /// another issuer or audience.
    Invalid,
    /// A token past its `exp`.
    Expired,
    /// Valid credentials without the route's scope.
    Scope(Scope),
}

impl Denial {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
            Self::Expired => "expired",
            Self::Scope(_) => "scope",
        }
    }

    /// Counts the denial in `auth_denied_total{reason}`.
    pub fn count(self) {
        metrics::counter!("auth_denied_total", "reason" => self.reason()).increment(1);
    }
}

/// Who made a request.
#[derive(Debug, Clone)]
pub enum Identity {
    Key(Arc<str>),
    Subject(Arc<str>),
    /// Authentication is not configured.
    Anonymous,
}

#[derive(Debug, Clone)]
pub struct Principal {
    pub identity: Identity,
    pub scopes: Scopes,
}

impl Principal {
    /// What rate limits count this principal as; anonymous callers by address.
    pub fn rate_key(&self, client: Option<IpAddr>) -> RateKey {
        match &self.identity {
            Identity::Key(name) => RateKey::Key(name.clone()),
            Identity::Subject(sub) => RateKey::Subject(sub.clone()),
            Identity::Anonymous => {
                RateKey::Ip(client.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)))
            }
        }
    }

    /// The name for logs: a key's name or a token's subject, never a secret.
    pub fn name(&self) -> &str {
        match &self.identity {
            Identity::Key(name) | Identity::Subject(name) => name,
            Identity::Anonymous => "anonymous",
        }
    }
}

struct Authenticator {
    keys: KeyStore,
    keys_file: Option<PathBuf>,
    jwt: Option<JwtVerifier>,
}

/// Admission control of one service.
pub struct Access {
    auth: Option<Authenticator>,
    limiter: Option<RateLimiter>,
    shedder: Option<LoadShedder>,
}

impl Access {
    /// Loads the keys and the key set. Without credentials the service stays
    /// open (one warning says so), unless `AUTH_REQUIRED` forbids it.
    pub async fn start(config: &AccessConfig) -> Result<Self, AccessError> {
        let auth = if config.authenticates() {
            let keys = KeyStore::load(config.dev_keys.clone(), config.api_keys_file.as_deref())
                .map_err(|e| match config.api_keys_file {
                    Some(_) => AccessError::KeysFile(e),
                    None => AccessError::DevKeys(e),
                })?;
            let jwt = match &config.jwt {
                Some(jwt) => Some(
                    JwtVerifier::start(jwt.clone())
                        .await
                        .map_err(AccessError::Jwks)?,
                ),
                None => None,
            };
            tracing::info!(
                keys = keys.current().len(),
                keys_file = ?config.api_keys_file,
                jwt = jwt.is_some(),
                "authentication required on every route but health, probes and docs"
            );
            Some(Authenticator {
                keys,
                keys_file: config.api_keys_file.clone(),
                jwt,
            })
        } else if config.required {
            return Err(AccessError::NoCredentials);
        } else {
            tracing::warn!(
                "no credentials configured (API_KEYS_FILE, API_KEYS, AUTH_JWT_JWKS_URL/AUTH_JWT_JWKS_FILE): \
                 the API is open to anyone who can reach it"
            );
            None
        };
        Ok(Self {
            auth,
            limiter: config.rate_limit.map(RateLimiter::new),
            shedder: config.max_concurrent_requests.map(LoadShedder::new),
        })
    }

    /// Whether admission control does nothing (no credentials, no limits):
    /// the service then need not look at requests at all.
    pub fn is_open(&self) -> bool {
        self.auth.is_none() && self.limiter.is_none() && self.shedder.is_none()
    }

    pub fn authenticates(&self) -> bool {
        self.auth.is_some()
    }

    /// A place for one request under `MAX_CONCURRENT_REQUESTS` (`Ok(None)`
    /// without a limit); `Err` when the service is full.
    pub fn try_enter(&self) -> Result<Option<OwnedSemaphorePermit>, Overloaded> {
        match &self.shedder {
            None => Ok(None),
            Some(shedder) => match shedder.try_enter() {
                Some(permit) => Ok(Some(permit)),
                None => {
                    metrics::counter!("load_shed_total").increment(1);
                    Err(Overloaded)
                }
            },
        }
    }

    /// The caller by its credentials: `Authorization: Bearer <key-or-token>`
    /// or `X-API-Key: <key>`. Anonymous with every scope when no
    /// credentials are configured. Denials are not counted here (a caller
    /// may still turn one into a 429).
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Denial> {
        match self.authenticate_now(headers) {
            Some(verdict) => verdict,
            // Only a JWT naming a key not loaded yet gets here.
            None => match self.auth.as_ref().and_then(|auth| auth.jwt.as_ref()) {
                Some(jwt) => token_principal(jwt.verify(presented_credentials(headers)?).await),
                None => Err(Denial::Invalid),
            },
        }
    }

    /// [`authenticate`](Self::authenticate)'s verdict when it needs no I/O;
    /// `None` when it must wait (a JWT naming a key the service has not
    /// loaded: the key set is fetched again).
    pub fn authenticate_now(&self, headers: &HeaderMap) -> Option<Result<Principal, Denial>> {
        let Some(auth) = &self.auth else {
            return Some(Ok(Principal {
                identity: Identity::Anonymous,
                scopes: Scopes::ALL,
            }));
        };
        let presented = match presented_credentials(headers) {
            Ok(presented) => presented,
            Err(denial) => return Some(Err(denial)),
        };
        if let Some(entry) = auth.keys.current().find(presented.as_bytes()) {
            return Some(Ok(Principal {
                identity: Identity::Key(entry.name.clone()),
                scopes: entry.scopes,
            }));
        }
        match &auth.jwt {
            // A JWT is three base64url parts; anything else was meant as a key.
            Some(jwt) if presented.bytes().filter(|b| *b == b'.').count() == 2 => {
                jwt.verify_now(presented).map(token_principal)
            }
            _ => Some(Err(Denial::Invalid)),
        }
    }

    /// Takes one request from the principal's allowance; `Err` holds the
    /// whole seconds to wait (for `Retry-After`).
    pub fn check_rate(&self, key: &RateKey) -> Result<(), u64> {
        match &self.limiter {
            None => Ok(()),
            Some(limiter) => limiter.check(key).map_err(|wait| {
                metrics::counter!("rate_limited_total").increment(1);
                limits::retry_after_secs(wait)
            }),
        }
    }

    /// Reloads `API_KEYS_FILE` on SIGHUP and on change, refreshes the JWKS
    /// (periodically and on SIGHUP), and forgets idle principals of the
    /// rate limiter, until `shutdown`.
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let mut hangup = match &self.auth {
            Some(_) => match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            {
                Ok(signal) => Some(signal),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot listen for SIGHUP; API_KEYS_FILE is still reloaded on change");
                    None
                }
            },
            None => None,
        };
        let keys_file = self.auth.as_ref().and_then(|a| a.keys_file.clone());
        let mut keys_watch = keys_file.as_deref().map(KeysWatch::new);
        let mut poll = tokio::time::interval(KEYS_POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut jwks = tokio::time::interval(jwt::REFRESH_EVERY);
        jwks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        jwks.reset();
        let mut sweep = tokio::time::interval(limits::SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hangup_received = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = hangup_received => {
                    tracing::info!("SIGHUP: reloading credentials");
                    if let (Some(watch), Some(auth)) = (keys_watch.as_mut(), &self.auth) {
                        watch.reload(&auth.keys, true);
                    }
                    if let Some(jwt) = self.auth.as_ref().and_then(|a| a.jwt.as_ref()) {
                        jwt.refresh().await;
                    }
                }
                _ = poll.tick(), if keys_watch.is_some() => {
                    if let (Some(watch), Some(auth)) = (keys_watch.as_mut(), &self.auth) {
                        watch.reload(&auth.keys, false);
                    }
                }
                _ = jwks.tick(), if self.auth.as_ref().is_some_and(|a| a.jwt.is_some()) => {
                    if let Some(jwt) = self.auth.as_ref().and_then(|a| a.jwt.as_ref()) {
                        jwt.refresh().await;
                    }
                }
                _ = sweep.tick(), if self.limiter.is_some() => {
                    if let Some(limiter) = &self.limiter {
                        limiter.sweep();
                    }
                }
            }
        }
    }
}

/// The service is at `MAX_CONCURRENT_REQUESTS`.
#[derive(Debug, Clone, Copy)]
pub struct Overloaded;

/// A checked token's principal, or why it is refused.
fn token_principal(verdict: Result<jwt::TokenPrincipal, TokenError>) -> Result<Principal, Denial> {
    match verdict {
        Ok(token) => Ok(Principal {
            identity: Identity::Subject(token.subject),
            scopes: token.scopes,
        }),
        Err(TokenError::Expired) => Err(Denial::Expired),
        Err(TokenError::Invalid) => Err(Denial::Invalid),
    }
}

/// The presented secret: `Authorization: Bearer …` first, then `X-API-Key`.
fn presented_credentials(headers: &HeaderMap) -> Result<&str, Denial> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let value = value.to_str().map_err(|_| Denial::Invalid)?;
        let (scheme, credentials) = value.split_once(' ').ok_or(Denial::Invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Denial::Invalid);
        }
        let credentials = credentials.trim();
        return if credentials.is_empty() {
            Err(Denial::Missing)
        } else {
            Ok(credentials)
        };
    }
    match headers.get("x-api-key") {
        Some(value) => match value.to_str().map_err(|_| Denial::Invalid)?.trim() {
            "" => Err(Denial::Missing),
            key => Ok(key),
        },
        None => Err(Denial::Missing),
    }
}

/// Follows `API_KEYS_FILE`: reloads when its content changes (or on demand),
/// keeping the keys in force when the new content is bad and saying so once
/// per bad content.
struct KeysWatch {
    path: PathBuf,
    last_text: Option<String>,
    last_error: Option<String>,
}

impl KeysWatch {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            // What `Access::start` loaded; a change is anything else.
            last_text: keys::read_file(path).ok(),
            last_error: None,
        }
    }

    fn reload(&mut self, store: &KeyStore, forced: bool) {
        let result = keys::read_file(&self.path).and_then(|text| {
            if !forced && self.last_text.as_deref() == Some(text.as_str()) {
                return Ok(None);
            }
            let loaded = store.reload(&text);
            self.last_text = Some(text);
            loaded.map(Some)
        });
        match result {
            Ok(None) => {}
            Ok(Some(count)) => {
                metrics::counter!("api_keys_reload_total", "result" => "ok").increment(1);
                self.last_error = None;
                tracing::info!(path = %self.path.display(), keys = count, "API keys reloaded");
            }
            Err(err) => {
                metrics::counter!("api_keys_reload_total", "result" => "error").increment(1);
                if forced || self.last_error.as_deref() != Some(err.as_str()) {
                    tracing::error!(path = %self.path.display(), error = %err, "API_KEYS_FILE not reloaded; the keys in force stay");
                }
                self.last_error = Some(err);
            }
        }
    }
}
