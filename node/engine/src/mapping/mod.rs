//! Partner mappings: how a partner's own columns and codes become the
//! columns and codes of the dataset's declared schema (usually the
//! federation's data standard, `fedq_plan::standard`).
//!
//! `node.toml` says, per standard column (`[datasets.mapping.<column>]`):
//!
//! - `from`: the partner's header the column is read from (default: the
//!   column's own name), so columns can be renamed, and one source column
//!   can feed several (ages to `ageBroad` and to `majorityStatus`);
//! - `values`: the partner's values and the standard's values they mean
//!   (`F = "Female"`), matched after trimming, ignoring ASCII case; a
//!   target of `"-99"` says the value means "missing";
//! - `convert`: a built-in conversion for the values `values` does not
//!   name: `country_to_iso2` (English country names, alpha-3 or alpha-2
//!   codes, from ISO 3166-1, [`countries`]), `age_to_band` (a whole number
//!   of years to the band of the domain holding it: labels `a--b` or
//!   `a+`), `age_to_majority` (years to `Minor` under 18, else `Adult`);
//! - `unmapped`: what a value that is neither missing, nor named, nor
//!   converted, nor already a value of the column becomes: `"missing"`
//!   (the default; counted per column and reported to the operator at
//!   ingest, never to analysts) or `"error"` (the whole ingest fails,
//!   naming the file, line and value; nothing is stored).
//!
//! A value already spelled as the column declares it passes unchanged, so a
//! map needs only the partner's other spellings. Columns without a mapping
//! are read as today: every cell must already be in the declared coding.
//!
//! Everything here is decided from the configuration and the declared
//! schema before a row is read ([`Mapper::compile`]): a map target outside
//! the domain, a conversion that does not fit the column, or a mapping for
//! an undeclared column is a config error.

pub mod countries;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use fedq_plan::schema::{closest, excerpt, Column, Schema, MISSING, MISSING_SPELLINGS};

/// `[datasets.mapping]`: per declared column, how it is read from the
/// partner's file.
pub type Mapping = BTreeMap<String, ColumnMapping>;

/// `[datasets.mapping.<column>]`: how one declared column is read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnMapping {
    /// The partner's header this column is read from; default: the
    /// column's own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The partner's values and the declared values they mean.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, String>,
    /// A built-in conversion for values `values` does not name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convert: Option<Conversion>,
    /// What a value that cannot be mapped becomes.
    #[serde(default)]
    pub unmapped: Unmapped,
}

/// The built-in conversions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conversion {
    /// Country names (English, ISO 3166-1), alpha-3 or alpha-2 codes to
    /// alpha-2.
    CountryToIso2,
    /// Whole years to the domain's band (`a--b` inclusive, `a+`).
    AgeToBand,
    /// Whole years to `Minor` (under 18) or `Adult`.
    AgeToMajority,
}

impl Conversion {
    fn name(self) -> &'static str {
        match self {
            Conversion::CountryToIso2 => "country_to_iso2",
            Conversion::AgeToBand => "age_to_band",
            Conversion::AgeToMajority => "age_to_majority",
        }
    }
}

/// What a value that cannot be mapped becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmapped {
    /// Missing, counted and reported to the operator.
    #[default]
    Missing,
    /// An ingest error naming file, line and value; nothing is stored.
    Error,
}

/// A mapping compiled against a schema: one rule per declared column, in
/// the schema's order.
#[derive(Debug, Clone)]
pub struct Mapper {
    rules: Vec<Rule>,
}

/// How one declared column is read.
#[derive(Debug, Clone)]
struct Rule {
    /// The partner's header.
    source: String,
    /// `None`: read as declared ([`Column::encode`]).
    map: Option<Compiled>,
}

#[derive(Debug, Clone)]
struct Compiled {
    /// Lower-cased, trimmed partner value to code.
    values: HashMap<String, i64>,
    /// The partner values as written in `node.toml` (trimmed).
    written: Vec<String>,
    convert: Option<Convert>,
    unmapped: Unmapped,
    /// What the map and conversion say, for `check`.
    summary: String,
}

#[derive(Debug, Clone)]
enum Convert {
    /// Normalised country name or code to the code of its alpha-2.
    Country(HashMap<String, i64>),
    /// `(lowest, highest or open, code)`, sorted.
    Bands(Vec<(i64, Option<i64>, i64)>),
    Majority {
        adult: i64,
        minor: i64,
    },
}

/// One cell read through a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapped {
    /// The cell's code (possibly [`MISSING`], when the source says so).
    Code(i64),
    /// The value could not be mapped; the rule says what to do.
    Unmapped(Unmapped),
}

/// Lower-case, trimmed, inner whitespace collapsed.
fn normalise(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// A whole number of years, if `cell` is one (0 to 150).
fn years(cell: &str) -> Option<i64> {
    let v: i64 = cell.trim().parse().ok()?;
    (0..=150).contains(&v).then_some(v)
}

/// `a--b` (inclusive) or `a+`.
fn band(label: &str) -> Option<(i64, Option<i64>)> {
    if let Some(a) = label.strip_suffix('+') {
        return Some((a.trim().parse().ok()?, None));
    }
    let (a, b) = label.split_once("--")?;
    let (a, b): (i64, i64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, Some(b)))
}

impl Mapper {
    /// Compiles `mapping` for `schema`. Errors name the `node.toml` key
    /// and what to change.
    pub fn compile(dataset: &str, schema: &Schema, mapping: &Mapping) -> Result<Mapper, String> {
        for name in mapping.keys() {
            if schema.index_of(name).is_none() {
                let hint = closest(name, schema.columns.iter().map(Column::name))
                    .map(|c| format!(" (did you mean {c:?}?)"))
                    .unwrap_or_default();
                return Err(format!(
                    "dataset {dataset:?}: [datasets.mapping.{name}] maps a column the dataset does not declare{hint}; mapping keys are the declared (standard) column names"
                ));
            }
        }
        let mut rules = Vec::with_capacity(schema.columns.len());
        for col in &schema.columns {
            let Some(m) = mapping.get(col.name()) else {
                rules.push(Rule {
                    source: col.name().to_string(),
                    map: None,
                });
                continue;
            };
            let at = format!("dataset {dataset:?}: [datasets.mapping.{}]", col.name());
            let source = match &m.from {
                Some(f) if f.trim().is_empty() => return Err(format!("{at}: `from` is empty")),
                Some(f) => f.trim().to_string(),
                None => col.name().to_string(),
            };
            if matches!(col, Column::Open { .. } | Column::PersonId { .. }) {
                if !m.values.is_empty() || m.convert.is_some() || m.unmapped != Unmapped::Missing {
                    return Err(format!(
                        "{at}: {} can only be renamed (`from`); its values are kept as written",
                        col.kind_name()
                    ));
                }
                // Renamed only: read as declared (a missing person
                // identifier stays an error).
                rules.push(Rule { source, map: None });
                continue;
            }
            let mut values = HashMap::new();
            for (from, to) in &m.values {
                let key = normalise(from);
                if key.is_empty() || MISSING_SPELLINGS.contains(&key.as_str()) {
                    return Err(format!(
                        "{at}: values maps {from:?}, which already means missing; remove it"
                    ));
                }
                let code = col.encode(to).map_err(|why| {
                    format!(
                        "{at}: values maps {from:?} to {}: {why}; expected {}",
                        excerpt(to),
                        col.expectation()
                    )
                })?;
                if values.insert(key, code).is_some_and(|c| c != code) {
                    return Err(format!(
                        "{at}: values names {from:?} twice (keys are matched ignoring case and spaces) with different targets"
                    ));
                }
            }
            let convert = match m.convert {
                None => None,
                Some(c) => Some(
                    Convert::compile(c, col)
                        .map_err(|why| format!("{at}: convert = {:?} {why}", c.name()))?,
                ),
            };
            let summary = {
                let mut parts = Vec::new();
                if !m.values.is_empty() {
                    let shown: Vec<String> = m
                        .values
                        .iter()
                        .take(6)
                        .map(|(a, b)| format!("{a} -> {b}"))
                        .collect();
                    let more = m.values.len().saturating_sub(6);
                    parts.push(format!(
                        "values {}{}",
                        shown.join(", "),
                        if more > 0 {
                            format!(" (and {more} more)")
                        } else {
                            String::new()
                        }
                    ));
                }
                if let Some(c) = m.convert {
                    parts.push(c.name().to_string());
                }
                if let Column::Categorical { domain, .. } = col {
                    let reached: std::collections::HashSet<i64> = values
                        .values()
                        .copied()
                        .chain(match &convert {
                            Some(Convert::Country(t)) => t.values().copied().collect::<Vec<_>>(),
                            Some(Convert::Bands(b)) => b.iter().map(|x| x.2).collect(),
                            Some(Convert::Majority { adult, minor }) => vec![*adult, *minor],
                            None => Vec::new(),
                        })
                        .filter(|&c| c != MISSING)
                        .collect();
                    let not: Vec<&str> = domain
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !reached.contains(&(*i as i64)))
                        .map(|(_, d)| d.as_str())
                        .collect();
                    let others = if !not.is_empty() && not.len() <= 6 {
                        format!(
                            " (the others only if spelled as declared: {})",
                            not.join(", ")
                        )
                    } else {
                        String::new()
                    };
                    parts.push(format!(
                        "reaches {} of {} declared values{others}",
                        domain.len() - not.len(),
                        domain.len(),
                    ));
                }
                parts.push(match m.unmapped {
                    Unmapped::Missing => "other values -> missing (counted)".to_string(),
                    Unmapped::Error => "other values fail the ingest".to_string(),
                });
                parts.join("; ")
            };
            rules.push(Rule {
                source,
                map: Some(Compiled {
                    written: m.values.keys().map(|k| k.trim().to_string()).collect(),
                    values,
                    convert,
                    unmapped: m.unmapped,
                    summary,
                }),
            });
        }
        Ok(Mapper { rules })
    }

    /// The partner's header that declared column `i` is read from.
    pub fn source(&self, i: usize) -> &str {
        &self.rules[i].source
    }

    /// Whether column `i` is read through a mapping (else as declared).
    pub fn is_mapped(&self, i: usize) -> bool {
        self.rules[i].map.is_some()
    }

    /// What the mapping of column `i` does, in words (for `check`).
    pub fn summary(&self, i: usize) -> Option<&str> {
        self.rules[i].map.as_ref().map(|m| m.summary.as_str())
    }

    /// Spellings of mapped column `i` whose code is known in advance, each
    /// with the code [`Mapper::map`] gives it (`None`: missing or
    /// unmapped): the mapping's values as written and normalised, the
    /// declared labels, the spellings of "missing", and what a conversion
    /// reads (country names, aliases and codes as written in ISO 3166-1,
    /// and normalised; whole years 0 to 150). A database source filters
    /// rows with these exact spellings before the node maps the rest
    /// (`postgres::mapped`). Empty if column `i` has no mapping.
    ///
    /// The likeliest spellings come first, so that a filter testing them
    /// in turn stops early on most rows: the partner's values as written
    /// in the mapping (sorted), the declared labels, the spellings of
    /// missing, then the rest.
    pub fn spellings(&self, i: usize, column: &Column) -> Vec<(String, Option<i64>)> {
        let Some(m) = self.rules[i].map.as_ref() else {
            return Vec::new();
        };
        let mut all: Vec<String> = m.written.clone();
        all.sort_unstable();
        if let Column::Categorical { domain, .. } = column {
            all.extend(domain.iter().cloned());
        }
        all.extend(MISSING_SPELLINGS.iter().map(|s| s.to_string()));
        let likeliest = all.len();
        all.extend(m.values.keys().cloned());
        match &m.convert {
            Some(Convert::Country(t)) => {
                all.extend(t.keys().cloned());
                for (a2, a3, names) in countries::COUNTRIES {
                    all.extend([a2.to_string(), a3.to_string()]);
                    all.extend(names.iter().map(|n| n.to_string()));
                }
                all.extend(countries::ALIASES.iter().map(|(a, _)| a.to_string()));
            }
            Some(Convert::Bands(_) | Convert::Majority { .. }) => {
                all.extend((0..=150).map(|y: i64| y.to_string()))
            }
            None => {}
        }
        all[likeliest..].sort_unstable();
        let mut seen = HashSet::new();
        all.retain(|s| seen.insert(s.clone()));
        all.into_iter()
            .map(|s| {
                let code = match self.map(i, column, &s) {
                    Some(Mapped::Code(c)) if c != MISSING => Some(c),
                    _ => None,
                };
                (s, code)
            })
            .collect()
    }

    /// Whether [`Mapper::spellings`] of column `i` name every whole number
    /// that does not map to missing: a categorical column whose mapping
    /// is a conversion from years alone (`age_to_band`, `age_to_majority`;
    /// no `values`), which reads 0 to 150 and otherwise only the declared
    /// labels and the spellings of missing, all among the spellings. A
    /// database column of whole numbers read through such a mapping can
    /// then be tested exactly in SQL (`postgres::mapped`): a number spelt
    /// as PostgreSQL prints it and not among the spellings is missing.
    pub fn integers_known(&self, i: usize, column: &Column) -> bool {
        self.rules[i].map.as_ref().is_some_and(|m| {
            m.values.is_empty()
                && matches!(
                    m.convert,
                    Some(Convert::Bands(_) | Convert::Majority { .. })
                )
                && matches!(column, Column::Categorical { .. })
        })
    }

    /// Reads one cell of mapped column `i` (`column` is the declared
    /// column). `None` if column `i` has no mapping.
    pub fn map(&self, i: usize, column: &Column, raw: &str) -> Option<Mapped> {
        let m = self.rules[i].map.as_ref()?;
        let cell = raw.trim();
        if MISSING_SPELLINGS.contains(&cell) {
            return Some(Mapped::Code(MISSING));
        }
        if let Some(&code) = m.values.get(&normalise(cell)) {
            return Some(Mapped::Code(code));
        }
        let converted = match &m.convert {
            Some(Convert::Country(t)) => t.get(&normalise(cell)).copied(),
            Some(Convert::Bands(bands)) => years(cell).and_then(|y| {
                bands
                    .iter()
                    .find(|(lo, hi, _)| y >= *lo && hi.is_none_or(|h| y <= h))
                    .map(|b| b.2)
            }),
            Some(Convert::Majority { adult, minor }) => {
                years(cell).map(|y| if y < 18 { *minor } else { *adult })
            }
            None => None,
        };
        if let Some(code) = converted {
            return Some(Mapped::Code(code));
        }
        Some(match column.encode(cell) {
            Ok(code) => Mapped::Code(code),
            Err(_) => Mapped::Unmapped(m.unmapped),
        })
    }
}

impl Convert {
    fn compile(c: Conversion, col: &Column) -> Result<Convert, String> {
        let Column::Categorical { domain, .. } = col else {
            return Err(format!(
                "applies to categorical columns; {:?} is {}",
                col.name(),
                col.kind_name()
            ));
        };
        let code = |label: &str| domain.iter().position(|d| d == label).map(|i| i as i64);
        match c {
            Conversion::CountryToIso2 => {
                let mut table = HashMap::new();
                for (i, d) in domain.iter().enumerate() {
                    let Some((a2, a3, names)) = countries::COUNTRIES.iter().find(|c| c.0 == d)
                    else {
                        return Err(format!(
                            "needs a domain of ISO 3166-1 alpha-2 codes; {d:?} is not one"
                        ));
                    };
                    let i = i as i64;
                    table.insert(normalise(a2), i);
                    table.insert(normalise(a3), i);
                    for n in names.iter() {
                        table.insert(normalise(n), i);
                    }
                    for (alias, to) in countries::ALIASES {
                        if to == a2 {
                            table.insert(normalise(alias), i);
                        }
                    }
                }
                Ok(Convert::Country(table))
            }
            Conversion::AgeToBand => {
                let mut bands = Vec::with_capacity(domain.len());
                for d in domain {
                    let (lo, hi) = band(d).ok_or_else(|| {
                        format!(
                            "needs a domain of age bands (\"a--b\" or \"a+\"); {d:?} is not one"
                        )
                    })?;
                    bands.push((lo, hi, code(d).unwrap_or(MISSING)));
                }
                bands.sort();
                for w in bands.windows(2) {
                    if w[0].1.is_none_or(|hi| hi >= w[1].0) {
                        return Err("needs bands that do not overlap".to_string());
                    }
                }
                Ok(Convert::Bands(bands))
            }
            Conversion::AgeToMajority => match (code("Adult"), code("Minor")) {
                (Some(adult), Some(minor)) => Ok(Convert::Majority { adult, minor }),
                _ => Err("needs a domain with \"Adult\" and \"Minor\"".to_string()),
            },
        }
    }
}

/// What a mapping did to one declared column over one file, for the
/// operator (never for analysts: these are counts of the partner's own
/// rows, shown on the partner's own machine).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnCoverage {
    /// The declared column.
    pub column: String,
    /// The partner's header it was read from.
    pub source: String,
    /// Whether it was read through a mapping.
    pub mapped: bool,
    /// Rows with a declared value.
    pub coded: u64,
    /// Rows missing in the source (`-99`, empty, or mapped to missing).
    pub missing: u64,
    /// Rows whose value could not be mapped and became missing.
    pub unmapped: u64,
    /// The unmapped values seen most often, with their counts (at most
    /// [`UNMAPPED_SHOWN`]).
    pub unmapped_values: Vec<(String, u64)>,
}

/// Unmapped values a coverage report names per column.
pub const UNMAPPED_SHOWN: usize = 5;

/// Distinct unmapped values counted per column (the rest are counted in
/// total only), so a file of unique values cannot exhaust memory.
pub const UNMAPPED_TRACKED: usize = 10_000;

/// Counts [`ColumnCoverage`] while a file is read.
#[derive(Debug, Clone, Default)]
pub struct CoverageCounter {
    coded: u64,
    missing: u64,
    unmapped: u64,
    values: HashMap<String, u64>,
}

impl CoverageCounter {
    /// Counts one cell's outcome: its code, or `None` for unmapped `raw`.
    pub fn count(&mut self, code: Option<i64>, raw: &str) {
        match code {
            Some(MISSING) => self.missing += 1,
            Some(_) => self.coded += 1,
            None => {
                self.unmapped += 1;
                let v = raw.trim();
                if let Some(n) = self.values.get_mut(v) {
                    *n += 1;
                } else if self.values.len() < UNMAPPED_TRACKED {
                    self.values.insert(v.to_string(), 1);
                }
            }
        }
    }

    /// The column's coverage.
    pub fn finish(self, column: &str, source: &str, mapped: bool) -> ColumnCoverage {
        let mut values: Vec<(String, u64)> = self.values.into_iter().collect();
        values.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        values.truncate(UNMAPPED_SHOWN);
        ColumnCoverage {
            column: column.to_string(),
            source: source.to_string(),
            mapped,
            coded: self.coded,
            missing: self.missing,
            unmapped: self.unmapped,
            unmapped_values: values,
        }
    }
}

impl std::fmt::Display for ColumnCoverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = self.coded + self.missing + self.unmapped;
        let pct = |n: u64| {
            if rows == 0 {
                0.0
            } else {
                100.0 * n as f64 / rows as f64
            }
        };
        let from = if self.source == self.column {
            String::new()
        } else {
            format!(" <- {}", self.source)
        };
        write!(
            f,
            "{}{from}: {:.1}% coded, {:.1}% missing in the source",
            self.column,
            pct(self.coded),
            pct(self.missing)
        )?;
        if self.mapped {
            write!(
                f,
                ", {} unmapped -> missing ({:.1}%)",
                self.unmapped,
                pct(self.unmapped)
            )?;
            if !self.unmapped_values.is_empty() {
                let shown: Vec<String> = self
                    .unmapped_values
                    .iter()
                    .map(|(v, n)| format!("{} x{n}", excerpt(v)))
                    .collect();
                write!(f, ": {}", shown.join(", "))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_plan::schema::{ColumnSpec, ColumnType};

    fn schema() -> Schema {
        let cat = |n: &str, d: &[&str]| ColumnSpec {
            name: n.into(),
            kind: ColumnType::Categorical,
            domain: Some(d.iter().map(|s| s.to_string()).collect()),
            min: None,
            max: None,
            open: None,
            bins: None,
        };
        Schema::from_specs(
            "cases",
            &[
                cat(
                    "gender",
                    &["Female", "Male", "Trans/Transgender/NonConforming"],
                ),
                cat("ageBroad", &["0--8", "9--17", "18--20", "21--23", "48+"]),
                cat("majorityStatus", &["Adult", "Minor"]),
                cat("citizenship", &["PH", "UA", "RU", "CI", "GB"]),
            ],
        )
        .unwrap()
    }

    fn mapping(text: &str) -> Mapping {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn maps_values_countries_and_ages_and_passes_declared_spellings() {
        let s = schema();
        let m = Mapper::compile(
            "cases",
            &s,
            &mapping(
                r#"
                [gender]
                from = "sex"
                values = { F = "Female", M = "Male", U = "-99" }
                [ageBroad]
                from = "age"
                convert = "age_to_band"
                [majorityStatus]
                from = "age"
                convert = "age_to_majority"
                [citizenship]
                from = "nationality"
                convert = "country_to_iso2"
                unmapped = "error"
                "#,
            ),
        )
        .unwrap();
        let at = |i: usize, raw: &str| m.map(i, &s.columns[i], raw).unwrap();
        assert_eq!(m.source(0), "sex");
        assert_eq!(at(0, " f "), Mapped::Code(0));
        assert_eq!(at(0, "M"), Mapped::Code(1));
        assert_eq!(at(0, "Male"), Mapped::Code(1), "declared spellings pass");
        assert_eq!(at(0, "u"), Mapped::Code(MISSING), "mapped to missing");
        assert_eq!(at(0, "-99"), Mapped::Code(MISSING));
        assert_eq!(at(0, "X"), Mapped::Unmapped(Unmapped::Missing));
        assert_eq!(at(1, "8"), Mapped::Code(0));
        assert_eq!(at(1, "9"), Mapped::Code(1));
        assert_eq!(at(1, "17"), Mapped::Code(1));
        assert_eq!(at(1, "18"), Mapped::Code(2));
        assert_eq!(at(1, "73"), Mapped::Code(4), "48+ is open");
        assert_eq!(at(1, "30"), Mapped::Unmapped(Unmapped::Missing), "no band");
        assert_eq!(at(1, "18--20"), Mapped::Code(2));
        assert_eq!(at(1, "-3"), Mapped::Unmapped(Unmapped::Missing));
        assert_eq!(at(2, "17"), Mapped::Code(1));
        assert_eq!(at(2, "18"), Mapped::Code(0));
        assert_eq!(at(3, "Philippines"), Mapped::Code(0));
        assert_eq!(at(3, "  russian   FEDERATION "), Mapped::Code(2));
        assert_eq!(at(3, "Russia"), Mapped::Code(2));
        assert_eq!(at(3, "UKR"), Mapped::Code(1));
        assert_eq!(at(3, "Côte d'Ivoire"), Mapped::Code(3));
        assert_eq!(at(3, "United Kingdom"), Mapped::Code(4));
        assert_eq!(at(3, "gb"), Mapped::Code(4));
        assert_eq!(at(3, "France"), Mapped::Unmapped(Unmapped::Error));
        assert!(m.summary(3).unwrap().contains("reaches 5 of 5"));
        assert!(
            m.summary(0).unwrap().contains("reaches 2 of 3"),
            "{:?}",
            m.summary(0)
        );
        // Each known spelling once, with the code `map` gives it, and the
        // likeliest first (the database's filter tests them in turn).
        let spelt = m.spellings(0, &s.columns[0]);
        let first: Vec<&str> = spelt.iter().take(6).map(|(w, _)| w.as_str()).collect();
        let labels: Vec<&str> = match &s.columns[0] {
            Column::Categorical { domain, .. } => domain.iter().map(|d| d.as_str()).collect(),
            _ => unreachable!(),
        };
        assert_eq!(first[..3], ["F", "M", "U"], "the partner's values first");
        assert_eq!(first[3..], labels[..], "then the declared labels");
        let mut seen = HashSet::new();
        for (w, code) in &spelt {
            assert!(seen.insert(w), "{w:?} twice");
            let mapped = match at(0, w) {
                Mapped::Code(c) if c != MISSING => Some(c),
                _ => None,
            };
            assert_eq!(*code, mapped, "{w:?}");
        }
        assert!(spelt.iter().any(|(w, c)| w == "f" && *c == Some(0)));

        // Conversions from years alone name every whole number that maps
        // to a code; a value map or a name conversion does not.
        let known: Vec<bool> = (0..4).map(|i| m.integers_known(i, &s.columns[i])).collect();
        assert_eq!(known, [false, true, true, false]);
        for i in [1, 2] {
            let spelt = m.spellings(i, &s.columns[i]);
            for v in -1_000i64..=1_000 {
                let w = v.to_string();
                let code = match at(i, &w) {
                    Mapped::Code(c) if c != MISSING => Some(c),
                    _ => None,
                };
                let listed = spelt.iter().find(|(s, _)| *s == w).map(|(_, c)| *c);
                assert_eq!(listed.unwrap_or(None), code, "column {i}, {w}");
            }
        }
        let with_values = Mapper::compile(
            "cases",
            &s,
            &mapping("[ageBroad]\nconvert = \"age_to_band\"\nvalues = { \"200\" = \"48+\" }"),
        )
        .unwrap();
        assert!(!with_values.integers_known(1, &s.columns[1]));
    }

    #[test]
    fn bad_mappings_are_config_errors_naming_the_key() {
        let s = schema();
        for (text, says) in [
            ("[gendr]\nfrom = \"sex\"", "did you mean \"gender\""),
            (
                "[gender]\nvalues = { F = \"Femal\" }",
                "values maps \"F\" to \"Femal\"",
            ),
            ("[gender]\nconvert = \"age_to_band\"", "age bands"),
            ("[citizenship]\nconvert = \"age_to_majority\"", "Adult"),
            ("[gender]\nconvert = \"country_to_iso2\"", "alpha-2"),
            ("[gender]\nfrom = \" \"", "`from` is empty"),
            (
                "[gender]\nvalues = { f = \"Female\", F = \"Male\" }",
                "twice",
            ),
        ] {
            let e = Mapper::compile("cases", &s, &mapping(text)).unwrap_err();
            assert!(e.contains(says), "{says}: {e}");
        }
        assert!(toml::from_str::<Mapping>("[gender]\nunmapped = \"drop\"").is_err());
        // A person identifier can be renamed, and stays required.
        let person = s.clone().with_person_unit("caseId", 2).unwrap();
        let e = Mapper::compile(
            "cases",
            &person,
            &mapping("[caseId]\nvalues = { a = \"b\" }"),
        )
        .unwrap_err();
        assert!(e.contains("can only be renamed"), "{e}");
        let m = Mapper::compile("cases", &person, &mapping("[caseId]\nfrom = \"id\"")).unwrap();
        let last = person.columns.len() - 1;
        assert_eq!((m.source(last), m.is_mapped(last)), ("id", false));
        assert_eq!(m.map(last, &person.columns[last], ""), None);
    }

    /// The generated table: unique codes, and no name for two countries.
    #[test]
    fn the_country_table_is_consistent() {
        assert_eq!(countries::COUNTRIES.len(), 249);
        let mut names = HashMap::new();
        let mut codes = std::collections::HashSet::new();
        for (a2, a3, ns) in countries::COUNTRIES {
            assert!(a2.len() == 2 && a3.len() == 3 && a2.chars().all(|c| c.is_ascii_uppercase()));
            assert!(codes.insert(*a2) && codes.insert(*a3));
            for n in ns.iter() {
                assert_eq!(*names.entry(normalise(n)).or_insert(*a2), *a2, "{n}");
            }
        }
        for (alias, a2) in countries::ALIASES {
            assert!(codes.contains(a2));
            assert!(names.insert(normalise(alias), *a2).is_none(), "{alias}");
        }
        for (name, a2) in [
            ("Philippines", "PH"),
            ("Viet Nam", "VN"),
            ("Moldova", "MD"),
            ("Myanmar", "MM"),
            ("United States", "US"),
            ("Türkiye", "TR"),
        ] {
            assert_eq!(names[&normalise(name)], a2);
        }
    }
}
