//! The federation's data standard: one shared, versioned data dictionary
//! (datasets, columns, types, domains, bounds, bins, privacy unit) that
//! every partner's node follows, so that the coordinator adds up cells
//! that mean the same thing on every node.
//!
//! A standard is a TOML file (`deploy/standards/ctdc-cases-1.0.toml` is the
//! shipped, CTDC-shaped one):
//!
//! ```toml
//! name = "ctdc-cases"
//! version = "1.1"
//! description = "..."
//!
//! [[datasets]]
//! name = "cases"
//! # [datasets.privacy_unit] person_column = "...", max_records = 3
//!
//! [[datasets.columns]]
//! name = "gender"
//! type = "categorical"
//! domain = ["Female", "Male", "Trans/Transgender/NonConforming"]
//! description = "as recorded by the partner"
//! ```
//!
//! Columns are declared exactly as in `node.toml` (plus a free-text
//! `description`) and validated by the same [`Schema::from_specs`].
//!
//! **Versions** are `MAJOR.MINOR`. A minor version may only add (a column, a
//! category); a major version may change anything. The coordinator combines
//! nodes whose standards have the same name and major version, and only
//! over the columns the query reads that every node declares identically
//! (see the coordinator's `standard` module); it never trusts the version
//! alone.
//!
//! **Digest** ([`Standard::digest`]): the hex SHA-256 of the UTF-8 bytes of
//! the standard's canonical form ([`Standard::canonical`]): compact JSON
//! (no whitespace, `serde_json`'s escaping), keys in this order and absent
//! keys left out:
//! `{"format":"fedq-standard-1","name":N,"version":"M.m","datasets":[{"name":D,
//! "privacy_unit":"record" | {"person_column":P,"max_records":K},
//! "columns":[{"name":C,"type":"categorical","domain":[...]} |
//! {"name":C,"type":"categorical","open":true} |
//! {"name":C,"type":"integer","min":A,"max":B,"bins":n} |
//! {"name":C,"type":"boolean"}, ...]}, ...]}`, datasets and columns in the
//! file's order, `bins` the effective number (declared or default). Only
//! what changes a cell's meaning is in it: descriptions, comments, key
//! order and layout are not, so two files with the same digest code every
//! value the same way.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::schema::{Column, ColumnSpec, ColumnType, Schema};

/// Tag of the canonical form; changes if the form ever does.
pub const CANONICAL_FORMAT: &str = "fedq-standard-1";

/// A `MAJOR.MINOR` version of a standard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Changes when a column or value changes meaning or disappears:
    /// nodes on different majors are never combined.
    pub major: u32,
    /// Changes when columns or categories are only added.
    pub minor: u32,
}

impl Version {
    /// Parses `"1.1"`. Errors say what was expected.
    pub fn parse(text: &str) -> Result<Version, String> {
        let bad = || {
            format!(
                "version {:?} is not MAJOR.MINOR (two whole numbers, e.g. \"1.0\")",
                crate::schema::excerpt(text)
            )
        };
        let (a, b) = text.split_once('.').ok_or_else(bad)?;
        let num = |s: &str| {
            (!s.is_empty() && s.len() <= 9 && s.bytes().all(|c| c.is_ascii_digit()))
                .then(|| s.parse::<u32>().ok())
                .flatten()
        };
        Ok(Version {
            major: num(a).ok_or_else(bad)?,
            minor: num(b).ok_or_else(bad)?,
        })
    }

    /// Whether nodes on `self` and `other` may be combined at all: the
    /// same major version.
    pub fn compatible(&self, other: &Version) -> bool {
        self.major == other.major
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A standard file as written (before validation).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StandardFile {
    name: String,
    version: String,
    #[serde(default)]
    description: String,
    datasets: Vec<DatasetFile>,
}

/// `[[datasets]]` of a standard file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasetFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    privacy_unit: Option<PrivacyUnit>,
    columns: Vec<ColumnFile>,
}

/// `[[datasets.columns]]` of a standard file: a `node.toml` column with a
/// description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnFile {
    name: String,
    #[serde(rename = "type")]
    kind: ColumnType,
    #[serde(default)]
    domain: Option<Vec<String>>,
    #[serde(default)]
    min: Option<i64>,
    #[serde(default)]
    max: Option<i64>,
    #[serde(default)]
    open: Option<bool>,
    #[serde(default)]
    bins: Option<u32>,
    #[serde(default)]
    description: String,
}

/// A person-level privacy unit as a standard declares it (the same as
/// `node.toml`'s `[datasets.privacy_unit]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyUnit {
    /// Header of the column identifying the person.
    pub person_column: String,
    /// Records counted per person.
    pub max_records: u32,
}

/// A validated standard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standard {
    /// The standard's name, e.g. `ctdc-cases`.
    pub name: String,
    /// Its version.
    pub version: Version,
    /// Free text.
    pub description: String,
    /// Its datasets, in the file's order.
    pub datasets: Vec<StandardDataset>,
}

/// One dataset of a standard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandardDataset {
    /// The dataset's name (a node serves it under its own name).
    pub name: String,
    /// Free text.
    pub description: String,
    /// The columns exactly as a `node.toml` would declare them.
    pub columns: Vec<ColumnSpec>,
    /// Each column's description, by position.
    pub column_descriptions: Vec<String>,
    /// The person-level privacy unit, if the standard declares one.
    pub privacy_unit: Option<PrivacyUnit>,
    /// The validated schema (person identifier last, when declared).
    pub schema: Schema,
}

/// What a node states about the standard one of its datasets follows
/// (`Describe`): enough for a coordinator to compare nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    /// The standard's name.
    pub name: String,
    /// Its version.
    pub version: Version,
    /// Its digest ([`Standard::digest`]).
    pub digest: String,
}

impl Standard {
    /// Reads and validates a standard file. Errors name the file and, for
    /// TOML errors, the line.
    pub fn load(path: &Path) -> Result<Standard, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read standard file {}: {e}", path.display()))?;
        Standard::parse(&text).map_err(|e| format!("standard file {}: {e}", path.display()))
    }

    /// Parses and validates a standard's TOML text.
    pub fn parse(text: &str) -> Result<Standard, String> {
        let file: StandardFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let name_ok = !file.name.is_empty()
            && file.name.len() <= 100
            && file
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(format!(
                "name {:?} must be 1 to 100 letters, digits, '-', '_' or '.'",
                crate::schema::excerpt(&file.name)
            ));
        }
        let version = Version::parse(&file.version)?;
        if file.datasets.is_empty() {
            return Err("the standard declares no [[datasets]]".into());
        }
        let mut datasets: Vec<StandardDataset> = Vec::with_capacity(file.datasets.len());
        for d in file.datasets {
            if datasets.iter().any(|o| o.name == d.name) {
                return Err(format!("dataset {:?} is declared twice", d.name));
            }
            if d.name.is_empty()
                || !d
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(format!(
                    "dataset name {:?} must be non-empty and use only letters, digits and '_'",
                    d.name
                ));
            }
            let columns: Vec<ColumnSpec> = d
                .columns
                .iter()
                .map(|c| ColumnSpec {
                    name: c.name.clone(),
                    kind: c.kind,
                    domain: c.domain.clone(),
                    min: c.min,
                    max: c.max,
                    open: c.open,
                    bins: c.bins,
                })
                .collect();
            let mut schema = Schema::from_specs(&d.name, &columns)?;
            if let Some(u) = &d.privacy_unit {
                schema = schema
                    .with_person_unit(&u.person_column, u.max_records)
                    .map_err(|e| format!("dataset {:?}: {e}", d.name))?;
            }
            datasets.push(StandardDataset {
                name: d.name,
                description: d.description,
                column_descriptions: d.columns.into_iter().map(|c| c.description).collect(),
                columns,
                privacy_unit: d.privacy_unit,
                schema,
            });
        }
        Ok(Standard {
            name: file.name,
            version,
            description: file.description,
            datasets,
        })
    }

    /// The dataset named `name`, or an error listing the standard's.
    pub fn dataset(&self, name: &str) -> Result<&StandardDataset, String> {
        self.datasets
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| {
                format!(
                    "standard {} {} has no dataset {name:?} (it has: {})",
                    self.name,
                    self.version,
                    self.datasets
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// The canonical form the digest is computed over (see the module doc),
    /// written by hand so that key order never depends on a JSON library's
    /// map type; strings are escaped by `serde_json`.
    pub fn canonical(&self) -> String {
        let datasets: Vec<String> = self
            .datasets
            .iter()
            .map(|d| {
                let unit = match &d.privacy_unit {
                    None => "\"record\"".to_string(),
                    Some(u) => format!(
                        "{{\"person_column\":{},\"max_records\":{}}}",
                        json_str(&u.person_column),
                        u.max_records
                    ),
                };
                let columns: Vec<String> = d
                    .schema
                    .columns
                    .iter()
                    .filter(|c| !matches!(c, Column::PersonId { .. }))
                    .map(canonical_column)
                    .collect();
                format!(
                    "{{\"name\":{},\"privacy_unit\":{unit},\"columns\":[{}]}}",
                    json_str(&d.name),
                    columns.join(",")
                )
            })
            .collect();
        format!(
            "{{\"format\":{},\"name\":{},\"version\":{},\"datasets\":[{}]}}",
            json_str(CANONICAL_FORMAT),
            json_str(&self.name),
            json_str(&self.version.to_string()),
            datasets.join(",")
        )
    }

    /// Hex SHA-256 of [`Standard::canonical`].
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.canonical().as_bytes()))
    }

    /// What a node following this standard states about it.
    pub fn followed(&self) -> Followed {
        Followed {
            name: self.name.clone(),
            version: self.version,
            digest: self.digest(),
        }
    }
}

/// A JSON string literal, escaped as `serde_json` does.
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// One column in the canonical form.
fn canonical_column(c: &Column) -> String {
    match c {
        Column::Categorical { name, domain } => format!(
            "{{\"name\":{},\"type\":\"categorical\",\"domain\":[{}]}}",
            json_str(name),
            domain
                .iter()
                .map(|d| json_str(d))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Column::Open { name } => format!(
            "{{\"name\":{},\"type\":\"categorical\",\"open\":true}}",
            json_str(name)
        ),
        Column::Integer {
            name,
            min,
            max,
            bins,
        } => format!(
            "{{\"name\":{},\"type\":\"integer\",\"min\":{min},\"max\":{max},\"bins\":{bins}}}",
            json_str(name)
        ),
        Column::Boolean { name } => {
            format!("{{\"name\":{},\"type\":\"boolean\"}}", json_str(name))
        }
        // Filtered out by the caller: the privacy unit names it.
        Column::PersonId { name } => {
            format!("{{\"name\":{},\"type\":\"person\"}}", json_str(name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../../deploy/standards/ctdc-cases-1.0.toml");

    #[test]
    fn the_shipped_standard_parses_and_its_digest_ignores_layout_and_descriptions() {
        let s = Standard::parse(SHIPPED).unwrap();
        assert_eq!(s.name, "ctdc-cases");
        assert_eq!(s.version, Version { major: 1, minor: 0 });
        let cases = s.dataset("cases").unwrap();
        assert_eq!(cases.columns.len(), 25);
        assert!(s.canonical().starts_with(
            "{\"format\":\"fedq-standard-1\",\"name\":\"ctdc-cases\",\"version\":\"1.0\",\"datasets\":[{\"name\":\"cases\",\"privacy_unit\":\"record\",\"columns\":[{\"name\":\"yearOfRegistration\",\"type\":\"integer\",\"min\":2002,\"max\":2025,\"bins\":24}"
        ), "{}", s.canonical());
        let d = s.digest();
        assert_eq!(d.len(), 64);
        // Comments, descriptions and an explicit default bins change nothing.
        let edited = SHIPPED
            .replace(
                "description = \"gender of the victim as recorded\"",
                "description = \"other words\"",
            )
            .replace("min = 2002\n", "min = 2002\nbins = 24\n")
            .replace("# Missing values", "#  another comment\n# Missing values");
        assert_ne!(edited, SHIPPED);
        assert_eq!(Standard::parse(&edited).unwrap().digest(), d);
        // A new category, other bounds or a new version change it.
        for changed in [
            SHIPPED.replace("\"Male\", ", "\"Male\", \"Unknown\", "),
            SHIPPED.replace("max = 120", "max = 240"),
            SHIPPED.replace("version = \"1.0\"", "version = \"1.1\""),
        ] {
            assert_ne!(Standard::parse(&changed).unwrap().digest(), d);
        }
    }

    #[test]
    fn bad_standards_are_refused_with_what_to_fix() {
        for (text, says) in [
            (
                SHIPPED.replace("version = \"1.0\"", "version = \"1\""),
                "MAJOR.MINOR",
            ),
            (
                SHIPPED.replace("version = \"1.0\"", "version = \"1.x\""),
                "MAJOR.MINOR",
            ),
            (
                SHIPPED.replace("name = \"ctdc-cases\"", "name = \"ctdc cases\""),
                "letters, digits",
            ),
            (SHIPPED.replace("max = 120", "max = -1"), "greater than max"),
            (SHIPPED.replace("\"Male\", ", "\"Female\", "), "twice"),
            (
                SHIPPED.replace("type = \"boolean\"", "type = \"flag\""),
                "unknown variant",
            ),
            (
                SHIPPED.replace("description = \"1 if", "descripton = \"1 if"),
                "unknown field",
            ),
        ] {
            let e = Standard::parse(&text).unwrap_err();
            assert!(e.contains(says), "{says}: {e}");
        }
        let e = Standard::parse(SHIPPED)
            .unwrap()
            .dataset("case")
            .unwrap_err();
        assert!(e.contains("has no dataset \"case\" (it has: cases)"), "{e}");
    }

    #[test]
    fn versions_parse_order_and_compare_by_major() {
        let v = |s| Version::parse(s).unwrap();
        assert!(v("1.10") > v("1.9"));
        assert!(v("1.0").compatible(&v("1.7")));
        assert!(!v("1.0").compatible(&v("2.0")));
        assert_eq!(v("2.3").to_string(), "2.3");
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "1.2.3",
            "-1.0",
            "1.0 ",
            "99999999999.0",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?}");
        }
    }
}
