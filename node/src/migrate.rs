//! `fedq-node migrate`: a stopped node's stored rows translated, in place,
//! to the columns `node.toml` now declares (a new minor version of the
//! federation's standard), so that the node keeps its budget ledger and
//! its audit log. A new store would forget the budget already spent.
//!
//! The store keeps only the digest of the schema its rows were stored
//! under, so the operator gives the previous `node.toml` too
//! (`--previous`); its columns must have exactly the stored digest.
//! Columns are matched **by name**:
//!
//! - a column in both keeps its values: a category by its label (its old
//!   code becomes the new code of the same label), an integer within the
//!   new bounds, a flag, an open-domain value (its code and label) and a
//!   person identifier as they are;
//! - a column only `node.toml` declares is missing ([`MISSING`]) in every
//!   stored row;
//! - what would change the meaning of a stored row is refused, naming the
//!   column: a column dropped or retyped, a category dropped while stored
//!   rows use it (a category no row uses may go), a stored value outside
//!   the new bounds, a person identifier added. That is a major-version
//!   change, which this command does not make.
//!
//! **All or nothing, in ingest's order.** Every dataset is planned and its
//! rows checked ([`fedq_ledger::store::Store::scan_rows`]) before anything
//! is written; a refusal writes nothing. Then, per dataset, a `migrated`
//! audit entry (dataset, both schema digests, the standards' names and
//! versions; no row count, which is an exact statistic) is appended and
//! flushed, and only then are the rows and the digest replaced in one
//! atomic batch ([`fedq_ledger::store::Store::replace_rows`]). A crash
//! between the two leaves an entry for rows still stored under the old
//! columns (the old `node.toml` still starts; migrating again completes
//! and logs again), never changed rows without an entry. A dataset whose
//! rows are already stored under the declared columns has nothing to do,
//! so running the command again after a partial run finishes the rest.
//! The ledger is never touched.
//!
//! What it reports (and its errors) name columns and categories; a count
//! of rows or a stored value appears only in a refusal, on the operator's
//! own machine, where they must find the rows at fault. Nothing of it is
//! logged or sent.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use fedq_ledger::audit::{AuditLog, Event, StandardVersion};
use fedq_ledger::store::Store;
use fedq_plan::schema::{Column, Schema, MISSING};
use fedq_plan::standard::Followed;

use crate::config::{DatasetConfig, NodeConfig};

crate::error::stage_error! {
    /// Why a migration changed nothing (or, for a failed write, what was
    /// done before it): the message names the dataset, column and file.
    MigrateError {
    }
}

/// What `migrate` did for one dataset of `node.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetMigration {
    /// The dataset.
    pub dataset: String,
    /// What was done.
    pub outcome: Outcome,
}

/// What was done for one dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A `[datasets.source]` dataset: its rows stay in the partner's
    /// database, nothing is stored, so there is nothing to translate.
    Source {
        /// The database table or view.
        table: String,
    },
    /// No row was ever ingested.
    NoRows,
    /// The rows are stored under the declared columns already.
    Unchanged,
    /// The rows were translated.
    Migrated(Box<Changes>),
}

/// How a dataset's columns changed, as printed for the operator (names of
/// columns and categories only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Digest of the schema the rows were stored under.
    pub from_schema: String,
    /// Digest of the schema they are stored under now.
    pub to_schema: String,
    /// The standard the previous columns came from, if any.
    pub from_standard: Option<Followed>,
    /// The standard the declared columns come from, if any.
    pub to_standard: Option<Followed>,
    /// Columns only `node.toml` declares: missing in every stored row.
    pub added: Vec<String>,
    /// Per categorical column whose domain changed: the categories added,
    /// whether stored codes moved (re-coded by label), and the categories
    /// dropped that no stored row used.
    pub categories: Vec<CategoryChange>,
    /// Integer columns whose bounds changed (every stored value lies
    /// within the new ones).
    pub bounds: Vec<(String, i64, i64)>,
}

/// How one categorical column's domain changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CategoryChange {
    /// The column.
    pub column: String,
    /// Categories `node.toml` adds.
    pub added: Vec<String>,
    /// Whether a stored category's code changed (its label did not).
    pub recoded: bool,
    /// Categories `node.toml` drops, which no stored row used.
    pub dropped: Vec<String>,
}

/// Translates the rows of every embedded dataset of `config` (read from
/// `config_path`) from the columns of `previous` (read from
/// `previous_path`), as the module's doc describes; opens the store of
/// `config`, which must not be in use (stop the node first).
pub fn migrate(
    config: &NodeConfig,
    config_path: &Path,
    previous: &NodeConfig,
    previous_path: &Path,
) -> Result<Vec<DatasetMigration>, MigrateError> {
    let files = Files {
        new: config_path.display().to_string(),
        old: previous_path.display().to_string(),
    };
    let dir = config.resolve(&config.node.store);
    // Opening an absent store would create one: there is nothing in it.
    let exists = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
    if !exists {
        return Ok(config
            .datasets
            .iter()
            .map(|d| DatasetMigration {
                dataset: d.name.clone(),
                outcome: match &d.source {
                    Some(s) => Outcome::Source {
                        table: s.table.clone(),
                    },
                    None => Outcome::NoRows,
                },
            })
            .collect());
    }
    let store = Store::open(&dir)
        .map_err(|e| MigrateError::Refused(format!("{e}; nothing was changed")))?;
    let audit = crate::service::open_audit(config, &store)
        .map_err(|e| MigrateError::Refused(format!("{e}; nothing was changed")))?;

    // Plan every dataset and check every stored row; write nothing.
    let mut problems = Problems::default();
    let mut plans = Vec::with_capacity(config.datasets.len());
    for d in &config.datasets {
        plans.push(plan(&store, d, previous, &files, &mut problems)?);
    }
    if let Some(refusal) = problems.refusal(&files) {
        return Err(MigrateError::Refused(refusal));
    }

    // Write, dataset by dataset, in ingest's order.
    let mut done = Vec::new();
    let mut report = Vec::with_capacity(plans.len());
    for p in plans {
        let outcome = match p.step {
            Step::Nothing(outcome) => outcome,
            Step::Translate(t) => {
                let Translate {
                    old,
                    new,
                    translation,
                    changes,
                } = *t;
                write(&store, &audit, &p.dataset, &old, &new, &translation, &changes).map_err(
                    |e| {
                        if done.is_empty() {
                            return e;
                        }
                        MigrateError::Refused(format!(
                            "{e}; the rows of dataset(s) {} were migrated before it: run migrate again to finish (it skips what is done)",
                            done.join(", ")
                        ))
                    },
                )?;
                done.push(format!("{:?}", p.dataset));
                Outcome::Migrated(Box::new(changes))
            }
        };
        report.push(DatasetMigration {
            dataset: p.dataset,
            outcome,
        });
    }
    Ok(report)
}

/// The two config files, as messages name them.
struct Files {
    new: String,
    old: String,
}

/// What stops a migration, gathered over every dataset so that one run
/// names them all.
#[derive(Default)]
struct Problems {
    /// `--previous` does not give the columns the rows were stored under.
    previous: Vec<String>,
    /// Translations that would change what a stored row means.
    meaning: Vec<String>,
}

impl Problems {
    /// The refusal's message, if anything stops the migration.
    fn refusal(&self, files: &Files) -> Option<String> {
        if self.previous.is_empty() && self.meaning.is_empty() {
            return None;
        }
        let mut text = "cannot migrate the stored rows; nothing was changed (no row, no schema, no audit entry):".to_string();
        for p in self.previous.iter().chain(&self.meaning) {
            text.push_str("\n  ");
            text.push_str(p);
        }
        if !self.previous.is_empty() {
            text.push_str(&format!(
                "\n--previous must be the node.toml as it was before you changed it: the columns the rows are stored under (with its standard file still installed); {} is not",
                files.old
            ));
        }
        if !self.meaning.is_empty() {
            text.push_str(
                "\nthe stored rows would change meaning: that is a major-version change, which migrate does not make",
            );
        }
        Some(text)
    }
}

/// One dataset's plan.
struct Plan {
    dataset: String,
    step: Step,
}

enum Step {
    /// Nothing to write.
    Nothing(Outcome),
    /// The rows to translate.
    Translate(Box<Translate>),
}

/// The rows of one dataset to translate from `old` to `new`.
struct Translate {
    old: Schema,
    new: Schema,
    translation: Translation,
    changes: Changes,
}

/// Plans dataset `d`: what its stored rows are, what the translation is,
/// and (reading every stored row) whether every row translates. What
/// stops it goes to `problems`.
fn plan(
    store: &Store,
    d: &DatasetConfig,
    previous: &NodeConfig,
    files: &Files,
    problems: &mut Problems,
) -> Result<Plan, MigrateError> {
    let nothing = |outcome| {
        Ok(Plan {
            dataset: d.name.clone(),
            step: Step::Nothing(outcome),
        })
    };
    if let Some(s) = &d.source {
        return nothing(Outcome::Source {
            table: s.table.clone(),
        });
    }
    let read = |e: fedq_ledger::store::StoreError| {
        MigrateError::Refused(format!("{e}; nothing was changed"))
    };
    let Some(stored) = store.schema_digest(&d.name).map_err(read)? else {
        return nothing(Outcome::NoRows);
    };
    let new = d
        .schema()
        .map_err(|e| MigrateError::Refused(format!("{}: {e}", files.new)))?;
    if stored == new.digest() {
        return nothing(Outcome::Unchanged);
    }
    let at = format!("dataset {:?}:", d.name);
    let Some(old_d) = previous.dataset(&d.name) else {
        problems.previous.push(format!(
            "{} declares no dataset {:?}, whose rows are stored",
            files.old, d.name
        ));
        // Refused: the plan is never carried out.
        return nothing(Outcome::Unchanged);
    };
    let old = old_d
        .schema()
        .map_err(|e| MigrateError::Refused(format!("{}: {e}", files.old)))?;
    if old.digest() != stored {
        problems.previous.push(format!(
            "{}'s columns for dataset {:?} are not the ones its rows were stored under",
            files.old, d.name
        ));
        // Refused: the plan is never carried out.
        return nothing(Outcome::Unchanged);
    }
    let translation = Translation::new(&old, &new, &at, files, &mut problems.meaning);
    let mut untranslatable = Untranslatable::new();
    store
        .scan_rows(&d.name, &old, |codes| {
            translation.rows(codes, &mut untranslatable);
        })
        .map_err(read)?;
    let mut by_column: BTreeMap<usize, Vec<(i64, u64)>> = BTreeMap::new();
    for ((column, code), rows) in untranslatable {
        by_column.entry(column).or_default().push((code, rows));
    }
    for (column, held) in by_column {
        problems
            .meaning
            .push(translation.describe(&old, &new, column, &held, &at, files));
    }
    let changes = changes(&old, &new, &translation, old_d, d);
    Ok(Plan {
        dataset: d.name.clone(),
        step: Step::Translate(Box::new(Translate {
            old,
            new,
            translation,
            changes,
        })),
    })
}

/// Writes one planned dataset: the `migrated` entry, made durable, then
/// the translated rows and the new digest in one batch.
fn write(
    store: &Store,
    audit: &AuditLog,
    dataset: &str,
    old: &Schema,
    new: &Schema,
    translation: &Translation,
    changes: &Changes,
) -> Result<(), MigrateError> {
    let standard = |f: &Option<Followed>| {
        f.as_ref().map(|f| StandardVersion {
            name: f.name.clone(),
            version: f.version.to_string(),
        })
    };
    audit
        .append(Event::Migrated {
            dataset: dataset.to_string(),
            from_schema: changes.from_schema.clone(),
            to_schema: changes.to_schema.clone(),
            from_standard: standard(&changes.from_standard),
            to_standard: standard(&changes.to_standard),
        })
        .map_err(|e| {
            MigrateError::io(
                format!("logging the migration of dataset {dataset:?} in the audit log; its rows were not changed"),
                e,
            )
        })?;
    audit.tree.flush().map_err(|e| {
        MigrateError::io(
            format!("flushing the audit log; the rows of dataset {dataset:?} were not changed"),
            e,
        )
    })?;
    store
        .replace_rows(dataset, old, new, |codes| {
            let mut untranslatable = Untranslatable::new();
            let rows = translation.rows(codes, &mut untranslatable);
            if untranslatable.is_empty() {
                Ok(rows)
            } else {
                // Checked a moment ago, with the store held exclusively.
                Err("a stored value no longer translates".to_string())
            }
        })
        .map_err(|e| {
            MigrateError::Refused(format!(
                "{e} (dataset {dataset:?}: its audit entry was written, its rows were not changed; run migrate again)"
            ))
        })
}

/// How one column of the new schema is filled from a stored row.
enum Fill {
    /// Only the new schema declares it: missing in every row (also the
    /// placeholder for a column whose change was refused).
    Missing,
    /// Stored column `from`, every code kept.
    Same { from: usize },
    /// Stored categorical column `from`: code `i` becomes `to[i]` (the
    /// new code of the same label), `None` where the label is gone.
    Recode { from: usize, to: Vec<Option<i64>> },
    /// Stored integer column `from`, kept where within `[min, max]`.
    Bounded { from: usize, min: i64, max: i64 },
}

/// Stored values the new columns cannot hold, per (new column, stored
/// code): how many rows hold them.
type Untranslatable = BTreeMap<(usize, i64), u64>;

/// Rows stored under one schema to rows under another, by column name.
struct Translation {
    /// Codes per stored row.
    old_width: usize,
    /// Per new column, in the new schema's order.
    fills: Vec<Fill>,
}

impl Translation {
    /// The translation from `old` to `new`; a column it cannot translate
    /// is named in `refused` (prefixed with `at`).
    fn new(
        old: &Schema,
        new: &Schema,
        at: &str,
        files: &Files,
        refused: &mut Vec<String>,
    ) -> Translation {
        for o in &old.columns {
            if new.index_of(o.name()).is_none() {
                refused.push(format!(
                    "{at} column {:?} ({}) is in {} and not in {}: the stored rows would lose it",
                    o.name(),
                    kind(o),
                    files.old,
                    files.new
                ));
            }
        }
        let fills = new
            .columns
            .iter()
            .map(|n| {
                let Some(from) = old.index_of(n.name()) else {
                    if let Column::PersonId { .. } = n {
                        refused.push(format!(
                            "{at} {} declares the person identifier {:?}, which the stored rows do not have: the privacy unit changed",
                            files.new,
                            n.name()
                        ));
                    }
                    return Fill::Missing;
                };
                match (&old.columns[from], n) {
                    (Column::Categorical { domain: a, .. }, Column::Categorical { domain: b, .. }) => {
                        if a == b {
                            Fill::Same { from }
                        } else {
                            Fill::Recode {
                                from,
                                to: a
                                    .iter()
                                    .map(|label| b.iter().position(|l| l == label).map(|i| i as i64))
                                    .collect(),
                            }
                        }
                    }
                    (
                        Column::Integer { min: a, max: b, .. },
                        Column::Integer { min, max, .. },
                    ) => {
                        // Every stored value lies within the old bounds.
                        if min <= a && b <= max {
                            Fill::Same { from }
                        } else {
                            Fill::Bounded {
                                from,
                                min: *min,
                                max: *max,
                            }
                        }
                    }
                    (Column::Boolean { .. }, Column::Boolean { .. })
                    | (Column::Open { .. }, Column::Open { .. })
                    | (Column::PersonId { .. }, Column::PersonId { .. }) => Fill::Same { from },
                    (o, n) => {
                        refused.push(format!(
                            "{at} column {:?} is {} in {} and {} in {}: its stored values would change meaning",
                            n.name(),
                            kind(o),
                            files.old,
                            kind(n),
                            files.new
                        ));
                        Fill::Missing
                    }
                }
            })
            .collect();
        Translation {
            old_width: old.columns.len(),
            fills,
        }
    }

    /// Translates row-major `codes` (stored rows); a value the new column
    /// cannot hold becomes missing and is counted in `untranslatable`.
    fn rows(&self, codes: &[i64], untranslatable: &mut Untranslatable) -> Vec<i64> {
        let mut out = Vec::with_capacity(codes.len() / self.old_width * self.fills.len());
        for row in codes.chunks_exact(self.old_width) {
            for (c, fill) in self.fills.iter().enumerate() {
                let code = match *fill {
                    Fill::Missing => MISSING,
                    Fill::Same { from } => row[from],
                    Fill::Recode { from, ref to } => match row[from] {
                        MISSING => MISSING,
                        v => match usize::try_from(v).ok().and_then(|i| to.get(i)) {
                            Some(Some(new)) => *new,
                            _ => {
                                *untranslatable.entry((c, v)).or_default() += 1;
                                MISSING
                            }
                        },
                    },
                    Fill::Bounded { from, min, max } => match row[from] {
                        MISSING => MISSING,
                        v if (min..=max).contains(&v) => v,
                        v => {
                            *untranslatable.entry((c, v)).or_default() += 1;
                            MISSING
                        }
                    },
                };
                out.push(code);
            }
        }
        out
    }

    /// The refusal for new column `column`, whose stored values `held`
    /// (code, rows holding it; in code order, at least one) it cannot
    /// hold. At most [`NAMED_VALUES`] values are named.
    fn describe(
        &self,
        old: &Schema,
        new: &Schema,
        column: usize,
        held: &[(i64, u64)],
        at: &str,
        files: &Files,
    ) -> String {
        let name = new.columns[column].name();
        let rows = |n: u64| match n {
            1 => "1 stored row".to_string(),
            n => format!("{n} stored rows"),
        };
        let value = |code: i64| match &self.fills[column] {
            Fill::Recode { from, .. } => match &old.columns[*from] {
                Column::Categorical { domain, .. } => usize::try_from(code)
                    .ok()
                    .and_then(|i| domain.get(i))
                    .map_or_else(|| code.to_string(), |l| format!("{l:?}")),
                _ => code.to_string(),
            },
            _ => code.to_string(),
        };
        let mut named: Vec<String> = held
            .iter()
            .take(NAMED_VALUES)
            .map(|&(code, n)| format!("{} ({})", value(code), rows(n)))
            .collect();
        if held.len() > NAMED_VALUES {
            let rest = &held[NAMED_VALUES..];
            named.push(format!(
                "and {} more ({})",
                rest.len(),
                rows(rest.iter().map(|&(_, n)| n).sum())
            ));
        }
        let named = named.join(", ");
        match &self.fills[column] {
            Fill::Recode { .. } => format!(
                "{at} column {name:?}: {} drops categories that stored rows use: {named}",
                files.new
            ),
            Fill::Bounded { min, max, .. } => format!(
                "{at} column {name:?}: stored values lie outside the bounds [{min}, {max}] of {}: {named}",
                files.new
            ),
            Fill::Missing | Fill::Same { .. } => {
                format!("{at} column {name:?}: stored values do not translate: {named}")
            }
        }
    }
}

/// Most untranslatable values a refusal names per column.
const NAMED_VALUES: usize = 10;

/// A column's kind, for messages.
fn kind(c: &Column) -> &'static str {
    match c {
        Column::Categorical { .. } => "a category with a declared domain",
        Column::Open { .. } => "an open-domain category",
        Column::Integer { .. } => "an integer column",
        Column::Boolean { .. } => "a flag",
        Column::PersonId { .. } => "the person identifier",
    }
}

/// What the operator is told changed (names only).
fn changes(
    old: &Schema,
    new: &Schema,
    translation: &Translation,
    old_d: &DatasetConfig,
    d: &DatasetConfig,
) -> Changes {
    let mut added = Vec::new();
    let mut categories = Vec::new();
    let mut bounds = Vec::new();
    for (n, fill) in new.columns.iter().zip(&translation.fills) {
        match (fill, n) {
            (Fill::Missing, _) if old.index_of(n.name()).is_none() => {
                added.push(n.name().to_string())
            }
            (Fill::Recode { from, to }, Column::Categorical { domain, .. }) => {
                let Column::Categorical { domain: was, .. } = &old.columns[*from] else {
                    continue;
                };
                categories.push(CategoryChange {
                    column: n.name().to_string(),
                    added: domain
                        .iter()
                        .filter(|l| !was.contains(l))
                        .cloned()
                        .collect(),
                    recoded: to
                        .iter()
                        .enumerate()
                        .any(|(i, t)| t.is_some_and(|t| t != i as i64)),
                    dropped: was
                        .iter()
                        .filter(|l| !domain.contains(l))
                        .cloned()
                        .collect(),
                });
            }
            (
                Fill::Same { from } | Fill::Bounded { from, .. },
                Column::Integer { min, max, .. },
            ) => {
                if let Column::Integer { min: a, max: b, .. } = &old.columns[*from] {
                    if (a, b) != (min, max) {
                        bounds.push((n.name().to_string(), *min, *max));
                    }
                }
            }
            _ => {}
        }
    }
    Changes {
        from_schema: old.digest(),
        to_schema: new.digest(),
        from_standard: old_d.followed().cloned(),
        to_standard: d.followed().cloned(),
        added,
        categories,
        bounds,
    }
}

/// The quoted labels, comma-separated.
fn quoted(labels: &[String]) -> String {
    labels
        .iter()
        .map(|l| format!("{l:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for DatasetMigration {
    /// One line for the dataset, then one indented line per changed column.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.dataset;
        match &self.outcome {
            Outcome::Source { table } => write!(
                f,
                "dataset {name:?}: answers from the database table {table} ([datasets.source]); no rows are stored, skipped"
            ),
            Outcome::NoRows => write!(f, "dataset {name:?}: no rows stored; nothing to do"),
            Outcome::Unchanged => write!(
                f,
                "dataset {name:?}: its rows are stored under the declared columns already; nothing to do"
            ),
            Outcome::Migrated(c) => {
                let standard = |s: &Option<Followed>| match s {
                    Some(s) => format!("{} {}", s.name, s.version),
                    None => "declared columns".to_string(),
                };
                write!(
                    f,
                    "dataset {name:?}: stored rows translated from {} to {} (schema {} -> {})",
                    standard(&c.from_standard),
                    standard(&c.to_standard),
                    &c.from_schema[..12.min(c.from_schema.len())],
                    &c.to_schema[..12.min(c.to_schema.len())]
                )?;
                for column in &c.added {
                    write!(f, "\n  column {column:?} added: missing in every stored row")?;
                }
                for k in &c.categories {
                    let mut what = Vec::new();
                    if !k.added.is_empty() {
                        what.push(format!("categories added: {}", quoted(&k.added)));
                    }
                    if !k.dropped.is_empty() {
                        what.push(format!(
                            "categories dropped (no stored row used them): {}",
                            quoted(&k.dropped)
                        ));
                    }
                    what.push(if k.recoded {
                        "stored categories re-coded by label".to_string()
                    } else {
                        "stored codes unchanged".to_string()
                    });
                    write!(f, "\n  column {:?}: {}", k.column, what.join("; "))?;
                }
                for (column, min, max) in &c.bounds {
                    write!(
                        f,
                        "\n  column {column:?}: bounds now [{min}, {max}]; every stored value lies within them"
                    )?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use fedq_plan::schema::{ColumnSpec, ColumnType};

    use ColumnSpec as C;

    fn schema(columns: &[ColumnSpec]) -> Schema {
        Schema::from_specs("cases", columns).unwrap()
    }

    fn files() -> Files {
        Files {
            new: "node.toml".into(),
            old: "node.toml.old".into(),
        }
    }

    /// The translation and what it refuses.
    fn translate(old: &Schema, new: &Schema) -> (Translation, Vec<String>) {
        let mut refused = Vec::new();
        let t = Translation::new(old, new, "dataset \"cases\":", &files(), &mut refused);
        (t, refused)
    }

    #[test]
    fn columns_are_matched_by_name_categories_by_label_and_new_columns_are_missing() {
        let old = schema(&[
            C::categorical("source", &["Hotline", "NGO", "Unused"]),
            C::integer("months", 0, 120),
            C::new("flag", ColumnType::Boolean),
        ]);
        // Reordered, a category in front, one nobody used dropped, wider
        // bounds, a new column in the middle.
        let new = schema(&[
            C::new("flag", ColumnType::Boolean),
            C::new("isAbduction", ColumnType::Boolean),
            C::categorical("source", &["Government", "NGO", "Hotline"]),
            C::integer("months", -1, 240),
        ]);
        let (t, refused) = translate(&old, &new);
        assert!(refused.is_empty(), "{refused:?}");
        let stored = [0, 7, 1, 1, MISSING, 0, MISSING, 120, MISSING];
        let mut bad = Untranslatable::new();
        assert_eq!(
            t.rows(&stored, &mut bad),
            [1, MISSING, 2, 7, 0, MISSING, 1, MISSING, MISSING, MISSING, MISSING, 120]
        );
        assert!(bad.is_empty());
        let c = changes(&old, &new, &t, &dataset(), &dataset());
        assert_eq!(c.added, ["isAbduction"]);
        assert_eq!(
            c.categories,
            [CategoryChange {
                column: "source".into(),
                added: vec!["Government".into()],
                recoded: true,
                dropped: vec!["Unused".into()],
            }]
        );
        assert_eq!(c.bounds, [("months".to_string(), -1, 240)]);
        let text = DatasetMigration {
            dataset: "cases".into(),
            outcome: Outcome::Migrated(Box::new(c)),
        }
        .to_string();
        assert!(
            text.contains("column \"isAbduction\" added: missing in every stored row")
                && text.contains("column \"source\": categories added: \"Government\"; categories dropped (no stored row used them): \"Unused\"; stored categories re-coded by label")
                && text.contains("column \"months\": bounds now [-1, 240]"),
            "{text}"
        );
    }

    fn dataset() -> DatasetConfig {
        toml::from_str(
            "name = \"cases\"\n[budget]\nper_analyst = 1.0\ntotal = 1.0\nper_query_max = 1.0\n",
        )
        .unwrap()
    }

    #[test]
    fn a_used_category_dropped_or_a_value_outside_new_bounds_is_counted_by_value() {
        let old = schema(&[
            C::categorical("gender", &["Female", "Male", "Trans"]),
            C::integer("months", 0, 120),
        ]);
        let new = schema(&[
            C::categorical("gender", &["Female", "Trans"]),
            C::integer("months", 0, 60),
        ]);
        let (t, refused) = translate(&old, &new);
        assert!(refused.is_empty(), "{refused:?}");
        let stored = [1, 61, 1, 72, 0, 60, 1, 72, MISSING, 120, 2, MISSING];
        let mut bad = Untranslatable::new();
        t.rows(&stored, &mut bad);
        assert_eq!(
            bad.into_iter().collect::<Vec<_>>(),
            [((0, 1), 3), ((1, 61), 1), ((1, 72), 2), ((1, 120), 1)]
        );
        let at = "dataset \"cases\":";
        assert_eq!(
            t.describe(&old, &new, 0, &[(1, 3)], at, &files()),
            "dataset \"cases\": column \"gender\": node.toml drops categories that stored rows use: \"Male\" (3 stored rows)"
        );
        assert_eq!(
            t.describe(&old, &new, 1, &[(61, 1), (72, 2), (120, 1)], at, &files()),
            "dataset \"cases\": column \"months\": stored values lie outside the bounds [0, 60] of node.toml: 61 (1 stored row), 72 (2 stored rows), 120 (1 stored row)"
        );
        let many: Vec<(i64, u64)> = (61..=75).map(|v| (v, 2)).collect();
        assert!(t
            .describe(&old, &new, 1, &many, at, &files())
            .ends_with("70 (2 stored rows), and 5 more (10 stored rows)"));
    }

    #[test]
    fn a_dropped_retyped_or_person_column_is_refused_by_name() {
        let old = schema(&[
            C::categorical("gender", &["Female", "Male"]),
            C::integer("age", 0, 120),
            C::new("gone", ColumnType::Boolean),
        ]);
        let new = schema(&[
            ColumnSpec {
                open: Some(true),
                ..C::new("gender", ColumnType::Categorical)
            },
            C::categorical("age", &["0-17", "18+"]),
        ])
        .with_person_unit("person", 2)
        .unwrap();
        let (_, refused) = translate(&old, &new);
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert!(
            refused[0]
                .contains("column \"gone\" (a flag) is in node.toml.old and not in node.toml"),
            "{}",
            refused[0]
        );
        assert!(refused[1].contains("column \"gender\" is a category with a declared domain in node.toml.old and an open-domain category in node.toml"), "{}", refused[1]);
        assert!(refused[2].contains("column \"age\" is an integer column in node.toml.old and a category with a declared domain in node.toml"), "{}", refused[2]);
        assert!(
            refused[3].contains("person identifier \"person\""),
            "{}",
            refused[3]
        );
    }
}
