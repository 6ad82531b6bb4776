//! Numbers in audit events, written as decimal strings.
//!
//! An audit entry is hashed and signed, and an auditor's own program must
//! reproduce those bytes after reading the export. A JSON float does not
//! survive that: `3600.0000000036002` is read back by many parsers (serde_json
//! without `float_roundtrip` among them) as a neighbouring double that prints
//! as `3600.0000000036`, and NaN or an infinity is written as `null`. So audit
//! events carry no JSON numbers with a fraction: amounts are [`Decimal`]s,
//! strings such as `"0.3"` or `"3600.0000000036002"`, which every JSON
//! library reads and writes back unchanged.
//!
//! A [`Decimal`] is finite by construction: [`Decimal::from_f64`] refuses NaN
//! and infinities, so no request can put a non-finite number in the log.
//! Budget amounts are written from the ledger's integer nano-units
//! ([`Decimal::from_nano`]), so the log states exactly what was debited.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Serialize, Serializer};

/// A finite number as a decimal string (see the module doc).
///
/// Serialised as a JSON string. Deserialised from a string, or, for entries
/// written before format version 2, from a JSON number or `null` (a
/// non-finite value those versions could write); such values are only read,
/// never re-hashed: entries verify over their stored bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Decimal(String);

impl Default for Decimal {
    /// Zero: what a field added in a later format means when absent.
    fn default() -> Decimal {
        Decimal::zero()
    }
}

impl Decimal {
    /// Zero, written `"0"`.
    pub fn zero() -> Decimal {
        Decimal("0".into())
    }

    /// The exact decimal of `n` nano-units (1e-9): `300000000` is `"0.3"`.
    pub fn from_nano(n: u64) -> Decimal {
        Decimal(fixed_point(n, 9))
    }

    /// The exact decimal of `n` atto-units (1e-18).
    pub fn from_atto(n: u64) -> Decimal {
        Decimal(fixed_point(n, 18))
    }

    /// The shortest decimal that reads back as exactly `x` (negative zero is
    /// written `"0"`); `None` for NaN and infinities.
    pub fn from_f64(x: f64) -> Option<Decimal> {
        if !x.is_finite() {
            return None;
        }
        if x == 0.0 {
            return Some(Decimal::zero());
        }
        let a = x.abs();
        // Rust prints the shortest round-trip digits; the exponent form
        // keeps very small and very large values short (1e308 would
        // otherwise be 309 characters).
        let text = if (1e-6..1e16).contains(&a) {
            format!("{x}")
        } else {
            format!("{x:e}")
        };
        Some(Decimal(text))
    }

    /// The value as a float (NaN for a `null` read from an old entry).
    pub fn value(&self) -> f64 {
        self.0.parse().unwrap_or(f64::NAN)
    }

    /// The value in whole nano-units, when it is exactly a non-negative
    /// multiple of 1e-9 (as every budget amount the ledger writes is).
    pub fn to_nano(&self) -> Option<u64> {
        let (int, frac) = self.0.split_once('.').unwrap_or((&self.0, ""));
        if int.is_empty()
            || frac.len() > 9
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let int: u64 = int.parse().ok()?;
        let frac: u64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<9}").parse().ok()?
        };
        int.checked_mul(1_000_000_000)?.checked_add(frac)
    }

    /// Whether this is zero (fields added after the first format are left
    /// out of an entry when zero).
    pub fn is_zero(&self) -> bool {
        self.value() == 0.0
    }

    /// The text, as written in the log.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `n / 10^digits` written exactly, without trailing zeros.
fn fixed_point(n: u64, digits: usize) -> String {
    let scale = 10u64.pow(digits as u32);
    let (int, frac) = (n / scale, n % scale);
    if frac == 0 {
        return int.to_string();
    }
    let frac = format!("{frac:0digits$}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Serialize for Decimal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Decimal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Decimal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Decimal, E> {
                Ok(Decimal(s.to_string()))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<Decimal, E> {
                Ok(Decimal::from_f64(x).unwrap_or(Decimal(String::new())))
            }
            fn visit_u64<E: de::Error>(self, x: u64) -> Result<Decimal, E> {
                Ok(Decimal(x.to_string()))
            }
            fn visit_i64<E: de::Error>(self, x: i64) -> Result<Decimal, E> {
                Ok(Decimal(x.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Decimal, E> {
                Ok(Decimal(String::new()))
            }
            fn visit_none<E: de::Error>(self) -> Result<Decimal, E> {
                Ok(Decimal(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nano_amounts_are_exact() {
        assert_eq!(Decimal::from_nano(300_000_000).as_str(), "0.3");
        assert_eq!(Decimal::from_nano(1).as_str(), "0.000000001");
        assert_eq!(Decimal::from_nano(2_000_000_000).as_str(), "2");
        assert_eq!(Decimal::from_nano(0).as_str(), "0");
        assert_eq!(Decimal::from_atto(1).as_str(), "0.000000000000000001");
        for n in [0, 1, 333_333_334, 1_100_000_000, u64::MAX] {
            assert_eq!(Decimal::from_nano(n).to_nano(), Some(n));
        }
    }

    #[test]
    fn non_finite_numbers_cannot_be_written() {
        for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(Decimal::from_f64(x), None);
        }
        assert_eq!(Decimal::from_f64(-0.0).unwrap().as_str(), "0");
        assert_eq!(Decimal::from_f64(1e308).unwrap().as_str(), "1e308");
        assert_eq!(Decimal::from_f64(1e-7).unwrap().as_str(), "1e-7");
        assert_eq!(
            Decimal::from_f64(3600.0000000036002).unwrap().as_str(),
            "3600.0000000036002"
        );
    }

    #[test]
    fn old_entries_read_numbers_and_null() {
        let d: Decimal = serde_json::from_str("0.5").unwrap();
        assert_eq!(d.value(), 0.5);
        let d: Decimal = serde_json::from_str("null").unwrap();
        assert!(d.value().is_nan());
    }

    proptest! {
        /// Any finite double survives being written and read back, as a
        /// value and as bytes.
        #[test]
        fn every_finite_double_round_trips(bits in any::<u64>()) {
            let x = f64::from_bits(bits);
            prop_assume!(x.is_finite());
            let d = Decimal::from_f64(x).unwrap();
            let json = serde_json::to_string(&d).unwrap();
            let back: Decimal = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back.value(), if x == 0.0 { 0.0 } else { x });
            prop_assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
    }
}
