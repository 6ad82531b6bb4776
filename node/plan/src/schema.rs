//! Declared, public dataset schemas and the encoding of cell values.
//!
//! Everything the DP engine needs to bound sensitivity lives here and comes
//! from the node's configuration, never from the data (DESIGN invariant 4):
//! categorical domains, integer bounds, and the meaning of "missing".
//!
//! Cells are stored and scanned as `i64` codes: a categorical value is its
//! index in the declared domain, an integer is itself, a boolean is 0 or 1,
//! and a missing value (`-99` or an empty cell in the source) is [`MISSING`].

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Code of a missing value in every column type.
pub const MISSING: i64 = i64::MIN;

/// Source spellings of a missing value (CTDC uses `-99`).
/// `(missing)` is the label of the missing key in answers: a value spelled
/// so is missing too, so that no declared or open value can share the
/// missing cell's label (the coordinator adds cells by label).
pub const MISSING_SPELLINGS: [&str; 3] = ["", "-99", "(missing)"];

/// The type of a column as written in `node.toml` (`type = "categorical"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// A string from a declared, public, finite domain.
    Categorical,
    /// An integer with declared, public bounds.
    Integer,
    /// 0/1 (also `true`/`false`).
    Boolean,
}

/// One column as declared in `node.toml`. Kept flat (rather than an enum with
/// per-type fields) so that `deny_unknown_fields` can catch a misspelt key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// Column name, matched case-sensitively against CSV headers and SQL.
    pub name: String,
    /// The column's type.
    #[serde(rename = "type")]
    pub kind: ColumnType,
    /// Categorical only: every value the column may take, public.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<Vec<String>>,
    /// Integer only: public lower bound (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    /// Integer only: public upper bound (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    /// Categorical only: `true` declares an open domain (no `domain` list),
    /// e.g. free-text nationalities. Such a column can be filtered with
    /// `=`, `<>` and `IN`, and grouped by alone with `COUNT(*)`: the keys
    /// released are only those passing OpenDP's threshold mechanism at the
    /// dataset's `keys_delta` (see `config::BudgetLimits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<bool>,
    /// Integer only: number of equal-width bins over `[min, max]` used by
    /// `QUANTILE`/`MEDIAN` (default: one bin per value up to
    /// [`DEFAULT_BINS`] values, else [`DEFAULT_BINS`] bins). Public.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bins: Option<u32>,
}

impl ColumnSpec {
    /// A column of `kind` with nothing else declared (a flag, a person
    /// identifier; others need their domain or bounds).
    pub fn new(name: &str, kind: ColumnType) -> ColumnSpec {
        ColumnSpec {
            name: name.into(),
            kind,
            domain: None,
            min: None,
            max: None,
            open: None,
            bins: None,
        }
    }

    /// A categorical column with its domain.
    pub fn categorical(name: &str, domain: &[&str]) -> ColumnSpec {
        ColumnSpec {
            domain: Some(domain.iter().map(|d| d.to_string()).collect()),
            ..ColumnSpec::new(name, ColumnType::Categorical)
        }
    }

    /// An integer column with its bounds.
    pub fn integer(name: &str, min: i64, max: i64) -> ColumnSpec {
        ColumnSpec {
            min: Some(min),
            max: Some(max),
            ..ColumnSpec::new(name, ColumnType::Integer)
        }
    }
}

/// Quantile bins of an integer column that declares none.
pub const DEFAULT_BINS: u64 = 100;

/// Most keys a GROUP BY of an integer column may have: one per value of
/// its declared bounds (a year of registration has a few dozen; wider
/// columns are grouped with HISTOGRAM(col, k) instead).
pub const MAX_INTEGER_GROUP_KEYS: u64 = 1000;

/// Most bins a column may declare or a `HISTOGRAM` may ask for.
pub const MAX_BINS: u64 = 10_000;

/// A validated column: the declaration with its type-specific facts checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// A categorical column and its domain (no duplicates, non-empty).
    Categorical {
        /// Column name.
        name: String,
        /// The declared domain, in declaration order.
        domain: Vec<String>,
    },
    /// An integer column and its inclusive bounds (`min <= max`).
    Integer {
        /// Column name.
        name: String,
        /// Declared lower bound.
        min: i64,
        /// Declared upper bound.
        max: i64,
        /// Declared quantile bins (equal width over `[min, max]`).
        bins: u64,
    },
    /// A categorical column with an open (undeclared) domain. A value is
    /// stored as its [`open_code`], a 63-bit hash, so queries need no
    /// dictionary; the labels of the values seen at ingest are stored
    /// beside the rows, and shown only for keys a threshold released.
    Open {
        /// Column name.
        name: String,
    },
    /// A 0/1 column.
    Boolean {
        /// Column name.
        name: String,
    },
    /// The person identifier of a dataset that declares a person-level
    /// privacy unit. Stored as a 63-bit hash of the identifier; never
    /// selectable, filterable or groupable.
    PersonId {
        /// Column name.
        name: String,
    },
}

/// The candidate closest to `written`, if it is close enough to be what
/// was meant: a case-insensitive match, or at most two edits away (one for
/// short names).
pub fn closest<'a>(written: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let lower = written.to_lowercase();
    let limit = if written.chars().count() <= 4 { 1 } else { 2 };
    candidates
        .map(|c| (strsim::levenshtein(&lower, &c.to_lowercase()), c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

impl Column {
    /// The column's name.
    pub fn name(&self) -> &str {
        match self {
            Column::Categorical { name, .. }
            | Column::Open { name }
            | Column::Integer { name, .. }
            | Column::Boolean { name }
            | Column::PersonId { name } => name,
        }
    }

    /// What kind of column it is, for error messages: "a category",
    /// "an integer column", ...
    pub fn kind_name(&self) -> &'static str {
        match self {
            Column::Categorical { .. } | Column::Open { .. } => "a category",
            Column::Integer { .. } => "an integer column",
            Column::Boolean { .. } => "a flag",
            Column::PersonId { .. } => "the person identifier",
        }
    }

    /// A short description of what a cell of this column may hold, used in
    /// ingest and SQL error messages.
    pub fn expectation(&self) -> String {
        match self {
            Column::Categorical { domain, .. } => {
                format!("one of {}", quote_list(domain))
            }
            Column::Integer { min, max, .. } => {
                format!("an integer from {min} to {max}")
            }
            Column::Boolean { .. } => "0, 1, true or false".to_string(),
            Column::Open { .. } => {
                format!("any text of at most {MAX_OPEN_VALUE_BYTES} bytes")
            }
            Column::PersonId { .. } => {
                return "a person identifier (every record needs one)".to_string()
            }
        }
        .to_string()
            + ", or -99/empty for missing"
    }

    /// Parses one source cell into its code. Errors say what was expected.
    pub fn encode(&self, raw: &str) -> Result<i64, String> {
        let cell = raw.trim();
        if let Column::PersonId { .. } = self {
            if MISSING_SPELLINGS.contains(&cell) {
                return Err(
                    "the person identifier is missing; with a person-level privacy unit every record needs one"
                        .to_string(),
                );
            }
            return Ok(person_code(cell));
        }
        if MISSING_SPELLINGS.contains(&cell) {
            return Ok(MISSING);
        }
        match self {
            Column::Categorical { domain, .. } => domain
                .iter()
                .position(|d| d == cell)
                .map(|i| i as i64)
                .ok_or_else(|| format!("{} is not in the declared domain", excerpt(cell))),
            Column::Integer { min, max, .. } => {
                let v: i64 = cell
                    .parse()
                    .map_err(|_| format!("{} is not an integer", excerpt(cell)))?;
                if v < *min || v > *max {
                    return Err(format!("{v} is outside the declared bounds [{min}, {max}]"));
                }
                Ok(v)
            }
            Column::Boolean { .. } => parse_bool(cell)
                .map(i64::from)
                .ok_or_else(|| format!("{} is not a boolean", excerpt(cell))),
            Column::Open { .. } => {
                if cell.len() > MAX_OPEN_VALUE_BYTES {
                    return Err(format!(
                        "the value is {} bytes long, more than {MAX_OPEN_VALUE_BYTES}",
                        cell.len()
                    ));
                }
                if cell.chars().any(char::is_control) {
                    return Err("the value contains a control character".to_string());
                }
                Ok(open_code(cell))
            }
            Column::PersonId { .. } => unreachable!("handled above"),
        }
    }

    /// Number of GROUP BY keys besides (missing): the declared domain of a
    /// categorical or boolean column, or one key per value of an integer
    /// column's declared bounds when there are at most
    /// [`MAX_INTEGER_GROUP_KEYS`]; `None` when the column cannot be grouped
    /// by (open domains are grouped by their own mechanism).
    pub fn group_size(&self) -> Option<usize> {
        match self {
            Column::Integer { min, max, .. } => {
                let n = (max - min) as u64 + 1;
                (n <= MAX_INTEGER_GROUP_KEYS).then_some(n as usize)
            }
            _ => self.domain_size(),
        }
    }

    /// Number of distinct group-by keys (categorical and boolean only).
    pub fn domain_size(&self) -> Option<usize> {
        match self {
            Column::Categorical { domain, .. } => Some(domain.len()),
            Column::Boolean { .. } => Some(2),
            Column::Integer { .. } | Column::PersonId { .. } | Column::Open { .. } => None,
        }
    }

    /// The printable label of group-by key `code`.
    pub fn key_label(&self, code: usize) -> String {
        match self {
            Column::Categorical { domain, .. } => domain[code].clone(),
            // Keys are offsets from the lower bound.
            Column::Integer { min, .. } => (min + code as i64).to_string(),
            Column::Boolean { .. } | Column::PersonId { .. } | Column::Open { .. } => {
                code.to_string()
            }
        }
    }
}

/// Code of a person identifier: the first 63 bits of its SHA-256, so the
/// store never holds the identifier itself. Two persons colliding would
/// only share one contribution bound (more protection, never less).
pub fn person_code(id: &str) -> i64 {
    let d = Sha256::digest(id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(b) >> 1) as i64
}

/// Characters of an offending input that an error message quotes.
pub const EXCERPT_CHARS: usize = 64;

/// `text` quoted for an error message, cut to [`EXCERPT_CHARS`] characters
/// with an ellipsis and its length when longer: a 10 MB cell must not make
/// a 10 MB message (issue 16, item 12), and the start is enough to find it.
pub fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
    }
}

/// Longest value an open-domain column accepts at ingest, in bytes.
pub const MAX_OPEN_VALUE_BYTES: usize = 200;

/// Code of a value of an open-domain column (the value trimmed): the first
/// 63 bits of the SHA-256 of a domain-separated rendering, so WHERE
/// literals can be coded without the data. Two values colliding would
/// only merge their keys (probability about n^2 / 2^64).
pub fn open_code(value: &str) -> i64 {
    let d = Sha256::digest([b"fedq-open\0", value.as_bytes()].concat());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(b) >> 1) as i64
}

/// The unit of privacy of a dataset declaring one: a person, with at most
/// `max_records` records counted per person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersonUnit {
    /// Index of the [`Column::PersonId`] column.
    pub column: usize,
    /// Records kept per person; the rest are dropped before aggregation.
    pub max_records: u32,
}

/// Parses the boolean spellings we accept in CSV files and SQL literals.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn quote_list(items: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = items
        .iter()
        .take(SHOWN)
        .map(|d| format!("{d:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(" (and {} more)", items.len() - SHOWN));
    }
    s
}

/// A dataset's validated schema: its columns, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    /// Columns in declaration order; CSV headers may come in any order.
    /// A person identifier, when declared, comes last.
    pub columns: Vec<Column>,
    /// The person-level privacy unit, if the dataset declares one; else
    /// the unit is one record.
    pub person: Option<PersonUnit>,
    /// Public lookup tables the dataset declares, joinable by key like the
    /// built-in ones ([`crate::lookup`]); published in `Describe`. Not
    /// part of [`Schema::digest`]: they change no stored code.
    pub lookups: Vec<crate::lookup::Lookup>,
}

impl Schema {
    /// Validates declarations: unique names, non-empty duplicate-free
    /// domains, `min <= max`, no fields that do not belong to the type.
    pub fn from_specs(dataset: &str, specs: &[ColumnSpec]) -> Result<Schema, String> {
        if specs.is_empty() {
            return Err(format!("dataset {dataset:?} declares no columns"));
        }
        let mut columns = Vec::with_capacity(specs.len());
        for spec in specs {
            let at = format!("dataset {dataset:?}, column {:?}", spec.name);
            if spec.name.trim().is_empty() {
                return Err(format!("dataset {dataset:?}: a column has an empty name"));
            }
            if columns.iter().any(|c: &Column| c.name() == spec.name) {
                return Err(format!("{at}: declared twice"));
            }
            let col = match spec.kind {
                ColumnType::Categorical => {
                    if spec.bins.is_some() {
                        return Err(format!("{at}: bins apply to integer columns only"));
                    }
                    if spec.min.is_some() || spec.max.is_some() {
                        return Err(format!("{at}: min/max apply to integer columns only"));
                    }
                    if spec.open == Some(true) {
                        if spec.domain.is_some() {
                            return Err(format!(
                                "{at}: an open column declares no domain; remove `domain` or `open = true`"
                            ));
                        }
                        columns.push(Column::Open {
                            name: spec.name.clone(),
                        });
                        continue;
                    }
                    let domain = spec.domain.clone().ok_or_else(|| {
                        format!("{at}: a categorical column needs `domain = [...]` (or `open = true` for an open domain, whose keys are released by a threshold)")
                    })?;
                    if domain.is_empty() {
                        return Err(format!("{at}: the domain is empty"));
                    }
                    for (i, d) in domain.iter().enumerate() {
                        if domain[..i].contains(d) {
                            return Err(format!("{at}: {d:?} appears twice in the domain"));
                        }
                        if MISSING_SPELLINGS.contains(&d.trim()) {
                            return Err(format!(
                                "{at}: {d:?} is reserved for missing values and cannot be in a domain"
                            ));
                        }
                    }
                    if domain.len() > u16::MAX as usize {
                        return Err(format!("{at}: domains are limited to 65535 values"));
                    }
                    Column::Categorical {
                        name: spec.name.clone(),
                        domain,
                    }
                }
                ColumnType::Integer | ColumnType::Boolean if spec.open.is_some() => {
                    return Err(format!("{at}: `open` applies to categorical columns only"));
                }
                ColumnType::Integer => {
                    if spec.domain.is_some() {
                        return Err(format!("{at}: domain applies to categorical columns only"));
                    }
                    let (Some(min), Some(max)) = (spec.min, spec.max) else {
                        return Err(format!(
                            "{at}: an integer column needs public bounds `min` and `max`"
                        ));
                    };
                    if min > max {
                        return Err(format!("{at}: min ({min}) is greater than max ({max})"));
                    }
                    // Keep every possible sum of a million clamped values far
                    // from i64 overflow.
                    const LIMIT: i64 = 1 << 40;
                    if min < -LIMIT || max > LIMIT {
                        return Err(format!("{at}: bounds must lie within ±2^40"));
                    }
                    let values = (max - min) as u64 + 1;
                    let bins = match spec.bins {
                        None => values.min(DEFAULT_BINS),
                        Some(b) if b == 0 || u64::from(b) > values.min(MAX_BINS) => {
                            return Err(format!(
                                "{at}: bins must be from 1 to {} (the number of values in [{min}, {max}], at most {MAX_BINS})",
                                values.min(MAX_BINS)
                            ))
                        }
                        Some(b) => u64::from(b),
                    };
                    Column::Integer {
                        name: spec.name.clone(),
                        min,
                        max,
                        bins,
                    }
                }
                ColumnType::Boolean => {
                    if spec.domain.is_some()
                        || spec.min.is_some()
                        || spec.max.is_some()
                        || spec.bins.is_some()
                    {
                        return Err(format!("{at}: a boolean column takes no domain or bounds"));
                    }
                    Column::Boolean {
                        name: spec.name.clone(),
                    }
                }
            };
            columns.push(col);
        }
        Ok(Schema {
            columns,
            person: None,
            lookups: Vec::new(),
        })
    }

    /// Declares the dataset's public lookup tables (each validated by
    /// [`crate::lookup::Lookup::new`]): their names must differ from each
    /// other's and from the built-in tables' (case-insensitively).
    pub fn with_lookups(mut self, lookups: Vec<crate::lookup::Lookup>) -> Result<Schema, String> {
        for (i, t) in lookups.iter().enumerate() {
            if lookups[..i]
                .iter()
                .any(|o| o.name.eq_ignore_ascii_case(&t.name))
            {
                return Err(format!("lookup table {:?} is declared twice", t.name));
            }
            if crate::lookup::public_table(&t.name).is_some() {
                return Err(format!(
                    "lookup table {:?} has a built-in table's name; choose another",
                    t.name
                ));
            }
        }
        self.lookups = lookups;
        Ok(self)
    }

    /// The lookup table a query may join as `name`: the dataset's own
    /// first, then a built-in one.
    pub fn lookup(&self, name: &str) -> Option<crate::lookup::Lookup> {
        self.lookups
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
            .cloned()
            .or_else(|| crate::lookup::public_table(name).map(|t| t.to_lookup()))
    }

    /// The names of every table a query may join.
    pub fn lookup_names(&self) -> Vec<String> {
        self.lookups
            .iter()
            .map(|t| t.name.clone())
            .chain(
                crate::lookup::PUBLIC_TABLES
                    .iter()
                    .map(|t| t.name.to_string()),
            )
            .collect()
    }

    /// Declares a person-level privacy unit: `column` (a CSV header, not
    /// among the declared columns) identifies the person, and at most
    /// `max_records` records per person count in any aggregate.
    pub fn with_person_unit(mut self, column: &str, max_records: u32) -> Result<Schema, String> {
        if column.trim().is_empty() {
            return Err("privacy_unit.person_column is empty".to_string());
        }
        if self.index_of(column).is_some() {
            return Err(format!(
                "privacy_unit.person_column {column:?} is also declared as a column; the person identifier must not be queryable, remove it from the columns"
            ));
        }
        if max_records == 0 || max_records > 1_000 {
            return Err(format!(
                "privacy_unit.max_records must be from 1 to 1000, not {max_records}"
            ));
        }
        self.columns.push(Column::PersonId {
            name: column.to_string(),
        });
        self.person = Some(PersonUnit {
            column: self.columns.len() - 1,
            max_records,
        });
        Ok(self)
    }

    /// Records one privacy unit may contribute: the person bound, or 1.
    pub fn contribution_bound(&self) -> i64 {
        self.person.map_or(1, |p| i64::from(p.max_records))
    }

    /// The index of a column by exact name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name() == name)
    }

    /// A column by exact name, or an error listing the declared names and
    /// suggesting a case-insensitive match.
    pub fn column(&self, name: &str) -> Result<(usize, &Column), String> {
        if let Some(i) = self.index_of(name) {
            if let Column::PersonId { .. } = self.columns[i] {
                return Err(format!(
                    "{name} is the person identifier of this dataset's privacy unit; it cannot be selected, filtered or grouped by"
                ));
            }
            return Ok((i, &self.columns[i]));
        }
        let names = self
            .columns
            .iter()
            .filter(|c| !matches!(c, Column::PersonId { .. }))
            .map(Column::name);
        let hint = match self
            .columns
            .iter()
            .find(|c| c.name().eq_ignore_ascii_case(name))
        {
            Some(c) => format!(" (did you mean {:?}? names are case-sensitive)", c.name()),
            None => closest(name, names)
                .map(|c| format!(" (did you mean {c:?}?)"))
                .unwrap_or_default(),
        };
        Err(format!(
            "unknown column {name:?}{hint}; declared columns: {}",
            self.columns
                .iter()
                .filter(|c| !matches!(c, Column::PersonId { .. }))
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// SHA-256 over a canonical rendering of the schema. Stored with the
    /// data so a node never scans codes under a schema they were not
    /// encoded with.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for c in &self.columns {
            match c {
                Column::Categorical { name, domain } => {
                    h.update(format!("c\0{name}\0{}\0", domain.len()));
                    for d in domain {
                        h.update(d.as_bytes());
                        h.update([0u8]);
                    }
                }
                // Bins change no stored code, so they are not part of the
                // digest (a partner may re-declare them).
                Column::Integer { name, min, max, .. } => {
                    h.update(format!("i\0{name}\0{min}\0{max}\0"))
                }
                Column::Boolean { name } => h.update(format!("b\0{name}\0")),
                Column::Open { name } => h.update(format!("o\0{name}\0")),
                Column::PersonId { name } => h.update(format!("p\0{name}\0")),
            }
        }
        hex::encode(h.finalize())
    }

    /// The public schema as sent in `Describe`.
    pub fn to_proto(&self) -> Vec<fedq_proto::v1::ColumnSchema> {
        use fedq_proto::v1::{column_schema::Kind, *};
        self.columns
            .iter()
            .filter(|c| !matches!(c, Column::PersonId { .. }))
            .map(|c| ColumnSchema {
                name: c.name().to_string(),
                kind: Some(match c {
                    Column::Categorical { domain, .. } => Kind::Categorical(CategoricalColumn {
                        domain: domain.clone(),
                        open: false,
                    }),
                    Column::Open { .. } => Kind::Categorical(CategoricalColumn {
                        domain: Vec::new(),
                        open: true,
                    }),
                    Column::Integer { min, max, bins, .. } => Kind::Integer(IntegerColumn {
                        min: *min,
                        max: *max,
                        bins: *bins,
                    }),
                    Column::Boolean { .. } | Column::PersonId { .. } => {
                        Kind::Boolean(BooleanColumn {})
                    }
                }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, kind: ColumnType) -> ColumnSpec {
        ColumnSpec::new(name, kind)
    }

    #[test]
    fn encodes_each_type_and_missing() {
        let mut g = spec("gender", ColumnType::Categorical);
        g.domain = Some(vec!["Female".into(), "Male".into()]);
        let mut m = spec("months", ColumnType::Integer);
        m.min = Some(0);
        m.max = Some(120);
        let s = Schema::from_specs("d", &[g, m, spec("flag", ColumnType::Boolean)]).unwrap();
        assert_eq!(s.columns[0].encode("Male"), Ok(1));
        assert_eq!(s.columns[0].encode("-99"), Ok(MISSING));
        assert!(s.columns[0].encode("male").unwrap_err().contains("domain"));
        assert_eq!(s.columns[1].encode(" 7 "), Ok(7));
        assert!(s.columns[1].encode("121").unwrap_err().contains("[0, 120]"));
        assert!(s.columns[1].encode("x").is_err());
        assert_eq!(s.columns[2].encode("true"), Ok(1));
        assert_eq!(s.columns[2].encode(""), Ok(MISSING));
        assert!(s.columns[2].encode("2").is_err());
    }

    #[test]
    fn rejects_bad_declarations() {
        let no_bounds = spec("m", ColumnType::Integer);
        assert!(Schema::from_specs("d", &[no_bounds])
            .unwrap_err()
            .contains("min"));
        let mut dup = spec("g", ColumnType::Categorical);
        dup.domain = Some(vec!["a".into(), "a".into()]);
        assert!(Schema::from_specs("d", &[dup])
            .unwrap_err()
            .contains("twice"));
        let b = spec("b", ColumnType::Boolean);
        assert!(Schema::from_specs("d", &[b.clone(), b])
            .unwrap_err()
            .contains("twice"));
        // The missing key's label cannot be a declared value: two cells
        // would share it, and a coordinator would add them together.
        let mut m = spec("g", ColumnType::Categorical);
        m.domain = Some(vec!["a".into(), "(missing)".into()]);
        assert!(Schema::from_specs("d", &[m])
            .unwrap_err()
            .contains("reserved for missing"));
    }

    #[test]
    fn unknown_column_suggests_case() {
        let s = Schema::from_specs("d", &[spec("isForcedLabour", ColumnType::Boolean)]).unwrap();
        let e = s.column("isforcedlabour").unwrap_err();
        assert!(e.contains("did you mean \"isForcedLabour\""), "{e}");
    }
}
