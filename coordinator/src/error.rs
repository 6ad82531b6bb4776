//! The coordinator library's errors: what went wrong, typed, with a
//! message that names the file, the `[section] key` or the node at fault
//! and what to do. The binaries (`fedq`, the Python package) show them;
//! only they use `anyhow`.

use std::path::PathBuf;

/// The federation file, or the TLS files it names, cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A file cannot be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// What the file is, e.g. "federation file".
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The federation file does not parse or breaks a rule.
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        why: String,
    },
    /// The TLS material does not form a usable client (names the `tls.*`
    /// key).
    #[error("{0}")]
    Tls(String),
}

/// The heads file, or an audit pull, failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The heads file cannot be read or written.
    #[error("{what} {}: {source}", path.display())]
    File {
        /// "cannot read" or "cannot write".
        what: &'static str,
        /// The heads file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The heads file holds something other than heads.
    #[error("{}: not a heads file ({why}); move it aside to start a new one", path.display())]
    Format {
        /// The heads file.
        path: PathBuf,
        /// What failed to parse.
        why: String,
    },
    /// A node's answer or log could not be used.
    #[error("{node}: {why}")]
    Node {
        /// The node.
        node: String,
        /// What went wrong.
        why: String,
    },
}

/// Rendering a result (JSON, CSV, HTML) failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// JSON encoding.
    #[error("cannot encode the result as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// CSV encoding.
    #[error("cannot encode the result as CSV: {0}")]
    Csv(#[from] csv::Error),
    /// Anything else, said in words.
    #[error("{0}")]
    Other(String),
}
