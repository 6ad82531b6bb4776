//! CSV ingest: validate every row against the declared schema, then store
//! them all in one atomic, durable commit, or store nothing.
//!
//! A dataset with a `[datasets.mapping]` reads the partner's own columns
//! and codes through it ([`fedq_engine::mapping::Mapper`]): unmapped values
//! become missing and are counted per column in the report
//! ([`IngestReport::coverage`], shown to the operator by `fedq-node
//! ingest`, never sent anywhere), or, with `unmapped = "error"`, fail the
//! whole ingest naming the file, line, column and value.
//!
//! [`dry_run`] (`fedq-node check --dataset NAME --csv FILE`) reads a file
//! by the very same code (one `validate` for both) and stores nothing: no
//! row, no audit entry, no record that the file was seen.
//!
//! Errors name the file, the line, the column and what was expected. The
//! message quotes only the offending cell of the partner's own file, on the
//! partner's own machine, and at most its first
//! [`fedq_plan::schema::EXCERPT_CHARS`] characters with its length (a 10 MB
//! cell makes a short message); ingest errors never travel to analysts.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use fedq_engine::mapping::{ColumnCoverage, CoverageCounter, Mapped, Mapper, Mapping, Unmapped};
use fedq_ledger::store::Store;
use fedq_plan::schema::{Column, Schema, MISSING};

crate::error::stage_error! {
    /// Why an ingest stored nothing: the message names the file, line, column or value at fault.
    IngestError {
    }
}

impl From<std::io::Error> for IngestError {
    fn from(e: std::io::Error) -> Self {
        IngestError::io("file operation", e)
    }
}

impl From<fedq_ledger::store::StoreError> for IngestError {
    fn from(e: fedq_ledger::store::StoreError) -> Self {
        IngestError::Refused(e.to_string())
    }
}

impl From<fedq_audit::AuditError> for IngestError {
    fn from(e: fedq_audit::AuditError) -> Self {
        IngestError::Refused(e.to_string())
    }
}

/// What an ingest did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestReport {
    /// Rows added by this ingest.
    pub rows_added: u64,
    /// Rows in the dataset after it.
    pub rows_total: u64,
    /// SHA-256 of the ingested file.
    pub file_sha256: String,
    /// CSV columns that are not declared and were not stored.
    pub ignored_columns: Vec<String>,
    /// Per declared column: where it was read from and how many cells were
    /// coded, missing, or unmapped (for the operator only).
    pub coverage: Vec<ColumnCoverage>,
}

/// Ingests `csv_path` into `dataset`. Undeclared CSV columns are ignored
/// (and reported); a declared column missing from the header, a row with
/// the wrong number of fields or any invalid cell fails the whole ingest.
/// Ingesting the same file twice is refused unless `allow_duplicate`.
pub fn ingest_csv(
    store: &Store,
    dataset: &str,
    schema: &Schema,
    csv_path: &Path,
    allow_duplicate: bool,
) -> Result<IngestReport, IngestError> {
    let mapper = Mapper::compile(dataset, schema, &Mapping::new()).map_err(IngestError::Refused)?;
    ingest_with(
        store,
        None,
        dataset,
        schema,
        &mapper,
        csv_path,
        allow_duplicate,
    )
}

/// [`ingest_csv`], logged: once the whole file is validated, and before its
/// rows are committed, an `ingested` entry (dataset and file digest, never
/// a row count) is appended to `audit` and made durable. A crash between
/// the two leaves an entry for rows that never landed (ingesting the file
/// again is then allowed and logged again), never rows without an entry.
pub fn ingest_csv_audited(
    store: &Store,
    audit: &fedq_ledger::audit::AuditLog,
    dataset: &str,
    schema: &Schema,
    csv_path: &Path,
    allow_duplicate: bool,
) -> Result<IngestReport, IngestError> {
    let mapper = Mapper::compile(dataset, schema, &Mapping::new()).map_err(IngestError::Refused)?;
    ingest_with(
        store,
        Some(audit),
        dataset,
        schema,
        &mapper,
        csv_path,
        allow_duplicate,
    )
}

/// [`ingest_csv_audited`] through the dataset's mapping: the partner's own
/// columns and codes are read as the declared ones.
pub fn ingest_mapped_audited(
    store: &Store,
    audit: &fedq_ledger::audit::AuditLog,
    dataset: &str,
    schema: &Schema,
    mapping: &Mapping,
    csv_path: &Path,
    allow_duplicate: bool,
) -> Result<IngestReport, IngestError> {
    let mapper = Mapper::compile(dataset, schema, mapping).map_err(IngestError::Refused)?;
    ingest_with(
        store,
        Some(audit),
        dataset,
        schema,
        &mapper,
        csv_path,
        allow_duplicate,
    )
}

/// What [`dry_run`] found: what an ingest of the file would add, read,
/// mapped and validated exactly as [`ingest_mapped_audited`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRunReport {
    /// Rows an ingest of the file would add.
    pub rows: u64,
    /// SHA-256 of the file.
    pub file_sha256: String,
    /// Whether this very file was already ingested into the dataset (an
    /// ingest would then be refused without `allow_duplicate`).
    pub already_ingested: bool,
    /// CSV columns that are not declared and would not be stored.
    pub ignored_columns: Vec<String>,
    /// Per declared column, as [`IngestReport::coverage`].
    pub coverage: Vec<ColumnCoverage>,
}

/// Reads `csv_path` through `mapping` exactly as [`ingest_mapped_audited`]
/// would (same parsing, mapping and validation, by the same code, failing
/// with the same errors) and stores nothing: no row, no audit entry, no
/// record of the file. `store` (when the node has one) is only asked
/// whether the file was ingested before.
pub fn dry_run(
    store: Option<&Store>,
    dataset: &str,
    schema: &Schema,
    mapping: &Mapping,
    csv_path: &Path,
) -> Result<DryRunReport, IngestError> {
    let mapper = Mapper::compile(dataset, schema, mapping).map_err(IngestError::Refused)?;
    let (bytes, file_sha256) = read_file(csv_path)?;
    let already_ingested = match store {
        Some(store) => store.was_ingested(dataset, &file_sha256)?,
        None => false,
    };
    let rows = validate(csv_path, &bytes, dataset, schema, &mapper)?;
    Ok(DryRunReport {
        rows: rows.count(),
        file_sha256,
        already_ingested,
        ignored_columns: rows.ignored_columns,
        coverage: rows.coverage,
    })
}

fn ingest_with(
    store: &Store,
    audit: Option<&fedq_ledger::audit::AuditLog>,
    dataset: &str,
    schema: &Schema,
    mapper: &Mapper,
    csv_path: &Path,
    allow_duplicate: bool,
) -> Result<IngestReport, IngestError> {
    let (bytes, file_sha256) = read_file(csv_path)?;
    if !allow_duplicate && store.was_ingested(dataset, &file_sha256)? {
        return Err(IngestError::Refused(format!(
            "{} (sha256 {file_sha256}) was already ingested into dataset {dataset:?}; \
             ingesting it again would count its records twice (pass --allow-duplicate if that is really intended); nothing was stored",
            csv_path.display()
        )));
    }
    let rows = validate(csv_path, &bytes, dataset, schema, mapper)?;
    drop(bytes);
    let rows_added = rows.count();
    if let Some(audit) = audit {
        audit
            .append(fedq_ledger::audit::Event::Ingested {
                dataset: dataset.to_string(),
                rows: None,
                rows_total: None,
                file_sha256: file_sha256.clone(),
            })
            .map_err(|e| {
                IngestError::io("logging the ingest in the audit log; nothing was stored", e)
            })?;
        audit
            .tree
            .flush()
            .map_err(|e| IngestError::io("flushing the audit log; nothing was stored", e))?;
    }
    let rows_total = store.append_rows(dataset, schema, &rows.codes, &rows.labels, &file_sha256)?;
    Ok(IngestReport {
        rows_added,
        rows_total,
        file_sha256,
        ignored_columns: rows.ignored_columns,
        coverage: rows.coverage,
    })
}

/// A file's bytes and their SHA-256 (hex).
fn read_file(csv_path: &Path) -> Result<(Vec<u8>, String), IngestError> {
    let bytes = std::fs::read(csv_path)
        .map_err(|e| IngestError::Refused(format!("cannot read {}: {e}", csv_path.display())))?;
    let file_sha256 = hex::encode(Sha256::digest(&bytes));
    Ok((bytes, file_sha256))
}

/// A file's rows, read, mapped and validated: what an ingest stores.
struct Validated {
    /// Row-major codes, one per declared column.
    codes: Vec<i64>,
    /// (column, code, text) of the open-domain values seen.
    labels: Vec<(usize, i64, String)>,
    /// Declared columns count, to turn `codes` into rows.
    width: usize,
    ignored_columns: Vec<String>,
    coverage: Vec<ColumnCoverage>,
}

impl Validated {
    fn count(&self) -> u64 {
        (self.codes.len() / self.width) as u64
    }
}

/// Reads, maps and validates every row of `bytes` (the contents of
/// `csv_path`): the one definition of what ingest (and its dry run) makes
/// of a file. Errors name the file, line, column and value, and say that
/// nothing was stored.
fn validate(
    csv_path: &Path,
    bytes: &[u8],
    dataset: &str,
    schema: &Schema,
    mapper: &Mapper,
) -> Result<Validated, IngestError> {
    let file = csv_path.display();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| IngestError::Refused(format!("{file}: cannot read the header line: {e}")))?
        .clone();
    // Position of each declared column in the CSV.
    let mut positions = Vec::with_capacity(schema.columns.len());
    for (i, col) in schema.columns.iter().enumerate() {
        let source = mapper.source(i);
        let pos = headers.iter().position(|h| h.trim() == source).ok_or_else(|| {
            if source == col.name() {
                IngestError::Refused(format!(
                    "{file}:1: the header has no column {:?}, which dataset {dataset:?} declares; rename it in the file or name your column in [datasets.mapping.{}] from; nothing was stored",
                    col.name(),
                    col.name()
                ))
            } else {
                IngestError::Refused(format!(
                    "{file}:1: the header has no column {source:?}, which [datasets.mapping.{}] reads {:?} from; nothing was stored",
                    col.name(),
                    col.name()
                ))
            }
        })?;
        positions.push(pos);
    }
    for (i, h) in headers.iter().enumerate() {
        if headers.iter().take(i).any(|o| o.trim() == h.trim()) {
            return Err(IngestError::Refused(format!(
                "{file}:1: column {} appears twice in the header; nothing was stored",
                fedq_plan::schema::excerpt(h)
            )));
        }
    }
    let ignored_columns: Vec<String> = headers
        .iter()
        .enumerate()
        .filter(|(i, _)| !positions.contains(i))
        .map(|(_, h)| h.to_string())
        .collect();
    let mut counters: Vec<CoverageCounter> = vec![CoverageCounter::default(); schema.columns.len()];

    let encoders: Vec<Encoder> = schema.columns.iter().map(Encoder::new).collect();
    // The text of each open-domain value seen, by (column, code).
    let mut labels: HashMap<(usize, i64), String> = HashMap::new();
    let mut codes = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map(|p| line_of(bytes, p)).unwrap_or(0);
                let what = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => {
                        format!("the row has {len} fields, the header has {expected_len}")
                    }
                    csv::ErrorKind::Utf8 { .. } => "the row is not valid UTF-8".to_string(),
                    _ => e.to_string(),
                };
                return Err(IngestError::Refused(format!(
                    "{file}:{line}: {what}; nothing was stored"
                )));
            }
        }
        for (ci, ((col, enc), &pos)) in schema
            .columns
            .iter()
            .zip(&encoders)
            .zip(&positions)
            .enumerate()
        {
            let cell = record.get(pos).unwrap_or("");
            let mapped = match mapper.map(ci, col, cell) {
                None => None,
                Some(Mapped::Code(code)) => Some(Some(code)),
                Some(Mapped::Unmapped(Unmapped::Missing)) => Some(None),
                Some(Mapped::Unmapped(Unmapped::Error)) => {
                    let line = record.position().map(|p| line_of(bytes, p)).unwrap_or(0);
                    return Err(IngestError::Refused(format!(
                        "{file}:{line}: column {:?} (read as {:?}): the value {} is not in [datasets.mapping.{}] and is not {}; add it to the mapping's values (or set unmapped = \"missing\"); nothing was stored",
                        mapper.source(ci),
                        col.name(),
                        fedq_plan::schema::excerpt(cell.trim()),
                        col.name(),
                        col.expectation()
                    )));
                }
            };
            if let Some(m) = mapped {
                counters[ci].count(m, cell);
                let code = m.unwrap_or(MISSING);
                if code != MISSING && matches!(col, Column::Open { .. }) {
                    labels
                        .entry((ci, code))
                        .or_insert_with(|| cell.trim().to_string());
                }
                codes.push(code);
                continue;
            }
            let code = match enc.encode(cell) {
                Some(code) => code,
                // The slow path gives the exact error message (or, for a
                // spelling the fast path does not know, the code).
                None => col.encode(cell).map_err(|why| {
                    let line = record.position().map(|p| line_of(bytes, p)).unwrap_or(0);
                    IngestError::Refused(format!(
                        "{file}:{line}: column {:?}: {why}; expected {}; nothing was stored",
                        col.name(),
                        col.expectation()
                    ))
                })?,
            };
            if code != MISSING && matches!(col, Column::Open { .. }) {
                labels
                    .entry((ci, code))
                    .or_insert_with(|| cell.trim().to_string());
            }
            counters[ci].count(Some(code), cell);
            codes.push(code);
        }
    }
    let coverage: Vec<ColumnCoverage> = counters
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            c.finish(
                schema.columns[i].name(),
                mapper.source(i),
                mapper.is_mapped(i),
            )
        })
        .collect();
    let labels: Vec<(usize, i64, String)> = labels
        .into_iter()
        .map(|((c, code), t)| (c, code, t))
        .collect();
    Ok(Validated {
        codes,
        labels,
        width: schema.columns.len(),
        ignored_columns,
        coverage,
    })
}

/// A fast path for the common spellings of a column's cells: untrimmed
/// domain values, plain decimal integers, `0`/`1`, and the missing
/// spellings. Anything else (and every invalid cell) goes through
/// [`fedq_plan::schema::Column::encode`], which stays the one definition of
/// what a cell means; this only answers sooner for cells it recognises.
enum Encoder {
    /// Domain value → code.
    Categorical(HashMap<String, i64>),
    /// Declared bounds.
    Integer {
        min: i64,
        max: i64,
    },
    Boolean,
    /// Always [`Column::encode`] (person identifiers are hashed).
    Slow,
}

impl Encoder {
    fn new(column: &Column) -> Encoder {
        match column {
            Column::Categorical { domain, .. } => Encoder::Categorical(
                domain
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (d.clone(), i as i64))
                    .collect(),
            ),
            Column::Integer { min, max, .. } => Encoder::Integer {
                min: *min,
                max: *max,
            },
            Column::Boolean { .. } => Encoder::Boolean,
            Column::PersonId { .. } | Column::Open { .. } => Encoder::Slow,
        }
    }

    /// The code of `cell`, or `None` to take the slow path.
    #[inline]
    fn encode(&self, cell: &str) -> Option<i64> {
        if let Encoder::Slow = self {
            return None;
        }
        if cell.is_empty() || cell == "-99" {
            return Some(MISSING);
        }
        match self {
            Encoder::Categorical(codes) => codes.get(cell).copied(),
            Encoder::Integer { min, max } => {
                let b = cell.as_bytes();
                let (neg, digits) = match b.split_first() {
                    Some((b'-', rest)) => (true, rest),
                    _ => (false, b),
                };
                if digits.is_empty() || digits.len() > 15 {
                    return None;
                }
                let mut v = 0i64;
                for &d in digits {
                    if !d.is_ascii_digit() {
                        return None;
                    }
                    v = v * 10 + i64::from(d - b'0');
                }
                let v = if neg { -v } else { v };
                (*min..=*max).contains(&v).then_some(v)
            }
            Encoder::Boolean => match cell {
                "0" => Some(0),
                "1" => Some(1),
                _ => None,
            },
            Encoder::Slow => None,
        }
    }
}

/// The 1-based line of the file where a record starts, counted from the
/// bytes: the csv crate's own line count is one short for CRLF files and
/// always 1 for CR-only files. Line ends before the record are skipped.
fn line_of(bytes: &[u8], pos: &csv::Position) -> u64 {
    let mut at = (pos.byte() as usize).min(bytes.len());
    while matches!(bytes.get(at), Some(b'\r' | b'\n')) {
        at += 1;
    }
    let before = &bytes[..at];
    let lf = before.iter().filter(|&&c| c == b'\n').count();
    // Old Mac files end lines with CR alone.
    let cr_only = before
        .windows(2)
        .filter(|w| w[0] == b'\r' && w[1] != b'\n')
        .count()
        + usize::from(before.last() == Some(&b'\r'));
    1 + (lf + cr_only) as u64
}
