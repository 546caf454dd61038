//! API keys: entries of a name, scopes and the SHA-256 of the key (never the
//! key itself), from `API_KEYS_FILE` (reloaded) and `API_KEYS` (development).
//!
//! `API_KEYS_FILE` is TOML:
//!
//! ```toml
//! [[keys]]
//! name = "scoring-service"                 # [A-Za-z0-9_.-], 1-64 characters
//! scopes = ["features:read"]
//! sha256 = "<64 hex digits>"               # printf %s "$KEY" | sha256sum
//! ```

use crate::scope::Scopes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The shortest key `API_KEYS` accepts: anything shorter is guessable.
pub const MIN_DEV_KEY_LEN: usize = 16;

/// One key as stored: who it is and what it may do.
#[derive(Clone)]
pub struct KeyEntry {
    pub name: Arc<str>,
    pub scopes: Scopes,
    sha256: [u8; 32],
}

impl KeyEntry {
    /// An entry for a key given in plain text (`API_KEYS`); only its hash is kept.
    pub fn from_plain(name: &str, scopes: Scopes, key: &str) -> Self {
        Self {
            name: name.into(),
            scopes,
            sha256: Sha256::digest(key.as_bytes()).into(),
        }
    }
}

/// Names and scopes only: the hash of a weak key is a way to guess it.
impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "key name {name:?} must be 1-64 characters of [A-Za-z0-9_.-]"
        ))
    }
}

/// Parses `API_KEYS`: `name:scope+scope:key,...`. Scope names contain `:`
/// themselves (`features:read`), so the name ends at the first `:` and the
/// key starts after the last one (keys cannot contain `:` or `,`). Errors
/// never quote a key.
pub fn parse_dev_keys(raw: &str) -> Result<Vec<KeyEntry>, String> {
    let mut entries = Vec::new();
    for (index, item) in raw.split(',').map(str::trim).enumerate() {
        if item.is_empty() {
            continue;
        }
        let parsed = item.split_once(':').and_then(|(name, rest)| {
            rest.rsplit_once(':')
                .map(|(scopes, key)| (name, scopes, key))
        });
        let Some((name, scopes, key)) = parsed else {
            return Err(format!("entry {} is not name:scope+scope:key", index + 1));
        };
        check_name(name)?;
        let scopes =
            Scopes::parse_strict(scopes.split('+')).map_err(|e| format!("key {name:?}: {e}"))?;
        if key.len() < MIN_DEV_KEY_LEN {
            return Err(format!(
                "key {name:?} is shorter than {MIN_DEV_KEY_LEN} characters"
            ));
        }
        entries.push(KeyEntry::from_plain(name, scopes, key));
    }
    KeySet::new(entries.clone()).map(|_| entries)
}

/// The keys in force; looked up by hash in constant time.
#[derive(Debug, Default)]
pub struct KeySet {
    entries: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<KeyFileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileEntry {
    name: String,
    scopes: Vec<String>,
    sha256: String,
}

impl KeySet {
    /// Refuses two entries with one name or one hash (which key would win?).
    pub fn new(entries: Vec<KeyEntry>) -> Result<Self, String> {
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        for entry in &entries {
            if !names.insert(entry.name.clone()) {
                return Err(format!("key name {:?} appears twice", entry.name));
            }
            if !hashes.insert(entry.sha256) {
                return Err(format!(
                    "key {:?} has the same key as another entry",
                    entry.name
                ));
            }
        }
        Ok(Self { entries })
    }

    /// Parses the text of an `API_KEYS_FILE`.
    pub fn parse_file(text: &str) -> Result<Vec<KeyEntry>, String> {
        let file: KeyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        file.keys
            .into_iter()
            .map(|entry| {
                check_name(&entry.name)?;
                let scopes = Scopes::parse_strict(entry.scopes.iter().map(String::as_str))
                    .map_err(|e| format!("key {:?}: {e}", entry.name))?;
                let mut sha256 = [0u8; 32];
                hex::decode_to_slice(entry.sha256.trim(), &mut sha256)
                    .map_err(|_| format!("key {:?}: sha256 must be 64 hex digits", entry.name))?;
                Ok(KeyEntry {
                    name: entry.name.into(),
                    scopes,
                    sha256,
                })
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of the presented key. Every stored hash is compared, each
    /// in constant time, and the match is selected without a branch: how
    /// long a lookup takes says nothing about which key (or how much of one)
    /// matched.
    pub fn find(&self, presented: &[u8]) -> Option<&KeyEntry> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = u32::MAX;
        for (index, entry) in self.entries.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            found.conditional_assign(&index, entry.sha256.ct_eq(&digest));
        }
        self.entries.get(found as usize)
    }
}

/// The keys in force, swapped whole on reload: `API_KEYS` plus the file's.
pub struct KeyStore {
    dev_keys: Vec<KeyEntry>,
    current: RwLock<Arc<KeySet>>,
}

impl KeyStore {
    /// The development keys plus, when given, the file's (which must load).
    pub fn load(dev_keys: Vec<KeyEntry>, file: Option<&Path>) -> Result<Self, String> {
        let store = Self {
            dev_keys,
            current: RwLock::default(),
        };
        let set = match file {
            Some(path) => store.combine(&read_file(path)?)?,
            None => KeySet::new(store.dev_keys.clone())?,
        };
        store.swap(set);
        Ok(store)
    }

    /// The keys in force now.
    pub fn current(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the file's keys with `text`'s; on error the keys in force
    /// stay. Returns how many keys are now in force.
    pub fn reload(&self, text: &str) -> Result<usize, String> {
        let set = self.combine(text)?;
        let count = set.len();
        self.swap(set);
        Ok(count)
    }

    fn combine(&self, text: &str) -> Result<KeySet, String> {
        let mut entries = self.dev_keys.clone();
        entries.extend(KeySet::parse_file(text)?);
        KeySet::new(entries)
    }

    fn swap(&self, set: KeySet) {
        metrics::gauge!("api_keys_loaded").set(set.len() as f64);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
    }
}

/// The file's text, or why it cannot be read (naming the path, never the
/// contents).
pub fn read_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Scope;

    fn sha(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    #[test]
    fn finds_a_key_by_its_hash_only() {
        let text = format!(
            "[[keys]]\nname = \"reader\"\nscopes = [\"features:read\"]\nsha256 = \"{}\"\n\
             [[keys]]\nname = \"ops\"\nscopes = [\"admin\", \"features:write\"]\nsha256 = \"{}\"\n",
            sha("reader-key-0123456789"),
            sha("ops-key-0123456789ab")
        );
        let set = KeySet::new(KeySet::parse_file(&text).unwrap()).unwrap();
        let ops = set.find(b"ops-key-0123456789ab").unwrap();
        assert_eq!(&*ops.name, "ops");
        assert!(ops.scopes.contains(Scope::Admin));
        assert!(!ops.scopes.contains(Scope::FeaturesRead));
        assert_eq!(&*set.find(b"reader-key-0123456789").unwrap().name, "reader");
        assert!(set.find(b"reader-key-012345678").is_none());
        assert!(set.find(sha("reader-key-0123456789").as_bytes()).is_none());
    }

    #[test]
    fn refuses_bad_files() {
        let bad = [
            "[[keys]]\nname = \"a\"\nscopes = [\"features:read\"]\nsha256 = \"abc\"\n",
            "[[keys]]\nname = \"a b\"\nscopes = []\nsha256 = \"\"\n",
            "[[keys]]\nname = \"a\"\nscopes = [\"root\"]\nsha256 = \"\"\n",
            "[[keys]]\nname = \"a\"\nscopes = []\nkey = \"plain\"\n",
            "not toml",
        ];
        for text in bad {
            assert!(KeySet::parse_file(text).is_err(), "{text}");
        }
        let twice = format!(
            "[[keys]]\nname = \"a\"\nscopes = []\nsha256 = \"{0}\"\n[[keys]]\nname = \"b\"\nscopes = []\nsha256 = \"{0}\"\n",
            sha("k")
        );
        assert!(KeySet::new(KeySet::parse_file(&twice).unwrap()).is_err());
    }

    #[test]
    fn dev_keys_parse_and_never_quote_the_key() {
        let keys = parse_dev_keys(
            "svc:features:read+features:write:0123456789abcdef-svc, ops:admin:0123456789abcdef-ops",
        )
        .unwrap();
        assert_eq!(&*keys[0].name, "svc");
        assert!(keys[0].scopes.contains(Scope::FeaturesWrite));
        assert!(!keys[0].scopes.contains(Scope::Admin));
        assert_eq!(keys[1].scopes, Scopes::NONE.with(Scope::Admin));
        let set = KeySet::new(keys).unwrap();
        assert_eq!(&*set.find(b"0123456789abcdef-ops").unwrap().name, "ops");
        let err = parse_dev_keys("svc:admin:short").unwrap_err();
        assert!(!err.contains("short\""), "{err}");
        assert!(parse_dev_keys("svc:admin").is_err());
    }
}
