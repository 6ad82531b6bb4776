//! A dataset whose rows stay in the partner's own PostgreSQL database (or
//! a compatible engine: Citus, YugabyteDB, CockroachDB).
//!
//! The node never copies rows out: for each query it sends one
//! parameterised aggregation ([`statement`]) and receives only the exact
//! per-cell aggregates, which go straight to [`fedq_dp::mechanism`] exactly as
//! the embedded engine's do. The declared schema in `node.toml` stays the
//! only source of sensitivity; the database is checked against it
//! ([`PgSource::connect`]) and never consulted for bounds or domains.
//!
//! The connection URL is read from a file or an environment variable and
//! is never logged: errors are redacted ([`redact`]) and carry no values
//! of the database.

pub mod mapped;
pub mod statement;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config};

use crate::mapping::{ColumnCoverage, Mapped, Mapper, Mapping, Unmapped};
use crate::source::SourceConfig;
use fedq_dp::mechanism::Exact;
use fedq_plan::plan::Plan;
use fedq_plan::schema::MISSING;
use fedq_plan::schema::{Column, Schema};
use statement::{DbType, Relation};

/// Extra time the node waits beyond the database's own statement timeout
/// before giving up on its side (covers connecting and the round trips).
const CLIENT_GRACE: Duration = Duration::from_secs(2);

/// Why the database could not answer. The analyst sees only
/// [`SourceError::public`]; the operator's log gets [`SourceError::detail`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceError {
    /// Did not answer within the statement timeout.
    Timeout,
    /// Could not connect, or the connection failed.
    Unreachable(String),
    /// The table or its columns do not match the declared schema.
    Mismatch(String),
    /// The database refused or failed the statement.
    Failed(String),
}

impl SourceError {
    /// What the analyst is told: the kind of failure only, which depends on
    /// the configuration and the database's state, never on its rows.
    pub fn public(&self) -> &'static str {
        match self {
            SourceError::Timeout => "its database did not answer in time",
            SourceError::Unreachable(_) => "its database is unreachable",
            SourceError::Mismatch(_) => {
                "its database table does not match the declared schema (the node's operator has the details)"
            }
            SourceError::Failed(_) => {
                "its database failed the query (the node's operator has the details)"
            }
        }
    }

    /// Whether this failure can depend on the rows: a timeout, or a failed
    /// statement. Handing the reserved budget back after such a failure
    /// would answer a yes/no question about the data for free (and as often
    /// as asked), so it stays spent; an unreachable database or a schema
    /// mismatch says nothing about the rows, and its reservation is returned.
    pub fn data_dependent(&self) -> bool {
        matches!(self, SourceError::Timeout | SourceError::Failed(_))
    }

    /// What the operator's log gets (already redacted).
    pub fn detail(&self) -> &str {
        match self {
            SourceError::Timeout => "statement timeout",
            SourceError::Unreachable(s) | SourceError::Mismatch(s) | SourceError::Failed(s) => s,
        }
    }
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.public(), self.detail())
    }
}

impl std::error::Error for SourceError {}

/// Why a dataset's `[datasets.source]` cannot be used ([`PgSource::new`]).
/// Every message names the dataset and the setting at fault, and never
/// the database URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum PgConfigError {
    /// `source.url_file` could not be read.
    #[error("dataset {dataset:?}: cannot read source.url_file {}: {error}", path.display())]
    UrlFile {
        /// The dataset.
        dataset: String,
        /// The file.
        path: std::path::PathBuf,
        /// The system's error.
        error: std::io::Error,
    },
    /// `source.url_env` names an unset (or non-UTF-8) variable.
    #[error(
        "dataset {dataset:?}: environment variable {var} (source.url_env) is not set or not UTF-8"
    )]
    UrlEnv {
        /// The dataset.
        dataset: String,
        /// The variable.
        var: String,
    },
    /// Neither `source.url_file` nor `source.url_env` is set.
    #[error("dataset {dataset:?}: source needs url_file or url_env")]
    NoUrl {
        /// The dataset.
        dataset: String,
    },
    /// The URL does not parse (its text is withheld).
    #[error(
        "dataset {dataset:?}: the database URL does not parse (expected postgres://user@host:port/database; details withheld: it may hold a password)"
    )]
    UrlSyntax {
        /// The dataset.
        dataset: String,
    },
    /// `source.ca` cannot be read or used.
    #[error("dataset {dataset:?}: {why}")]
    Ca {
        /// The dataset.
        dataset: String,
        /// What is wrong, naming the file.
        why: String,
    },
    /// `[datasets.mapping]` does not compile against the schema.
    #[error("{0}")]
    Mapping(String),
    /// `source.table` is not a plain `table` or `schema.table`.
    #[error("{0}")]
    Table(String),
}

/// A connected client and the database type of every declared column.
struct Connected {
    client: Client,
    types: Vec<DbType>,
}

/// One dataset's PostgreSQL table or view.
pub struct PgSource {
    /// Dataset name (for messages).
    dataset: String,
    /// The declared schema (what the node's answers are in).
    schema: Schema,
    /// The declared schema with each column named as in the database (a
    /// mapping's `from`): what statements are built from.
    sql_schema: Schema,
    /// The dataset's partner mapping, if any ([`mapped`]).
    mapper: Option<Mapper>,
    /// Per declared column: whether the mapping maps its values.
    mapped: Vec<bool>,
    /// Per declared column: what is known in advance of its raw values
    /// ([`Mapper::spellings`], [`Mapper::integers_known`]; empty when not
    /// mapped).
    known: Vec<mapped::Known>,
    /// Where the rows are.
    relation: Relation,
    /// Parsed connection settings (holds the password; never printed).
    config: Config,
    /// TLS to the database, when a CA is configured.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// The database's per-statement limit.
    statement_timeout: Duration,
    /// The checked connection, made on first use and again after a
    /// failure. A tokio-postgres client pipelines concurrent queries, so one
    /// connection serves every query of the dataset; the lock is held only
    /// to connect or to clone the handle.
    conn: tokio::sync::Mutex<Option<Arc<Connected>>>,
    /// The fewest raw groups a statement takes before its keys are coded
    /// in the database instead ([`statement::RAW_GROUPS_MIN`]; lower in
    /// tests).
    raw_groups: usize,
    /// How many queries had more raw groups than that and were asked again.
    coded_again: AtomicU64,
}

impl PgSource {
    /// Reads the URL (file or environment) and the CA, and parses them.
    /// Does not connect. Errors never contain the URL.
    pub fn new(
        dataset: &str,
        schema: Schema,
        src: &SourceConfig,
        base: &Path,
    ) -> Result<PgSource, PgConfigError> {
        let url = match (&src.url_file, &src.url_env) {
            (Some(file), _) => {
                let path = if file.is_absolute() {
                    file.clone()
                } else {
                    base.join(file)
                };
                std::fs::read_to_string(&path)
                    .map_err(|error| PgConfigError::UrlFile {
                        dataset: dataset.to_string(),
                        path: path.clone(),
                        error,
                    })?
                    .trim()
                    .to_string()
            }
            (None, Some(var)) => std::env::var(var).map_err(|_| PgConfigError::UrlEnv {
                dataset: dataset.to_string(),
                var: var.clone(),
            })?,
            (None, None) => {
                return Err(PgConfigError::NoUrl {
                    dataset: dataset.to_string(),
                })
            }
        };
        let mut config: Config = url.parse().map_err(|_| PgConfigError::UrlSyntax {
            dataset: dataset.to_string(),
        })?;
        config.application_name("fedq-node");
        config.connect_timeout(Duration::from_millis(src.statement_timeout_ms));
        let tls = match &src.ca {
            Some(ca) => {
                let path = if ca.is_absolute() {
                    ca.clone()
                } else {
                    base.join(ca)
                };
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(tls_connector(&path).map_err(|why| PgConfigError::Ca {
                    dataset: dataset.to_string(),
                    why,
                })?)
            }
            None => None,
        };
        let (schema_name, table) = src.table_parts().map_err(PgConfigError::Table)?;
        let mapped = vec![false; schema.columns.len()];
        Ok(PgSource {
            dataset: dataset.to_string(),
            sql_schema: schema.clone(),
            mapper: None,
            known: vec![mapped::Known::default(); mapped.len()],
            mapped,
            relation: Relation {
                schema: schema_name.map(str::to_string),
                table: table.to_string(),
            },
            schema,
            config,
            tls,
            statement_timeout: Duration::from_millis(src.statement_timeout_ms),
            conn: tokio::sync::Mutex::new(None),
            raw_groups: statement::RAW_GROUPS_MIN,
            coded_again: AtomicU64::new(0),
        })
    }

    /// Reads the partner's own columns and coding through `mapping`
    /// (`[datasets.mapping]`): renamed columns by their own names, mapped
    /// columns through the same [`Mapper`] as CSV ingest, in the node
    /// ([`mapped`]). An empty mapping changes nothing.
    pub fn with_mapping(mut self, mapping: &Mapping) -> Result<PgSource, PgConfigError> {
        if mapping.is_empty() {
            return Ok(self);
        }
        let mapper = Mapper::compile(&self.dataset, &self.schema, mapping)
            .map_err(PgConfigError::Mapping)?;
        let mut sql_schema = self.schema.clone();
        for (i, c) in sql_schema.columns.iter_mut().enumerate() {
            let name = mapper.source(i).to_string();
            match c {
                Column::Categorical { name: n, .. }
                | Column::Integer { name: n, .. }
                | Column::Open { name: n }
                | Column::Boolean { name: n }
                | Column::PersonId { name: n } => *n = name,
            }
        }
        self.mapped = (0..self.schema.columns.len())
            .map(|i| mapper.is_mapped(i))
            .collect();
        self.known = self
            .schema
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| mapped::Known {
                spellings: mapper.spellings(i, c),
                integers: mapper.integers_known(i, c),
            })
            .collect();
        self.sql_schema = sql_schema;
        self.mapper = Some(mapper);
        Ok(self)
    }

    /// The mapping's coverage over the table, for the operator (`fedq-node
    /// check`; never for analysts): per mapped column, the rows coded,
    /// missing and unmapped, and the commonest unmapped values, as CSV
    /// ingest reports them. The second list names each value a strict
    /// column (`unmapped = "error"`) cannot place: a database source has no
    /// ingest to fail, so its queries read such values as missing, and
    /// `check` fails on them instead.
    pub async fn coverage(&self) -> Result<(Vec<ColumnCoverage>, Vec<String>), SourceError> {
        let Some(mapper) = &self.mapper else {
            return Ok((Vec::new(), Vec::new()));
        };
        let c = self.connected().await?;
        let mut out = Vec::new();
        let mut strict = Vec::new();
        for (i, column) in self.schema.columns.iter().enumerate() {
            if !self.mapped[i] {
                continue;
            }
            let source = self.sql_schema.columns[i].name();
            let sql = format!(
                "SELECT {}::text, COUNT(*) FROM {} GROUP BY 1 LIMIT $1::bigint",
                statement::quote(source),
                self.relation.quoted()
            );
            let limit = mapped::MAPPED_GROUPS_MAX as i64;
            let rows = self
                .query(&c, &sql, &[statement::Param::Int(limit)])
                .await?;
            let mut cov = ColumnCoverage {
                column: column.name().to_string(),
                source: source.to_string(),
                mapped: true,
                ..ColumnCoverage::default()
            };
            let mut unmapped = Vec::new();
            for row in rows {
                let raw: Option<String> = row.try_get(0).map_err(|e| self.failed(&e))?;
                let n: i64 = row.try_get(1).map_err(|e| self.failed(&e))?;
                let n = n as u64;
                match raw.as_deref().map(|t| mapper.map(i, column, t)) {
                    None | Some(Some(Mapped::Code(MISSING))) => cov.missing += n,
                    Some(Some(Mapped::Unmapped(policy))) => {
                        cov.unmapped += n;
                        let t = raw.unwrap_or_default().trim().to_string();
                        if policy == Unmapped::Error {
                            strict.push(format!(
                                "column {:?} (read from {source:?}): the value {t:?} ({n} rows) is not in [datasets.mapping.{}]",
                                column.name(),
                                column.name()
                            ));
                        }
                        unmapped.push((t, n));
                    }
                    Some(_) => cov.coded += n,
                }
            }
            unmapped.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            unmapped.truncate(crate::mapping::UNMAPPED_SHOWN);
            cov.unmapped_values = unmapped;
            out.push(cov);
        }
        Ok((out, strict))
    }

    /// How many queries found more raw groups than a statement takes, and
    /// were asked again with their keys coded in the database.
    pub fn coded_again(&self) -> u64 {
        self.coded_again.load(Ordering::Relaxed)
    }

    /// Lowers the raw-group cap (tests of the fallback).
    #[cfg(test)]
    pub(crate) fn with_raw_groups(mut self, n: usize) -> PgSource {
        self.raw_groups = n;
        self
    }

    /// The configured table, as written in `node.toml`.
    pub fn relation(&self) -> String {
        match &self.relation.schema {
            Some(s) => format!("{s}.{}", self.relation.table),
            None => self.relation.table.clone(),
        }
    }

    /// How long a one-phase query's budget is held as a reservation while
    /// the database computes: the longest a fetch can take (connecting and
    /// the statement, both within the statement timeout plus a grace), with
    /// a margin. Past it the sweeper returns the budget and a late answer
    /// is discarded.
    pub fn hold_ms(&self) -> u64 {
        (self.statement_timeout + CLIENT_GRACE * 3).as_millis() as u64
    }

    /// Connects (if not connected) and checks the table against the
    /// declared schema. Called at start and before each query.
    pub async fn connect(&self) -> Result<(), SourceError> {
        self.connected().await.map(|_| ())
    }

    async fn connected(&self) -> Result<Arc<Connected>, SourceError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.client.is_closed() {
                return Ok(Arc::clone(c));
            }
        }
        *slot = None;
        let limit = self.statement_timeout + CLIENT_GRACE;
        let c = tokio::time::timeout(limit, self.open())
            .await
            .map_err(|_| SourceError::Unreachable("connecting timed out".into()))??;
        let c = Arc::new(c);
        *slot = Some(Arc::clone(&c));
        Ok(c)
    }

    async fn open(&self) -> Result<Connected, SourceError> {
        let client = match &self.tls {
            Some(tls) => {
                let (client, conn) = self
                    .config
                    .connect(tls.clone())
                    .await
                    .map_err(|e| self.unreachable(&e))?;
                tokio::spawn(conn);
                client
            }
            None => {
                let (client, conn) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| self.unreachable(&e))?;
                tokio::spawn(conn);
                client
            }
        };
        // Session settings, as parameters: the database stops a statement
        // that runs too long, and this session never writes.
        client
            .execute(
                "SELECT set_config('statement_timeout', $1, false), set_config('default_transaction_read_only', 'on', false)",
                &[&self.statement_timeout.as_millis().to_string()],
            )
            .await
            .map_err(|e| self.failed(&e))?;
        let types = self.check(&client).await?;
        Ok(Connected { client, types })
    }

    /// Reads the table's columns from `information_schema` and checks every
    /// declared column exists with a compatible type; lists every problem.
    async fn check(&self, client: &Client) -> Result<Vec<DbType>, SourceError> {
        let rows = client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = COALESCE($1::text, current_schema()) AND table_name = $2::text",
                &[&self.relation.schema, &self.relation.table],
            )
            .await
            .map_err(|e| self.failed(&e))?;
        let found: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        check_columns(
            &self.dataset,
            &self.relation(),
            &self.sql_schema,
            &self.mapped,
            &found,
        )
        .map_err(SourceError::Mismatch)
    }

    /// The exact aggregates of `plan`, computed by the database, in the
    /// engine's cell order. Bounded by the statement timeout on both sides.
    /// Opaque, as [`crate::table::Table::exact`]'s are.
    pub async fn exact(&self, plan: &Plan) -> Result<Vec<Exact>, SourceError> {
        let values = self.exact_values(plan).await?;
        Ok(values.into_iter().map(Exact::new).collect())
    }

    /// The values of [`PgSource::exact`], readable: for this crate only.
    pub(crate) async fn exact_values(&self, plan: &Plan) -> Result<Vec<Vec<i64>>, SourceError> {
        let limit = self.statement_timeout + CLIENT_GRACE;
        match tokio::time::timeout(limit, self.exact_within(plan)).await {
            Ok(r) => r,
            Err(_) => {
                // The connection may be stuck: make the next query reconnect.
                *self.conn.lock().await = None;
                Err(SourceError::Timeout)
            }
        }
    }

    async fn exact_within(&self, plan: &Plan) -> Result<Vec<Vec<i64>>, SourceError> {
        let c = self.connected().await?;
        if let (Some(mapper), Some(st)) = (&self.mapper, self.mapped_statement(&c, plan)) {
            return self.exact_mapped(&c, plan, mapper, &st).await;
        }
        let st = self.fast_statement(&c, plan, Some(self.raw_groups));
        let rows = self.run(&c, &st).await?;
        let rows = match st.cap {
            // More raw groups than expected (a column of free text): ask
            // again with the keys coded in the database.
            Some(cap) if rows.len() > cap => {
                self.coded_again.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    dataset = %self.dataset,
                    cap,
                    "more raw groups than the push-down takes; the keys are coded in the database instead"
                );
                let coded = self.fast_statement(&c, plan, None);
                self.run(&c, &coded).await?
            }
            _ => rows,
        };
        statement::assemble(plan, rows).map_err(SourceError::Failed)
    }

    /// The statement [`PgSource::exact`] sends first for `plan`, and its
    /// parameters (for `EXPLAIN` in benchmarks and by operators; its
    /// values are the plan's literals and declared bounds, never rows).
    /// Connects if needed.
    pub async fn statement(
        &self,
        plan: &Plan,
    ) -> Result<(String, Vec<statement::Param>), SourceError> {
        let c = self.connected().await?;
        Ok(match self.mapped_statement(&c, plan) {
            Some(st) => (st.sql, st.params),
            None => {
                let st = self.fast_statement(&c, plan, Some(self.raw_groups));
                (st.sql, st.params)
            }
        })
    }

    /// The statement of a plan reading a mapped column ([`mapped`]); `None`
    /// when it reads none.
    fn mapped_statement(&self, c: &Connected, plan: &Plan) -> Option<mapped::MappedStatement> {
        self.mapper.as_ref()?;
        mapped::touches(plan, &self.sql_schema, &self.mapped).then(|| {
            mapped::build(
                plan,
                &self.sql_schema,
                &c.types,
                &self.mapped,
                &self.known,
                &self.relation,
            )
        })
    }

    /// The fast path's statement: raw keys with at least `raw_groups`
    /// groups, or keys coded in the database (`None`).
    fn fast_statement(
        &self,
        c: &Connected,
        plan: &Plan,
        raw_groups: Option<usize>,
    ) -> statement::Statement {
        statement::build_with(plan, &self.sql_schema, &c.types, &self.relation, raw_groups)
    }

    /// A query reading mapped columns: the database groups, the node maps
    /// ([`mapped`]).
    async fn exact_mapped(
        &self,
        c: &Connected,
        plan: &Plan,
        mapper: &Mapper,
        st: &mapped::MappedStatement,
    ) -> Result<Vec<Vec<i64>>, SourceError> {
        let rows = self.query(c, &st.sql, &st.params).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut groups = Vec::with_capacity(st.groups.len());
            for (i, g) in st.groups.iter().enumerate() {
                let v = match g {
                    mapped::Group::Truth => row.try_get::<_, bool>(i).map(mapped::GroupValue::Bool),
                    mapped::Group::Residue(_) => row
                        .try_get::<_, Option<Vec<Option<String>>>>(i)
                        .map(mapped::GroupValue::Residue),
                    // A number read as the database prints it.
                    mapped::Group::Mapped(col) if c.types[*col] == DbType::Integer => row
                        .try_get::<_, Option<i64>>(i)
                        .map(|v| mapped::GroupValue::Text(v.map(|v| v.to_string()))),
                    mapped::Group::Mapped(_) | mapped::Group::Key(statement::KeyRead::Label(_)) => {
                        row.try_get::<_, Option<String>>(i)
                            .map(mapped::GroupValue::Text)
                    }
                    mapped::Group::Value(col)
                        if matches!(self.schema.columns[*col], Column::Categorical { .. }) =>
                    {
                        row.try_get::<_, Option<String>>(i)
                            .map(mapped::GroupValue::Text)
                    }
                    _ => row
                        .try_get::<_, Option<i64>>(i)
                        .map(mapped::GroupValue::Int),
                }
                .map_err(|e| self.failed(&e))?;
                groups.push(v);
            }
            let n = st.groups.len();
            let count = row.try_get::<_, &str>(n).map_err(|e| self.failed(&e))?;
            let count = statement::parse_value(count).map_err(SourceError::Failed)?;
            let mut values = Vec::with_capacity(row.len() - n - 1);
            for i in n + 1..row.len() {
                let text = row.try_get::<_, &str>(i).map_err(|e| self.failed(&e))?;
                values.push(statement::parse_value(text).map_err(SourceError::Failed)?);
            }
            out.push((groups, count, values));
        }
        mapped::assemble(st, plan, &self.schema, mapper, out).map_err(SourceError::Failed)
    }

    /// Sends one statement; a cancelled one is a timeout.
    async fn query(
        &self,
        c: &Connected,
        sql: &str,
        params: &[statement::Param],
    ) -> Result<Vec<tokio_postgres::Row>, SourceError> {
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_sql()).collect();
        c.client.query(sql, &params).await.map_err(|e| {
            if e.code() == Some(&SqlState::QUERY_CANCELED) {
                SourceError::Timeout
            } else if c.client.is_closed() {
                self.unreachable(&e)
            } else {
                self.failed(&e)
            }
        })
    }

    /// Runs a statement and reads its rows: each key as
    /// [`statement::Statement::keys`] says, each value from its text.
    async fn run(
        &self,
        c: &Connected,
        st: &statement::Statement,
    ) -> Result<Vec<statement::ResultRow>, SourceError> {
        let rows = self.query(c, &st.sql, &st.params).await?;
        let keys = st.keys.len();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut k = Vec::with_capacity(keys);
            for (i, read) in st.keys.iter().enumerate() {
                k.push(
                    match read {
                        statement::KeyRead::Label(_) => {
                            row.try_get::<_, Option<&str>>(i).map(|l| read.label(l))
                        }
                        _ => row.try_get::<_, Option<i64>>(i).map(|v| read.number(v)),
                    }
                    .map_err(|e| self.failed(&e))?,
                );
            }
            let mut v = Vec::with_capacity(row.len() - keys);
            for i in keys..row.len() {
                let text = row.try_get::<_, &str>(i).map_err(|e| self.failed(&e))?;
                v.push(statement::parse_value(text).map_err(SourceError::Failed)?);
            }
            out.push((k, v));
        }
        Ok(out)
    }

    fn unreachable(&self, e: &tokio_postgres::Error) -> SourceError {
        SourceError::Unreachable(self.describe(e))
    }

    fn failed(&self, e: &tokio_postgres::Error) -> SourceError {
        SourceError::Failed(self.describe(e))
    }

    /// An error for the operator's log. A database error's message can
    /// quote a value (e.g. a failed cast), so for errors about data (SQLSTATE
    /// classes 22 and 23) only the code is kept; other messages (connection,
    /// authentication, permissions, missing relations) are kept, redacted.
    fn describe(&self, e: &tokio_postgres::Error) -> String {
        let text = match e.as_db_error() {
            Some(db) if matches!(&db.code().code()[..2], "22" | "23") => {
                format!(
                    "database error SQLSTATE {} (message withheld: it may quote data)",
                    db.code().code()
                )
            }
            Some(db) => format!(
                "database error SQLSTATE {}: {}",
                db.code().code(),
                db.message()
            ),
            None => e.to_string(),
        };
        redact(&text, &self.config)
    }
}

/// Removes the configured password from a message, should any error
/// echo it.
pub fn redact(text: &str, config: &Config) -> String {
    let mut out = text.to_string();
    if let Some(pw) = config.get_password() {
        let pw = String::from_utf8_lossy(pw);
        if !pw.is_empty() {
            out = out.replace(pw.as_ref(), "***");
        }
    }
    out
}

/// A rustls connector trusting only the CA in `path` (PEM), with the same
/// ring provider as the node's gRPC side.
fn tls_connector(path: &Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read source.ca {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("source.ca {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("source.ca {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("source.ca {} holds no certificate", path.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// What database types a declared column accepts.
fn compatible(column: &Column, data_type: &str, mapped: bool) -> Option<DbType> {
    let t = match data_type {
        "text" | "character varying" | "character" => DbType::Text,
        "smallint" | "integer" | "bigint" => DbType::Integer,
        "boolean" => DbType::Boolean,
        _ => return None,
    };
    match (column, t) {
        // A mapped column is read as text, whatever its type.
        _ if mapped => Some(t),
        (Column::Categorical { .. }, DbType::Text)
        | (Column::Integer { .. }, DbType::Integer)
        | (Column::Boolean { .. }, DbType::Boolean | DbType::Integer)
        | (Column::PersonId { .. }, DbType::Text | DbType::Integer) => Some(t),
        _ => None,
    }
}

/// Checks the database's columns (`(name, information_schema data_type)`)
/// against the declaration; the error lists every problem.
pub fn check_columns(
    dataset: &str,
    relation: &str,
    schema: &Schema,
    mapped: &[bool],
    found: &[(String, String)],
) -> Result<Vec<DbType>, String> {
    if found.is_empty() {
        return Err(format!(
            "dataset {dataset}: table or view {relation} does not exist or its columns are not readable by the database role"
        ));
    }
    let mut types = Vec::new();
    let mut problems = Vec::new();
    for (i, c) in schema.columns.iter().enumerate() {
        let mapped = mapped.get(i).copied().unwrap_or(false);
        let (kind, wants) = match c {
            // Read as text and mapped in the node.
            _ if mapped => (
                "mapped ([datasets.mapping])",
                "text, character varying, character, smallint, integer, bigint or boolean",
            ),
            Column::Categorical { .. } | Column::Open { .. } => {
                ("categorical", "text, character varying or character")
            }
            Column::Integer { .. } => ("integer", "smallint, integer or bigint"),
            Column::Boolean { .. } => ("boolean", "boolean, smallint, integer or bigint"),
            Column::PersonId { .. } => (
                "the person identifier",
                "text, character varying, character, smallint, integer or bigint",
            ),
        };
        match found.iter().find(|(n, _)| n == c.name()) {
            None => {
                let hint = found
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(c.name()))
                    .map(|(n, _)| format!(" (the database has {n}; names are case-sensitive)"))
                    .unwrap_or_default();
                problems.push(format!("column {} is missing from {relation}{hint}", c.name()));
            }
            Some((_, t)) => match compatible(c, t, mapped) {
                Some(db) => types.push(db),
                None => problems.push(format!(
                    "column {} is declared {kind} but the database column is {t} (a {kind} column needs {wants})",
                    c.name()
                )),
            },
        }
    }
    if problems.is_empty() {
        Ok(types)
    } else {
        Err(format!("dataset {dataset}: {}", problems.join("; ")))
    }
}

#[cfg(test)]
mod equivalence;

#[cfg(test)]
mod check_tests {
    use super::*;
    use fedq_plan::schema::{ColumnSpec, ColumnType};

    #[test]
    fn names_every_mismatch() {
        let schema = Schema::from_specs(
            "cases",
            &[
                ColumnSpec {
                    open: None,
                    name: "ageBroad".into(),
                    kind: ColumnType::Categorical,
                    domain: Some(vec!["0--8".into()]),
                    min: None,
                    max: None,
                    bins: None,
                },
                ColumnSpec {
                    open: None,
                    name: "flag".into(),
                    kind: ColumnType::Boolean,
                    domain: None,
                    min: None,
                    max: None,
                    bins: None,
                },
                ColumnSpec {
                    open: None,
                    name: "gone".into(),
                    kind: ColumnType::Boolean,
                    domain: None,
                    min: None,
                    max: None,
                    bins: None,
                },
            ],
        )
        .unwrap();
        let found = vec![
            ("ageBroad".to_string(), "integer".to_string()),
            ("flag".to_string(), "smallint".to_string()),
            ("GONE".to_string(), "boolean".to_string()),
        ];
        let e = check_columns("cases", "public.cases", &schema, &[], &found).unwrap_err();
        assert!(
            e.contains(
                "column ageBroad is declared categorical but the database column is integer"
            ),
            "{e}"
        );
        assert!(
            e.contains("column gone is missing from public.cases (the database has GONE"),
            "{e}"
        );
        assert!(!e.contains("flag"), "{e}");
        assert!(check_columns("cases", "t", &schema, &[], &[])
            .unwrap_err()
            .contains("does not exist"));
    }
}
