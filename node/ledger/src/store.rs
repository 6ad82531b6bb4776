//! The node's sled store: dataset rows, the privacy-budget ledger and the
//! record of answered queries.
//!
//! Layout (one sled database per node):
//! - tree `data`: `meta/format` = [`FORMAT_VERSION`]; per dataset
//!   `meta/<ds>/schema` (schema digest), `meta/<ds>/rows` (row count, u64 BE),
//!   `meta/<ds>/chunks` (chunk count), `ingest/<ds>/<sha256 of file>` (one
//!   marker per ingested file), `label/<ds>/<column>/<code u64 BE>` holding
//!   the text of each value of an open-domain column (its code is a hash of
//!   the text, see `schema::open_code`), and `rows/<ds>/<chunk u64 BE>`
//!   holding up to [`CHUNK_ROWS`] rows column-major, each column packed as the in-memory
//!   table packs it (see `table::encode_chunk`; format version 2). Format
//!   version 1 stored row-major `i64` codes; such a store is refused.
//! - tree `ledger`: see [`crate::ledger`].
//! - tree `audit`: see [`crate::audit`].
//!
//! An ingest is one `apply_batch` on `data` followed by a flush: it lands
//! whole or not at all. So is a migration of a dataset's rows to new
//! columns ([`Store::replace_rows`], `fedq-node migrate`): every chunk
//! re-encoded and the new schema digest, in one batch.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fault::fail_point::{FailPoints, Point};
use crate::fault::StoreFailed;
use crate::group_commit::GroupCommit;
use crate::journal::JournalError;
use fedq_engine::table::{decode_chunk, encode_chunk, Table};
use fedq_plan::schema::Schema;

/// Version of the on-disk layout. A node refuses a store written with a
/// different version rather than misreading it.
pub const FORMAT_VERSION: u64 = 2;

/// Bytes of sled page cache per open store (sled's default is 1 GiB; the
/// query path scans the in-memory columns, so a small cache is enough).
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Rows per stored chunk: large enough that loading a million rows reads
/// a handful of values (about 2 MB each for the CTDC schema), small enough
/// that encoding one is cheap.
pub const CHUNK_ROWS: usize = 65_536;

/// Why the store could not do what it was asked. Every message names what
/// failed and, where there is one, what the operator can do; a variant
/// carrying a lower-level error includes its text, so `{}` alone is the
/// whole story (nothing is repeated by `{:#}`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed a read or a write.
    #[error(transparent)]
    Sled(#[from] sled::Error),
    /// sled could not open the database at `path`.
    #[error("cannot open store {}: {error}", path.display())]
    Open {
        /// The store's directory.
        path: PathBuf,
        /// sled's error.
        error: sled::Error,
    },
    /// Another process holds the store's lock.
    #[error("cannot open store {}: it is in use by another process ({error}); stop the running fedq-node first", path.display())]
    Locked {
        /// The store's directory.
        path: PathBuf,
        /// The locking error, as the system reported it.
        error: std::io::Error,
    },
    /// The store was written by a build with another on-disk layout.
    #[error(
        "store {} has format version {found}, this build reads version {FORMAT_VERSION}; \
         run the fedq-node version that wrote it, or migrate the store (see deploy/README.md); nothing was changed",
        path.display()
    )]
    Format {
        /// The store's directory.
        path: PathBuf,
        /// The version recorded in the store.
        found: u64,
    },
    /// A file of the store could not be opened or read.
    #[error("cannot open {what} of store {}: {error}", path.display())]
    Io {
        /// What it is (`the log`).
        what: &'static str,
        /// The store's directory.
        path: PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
    /// The flusher thread of the group commit could not be started.
    #[error("cannot start the store's flusher thread: {0}")]
    Thread(std::io::Error),
    /// The ledger's journal, read when the store opens, failed.
    #[error("store {}: {error}", path.display())]
    Journal {
        /// The store's directory.
        path: PathBuf,
        /// What the journal's replay reported.
        error: JournalError,
    },
    /// A stored value is not what this build wrote: the store is damaged.
    #[error("{what}: {why}; the store is damaged")]
    Corrupt {
        /// What was read (`dataset "cases"`, `a stored audit entry`).
        what: String,
        /// What is wrong with it.
        why: String,
    },
    /// Rows were offered for a dataset ingested under another schema.
    #[error(
        "dataset {dataset:?} in this store was ingested under a different schema; \
         keep the schema it was ingested with, or (a new version of its columns) \
         translate the stored rows first with `fedq-node migrate` (deploy/README.md)"
    )]
    IngestSchema {
        /// The dataset.
        dataset: String,
    },
    /// The configured schema differs from the one the stored rows were
    /// ingested under.
    #[error(
        "dataset {dataset:?}: the schema in node.toml differs from the one its rows were ingested under; \
         restore the previous schema, or (a new version of its columns) translate the stored rows \
         with `fedq-node migrate` (deploy/README.md)"
    )]
    SchemaChanged {
        /// The dataset.
        dataset: String,
    },
    /// A migration's translation of the stored rows failed
    /// ([`Store::replace_rows`]); nothing was written.
    #[error("dataset {dataset:?}: cannot translate the stored rows: {why}; nothing was changed")]
    Translate {
        /// The dataset.
        dataset: String,
        /// The translation's reason.
        why: String,
    },
    /// Rows could not be encoded for storage.
    #[error("dataset {dataset:?}: cannot encode rows for the store: {why}")]
    Encode {
        /// The dataset.
        dataset: String,
        /// The encoder's reason.
        why: String,
    },
    /// A write of the named kind failed in storage (and, for a ledger
    /// write, set the store's fault: [`crate::fault`]).
    #[error("{what}: {error}")]
    Write {
        /// What was being written (`writing the ingest batch`, `cannot
        /// record the grant`).
        what: &'static str,
        /// sled's error.
        error: sled::Error,
    },
    /// The store failed an earlier write or flush and refuses every write
    /// until the node restarts ([`crate::fault`]).
    #[error(transparent)]
    Failed(#[from] StoreFailed),
    /// The flush that was to make a write durable failed, or the store had
    /// failed before it: the write may be lost.
    #[error("nothing was made durable: {0}")]
    NotDurable(StoreFailed),
}

impl StoreError {
    /// The store's fault, when this error is (or follows from) it: the
    /// node must stop and be restarted ([`crate::fault::EXIT_STORE_FAILED`]).
    pub fn fault(&self) -> Option<&StoreFailed> {
        match self {
            StoreError::Failed(f) | StoreError::NotDurable(f) => Some(f),
            _ => None,
        }
    }
}

/// An open store. Cloning shares the same database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    data: sled::Tree,
    /// The budget ledger tree, used by [`crate::ledger::Ledger`].
    pub ledger: sled::Tree,
    /// The audit log tree, used by [`crate::audit::AuditLog`].
    pub audit: sled::Tree,
    /// The ledger's journal of multi-key writes (see [`crate::journal`]).
    pub journal: crate::journal::Journal,
    /// Shared flushes for the ledger's durable points (one per database).
    commits: Arc<GroupCommit>,
    /// Set by the first failed ledger commit or flush; every writer
    /// checks it ([`crate::fault`]).
    fault: crate::fault::Fault,
    /// Test-only failure injection ([`crate::fault::fail_point`]): the
    /// batch of [`Store::replace_rows`] fails at [`Point::Flush`] as a
    /// full disk fails it, before any of it is written.
    fail: FailPoints,
}

impl Store {
    /// Opens (creating if needed) the store at `dir`. Fails clearly when
    /// another process holds it or it was written by an incompatible build.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = open_with_retry(dir)?;
        let data = db.open_tree("data")?;
        let ledger = db.open_tree("ledger")?;
        let audit = db.open_tree("audit")?;
        match data.get("meta/format")? {
            None => {
                data.insert("meta/format", &FORMAT_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = decode_u64(&v);
                if found != FORMAT_VERSION {
                    return Err(StoreError::Format {
                        path: dir.to_path_buf(),
                        found,
                    });
                }
            }
        }
        // A ledger write that a crash interrupted is completed before
        // anything reads the ledger.
        let fault = crate::fault::Fault::default();
        let fail = FailPoints::for_store(dir);
        let journal = crate::journal::Journal::open_with(&db, fault.clone(), fail.clone())?;
        let replayed = journal.replay().map_err(|error| StoreError::Journal {
            path: dir.to_path_buf(),
            error,
        })?;
        if replayed > 0 {
            tracing::warn!(
                keys = replayed,
                "completed a ledger write that the last stop interrupted"
            );
        }
        // sled's log, synced by the group commit (see `group_commit.rs`).
        let log = std::fs::File::open(dir.join("db")).map_err(|error| StoreError::Io {
            what: "the log",
            path: dir.to_path_buf(),
            error,
        })?;
        Ok(Store {
            commits: Arc::new(GroupCommit::with_fault(
                db.clone(),
                log,
                fault.clone(),
                fail.clone(),
            )?),
            fail,
            fault,
            db,
            data,
            ledger,
            audit,
            journal,
        })
    }

    /// The store's fault: set once a ledger commit or flush failed, after
    /// which every writer is refused and the node must restart
    /// ([`crate::fault`]).
    pub fn fault(&self) -> &crate::fault::Fault {
        &self.fault
    }

    /// Forces everything written so far to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Blocks until everything this thread wrote so far is durable, sharing
    /// the flush with concurrent callers (see [`crate::group_commit`]).
    pub fn wait_durable(&self) -> Result<(), StoreError> {
        self.commits.wait_durable()
    }

    /// Queues everything this thread wrote so far for the next shared
    /// flush; [`Store::wait`] blocks until it is durable. Work done between
    /// the two overlaps the flush.
    pub fn ticket(&self) -> crate::group_commit::Ticket {
        self.commits.ticket()
    }

    /// Blocks until the write `ticket` was taken after is durable.
    pub fn wait(&self, ticket: crate::group_commit::Ticket) -> Result<(), StoreError> {
        self.commits.wait(ticket)
    }

    /// Flushes run by [`Store::wait_durable`] since the store was opened.
    pub fn group_flushes(&self) -> u64 {
        self.commits.flushes()
    }

    /// The schema digest a dataset's rows were ingested under, if any rows
    /// were ever ingested.
    pub fn schema_digest(&self, dataset: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .data
            .get(format!("meta/{dataset}/schema"))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Whether a file with this digest was already ingested into `dataset`.
    pub fn was_ingested(&self, dataset: &str, file_sha256: &str) -> Result<bool, StoreError> {
        Ok(self
            .data
            .contains_key(format!("ingest/{dataset}/{file_sha256}"))?)
    }

    /// Appends encoded rows (row-major) to `dataset` in one atomic, durable
    /// commit. `schema` must be the dataset's declared schema.
    /// `labels` are the (column, code, text) of open-domain values, stored
    /// in the same commit so a released key can be shown by its text.
    pub fn append_rows(
        &self,
        dataset: &str,
        schema: &Schema,
        codes: &[i64],
        labels: &[(usize, i64, String)],
        file_sha256: &str,
    ) -> Result<u64, StoreError> {
        let width = schema.columns.len();
        let digest = schema.digest();
        if let Some(stored) = self.schema_digest(dataset)? {
            if stored != digest {
                return Err(StoreError::IngestSchema {
                    dataset: dataset.to_string(),
                });
            }
        }
        let rows_before = self.get_u64(&format!("meta/{dataset}/rows"))?;
        let chunks_before = self.get_u64(&format!("meta/{dataset}/chunks"))?;
        let mut batch = sled::Batch::default();
        let mut chunk_id = chunks_before;
        for chunk in codes.chunks(CHUNK_ROWS * width) {
            let bytes = encode_chunk(schema, chunk).map_err(|why| StoreError::Encode {
                dataset: dataset.to_string(),
                why,
            })?;
            batch.insert(rows_key(dataset, chunk_id), bytes);
            chunk_id += 1;
        }
        for (column, code, text) in labels {
            batch.insert(
                label_key(dataset, schema.columns[*column].name(), *code as u64),
                text.as_bytes(),
            );
        }
        let added = (codes.len() / width) as u64;
        batch.insert(
            format!("meta/{dataset}/rows").as_bytes(),
            &(rows_before + added).to_be_bytes(),
        );
        batch.insert(
            format!("meta/{dataset}/chunks").as_bytes(),
            &chunk_id.to_be_bytes(),
        );
        batch.insert(
            format!("meta/{dataset}/schema").as_bytes(),
            digest.as_bytes(),
        );
        batch.insert(
            format!("ingest/{dataset}/{file_sha256}").as_bytes(),
            &added.to_be_bytes(),
        );
        self.data
            .apply_batch(batch)
            .map_err(|error| StoreError::Write {
                what: "writing the ingest batch",
                error,
            })?;
        self.db.flush().map_err(|error| StoreError::Write {
            what: "flushing the ingest to disk",
            error,
        })?;
        Ok(rows_before + added)
    }

    /// Reads the rows of `dataset`, one stored chunk at a time in storage
    /// order, as row-major codes under `schema` (as ingest encoded them:
    /// `schema.columns.len()` codes a row, [`MISSING`] for missing), and
    /// hands each chunk to `f`. `schema` must be the one the rows were
    /// stored under (its digest the stored one), else nothing is read.
    /// A chunk that does not decode, or chunks that do not add up to the
    /// stored row count, are reported as damage.
    pub fn scan_rows(
        &self,
        dataset: &str,
        schema: &Schema,
        mut f: impl FnMut(&[i64]),
    ) -> Result<(), StoreError> {
        self.scan_chunks(dataset, schema, |_, codes| f(codes))
    }

    /// [`Store::scan_rows`], with each chunk's key.
    fn scan_chunks(
        &self,
        dataset: &str,
        schema: &Schema,
        mut f: impl FnMut(sled::IVec, &[i64]),
    ) -> Result<(), StoreError> {
        let Some(stored) = self.schema_digest(dataset)? else {
            return Ok(());
        };
        if stored != schema.digest() {
            return Err(StoreError::SchemaChanged {
                dataset: dataset.to_string(),
            });
        }
        let damaged = |why: String| StoreError::Corrupt {
            what: format!("dataset {dataset:?}"),
            why,
        };
        let mut rows = 0u64;
        for item in self.data.scan_prefix(format!("rows/{dataset}/").as_bytes()) {
            let (k, v) = item?;
            let codes = decode_chunk(schema, &v).map_err(damaged)?;
            rows += (codes.len() / schema.columns.len()) as u64;
            f(k, &codes);
        }
        if rows != self.get_u64(&format!("meta/{dataset}/rows"))? {
            return Err(damaged("stored row count does not match its chunks".into()));
        }
        Ok(())
    }

    /// Replaces the rows of `dataset`, stored under `from`, by the same
    /// rows under `to` (a new version of its columns, `fedq-node
    /// migrate`): each stored chunk is read ([`Store::scan_rows`]),
    /// `translate`d from row-major codes under `from` to row-major codes
    /// under `to` (the same rows, in the same order), and encoded again by
    /// the ingest's chunk encoder; every new chunk and `to`'s digest go in
    /// one atomic batch, then a flush. The row and chunk counts, the
    /// ingested files' markers and the labels of open-domain values (kept
    /// by column name) stay as they are; the ledger and the audit log are
    /// not touched. If `translate` fails on any chunk, or a translated
    /// chunk does not encode under `to`, nothing is written.
    pub fn replace_rows(
        &self,
        dataset: &str,
        from: &Schema,
        to: &Schema,
        mut translate: impl FnMut(&[i64]) -> Result<Vec<i64>, String>,
    ) -> Result<(), StoreError> {
        if self.schema_digest(dataset)?.is_none() {
            // No rows were ever stored: nothing to replace, no digest to set.
            return Ok(());
        }
        let width = to.columns.len();
        let mut batch = sled::Batch::default();
        let mut failed = None;
        self.scan_chunks(dataset, from, |key, codes| {
            if failed.is_some() {
                return;
            }
            let rows = codes.len() / from.columns.len();
            let encoded = translate(codes).and_then(|new| {
                if new.len() != rows * width {
                    return Err(format!(
                        "{rows} rows were translated into {} codes, not {rows} rows of {width}",
                        new.len()
                    ));
                }
                encode_chunk(to, &new)
            });
            match encoded {
                // The same key: the chunk is replaced where it was.
                Ok(bytes) => batch.insert(key, bytes),
                Err(why) => failed = Some(why),
            }
        })?;
        if let Some(why) = failed {
            return Err(StoreError::Translate {
                dataset: dataset.to_string(),
                why,
            });
        }
        batch.insert(
            format!("meta/{dataset}/schema").as_bytes(),
            to.digest().as_bytes(),
        );
        if self.fail.hit(Point::Flush) {
            return Err(StoreError::Write {
                what: "writing the migrated rows",
                error: sled::Error::Io(FailPoints::error(Point::Flush)),
            });
        }
        self.data
            .apply_batch(batch)
            .map_err(|error| StoreError::Write {
                what: "writing the migrated rows",
                error,
            })?;
        self.db.flush().map_err(|error| StoreError::Write {
            what: "flushing the migrated rows to disk",
            error,
        })?;
        Ok(())
    }

    /// Loads a dataset into memory. Refuses rows stored under a different
    /// schema than the one now declared.
    pub fn load_table(&self, dataset: &str, schema: &Schema) -> Result<Table, StoreError> {
        let mut table = Table::new(schema.clone());
        let Some(stored) = self.schema_digest(dataset)? else {
            return Ok(table);
        };
        if stored != schema.digest() {
            return Err(StoreError::SchemaChanged {
                dataset: dataset.to_string(),
            });
        }
        let prefix = format!("rows/{dataset}/");
        for item in self.data.scan_prefix(prefix.as_bytes()) {
            let (_, v) = item?;
            table.append_chunk(&v).map_err(|why| StoreError::Corrupt {
                what: format!("dataset {dataset:?}"),
                why,
            })?;
        }
        let expected = self.get_u64(&format!("meta/{dataset}/rows"))?;
        if !table.has_rows(expected) {
            return Err(StoreError::Corrupt {
                what: format!("dataset {dataset:?}"),
                why: "stored row count does not match its chunks".into(),
            });
        }
        for (i, c) in schema.columns.iter().enumerate() {
            if let fedq_plan::schema::Column::Open { name } = c {
                let prefix = label_key(dataset, name, 0);
                let prefix = &prefix[..prefix.len() - 8];
                let mut labels = std::collections::HashMap::new();
                for item in self.data.scan_prefix(prefix) {
                    let (k, v) = item?;
                    labels.insert(
                        decode_u64(&k[prefix.len()..]),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
                table.set_labels(i, labels);
            }
        }
        // Choose the records that count per person now, not on the first query.
        table.prepare();
        Ok(table)
    }

    fn get_u64(&self, key: &str) -> Result<u64, StoreError> {
        Ok(self.data.get(key)?.map(|v| decode_u64(&v)).unwrap_or(0))
    }
}

/// Key of the label of an open-domain value: `label/<ds>/<column>/` and
/// the code (u64 BE).
fn label_key(dataset: &str, column: &str, code: u64) -> Vec<u8> {
    let mut k = format!("label/{dataset}/{column}/").into_bytes();
    k.extend_from_slice(&code.to_be_bytes());
    k
}

fn rows_key(dataset: &str, chunk: u64) -> Vec<u8> {
    let mut k = format!("rows/{dataset}/").into_bytes();
    k.extend_from_slice(&chunk.to_be_bytes());
    k
}

/// Decodes a big-endian u64, treating a malformed value as 0.
pub fn decode_u64(v: &[u8]) -> u64 {
    <[u8; 8]>::try_from(v).map(u64::from_be_bytes).unwrap_or(0)
}

/// sled holds an exclusive lock on the store; when a node restarts within
/// the same process its previous instance may still be releasing it, so
/// retry briefly before reporting that another process has it.
pub(crate) fn open_with_retry(dir: &Path) -> Result<sled::Db, StoreError> {
    let mut last = None;
    for _ in 0..50 {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            // sled's default (LowSpace) cleans segments more eagerly; with
            // the ledger's small, frequent commits HighThroughput took node
            // CPU per query from 1.8 to 1.5-1.7 ms and 16-client throughput
            // from ~700 to 850-1,030 q/s (BENCHMARKS.md). The mode is not
            // part of the on-disk format.
            .mode(sled::Mode::HighThroughput)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("lock") =>
            {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(error) => {
                return Err(StoreError::Open {
                    path: dir.to_path_buf(),
                    error,
                })
            }
        }
    }
    Err(StoreError::Locked {
        path: dir.to_path_buf(),
        error: last.unwrap_or_else(|| std::io::Error::other("the lock is held")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use fedq_plan::schema::{open_code, ColumnSpec, ColumnType, MISSING};

    use ColumnSpec as C;

    fn open(name: &str) -> ColumnSpec {
        ColumnSpec {
            open: Some(true),
            ..C::new(name, ColumnType::Categorical)
        }
    }

    /// Every kind of column, packed in every width (1, 2, 4 and 8 bytes).
    fn every_kind() -> Schema {
        let wide: Vec<String> = (0..300).map(|i| format!("v{i}")).collect();
        let wide: Vec<&str> = wide.iter().map(String::as_str).collect();
        Schema::from_specs(
            "d",
            &[
                C::categorical("small", &["a", "b", "c"]),
                C::categorical("wide", &wide),
                C::integer("year", 2002, 2025),
                C::integer("big", -(1 << 40), 1 << 40),
                C::integer("mid", -5, 70_000),
                C::new("flag", ColumnType::Boolean),
                open("place"),
            ],
        )
        .unwrap()
        .with_person_unit("person", 3)
        .unwrap()
    }

    /// The decoder reads back exactly what the ingest's encoder wrote,
    /// missing values and the ends of every domain and bound included:
    /// it restates the table's packing, and this keeps the two in step.
    #[test]
    fn a_chunk_decodes_to_the_codes_it_was_encoded_from() {
        let schema = every_kind();
        let rows: Vec<[i64; 8]> = vec![
            [0, 0, 2002, -(1 << 40), -5, 0, open_code("Kyiv"), 1],
            [2, 299, 2025, 1 << 40, 70_000, 1, open_code(""), i64::MAX],
            [MISSING; 8],
            [1, 150, 2013, 0, 0, MISSING, MISSING, 12_345],
        ];
        let codes: Vec<i64> = rows.iter().flatten().copied().collect();
        let bytes = encode_chunk(&schema, &codes).unwrap();
        assert_eq!(decode_chunk(&schema, &bytes).unwrap(), codes);
        assert!(decode_chunk(&schema, &bytes[..bytes.len() - 1])
            .unwrap_err()
            .contains("truncated"));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_chunk(&schema, &longer)
            .unwrap_err()
            .contains("trailing"));
        // An offset past a column's span (here the first column's, 3 is
        // its missing code) is damage, not a value.
        let mut bad = bytes;
        bad[5] = 4;
        assert!(decode_chunk(&schema, &bad)
            .unwrap_err()
            .contains("column \"small\""));
    }

    fn old_schema() -> Schema {
        Schema::from_specs(
            "cases",
            &[
                C::categorical("source", &["Hotline", "NGO"]),
                C::integer("months", 0, 120),
                open("place"),
            ],
        )
        .unwrap()
    }

    /// A new category in front (every stored code moves) and a new flag.
    fn new_schema() -> Schema {
        Schema::from_specs(
            "cases",
            &[
                C::categorical("source", &["Government", "Hotline", "NGO"]),
                C::integer("months", 0, 120),
                open("place"),
                C::new("isAbduction", ColumnType::Boolean),
            ],
        )
        .unwrap()
    }

    /// Old rows to new ones, as `fedq-node migrate` translates them.
    fn translate(codes: &[i64]) -> Result<Vec<i64>, String> {
        Ok(codes
            .chunks(3)
            .flat_map(|r| {
                let source = if r[0] == MISSING { MISSING } else { r[0] + 1 };
                [source, r[1], r[2], MISSING]
            })
            .collect())
    }

    /// A store with `rows` old rows ingested in two files (two chunks).
    fn stored(dir: &Path, rows: usize) -> (Store, Vec<i64>) {
        let store = Store::open(dir).unwrap();
        let schema = old_schema();
        let codes: Vec<i64> = (0..rows as i64)
            .flat_map(|i| {
                [
                    if i % 7 == 0 { MISSING } else { i % 2 },
                    i % 121,
                    open_code(if i % 2 == 0 { "Odesa" } else { "Lviv" }),
                ]
            })
            .collect();
        let labels = [
            (2, open_code("Odesa"), "Odesa".to_string()),
            (2, open_code("Lviv"), "Lviv".to_string()),
        ];
        let half = codes.len() / 2 / 3 * 3;
        store
            .append_rows("cases", &schema, &codes[..half], &labels, "file-1")
            .unwrap();
        store
            .append_rows("cases", &schema, &codes[half..], &labels, "file-2")
            .unwrap();
        (store, codes)
    }

    fn rows_of(store: &Store, schema: &Schema) -> Vec<i64> {
        let mut all = Vec::new();
        store
            .scan_rows("cases", schema, |c| all.extend_from_slice(c))
            .unwrap();
        all
    }

    #[test]
    fn replacing_rows_translates_every_chunk_and_keeps_counts_markers_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let (store, codes) = stored(dir.path(), 1001);
        assert_eq!(rows_of(&store, &old_schema()), codes);
        let (old, new) = (old_schema(), new_schema());
        store.replace_rows("cases", &old, &new, translate).unwrap();

        assert_eq!(store.schema_digest("cases").unwrap(), Some(new.digest()));
        assert_eq!(rows_of(&store, &new), translate(&codes).unwrap());
        assert!(store.was_ingested("cases", "file-1").unwrap());
        assert!(store.was_ingested("cases", "file-2").unwrap());
        drop(store);
        // Reopened, the rows load under the new schema only, with their
        // count and the open column's labels.
        let store = Store::open(dir.path()).unwrap();
        let table = store.load_table("cases", &new).unwrap();
        assert!(table.has_rows(1001));
        assert_eq!(
            table.open_label(2, open_code("Lviv") as u64).as_deref(),
            Some("Lviv")
        );
        assert!(matches!(
            store.load_table("cases", &old),
            Err(StoreError::SchemaChanged { .. })
        ));
        // Rows are still appended after the replaced chunks.
        let more = translate(&codes[..30]).unwrap();
        assert_eq!(
            store
                .append_rows("cases", &new, &more, &[], "file-3")
                .unwrap(),
            1011
        );
    }

    /// The bytes of every key of tree `data`.
    fn dump(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
        store
            .data
            .iter()
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    #[test]
    fn a_failed_translation_a_wrong_schema_or_a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = stored(dir.path(), 500);
        let before = dump(&store);
        let (old, new) = (old_schema(), new_schema());

        // The translation fails on the second chunk, after the first
        // was translated: nothing of either is written.
        let mut seen = 0;
        let e = store
            .replace_rows("cases", &old, &new, |c| {
                seen += 1;
                if seen == 2 {
                    Err("no".into())
                } else {
                    translate(c)
                }
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("no; nothing was changed"), "{e}");
        assert_eq!(seen, 2);
        // A translation that drops a row.
        let e = store
            .replace_rows("cases", &old, &new, |c| {
                translate(c).map(|t| t[4..].to_vec())
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("translated into"), "{e}");
        // Rows read under a schema they were not stored under.
        assert!(matches!(
            store.replace_rows("cases", &new, &old, |c| Ok(c.to_vec())),
            Err(StoreError::SchemaChanged { .. })
        ));
        // The batch's write fails as on a full disk.
        crate::fault::fail_point::arm(dir.path(), Point::Flush, 0, 1);
        let e = store
            .replace_rows("cases", &old, &new, translate)
            .unwrap_err()
            .to_string();
        crate::fault::fail_point::disarm(dir.path());
        assert!(e.contains("no space left on device"), "{e}");
        assert_eq!(dump(&store), before);

        // Without a stored row there is nothing to replace and no digest
        // to set.
        store.replace_rows("other", &old, &new, translate).unwrap();
        assert_eq!(store.schema_digest("other").unwrap(), None);
        assert_eq!(dump(&store), before);
    }
}
