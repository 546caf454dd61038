//! JWT bearer tokens checked against the identity provider's JWKS
//! (`AUTH_JWT_JWKS_URL` or `AUTH_JWT_JWKS_FILE`), issuer and audience;
//! scopes from the standard space-separated `scope` claim.
//!
//! The key set is fetched at start, refreshed every [`REFRESH_EVERY`] and
//! when a token names a key it does not hold (at most once per
//! [`UNKNOWN_KID_REFRESH_MIN`], so tokens with made-up key ids cannot make
//! the service hammer the provider). A refresh that fails keeps the keys in
//! force.

use crate::scope::Scopes;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
pub const UNKNOWN_KID_REFRESH_MIN: Duration = Duration::from_secs(10);
/// A key set larger than this is not a key set.
const MAX_JWKS_BYTES: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    Url(String),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub jwks: JwksSource,
    pub issuer: String,
    pub audience: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Expired,
    Invalid,
}

/// What a valid token says about its bearer.
#[derive(Debug)]
pub struct TokenPrincipal {
    pub subject: Arc<str>,
    pub scopes: Scopes,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<ScopeClaim>,
}

/// `scope` is a space-separated string (RFC 8693); some providers send a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum ScopeClaim {
    Text(String),
    List(Vec<String>),
}

impl ScopeClaim {
    fn scopes(&self) -> Scopes {
        match self {
            Self::Text(text) => Scopes::parse_known(text.split_ascii_whitespace()),
            Self::List(list) => Scopes::parse_known(list.iter().map(String::as_str)),
        }
    }
}

/// One usable key of the set.
struct VerifyingKey {
    key: DecodingKey,
    validation: Validation,
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, Arc<VerifyingKey>>,
    /// Keys without a `kid`; used only when a token names none.
    unnamed: Vec<Arc<VerifyingKey>>,
}

pub struct JwtVerifier {
    config: JwtConfig,
    keys: RwLock<Arc<Keys>>,
    client: reqwest::Client,
    /// When the key set was last fetched (successfully or not), and the
    /// last refresh error (logged once until it changes).
    refresh: tokio::sync::Mutex<Refresh>,
    last_attempt: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Refresh {
    last_error: Option<String>,
}

impl JwtVerifier {
    /// Loads the key set. A file must load; an unreachable URL is logged and
    /// retried (tokens are refused until it answers), so a provider outage
    /// does not stop replicas from starting.
    pub async fn start(config: JwtConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the JWKS client: {e}"))?;
        let verifier = Self {
            config,
            keys: RwLock::default(),
            client,
            refresh: tokio::sync::Mutex::default(),
            last_attempt: Mutex::default(),
        };
        match (&verifier.config.jwks, verifier.fetch().await) {
            (_, Ok(keys)) => verifier.install(keys),
            (JwksSource::File(_), Err(err)) => return Err(err),
            (JwksSource::Url(_), Err(err)) => {
                tracing::error!(error = %err, "cannot fetch the JWKS; bearer tokens are refused until it answers");
                verifier.refresh.lock().await.last_error = Some(err);
            }
        }
        Ok(verifier)
    }

    /// Checks a token: signature by a key of the set, `exp`, `iss`, `aud`,
    /// `sub`. A token naming a key the set lacks fetches the set again first
    /// (at most once per `UNKNOWN_KID_REFRESH_MIN`).
    pub async fn verify(&self, token: &str) -> Result<TokenPrincipal, TokenError> {
        if let Some(verdict) = self.verify_now(token) {
            return verdict;
        }
        self.refresh_for_unknown_kid().await;
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let key = self
            .key_for(header.kid.as_deref())
            .ok_or(TokenError::Invalid)?;
        Self::check(token, &key)
    }

    /// [`verify`](Self::verify)'s verdict when the set in force decides it;
    /// `None` when the token names a key the set lacks (only `verify` may
    /// fetch the set again).
    pub fn verify_now(&self, token: &str) -> Option<Result<TokenPrincipal, TokenError>> {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Some(Err(TokenError::Invalid));
        };
        let key = self.key_for(header.kid.as_deref())?;
        Some(Self::check(token, &key))
    }

    /// The token checked against `key`.
    fn check(token: &str, key: &VerifyingKey) -> Result<TokenPrincipal, TokenError> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation).map_err(|err| {
                match err.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    _ => TokenError::Invalid,
                }
            })?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(TokenError::Invalid);
        }
        Ok(TokenPrincipal {
            subject: claims.sub.into(),
            scopes: claims
                .scope
                .as_ref()
                .map_or(Scopes::NONE, ScopeClaim::scopes),
        })
    }

    fn key_for(&self, kid: Option<&str>) -> Option<Arc<VerifyingKey>> {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match kid {
            Some(kid) => keys.by_kid.get(kid).cloned(),
            None if keys.unnamed.len() == 1 => keys.unnamed.first().cloned(),
            None if keys.unnamed.is_empty() && keys.by_kid.len() == 1 => {
                keys.by_kid.values().next().cloned()
            }
            None => None,
        }
    }

    async fn refresh_for_unknown_kid(&self) {
        let due = {
            let mut last = self
                .last_attempt
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let due = last.is_none_or(|at| at.elapsed() >= UNKNOWN_KID_REFRESH_MIN);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            self.refresh().await;
        }
    }

    /// Fetches the key set again; on failure the keys in force stay and the
    /// error is logged once (until it changes).
    pub async fn refresh(&self) {
        let mut state = self.refresh.lock().await;
        *self
            .last_attempt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                let count = keys.by_kid.len() + keys.unnamed.len();
                self.install(keys);
                if state.last_error.take().is_some() {
                    tracing::info!(keys = count, "JWKS loaded again");
                }
                metrics::counter!("jwks_refresh_total", "result" => "ok").increment(1);
            }
            Err(err) => {
                metrics::counter!("jwks_refresh_total", "result" => "error").increment(1);
                if state.last_error.as_deref() != Some(err.as_str()) {
                    tracing::error!(error = %err, "cannot refresh the JWKS; keeping the keys in force");
                    state.last_error = Some(err);
                }
            }
        }
    }

    fn install(&self, keys: Keys) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
    }

    async fn fetch(&self) -> Result<Keys, String> {
        let text = match &self.config.jwks {
            JwksSource::File(path) => crate::keys::read_file(path)?,
            JwksSource::Url(url) => self.download(url).await?,
        };
        self.parse(&text)
    }

    async fn download(&self, url: &str) -> Result<String, String> {
        let fail = |e: reqwest::Error| format!("GET {url}: {e}");
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(fail)?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(fail)? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                return Err(format!("GET {url}: larger than {MAX_JWKS_BYTES} bytes"));
            }
        }
        String::from_utf8(body).map_err(|_| format!("GET {url}: not UTF-8"))
    }

    /// The set's signing keys. Symmetric (`oct`) keys are refused: a JWKS is
    /// public, and an HMAC key in it would let anyone sign.
    fn parse(&self, text: &str) -> Result<Keys, String> {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("invalid JWKS: {e}"))?;
        let mut keys = Keys::default();
        for jwk in &set.keys {
            if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            // A key names its algorithm or is used with its family's.
            let mut validation = match jwk.common.key_algorithm.map(Algorithm::try_from) {
                Some(Ok(alg)) if alg.family() == key.family() => Validation::new(alg),
                Some(_) => continue,
                None => Validation::new_for_family(key.family()),
            };
            validation.set_issuer(&[&self.config.issuer]);
            validation.set_audience(&[&self.config.audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            validation.validate_nbf = true;
            validation.leeway = 30;
            let key = Arc::new(VerifyingKey { key, validation });
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.by_kid.insert(kid.clone(), key);
                }
                None => keys.unnamed.push(key),
            }
        }
        if keys.by_kid.is_empty() && keys.unnamed.is_empty() {
            return Err("the JWKS holds no usable signing key (RSA, EC or OKP)".into());
        }
        Ok(keys)
    }
}
