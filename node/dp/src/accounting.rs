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

use crate::error::DpError;
use std::cmp::Ordering;
use std::fmt;
use std::ops::Neg;
use std::sync::OnceLock;

use opendp::combinators::ConcentratedMeasure;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::traits::{InfDiv, InfPowI};
use serde::{Deserialize, Serialize};

use crate::memo::Memo;

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
    pub fn equivalent(self, amount: f64, delta: f64) -> Result<(f64, f64), DpError> {
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
pub fn pure_to_zcdp(epsilon: f64) -> Result<f64, DpError> {
    epsilon
        .inf_powi(2.into())
        .and_then(|e2| e2.inf_div(&2.0))
        .map_err(|e| DpError::opendp(format!("cannot convert epsilon {epsilon} to rho"), e))
}

/// The epsilon at which rho-zCDP implies (epsilon, delta)-DP: OpenDP's
/// privacy profile of `make_zCDP_to_approxDP`, evaluated at `delta`.
///
/// Bit for bit the value of [`zcdp_to_approx_opendp`], for less work:
/// recent results are remembered ([`MEMO_CAPACITY`]), and a new one runs
/// OpenDP's search with each step's comparison decided by a cheap
/// evaluation where its error bound makes the outcome certain, and by
/// OpenDP's own privacy profile otherwise (see [`certain_order`]). OpenDP's
/// own takes a few milliseconds: each of its ~60 steps evaluates the
/// profile in big-float arithmetic.
pub fn zcdp_to_approx(rho: f64, delta: f64) -> Result<f64, DpError> {
    if rho == 0.0 {
        return Ok(0.0);
    }
    memo().get_or(rho, delta, || {
        searched(rho, delta).map_err(|e| conversion_error(rho, delta, e))
    })
}

/// [`zcdp_to_approx`] as OpenDP computes it, with nothing remembered and no
/// shortcut: the reference the fast one is tested and benchmarked against.
pub fn zcdp_to_approx_opendp(rho: f64, delta: f64) -> Result<f64, DpError> {
    if rho == 0.0 {
        return Ok(0.0);
    }
    ZeroConcentratedDivergence::convert(rho)
        .and_then(|profile| profile.epsilon(delta))
        .map_err(|e| conversion_error(rho, delta, e))
}

fn conversion_error(rho: f64, delta: f64, e: opendp::error::Error) -> DpError {
    DpError::opendp(
        format!("cannot convert rho {rho} to (epsilon, {delta})-DP"),
        e,
    )
}

/// How many conversions [`zcdp_to_approx`] remembers; when full, it
/// forgets them all and starts again.
pub const MEMO_CAPACITY: usize = 4096;

/// Conversions by `(rho, delta)` bits: a query's cost, and an analyst's
/// total (converted by the ledger, then again for the answer's budget).
fn memo() -> &'static Memo {
    static MEMO: OnceLock<Memo> = OnceLock::new();
    MEMO.get_or_init(|| Memo::new(MEMO_CAPACITY))
}

/// OpenDP 0.16's `PrivacyProfile::epsilon` for the profile of rho-zCDP,
/// step for step, except that the profile's value at each step is replaced,
/// where [`certain_order`] knows how it compares with `delta`, by a stand-in
/// that compares the same way (`+inf` above, `-1` below: the search only
/// compares it with `delta`). The path of the search, and so its result, is
/// OpenDP's. Arguments outside the plain case go to OpenDP itself.
fn searched(rho: f64, delta: f64) -> opendp::error::Fallible<f64> {
    let profile = ZeroConcentratedDivergence::convert(rho)?;
    if !(delta > 0.0 && delta < 1.0) {
        // Refusals, delta 0 (infinite epsilon) and delta 1: OpenDP's.
        return profile.epsilon(delta);
    }
    let d = |epsilon: f64| match certain_order(rho, epsilon, delta) {
        Some(Ordering::Greater) => Ok(f64::INFINITY),
        Some(Ordering::Less) => Ok(-1.0),
        _ => profile.delta(epsilon),
    };
    // From here on, `PrivacyProfile::epsilon_unchecked` (delta < 1).
    let mut e_min: f64 = 0.0;
    let mut e_max: f64 = 2.0;
    while d(e_max)? > delta {
        e_max *= e_max;
        if e_max.is_infinite() {
            return Ok(f64::INFINITY);
        }
    }
    let mut e_mid = e_min;
    loop {
        let new_mid = e_min + ((e_max - e_min) / 2.0);
        if new_mid == e_mid {
            return Ok(if delta == d(e_min)? { e_min } else { e_max });
        }
        e_mid = new_mid;
        let d_mid: f64 = d(e_mid)?;
        match d_mid.partial_cmp(&delta) {
            Some(Ordering::Greater) => e_min = e_mid,
            Some(Ordering::Less) | Some(Ordering::Equal) => e_max = e_mid,
            None => return profile.epsilon(delta),
        }
    }
}

/// How OpenDP's `cdp_delta(rho, epsilon)` (the profile of rho-zCDP at
/// `epsilon`) compares with `delta`, when that is certain without it.
///
/// `cdp_delta` picks alpha by a bisection in plain f64 arithmetic (repeated
/// here exactly, from the same upward-rounded start), then evaluates
/// `exp((a-1)(a rho - eps) + a ln1p(-1/a)) / (a-1)` with every operation
/// rounded outward in big floats (the slow part). Here that formula is
/// evaluated in f64 with a bound on the error of both evaluations; `None`
/// (ask OpenDP) whenever the two could lie on either side of `delta`, or
/// any value leaves the range where the bound holds (there OpenDP may also
/// fail, and must say so itself).
fn certain_order(rho: f64, eps: f64, delta: f64) -> Option<Ordering> {
    let plain = (1e-300..1e300).contains(&rho) && (0.0..1e300).contains(&eps);
    if !plain || eps.is_sign_negative() {
        return None;
    }
    // a_max = ((eps + 1) / (2 rho)) + 2, each step rounded up (2 rho is exact).
    let q = div_up(add_up(eps, 1.0)?, 2.0 * rho)?;
    let mut a_max = add_up(q, 2.0)?;
    if a_max >= 1e150 {
        return None;
    }
    let mut a_min = 1.01f64;
    loop {
        let diff = a_max - a_min;
        let a_mid = a_min + diff / 2.0;
        if a_mid == a_max || a_mid == a_min {
            break;
        }
        let deriv = (2.0 * a_mid - 1.0) * rho - eps + a_mid.recip().neg().ln_1p();
        if deriv.is_sign_negative() {
            a_min = a_mid;
        } else {
            a_max = a_mid;
        }
    }
    let a = a_max;
    let a_1 = a - 1.0;
    let ar = a * rho;
    let ar_e = ar - eps;
    let t1 = a_1 * ar_e;
    let t2 = a * (-(1.0 / a)).ln_1p();
    let x = t1 + t2;
    if !(x.abs() <= 700.0 && t1.abs() < 1e300 && t2.is_finite() && a_1 > 0.0) {
        return None;
    }
    let raw = x.exp() / a_1;
    if !(raw > 1e-290 && raw < 1e290) {
        return None;
    }
    // Error bound. With e = f64::EPSILON, every operation of either
    // evaluation (rounded to nearest here, outward in OpenDP's; ln1p and exp
    // to within an ulp or two) errs by at most e (2e for ln1p and exp)
    // times its result, from the same `a`. To first order, each exponent
    // is then within e (|a-1| |a rho| + 3 |t1| + a / (a-1) + 3 |t2| + |x|)
    // of the exact one (the terms: a rho and a rho - eps into t1; 1/a
    // through ln1p, whose slope is a / (a-1), into t2; the sum), so the two
    // within twice that; exp and the division by a - 1 add about 8e of
    // relative difference. The margin doubles both.
    let e = f64::EPSILON;
    let exponent_error =
        1.01 * e * (a_1 * ar.abs() + 3.0 * t1.abs() + a / a_1 + 3.0 * t2.abs() + x.abs() + 1.0);
    let margin = 2.0 * (2.0 * exponent_error + 8.0 * e);
    if margin.is_nan() || margin >= 1e-3 {
        return None;
    }
    // OpenDP's value is `min(raw', 1)` for a raw' within the margin of raw
    // (exp of a difference under 1e-3 is under 1 + 1.001 times it).
    let low = (raw * (1.0 - 1.01 * margin)).min(1.0);
    let high = (raw * (1.0 + 1.01 * margin)).min(1.0);
    if low > delta {
        Some(Ordering::Greater)
    } else if high < delta {
        Some(Ordering::Less)
    } else {
        None
    }
}

/// `a + b` rounded toward +infinity (as OpenDP's `inf_add`), for finite
/// results; `None` otherwise.
fn add_up(a: f64, b: f64) -> Option<f64> {
    let s = a + b;
    if !s.is_finite() {
        return None;
    }
    // TwoSum: s + err == a + b exactly.
    let bb = s - a;
    let err = (a - (s - bb)) + (b - bb);
    Some(if err > 0.0 { next_up(s) } else { s })
}

/// `a / b` rounded toward +infinity, for `b > 0` and a normal result (as
/// OpenDP's `inf_div`); `None` otherwise.
fn div_up(a: f64, b: f64) -> Option<f64> {
    let q = a / b;
    if !(b > 0.0 && q.is_normal() && a.is_normal()) || q.abs() > 1e300 {
        return None;
    }
    // The exact remainder a - q b (exact by FMA for normal q, b).
    let r = (-q).mul_add(b, a);
    Some(if r > 0.0 { next_up(q) } else { q })
}

/// The next f64 above a finite, positive `x`.
fn next_up(x: f64) -> f64 {
    debug_assert!(x.is_finite() && x > 0.0);
    f64::from_bits(x.to_bits() + 1)
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

    /// The fast search and the memo give OpenDP's value bit for bit, over
    /// rhos and deltas spanning the configurable range and beyond, and the
    /// same refusals.
    #[test]
    fn zcdp_to_approx_is_opendps_bit_for_bit() {
        let deltas = [1e-3, 1e-5, 1e-7, 1e-9, 1.3e-10, 1e-12, 1e-20, 0.5];
        let mut rhos = vec![
            1e-9, 1e-6, 1.5e-4, 0.001, 0.045, 0.1, 0.25, 0.5, 1.0, 2.0, 10.0,
        ];
        // Ledger-like totals: sums of nano-units, awkward costs.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..40 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            rhos.push((x % 3_000_000_000) as f64 / 1e9 + 1e-9);
        }
        for &delta in &deltas {
            for &rho in &rhos {
                let want = zcdp_to_approx_opendp(rho, delta);
                let got = zcdp_to_approx(rho, delta);
                assert_eq!(
                    got.as_ref().map(|v| v.to_bits()),
                    want.as_ref().map(|v| v.to_bits()),
                    "rho {rho} delta {delta}: {got:?} vs {want:?}"
                );
                // Again, from the memo.
                assert_eq!(
                    zcdp_to_approx(rho, delta).map(f64::to_bits),
                    want.map(f64::to_bits)
                );
            }
        }
        for (rho, delta) in [
            (0.5, 0.0),
            (0.5, 1.0),
            (0.5, -1e-7),
            (0.5, -0.0),
            (0.5, f64::NAN),
            (0.5, 2.0),
            (f64::INFINITY, 1e-7),
            (1e-310, 1e-7),
            (1e300, 1e-7),
            (-0.5, 1e-7),
            (0.0, 1e-7),
        ] {
            let want = zcdp_to_approx_opendp(rho, delta).map(f64::to_bits);
            assert_eq!(
                zcdp_to_approx(rho, delta).map(f64::to_bits),
                want,
                "{rho} {delta}"
            );
            assert_eq!(
                zcdp_to_approx(rho, delta).map(f64::to_bits),
                want,
                "{rho} {delta}"
            );
        }
    }

    #[test]
    fn the_memo_is_bounded() {
        for i in 0..(MEMO_CAPACITY + 10) {
            let _ = memo().get_or(f64::from_bits(i as u64), f64::MAX, || Ok(i as f64));
        }
        assert!(memo().len() <= MEMO_CAPACITY);
        // Still answers, and right.
        let want = zcdp_to_approx_opendp(0.3, 1e-6).unwrap();
        assert_eq!(zcdp_to_approx(0.3, 1e-6).unwrap().to_bits(), want.to_bits());
    }
}
