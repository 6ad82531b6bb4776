//! Privacy measures a dataset's ledger can account in, and the conversions
//! between them, all with OpenDP's own arithmetic.
//!
//! - [`Measure::Pure`]: epsilon-DP (`MaxDivergence`), basic composition:
//!   epsilons add up. Queries ask for `epsilon` (discrete Laplace).
//! - [`Measure::Zcdp`]: rho-zCDP (`ZeroConcentratedDivergence`),
//!   composition: rhos add up. Queries ask for `rho` (discrete Gaussian) or
//!   for `epsilon` (discrete Laplace), which costs `epsilon^2 / 2` rho.
//!
//! **Guarantee.** Conversions only ever go in the sound direction:
//! pure epsilon-DP implies (epsilon^2/2)-zCDP ([`pure_to_zcdp`], exactly as
//! OpenDP's `make_pureDP_to_zCDP` maps, rounded up), and rho-zCDP implies
//! (epsilon(delta), delta)-DP for every delta ([`zcdp_to_approx`], OpenDP's
//! `make_zCDP_to_approxDP` privacy profile). Nothing converts zCDP to pure
//! DP: that is impossible, so a pure ledger refuses rho queries.

use std::fmt;

use opendp::combinators::ConcentratedMeasure;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::traits::{InfDiv, InfPowI};
use serde::{Deserialize, Serialize};

/// The privacy measure a dataset's ledger accounts in (`[datasets.budget]
/// measure`). A ledger never mixes measures: see ARCHITECTURE.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    /// Pure epsilon-DP; amounts are epsilon.
    #[default]
    Pure,
    /// Zero-concentrated DP; amounts are rho.
    Zcdp,
}

impl Measure {
    /// `pure` or `zcdp`, as in configs, answers and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Measure::Pure => "pure",
            Measure::Zcdp => "zcdp",
        }
    }

    /// The unit of an amount: `epsilon` or `rho`.
    pub fn unit(self) -> &'static str {
        match self {
            Measure::Pure => "epsilon",
            Measure::Zcdp => "rho",
        }
    }

    /// Parses [`Measure::name`].
    pub fn parse(s: &str) -> Option<Measure> {
        match s {
            "pure" => Some(Measure::Pure),
            "zcdp" => Some(Measure::Zcdp),
            _ => None,
        }
    }

    /// The (epsilon, delta)-DP equivalent of `amount` in this measure:
    /// `(epsilon, 0)` for pure DP; for zCDP, OpenDP's conversion at `delta`.
    pub fn equivalent(self, amount: f64, delta: f64) -> Result<(f64, f64), String> {
        match self {
            Measure::Pure => Ok((amount, 0.0)),
            Measure::Zcdp => Ok((zcdp_to_approx(amount, delta)?, delta)),
        }
    }
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The rho of an epsilon-DP release: `epsilon^2 / 2`, computed as OpenDP's
/// `make_pureDP_to_zCDP` computes it (rounding up).
pub fn pure_to_zcdp(epsilon: f64) -> Result<f64, String> {
    epsilon
        .inf_powi(2.into())
        .and_then(|e2| e2.inf_div(&2.0))
        .map_err(|e| format!("cannot convert epsilon {epsilon} to rho: {:?}", e.variant))
}

/// The epsilon at which rho-zCDP implies (epsilon, delta)-DP: OpenDP's
/// privacy profile of `make_zCDP_to_approxDP`, evaluated at `delta`.
pub fn zcdp_to_approx(rho: f64, delta: f64) -> Result<f64, String> {
    if rho == 0.0 {
        return Ok(0.0);
    }
    ZeroConcentratedDivergence::convert(rho)
        .and_then(|profile| profile.epsilon(delta))
        .map_err(|e| {
            format!(
                "cannot convert rho {rho} to (epsilon, {delta})-DP: {:?}",
                e.variant
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pure_to_zcdp_is_half_the_square() {
        assert_eq!(pure_to_zcdp(1.0).unwrap(), 0.5);
        assert!((pure_to_zcdp(0.3).unwrap() - 0.045).abs() < 1e-15);
        assert!(pure_to_zcdp(0.3).unwrap() >= 0.3 * 0.3 / 2.0);
    }

    #[test]
    fn zcdp_to_approx_is_at_most_the_classic_bound() {
        // Bun & Steinke: rho + 2 sqrt(rho ln(1/delta)) is valid; OpenDP's
        // conversion is tighter but of the same order.
        let (rho, delta) = (0.5f64, 1e-7f64);
        let e = zcdp_to_approx(rho, delta).unwrap();
        let classic = rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt();
        assert!(e > 0.0 && e <= classic, "{e} vs {classic}");
        assert!(e > 0.5 * classic, "{e} vs {classic}");
        assert_eq!(zcdp_to_approx(0.0, delta).unwrap(), 0.0);
        // More rho, more epsilon.
        assert!(zcdp_to_approx(1.0, delta).unwrap() > e);
    }

    #[test]
    fn equivalents() {
        assert_eq!(Measure::Pure.equivalent(0.7, 1e-7).unwrap(), (0.7, 0.0));
        let (e, d) = Measure::Zcdp.equivalent(0.1, 1e-6).unwrap();
        assert_eq!(d, 1e-6);
        assert!(e > 0.0);
    }
}
