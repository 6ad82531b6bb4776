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
pub const MISSING_SPELLINGS: [&str; 2] = ["", "-99"];

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
}

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
    },
    /// A 0/1 column.
    Boolean {
        /// Column name.
        name: String,
    },
}

impl Column {
    /// The column's name.
    pub fn name(&self) -> &str {
        match self {
            Column::Categorical { name, .. }
            | Column::Integer { name, .. }
            | Column::Boolean { name } => name,
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
        }
        .to_string()
            + ", or -99/empty for missing"
    }

    /// Parses one source cell into its code. Errors say what was expected.
    pub fn encode(&self, raw: &str) -> Result<i64, String> {
        let cell = raw.trim();
        if MISSING_SPELLINGS.contains(&cell) {
            return Ok(MISSING);
        }
        match self {
            Column::Categorical { domain, .. } => domain
                .iter()
                .position(|d| d == cell)
                .map(|i| i as i64)
                .ok_or_else(|| format!("{cell:?} is not in the declared domain")),
            Column::Integer { min, max, .. } => {
                let v: i64 = cell
                    .parse()
                    .map_err(|_| format!("{cell:?} is not an integer"))?;
                if v < *min || v > *max {
                    return Err(format!("{v} is outside the declared bounds [{min}, {max}]"));
                }
                Ok(v)
            }
            Column::Boolean { .. } => parse_bool(cell)
                .map(i64::from)
                .ok_or_else(|| format!("{cell:?} is not a boolean")),
        }
    }

    /// Number of distinct group-by keys (categorical and boolean only).
    pub fn domain_size(&self) -> Option<usize> {
        match self {
            Column::Categorical { domain, .. } => Some(domain.len()),
            Column::Boolean { .. } => Some(2),
            Column::Integer { .. } => None,
        }
    }

    /// The printable label of group-by key `code`.
    pub fn key_label(&self, code: usize) -> String {
        match self {
            Column::Categorical { domain, .. } => domain[code].clone(),
            Column::Boolean { .. } => code.to_string(),
            Column::Integer { .. } => code.to_string(),
        }
    }
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
    pub columns: Vec<Column>,
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
                    if spec.min.is_some() || spec.max.is_some() {
                        return Err(format!("{at}: min/max apply to integer columns only"));
                    }
                    let domain = spec.domain.clone().ok_or_else(|| {
                        format!("{at}: a categorical column needs `domain = [...]`")
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
                    Column::Integer {
                        name: spec.name.clone(),
                        min,
                        max,
                    }
                }
                ColumnType::Boolean => {
                    if spec.domain.is_some() || spec.min.is_some() || spec.max.is_some() {
                        return Err(format!("{at}: a boolean column takes no domain or bounds"));
                    }
                    Column::Boolean {
                        name: spec.name.clone(),
                    }
                }
            };
            columns.push(col);
        }
        Ok(Schema { columns })
    }

    /// The index of a column by exact name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name() == name)
    }

    /// A column by exact name, or an error listing the declared names and
    /// suggesting a case-insensitive match.
    pub fn column(&self, name: &str) -> Result<(usize, &Column), String> {
        if let Some(i) = self.index_of(name) {
            return Ok((i, &self.columns[i]));
        }
        let hint = self
            .columns
            .iter()
            .find(|c| c.name().eq_ignore_ascii_case(name))
            .map(|c| format!(" (did you mean {:?}? names are case-sensitive)", c.name()))
            .unwrap_or_default();
        Err(format!(
            "unknown column {name:?}{hint}; declared columns: {}",
            self.columns
                .iter()
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
                Column::Integer { name, min, max } => {
                    h.update(format!("i\0{name}\0{min}\0{max}\0"))
                }
                Column::Boolean { name } => h.update(format!("b\0{name}\0")),
            }
        }
        hex::encode(h.finalize())
    }

    /// The public schema as sent in `Describe`.
    pub fn to_proto(&self) -> Vec<fedq_proto::v1::ColumnSchema> {
        use fedq_proto::v1::{column_schema::Kind, *};
        self.columns
            .iter()
            .map(|c| ColumnSchema {
                name: c.name().to_string(),
                kind: Some(match c {
                    Column::Categorical { domain, .. } => Kind::Categorical(CategoricalColumn {
                        domain: domain.clone(),
                    }),
                    Column::Integer { min, max, .. } => Kind::Integer(IntegerColumn {
                        min: *min,
                        max: *max,
                    }),
                    Column::Boolean { .. } => Kind::Boolean(BooleanColumn {}),
                }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, kind: ColumnType) -> ColumnSpec {
        ColumnSpec {
            name: name.into(),
            kind,
            domain: None,
            min: None,
            max: None,
        }
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
    }

    #[test]
    fn unknown_column_suggests_case() {
        let s = Schema::from_specs("d", &[spec("isForcedLabour", ColumnType::Boolean)]).unwrap();
        let e = s.column("isforcedlabour").unwrap_err();
        assert!(e.contains("did you mean \"isForcedLabour\""), "{e}");
    }
}
