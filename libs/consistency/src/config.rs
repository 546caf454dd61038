//! The continuous auditor's settings (`AUDIT_SAMPLE_RATE`, `AUDIT_DELAY_MS`,
//! `AUDIT_WINDOW_S`), as the settings crate maps them.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditConfig {
    /// The fraction of applied changes audited, `0.0..=1.0`; 0 turns the
    /// auditor off.
    pub sample_rate: f64,
    /// How long after a change is applied its key is read back in every tier.
    pub delay: Duration,
    /// The sliding window of the consistency ratio.
    pub window: Duration,
}

impl AuditConfig {
    pub fn enabled(&self) -> bool {
        self.sample_rate > 0.0
    }
}
