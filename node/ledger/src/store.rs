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
//! whole or not at all.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fault::StoreFailed;
use crate::group_commit::GroupCommit;
use crate::journal::JournalError;
use fedq_engine::table::{encode_chunk, Table};
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
         keep the schema it was ingested with, or ingest into a new store"
    )]
    IngestSchema {
        /// The dataset.
        dataset: String,
    },
    /// The configured schema differs from the one the stored rows were
    /// ingested under.
    #[error(
        "dataset {dataset:?}: the schema in node.toml differs from the one its rows were ingested under; \
         restore the previous schema, or ingest into a new store"
    )]
    SchemaChanged {
        /// The dataset.
        dataset: String,
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
        let fail = crate::fault::fail_point::FailPoints::for_store(dir);
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
                fail,
            )?),
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
fn open_with_retry(dir: &Path) -> Result<sled::Db, StoreError> {
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
