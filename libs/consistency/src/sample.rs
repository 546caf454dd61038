//! Which applied changes are audited: each independently with probability
//! `AUDIT_SAMPLE_RATE`, so every key and every kind of change is as likely
//! to be checked, and the cost follows the change rate.

use rand::Rng;

#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    rate: f64,
}

impl Sampler {
    /// `rate` is clamped to `0.0..=1.0` (NaN counts as 0).
    pub fn new(rate: f64) -> Self {
        let rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        Self { rate }
    }

    pub fn is_off(&self) -> bool {
        self.rate <= 0.0
    }

    /// Whether to audit the next change.
    pub fn pick(&self, rng: &mut impl Rng) -> bool {
        self.rate >= 1.0 || (self.rate > 0.0 && rng.random::<f64>() < self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn picked(rate: f64, draws: usize) -> usize {
        let sampler = Sampler::new(rate);
        let mut rng = StdRng::seed_from_u64(13);
        (0..draws).filter(|_| sampler.pick(&mut rng)).count()
    }

    #[test]
    fn zero_audits_nothing_and_one_audits_everything() {
        assert_eq!(picked(0.0, 10_000), 0);
        assert!(Sampler::new(0.0).is_off());
        assert_eq!(picked(1.0, 10_000), 10_000);
        assert_eq!(picked(7.0, 100), 100, "clamped to 1");
        assert_eq!(picked(f64::NAN, 100), 0);
    }

    #[test]
    fn a_fraction_audits_about_that_fraction() {
        let n = picked(0.01, 200_000);
        // Expected 2000, standard deviation ~44.
        assert!((1700..=2300).contains(&n), "{n}");
        let n = picked(0.5, 10_000);
        assert!((4700..=5300).contains(&n), "{n}");
    }
}
