use thiserror::Error;

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("cannot read configuration: {0}")]
    Source(#[from] config::ConfigError),
}

impl SettingsError {
    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            name,
            reason: reason.into(),
        }
    }
}
