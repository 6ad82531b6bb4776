//! `fedq-dp`: the differential privacy of fedq, OpenDP in, noisy values
//! and intervals out. Nothing here sees a record: the inputs are exact
//! aggregates handed over by the node's engine (at the one entry point,
//! [`mechanism::Noise::release`]), public sensitivities and costs, and, for
//! the coordinator, the noisy values and public scales nodes released.
//!
//! The map:
//!
//! - [`accounting`]: the privacy measures a ledger accounts in (pure DP,
//!   zCDP) and OpenDP's conversions between them (zCDP to (epsilon,
//!   delta), remembered and bit for bit OpenDP's).
//! - [`mechanism`]: the discrete Laplace and discrete Gaussian mechanisms
//!   (the only source of noise, DESIGN invariant 1), their scales checked
//!   against OpenDP's privacy maps, and their accuracy.
//! - [`distributed`]: the distributed discrete Gaussian: the share of
//!   the noise each of `t` honest nodes adds so that their sum, released
//!   under secure aggregation, is as private as one central release.
//! - [`error`]: [`error::DpError`], what could not be computed and why.
//! - [`distribution`]: equal-width bins, and quantiles with confidence
//!   intervals read off noisy histograms (post-processing only).
//!
//! Used by the node (to release) and by the coordinator (to combine,
//! check scales and state intervals), so both compute the same numbers
//! with the same code.

#![deny(missing_docs)]

pub mod accounting;
pub mod distributed;
pub mod distribution;
pub mod error;
pub mod mechanism;
mod memo;
