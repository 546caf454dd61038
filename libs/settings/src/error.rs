use thiserror::Error;

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("settings {name} and {other} contradict each other: {reason}")]
    Contradiction {
        name: &'static str,
        other: &'static str,
        reason: String,
    },
    #[error("cannot read configuration")]
    Source(#[from] config::ConfigError),
}

impl SettingsError {
    pub(crate) fn contradiction(
        name: &'static str,
        other: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Self::Contradiction {
            name,
            other,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            name,
            reason: reason.into(),
        }
    }
}
