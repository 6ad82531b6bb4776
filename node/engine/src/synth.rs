//! Deterministic synthetic partner datasets shaped like the public CTDC schema.
//!
//! fedq never ships real case data. This module fabricates a `cases` dataset
//! for demos and tests: one row per (imaginary) victim case, with the CTDC
//! column names, value spellings and `-99` for missing values, and marginals
//! that look realistic without being anyone's records.
//!
//! **Not on the privacy path.** The generator draws from a seeded
//! `rand_chacha::ChaCha8Rng` so that the same `(partner, rows, seed)` always
//! gives the same bytes. That RNG only fabricates demo data; DP noise never
//! comes from here (DESIGN invariant 1: noise comes only from OpenDP).
//!
//! # Columns
//!
//! [`ctdc_columns`] declares the public schema, identical for every partner
//! kind (so a federation of synthetic nodes can be queried together). The
//! same declaration as `node.toml` text comes from [`schema_toml`].
//!
//! # Partner kinds
//!
//! Each [`Partner`] kind has its own marginals, as real partners would:
//!
//! | kind              | missing blocks | countries of exploitation | female | minors | sexual | forced labour |
//! |-------------------|----------------|---------------------------|--------|--------|--------|---------------|
//! | `hotline`         | ~25%           | ~70% US                   | ~78%   | ~22%   | ~70%   | ~26%          |
//! | `case-management` | ~5%            | 20 countries, top ~12%    | ~66%   | ~20%   | ~48%   | ~50%          |
//! | `ngo`             | ~12%           | ~30% PH, mostly Asia      | ~78%   | ~33%   | ~65%   | ~35%          |
//!
//! "Missing blocks" are sections recorded all-or-nothing and written as `-99`:
//! `ageBroad`, the means of control, the types of labour, the types of sexual
//! exploitation, the recruiter relation and `traffickMonths` are each missing
//! with that probability; citizenship and country of exploitation with half
//! of it; gender and the exploitation flags with a fifth of it.
//! `yearOfRegistration` and `Datasource` are never missing.
//!
//! # Stated marginals
//!
//! Pooling equal numbers of rows from the three kinds (shares among
//! non-missing values), the profile targets the CTDC-like figures of
//! DESIGN.md, and the tests check them, for 20,000 rows of each kind, within
//! these tolerances:
//!
//! * `gender = Female`: about 74%, checked in 0.70..0.78 (Male ~25%,
//!   Trans/Transgender/NonConforming ~1%);
//! * minors (`ageBroad` `0--8` or `9--17`): about 25%, checked in 0.20..0.30;
//! * `isSexualExploit = 1`: about 61%, checked in 0.55..0.67;
//! * `isForcedLabour = 1`: about 37%, checked in 0.31..0.43;
//! * `isOtherExploit = 1`: about 5%; at least one of the three flags is set in
//!   about 99% of rows;
//! * a hotline's most common `CountryOfExploitation` holds more than 60% of
//!   its cases; a case-management partner's holds less than 35%.
//!
//! Structural consistency always holds: `majorityStatus` agrees with
//! `ageBroad` whenever the age is present, `typeOfSex*` is 1 only with
//! `isSexualExploit = 1`, and `traffickMonths` lies in 0..=120 (a short-heavy
//! distribution with a long tail, clamped at 120).

use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use fedq_plan::schema::{ColumnSpec, ColumnType};

/// Kind of partner organisation; marginals differ by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partner {
    /// A case-management system: many countries, few missing values, more
    /// forced labour.
    CaseManagement,
    /// A hotline operator: mostly one country of exploitation, many missing
    /// values.
    Hotline,
    /// An NGO: in between, with more minors and more sexual exploitation.
    Ngo,
}

impl Partner {
    /// Every partner kind, in a fixed order.
    pub const ALL: [Partner; 3] = [Partner::CaseManagement, Partner::Hotline, Partner::Ngo];

    /// Parses `"case-management"`, `"hotline"` or `"ngo"`.
    pub fn parse(s: &str) -> Option<Partner> {
        Partner::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The spelling accepted by [`Partner::parse`].
    pub fn as_str(&self) -> &'static str {
        match self {
            Partner::CaseManagement => "case-management",
            Partner::Hotline => "hotline",
            Partner::Ngo => "ngo",
        }
    }

    /// The partner's `Datasource` value (an index into [`DATASOURCES`]).
    fn datasource(self) -> usize {
        match self {
            Partner::CaseManagement => 0,
            Partner::Hotline => 1,
            Partner::Ngo => 2,
        }
    }
}

/// The missing-value spelling written by the generator.
const MISSING: &str = "-99";

const YEAR_MIN: i64 = 2002;
const YEAR_MAX: i64 = 2025;
const MONTHS_MAX: i64 = 120;

const DATASOURCES: [&str; 3] = ["Case Management", "Hotline", "NGO"];
const GENDERS: [&str; 3] = ["Female", "Male", "Trans/Transgender/NonConforming"];
const AGES: [&str; 9] = [
    "0--8", "9--17", "18--20", "21--23", "24--26", "27--29", "30--38", "39--47", "48+",
];
/// Number of leading [`AGES`] entries that are minors.
const MINOR_AGES: usize = 2;
const MAJORITY: [&str; 2] = ["Adult", "Minor"];
const CITIZENSHIP: [&str; 20] = [
    "PH", "UA", "ID", "MD", "KH", "BY", "MM", "NP", "NG", "RO", "US", "MX", "VN", "TH", "CO", "HT",
    "GH", "KE", "IN", "BD",
];
const EXPLOITATION: [&str; 20] = [
    "US", "RU", "PH", "UA", "ID", "MY", "TH", "AE", "SA", "KZ", "TR", "PL", "GB", "IT", "DE", "JP",
    "KH", "MX", "QA", "IN",
];

const MEANS: [&str; 5] = [
    "meansOfControlDebtBondage",
    "meansOfControlPhysicalAbuse",
    "meansOfControlPsychologicalAbuse",
    "meansOfControlThreats",
    "meansOfControlWithholdsDocuments",
];
const LABOUR: [&str; 4] = [
    "typeOfLabourAgriculture",
    "typeOfLabourConstruction",
    "typeOfLabourDomesticWork",
    "typeOfLabourManufacturing",
];
const SEX: [&str; 2] = ["typeOfSexProstitution", "typeOfSexPornography"];
const RECRUITER: [&str; 3] = [
    "recruiterRelationFamily",
    "recruiterRelationFriend",
    "recruiterRelationIntimatePartner",
];

/// Number of columns in [`ctdc_columns`].
const NCOLS: usize = 10 + MEANS.len() + LABOUR.len() + SEX.len() + RECRUITER.len() + 1;

/// Adult age bands (`18--20` .. `48+`), relative weights.
const ADULT_AGE_WEIGHTS: [f64; 7] = [14.0, 15.0, 14.0, 12.0, 25.0, 13.0, 7.0];
/// Minor age bands (`0--8`, `9--17`), relative weights.
const MINOR_AGE_WEIGHTS: [f64; 2] = [15.0, 85.0];

/// Typical citizenships of victims exploited in each country of
/// [`EXPLOITATION`] (same order), as relative weights.
#[rustfmt::skip]
const ORIGINS: [&[(&str, f64)]; 20] = [
    // US
    &[("US", 55.0), ("MX", 20.0), ("PH", 6.0), ("HT", 6.0), ("CO", 6.0), ("VN", 4.0), ("IN", 3.0)],
    // RU
    &[("UA", 45.0), ("BY", 25.0), ("MD", 20.0), ("VN", 10.0)],
    // PH
    &[("PH", 100.0)],
    // UA
    &[("UA", 95.0), ("MD", 5.0)],
    // ID
    &[("ID", 100.0)],
    // MY
    &[("ID", 50.0), ("MM", 15.0), ("NP", 10.0), ("BD", 10.0), ("VN", 10.0), ("PH", 5.0)],
    // TH
    &[("MM", 45.0), ("KH", 30.0), ("TH", 15.0), ("VN", 10.0)],
    // AE
    &[("PH", 30.0), ("IN", 20.0), ("BD", 15.0), ("NP", 15.0), ("KE", 10.0), ("GH", 10.0)],
    // SA
    &[("PH", 30.0), ("ID", 25.0), ("IN", 15.0), ("BD", 10.0), ("KE", 10.0), ("NP", 10.0)],
    // KZ
    &[("UA", 30.0), ("BY", 30.0), ("MD", 20.0), ("RO", 20.0)],
    // TR
    &[("MD", 30.0), ("UA", 30.0), ("RO", 10.0), ("BY", 10.0), ("GH", 10.0), ("NG", 10.0)],
    // PL
    &[("UA", 60.0), ("BY", 20.0), ("RO", 10.0), ("VN", 10.0)],
    // GB
    &[("RO", 30.0), ("VN", 25.0), ("NG", 20.0), ("GH", 10.0), ("IN", 10.0), ("PH", 5.0)],
    // IT
    &[("NG", 50.0), ("RO", 30.0), ("GH", 10.0), ("MD", 10.0)],
    // DE
    &[("RO", 40.0), ("NG", 20.0), ("UA", 20.0), ("VN", 10.0), ("BD", 10.0)],
    // JP
    &[("PH", 50.0), ("TH", 20.0), ("VN", 20.0), ("ID", 10.0)],
    // KH
    &[("KH", 80.0), ("VN", 20.0)],
    // MX
    &[("MX", 70.0), ("CO", 15.0), ("HT", 15.0)],
    // QA
    &[("NP", 30.0), ("IN", 25.0), ("BD", 20.0), ("PH", 15.0), ("KE", 10.0)],
    // IN
    &[("IN", 70.0), ("NP", 20.0), ("BD", 10.0)],
];

/// A partner kind's generating parameters.
struct Profile {
    /// Probability that a block (age, means, labour types, ...) is missing.
    miss: f64,
    /// Share of female among non-missing gender.
    female: f64,
    /// Share of trans/non-conforming among non-missing gender.
    trans: f64,
    /// Share of minors among non-missing age.
    minors: f64,
    /// Exploitation combinations, relative weights: sexual only, forced
    /// labour only, both, other only, none recorded.
    exploitation: [f64; 5],
    /// Probability that "other exploitation" is also set on a sexual or
    /// forced-labour case.
    other_extra: f64,
    /// Weights over [`EXPLOITATION`].
    countries: [f64; 20],
    /// Weights over [`CITIZENSHIP`], used when the country of exploitation
    /// is missing.
    citizenships: [f64; 20],
    /// First registration year (the last is [`YEAR_MAX`]).
    year_from: i64,
    /// Exponent < 1 skews registrations towards recent years.
    year_skew: f64,
}

/// The generating parameters of each partner kind.
#[rustfmt::skip]
fn profile(p: Partner) -> Profile {
    match p {
        Partner::Hotline => Profile {
            miss: 0.25,
            female: 0.78,
            trans: 0.012,
            minors: 0.22,
            exploitation: [68.0, 24.0, 2.0, 4.0, 2.0],
            other_extra: 0.015,
            //          US    RU   PH   UA   ID   MY   TH   AE   SA   KZ
            countries: [70.0, 1.0, 3.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 0.5,
            //          TR   PL   GB   IT   DE   JP   KH   MX   QA   IN
                         0.5, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 6.0, 1.0, 3.0],
            //             PH   UA   ID   MD   KH   BY   MM   NP   NG   RO
            citizenships: [5.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0,
            //             US    MX    VN   TH   CO   HT   GH   KE   IN   BD
                           45.0, 20.0, 3.0, 1.0, 5.0, 5.0, 1.0, 1.0, 2.0, 1.0],
            year_from: 2012,
            year_skew: 0.8,
        },
        Partner::CaseManagement => Profile {
            miss: 0.05,
            female: 0.66,
            trans: 0.008,
            minors: 0.20,
            exploitation: [46.0, 48.0, 2.0, 3.0, 1.0],
            other_extra: 0.02,
            //          US    RU    PH    UA   ID   MY   TH   AE   SA   KZ
            countries: [12.0, 11.0, 10.0, 8.0, 8.0, 6.0, 6.0, 5.0, 4.0, 4.0,
            //          TR   PL   GB   IT   DE   JP   KH   MX   QA   IN
                         4.0, 3.0, 3.0, 3.0, 2.0, 2.0, 4.0, 2.0, 2.0, 1.0],
            //             PH    UA    ID   MD   KH   BY   MM   NP   NG   RO
            citizenships: [12.0, 12.0, 9.0, 8.0, 6.0, 6.0, 5.0, 4.0, 4.0, 4.0,
            //             US   MX   VN   TH   CO   HT   GH   KE   IN   BD
                           5.0, 4.0, 4.0, 3.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0],
            year_from: YEAR_MIN,
            year_skew: 0.9,
        },
        Partner::Ngo => Profile {
            miss: 0.12,
            female: 0.78,
            trans: 0.010,
            minors: 0.33,
            exploitation: [63.0, 33.0, 2.0, 1.0, 1.0],
            other_extra: 0.025,
            //          US   RU   PH    UA   ID    MY   TH    AE   SA   KZ
            countries: [8.0, 1.0, 30.0, 1.0, 12.0, 8.0, 10.0, 3.0, 3.0, 0.5,
            //          TR   PL   GB   IT   DE   JP   KH    MX   QA   IN
                         0.5, 0.5, 1.0, 1.0, 0.5, 4.0, 10.0, 2.0, 2.0, 6.0],
            //             PH    UA   ID    MD   KH    BY   MM   NP   NG   RO
            citizenships: [30.0, 1.0, 14.0, 1.0, 10.0, 1.0, 8.0, 5.0, 2.0, 1.0,
            //             US   MX   VN   TH   CO   HT   GH   KE   IN   BD
                           4.0, 2.0, 6.0, 4.0, 1.0, 1.0, 1.0, 2.0, 4.0, 3.0],
            year_from: 2006,
            year_skew: 0.75,
        },
    }
}

/// Cumulative distribution over indices `0..n`, sampled by linear search
/// (domains here are at most 20 long).
struct Cdf(Vec<f64>);

impl Cdf {
    fn new(weights: impl IntoIterator<Item = f64>) -> Cdf {
        let mut acc = 0.0;
        let mut c: Vec<f64> = weights
            .into_iter()
            .map(|w| {
                acc += w.max(0.0);
                acc
            })
            .collect();
        let total = acc;
        for x in &mut c {
            *x /= total;
        }
        Cdf(c)
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> usize {
        let u: f64 = rng.random();
        self.0
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.0.len() - 1)
    }
}

/// A profile compiled into samplers.
struct Sampler {
    p: Profile,
    datasource: usize,
    exploitation: Cdf,
    countries: Cdf,
    citizenships: Cdf,
    /// Per country of exploitation: (citizenship indices, their CDF).
    origins: Vec<(Vec<usize>, Cdf)>,
    adult_ages: Cdf,
    minor_ages: Cdf,
    /// P(female | not trans, sexual exploitation) and P(female | not trans,
    /// no sexual exploitation), chosen so that the partner's female share is
    /// `p.female`.
    female_if_sexual: f64,
    female_if_not_sexual: f64,
    female_if_unknown: f64,
}

impl Sampler {
    fn new(partner: Partner) -> Sampler {
        let p = profile(partner);
        let origins = ORIGINS
            .iter()
            .map(|list| {
                let idx = list
                    .iter()
                    .map(|(code, _)| {
                        CITIZENSHIP
                            .iter()
                            .position(|c| c == code)
                            .expect("ORIGINS names only declared citizenships")
                    })
                    .collect();
                (idx, Cdf::new(list.iter().map(|(_, w)| *w)))
            })
            .collect();
        // Female share given not trans; sexual exploitation cases are
        // overwhelmingly female, the rest make up the partner's total.
        let female = p.female / (1.0 - p.trans);
        let [s_only, f_only, both, other, none] = p.exploitation;
        let sexual = (s_only + both) / (s_only + f_only + both + other + none);
        let female_if_sexual = 0.93_f64.min(female);
        let female_if_not_sexual = if sexual < 1.0 {
            ((female - sexual * female_if_sexual) / (1.0 - sexual)).clamp(0.0, 1.0)
        } else {
            female
        };
        Sampler {
            datasource: partner.datasource(),
            exploitation: Cdf::new(p.exploitation),
            countries: Cdf::new(p.countries),
            citizenships: Cdf::new(p.citizenships),
            origins,
            adult_ages: Cdf::new(ADULT_AGE_WEIGHTS),
            minor_ages: Cdf::new(MINOR_AGE_WEIGHTS),
            female_if_sexual,
            female_if_not_sexual,
            female_if_unknown: female,
            p,
        }
    }
}

/// One fabricated case, before rendering. `None` is missing.
#[derive(Debug, Clone, Default)]
struct Case {
    year: i64,
    datasource: usize,
    gender: Option<usize>,
    age: Option<usize>,
    majority: Option<usize>,
    citizenship: Option<usize>,
    country: Option<usize>,
    /// (forced labour, sexual, other)
    exploitation: Option<(bool, bool, bool)>,
    means: Option<[bool; 5]>,
    labour: Option<[bool; 4]>,
    sex: Option<[bool; 2]>,
    recruiter: Option<[bool; 3]>,
    months: Option<i64>,
}

fn bern(rng: &mut ChaCha8Rng, p: f64) -> bool {
    rng.random::<f64>() < p
}

impl Sampler {
    fn case(&self, rng: &mut ChaCha8Rng) -> Case {
        let p = &self.p;
        let miss = p.miss;

        let span = (YEAR_MAX - p.year_from + 1) as f64;
        let u: f64 = rng.random();
        let year = (p.year_from + (span * u.powf(p.year_skew)) as i64).min(YEAR_MAX);

        let exploitation = if bern(rng, miss * 0.2) {
            None
        } else {
            let (forced, sexual, other) = match self.exploitation.sample(rng) {
                0 => (false, true, false),
                1 => (true, false, false),
                2 => (true, true, false),
                3 => (false, false, true),
                _ => (false, false, false),
            };
            let other = other || ((forced || sexual) && bern(rng, p.other_extra));
            Some((forced, sexual, other))
        };
        let forced = matches!(exploitation, Some((true, _, _)));
        let sexual = matches!(exploitation, Some((_, true, _)));

        let gender = if bern(rng, miss * 0.2) {
            None
        } else if bern(rng, p.trans) {
            Some(2)
        } else {
            let pf = match exploitation {
                None => self.female_if_unknown,
                Some(_) if sexual => self.female_if_sexual,
                Some(_) => self.female_if_not_sexual,
            };
            Some(if bern(rng, pf) { 0 } else { 1 })
        };
        let female = gender == Some(0);

        let minor = bern(rng, p.minors);
        let age = if bern(rng, miss) {
            None
        } else if minor {
            Some(self.minor_ages.sample(rng))
        } else {
            Some(MINOR_AGES + self.adult_ages.sample(rng))
        };
        // Present without ageBroad in 40% of the cases whose age is missing.
        let majority = if age.is_some() || bern(rng, 0.4) {
            Some(usize::from(minor))
        } else {
            None
        };

        let country = if bern(rng, miss * 0.5) {
            None
        } else {
            Some(self.countries.sample(rng))
        };
        let citizenship = if bern(rng, miss * 0.5) {
            None
        } else {
            Some(match country {
                Some(c) => {
                    let (idx, cdf) = &self.origins[c];
                    idx[cdf.sample(rng)]
                }
                None => self.citizenships.sample(rng),
            })
        };

        let means = if bern(rng, miss) {
            None
        } else {
            Some([
                bern(rng, if forced { 0.30 } else { 0.10 }),
                bern(rng, if sexual { 0.35 } else { 0.20 }),
                bern(rng, 0.45),
                bern(rng, 0.35),
                bern(rng, if forced { 0.30 } else { 0.08 }),
            ])
        };

        let labour = if exploitation.is_none() || bern(rng, miss) {
            None
        } else {
            let w: [f64; 4] = if forced {
                [0.18, 0.14, 0.30, 0.13]
            } else {
                [0.005; 4]
            };
            Some(w.map(|q| bern(rng, q)))
        };

        let sex = if exploitation.is_none() || bern(rng, miss) {
            None
        } else if sexual {
            Some([bern(rng, 0.80), bern(rng, 0.08)])
        } else {
            Some([false, false])
        };

        let intimate = if sexual && female && !minor {
            0.18
        } else {
            0.04
        };
        let recruiter = if bern(rng, miss) {
            None
        } else {
            Some([
                bern(rng, if minor { 0.35 } else { 0.10 }),
                bern(rng, 0.12),
                bern(rng, intimate),
            ])
        };

        let months = if bern(rng, miss) {
            None
        } else {
            // Exponential with a long-tailed mixture component.
            let mean = if bern(rng, 0.08) {
                48.0
            } else if forced {
                14.0
            } else {
                8.0
            };
            let u: f64 = rng.random();
            let m = -mean * (1.0 - u).ln();
            Some((m as i64).clamp(0, MONTHS_MAX))
        };

        Case {
            year,
            datasource: self.datasource,
            gender,
            age,
            majority,
            citizenship,
            country,
            exploitation,
            means,
            labour,
            sex,
            recruiter,
            months,
        }
    }
}

/// Pre-rendered integer cells, so that rows borrow rather than allocate.
struct Numbers {
    years: Vec<String>,
    months: Vec<String>,
}

impl Numbers {
    fn new() -> Numbers {
        Numbers {
            years: (YEAR_MIN..=YEAR_MAX).map(|y| y.to_string()).collect(),
            months: (0..=MONTHS_MAX).map(|m| m.to_string()).collect(),
        }
    }
}

fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

fn opt<'a>(v: Option<usize>, names: &[&'a str]) -> &'a str {
    v.map_or(MISSING, |i| names[i])
}

fn flags<const N: usize>(out: &mut [&str], v: Option<[bool; N]>) {
    for (i, cell) in out.iter_mut().take(N).enumerate() {
        *cell = v.map_or(MISSING, |f| flag(f[i]));
    }
}

/// Renders `case` into `row`, in [`ctdc_columns`] order.
fn render<'a>(case: &Case, nums: &'a Numbers, row: &mut [&'a str; NCOLS]) {
    row[0] = &nums.years[(case.year - YEAR_MIN) as usize];
    row[1] = DATASOURCES[case.datasource];
    row[2] = opt(case.gender, &GENDERS);
    row[3] = opt(case.age, &AGES);
    row[4] = opt(case.majority, &MAJORITY);
    row[5] = opt(case.citizenship, &CITIZENSHIP);
    row[6] = opt(case.country, &EXPLOITATION);
    let (f, s, o) = match case.exploitation {
        Some((f, s, o)) => (flag(f), flag(s), flag(o)),
        None => (MISSING, MISSING, MISSING),
    };
    row[7] = f;
    row[8] = s;
    row[9] = o;
    let mut at = 10;
    flags(&mut row[at..], case.means);
    at += MEANS.len();
    flags(&mut row[at..], case.labour);
    at += LABOUR.len();
    flags(&mut row[at..], case.sex);
    at += SEX.len();
    flags(&mut row[at..], case.recruiter);
    at += RECRUITER.len();
    row[at] = case.months.map_or(MISSING, |m| &nums.months[m as usize]);
}

fn categorical(name: &str, domain: &[&str]) -> ColumnSpec {
    ColumnSpec {
        open: None,
        name: name.to_string(),
        kind: ColumnType::Categorical,
        domain: Some(domain.iter().map(|d| d.to_string()).collect()),
        min: None,
        max: None,
        bins: None,
    }
}

fn integer(name: &str, min: i64, max: i64) -> ColumnSpec {
    ColumnSpec {
        open: None,
        name: name.to_string(),
        kind: ColumnType::Integer,
        domain: None,
        min: Some(min),
        max: Some(max),
        bins: None,
    }
}

fn boolean(name: &str) -> ColumnSpec {
    ColumnSpec {
        open: None,
        name: name.to_string(),
        kind: ColumnType::Boolean,
        domain: None,
        min: None,
        max: None,
        bins: None,
    }
}

/// The declared public schema of the synthetic `cases` dataset (the same for
/// all partner kinds).
pub fn ctdc_columns() -> Vec<ColumnSpec> {
    let mut cols = vec![
        integer("yearOfRegistration", YEAR_MIN, YEAR_MAX),
        categorical("Datasource", &DATASOURCES),
        categorical("gender", &GENDERS),
        categorical("ageBroad", &AGES),
        categorical("majorityStatus", &MAJORITY),
        categorical("citizenship", &CITIZENSHIP),
        categorical("CountryOfExploitation", &EXPLOITATION),
        boolean("isForcedLabour"),
        boolean("isSexualExploit"),
        boolean("isOtherExploit"),
    ];
    for name in MEANS.iter().chain(&LABOUR).chain(&SEX).chain(&RECRUITER) {
        cols.push(boolean(name));
    }
    cols.push(integer("traffickMonths", 0, MONTHS_MAX));
    debug_assert_eq!(cols.len(), NCOLS);
    cols
}

/// Why a synthetic CSV could not be written: the writer it was given
/// failed.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// Writing or flushing the CSV failed.
    #[error("{what}: {error}")]
    Write {
        /// What was being written (`writing the synthetic CSV header`,
        /// `writing a synthetic CSV row`).
        what: &'static str,
        /// The CSV writer's error (an I/O error of the output, usually).
        error: csv::Error,
    },
    /// Flushing the CSV to its output failed.
    #[error("flushing the synthetic CSV: {0}")]
    Flush(std::io::Error),
}

/// Writes `rows` rows (plus a header row) of CSV for `partner` with `seed`.
/// Deterministic for `(partner, rows, seed)`.
///
/// Writes through a `csv::Writer`, which buffers (64 KiB) before each write
/// to `out`, so `out` need not be buffered; rows borrow pre-rendered cells
/// and do not allocate.
pub fn write_csv<W: Write>(
    partner: Partner,
    rows: usize,
    seed: u64,
    out: W,
) -> Result<(), SynthError> {
    let mut wtr = csv::WriterBuilder::new()
        .buffer_capacity(1 << 16)
        .from_writer(out);
    wtr.write_record(ctdc_columns().iter().map(|c| c.name.as_str()))
        .map_err(|error| SynthError::Write {
            what: "writing the synthetic CSV header",
            error,
        })?;
    let sampler = Sampler::new(partner);
    let nums = Numbers::new();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut row = [MISSING; NCOLS];
    for _ in 0..rows {
        let case = sampler.case(&mut rng);
        render(&case, &nums, &mut row);
        wtr.write_record(row).map_err(|error| SynthError::Write {
            what: "writing a synthetic CSV row",
            error,
        })?;
    }
    wtr.flush().map_err(SynthError::Flush)?;
    Ok(())
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for ch in s.chars() {
        match ch {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            '\r' => q.push_str("\\r"),
            c if c.is_control() => q.push_str(&format!("\\u{:04X}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The `[[datasets.columns]]` TOML block for [`ctdc_columns`], ready to paste
/// under a `[[datasets]]` named `cases` in `node.toml`.
pub fn schema_toml() -> String {
    let mut s = String::new();
    for (i, c) in ctdc_columns().iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str("[[datasets.columns]]\n");
        s.push_str(&format!("name = {}\n", toml_str(&c.name)));
        let kind = match c.kind {
            ColumnType::Categorical => "categorical",
            ColumnType::Integer => "integer",
            ColumnType::Boolean => "boolean",
        };
        s.push_str(&format!("type = {}\n", toml_str(kind)));
        if let Some(domain) = &c.domain {
            let items: Vec<String> = domain.iter().map(|d| toml_str(d)).collect();
            s.push_str(&format!("domain = [{}]\n", items.join(", ")));
        }
        if let Some(min) = c.min {
            s.push_str(&format!("min = {min}\n"));
        }
        if let Some(max) = c.max {
            s.push_str(&format!("max = {max}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_plan::schema::{Schema, MISSING as MISSING_CODE};

    fn generate(partner: Partner, rows: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::new();
        write_csv(partner, rows, seed, &mut out).unwrap();
        out
    }

    /// Reads CSV bytes back as (header, rows).
    fn read(bytes: &[u8]) -> (Vec<String>, Vec<csv::StringRecord>) {
        let mut rdr = csv::Reader::from_reader(bytes);
        let header = rdr.headers().unwrap().iter().map(String::from).collect();
        let rows = rdr.records().map(|r| r.unwrap()).collect();
        (header, rows)
    }

    #[test]
    fn partner_spellings_round_trip() {
        for p in Partner::ALL {
            assert_eq!(Partner::parse(p.as_str()), Some(p));
        }
        assert_eq!(Partner::parse("hotline"), Some(Partner::Hotline));
        assert_eq!(
            Partner::parse("case-management"),
            Some(Partner::CaseManagement)
        );
        assert_eq!(Partner::parse("ngo"), Some(Partner::Ngo));
        assert_eq!(Partner::parse("NGO"), None);
        assert_eq!(Partner::parse(""), None);
    }

    #[test]
    fn deterministic_for_partner_rows_seed() {
        for p in Partner::ALL {
            let a = generate(p, 2_000, 42);
            assert_eq!(a, generate(p, 2_000, 42), "{p:?} not deterministic");
            assert_ne!(a, generate(p, 2_000, 43), "{p:?} ignores the seed");
        }
        assert_ne!(
            generate(Partner::Hotline, 500, 7),
            generate(Partner::Ngo, 500, 7)
        );
        // A prefix of a longer run is the shorter run.
        let short = generate(Partner::Ngo, 100, 9);
        let long = generate(Partner::Ngo, 200, 9);
        assert!(long.starts_with(&short));
        // Zero rows: just the header.
        let (header, rows) = read(&generate(Partner::Hotline, 0, 1));
        assert_eq!(header.len(), NCOLS);
        assert!(rows.is_empty());
    }

    #[test]
    fn every_cell_encodes_under_declared_schema() {
        let schema = Schema::from_specs("cases", &ctdc_columns()).unwrap();
        let names: Vec<String> = ctdc_columns().into_iter().map(|c| c.name).collect();
        assert_eq!(names.len(), NCOLS);
        for p in Partner::ALL {
            let (header, rows) = read(&generate(p, 5_000, 3));
            assert_eq!(header, names);
            assert_eq!(rows.len(), 5_000);
            let mut missing = [0usize; NCOLS];
            for (r, rec) in rows.iter().enumerate() {
                assert_eq!(rec.len(), NCOLS, "row {r}");
                for (c, cell) in rec.iter().enumerate() {
                    let code = schema.columns[c]
                        .encode(cell)
                        .unwrap_or_else(|e| panic!("{p:?} row {r} column {}: {e}", names[c]));
                    if code == MISSING_CODE {
                        missing[c] += 1;
                    }
                }
                // Datasource is the partner's own and never missing.
                assert_eq!(&rec[1], DATASOURCES[p.datasource()]);
                assert_ne!(&rec[0], MISSING);
            }
            // Every column other than year and Datasource has some missing
            // cells, but none is mostly missing.
            for (c, &m) in missing.iter().enumerate() {
                if c < 2 {
                    assert_eq!(m, 0, "{p:?} {}", names[c]);
                } else {
                    assert!(m > 0 && m < rows.len() / 2, "{p:?} {}: {m}", names[c]);
                }
            }
        }
    }

    #[test]
    fn rows_are_internally_consistent() {
        let names: Vec<String> = ctdc_columns().into_iter().map(|c| c.name).collect();
        let col = |n: &str| names.iter().position(|x| x == n).unwrap();
        let (age, maj, sexual) = (
            col("ageBroad"),
            col("majorityStatus"),
            col("isSexualExploit"),
        );
        let (prost, porn) = (col("typeOfSexProstitution"), col("typeOfSexPornography"));
        let months = col("traffickMonths");
        let mut long_tail = 0;
        for p in Partner::ALL {
            let (_, rows) = read(&generate(p, 5_000, 11));
            for rec in &rows {
                if rec[age] != *MISSING {
                    let minor = AGES[..MINOR_AGES].iter().any(|a| *a == &rec[age]);
                    assert_eq!(&rec[maj], if minor { "Minor" } else { "Adult" });
                }
                if &rec[sexual] != "1" {
                    assert_ne!(&rec[prost], "1");
                    assert_ne!(&rec[porn], "1");
                }
                if let Ok(m) = rec[months].parse::<i64>() {
                    if m > 36 {
                        long_tail += 1;
                    }
                }
            }
        }
        assert!(long_tail > 0, "traffickMonths has no long tail");
    }

    /// Share of `pred` among the non-missing cells of column `c`.
    fn share(rows: &[csv::StringRecord], c: usize, pred: impl Fn(&str) -> bool) -> f64 {
        let present: Vec<&str> = rows
            .iter()
            .map(|r| &r[c])
            .filter(|v| *v != MISSING)
            .collect();
        assert!(!present.is_empty());
        present.iter().filter(|v| pred(v)).count() as f64 / present.len() as f64
    }

    fn top_share(rows: &[csv::StringRecord], c: usize) -> f64 {
        let mut counts = std::collections::HashMap::new();
        let mut n = 0usize;
        for r in rows.iter().filter(|r| &r[c] != MISSING) {
            *counts.entry(r[c].to_string()).or_insert(0usize) += 1;
            n += 1;
        }
        *counts.values().max().unwrap() as f64 / n as f64
    }

    #[test]
    fn marginals_match_the_stated_profile() {
        let names: Vec<String> = ctdc_columns().into_iter().map(|c| c.name).collect();
        let col = |n: &str| names.iter().position(|x| x == n).unwrap();
        let coe = col("CountryOfExploitation");
        let mut pooled = Vec::new();
        for (i, p) in Partner::ALL.into_iter().enumerate() {
            let (_, rows) = read(&generate(p, 20_000, 2024 + i as u64));
            let top = top_share(&rows, coe);
            match p {
                Partner::Hotline => assert!(top > 0.6, "hotline top country share {top}"),
                Partner::CaseManagement => {
                    assert!(top < 0.35, "case-management top country share {top}")
                }
                Partner::Ngo => assert!(top > 0.2 && top < 0.6, "ngo top country share {top}"),
            }
            pooled.extend(rows);
        }
        let female = share(&pooled, col("gender"), |v| v == "Female");
        let trans = share(&pooled, col("gender"), |v| v == GENDERS[2]);
        let minors = share(&pooled, col("ageBroad"), |v| v == "0--8" || v == "9--17");
        let sexual = share(&pooled, col("isSexualExploit"), |v| v == "1");
        let forced = share(&pooled, col("isForcedLabour"), |v| v == "1");
        let other = share(&pooled, col("isOtherExploit"), |v| v == "1");
        assert!((0.70..0.78).contains(&female), "female {female}");
        assert!((0.003..0.03).contains(&trans), "trans {trans}");
        assert!((0.20..0.30).contains(&minors), "minors {minors}");
        assert!((0.55..0.67).contains(&sexual), "sexual {sexual}");
        assert!((0.31..0.43).contains(&forced), "forced {forced}");
        assert!((0.02..0.08).contains(&other), "other {other}");
        // Partner differences go the stated way.
        let per = |p: Partner| {
            let (_, rows) = read(&generate(p, 20_000, 99));
            (
                share(&rows, col("isForcedLabour"), |v| v == "1"),
                share(&rows, col("ageBroad"), |v| v == "0--8" || v == "9--17"),
                rows.iter()
                    .filter(|r| &r[col("traffickMonths")] == MISSING)
                    .count() as f64
                    / rows.len() as f64,
            )
        };
        let (cm, hl, ngo) = (
            per(Partner::CaseManagement),
            per(Partner::Hotline),
            per(Partner::Ngo),
        );
        assert!(
            cm.0 > ngo.0 && ngo.0 > hl.0,
            "forced labour {cm:?} {ngo:?} {hl:?}"
        );
        assert!(ngo.1 > cm.1 && ngo.1 > hl.1, "minors {cm:?} {ngo:?} {hl:?}");
        assert!((0.20..0.30).contains(&hl.2), "hotline missing {}", hl.2);
        assert!(
            (0.02..0.08).contains(&cm.2),
            "case-management missing {}",
            cm.2
        );
    }

    #[test]
    fn schema_toml_round_trips() {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Budget {
            per_analyst: f64,
            total: f64,
            per_query_max: f64,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Dataset {
            name: String,
            budget: Budget,
            columns: Vec<ColumnSpec>,
        }
        #[derive(serde::Deserialize)]
        struct Config {
            datasets: Vec<Dataset>,
        }
        let text = format!(
            "[[datasets]]\nname = \"cases\"\n[datasets.budget]\nper_analyst=1.0\ntotal=2.0\nper_query_max=1.0\n{}",
            schema_toml()
        );
        let cfg: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(cfg.datasets.len(), 1);
        assert_eq!(cfg.datasets[0].name, "cases");
        assert_eq!(cfg.datasets[0].columns, ctdc_columns());
        assert_eq!(toml_str("a\"b\\c"), r#""a\"b\\c""#);
    }
}
