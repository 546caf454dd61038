//! What a principal may do: three scopes, held as a bit set so that checking
//! one on every request is a mask, not a string comparison.

use std::fmt;

/// One permission. The names are the contract (`API_KEYS_FILE`, `API_KEYS`,
/// the JWT `scope` claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `features:read`: read one document, batch reads.
    FeaturesRead,
    /// `features:write`: create, update, bulk writes, deletes.
    FeaturesWrite,
    /// `admin`: metrics, the replica's info, any administrative endpoint.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::FeaturesRead, Scope::FeaturesWrite, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::FeaturesRead => "features:read",
            Self::FeaturesWrite => "features:write",
            Self::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == name)
    }

    fn bit(self) -> u8 {
        match self {
            Self::FeaturesRead => 1,
            Self::FeaturesWrite => 2,
            Self::Admin => 4,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Scope`]s.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub const NONE: Scopes = Scopes(0);
    /// Every scope: what anyone has when authentication is not configured.
    pub const ALL: Scopes = Scopes(7);

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    #[must_use]
    pub fn with(self, scope: Scope) -> Self {
        Self(self.0 | scope.bit())
    }

    /// Strict: every name must be a known scope (a typo in a key's scopes
    /// is a configuration error, not a silently weaker key).
    pub fn parse_strict<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        names.into_iter().try_fold(Self::NONE, |scopes, name| {
            Scope::parse(name.trim())
                .map(|s| scopes.with(s))
                .ok_or_else(|| {
                    format!("unknown scope {name:?} (want features:read, features:write or admin)")
                })
        })
    }

    /// Lenient: names this service does not know are ignored (an identity
    /// provider's token carries scopes of other services too).
    pub fn parse_known<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        names
            .into_iter()
            .filter_map(Scope::parse)
            .fold(Self::NONE, Self::with)
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(Scope::ALL.iter().filter(|s| self.contains(**s)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parsing_refuses_unknown_names() {
        let scopes = Scopes::parse_strict(["features:read", "admin"]).unwrap();
        assert!(scopes.contains(Scope::FeaturesRead));
        assert!(scopes.contains(Scope::Admin));
        assert!(!scopes.contains(Scope::FeaturesWrite));
        assert!(Scopes::parse_strict(["features:reed"]).is_err());
    }

    #[test]
    fn lenient_parsing_ignores_unknown_names() {
        let scopes = Scopes::parse_known("openid features:write email".split(' '));
        assert_eq!(scopes, Scopes::NONE.with(Scope::FeaturesWrite));
    }
}
